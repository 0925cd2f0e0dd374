//! A device's side of page requests (the PRI baseline, `vio::pri`): a queue whose request hit
//! a page the device cannot reach stops there, hands the request back to its ring, asks the
//! host for the page, and waits; the answer (or the timeout) lets it run again. Other queues
//! keep running meanwhile.

use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// How the device raises page requests and learns their answers (vdpu's page-request queue).
pub trait PageRequester: Send + Sync {
    /// Asks the host for the page at `iova` on behalf of queue `q`, which has no other
    /// request outstanding. False if no host takes page requests (the client never enabled
    /// them): the access then fails as it would without PRI.
    fn request(&self, q: u16, iova: u64, write: bool) -> bool;
    /// The answer to queue `q`'s request, once it came: whether the page is reachable now.
    fn answer(&self, q: u16) -> Option<bool>;
    /// Queue `q` gave up waiting; a late answer is ignored.
    fn cancel(&self, q: u16);
    /// Readable when an answer came.
    fn wake(&self) -> &EventFd;
    /// How long a queue waits for an answer.
    fn timeout(&self) -> Duration;
}

/// Which queues wait for a page, until when, and per queue the page its last request failed
/// to get (failed or timed out): the next fault on that page is not asked about again but
/// fails the access, as the fault it is. A fault on any other page (the ring's, another buffer
/// of the request) is asked about as usual.
pub(super) struct Parking {
    pri: std::sync::Arc<dyn PageRequester>,
    deadline: Vec<Option<Instant>>,
    asked: Vec<u64>,
    failed: Vec<Option<u64>>,
}

impl Parking {
    pub fn new(pri: std::sync::Arc<dyn PageRequester>, queues: usize) -> Self {
        Parking {
            pri,
            deadline: vec![None; queues],
            asked: vec![0; queues],
            failed: vec![None; queues],
        }
    }

    pub fn wake_fd(&self) -> &EventFd {
        self.pri.wake()
    }

    pub fn is_parked(&self, q: usize) -> bool {
        self.deadline.get(q).is_some_and(|d| d.is_some())
    }

    /// A request of queue `q` has run and `fault` is the first unreachable page it touched:
    /// true if the request is to be handed back (the queue now waits for the page).
    pub fn hand_back(&mut self, q: usize, fault: Option<(u64, bool)>) -> bool {
        let Some((iova, write)) = fault else {
            return false;
        };
        if self.failed[q] == Some(iova) {
            self.failed[q] = None;
            return false;
        }
        if !self.pri.request(q as u16, iova, write) {
            return false;
        }
        self.asked[q] = iova;
        self.deadline[q] = Some(Instant::now() + self.pri.timeout());
        true
    }

    /// The queues that may run again: answered (a failed answer, or none in time, makes the
    /// next fault on that page fail without asking).
    pub fn ready(&mut self, now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        for q in 0..self.deadline.len() {
            let Some(deadline) = self.deadline[q] else {
                continue;
            };
            let ok = match self.pri.answer(q as u16) {
                Some(ok) => ok,
                None if now >= deadline => {
                    self.pri.cancel(q as u16);
                    false
                }
                None => continue,
            };
            self.deadline[q] = None;
            if !ok {
                self.failed[q] = Some(self.asked[q]);
            }
            out.push(q);
        }
        out
    }

    /// How long the worker may sleep before a deadline passes.
    pub fn next_wait(&self, now: Instant) -> Option<Duration> {
        self.deadline
            .iter()
            .flatten()
            .min()
            .map(|d| d.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Host {
        asked: Mutex<Vec<(u16, u64, bool)>>,
        answers: Mutex<Vec<(u16, bool)>>,
        cancelled: Mutex<Vec<u16>>,
        wake: Option<EventFd>,
    }

    impl PageRequester for Host {
        fn request(&self, q: u16, iova: u64, write: bool) -> bool {
            self.asked.lock().unwrap().push((q, iova, write));
            true
        }
        fn answer(&self, q: u16) -> Option<bool> {
            let mut a = self.answers.lock().unwrap();
            let i = a.iter().position(|&(aq, _)| aq == q)?;
            Some(a.remove(i).1)
        }
        fn cancel(&self, q: u16) {
            self.cancelled.lock().unwrap().push(q);
        }
        fn wake(&self) -> &EventFd {
            self.wake.as_ref().unwrap()
        }
        fn timeout(&self) -> Duration {
            Duration::from_millis(10)
        }
    }

    /// A fault parks the queue; an answer frees it; a failed answer, or none before the
    /// deadline, frees it with its next request run as it is (no second request).
    #[test]
    fn park_answer_and_time_out() {
        let host = Arc::new(Host {
            wake: Some(EventFd::new(0).unwrap()),
            ..Default::default()
        });
        let mut p = Parking::new(host.clone(), 2);
        assert!(!p.hand_back(0, None), "no fault: completes");
        assert!(p.hand_back(0, Some((0x5000, true))));
        assert!(p.is_parked(0) && !p.is_parked(1));
        assert_eq!(*host.asked.lock().unwrap(), vec![(0, 0x5000, true)]);
        let now = Instant::now();
        assert!(p.ready(now).is_empty());
        host.answers.lock().unwrap().push((0, true));
        assert_eq!(p.ready(now), vec![0]);
        assert!(
            p.hand_back(0, Some((0x6000, false))),
            "answered ok: asks again"
        );

        host.answers.lock().unwrap().push((0, false));
        assert_eq!(p.ready(now), vec![0]);
        assert!(
            p.hand_back(0, Some((0x1000, false))),
            "another page (the ring's) is asked for"
        );
        host.answers.lock().unwrap().push((0, true));
        assert_eq!(p.ready(now), vec![0]);
        assert!(
            !p.hand_back(0, Some((0x6000, false))),
            "failed: runs as a fault"
        );
        assert!(p.hand_back(0, Some((0x6000, false))), "only that once");

        assert!(p.next_wait(Instant::now()).unwrap() <= Duration::from_millis(10));
        assert!(p.ready(Instant::now()).is_empty());
        assert_eq!(p.ready(Instant::now() + Duration::from_millis(20)), vec![0]);
        assert_eq!(*host.cancelled.lock().unwrap(), vec![0]);
        assert!(
            !p.hand_back(0, Some((0x6000, false))),
            "timed out: runs as a fault"
        );
    }
}
