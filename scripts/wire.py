#!/usr/bin/env python3
"""The wire's own timing of a relay run, from a loopback capture, beside the relay's figures.

    scripts/wire.py CAPTURE.pcap RELAY.json ECHO_PORT [LABEL [METRICS.txt]]

CAPTURE is `tcpdump -i lo --time-stamp-precision=nano -w` of the run (the packets' kernel
timestamps); RELAY is the relay's figures: `loadgen rtp --json`'s report (its `relay` part) or
the relay's own `/stats` (its `global` part), with the RTT and forward percentiles. METRICS, the
relay's `/metrics` at the end of the run, gives the share of its round trips under 10 µs (the
`rtprelay_rtt_seconds` bucket at 1e-05). Packets are matched by (relay port, RTP sequence
number):

- wire RTT: relay port -> echo, to echo -> relay port (the round trip the relay measures);
- wire residence: Asterisk -> relay port, to relay port -> echo (time inside the relay).

With a shared echo leg (`relay --echo-leg shared`: one relay port talks to the echo, seen here
as a single relay port) the echo leg is matched by (tag SSRC, sequence) instead, and the
residence by (sequence, first payload bytes), the first time such a packet is seen away from the
echo being its way in from Asterisk (the relay changes only the SSRC on the echo leg).

Prints one Markdown table row and, on standard error, the counts behind it. Exits 1 when a
target is missed: relay RTT p50 within 2 µs + 1 % of the wire's, p99 within 5 µs + 2 %, the
share of round trips under 10 µs within 1 percentage point, the smallest round trip not below
the wire's smallest − 2 µs, forward p50 within 2 µs of the wire residence.
"""

import json
import struct
import sys


def datagrams(path):
    """(timestamp ns, src port, dst port, UDP payload) of every IPv4 UDP packet."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic != 0xA1B23C4D:
        sys.exit(f"{path}: not a nanosecond pcap (magic {magic:#x}); capture with --time-stamp-precision=nano")
    linktype = struct.unpack_from("<I", data, 20)[0]
    link = {1: 14, 113: 16, 276: 20}.get(linktype)
    if link is None:
        sys.exit(f"{path}: link type {linktype} not handled")
    off = 24
    while off + 16 <= len(data):
        sec, nsec, incl, _ = struct.unpack_from("<IIII", data, off)
        off += 16
        pkt = data[off : off + incl]
        off += incl
        ip = pkt[link:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        ihl = (ip[0] & 15) * 4
        udp = ip[ihl:]
        if len(udp) < 8:
            continue
        sport, dport = struct.unpack_from("!HH", udp, 0)
        yield sec * 1_000_000_000 + nsec, sport, dport, bytes(udp[8:])


def segments(payload, sizes):
    """A UDP GSO send (or a GRO-coalesced receive) is one packet on loopback: the kernel never
    cuts it, so the capture holds its datagrams back to back, each sized as the first (the last
    may be shorter), all of one moment. The segment size is not in the packet: it is taken from
    the sizes seen on the Asterisk leg (never coalesced), the most common first, when every cut
    lands on an RTP header of the first one's payload type."""
    n = len(payload)
    if n < 24 or payload[0] >> 6 != 2:
        return [payload]
    pt = payload[1] & 0x7F
    for size in sizes:
        if size >= n or size < 12:
            continue
        cuts = range(0, n, size)
        if n - cuts[-1] >= 12 and all(payload[c] >> 6 == 2 and payload[c + 1] & 0x7F == pt for c in cuts):
            return [payload[c : c + size] for c in cuts]
    return [payload]


def rtp_fields(rtp):
    """(RTP sequence, SSRC, payload head) of a datagram that looks like RTP, else None."""
    if len(rtp) < 4 or rtp[0] >> 6 != 2:
        return None
    seq = struct.unpack_from("!H", rtp, 2)[0]
    ssrc = struct.unpack_from("!I", rtp, 8)[0] if len(rtp) >= 12 else 0
    return seq, ssrc, bytes(rtp[12:20])


def packets(path, echo_port):
    """(timestamp ns, src port, dst port, RTP sequence, SSRC, payload head) of every RTP datagram,
    the echo leg's GSO/GRO packets cut into their datagrams; and how many were so cut."""
    raw = list(datagrams(path))
    counts = {}
    for _, sport, dport, payload in raw:
        if echo_port not in (sport, dport):
            counts[len(payload)] = counts.get(len(payload), 0) + 1
    sizes = sorted(counts, key=lambda k: -counts[k])
    rows, cut = [], 0
    for ts, sport, dport, payload in raw:
        parts = segments(payload, sizes) if echo_port in (sport, dport) else [payload]
        cut += len(parts) > 1
        for part in parts:
            f = rtp_fields(part)
            if f is not None:
                rows.append((ts, sport, dport, *f))
    return rows, cut


