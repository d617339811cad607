//! Yielding the CPU to the host's own work during the agent's long loops.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// Whether the agent is behind the traffic (its last ring drain found a ring filling up).
static BEHIND: AtomicBool = AtomicBool::new(false);

/// Set by each ring drain. While the agent is behind, `Pace` does not yield: on a saturated
/// host a yield gives the turn to every other runnable task (milliseconds each), and an agent
/// that already lags would stretch its work until the rings overflow and events are lost.
/// Measured under the bench's new-connection load on a slow machine: with yields
/// unconditional, the agent's single steps (a drain, a live read) took seconds instead of
/// tens of milliseconds. Losing counts is worse than a served request waiting a tick.
pub fn set_behind(behind: bool) {
    BEHIND.store(behind, Ordering::Relaxed);
}

/// Hands the CPU back to the host's own work at short intervals during a long drain.
///
/// The agent's work comes in bursts (a batch of rings, a poll of every live connection), each
/// milliseconds long under a fast new-connection load. The scheduler preempts a running task
/// only at a tick (every 4 ms at HZ=250) or a wakeup, so a server thread that becomes runnable
/// on the agent's CPU mid-burst waits for the rest of it: the sensor's mark on the served
/// requests' tail latency. `sched_yield` every ~200 µs of work lets such a thread run first;
/// when nothing else waits it returns at once (a syscall per 200 µs). The agent still gets its
/// fair share of the CPU: yielding gives up the turn, not the share (no starvation under
/// saturation, which a lower scheduling class would risk).
pub struct Pace {
    since: Instant,
    count: u32,
    /// Time this burst has spent in yields so far.
    given: Duration,
}

impl Pace {
    /// Items between clock reads.
    const EVERY: u32 = 64;
    const SLICE: Duration = Duration::from_micros(200);
    /// Most time one burst gives away in yields; past it the burst runs to its end. On a
    /// saturated host a yield returns after other tasks' turns (milliseconds each), and a long
    /// burst (an evaluation opening thousands of alerts at once) yielded hundreds of times:
    /// the loop stayed away from the rings for a second, and the request ring overflowed
    /// under the bench's 10 000 requests/s (it holds about half a second of them).
    const GIVE_MAX: Duration = Duration::from_millis(20);

    pub fn new() -> Self {
        Self {
            since: Instant::now(),
            count: 0,
            given: Duration::ZERO,
        }
    }

    /// One item done; yields when `SLICE` has passed since the last yield (checked every
    /// `EVERY` items). Returns whether it yielded.
    #[inline]
    pub fn step(&mut self) -> bool {
        self.count += 1;
        if self.count < Self::EVERY {
            return false;
        }
        self.count = 0;
        if self.since.elapsed() < Self::SLICE {
            return false;
        }
        if BEHIND.load(Ordering::Relaxed) || self.given >= Self::GIVE_MAX {
            self.since = Instant::now();
            return false;
        }
        let before = Instant::now();
        std::thread::yield_now();
        self.since = Instant::now();
        self.given += self.since.duration_since(before);
        true
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::new()
    }
}

/// A writer that paces the encoding into it: one `Pace` step per write call (serializers
/// write each field on its own, so a call is a small unit of work). For the periodic
/// snapshot, tens of milliseconds of encoding on a large table.
pub struct Paced<W> {
    inner: W,
    pace: Pace,
}

impl<W> Paced<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pace: Pace::new(),
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: std::io::Write> std::io::Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pace.step();
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.pace.step();
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_writer_passes_every_byte_through() {
        use std::io::Write;
        let mut out = Paced::new(Vec::new());
        for i in 0..1000u32 {
            out.write_all(&i.to_le_bytes())
                .expect("a Vec takes every write");
        }
        out.flush().expect("flush");
        let bytes = out.into_inner();
        let expected: Vec<u8> = (0..1000u32).flat_map(u32::to_le_bytes).collect();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_burst_that_gave_its_budget_away_runs_to_its_end() {
        let mut pace = Pace::new();
        pace.given = Pace::GIVE_MAX;
        std::thread::sleep(Pace::SLICE * 2);
        for _ in 0..Pace::EVERY * 4 {
            assert!(!pace.step());
        }
        // A new burst has its budget again.
        let mut pace = Pace::new();
        std::thread::sleep(Pace::SLICE * 2);
        let yielded = (0..Pace::EVERY).fold(false, |y, _| pace.step() || y);
        assert!(yielded || BEHIND.load(Ordering::Relaxed));
    }

    #[test]
    fn yields_only_after_a_slice_of_work_and_every_so_many_items() {
        let mut pace = Pace::new();
        std::thread::sleep(Pace::SLICE * 2);
        // The clock is read only every EVERY items.
        for _ in 1..Pace::EVERY {
            assert!(!pace.step());
        }
        assert!(pace.step(), "a slice passed: the EVERY-th item yields");
        // Just yielded: the next EVERY items do not yield if they take less than a slice (a
        // test thread preempted between them may take longer: then nothing is asserted).
        let yielded_at = pace.since;
        let quick = (0..Pace::EVERY).filter(|_| pace.step()).count();
        if yielded_at.elapsed() < Pace::SLICE {
            assert_eq!(quick, 0, "yielded within a slice");
        }
        // Behind the traffic: no yield however long the work (in this test, not one of its
        // own: the flag is the process's).
        set_behind(true);
        std::thread::sleep(Pace::SLICE * 2);
        let behind = (0..Pace::EVERY * 4).filter(|_| pace.step()).count();
        set_behind(false);
        assert_eq!(behind, 0, "yielded while behind");
        std::thread::sleep(Pace::SLICE * 2);
        let caught_up = (0..Pace::EVERY).filter(|_| pace.step()).count();
        assert_eq!(caught_up, 1, "caught up: yields again after a slice");
    }
}
