//! A pacer: one named OS thread that ticks every registered stream on absolute deadlines, the
//! timing source of the tools that send media at a phone's pace (`sim-asterisk`'s `rtp-timing`,
//! `loadgen ari`'s `probe-timing`). It exists so that both keep one schedule the same way.
//!
//! The deadlines are `origin + k × period`, `origin` being the moment the thread started: a late
//! wake-up does not move the next deadline, so the rate never drifts, and a stream that joins
//! later keeps the same phase. Each tick runs every active stream once, back to back, in the
//! order they joined (one burst a tick). A stream leaves when its [`Paced::tick`] says so, and is
//! dropped then; when the [`Pacer`] handle is dropped the thread ends at its next wake-up and
//! drops every stream still active. A stream's drop is therefore the one sign, to whoever
//! watches it, that it will not be ticked again.
//!
//! Behind its schedule, the pacer runs the late ticks at once, back to back, so that the rate
//! holds; more than [`MAX_BEHIND`] deadlines missed (a stall), it skips the missed ticks but the
//! last [`Schedule::stall_catch_up`], logs the stall and keeps the phase. While no stream is active
//! the thread blocks, without ticking, until one joins.
//!
//! Time is read and slept on through a clock the loop is given, so that the tests below run the
//! schedule on a virtual clock.

use std::io;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most deadlines the pacer may have missed (passed without their tick) and still run every
/// missed tick, late and at once; more missed than that is a stall.
pub const MAX_BEHIND: u64 = 3;

/// A stream that a [`Pacer`] ticks.
pub trait Paced: Send + 'static {
    /// This stream's part of the tick whose deadline is `due` (the deadline, not the moment of
    /// the wake-up, which is later). `false`: the stream is over, and the pacer drops it.
    fn tick(&mut self, due: Instant) -> bool;
}

/// When a stream that joins an idle pacer (no stream active) is first ticked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstTick {
    /// At once, as the tick of the last deadline passed (its `due` is that deadline).
    Immediate,
    /// At the schedule's next deadline.
    NextDeadline,
}

/// A pacer's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Time between two deadlines (a zero period is taken as 1 ns).
    pub period: Duration,
    /// When a stream joining an idle pacer is first ticked. A stream joining a pacer that is
    /// ticking others is first ticked at the next deadline, with them.
    pub first_tick: FirstTick,
    /// After a stall, how many of the latest missed ticks are still run, at once, before the
    /// schedule resumes (0: none, the next tick is the next deadline ahead).
    pub stall_catch_up: u64,
}

/// The handle of a pacer's thread: streams join through it, and the thread ends once it is
/// dropped.
#[derive(Debug)]
pub struct Pacer<T> {
    /// New streams, taken in at the next tick.
    joins: mpsc::Sender<T>,
}

impl<T: Paced> Pacer<T> {
    /// Starts the pacer's thread, named `name`, on `schedule`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn spawn(name: &str, schedule: Schedule) -> io::Result<Self> {
        let (joins, rx) = mpsc::channel();
        let thread = name.to_owned();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&thread, schedule, &rx, &mut SystemClock))?;
        Ok(Self { joins })
    }

    /// Adds `stream`, first ticked as [`Schedule::first_tick`] says. If the thread is gone,
    /// `stream` is dropped at once.
    pub fn join(&self, stream: T) {
        let _ = self.joins.send(stream);
    }
}

/// Where the pacer reads the time and sleeps.
trait Clock {
    fn now(&self) -> Instant;
    /// Returns at `t` or later (at once if `t` has passed).
    fn sleep_until(&mut self, t: Instant);
}

/// The OS's monotonic clock and `std::thread::sleep`.
struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep_until(&mut self, t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }
}

