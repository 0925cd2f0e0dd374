//! Passthrough through vdpu (vfio-user), end to end on KVM.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

fn passthrough_blk_verify(name: &str, qd: u32, indirect: u32, io_fds: bool) -> (Value, Value) {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let cmdline = format!(
        "vio.workload=blk-verify vio.ops=20000 vio.qd={qd} vio.indirect={indirect} vio.seed=11"
    );
    let out = VmBuilder::new(name)
        .memory("size=512M,shared=on")
        .cmdline(&cmdline)
        .device(
            "--user-device",
            &vdpu,
            if io_fds { "" } else { ",io_fds=off" },
        )
        .verbose()
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "ops"), 20_000);
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    let c = logged_counters(&out.stderr, "dpu0");
    assert_eq!(c["iopf"].as_u64(), Some(0), "{c}");
    assert_eq!(c["failed"].as_u64(), Some(0));
    assert_eq!(
        c["read_ops"].as_u64().unwrap() + c["write_ops"].as_u64().unwrap(),
        20_000,
        "{c}"
    );
    (r, c)
}

#[test]
fn vdpu_qd1_direct() {
    if kvm_available("vdpu_qd1_direct") {
        let (_, c) = passthrough_blk_verify("qd1d", 1, 0, true);
        assert_eq!(
            c["vmm_doorbells"].as_u64(),
            Some(0),
            "doorbells must bypass the VMM: {c}"
        );
    }
}

#[test]
fn vdpu_qd1_indirect() {
    if kvm_available("vdpu_qd1_indirect") {
        let (_, c) = passthrough_blk_verify("qd1i", 1, 1, true);
        assert_eq!(c["vmm_doorbells"].as_u64(), Some(0), "{c}");
    }
}

#[test]
fn vdpu_qd16_direct() {
    if kvm_available("vdpu_qd16_direct") {
        let (_, c) = passthrough_blk_verify("qd16d", 16, 0, true);
        assert_eq!(c["vmm_doorbells"].as_u64(), Some(0), "{c}");
    }
}

#[test]
fn vdpu_qd16_indirect() {
    if kvm_available("vdpu_qd16_indirect") {
        let (_, c) = passthrough_blk_verify("qd16i", 16, 1, true);
        assert_eq!(c["vmm_doorbells"].as_u64(), Some(0), "{c}");
    }
}

/// A client that speaks only the base protocol (doorbells as region writes over the socket,
/// as Cloud Hypervisor's --user-device does) is served too.
#[test]
fn vdpu_base_protocol_client() {
    if kvm_available("vdpu_base_protocol_client") {
        let (_, c) = passthrough_blk_verify("base", 4, 0, false);
        assert!(
            c["vmm_doorbells"].as_u64().unwrap() > 0,
            "doorbells went through the VMM: {c}"
        );
    }
}

#[test]
fn user_device_requires_shared_memory() {
    let out = Command::new(VMM)
        .args([
            "--kernel",
            VMM,
            "--memory",
            "size=64M",
            "--user-device",
            "socket=/nonexistent.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("requires --memory shared=on"));
}

/// vdpu dies mid-run: the VMM logs it, marks the device failed and keeps serving; the guest
/// sees its I/O stop, not a crash.
#[test]
fn vdpu_killed_mid_run() {
    if !kvm_available("vdpu_killed_mid_run") {
        return;
    }
    let disk = TmpDisk::new("kill", 64 << 20);
    let mut vdpu = Vdpu::start("kill", &disk);
    let mut vm = VmBuilder::new("kill")
        .memory("size=256M,shared=on")
        .cmdline("vio.workload=blk-verify vio.ops=100000000 vio.qd=8")
        .device("--user-device", &vdpu, "")
        .api_socket()
        .spawn();
    let api = vm.api_path().to_path_buf();
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest runs");
    vdpu.child.kill().unwrap();
    vdpu.child.wait().unwrap();
    let ch = |a: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
            .args(["--api-socket", api.to_str().unwrap(), a])
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out) = ch("counters");
        assert!(ok, "VMM stopped serving after the device died");
        let c: Value = serde_json::from_str(&out).unwrap();
        if c["dpu0"]["failed"].as_u64() == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "device never marked failed: {c}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ch("ping").0);
    let info: Value = serde_json::from_str(&ch("info").1).unwrap();
    assert_eq!(info["state"], "Running", "the VM keeps running");
    // A new vdpu on the same socket: the VMM does not reconnect behind the guest's back (the
    // device's state died with the old process); the device stays failed, the VM runs on.
    drop(vdpu);
    let _restarted = Vdpu::start("kill", &disk);
    // A window in which a reconnect would show.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = ch("counters");
    assert!(ok, "VMM stopped serving after the device came back");
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c["dpu0"]["failed"].as_u64(), Some(1), "{c}");
    let info: Value = serde_json::from_str(&ch("info").1).unwrap();
    assert_eq!(info["state"], "Running", "the VM keeps running");
    assert!(ch("shutdown-vmm").0);
    let out = vm.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("went away") || out.stderr.contains("device failed"),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

/// vdpu stops answering mid-run (stopped, not dead: its socket stays open): a request to it
/// fails after the client's timeout instead of hanging the VMM, the device is marked failed,
/// and later requests fail at once. The VM keeps running throughout.
/// The VMM dies (SIGKILL) with requests in flight: vdpu drops that client's state and serves
/// the next VMM, whose guest verifies its own writes through the same device.
#[test]
fn vmm_killed_mid_run() {
    if !kvm_available("vmm_killed_mid_run") {
        return;
    }
    let disk = TmpDisk::new("vmmkill", 64 << 20);
    let mut vdpu = Vdpu::start("vmmkill", &disk);
    let mut vm = VmBuilder::new("vmmkill")
        .memory("size=256M,shared=on")
        .cmdline("vio.workload=blk-verify vio.ops=100000000 vio.qd=16")
        .device("--user-device", &vdpu, "")
        .spawn();
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest runs");
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    assert!(
        vdpu.child.try_wait().unwrap().is_none(),
        "vdpu died with its client"
    );

    let out = VmBuilder::new("vmmkill2")
        .memory("size=256M,shared=on")
        .cmdline("vio.workload=blk-verify vio.ops=20000 vio.qd=8 vio.seed=5")
        .device("--user-device", &vdpu, "")
        .verbose()
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "ops"), 20_000);
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    let c = logged_counters(&out.stderr, "dpu0");
    assert_eq!(c["iopf"].as_u64(), Some(0), "{c}");
    assert_eq!(c["failed"].as_u64(), Some(0), "{c}");
}

