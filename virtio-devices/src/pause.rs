//! Parks a device worker thread on request, so a paused VM's devices process nothing.

use std::sync::{Condvar, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

#[derive(Default)]
struct State {
    paused: bool,
    parked: bool,
}

pub struct PauseGate {
    state: Mutex<State>,
    cv: Condvar,
    /// Wakes the worker's epoll so it notices a pause request.
    pub wake: EventFd,
}

impl PauseGate {
    pub fn new() -> std::io::Result<Self> {
        Ok(PauseGate {
            state: Mutex::default(),
            cv: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Asks the worker to park and waits until it has (or `timeout` passes, for a worker that
    /// is gone). Returns whether the worker parked.
    pub fn pause(&self, timeout: Duration) -> bool {
        let mut s = self.state.lock().unwrap();
        s.paused = true;
        let _ = self.wake.write(1);
        let (s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| !s.parked)
            .unwrap();
        s.parked
    }

    pub fn resume(&self) {
        self.state.lock().unwrap().paused = false;
        self.cv.notify_all();
    }

    /// Worker side: call when woken; blocks while paused.
    pub fn park_if_paused(&self) {
        let _ = self.wake.read();
        let mut s = self.state.lock().unwrap();
        if !s.paused {
            return;
        }
        s.parked = true;
        self.cv.notify_all();
        while s.paused {
            s = self.cv.wait(s).unwrap();
        }
        s.parked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn worker_stops_while_paused() {
        let gate = Arc::new(PauseGate::new().unwrap());
        let work = Arc::new(AtomicU64::new(0));
        let (g, w) = (gate.clone(), work.clone());
        let t = std::thread::spawn(move || {
            for _ in 0..200 {
                g.park_if_paused();
                w.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(gate.pause(Duration::from_secs(5)));
        let before = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(work.load(Ordering::SeqCst), before, "no work while paused");
        gate.resume();
        t.join().unwrap();
        assert_eq!(work.load(Ordering::SeqCst), 200);
        // Nobody to park: pause gives up after the timeout.
        assert!(!gate.pause(Duration::from_millis(10)));
    }
}
