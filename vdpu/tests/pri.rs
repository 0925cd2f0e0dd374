//! vdpu's page requests (`pri=on`, the PRI baseline) against a standard vfio-user client: a
//! request whose buffer is not mapped waits on a page request instead of failing; the answer
//! lets it complete; no answer, or a failed one, fails just that request; other queues keep
//! being served meanwhile.

mod common;

use common::rig::*;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};
use vio::pri::{self, PageRequest};
use vmm_sys_util::eventfd::EventFd;

const DATA: u64 = 0x11000;

/// A rig with two queues and page requests, queue 0's data page unmapped, and the page-request
/// interrupt on an eventfd of ours.
fn rig(timeout_ms: u64) -> (Rig, EventFd) {
    rig_with(timeout_ms, true)
}

/// `rig`, with page requests turned on by the client (`enable`: it gives the interrupt) or not.
fn rig_with(timeout_ms: u64, enable: bool) -> (Rig, EventFd) {
    let mut rig = setup(
        &format!(",num_queues=2,pri=on,pri_timeout_ms={timeout_ms}"),
        2,
    );
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    if enable {
        // DATA_EVENTFD | ACTION_TRIGGER.
        rig.client
            .set_irqs(pri::IRQ_INDEX, 4 | 32, 0, 1, &[irq.as_raw_fd()])
            .unwrap();
    }
    let fd = rig.mem.as_raw_fd();
    rig.client.dma_unmap(0, MEM).unwrap();
    rig.client.dma_map(0, 0, DATA, fd).unwrap();
    rig.client
        .dma_map(DATA + 0x1000, DATA + 0x1000, MEM - DATA - 0x1000, fd)
        .unwrap();
    (rig, irq)
}

fn table(rig: &mut Rig) -> Vec<PageRequest> {
    let mut t = vec![0u8; pri::REG_RESPONSE as usize];
    rig.client
        .region_read(pri::REGION_INDEX, pri::REG_TABLE, &mut t)
        .unwrap();
    pri::decode_table(&t)
}

fn respond(rig: &mut Rig, seq: u32, ok: bool) {
    rig.client
        .region_write(
            pri::REGION_INDEX,
            pri::REG_RESPONSE,
            &pri::encode_response(seq, ok),
        )
        .unwrap();
}

/// Waits for the page-request interrupt and returns the one request posted.
fn request(rig: &mut Rig, irq: &EventFd) -> PageRequest {
    let deadline = Instant::now() + Duration::from_secs(5);
    while irq.read().is_err() {
        assert!(Instant::now() < deadline, "no page-request interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = table(rig);
    assert_eq!(t.len(), 1, "{t:?}");
    t[0]
}

/// Queue 1 serves a request while queue 0 waits for its page.
fn queue1_is_served(rig: &mut Rig, n: u16) {
    rig.read_request(1, n - 1, 6, base(1) + DATA);
    rig.wait_used(1, n);
    assert_eq!(rig.get8(status(1, n - 1)), 0);
    assert_eq!(rig.used_idx(0), 0, "queue 0 still waits");
}

#[test]
fn a_missing_page_is_asked_for_and_the_request_completes() {
    let (mut rig, irq) = rig(5000);
    rig.read_request(0, 0, 5, DATA);
    let r = request(&mut rig, &irq);
    assert_eq!(
        (r.slot, r.iova, r.write),
        (0, DATA, true),
        "a read writes the page"
    );
    queue1_is_served(&mut rig, 1);
    // The host maps the page and answers: the request runs again and completes.
    rig.client
        .dma_map(DATA, DATA, 0x1000, rig.mem.as_raw_fd())
        .unwrap();
    respond(&mut rig, r.seq, true);
    rig.wait_used(0, 1);
    assert_eq!(rig.get8(status(0, 0)), 0, "status OK");
    let mut data = [0u8; 512];
    rig.mem.read_exact_at(&mut data, DATA).unwrap();
    assert_eq!(data, [5u8; 512]);
    let c = rig.counters();
    assert_eq!(c["pri_requests"], 1, "{c}");
    assert_eq!(c["pri_resolved"], 1, "{c}");
    assert_eq!(c["pri_timeouts"], 0, "{c}");
    assert!(table(&mut rig).is_empty());
}

/// A host that never answers: the request fails as the fault it is once the timeout passes,
/// the queue serves on, and the late answer is ignored.
#[test]
fn an_unanswered_request_times_out_and_fails_alone() {
    let (mut rig, irq) = rig(300);
    let t0 = Instant::now();
    rig.read_request(0, 0, 5, DATA);
    let r = request(&mut rig, &irq);
    queue1_is_served(&mut rig, 1);
    rig.wait_used(0, 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(rig.get8(status(0, 0)), 1, "IOERR");
    respond(&mut rig, r.seq, true);
    let c = rig.counters();
    assert_eq!(c["pri_timeouts"], 1, "{c}");
    assert_eq!(c["pri_stray_answers"], 1, "{c}");
    // The next request on the queue asks again.
    rig.read_request(0, 1, 7, DATA);
    let again = request(&mut rig, &irq);
    assert_ne!(again.seq, r.seq);
    rig.client
        .dma_map(DATA, DATA, 0x1000, rig.mem.as_raw_fd())
        .unwrap();
    respond(&mut rig, again.seq, true);
    rig.wait_used(0, 2);
    assert_eq!(rig.get8(status(0, 1)), 0);
}

/// A failed answer (the host has no such page) fails that request at once.
#[test]
fn a_failed_answer_fails_the_request() {
    let (mut rig, irq) = rig(5000);
    let t0 = Instant::now();
    rig.read_request(0, 0, 5, DATA);
    let r = request(&mut rig, &irq);
    respond(&mut rig, r.seq, false);
    rig.wait_used(0, 1);
    assert!(t0.elapsed() < Duration::from_secs(4), "not the timeout");
    assert_eq!(rig.get8(status(0, 0)), 1, "IOERR");
    let c = rig.counters();
    assert_eq!(
        (c["pri_failed"].as_u64(), c["iopf"].as_u64().unwrap() >= 2),
        (Some(1), true),
        "{c}"
    );
}

/// A client that never turns page requests on (it knows nothing of PRI) sees a device without
/// them: the fault fails the request at once instead of waiting for an answer.
#[test]
fn without_the_clients_interrupt_a_fault_fails_at_once() {
    let (mut rig, _irq) = rig_with(5000, false);
    let t0 = Instant::now();
    rig.read_request(0, 0, 5, DATA);
    rig.wait_used(0, 1);
    assert!(t0.elapsed() < Duration::from_secs(4), "not the timeout");
    assert_eq!(rig.get8(status(0, 0)), 1, "IOERR");
    assert!(table(&mut rig).is_empty());
    assert_eq!(rig.counters()["pri_requests"], 0);
}