#[test]
fn vdpu_hung_mid_run() {
    if !kvm_available("vdpu_hung_mid_run") {
        return;
    }
    let disk = TmpDisk::new("hang", 64 << 20);
    let vdpu = Vdpu::start("hang", &disk);
    let mut vm = VmBuilder::new("hang")
        .memory("size=256M,shared=on")
        .cmdline("vio.workload=blk-verify vio.ops=100000000 vio.qd=8 vio.stall_s=600")
        .device("--user-device", &vdpu, "")
        .api_socket()
        .spawn();
    let sock = vm.api_path().to_path_buf();
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest runs");
    let signal = |sig| {
        // SAFETY: signals our own child, which has not been waited for.
        assert_eq!(unsafe { libc::kill(vdpu.child.id() as i32, sig) }, 0);
    };
    signal(libc::SIGSTOP);
    let counters = || {
        let t = Instant::now();
        let (status, body) = api(&sock, "GET", "vm.counters", "");
        assert_eq!(status, 200, "{body}");
        let c: Value = serde_json::from_str(&body).unwrap();
        (c["dpu0"]["failed"].as_u64(), t.elapsed())
    };
    let (failed, took) = counters();
    assert_eq!(
        failed,
        Some(1),
        "a request that got no reply fails the device"
    );
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(15),
        "bounded by the request timeout: {took:?}"
    );
    let (failed, took) = counters();
    assert_eq!(failed, Some(1));
    assert!(took < Duration::from_secs(1), "no second wait: {took:?}");
    let (status, body) = api(&sock, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["state"],
        "Running"
    );
    signal(libc::SIGCONT);
    let (status, _) = api(&sock, "PUT", "vmm.shutdown", "");
    assert_eq!(status, 204);
    let out = vm.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("No reply to command"),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

/// The problem VIO solves, shown: pages the guest uses for DMA are unmapped from the device
/// mid-run (as reclaim under plain passthrough would have to). The device faults on them (IOPF,
/// which it cannot resolve), the guest sees I/O errors, and no memory is corrupted.
#[test]
fn dma_unmap_mid_run_causes_iopf() {
    if !kvm_available("dma_unmap_mid_run_causes_iopf") {
        return;
    }
    let disk = TmpDisk::new("iopf", 64 << 20);
    let vdpu = Vdpu::start("iopf", &disk);
    let mut vm = VmBuilder::new("iopf")
        .memory("size=512M,shared=on")
        .cmdline("vio.workload=blk-verify vio.ops=600000 vio.qd=16 vio.pool_pages=2048 vio.seed=4")
        .device("--user-device", &vdpu, "")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    // Data buffers are spread over all of RAM; the rings sit low. Revoke the upper half.
    let (status, resp) = vm.api(
        "PUT",
        "vm.dma-unmap",
        r#"{"id":"dpu0","iova":268435456,"size":268435456}"#,
    );
    assert_eq!(status, 204, "{resp}");
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(
        u(&r, "ops"),
        600_000,
        "every request completes, failed or not"
    );
    assert!(
        u(&r, "io_errors") > 0,
        "the device could not reach unmapped buffers: {r}"
    );
    assert_eq!(u(&r, "mismatches"), 0, "no corruption: {r}");
    let c = logged_counters(&out.stderr, "dpu0");
    assert!(c["iopf"].as_u64().unwrap() > 0, "{c}");
    let iova = c["last_iopf_iova"].as_u64().unwrap();
    assert!(
        (256 << 20..512 << 20).contains(&iova),
        "faults are in the unmapped range: {iova:#x}"
    );
}

