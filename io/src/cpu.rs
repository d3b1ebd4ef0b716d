//! Where a thread runs and what it costs: pinning the calling thread to a core, and reading the
//! CPU time a process or thread has used, which every benchmark figure ("CPU per packet") and
//! the echo's and loadgen's reports are made of.

/// CPU time (user + system) consumed so far by what `stat` describes: `/proc/PID/stat` for a
/// process, `/proc/thread-self/stat` for the calling thread. In nanoseconds; `/proc` counts in
/// USER_HZ, which is 100 on Linux, so the resolution is 10 ms. `None` if it cannot be read.
#[must_use]
pub fn cpu_time_ns(stat: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the command name, which is in parentheses and may itself contain spaces.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000_000)
}

/// CPU time of process `pid` so far, in nanoseconds (see [`cpu_time_ns`]).
#[must_use]
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    cpu_time_ns(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU time of the calling thread so far, in nanoseconds (see [`cpu_time_ns`]).
#[must_use]
pub fn thread_cpu_ns() -> Option<u64> {
    cpu_time_ns(std::path::Path::new("/proc/thread-self/stat"))
}

/// Pins the calling thread to CPU core `id`; false when the core does not exist or the
/// system refuses.
#[must_use]
pub fn pin_current_thread(id: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id })
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_time_reads_proc_and_grows_with_work() {
        let before = super::thread_cpu_ns().expect("readable on Linux");
        // Spin until the reading grows (it has 10 ms resolution), failing after 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        let after = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            let now = super::thread_cpu_ns().expect("still readable");
            if now > before {
                break now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "CPU time never grew from {before}"
            );
        };
        assert_eq!((after - before) % 10_000_000, 0, "whole USER_HZ ticks");
        assert_eq!(
            super::cpu_time_ns(std::path::Path::new("/proc/none/stat")),
            None
        );
        assert!(super::process_cpu_ns(std::process::id()).is_some());
    }
}
