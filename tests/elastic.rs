//! Elastic passthrough end to end on KVM: a `vio` device switched live between snoop and plain
//! passthrough (through the API, and by auto mode following the request rate) while blk-verify
//! checks every byte and guest memory is reclaimed underneath it.

mod common;

use common::*;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(240);
const RAM: u64 = 512 << 20;

/// One test at a time: they measure rates (auto mode) and count switches in a time window, and
/// on two cores a neighbour's VM takes the CPU they need.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn vio_vm(name: &str, vdpu: &Vdpu, extra: &str, cmdline: &str) -> Vm {
    VmBuilder::new(name)
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline(cmdline)
        .device("--vio", vdpu, extra)
        .api_socket()
        .verbose()
        .spawn()
}

fn info(vm: &Vm) -> Value {
    let (status, body) = vm.api("GET", "vm.vio-info", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()[0].clone()
}

/// Forced switches every 50 ms (30 each way) during 20 s of blk-verify at queue depth 32 (at
/// least 100,000 requests), with reclaim churn (half of RAM every 100 ms; it takes pages only
/// while the device is snooped), event-idx off and on:
/// every block verifies, the device never faults, nothing stalls (the guest gives up after 5 s
/// without a completion), and both directions happened many times.
#[test]
fn forced_switches_under_churn_lose_nothing() {
    if !kvm_available("forced_switches_under_churn_lose_nothing") {
        return;
    }
    let _one = one_at_a_time();
    for event_idx in [0, 1] {
        let name = format!("elastic-forced{event_idx}");
        let disk = TmpDisk::new(&name, 64 << 20);
        let vdpu = Vdpu::start(&name, &disk);
        // As fast as it goes for 20 s: a switch that brings back what churn took can take a
        // second or two on a busy machine, and the guest must outlast 60 of them.
        let mut vm = vio_vm(
            &name,
            &vdpu,
            "",
            &format!(
                "vio.workload=blk-verify vio.ops=100000000 vio.phases=0:20s vio.qd=32 \
                 vio.pool_pages=16384 vio.event_idx={event_idx} vio.seed=7 vio.stall_s=5"
            ),
        );
        vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
            .expect("guest drives the device");
        let churn = Churn::start(vm.api_path(), vm.pid(), RAM / 2, false);
        let stop = Arc::new(AtomicBool::new(false));
        let switches = switcher(vm.api_path(), 30, stop.clone());
        let out = vm.finish(TIMEOUT);
        stop.store(true, Ordering::Relaxed);
        let switches = switches.join().unwrap();
        let passes = churn.finish();
        assert!(out.status.success(), "{}", out.describe());
        let r = out.result();
        assert!(u(&r, "ops") >= 100_000, "{r}");
        assert_eq!(u(&r, "mismatches"), 0, "{r}");
        assert_eq!(u(&r, "io_errors"), 0, "{r}");
        let d = logged_counters(&out.stderr, "dpu0");
        assert_eq!(d["iopf"].as_u64(), Some(0), "{d}");
        assert_eq!(d["bad_chains"].as_u64(), Some(0), "{d}");
        assert_eq!(d["acquire_errors"].as_u64(), Some(0), "{d}");
        assert_eq!(d["missed_doorbells"].as_u64(), Some(0), "{d}");
        let to = |m: &str| switches.iter().filter(|s| s["to"] == m).count();
        assert!(
            to("passthrough") >= 10 && to("snoop") >= 10,
            "event_idx={event_idx}: {} switches: {switches:?}",
            switches.len()
        );
        let reclaimed: u64 = passes.iter().map(|p| p.0).sum();
        assert!(reclaimed > 0, "churn took pages while snooped: {passes:?}");
        // Pins left: none if the run ended snooped; all of RAM if it ended passed through.
        let m = logged_counters(&out.stderr, "memory");
        let pinned = if d["passthrough"] == 1 { RAM } else { 0 };
        assert_eq!(
            m["inflight_pinned_bytes"].as_u64(),
            Some(pinned),
            "{m}\n{d}"
        );
    }
}

/// Auto mode follows the guest's rate: low (500 ops/s), then as fast as it goes, then low
/// again. The device goes to passthrough during the fast phase and back to snoop after it, as
/// auto switches seen in `vm.vio-info`; every block verifies and the device never faults.
#[test]
fn auto_mode_follows_the_rate() {
    if !kvm_available("auto_mode_follows_the_rate") {
        return;
    }
    let _one = one_at_a_time();
    let name = "elastic-auto";
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let mut vm = vio_vm(
        name,
        &vdpu,
        ",mode=auto,iops_high=20000,iops_low=5000,dwell_ms=500",
        "vio.workload=blk-verify vio.ops=100000000 vio.qd=32 vio.seed=3 vio.stall_s=5 \
         vio.phases=500:3s,0:3s,500:3s",
    );
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let mut seen = vec![info(&vm)["mode"].as_str().unwrap().to_string()];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let (status, body) = vm.api("GET", "vm.vio-info", "");
        if status != 200 {
            break; // powered off
        }
        let i = &serde_json::from_str::<Value>(&body).unwrap()[0];
        let mode = i["mode"].as_str().unwrap();
        if seen.last().map(String::as_str) != Some(mode) {
            seen.push(mode.to_string());
        }
        if seen.len() >= 3 {
            assert_eq!(i["configured"], "auto", "{i}");
            assert_eq!(i["last_switch"]["auto"], true, "{i}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(
        seen,
        ["snoop", "passthrough", "snoop"],
        "{}",
        out.describe()
    );
    let r = out.result();
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    assert!(u(&r, "ops") > 3000, "{r}");
    let d = logged_counters(&out.stderr, "dpu0");
    assert_eq!(d["iopf"].as_u64(), Some(0), "{d}");
    assert!(
        out.stderr.contains("snoop -> passthrough (auto)")
            && out.stderr.contains("passthrough -> snoop (auto)"),
        "{}",
        out.describe()
    );
}

/// Memory follows the mode: reclaimed while snooped, all of guest RAM resident once passed
/// through (reclaim cannot take a page), and reclaimable again after switching back.
#[test]
fn memory_follows_the_mode() {
    if !kvm_available("memory_follows_the_mode") {
        return;
    }
    let _one = one_at_a_time();
    let name = "elastic-memory";
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let mut vm = vio_vm(
        name,
        &vdpu,
        "",
        "vio.workload=blk-verify vio.ops=100000000 vio.qd=4 vio.seed=4 vio.phases=200:60s",
    );
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let reclaim = |vm: &Vm| {
        let (status, body) = vm.api("PUT", "vm.reclaim", &format!(r#"{{"bytes": {RAM}}}"#));
        assert_eq!(status, 200, "{body}");
        memfd_allocated(vm.pid()).unwrap()
    };
    let snooped = reclaim(&vm);
    assert!(snooped < RAM / 4, "snooped: {snooped} bytes resident");

    let (status, body) = vm.api(
        "PUT",
        "vm.vio-mode",
        r#"{"id":"dpu0","mode":"passthrough"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let rep: Value = serde_json::from_str(&body).unwrap();
    assert!(u(&rep["switch"], "faultin_bytes") > 0, "{rep}");
    assert_eq!(
        memfd_allocated(vm.pid()),
        Some(RAM),
        "passed through: all resident"
    );
    let (status, body) = vm.api("PUT", "vm.reclaim", &format!(r#"{{"bytes": {RAM}}}"#));
    assert_eq!(status, 200, "{body}");
    let rep: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(u(&rep, "reclaimed_bytes"), 0, "{rep}");
    assert_eq!(memfd_allocated(vm.pid()), Some(RAM));

    let (status, body) = vm.api("PUT", "vm.vio-mode", r#"{"id":"dpu0","mode":"snoop"}"#);
    assert_eq!(status, 200, "{body}");
    let again = reclaim(&vm);
    assert!(again < RAM / 4, "snooped again: {again} bytes resident");
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    let out = vm.finish(TIMEOUT);
    let d = logged_counters(&out.stderr, "dpu0");
    assert_eq!(d["iopf"].as_u64(), Some(0), "{d}");
    assert!(
        !out.stdout.iter().any(|l| l.contains("VIO-GUEST-ERROR")),
        "{}",
        out.describe()
    );
}

/// Bad requests get a one-line 4xx and leave the VM running; a switch while paused works (the
/// device is not paused with the vCPUs) and is undone as well.
#[test]
fn vio_mode_api_errors_and_pause() {
    if !kvm_available("vio_mode_api_errors_and_pause") {
        return;
    }
    let _one = one_at_a_time();
    let name = "elastic-api";
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let cmdline = "vio.workload=blk-verify vio.ops=100000000 vio.qd=4 vio.phases=100:60s";
    let mut vm = VmBuilder::new("elastic-api-plain")
        .memory("size=512M,shared=on")
        .cmdline(cmdline)
        .device("--user-device", &vdpu, "")
        .api_socket()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let (s, b) = vm.api("PUT", "vm.vio-mode", r#"{"id":"dpu0","mode":"snoop"}"#);
    assert_eq!((s, b.contains("not a vio device")), (400, true), "{b}");
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    drop(vm);
    drop(vdpu);

    let vdpu = Vdpu::start(name, &disk);
    let mut vm = VmBuilder::new(name)
        .memory("size=512M,shared=on")
        .cmdline(cmdline)
        .device("--vio", &vdpu, "")
        .api_socket()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    for (body, status, want) in [
        (
            r#"{"id":"nope","mode":"snoop"}"#,
            400,
            "No passthrough device nope",
        ),
        (
            r#"{"id":"dpu0","mode":"fast"}"#,
            400,
            "expected snoop, passthrough or auto",
        ),
        (r#"{"id":"dpu0"}"#, 400, "Invalid body"),
        (r#"{"id":"dpu0","mode":"snoop","x":1}"#, 400, "Invalid body"),
    ] {
        let (s, b) = vm.api("PUT", "vm.vio-mode", body);
        assert_eq!(s, status, "{body}: {b}");
        assert!(b.contains(want), "{body}: {b}");
        assert!(!b.trim_end().contains('\n'), "one line: {b}");
    }
    assert_eq!(vm.api("GET", "vm.vio-mode", "").0, 405);
    assert_eq!(vm.api("PUT", "vm.pause", "").0, 204);
    for mode in ["passthrough", "snoop"] {
        let (s, b) = vm.api(
            "PUT",
            "vm.vio-mode",
            &format!(r#"{{"id":"dpu0","mode":"{mode}"}}"#),
        );
        assert_eq!(s, 200, "{b}");
        assert_eq!(info(&vm)["mode"], mode);
    }
    assert_eq!(vm.api("PUT", "vm.resume", "").0, 204);
    let (s, b) = vm.api("PUT", "vm.vio-mode", r#"{"id":"dpu0","mode":"auto"}"#);
    assert_eq!(s, 200, "{b}");
    let i = info(&vm);
    assert_eq!(i["configured"], "auto", "{i}");
    assert_eq!(i["switches"], 2, "{i}");
    assert_eq!(i["queues"].as_array().map(Vec::len), Some(1), "{i}");
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    let out = vm.finish(TIMEOUT);
    assert!(
        !out.stdout.iter().any(|l| l.contains("VIO-GUEST-ERROR")),
        "{}",
        out.describe()
    );
}
