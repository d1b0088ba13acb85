//! Adaptive thread count for decode steps.
//!
//! A decode step runs about 150 short parallel regions; when another process holds one of
//! the cores, each region waits for the thread the OS descheduled, and the step slows far
//! more than the share of CPU lost. A one-thread pool kept beside rayon's global one does
//! not wait on anyone: each decode step runs on whichever pool its recent steps found
//! faster, and the other is re-timed now and then (and at once when the current one's time
//! jumps), so a quiet machine keeps every thread and a shared one falls back to one.
//! Results do not depend on the choice: every kernel splits its work by sizes only.
//! The pools' threads take a short scheduler slice, so that one woken for a region on a
//! core another process holds runs at once instead of after that process's slice.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Environment variable that turns the adaptation off when set to `0` or `off`.
pub const ADAPTIVE_THREADS_ENV: &str = "KVMERGER_ADAPTIVE_THREADS";

/// Steps on every thread between two probes of one thread.
const PROBE_EVERY: u32 = 32;
/// Steps on one thread between two probes of every thread: staying on one thread on a
/// quiet machine costs far more per step than a probe of every thread on a busy one, and a
/// one-thread step's time barely changes when the machine gets quiet, so only probes notice.
const PROBE_ONE_EVERY: u32 = 8;
/// A step this many times slower than its choice's average re-probes the other at once.
const JUMP: f64 = 1.5;
/// Weight of a new step time in its choice's moving average.
const ALPHA: f64 = 0.25;
/// Scheduler slice of the pools' threads, in ns: the shortest Linux takes.
#[cfg(target_os = "linux")]
const SHORT_SLICE_NS: u64 = 100_000;

/// Which pool a decode step runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Rayon's global pool (every core).
    All,
    /// The one-thread pool.
    One,
}

impl Threads {
    fn index(self) -> usize {
        self as usize
    }

    fn other(self) -> Self {
        match self {
            Threads::All => Threads::One,
            Threads::One => Threads::All,
        }
    }
}

/// The choice from step times alone (no clock, no pools), so it can be tested on made-up
/// timings.
#[derive(Debug, Clone)]
pub(crate) struct ThreadChooser {
    /// Moving average of step seconds, per [`Threads`] index; `None` until timed.
    average: [Option<f64>; 2],
    /// The choice that steps run on between probes.
    current: Threads,
    /// Steps since the other choice was last timed.
    since_probe: u32,
    /// Whether the next step runs on the other choice.
    probe_next: bool,
    /// The pool the last step ran on: the first step after a change of pool pays for
    /// waking its threads and refilling their caches, so it is not timed.
    last: Threads,
}

impl Default for ThreadChooser {
    fn default() -> Self {
        Self {
            average: [None, None],
            current: Threads::All,
            since_probe: 0,
            probe_next: false,
            last: Threads::All,
        }
    }
}

impl ThreadChooser {
    /// The pool the next step runs on.
    pub(crate) fn pick(&self) -> Threads {
        let other = self.current.other();
        if self.average[other.index()].is_none() && self.average[self.current.index()].is_some() {
            return other;
        }
        let every = match self.current {
            Threads::All => PROBE_EVERY,
            Threads::One => PROBE_ONE_EVERY,
        };
        if self.probe_next || self.since_probe >= every {
            other
        } else {
            self.current
        }
    }

    /// Records that a step on `threads` took `seconds`.
    pub(crate) fn record(&mut self, threads: Threads, seconds: f64) {
        let changed = std::mem::replace(&mut self.last, threads) != threads;
        let slot = &mut self.average[threads.index()];
        if threads == self.current && changed {
            self.since_probe += 1;
            return;
        }
        if threads == self.current {
            let average = slot.map_or(seconds, |a| a + ALPHA * (seconds - a));
            // A jump (another process started) makes the other choice worth a look now.
            self.probe_next = slot.is_some_and(|a| seconds > JUMP * a);
            *slot = Some(average);
            self.since_probe += 1;
            return;
        }
        // A probe's first step pays for waking the other pool's threads and refilling their
        // caches (on every thread after a stretch on one: up to twice a steady step), so a
        // probe runs two steps and only the second is timed.
        if changed {
            self.probe_next = true;
            return;
        }
        // The other choice's average is stale: a probe replaces it, and only a probe (a
        // fresh time) switches.
        *slot = Some(seconds);
        self.since_probe = 0;
        self.probe_next = false;
        if let [Some(all), Some(one)] = self.average {
            let before = self.current;
            self.current = if one < all { Threads::One } else { Threads::All };
            // A switch re-times the old choice at once, so one slow step on it (a blip, not
            // a busy machine) costs two steps, not a probe period.
            self.probe_next = self.current != before;
        }
    }
}

