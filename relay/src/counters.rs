//! The backend's own counters: what only the I/O loop can see (wake-ups and their batch sizes,
//! refused sends by errno, receive errors, kernel-timestamp fallbacks, transmit stamps), with the
//! once-a-second log of refused sends. The core's counters live in `relay-proto`; these are
//! published beside them ([`crate::snapshot`]) and summed over shards.

use std::io;

use relay_proto::MonoTime;
use serde::Serialize;

/// Counters only the backend can keep.
#[derive(Clone, Debug, Serialize)]
pub struct BackendCounters {
    /// Wake-ups of the data plane (ring waits returning, or socket readiness events).
    pub wakeups: u64,
    /// Completions (or datagrams) handled per wake-up: counts in power-of-two buckets, bucket i
    /// holding sizes in (2^(i-1), 2^i].
    pub batch_buckets: [u64; BATCH_BUCKETS],
    /// Sum of all batch sizes.
    pub batch_sum: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Of those, by errno (index: the errno, up to [`ERRNO_SLOTS`]; larger ones in the last).
    #[serde(serialize_with = "errno_counts")]
    pub send_errnos: [u64; ERRNO_SLOTS],
    /// Receives that failed with an error other than running out of buffers.
    pub recv_errors: u64,
    /// Datagrams longer than a receive buffer, dropped.
    pub oversize: u64,
    /// Multishot receives re-armed after they ran out of buffers.
    pub rearm_nobufs: u64,
    /// Multishot receives re-armed for any other reason (CQ overflow, errors).
    pub rearm_other: u64,
    /// `io_uring_enter` calls (io_uring backend): the waits, and the submissions of a batch's
    /// sends that kernel timestamps give an enter of their own.
    pub enters: u64,
    /// Steps of the wall clock seen while converting kernel stamps.
    pub clock_steps: u64,
    /// Datagrams that came without a kernel timestamp (kernel mode): their arrival is the
    /// moment they were handled.
    pub missing_timestamps: u64,
    /// Kernel stamps refused (in the future, too old, or in a batch with a clock step): their
    /// arrival is the moment they were handled.
    pub untrusted_timestamps: u64,
    /// Kernel transmit stamps read (from the ring's command or the error queues).
    pub tx_stamps: u64,
    /// Transmit-stamp completions or error-queue entries that held no usable stamp.
    pub bad_stamps: u64,
    /// Transmit-stamp commands (`--tx-stamps command`) re-armed after they ended.
    pub stamp_rearms: u64,
}

impl Default for BackendCounters {
    fn default() -> Self {
        Self {
            wakeups: 0,
            batch_buckets: [0; BATCH_BUCKETS],
            batch_sum: 0,
            send_errors: 0,
            send_errnos: [0; ERRNO_SLOTS],
            recv_errors: 0,
            oversize: 0,
            rearm_nobufs: 0,
            rearm_other: 0,
            enters: 0,
            clock_steps: 0,
            missing_timestamps: 0,
            untrusted_timestamps: 0,
            tx_stamps: 0,
            bad_stamps: 0,
            stamp_rearms: 0,
        }
    }
}

/// Batch-size buckets: 1, 2, 4, … 2^15 and above.
pub const BATCH_BUCKETS: usize = 17;

/// Errno values counted one by one (Linux's go up to 133); the last slot takes any above.
pub const ERRNO_SLOTS: usize = 136;

/// Serialises per-errno counts as `{"ECONNREFUSED": 3, …}`, the non-zero ones only.
fn errno_counts<S: serde::Serializer>(
    counts: &[u64; ERRNO_SLOTS],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(e, n)| (errno_name(e), n)),
    )
}

/// The symbolic name of `errno`, as the `errno` label of `rtprelay_send_errors_total`.
#[must_use]
pub fn errno_name(errno: usize) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::EINTR, "EINTR"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EINVAL, "EINVAL"),
        (libc::EPIPE, "EPIPE"),
        (libc::EMSGSIZE, "EMSGSIZE"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::EDESTADDRREQ, "EDESTADDRREQ"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::ENETUNREACH, "ENETUNREACH"),
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
        (libc::ECANCELED, "ECANCELED"),
    ];
    known
        .iter()
        .find(|(n, _)| usize::try_from(*n).is_ok_and(|n| n == errno))
        .map_or_else(|| format!("errno_{errno}"), |(_, s)| (*s).to_owned())
}