/// The service-time model: every request takes at least `latency_us`, and requests overlap.
#[test]
fn vdpu_latency_model() {
    if !kvm_available("vdpu_latency_model") {
        return;
    }
    let disk = TmpDisk::new("lat", 16 << 20);
    let vdpu = Vdpu::start_with("lat", &disk, ",latency_us=2000");
    let run_qd = |qd: u32| {
        let out = VmBuilder::new(&format!("lat{qd}"))
            .memory("size=256M,shared=on")
            .cmdline(&format!("vio.workload=blk-verify vio.ops=400 vio.qd={qd}"))
            .device("--user-device", &vdpu, "")
            .run(TIMEOUT);
        assert!(out.status.success(), "{}", out.describe());
        let r = out.result();
        assert_eq!(u(&r, "mismatches"), 0);
        r
    };
    // The guest's percentiles are histogram bucket lower bounds (up to 12.5% low) on a TSC
    // calibrated against the PM timer (a few % off on a loaded host): 2 ms shows as >= 1.6 ms.
    // Without the model a request takes ~20 us.
    let r1 = run_qd(1);
    assert!(u(&r1, "lat_p50_ns") >= 1_600_000, "{r1}");
    let r8 = run_qd(8);
    assert!(u(&r8, "lat_p50_ns") >= 1_600_000, "{r8}");
    // Eight in flight are served concurrently, not one after another.
    assert!(
        u(&r8, "iops") > 4 * u(&r1, "iops"),
        "qd8 {} vs qd1 {}",
        u(&r8, "iops"),
        u(&r1, "iops")
    );
}

/// Reclaim under plain passthrough: every DMA-mapped page is pinned, so nothing is reclaimed and
/// the report says why. With the unsafe switch cold pages are DMA-unmapped and reclaimed anyway:
/// the device hits IOPFs it cannot resolve and the guest sees I/O errors.
///
/// Deterministic: the guest is paced so that most of its 4096 data buffers go untouched for a
/// whole sampling round (cold), and the test reclaims them and keeps doing so until the device
/// has faulted on one, which it must as soon as the guest reuses a reclaimed buffer.
#[test]
fn reclaim_under_passthrough() {
    if !kvm_available("reclaim_under_passthrough") {
        return;
    }
    let disk = TmpDisk::new("reclaim-pt", 64 << 20);
    let vdpu = Vdpu::start("reclaim-pt", &disk);
    let mut vm = VmBuilder::new("reclaim-pt")
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline("vio.workload=blk-verify vio.ops=30000 vio.rate=2000 vio.qd=16 vio.pool_pages=4096 vio.seed=2")
        // Sampling only (target 0): the policy finds cold pages but reclaims nothing itself.
        .reclaim("interval_ms=100,idle_ms=200,target_pct=0")
        .device("--user-device", &vdpu, "")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let reclaim = |body: &str| -> Value {
        let (status, resp) = vm.api("PUT", "vm.reclaim", body);
        assert_eq!(status, 200, "{resp}");
        serde_json::from_str(&resp).unwrap()
    };
    // Two sampling rounds, so that "cold" means something.
    let deadline = Instant::now() + Duration::from_secs(30);
    let counters = || -> Value {
        let (status, body) = vm.api("GET", "vm.counters", "");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    while counters()["memory"]["sample_runs"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline, "the policy never sampled");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rep = reclaim(r#"{"bytes": 268435456}"#);
    assert_eq!(rep["reclaimed_bytes"].as_u64(), Some(0), "{rep}");
    assert!(rep["skipped_pinned_bytes"].as_u64().unwrap() > 0, "{rep}");
    assert!(
        rep["skipped_reason"]
            .as_str()
            .unwrap()
            .contains("passthrough device dpu0"),
        "{rep}"
    );
    // Cold pages only: idle data buffers, not the vrings the guest keeps hot.
    let mut taken = 0;
    while counters()["dpu0"]["iopf"].as_u64().unwrap() == 0 {
        assert!(
            Instant::now() < deadline,
            "the device never touched a reclaimed page ({taken} bytes reclaimed)"
        );
        let rep = reclaim(r#"{"bytes": 268435456, "unsafe_unmap_dma": true}"#);
        taken += rep["reclaimed_bytes"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(taken > 0);
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert!(u(&r, "io_errors") > 0, "{r}");
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    let c = logged_counters(&out.stderr, "dpu0");
    assert!(c["iopf"].as_u64().unwrap() > 0, "{c}");
    let m = logged_counters(&out.stderr, "memory");
    assert!(m["pinned_bytes"].as_u64().unwrap() > 0, "{m}");
}
