//! Just enough of rtpengine's ng control protocol (bencoded dictionaries over UDP, each message
//! prefixed by a cookie) to set up calls that forward loadgen ↔ echo exactly like the relay does:
//! an `offer` with loadgen's SDP, an `answer` with the echo's, and a `delete` at the end.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

/// A bencoded value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bencode {
    /// A byte string.
    Bytes(Vec<u8>),
    /// An integer.
    Int(i64),
    /// A list.
    List(Vec<Bencode>),
    /// A dictionary (keys sorted, as bencode requires).
    Dict(BTreeMap<Vec<u8>, Bencode>),
}

impl Bencode {
    /// A byte string from text.
    #[must_use]
    pub fn text(s: &str) -> Self {
        Self::Bytes(s.as_bytes().to_vec())
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Bytes(b) => {
                out.extend_from_slice(b.len().to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(b);
            }
            Self::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Self::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode(out);
                }
                out.push(b'e');
            }
            Self::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    Self::Bytes(k.clone()).encode(out);
                    v.encode(out);
                }
                out.push(b'e');
            }
        }
    }

    /// Decodes one value from the front of `input`; returns it and the rest.
    ///
    /// # Errors
    /// Not bencode.
    pub fn decode(input: &[u8]) -> anyhow::Result<(Self, &[u8])> {
        let (&first, rest) = input
            .split_first()
            .ok_or_else(|| anyhow!("empty bencode"))?;
        match first {
            b'i' => {
                let end = rest
                    .iter()
                    .position(|&b| b == b'e')
                    .ok_or_else(|| anyhow!("unterminated integer"))?;
                let n = std::str::from_utf8(&rest[..end])?.parse()?;
                Ok((Self::Int(n), &rest[end + 1..]))
            }
            b'l' => {
                let mut items = Vec::new();
                let mut rest = rest;
                while rest.first() != Some(&b'e') {
                    let (v, r) = Self::decode(rest)?;
                    items.push(v);
                    rest = r;
                }
                Ok((Self::List(items), &rest[1..]))
            }
            b'd' => {
                let mut map = BTreeMap::new();
                let mut rest = rest;
                while rest.first() != Some(&b'e') {
                    let (k, r) = Self::decode(rest)?;
                    let Self::Bytes(k) = k else {
                        bail!("a dictionary key is not a string")
                    };
                    let (v, r) = Self::decode(r)?;
                    map.insert(k, v);
                    rest = r;
                }
                Ok((Self::Dict(map), &rest[1..]))
            }
            b'0'..=b'9' => {
                let colon = input
                    .iter()
                    .position(|&b| b == b':')
                    .ok_or_else(|| anyhow!("a string without a length"))?;
                let len: usize = std::str::from_utf8(&input[..colon])?.parse()?;
                let body = input
                    .get(colon + 1..colon + 1 + len)
                    .ok_or_else(|| anyhow!("a string longer than the message"))?;
                Ok((Self::Bytes(body.to_vec()), &input[colon + 1 + len..]))
            }
            other => bail!("unexpected byte {other:#04x} in bencode"),
        }
    }

    /// The value of `key` in a dictionary, as text.
    #[must_use]
    pub fn get_text(&self, key: &str) -> Option<String> {
        match self {
            Self::Dict(d) => match d.get(key.as_bytes()) {
                Some(Self::Bytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A client of rtpengine's ng port.
#[derive(Debug)]
pub struct NgClient {
    sock: UdpSocket,
    next: u64,
}

impl NgClient {
    /// A client talking to `ng`.
    ///
    /// # Errors
    /// The socket cannot be made.
    pub fn new(ng: SocketAddr) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(ng)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { sock, next: 1 })
    }

    /// Sends `command` with `fields`; returns the reply dictionary (an error if its result is
    /// not `ok` or `pong`).
    ///
    /// # Errors
    /// No reply, or an error reply.
    pub fn call(&mut self, command: &str, fields: Vec<(&str, Bencode)>) -> anyhow::Result<Bencode> {
        let cookie = format!("c{}", self.next);
        self.next += 1;
        let mut map = BTreeMap::new();
        map.insert(b"command".to_vec(), Bencode::text(command));
        for (k, v) in fields {
            map.insert(k.as_bytes().to_vec(), v);
        }
        let mut msg = format!("{cookie} ").into_bytes();
        Bencode::Dict(map).encode(&mut msg);
        self.sock.send(&msg)?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .with_context(|| format!("no reply from rtpengine to `{command}`"))?;
            let reply = &buf[..n];
            let Some(body) = reply.strip_prefix(format!("{cookie} ").as_bytes()) else {
                continue; // a late reply to an earlier request
            };
            let (v, _) = Bencode::decode(body)?;
            match v.get_text("result").as_deref() {
                Some("ok" | "pong") => return Ok(v),
                _ => bail!(
                    "rtpengine refused `{command}`: {}",
                    v.get_text("error-reason").unwrap_or_default()
                ),
            }
        }
    }
}

/// A one-stream audio SDP for `addr`.
#[must_use]
pub fn sdp(addr: SocketAddr, session: u64) -> String {
    format!(
        "v=0\r\no=- {session} 1 IN IP4 {ip}\r\ns=bench\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n",
        ip = addr.ip(),
        port = addr.port()
    )
}

/// The media address an SDP announces (`c=` and the first `m=audio`).
///
/// # Errors
/// The SDP has no usable address.
pub fn media_addr(sdp: &str) -> anyhow::Result<SocketAddr> {
    let ip = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("c=IN IP4 "))
        .ok_or_else(|| anyhow!("SDP without c=IN IP4"))?;
    let port = sdp
        .lines()
        .find_map(|l| l.trim().strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| anyhow!("SDP without m=audio"))?;
    Ok(SocketAddr::new(ip.trim().parse()?, port.parse()?))
}