/// Logs refused sends at most once a second, with their errno and what was suppressed.
#[derive(Debug, Default)]
pub struct SendErrorLog {
    /// When the last line was written.
    last: Option<MonoTime>,
    /// Errors not logged since.
    suppressed: u64,
}

impl SendErrorLog {
    /// Counts a send refused with `errno` (positive) on channel slot `slot`, logging it unless
    /// a line was written less than a second ago.
    pub fn note(
        &mut self,
        counters: &mut BackendCounters,
        now: MonoTime,
        errno: i32,
        slot: u32,
        direction: relay_proto::Direction,
    ) {
        counters.send_errors += 1;
        let i = usize::try_from(errno).unwrap_or(0).min(ERRNO_SLOTS - 1);
        if let Some(n) = counters.send_errnos.get_mut(i) {
            *n += 1;
        }
        if self
            .last
            .is_some_and(|t| now.nanos_since(t) < 1_000_000_000)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            errno = %errno_name(i),
            slot,
            direction = direction.as_str(),
            suppressed = self.suppressed,
            "a send was refused: {} (rtprelay_send_errors_total; at most one line a second)",
            io::Error::from_raw_os_error(errno)
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

impl BackendCounters {
    /// Adds `other`'s counts (several shards as one relay).
    pub fn accumulate(&mut self, other: &Self) {
        // Destructured, so that a new counter cannot be left out of the sum.
        let Self {
            wakeups,
            batch_buckets,
            batch_sum,
            send_errors,
            send_errnos,
            recv_errors,
            oversize,
            rearm_nobufs,
            rearm_other,
            enters,
            clock_steps,
            missing_timestamps,
            untrusted_timestamps,
            tx_stamps,
            bad_stamps,
            stamp_rearms,
        } = other;
        for (a, b) in self.batch_buckets.iter_mut().zip(batch_buckets) {
            *a += b;
        }
        for (a, b) in self.send_errnos.iter_mut().zip(send_errnos) {
            *a += b;
        }
        for (a, b) in [
            (&mut self.wakeups, wakeups),
            (&mut self.batch_sum, batch_sum),
            (&mut self.send_errors, send_errors),
            (&mut self.recv_errors, recv_errors),
            (&mut self.oversize, oversize),
            (&mut self.rearm_nobufs, rearm_nobufs),
            (&mut self.rearm_other, rearm_other),
            (&mut self.enters, enters),
            (&mut self.clock_steps, clock_steps),
            (&mut self.missing_timestamps, missing_timestamps),
            (&mut self.untrusted_timestamps, untrusted_timestamps),
            (&mut self.tx_stamps, tx_stamps),
            (&mut self.bad_stamps, bad_stamps),
            (&mut self.stamp_rearms, stamp_rearms),
        ] {
            *a += b;
        }
    }

    /// Records one wake-up that handled `n` completions.
    pub fn batch(&mut self, n: usize) {
        self.wakeups += 1;
        self.batch_sum += n as u64;
        let i = (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize;
        if let Some(b) = self.batch_buckets.get_mut(i.min(BATCH_BUCKETS - 1)) {
            *b += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_fall_in_power_of_two_buckets() {
        let mut c = BackendCounters::default();
        for n in [0, 1, 2, 3, 4, 5, 1000, 1 << 20] {
            c.batch(n);
        }
        assert_eq!(c.batch_buckets[0], 2, "0 and 1");
        assert_eq!(c.batch_buckets[1], 1, "2");
        assert_eq!(c.batch_buckets[2], 2, "3 and 4");
        assert_eq!(c.batch_buckets[3], 1, "5");
        assert_eq!(c.batch_buckets[10], 1, "1000 ≤ 1024");
        assert_eq!(c.batch_buckets[16], 1, "the rest");
        assert_eq!(c.wakeups, 8);
    }
}