/// Runs decode steps on the pool a [`ThreadChooser`] picks, timing each.
#[derive(Debug, Default)]
pub struct AdaptiveThreads {
    chooser: Mutex<ThreadChooser>,
    one: OnceLock<Option<rayon::ThreadPool>>,
    /// Whether the pools' threads got a short scheduler slice (set once, on the first step).
    short_slices: OnceLock<()>,
}

impl AdaptiveThreads {
    /// `None` when [`ADAPTIVE_THREADS_ENV`] turns the adaptation off.
    pub fn from_env() -> Option<Self> {
        match std::env::var(ADAPTIVE_THREADS_ENV).as_deref() {
            Ok("0") | Ok("off") => None,
            _ => Some(Self::default()),
        }
    }

    /// Runs `step` on the chosen pool and times it. With a one-thread global pool, or if
    /// the one-thread pool cannot be built, runs it on the global pool untimed.
    pub fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        if rayon::current_num_threads() <= 1 {
            return step();
        }
        let one =
            self.one.get_or_init(|| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok());
        let Some(one) = one else { return step() };
        self.short_slices.get_or_init(|| {
            rayon::broadcast(|_| set_short_slice());
            one.broadcast(|_| set_short_slice());
        });
        let threads = self.chooser.lock().map(|c| c.pick()).unwrap_or(Threads::All);
        let start = Instant::now();
        let out = match threads {
            // On a worker of the global pool: from a thread outside it, each of the step's
            // parallel regions would be injected into the pool while the caller sleeps until
            // it ends (about 15 µs per region here, 1.5 to 2 ms of a step).
            Threads::All => rayon::scope(|_| step()),
            Threads::One => one.install(step),
        };
        let seconds = start.elapsed().as_secs_f64();
        if let Ok(mut chooser) = self.chooser.lock() {
            chooser.record(threads, seconds);
        }
        out
    }
}

/// Gives the calling thread a short scheduler slice (Linux 6.12 and later; ignored before).
///
/// On a core shared with another process, a pool thread woken for a parallel region
/// otherwise waits for that process's slice to end (a few ms) before it runs, and the step
/// waits for it, about 150 times a step. A thread with a shorter slice than the running one
/// preempts it on wake-up; its share of the CPU over time does not change.
#[cfg(target_os = "linux")]
fn set_short_slice() {
    // SAFETY: getpriority reads the calling thread's nice value; no memory is involved.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = libc::sched_attr {
        size: std::mem::size_of::<libc::sched_attr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: SHORT_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: `attr` is a valid sched_attr of the size it declares; pid 0 is this thread.
    // A kernel that refuses it leaves the thread as it was, which is only slower.
    unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const libc::sched_attr, 0) };
}

