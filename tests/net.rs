//! virtio-net end to end on KVM: the VMM-emulated device over a TAP, and vdpu's network
//! function passed through (`--user-device`) and under VIO (`--vio`, with reclaim churn). The
//! guest's net-echo and net-stream verify every frame against `vio-netpeer` on the TAP's host
//! side; each TAP lives in a network namespace of its own.

mod common;

use common::net::NetPeer;
use common::*;
use serde_json::Value;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(180);
const RAM: u64 = 512 << 20;
const TAP: &str = "vionet0";

struct Run {
    result: Value,
    peer: Value,
    device: Value,
    memory: Value,
    passes: Vec<(u64, u64, u64)>,
    stderr: String,
}

/// Runs `cmdline` with the VM built by `vm`, the peer attached to `TAP` in the namespace of
/// `tap_owner` (None: the VMM's), and reclaim churn if `churn`.
fn run(vm: VmBuilder, cmdline: &str, tap_owner: Option<u32>, dev: &str, churn: bool) -> Run {
    run_with(vm, cmdline, tap_owner, dev, churn, |_| ()).0
}

/// `run`, with `during` called once the guest reaches the peer (while it runs).
fn run_with<T>(
    vm: VmBuilder,
    cmdline: &str,
    tap_owner: Option<u32>,
    dev: &str,
    churn: bool,
    during: impl FnOnce(&Vm) -> T,
) -> (Run, T) {
    let mut vm = vm.cmdline(cmdline).api_socket().verbose().spawn();
    let peer = NetPeer::attach(tap_owner.unwrap_or(vm.pid()), TAP);
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("the guest reaches the peer");
    let churning = churn.then(|| Churn::start(vm.api_path(), vm.pid(), RAM / 2, false));
    let got = during(&vm);
    let out = vm.finish(TIMEOUT);
    let passes = churning.map(Churn::finish).unwrap_or_default();
    let peer = peer.finish();
    assert!(out.status.success(), "{}", out.describe());
    let result = out
        .line_json("VIO-GUEST-RESULT")
        .unwrap_or_else(|| panic!("no result: {}", out.describe()));
    eprintln!("guest: {result}\npeer: {peer}\npasses: {passes:?}");
    let run = Run {
        result,
        peer,
        device: logged_counters(&out.stderr, dev),
        memory: if churn {
            logged_counters(&out.stderr, "memory")
        } else {
            Value::Null
        },
        passes,
        stderr: out.stderr,
    };
    (run, got)
}

fn emulated(name: &str, net_extra: &str) -> VmBuilder {
    VmBuilder::new(name)
        .netns()
        .flag("--net", &format!("tap={TAP},id=net0{net_extra}"))
}

/// Every frame both ways arrived once and intact.
fn assert_stream(r: &Run, frames: u64) {
    let res = &r.result;
    assert_eq!(u(res, "writes"), frames, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "reads"), frames, "{res}");
    assert_eq!(u(res, "lost"), 0, "{res}");
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "rx_errors"), 0, "{res}");
    let p = &r.peer;
    assert_eq!(u(p, "data_frames"), frames, "{p}");
    assert_eq!(u(p, "data_corrupt"), 0, "{p}");
    assert_eq!(u(p, "data_lost"), 0, "{p}");
    assert_eq!(u(p, "pulled"), frames, "{p}");
}

#[test]
fn emulated_net_echo() {
    if !kvm_available("emulated_net_echo") {
        return;
    }
    let r = run(
        emulated("net-echo", ""),
        "vio.workload=net-echo vio.ops=5000 vio.len=200",
        None,
        "net0",
        false,
    );
    let res = &r.result;
    assert_eq!(u(res, "ops"), 5000, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "reads"), 5000, "{res}");
    assert_eq!(u(res, "lost"), 0, "{res}");
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert!(u(res, "lat_p50_ns") > 0, "{res}");
    assert_eq!(u(&r.peer, "echoes"), 5000, "{}", r.peer);
    assert_eq!(u(&r.peer, "echo_corrupt"), 0, "{}", r.peer);
    // The device counted what the guest did: its requests, the peer's replies, and a doorbell
    // per transmitted frame at queue depth 1.
    let d = &r.device;
    assert!(u(d, "tx_frames") >= 5000, "{d}");
    assert!(u(d, "rx_frames") >= 5000, "{d}");
    assert_eq!(u(d, "bad_chains"), 0, "{d}");
    assert_eq!(u(d, "rx_dropped"), 0, "{d}");
    assert!(u(d, "queue1_kicks") >= 5000, "{d}");
    // Ethernet header, protocol header, data.
    assert!(u(d, "tx_bytes") >= 5000 * (14 + 28 + 200), "{d}");
}