/// Sets up call `i`: loadgen at `caller`, echo at `callee`; returns the address loadgen must
/// send to.
///
/// # Errors
/// rtpengine refused or did not answer.
pub fn setup_call(
    ng: &mut NgClient,
    i: usize,
    caller: SocketAddr,
    callee: SocketAddr,
) -> anyhow::Result<SocketAddr> {
    let call = format!("bench-{i}");
    let flags = || Bencode::List(vec![Bencode::text("asymmetric")]);
    let offer = ng.call(
        "offer",
        vec![
            ("call-id", Bencode::text(&call)),
            ("from-tag", Bencode::text("caller")),
            ("sdp", Bencode::text(&sdp(caller, i as u64))),
            ("ICE", Bencode::text("remove")),
            ("flags", flags()),
        ],
    )?;
    offer
        .get_text("sdp")
        .ok_or_else(|| anyhow!("offer reply without SDP"))?;
    let answer = ng.call(
        "answer",
        vec![
            ("call-id", Bencode::text(&call)),
            ("from-tag", Bencode::text("caller")),
            ("to-tag", Bencode::text("callee")),
            ("sdp", Bencode::text(&sdp(callee, i as u64 + 1_000_000))),
            ("ICE", Bencode::text("remove")),
            ("flags", flags()),
        ],
    )?;
    media_addr(
        &answer
            .get_text("sdp")
            .ok_or_else(|| anyhow!("answer reply without SDP"))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bencode_round_trips_and_rejects_garbage() {
        let mut d = BTreeMap::new();
        d.insert(b"result".to_vec(), Bencode::text("ok"));
        d.insert(b"n".to_vec(), Bencode::Int(-3));
        d.insert(
            b"l".to_vec(),
            Bencode::List(vec![Bencode::text("a"), Bencode::Int(1)]),
        );
        let v = Bencode::Dict(d);
        let mut out = Vec::new();
        v.encode(&mut out);
        assert_eq!(out, b"d1:ll1:ai1ee1:ni-3e6:result2:oke");
        let (back, rest) = Bencode::decode(&out).unwrap();
        assert_eq!(back, v);
        assert!(rest.is_empty());
        assert_eq!(back.get_text("result").as_deref(), Some("ok"));
        for bad in [&b""[..], b"x", b"5:ab", b"i12", b"d1:a"] {
            assert!(Bencode::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sdp_media_address_is_read_back() {
        let a: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(media_addr(&sdp(a, 1)).unwrap(), a);
        assert!(media_addr("v=0\r\n").is_err());
    }
}
