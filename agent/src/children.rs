//! Whether the agent has child processes, and waiting for that to change.
//!
//! Every process of a sandbox descends from the agent, its init (an orphan is re-parented to
//! it), so an agent without children is alone in the sandbox. Then nothing can allocate
//! memory or start tasks, and the threads that watch for that (the reaper, the out-of-memory
//! killer, the task watch) sleep until the next spawn ([`wait_while_none`]) instead of waking
//! on a timer: every
//! wakeup of an idle sandbox costs the host CPU through gVisor's platform (measured on runsc
//! 20240729, systrap: the two 50 ms watches took an idle sandbox from 2.5% to 4% of a core).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long a thread sleeps at most while the agent has no child (a spawn wakes it at once).
const IDLE_WAIT: Duration = Duration::from_secs(60);

struct Children {
    /// Spawns so far.
    spawned: u64,
    /// The reaper found no child after the `spawned`-th spawn (none since).
    none: bool,
}

static CHILDREN: (Mutex<Children>, Condvar) = (
    Mutex::new(Children {
        spawned: 0,
        none: false,
    }),
    Condvar::new(),
);

fn lock() -> std::sync::MutexGuard<'static, Children> {
    CHILDREN.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns so far.
pub fn spawn_count() -> u64 {
    lock().spawned
}

/// A child was spawned: wakes whoever waits for one.
pub fn note_spawned() {
    let mut c = lock();
    c.spawned += 1;
    c.none = false;
    CHILDREN.1.notify_all();
}

/// The reaper found no child (`ECHILD`) after the `seen`-th spawn: unless another spawn came
/// since, the agent is alone.
pub fn note_none(seen: u64) {
    let mut c = lock();
    if c.spawned == seen {
        c.none = true;
    }
}

/// Sleeps while the agent is known to have no child, at most [`IDLE_WAIT`] (a bound for
/// children the agent did not spawn itself, which only descendants of its own can become).
/// After [`note_none`]`(seen)` this is a wait for a spawn after the `seen`-th.
pub fn wait_while_none() {
    let guard = lock();
    let _ = CHILDREN.1.wait_timeout_while(guard, IDLE_WAIT, |c| c.none);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_spawn_wakes_a_watch_that_waits_while_there_is_no_child() {
        let seen = spawn_count();
        note_none(seen);
        let t = Instant::now();
        let waiter = std::thread::spawn(move || {
            wait_while_none();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "returned while the agent had no child"
        );
        note_spawned();
        let woke = waiter.join().unwrap();
        assert!(woke.duration_since(t) < Duration::from_secs(10));
        // A stale "none" (a spawn came in between) is not taken.
        note_none(seen);
        let t = Instant::now();
        wait_while_none();
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