/// Bulk both ways; receive buffers of 512 bytes, so every full frame is merged from three
/// (VIRTIO_NET_F_MRG_RXBUF), with event-idx suppression.
#[test]
fn emulated_net_stream_merged_buffers() {
    if !kvm_available("emulated_net_stream_merged_buffers") {
        return;
    }
    let r = run(
        emulated("net-stream", ",queue_size=128"),
        "vio.workload=net-stream vio.ops=30000 vio.rx_buf=512 vio.event_idx=1",
        None,
        "net0",
        false,
    );
    assert_stream(&r, 30_000);
    let d = &r.device;
    // Three buffers per full frame of the stream.
    assert!(u(d, "queue0_frames") >= 3 * 30_000, "{d}");
    assert_eq!(u(d, "bad_chains"), 0, "{d}");
    assert!(u(&r.result, "tx_mbps") > 0 && u(&r.result, "rx_mbps") > 0);
}

/// A guest posting malformed receive buffers (outside RAM, a length of 4 GiB, a chain that
/// loops) among good ones: each comes back empty and counted, no frame is lost, and the log
/// says so a bounded number of times.
#[test]
fn emulated_net_hostile_receive_buffers() {
    if !kvm_available("emulated_net_hostile_receive_buffers") {
        return;
    }
    let r = run(
        emulated("net-hostile", ""),
        "vio.workload=net-stream vio.ops=20000 vio.bad_rx_every=7",
        None,
        "net0",
        false,
    );
    assert_stream(&r, 20_000);
    let bad = u(&r.result, "bad_rx_returned");
    assert!(bad > 2000, "{}", r.result);
    assert_eq!(u(&r.result, "bad_rx_accepted"), 0, "{}", r.result);
    assert_eq!(u(&r.device, "bad_chains"), bad, "{}", r.device);
    assert_eq!(u(&r.device, "rx_dropped"), 0, "{}", r.device);
    for what in ["is not accessible", "does not end within the queue"] {
        assert!(r.stderr.contains(what), "{what}: {}", r.stderr);
    }
    let logged = r.stderr.matches("virtio-net: ").count();
    assert!(
        (1..=20).contains(&logged),
        "rate-limited log: {logged} lines"
    );
}

#[test]
fn vdpu_net_passed_through() {
    if !kvm_available("vdpu_net_passed_through") {
        return;
    }
    let vdpu = Vdpu::start_net("net-pt", &format!("tap={TAP}"));
    let vm = VmBuilder::new("net-pt")
        .memory("size=512M,shared=on")
        .device("--user-device", &vdpu, "");
    let pid = vdpu.child.id();
    let r = run(
        vm,
        "vio.workload=net-stream vio.ops=30000",
        Some(pid),
        "dpu0",
        false,
    );
    assert_stream(&r, 30_000);
    assert_eq!(
        r.device["iopf"].as_u64(),
        Some(0),
        "{}\n{}",
        r.device,
        vdpu.log()
    );
}

