//! When each forwarded datagram left: the send-time half of the relay's API.
//!
//! A forwarded datagram's forward time (arrival to send) and, toward the echo, its T0 end at its
//! send, which happens after [`Relay::handle_received`] returns, in the backend. With
//! [`SendTimes::Kernel`] each send carries an id ([`Relay::send_id`], or [`Relay::batch_queued`]
//! for a gathered GSO send) and its kernel transmit stamp settles it ([`Relay::tx_stamped`];
//! [`Relay::send_failed`] when it never left); with [`SendTimes::Estimated`] the datagrams wait
//! in a queue until the backend reports their system call ([`Relay::submitted_between`]). Either
//! way a round trip whose echo came back before its T0 was known is settled here, when the T0
//! comes.
//!
//! Apart from the routing in the parent module because it is bookkeeping about the backend's
//! sends, not about the datagram: the same queue serves every channel, and a send may outlive
//! its channel.

use super::channel::{missing, stamp_t0, Channel};
use super::{Relay, SendTimes, SocketId, Verdict};
use crate::rtp::Ssrc;
use crate::sends::Record;
use crate::stats::{Direction, MissingKind, TimestampCounters};
use crate::t0::Unstamped;
use crate::time::MonoTime;

/// Where a forwarded datagram's send stands in the submission queue.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// Its own send, the n-th queued since the last submission.
    Queued(u32),
    /// One of several in a gathered send (GSO) the backend numbers so, queued later.
    Batch(u16),
}

/// A forwarded datagram waiting for its send's submission.
#[derive(Clone, Copy, Debug)]
pub(super) struct Unsubmitted {
    /// Its channel's slot.
    socket: SocketId,
    /// Its arrival.
    arrival: MonoTime,
    /// Its direction.
    direction: Direction,
    /// The T0 entry it made, if it made one (an RTP packet toward the echo).
    t0: Option<(Ssrc, u16)>,
    /// Where its send stands in the submission queue.
    place: Place,
}

/// Unsubmitted datagrams kept without growing: more than a batch ever holds (the rings' CQ).
pub(super) const UNSUBMITTED_CAPACITY: usize = 16_384;

impl Relay {
    /// Starts timing the send of the datagram [`Relay::handle_received`] just decided on: arrived
    /// at `arrival`, handled at `handled`, on channel `socket`, with the T0 entry `t0` if it made
    /// one. Clears [`Relay::send_id`]; if `verdict` forwards it, records its receive delay and,
    /// with kernel send times, makes the record whose id [`Relay::send_id`] then gives; with
    /// estimated ones, queues it until its submission is reported.
    pub(super) fn await_send(
        &mut self,
        verdict: Verdict,
        t0: Option<(Ssrc, u16)>,
        arrival: MonoTime,
        handled: MonoTime,
        socket: SocketId,
    ) {
        self.last_send = None;
        if let Verdict::Forward { direction, .. } = verdict {
            self.hist
                .receive_delay
                .get_mut(direction)
                .record(handled.nanos_since(arrival));
            if self.config.send_times == SendTimes::Kernel {
                let tag = self
                    .channels
                    .get(socket.index())
                    .and_then(Option::as_ref)
                    .map_or(0, |c| c.tag);
                let record = Record {
                    socket: socket.0,
                    tag,
                    arrival,
                    direction,
                    t0,
                };
                let (channels, stamps) = (&mut self.channels, &mut self.stamps);
                let id = self.sends.push(record, |r| {
                    give_up(channels, stamps, r, MissingKind::NoStamp);
                });
                self.last_send = Some(id);
            } else if self.unsubmitted.len() < self.unsubmitted.capacity() {
                self.unsubmitted.push(Unsubmitted {
                    socket,
                    arrival,
                    direction,
                    t0,
                    place: Place::Queued(self.queued),
                });
                self.queued += 1;
            } else {
                // More than a batch can hold: settle what is queued as submitted now, this
                // datagram with them.
                self.submitted(handled);
                let limits = (self.echo_timeout_ns, self.rtt_threshold_ns);
                let ch = self
                    .channels
                    .get_mut(socket.index())
                    .and_then(Option::as_mut);
                if let (Some(key), Some(ch)) = (t0, ch) {
                    stamp_t0(ch, &mut self.hist, &mut self.stamps, limits, key, handled);
                }
                if handled > arrival {
                    self.hist
                        .forward
                        .get_mut(direction)
                        .record(handled.nanos_since(arrival));
                }
            }
        }
    }

