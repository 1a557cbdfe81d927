//! The fail-open heartbeat, stamped from a dedicated OS thread rather than a Tokio task.
//!
//! The kernel programs redirect only while `TG_HEARTBEAT` is fresh. A Tokio timer shares the
//! workers with request work, so a CPU stall there (a burst of large bodies) would make the
//! heartbeat late and flip capture off although the proxy is up; and a timer says nothing about
//! whether the proxy still accepts. This thread instead stamps while the proxy is *accepting*,
//! judged from the accept loops' progress ([`AcceptProgress`]) and the listen sockets' backlogs:
//!
//! * nothing waiting in any captured listener's backlog: idle, alive (an idle proxy has nothing
//!   to accept, and an accept loop parked in `accept()` costs nothing to keep alive);
//! * connections waiting and the accept count moved since the last look: alive;
//! * connections waiting, no accept loop moved, and none is holding back for a connection
//!   permit (`limits.max_connections`, deliberate back-pressure): stalled. After
//!   [`Heartbeat::stall`] of that the thread stops stamping, and `capture.heartbeat_timeout`
//!   later the kernel lets connects go direct (or refuses them with `fail_closed`).
//!
//! A frozen process (SIGSTOP, a debugger) stops this thread too, so the heartbeat goes stale
//! exactly `heartbeat_timeout` after the freeze. The thread also reaps record slots of connects
//! that failed before sock_ops saw them ([`super::maps::Maps::reap_stale_slots`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Capture;

/// Longest pause between two stamps.
const MAX_TICK: Duration = Duration::from_millis(200);

/// How often slots of failed connects are reaped, and how old they must be.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// What the accept loops of the captured listeners report to the heartbeat thread. Lock-free:
/// bumped on the hot path of every accept.
#[derive(Debug, Default)]
pub struct AcceptProgress {
    accepts: AtomicU64,
    waiting_permit: AtomicUsize,
}

impl AcceptProgress {
    /// `accept()` returned (a connection or an error): the loop is being polled.
    pub fn accepted(&self) {
        self.accepts.fetch_add(1, Ordering::Relaxed);
    }

    /// The loop waits for a connection permit until the guard drops.
    pub fn waiting_for_permit(&self) -> PermitWait<'_> {
        self.waiting_permit.fetch_add(1, Ordering::Relaxed);
        PermitWait(self)
    }

    fn snapshot(&self) -> (u64, bool) {
        (self.accepts.load(Ordering::Relaxed), self.waiting_permit.load(Ordering::Relaxed) > 0)
    }
}

/// Marks an accept loop as held back by `limits.max_connections` while it lives.
pub struct PermitWait<'a>(&'a AcceptProgress);

impl Drop for PermitWait<'_> {
    fn drop(&mut self) {
        self.0.waiting_permit.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The decision, separate from the thread so it can be tested without one.
#[derive(Debug)]
struct Judge {
    stall: Duration,
    last_accepts: u64,
    stuck_since: Option<Instant>,
}

impl Judge {
    fn alive(&mut self, now: Instant, accepts: u64, backlog: bool, waiting_permit: bool) -> bool {
        if accepts != self.last_accepts || !backlog || waiting_permit {
            self.last_accepts = accepts;
            self.stuck_since = None;
            return true;
        }
        let since = *self.stuck_since.get_or_insert(now);
        now.duration_since(since) < self.stall
    }
}

/// The running heartbeat thread; dropping it stops the thread (the heartbeat then goes stale).
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// How long connections may wait in a backlog without any accept before the proxy counts
    /// as stalled: `capture.heartbeat_timeout`, so a frozen runtime is bypassed within twice
    /// the timeout (a frozen process within the timeout).
    pub fn stall(heartbeat_timeout: Duration) -> Duration {
        heartbeat_timeout
    }

    /// Stamp now, then start the thread. `listeners` are duplicates of the captured listen
    /// sockets (only polled for a waiting connection, never accepted from).
    pub fn start(
        capture: Arc<Capture>,
        progress: Arc<AcceptProgress>,
        listeners: Vec<OwnedFd>,
        heartbeat_timeout: Duration,
    ) -> std::io::Result<Heartbeat> {
        capture.heartbeat();
        let stop = Arc::new(AtomicBool::new(false));
        let tick = (heartbeat_timeout / 5).min(MAX_TICK);
        let mut judge = Judge { stall: Self::stall(heartbeat_timeout), last_accepts: 0, stuck_since: None };
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("tollgate-heartbeat".into()).spawn(move || {
            let mut reaped_at = Instant::now();
            let mut was_alive = true;
            while !flag.load(Ordering::Relaxed) {
                let (accepts, waiting) = progress.snapshot();
                let alive = judge.alive(Instant::now(), accepts, backlog(&listeners), waiting);
                if alive {
                    capture.heartbeat();
                } else if was_alive {
                    tracing::warn!(stalled_for = ?judge.stall, "proxy stopped accepting: heartbeat paused");
                }
                if alive && !was_alive {
                    tracing::info!("proxy accepting again: heartbeat resumed");
                }
                was_alive = alive;
                if reaped_at.elapsed() >= REAP_EVERY {
                    reaped_at = Instant::now();
                    let n = capture.maps.reap_stale_slots(REAP_EVERY);
                    if n > 0 {
                        tracing::debug!(reaped = n, "record slots of failed connects removed");
                    }
                }
                std::thread::park_timeout(tick);
            }
        })?;
        Ok(Heartbeat { stop, thread: Some(thread) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Whether a connection waits to be accepted on any of `listeners` (a listening socket polls
/// readable exactly then).
fn backlog(listeners: &[OwnedFd]) -> bool {
    let mut fds: Vec<libc::pollfd> =
        listeners.iter().map(|l| libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for open descriptors owned
    // by `listeners`; a zero timeout never blocks.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    n > 0 && fds.iter().any(|f| f.revents & libc::POLLIN != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_or_progressing_or_held_back_is_alive_a_stuck_backlog_is_not() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut j = Judge { stall: Duration::from_millis(1000), last_accepts: 0, stuck_since: None };
        // Idle for a long time: nothing to accept.
        assert!(j.alive(ms(0), 0, false, false));
        assert!(j.alive(ms(5000), 0, false, false));
        // Connections waiting and being accepted.
        assert!(j.alive(ms(5100), 1, true, false));
        assert!(j.alive(ms(5200), 2, true, false));
        // Waiting, nobody accepts: alive for the stall time, then not.
        assert!(j.alive(ms(5300), 2, true, false));
        assert!(j.alive(ms(6200), 2, true, false));
        assert!(!j.alive(ms(6300), 2, true, false));
        assert!(!j.alive(ms(9000), 2, true, false));
        // One accept brings it back.
        assert!(j.alive(ms(9100), 3, true, false));
        // Held back by max_connections is back-pressure, not a stall.
        assert!(j.alive(ms(9200), 3, true, true));
        assert!(j.alive(ms(20000), 3, true, true));
    }

    #[test]
    fn a_listener_with_a_waiting_connection_polls_readable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds = vec![OwnedFd::from(l.try_clone().unwrap())];
        assert!(!backlog(&fds));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(backlog(&fds));
        let _ = l.accept().unwrap();
        assert!(!backlog(&fds));
    }
}