/// The pacer's loop, until every sender of `joins` is gone. In the steady state it allocates
/// nothing.
fn run<T: Paced>(
    name: &str,
    schedule: Schedule,
    joins: &mpsc::Receiver<T>,
    clock: &mut impl Clock,
) {
    let period = u64::try_from(schedule.period.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let origin = clock.now();
    let at = |tick: u64| origin + Duration::from_nanos(tick.saturating_mul(period));
    // The last deadline passed by `t`.
    let ticks_by = |t: Instant| {
        u64::try_from(t.saturating_duration_since(origin).as_nanos() / u128::from(period))
            .unwrap_or(u64::MAX)
    };
    let mut active: Vec<T> = Vec::with_capacity(256);
    let mut tick: u64 = 0;
    let mut skipped: u64 = 0;
    loop {
        if active.is_empty() {
            // Idle: no ticks until a stream joins, then on the same schedule.
            let Ok(s) = joins.recv() else { return };
            active.push(s);
            tick = ticks_by(clock.now());
            if schedule.first_tick == FirstTick::NextDeadline {
                tick += 1;
                clock.sleep_until(at(tick));
            }
        }
        loop {
            match joins.try_recv() {
                Ok(s) => active.push(s),
                Err(mpsc::TryRecvError::Empty) => break,
                // The handle is gone: every stream ends.
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        let due = at(tick);
        active.retain_mut(|s| s.tick(due));
        // The next deadline on the schedule, whatever this wake-up's lateness. Late ticks run at
        // once; more than MAX_BEHIND deadlines missed (a stall), the missed ticks but the
        // catch-up are skipped rather than run in a heap, and the phase is kept.
        tick += 1;
        let passed = ticks_by(clock.now());
        if passed >= tick.saturating_add(MAX_BEHIND) {
            // (A catch-up longer than the stall skips nothing.)
            let resume = passed
                .saturating_add(1)
                .saturating_sub(schedule.stall_catch_up);
            if resume > tick {
                if skipped == 0 {
                    tracing::warn!("{name} stalled: {} ticks skipped", resume - tick);
                }
                skipped += resume - tick;
                tracing::debug!(skipped, "{name}: ticks skipped so far");
                tick = resume;
            }
        }
        clock.sleep_until(at(tick));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const PERIOD: Duration = Duration::from_millis(20);

    /// A virtual clock: a wake-up comes `late` after its deadline, and the `stall` one (by
    /// number, the first being 1) later still; streams join during given sleeps, and the pacer's
    /// handle is dropped during the sleep that reaches `hang_up_at`.
    struct FakeClock<T> {
        now: Instant,
        late: Duration,
        stall: Option<(usize, Duration)>,
        /// Every deadline slept until, in order.
        slept: Vec<Instant>,
        /// Streams joining during the numbered sleep.
        joins: Vec<(usize, T)>,
        /// The pacer's handle (streams join through it).
        handle: Option<mpsc::Sender<T>>,
        hang_up_at: Instant,
    }

    impl<T> Clock for FakeClock<T> {
        fn now(&self) -> Instant {
            self.now
        }

        fn sleep_until(&mut self, t: Instant) {
            self.slept.push(t);
            let n = self.slept.len();
            if t > self.now {
                self.now = t + self.late;
            }
            if let Some((_, extra)) = self.stall.filter(|s| s.0 == n) {
                self.now += extra;
            }
            let (joining, later) = std::mem::take(&mut self.joins)
                .into_iter()
                .partition(|j| j.0 == n);
            self.joins = later;
            for (_, s) in joining {
                if let Some(h) = &self.handle {
                    h.send(s).unwrap();
                }
            }
            if self.now >= self.hang_up_at {
                self.handle = None;
            }
        }
    }

    /// What the test streams write down: (stream, due) of every tick, and the streams dropped.
    #[derive(Clone, Default)]
    struct Log {
        ticks: Arc<Mutex<Vec<(u8, Instant)>>>,
        dropped: Arc<Mutex<Vec<u8>>>,
    }

    impl Log {
        fn dues(&self, id: u8) -> Vec<Instant> {
            let ticks = self.ticks.lock().unwrap();
            ticks.iter().filter(|t| t.0 == id).map(|t| t.1).collect()
        }
    }

    /// A stream that writes its ticks down and leaves after `ticks` of them.
    struct Stream {
        id: u8,
        ticks: u64,
        log: Log,
    }

    impl Stream {
        fn new(id: u8, ticks: u64, log: &Log) -> Self {
            Self {
                id,
                ticks,
                log: log.clone(),
            }
        }
    }

    impl Paced for Stream {
        fn tick(&mut self, due: Instant) -> bool {
            self.log.ticks.lock().unwrap().push((self.id, due));
            self.ticks -= 1;
            self.ticks > 0
        }
    }

    impl Drop for Stream {
        fn drop(&mut self) {
            self.log.dropped.lock().unwrap().push(self.id);
        }
    }

    /// Runs a pacer on a virtual clock, `first` joined before it starts, until the clock
    /// reaches deadline `until` (the handle is dropped during the sleep to it); `setup` sets the
    /// clock's lateness, stall and joins. The clock, and the schedule's origin.
    fn run_fake(
        first_tick: FirstTick,
        stall_catch_up: u64,
        first: Stream,
        until: u32,
        setup: impl FnOnce(&mut FakeClock<Stream>),
    ) -> (FakeClock<Stream>, Instant) {
        let (tx, rx) = mpsc::channel();
        let now = Instant::now();
        let mut clock = FakeClock {
            now,
            late: Duration::ZERO,
            stall: None,
            slept: Vec::new(),
            joins: Vec::new(),
            handle: Some(tx),
            hang_up_at: now + PERIOD * until,
        };
        setup(&mut clock);
        clock.handle.as_ref().unwrap().send(first).unwrap();
        let schedule = Schedule {
            period: PERIOD,
            first_tick,
            stall_catch_up,
        };
        run("test-pacer", schedule, &rx, &mut clock);
        (clock, now)
    }

    /// Deadlines `ks` of the schedule that started at `origin`.
    fn deadlines(origin: Instant, ks: impl IntoIterator<Item = u32>) -> Vec<Instant> {
        ks.into_iter().map(|k| origin + PERIOD * k).collect()
    }

    #[test]
    fn late_wake_ups_do_not_move_the_deadlines() {
        let log = Log::default();
        let first = Stream::new(1, u64::MAX, &log);
        // Every wake-up 7 ms late: a pacer that slept a period from its wake-up would drift by
        // 7 ms a tick.
        let (clock, origin) = run_fake(FirstTick::NextDeadline, 0, first, 50, |c| {
            c.late = Duration::from_millis(7);
        });
        assert_eq!(clock.slept, deadlines(origin, 1..=50));
        // Ticked at every deadline but the last (the handle went during the sleep to it).
        assert_eq!(log.dues(1), deadlines(origin, 1..50));
        assert_eq!(
            *log.dropped.lock().unwrap(),
            [1],
            "dropped as the pacer ends"
        );
    }

    #[test]
    fn a_stream_joining_a_busy_pacer_is_ticked_at_the_next_deadline_in_the_same_burst() {
        let log = Log::default();
        let first = Stream::new(1, u64::MAX, &log);
        let (clock, origin) = run_fake(FirstTick::NextDeadline, 0, first, 6, |c| {
            c.late = Duration::from_millis(3);
            c.joins.push((3, Stream::new(2, 2, &log)));
        });
        assert_eq!(clock.slept, deadlines(origin, 1..=6));
        // One tick each per deadline, in the order they joined; 2 leaves after two ticks and is
        // dropped then, 1 as the pacer ends.
        let by = |id: u8, k: u32| (id, origin + PERIOD * k);
        assert_eq!(
            *log.ticks.lock().unwrap(),
            [
                by(1, 1),
                by(1, 2),
                by(1, 3),
                by(2, 3),
                by(1, 4),
                by(2, 4),
                by(1, 5)
            ]
        );
        assert_eq!(*log.dropped.lock().unwrap(), [2, 1]);
    }

    #[test]
    fn a_stream_joining_an_idle_pacer_starts_at_once_or_at_the_next_deadline_in_phase() {
        // (first tick, 1's first deadline, 2's first deadline)
        for (first_tick, a_first, b_first) in [
            (FirstTick::Immediate, 0, 4),
            (FirstTick::NextDeadline, 1, 6),
        ] {
            let log = Log::default();
            // 1 ticks twice and leaves; 2 joins during the sleep that follows, to deadline
            // `a_first + 2`, which wakes 50 ms late: 2 periods and 10 ms past it.
            let first = Stream::new(1, 2, &log);
            let (_, origin) = run_fake(first_tick, 0, first, 10, |c| {
                c.late = Duration::from_millis(5);
                let sleep = usize::try_from(a_first).unwrap() + 2;
                c.stall = Some((sleep, Duration::from_millis(45)));
                c.joins.push((sleep, Stream::new(2, u64::MAX, &log)));
            });
            assert_eq!(
                log.dues(1),
                deadlines(origin, a_first..a_first + 2),
                "{first_tick:?}"
            );
            // 2's first tick: the deadline just passed (at once), or the next one; then every
            // deadline of the schedule that started with the thread.
            assert_eq!(
                log.dues(2),
                deadlines(origin, b_first..10),
                "{first_tick:?}"
            );
            assert_eq!(*log.dropped.lock().unwrap(), [1, 2], "{first_tick:?}");
        }
    }

    #[test]
    fn a_short_lag_is_caught_up_at_once_and_a_stall_skips_all_but_the_catch_up() {
        for (behind, catch_up, expected) in [
            // Two or three deadlines missed (the wake-up for 3 comes that many periods late): the
            // late ticks run at once, none skipped, whatever the catch-up.
            (2, 0, (1..20).collect::<Vec<u32>>()),
            (2, 3, (1..20).collect()),
            (MAX_BEHIND, 0, (1..20).collect()),
            // Four missed, then ten (a stall): skipped up to the next deadline ahead, or all but
            // the last three missed.
            (
                MAX_BEHIND + 1,
                0,
                [1, 2, 3].into_iter().chain(8..20).collect(),
            ),
            (10, 0, [1, 2, 3].into_iter().chain(14..20).collect()),
            (10, 3, [1, 2, 3].into_iter().chain(11..20).collect()),
            // A catch-up longer than the stall: nothing skipped.
            (10, 100, (1..20).collect()),
        ] {
            let log = Log::default();
            let first = Stream::new(1, u64::MAX, &log);
            let (_, origin) = run_fake(FirstTick::NextDeadline, catch_up, first, 20, |c| {
                let behind = u32::try_from(behind).unwrap();
                c.stall = Some((3, PERIOD * behind + Duration::from_millis(5)));
            });
            assert_eq!(
                log.dues(1),
                deadlines(origin, expected),
                "{behind} periods late, catch-up {catch_up}"
            );
        }
    }

    #[test]
    fn the_thread_has_its_name_ticks_its_streams_and_drops_them_when_the_handle_goes() {
        /// Sends the name of the thread that ticks it, and `None` when dropped.
        struct Named(mpsc::Sender<Option<String>>);
        impl Paced for Named {
            fn tick(&mut self, _: Instant) -> bool {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = self.0.send(name);
                true
            }
        }
        impl Drop for Named {
            fn drop(&mut self) {
                let _ = self.0.send(None);
            }
        }
        let schedule = Schedule {
            period: Duration::from_millis(1),
            first_tick: FirstTick::Immediate,
            stall_catch_up: 0,
        };
        let pacer = Pacer::spawn("pacer-test", schedule).unwrap();
        let (tx, rx) = mpsc::channel();
        pacer.join(Named(tx));
        let wait = Duration::from_secs(10);
        let first = rx.recv_timeout(wait).expect("a tick");
        assert_eq!(first.as_deref(), Some("pacer-test"));
        drop(pacer);
        // Ticks may still come before the thread sees the handle gone; then the drop.
        while let Some(name) = rx.recv_timeout(wait).expect("the stream is dropped") {
            assert_eq!(name, "pacer-test");
        }
    }
}