    /// Every datagram forwarded since the last call has had its send submitted at `at`: each
    /// one's forward time (arrival to `at`) is recorded and each T0 toward the echo becomes `at`.
    /// ([`SendTimes::Estimated`] only.)
    pub fn submitted(&mut self, at: MonoTime) {
        self.submitted_between(at, at);
    }

    /// With [`SendTimes::Kernel`]: the id the send of the datagram [`Relay::handle_received`]
    /// just forwarded must carry (`SCM_TS_OPT_ID`), so that its kernel transmit stamp comes back
    /// with it. `None` with estimated times, after a drop, or once the datagram was gathered
    /// into a GSO send ([`Relay::gathered_last`]; that send carries [`Relay::batch_queued`]'s).
    #[must_use]
    pub const fn send_id(&self) -> Option<u32> {
        self.last_send
    }

    /// The kernel's transmit stamp for send `id` came: `at` on the monotonic clock, or `None`
    /// when it cannot be converted (a step of the wall clock). Settles each datagram of the send:
    /// its forward time ends at `at`, and toward the echo `at` is its T0, which completes the
    /// round trip if its echo came first. A time that would not be positive is not recorded but
    /// counted ([`MissingKind`]). A stamp no send waits for (given up on, or an id never handed
    /// out) is counted as stale. A datagram whose channel closed since is timed relay-wide only.
    pub fn tx_stamped(&mut self, id: u32, at: Option<MonoTime>) {
        let (channels, stamps, hist) = (&mut self.channels, &mut self.stamps, &mut self.hist);
        let (echo_timeout_ns, rtt_threshold_ns) = (self.echo_timeout_ns, self.rtt_threshold_ns);
        let settled = self.sends.settle(id, |r| {
            let Some(at) = at else {
                give_up(channels, stamps, r, MissingKind::ClockStep);
                return;
            };
            let mut ch = channel_of(channels, &r);
            stamps.kernel += 1;
            if let Some(ch) = ch.as_deref_mut() {
                ch.timestamps.kernel += 1;
            }
            if at > r.arrival {
                hist.forward
                    .get_mut(r.direction)
                    .record(at.nanos_since(r.arrival));
            } else {
                missing(stamps, ch.as_deref_mut(), MissingKind::ForwardNotPositive);
            }
            let (Some(ch), Some((ssrc, seq))) = (ch, r.t0) else {
                return;
            };
            stamp_t0(
                ch,
                hist,
                stamps,
                (echo_timeout_ns, rtt_threshold_ns),
                (ssrc, seq),
                at,
            );
        });
        if !settled {
            self.stamps.stale += 1;
        }
    }

    /// Send `id` failed (refused, or its completion reported an error): its datagrams never
    /// left, so no stamp will come and nothing is counted missing. Returns the channel slot and
    /// direction of its first datagram, for the backend's error log.
    pub fn send_failed(&mut self, id: u32) -> Option<(SocketId, Direction)> {
        let mut first = None;
        self.sends.settle(id, |r| {
            first.get_or_insert((SocketId(r.socket), r.direction));
        });
        first
    }

    /// The datagram just forwarded by [`Relay::handle_received`] does not get a send of its own:
    /// the backend gathers it into send `batch` (several datagrams, one `sendmsg` with UDP GSO),
    /// which it queues later and reports with [`Relay::batch_queued`]. Until then the datagram
    /// stays unsubmitted, even across a submission.
    pub fn gathered_last(&mut self, batch: u16) {
        if let Some(id) = self.last_send.take() {
            let i = usize::from(batch);
            if self.chains.len() <= i {
                // Grows to the backend's number of batch buffers once, then never again.
                self.chains.resize(i + 1, None);
            }
            if let Some(c) = self.chains.get_mut(i) {
                *c = match *c {
                    None => Some((id, id)),
                    Some((head, tail)) => {
                        self.sends.chain(tail, id);
                        Some((head, id))
                    }
                };
            }
            return;
        }
        if let Some(u) = self.unsubmitted.last_mut() {
            if let Place::Queued(q) = u.place {
                if q + 1 == self.queued {
                    self.queued -= 1;
                }
                u.place = Place::Batch(batch);
                let i = usize::from(batch);
                if self.batch_place.len() <= i {
                    // Grows to the backend's number of batch buffers once, then never again.
                    self.batch_place
                        .resize(i + 1, (self.submission.wrapping_sub(1), 0));
                }
            }
        }
    }

