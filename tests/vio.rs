//! IOPA-Snoop end to end on KVM: vdpu passed through under `--vio`, guest memory reclaimed
//! underneath it while blk-verify checks every byte.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(180);
const RAM: u64 = 512 << 20;

struct Run {
    result: Value,
    device: Value,
    memory: Value,
    passes: Vec<(u64, u64, u64)>,
    stderr: String,
}

/// blk-verify against vdpu as `dev_flag` (`--vio` or `--user-device`), with reclaim churn when
/// `churn` is Some(unsafe_unmap_dma).
fn blk_verify(name: &str, dev_flag: &str, cmdline: &str, churn: Option<bool>) -> Run {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let mut vm = VmBuilder::new(name)
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline(cmdline)
        .device(dev_flag, &vdpu, "")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let churn = churn
        .map(|unsafe_unmap_dma| Churn::start(vm.api_path(), vm.pid(), RAM / 2, unsafe_unmap_dma));
    let out = vm.finish(TIMEOUT);
    let passes = churn.map(Churn::finish).unwrap_or_default();
    assert!(out.status.success(), "{}", out.describe());
    Run {
        result: out.line_json("VIO-GUEST-RESULT").unwrap_or_default(),
        device: logged_counters(&out.stderr, "dpu0"),
        memory: logged_counters(&out.stderr, "memory"),
        passes,
        stderr: out.stderr,
    }
}

fn assert_verified(r: &Run, ops: u64) {
    let res = &r.result;
    assert_eq!(u(res, "ops"), ops, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "io_errors"), 0, "{res}");
    assert_device_clean(&r.device);
}

/// The headline: the same workload and the same reclaim churn (half of RAM every 100 ms,
/// data buffers included), under VIO and under plain passthrough with the unsafe reclaim.
/// Under VIO every byte verifies, the device never faults, pages come back through the snoop
/// path, and the host holds a fraction of guest RAM. Under plain passthrough the device faults.
#[test]
fn vio_survives_reclaim_churn_that_breaks_passthrough() {
    if !kvm_available("vio_survives_reclaim_churn_that_breaks_passthrough") {
        return;
    }
    // 64 MiB of data buffers spread over all of guest RAM.
    let cmd = "vio.workload=blk-verify vio.ops=200000 vio.qd=16 vio.pool_pages=16384 vio.seed=5";
    let r = blk_verify("headline-vio", "--vio", cmd, Some(false));
    assert_verified(&r, 200_000);
    let d = &r.device;
    assert!(d["faultins"].as_u64().unwrap() > 1000, "{d}");
    assert!(d["dma_unmaps"].as_u64().unwrap() > 0, "{d}");
    assert!(d["q0_faultin_ns_p99"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(
        d["q0_shadow_idx"].as_u64(),
        Some(d["q0_chains"].as_u64().unwrap() % 65536),
        "{d}"
    );
    assert!(r.passes.len() >= 3, "{:?}", r.passes);
    let reclaimed: u64 = r.passes.iter().map(|p| p.0).sum();
    assert!(
        reclaimed > RAM / 4,
        "data buffers were reclaimed: {:?}",
        r.passes
    );
    let worst = worst_resident(&r.passes);
    assert!(
        worst < RAM / 4,
        "after each pass the host holds well under guest RAM: {:?}",
        r.passes
    );
    assert_eq!(r.memory["inflight_pinned_bytes"].as_u64(), Some(0));

    let cmd = format!("{cmd} vio.stall_s=3");
    let p = blk_verify("headline-pt", "--user-device", &cmd, Some(true));
    assert!(
        p.device["iopf"].as_u64().unwrap() > 0,
        "plain passthrough under the same churn faults: {}",
        p.device
    );
    let failed =
        p.result.is_null() || u(&p.result, "io_errors") > 0 || u(&p.result, "ops") < 200_000;
    assert!(failed, "{}", p.result);
}

/// Doorbells the guest skips under VIRTIO_F_EVENT_IDX must not stall the ring: the VMM states
/// avail_event against the published index. Bounded runtime (the guest gives up after 5 s
/// without progress), every byte verified.
#[test]
fn vio_event_idx_qd1_and_qd32() {
    if !kvm_available("vio_event_idx_qd1_and_qd32") {
        return;
    }
    for qd in [1, 32] {
        let cmd = format!(
            "vio.workload=blk-verify vio.ops=100000 vio.qd={qd} vio.event_idx=1 vio.stall_s=5 vio.seed=7"
        );
        let r = blk_verify(&format!("evidx{qd}"), "--vio", &cmd, None);
        assert_verified(&r, 100_000);
        assert!(r.device["driver_features"].as_u64().unwrap() & (1 << 29) != 0);
        // Fewer doorbells than requests: the guest really did skip some.
        assert!(
            qd == 1 || r.device["kicks"].as_u64().unwrap() < 100_000,
            "{}",
            r.device
        );
    }
}

/// Without event-idx the guest honours used->flags, which the device sets while it works; the
/// VMM keeps the guest's copy clear, so no entry waits for a doorbell that never comes.
#[test]
fn vio_no_event_idx_qd16() {
    if !kvm_available("vio_no_event_idx_qd16") {
        return;
    }
    let cmd = "vio.workload=blk-verify vio.ops=100000 vio.qd=16 vio.stall_s=5 vio.seed=8";
    let r = blk_verify("noevidx", "--vio", cmd, None);
    assert_verified(&r, 100_000);
}

/// Indirect tables and long chains (seg_max) under churn: the walker follows both, and their
/// pages (tables included) are brought back before the device reads them.
#[test]
fn vio_indirect_and_long_chains_under_churn() {
    if !kvm_available("vio_indirect_and_long_chains_under_churn") {
        return;
    }
    for (name, extra, descs) in [
        ("indirect", "vio.indirect=1 vio.segs=16", 18),
        ("segs", "vio.segs=8", 10),
    ] {
        let cmd = format!(
            "vio.workload=blk-verify vio.ops=60000 vio.qd=16 vio.pool_pages=8192 {extra} vio.seed=9"
        );
        let r = blk_verify(&format!("chains-{name}"), "--vio", &cmd, Some(false));
        assert_verified(&r, 60_000);
        let d = &r.device;
        assert!(d["faultins"].as_u64().unwrap() > 0, "{name}: {d}");
        // Every request but the two synchronous set-up ones has the long chain.
        let chains = d["q0_chains"].as_u64().unwrap();
        let walked = d["q0_descriptors"].as_u64().unwrap();
        assert!(
            walked >= (chains - 2) * descs,
            "{name}: {walked} for {chains} chains"
        );
        assert!(
            r.passes.iter().map(|p| p.0).sum::<u64>() > 0,
            "{name}: {:?}",
            r.passes
        );
    }
}

/// A guest that points every 97th request's buffer outside its RAM, under churn: the VMM maps
/// nothing outside RAM, counts and logs the bad chains (rate-limited), still publishes them,
/// the device fails exactly those requests (through its IOPF path), and every other request
/// completes and verifies: the ring never stalls.
#[test]
fn vio_hostile_requests_fail_without_stalling_the_ring() {
    if !kvm_available("vio_hostile_requests_fail_without_stalling_the_ring") {
        return;
    }
    let cmd = "vio.workload=blk-verify vio.ops=60000 vio.qd=16 vio.pool_pages=8192 vio.bad_every=97 vio.stall_s=5 vio.seed=10";
    let r = blk_verify("hostile", "--vio", cmd, Some(false));
    let res = &r.result;
    assert_eq!(u(res, "ops"), 60_000, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "bad_failed"), 60_000 / 97, "{res}");
    assert_eq!(u(res, "bad_succeeded"), 0, "{res}");
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "io_errors"), 0, "{res}");
    let d = &r.device;
    assert_eq!(d["bad_chains"].as_u64(), Some(60_000 / 97), "{d}");
    assert!(
        d["iopf"].as_u64().unwrap() > 0,
        "the device failed them itself: {d}"
    );
    assert!(d["dma_window_bytes"].as_u64().unwrap() <= RAM, "{d}");
    assert_eq!(d["failed"].as_u64(), Some(0), "{d}");
    let logged = r.stderr.matches("buffer outside guest memory").count();
    assert!(
        (1..=20).contains(&logged),
        "rate-limited log: {logged} lines"
    );
}