#[cfg(not(target_os = "linux"))]
fn set_short_slice() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` steps whose time on each choice `cost(step, threads)` gives; returns
    /// the choice of every step.
    fn simulate(
        chooser: &mut ThreadChooser,
        steps: usize,
        cost: impl Fn(usize, Threads) -> f64,
    ) -> Vec<Threads> {
        (0..steps)
            .map(|s| {
                let t = chooser.pick();
                chooser.record(t, cost(s, t));
                t
            })
            .collect()
    }

    fn count(choices: &[Threads], t: Threads) -> usize {
        choices.iter().filter(|&&c| c == t).count()
    }

    #[test]
    fn quiet_machine_stays_on_all_threads_and_probes_now_and_then() {
        let mut chooser = ThreadChooser::default();
        let choices =
            simulate(&mut chooser, 330, |_, t| if t == Threads::All { 10e-3 } else { 18e-3 });
        assert_eq!(choices[0], Threads::All, "starts on every thread");
        assert_eq!(&choices[1..3], &[Threads::One; 2], "times the other choice once");
        // One two-step probe per PROBE_EVERY + 2 steps after the first three.
        assert_eq!(count(&choices, Threads::One), 2 + 2 * (327 / (PROBE_EVERY as usize + 2)));
        assert_eq!(chooser.pick(), Threads::All);
    }

    #[test]
    fn switches_to_one_thread_when_the_machine_gets_busy_and_back_when_quiet() {
        let mut chooser = ThreadChooser::default();
        // Quiet for 110 steps, busy (every thread waits) until step 300, then quiet.
        let busy = |s: usize| (110..300).contains(&s);
        let cost = |s: usize, t: Threads| match (busy(s), t) {
            (false, Threads::All) => 10e-3,
            (false, Threads::One) => 18e-3,
            (true, Threads::All) => 60e-3,
            (true, Threads::One) => 25e-3,
        };
        let choices = simulate(&mut chooser, 500, cost);
        // Each jump re-probes one thread at once (two steps, the second timed); it wins once
        // the average has moved, and the switch re-times every thread once more.
        let (all, one) = (Threads::All, Threads::One);
        // The first step back on every thread after a probe is not timed either.
        assert_eq!(&choices[110..119], &[all, one, one, all, all, one, one, all, all]);
        let busy_steps = &choices[119..300];
        let one_period = PROBE_ONE_EVERY as usize + 2;
        assert!(count(busy_steps, Threads::All) <= 2 * (182 / one_period + 1));
        // Back on every thread within one (short) probe period of the machine getting quiet.
        let back = choices[300..].iter().position(|&t| t == Threads::All).unwrap();
        assert!(back <= PROBE_ONE_EVERY as usize, "back after {back} steps");
        assert_eq!(chooser.current, Threads::All);
        let after = &choices[300 + back + 2..];
        assert!(count(after, Threads::One) <= 2 * (after.len() / (PROBE_EVERY as usize + 2) + 1));
    }

    #[test]
    fn one_slow_step_does_not_switch_for_good() {
        let mut chooser = ThreadChooser::default();
        let cost = |s: usize, t: Threads| match t {
            Threads::All if s == 50 => 100e-3,
            Threads::All => 10e-3,
            Threads::One => 18e-3,
        };
        let choices = simulate(&mut chooser, 60, cost);
        let (all, one) = (Threads::All, Threads::One);
        assert_eq!(
            &choices[50..57],
            &[all, one, one, all, all, one, one],
            "probe, switch, re-time, back, re-time"
        );
        assert!(choices[57..].iter().all(|&t| t == Threads::All), "{choices:?}");
        assert_eq!(chooser.current, Threads::All);
    }

    #[test]
    fn a_slow_first_step_on_every_thread_does_not_keep_a_quiet_machine_on_one() {
        let mut chooser = ThreadChooser::default();
        // Busy for 100 steps, then quiet, where the first step on every thread after one on
        // one thread pays twice a steady step (waking the pool's threads).
        let mut choices = Vec::new();
        for s in 0..200 {
            let t = chooser.pick();
            let after_one = choices.last() == Some(&Threads::One);
            let cost = match (s < 100, t) {
                (true, Threads::All) => 60e-3,
                (_, Threads::One) => 18e-3,
                (false, Threads::All) if after_one => 20e-3,
                (false, Threads::All) => 10e-3,
            };
            chooser.record(t, cost);
            choices.push(t);
        }
        assert_eq!(choices[99], Threads::One, "busy: on one thread");
        let back = choices[100..].iter().position(|&t| t == Threads::All).unwrap();
        assert!(back <= PROBE_ONE_EVERY as usize, "back after {back} steps");
        // Then only the re-time after the switch and the periodic probes run on one thread.
        let after = &choices[100 + back..];
        let probes = 1 + after.len() / (PROBE_EVERY as usize + 2) + 1;
        assert!(count(after, Threads::One) <= 2 * probes, "{after:?}");
        assert_eq!(chooser.current, Threads::All);
    }
}
