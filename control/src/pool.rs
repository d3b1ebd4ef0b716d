//! The pool of relay ports control hands out, one per call.
//!
//! Take and return are O(1): free ports wait in a FIFO queue, so `take` hands out the port that
//! has rested longest and a port just returned is the last to be reused: stray packets of an old
//! call (Asterisk keeps sending for a moment after a hang-up) cannot reach the next call on that
//! port while any other port is free. A bitmap of ports in use refuses a double return or a
//! foreign port, which would otherwise corrupt the pool.

use std::collections::VecDeque;
use std::ops::RangeInclusive;

/// A port returned that was not taken from this pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReturnError {
    /// The port is outside the pool's range.
    #[error("port {0} is not in the pool's range")]
    Foreign(u16),
    /// The port is already free.
    #[error("port {0} was returned twice")]
    NotInUse(u16),
}

/// Relay ports for calls.
#[derive(Clone, Debug)]
pub struct PortPool {
    /// The range.
    range: RangeInclusive<u16>,
    /// Free ports, longest-rested first.
    free: VecDeque<u16>,
    /// Bit per port of the range: taken.
    in_use: Vec<u64>,
    /// Takes refused because no port was free.
    exhausted: u64,
}

impl PortPool {
    /// A pool of every port in `range`, in order.
    #[must_use]
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let len = range.clone().count();
        Self {
            free: range.clone().collect(),
            in_use: vec![0; len.div_ceil(64)],
            range,
            exhausted: 0,
        }
    }

    fn bit(&self, port: u16) -> Option<(usize, u64)> {
        if !self.range.contains(&port) {
            return None;
        }
        let i = usize::from(port - self.range.start());
        Some((i / 64, 1 << (i % 64)))
    }

    /// The port that has rested longest, or `None` (counted) when every port is taken.
    pub fn take(&mut self) -> Option<u16> {
        let Some(port) = self.free.pop_front() else {
            self.exhausted += 1;
            return None;
        };
        if let Some((w, b)) = self.bit(port) {
            if let Some(word) = self.in_use.get_mut(w) {
                *word |= b;
            }
        }
        Some(port)
    }

    /// Gives `port` back; it is reused after every port that was free before it.
    ///
    /// # Errors
    /// The port is not from this pool, or is already free; the pool is unchanged.
    pub fn give_back(&mut self, port: u16) -> Result<(), ReturnError> {
        let (w, b) = self.bit(port).ok_or(ReturnError::Foreign(port))?;
        let word = self.in_use.get_mut(w).ok_or(ReturnError::Foreign(port))?;
        if *word & b == 0 {
            return Err(ReturnError::NotInUse(port));
        }
        *word &= !b;
        self.free.push_back(port);
        Ok(())
    }

    /// Ports free.
    #[must_use]
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Ports taken.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.range.clone().count() - self.free.len()
    }

    /// Takes refused for lack of a free port.
    #[must_use]
    pub const fn exhausted(&self) -> u64 {
        self.exhausted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_longest_rested_port() {
        let mut p = PortPool::new(21_000..=21_003);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_eq!((a, b), (21_000, 21_001));
        p.give_back(a).unwrap();
        // 21002 and 21003 rested longer than 21000, which was just freed.
        assert_eq!(p.take(), Some(21_002));
        assert_eq!(p.take(), Some(21_003));
        assert_eq!(p.take(), Some(21_000));
        assert_eq!(p.take(), None);
        assert_eq!((p.free(), p.in_use(), p.exhausted()), (0, 4, 1));
    }

    #[test]
    fn refuses_double_and_foreign_returns_without_damage() {
        let mut p = PortPool::new(5..=6);
        let a = p.take().unwrap();
        p.give_back(a).unwrap();
        assert_eq!(p.give_back(a), Err(ReturnError::NotInUse(a)));
        assert_eq!(p.give_back(7), Err(ReturnError::Foreign(7)));
        assert_eq!(p.give_back(6), Err(ReturnError::NotInUse(6)));
        assert_eq!(p.free(), 2, "nothing was added twice");
        assert_eq!(p.take(), Some(6));
        assert_eq!(p.take(), Some(5));
    }

    #[test]
    fn a_large_range_cycles_in_constant_time() {
        let mut p = PortPool::new(1..=65_535);
        for _ in 0..200_000 {
            let port = p.take().unwrap();
            p.give_back(port).unwrap();
        }
        assert_eq!(p.free(), 65_535);
    }
}