/// A VM reboot tears the device front end down (its snoop thread, pins, and the vfio-user
/// connection, which vdpu serves one at a time) and the rebooted guest drives the device again.
/// Plain passthrough too: both used to leak through reference cycles and hang the reboot.
#[test]
fn vio_and_passthrough_devices_survive_a_reboot() {
    if !kvm_available("vio_and_passthrough_devices_survive_a_reboot") {
        return;
    }
    for flag in ["--vio", "--user-device"] {
        let name = format!("reboot{}", flag.len());
        let disk = TmpDisk::new(&name, 64 << 20);
        let vdpu = Vdpu::start(&name, &disk);
        let mut vm = VmBuilder::new(&name)
            .memory("size=512M,shared=on,reclaim=on")
            .cmdline("vio.workload=blk-verify vio.ops=150000 vio.rate=50000 vio.qd=16 vio.seed=12")
            .device(flag, &vdpu, "")
            .api_socket()
            .verbose()
            .spawn();
        vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
            .expect("guest drives the device");
        let (status, body) = vm.api("PUT", "vm.reboot", "");
        assert_eq!(status, 204, "{flag}: {body}");
        let out = vm.finish(TIMEOUT);
        assert!(out.status.success(), "{flag}: {}", out.describe());
        assert_eq!(
            out.stdout
                .iter()
                .filter(|l| l.starts_with("VIO-GUEST-INFO"))
                .count(),
            2,
            "{flag}: the rebooted guest found the device: {}",
            out.describe()
        );
        let r = out.result();
        assert_eq!(u(&r, "ops"), 150_000, "{flag}: {r}");
        assert_eq!(u(&r, "mismatches"), 0, "{flag}: {r}");
        assert_eq!(u(&r, "io_errors"), 0, "{flag}: {r}");
    }
}