    /// The backend queued gathered send `batch`, after every send queued so far. With kernel
    /// send times, returns the id the send must carry: one stamp settles all its datagrams.
    pub fn batch_queued(&mut self, batch: u16) -> Option<u32> {
        if let Some(c) = self.chains.get_mut(usize::from(batch)) {
            if let Some((head, _)) = c.take() {
                return Some(head);
            }
        }
        if let Some(p) = self.batch_place.get_mut(usize::from(batch)) {
            *p = (self.submission, self.queued);
            self.queued += 1;
        }
        None
    }

    /// Every send queued since the last call was submitted by one system call that began at
    /// `start` and returned at `end`, which issued them in the order they were queued (io_uring
    /// issues a batch's UDP sends one after another, inline). The k-th of n (from 0) takes the
    /// k-th n-th of the call's time, and its packet meets the wire a quarter into that share: on
    /// loopback a send's call also does the receiver's work (the softirq delivery and wake-up run
    /// inside it), which comes after the packet passes the device. So it is taken to leave at
    /// `start + (end − start)·(4k + 1)/4n`. Measured against tcpdump here: the share's start put
    /// T0 ~5 µs early, its middle ~4.5 µs late; a quarter leaves under 1.5 µs.
    /// Each datagram in it has its forward time end and (toward the echo) its T0 set there, so a
    /// large batch does not charge its last send's wait to the network; the datagrams of one
    /// gathered send share its moment, as they share its one packet on the wire. Datagrams of a
    /// gathered send not queued yet wait for the next call.
    pub fn submitted_between(&mut self, start: MonoTime, end: MonoTime) {
        let n = u64::from(self.queued);
        let span = end.nanos_since(start);
        let (hist, channels, places) = (&mut self.hist, &mut self.channels, &self.batch_place);
        let stamps = &mut self.stamps;
        let (echo_timeout_ns, rtt_threshold_ns) = (self.echo_timeout_ns, self.rtt_threshold_ns);
        let this = self.submission;
        self.unsubmitted.retain(|u| {
            let k = match u.place {
                Place::Queued(q) => q,
                Place::Batch(b) => match places.get(usize::from(b)) {
                    Some(&(sub, q)) if sub == this => q,
                    _ => return true, // still gathering: settled by a later submission
                },
            };
            let at = MonoTime::from_nanos(
                start.as_nanos() + span.saturating_mul(4 * u64::from(k) + 1) / (4 * n).max(1),
            );
            let ch = channels.get_mut(u.socket.index()).and_then(Option::as_mut);
            if at > u.arrival {
                hist.forward
                    .get_mut(u.direction)
                    .record(at.nanos_since(u.arrival));
            } else {
                missing(
                    stamps,
                    ch.map(|c| &mut **c),
                    MissingKind::ForwardNotPositive,
                );
                return false;
            }
            if let (Some((ssrc, seq)), Some(ch)) = (
                u.t0,
                channels.get_mut(u.socket.index()).and_then(Option::as_mut),
            ) {
                let limits = (echo_timeout_ns, rtt_threshold_ns);
                stamp_t0(ch, hist, stamps, limits, (ssrc, seq), at);
            }
            false
        });
        self.queued = 0;
        self.submission = self.submission.wrapping_add(1);
    }

    /// Datagrams forwarded whose send has not been reported submitted.
    #[must_use]
    pub fn unsubmitted(&self) -> usize {
        self.unsubmitted.len()
    }
}

/// The channel a send record belongs to, if it is still open (the slot's channel has the tag
/// the record was made with).
fn channel_of<'a>(channels: &'a mut [Option<Box<Channel>>], r: &Record) -> Option<&'a mut Channel> {
    channels
        .get_mut(r.socket as usize)
        .and_then(Option::as_deref_mut)
        .filter(|c| c.tag == r.tag)
}

/// Gives up on a send's stamp (never came, or cannot be converted): counted as `kind`, and its
/// packet's round trip, if its echo came back, is unmeasured.
pub(super) fn give_up(
    channels: &mut [Option<Box<Channel>>],
    stamps: &mut TimestampCounters,
    r: Record,
    kind: MissingKind,
) {
    let mut ch = channel_of(channels, &r);
    missing(stamps, ch.as_deref_mut(), kind);
    if let (Some(ch), Some((ssrc, seq))) = (ch, r.t0) {
        if ch.t0.unstamped(ssrc, seq) == Unstamped::Returned {
            ch.round_trip.unmeasured += 1;
        }
    }
}
