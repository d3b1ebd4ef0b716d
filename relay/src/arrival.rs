//! The arrival clock: the monotonic time the I/O layer reads, and the conversion of the kernel's
//! receive and transmit stamps (wall clock) to it. Named apart from [`relay_io::Clock`], which it
//! wraps: this one also knows the realtime − monotonic offset of the current batch and counts
//! what it cannot convert.

use relay_proto::{MonoTime, Relay};

use crate::counters::BackendCounters;

/// The monotonic clock the I/O layer reads, as [`MonoTime`] since the relay started, and the
/// conversion of the kernel's receive stamps to it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArrivalClock {
    /// The monotonic clock.
    mono: relay_io::Clock,
    /// Kernel stamps → monotonic time, re-sampled every batch.
    wall: relay_io::WallToMono,
}

impl ArrivalClock {
    /// A clock starting now, with no sample yet.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Now.
    #[must_use]
    pub fn now(&self) -> MonoTime {
        MonoTime::from_nanos(self.mono.now_ns())
    }

    /// Re-samples the realtime − monotonic offset (once per batch, after the wait and before
    /// the batch's datagrams are read) and gives it to the core, which writes probes' arrivals
    /// on the wall clock with it (`arrival + offset`: the kernel's stamp itself); returns now,
    /// and counts a wall-clock step in `counters`.
    pub fn resample(&mut self, relay: &mut Relay, counters: &mut BackendCounters) -> MonoTime {
        let s = self.mono.sample();
        if self.wall.resample(s) {
            counters.clock_steps += 1;
            tracing::warn!(
                "the wall clock stepped: this batch's arrivals are taken at handling time \
                 (rtprelay_clock_steps_total)"
            );
        }
        relay.set_wall_offset(self.wall.offset_ns().and_then(|o| i64::try_from(o).ok()));
        MonoTime::from_nanos(s.mono_after)
    }

    /// A kernel transmit stamp on the monotonic clock; `None` when it cannot be trusted (a step
    /// of the wall clock in this batch, or out of range), which the core counts as missing.
    #[must_use]
    pub fn convert(&self, t: relay_io::WallTime) -> Option<MonoTime> {
        self.wall.to_mono(t).map(MonoTime::from_nanos)
    }

    /// The arrival of a datagram whose control messages are `control`: the kernel's stamp on
    /// the monotonic clock, or `handled` where there is none or it cannot be trusted (counted).
    pub fn arrival(
        &self,
        control: &[u8],
        handled: MonoTime,
        counters: &mut BackendCounters,
    ) -> MonoTime {
        match relay_io::rx_timestamp(control) {
            Ok(Some(t)) => match self.wall.to_mono(t) {
                Some(ns) => MonoTime::from_nanos(ns),
                None => {
                    counters.untrusted_timestamps += 1;
                    handled
                }
            },
            Ok(None) | Err(_) => {
                counters.missing_timestamps += 1;
                handled
            }
        }
    }
}

/// A transmit stamp read from an error queue or an io_uring completion: to the core, converted
/// to its clock (a stamp that cannot be converted is counted missing there); an entry that held
/// no usable stamp is counted.
pub fn take_stamp(
    relay: &mut Relay,
    counters: &mut BackendCounters,
    clock: &ArrivalClock,
    stamp: Result<relay_io::TxStamp, relay_io::TxStampError>,
) {
    match stamp {
        Ok(st) => {
            counters.tx_stamps += 1;
            relay.tx_stamped(st.id, clock.convert(st.at));
        }
        Err(_) => counters.bad_stamps += 1,
    }
}