/// The network device switched between snoop and passthrough every 50 ms while frames stream
/// both ways and half of RAM is reclaimed every 100 ms (while snooped): the posted receive
/// buffers change hands with every switch (pinned by the snoop path, then by passthrough's
/// whole-RAM mapping, then snooped again), and not one frame is lost or corrupted.
#[test]
fn vdpu_net_survives_elastic_switches_under_churn() {
    if !kvm_available("vdpu_net_survives_elastic_switches_under_churn") {
        return;
    }
    let vdpu = Vdpu::start_net("net-elastic", &format!("tap={TAP}"));
    let vm = VmBuilder::new("net-elastic")
        .memory("size=512M,shared=on,reclaim=on")
        .device("--vio", &vdpu, "");
    let pid = vdpu.child.id();
    // The switcher stops by itself once the VM is gone.
    let (r, switches) = run_with(
        vm,
        "vio.workload=net-stream vio.ops=1000000000 vio.secs=5 vio.pool_pages=4096",
        Some(pid),
        "dpu0",
        true,
        |vm| switcher(vm.api_path(), 1000, Arc::new(AtomicBool::new(false))),
    );
    let switches = switches.join().unwrap();
    let (res, peer) = (&r.result, &r.peer);
    assert!(
        u(res, "writes") > 10_000 && u(res, "reads") > 10_000,
        "{res}"
    );
    assert_eq!(u(res, "lost"), 0, "{res}");
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(peer, "data_corrupt"), 0, "{peer}");
    assert_eq!(u(peer, "data_lost"), 0, "{peer}");
    assert_device_clean(&r.device);
    let to = |m: &str| switches.iter().filter(|s| s["to"] == m).count();
    assert!(
        to("passthrough") >= 10 && to("snoop") >= 10,
        "{} switches: {switches:?}",
        switches.len()
    );
}

/// A snooped network device with nothing to do still has its receive buffers in flight: the
/// snoop thread's poll backs off (to 64 x `poll_us`) instead of waking every millisecond, and
/// comes back at once when frames flow.
#[test]
fn idle_snooped_net_device_polls_rarely() {
    if !kvm_available("idle_snooped_net_device_polls_rarely") {
        return;
    }
    let vdpu = Vdpu::start_net("net-idle", &format!("tap={TAP}"));
    let vm = VmBuilder::new("net-idle")
        .memory("size=512M,shared=on")
        .device("--vio", &vdpu, "");
    let pid = vdpu.child.id();
    let (r, rate) = run_with(
        vm,
        "vio.workload=net-echo vio.ops=2000 vio.idle_ms=4000",
        Some(pid),
        "dpu0",
        false,
        |vm| {
            let polls = || {
                let (status, body) = vm.api("GET", "vm.counters", "");
                assert_eq!(status, 200, "{body}");
                let c: Value = serde_json::from_str(&body).unwrap();
                (std::time::Instant::now(), u(&c["dpu0"], "polls"))
            };
            // Past the first backoff steps (1 + 2 + ... + 32 ms).
            std::thread::sleep(Duration::from_millis(500));
            let (t0, p0) = polls();
            std::thread::sleep(Duration::from_millis(2000));
            let (t1, p1) = polls();
            (p1 - p0) as f64 / (t1 - t0).as_secs_f64()
        },
    );
    assert_eq!(u(&r.result, "lost"), 0, "{}", r.result);
    assert_eq!(u(&r.result, "mismatches"), 0, "{}", r.result);
    // 1000/s without the backoff; 15.6/s at its limit.
    assert!(rate < 50.0, "{rate:.0} polls/s while idle");
    assert_device_clean(&r.device);
}

/// The paper's case: the network device under VIO while half of guest RAM is reclaimed every
/// 100 ms. Receive buffers sit posted until frames arrive; each comes from a page of a 16 MiB
/// pool the guest last touched long ago, so the VMM faults pages back in before it publishes
/// them. Every frame verifies, the device never faults, and the host holds a fraction of RAM.
#[test]
fn vdpu_net_under_vio_with_reclaim_churn() {
    if !kvm_available("vdpu_net_under_vio_with_reclaim_churn") {
        return;
    }
    let vdpu = Vdpu::start_net("net-vio", &format!("tap={TAP}"));
    let vm = VmBuilder::new("net-vio")
        .memory("size=512M,shared=on,reclaim=on")
        .device("--vio", &vdpu, "");
    let pid = vdpu.child.id();
    let r = run(
        vm,
        "vio.workload=net-stream vio.ops=100000 vio.pool_pages=4096",
        Some(pid),
        "dpu0",
        true,
    );
    assert_stream(&r, 100_000);
    let d = &r.device;
    assert_device_clean(d);
    assert!(d["faultins"].as_u64().unwrap() > 100, "{d}");
    assert!(r.passes.len() >= 3, "{:?}", r.passes);
    let worst = worst_resident(&r.passes);
    assert!(
        worst < RAM / 4,
        "after each pass the host holds well under guest RAM: {:?}",
        r.passes
    );
    assert_eq!(r.memory["inflight_pinned_bytes"].as_u64(), Some(0));
}