def pct(values, q):
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(q * len(values) + 0.5)) - 1))
    return values[k]


def short_share(path):
    """Percentage of the relay's round trips under 10 µs, from its /metrics text."""
    under, count = None, None
    for line in open(path):
        if line.startswith('rtprelay_rtt_seconds_bucket{le="1e-05"}') or line.startswith(
            'rtprelay_rtt_seconds_bucket{le="0.00001"}'
        ):
            under = float(line.split()[-1])
        elif line.startswith("rtprelay_rtt_seconds_count"):
            count = float(line.split()[-1])
    if under is None or not count:
        return float("nan")
    return 100 * under / count


def main():
    cap, report, echo_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    label = sys.argv[4] if len(sys.argv) > 4 else ""
    metrics = sys.argv[5] if len(sys.argv) > 5 else None
    to_echo, from_echo, from_ast = {}, {}, {}
    relay_ports = set()
    rows, cut = packets(cap, echo_port)
    for _, sport, dport, *_ in rows:
        if dport == echo_port:
            relay_ports.add(sport)
    shared = len(relay_ports) == 1
    res_to = {}
    for ts, sport, dport, seq, ssrc, head in rows:
        if shared:
            if dport == echo_port:
                to_echo.setdefault((ssrc, seq), ts)
                res_to.setdefault((seq, head), ts)
            elif sport == echo_port and dport in relay_ports:
                from_echo.setdefault((ssrc, seq), ts)
            elif sport != echo_port:
                from_ast.setdefault((seq, head), ts)
        elif dport == echo_port:
            to_echo.setdefault((sport, seq), ts)
        elif sport == echo_port and dport in relay_ports:
            from_echo.setdefault((dport, seq), ts)
        elif dport in relay_ports:
            from_ast.setdefault((dport, seq), ts)
    if not shared:
        res_to = to_echo
    rtt = [from_echo[k] - t for k, t in to_echo.items() if k in from_echo and from_echo[k] >= t]
    res = [t - from_ast[k] for k, t in res_to.items() if k in from_ast and t >= from_ast[k]]
    r = json.load(open(report))
    rl = r["relay"] if "relay" in r else r["global"]
    us = lambda ns: ns / 1e3
    w50, w99 = us(pct(rtt, 0.50)), us(pct(rtt, 0.99))
    r50, r99 = us(rl["rtt"]["p50_ns"]), us(rl["rtt"]["p99_ns"])
    wmin, rmin = us(min(rtt)) if rtt else float("nan"), us(rl["rtt"]["min_ns"])
    wres = us(pct(res, 0.50))
    f50 = us(rl["forward"]["to_echo"]["p50_ns"])
    wshort = 100 * sum(1 for v in rtt if v < 10_000) / max(1, len(rtt))
    rshort = short_share(metrics) if metrics else float("nan")
    ok50 = abs(r50 - w50) <= 2 + 0.01 * w50
    ok99 = abs(r99 - w99) <= 5 + 0.02 * w99
    okshort = metrics is None or abs(rshort - wshort) <= 1
    okmin = rmin >= wmin - 2
    okf = abs(f50 - wres) <= 2
    mark = lambda ok: "yes" if ok else "**no**"
    print(
        f"| {label}{' (shared leg)' if shared else ''} | {w50:.1f} | {r50:.1f} | {r50 - w50:+.1f} | {mark(ok50)} "
        f"| {w99:.1f} | {r99:.1f} | {r99 - w99:+.1f} | {mark(ok99)} "
        f"| {wshort:.1f} | {rshort:.1f} | {mark(okshort)} "
        f"| {wmin:.1f} | {rmin:.1f} | {mark(okmin)} "
        f"| {wres:.1f} | {f50:.1f} | {f50 - wres:+.1f} | {mark(okf)} |"
    )
    print(
        f"wire: {len(to_echo)} to the echo ({cut} GSO/GRO packets cut into datagrams), "
        f"{len(rtt)} round trips matched, {len(res)} residences; "
        f"relay: {rl['rtt']['count']} round trips",
        file=sys.stderr,
    )
    sys.exit(0 if ok50 and ok99 and okshort and okmin and okf else 1)


if __name__ == "__main__":
    main()
