//! The PRI baseline end to end on KVM: vdpu raises page requests (`--blk ...,pri=on`) and the
//! VMM resolves them (`--user-device ...,pri=on`), so guest RAM stays reclaimable under plain
//! passthrough, with the faults on the device's path instead of ahead of it (VIO).

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(240);
const RAM: u64 = 512 << 20;

struct Run {
    result: Value,
    device: Value,
    passes: Vec<(u64, u64, u64)>,
    stderr: String,
}

/// blk-verify through a PRI device under reclaim churn (half of RAM every 100 ms).
fn pri_run(name: &str, cmdline: &str) -> Run {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start_with(name, &disk, ",pri=on");
    let mut vm = VmBuilder::new(name)
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline(cmdline)
        .device("--user-device", &vdpu, ",pri=on")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("guest drives the device");
    let churn = Churn::start(vm.api_path(), vm.pid(), RAM / 2, false);
    let out = vm.finish(TIMEOUT);
    let passes = churn.finish();
    assert!(
        out.status.success(),
        "{}\nvdpu:\n{}",
        out.describe(),
        vdpu.log()
    );
    if out.line_json("VIO-GUEST-RESULT ").is_none() {
        let log = vdpu.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!("{}\nvdpu tail:\n{}", out.describe(), tail.join("\n"));
    }
    Run {
        result: out.result(),
        device: logged_counters(&out.stderr, "dpu0"),
        passes,
        stderr: out.stderr,
    }
}

/// Reclaim takes the pages of a PRI device (it pins nothing), the device asks for them back,
/// every request is resolved and every block verifies; the host holds a fraction of guest RAM.
#[test]
fn pri_under_reclaim_churn() {
    if !kvm_available("pri_under_reclaim_churn") {
        return;
    }
    let cmd = "vio.workload=blk-verify vio.ops=60000 vio.qd=16 vio.pool_pages=16384 vio.seed=21 vio.stall_s=10";
    let r = pri_run("pri-churn", cmd);
    let (res, d) = (&r.result, &r.device);
    assert_eq!(u(res, "ops"), 60_000, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "io_errors"), 0, "{res}");
    let requests = d["pri_requests"].as_u64().unwrap();
    assert!(requests > 100, "the device asked for pages back: {d}");
    assert_eq!(d["pri_resolved"].as_u64(), Some(requests), "{d}");
    assert_eq!(d["pri_failed"].as_u64(), Some(0), "{d}");
    assert_eq!(d["pri_timeouts"].as_u64(), Some(0), "{d}");
    assert_eq!(
        d["pri_host_failures"].as_u64(),
        Some(0),
        "the VMM's side: {d}"
    );
    assert_eq!(d["pri_host_requests"].as_u64(), Some(requests), "{d}");
    assert!(d["pri_resolve_ns_p99"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["failed"].as_u64(), Some(0), "{d}");
    let reclaimed: u64 = r.passes.iter().map(|p| p.0).sum();
    assert!(reclaimed > RAM / 4, "reclaim took pages: {:?}", r.passes);
    let worst = worst_resident(&r.passes);
    assert!(
        worst < RAM / 4,
        "after each pass the host holds well under guest RAM: {:?}",
        r.passes
    );
}

/// Requests whose buffers lie outside guest RAM (`vio.bad_every`): their page requests are
/// answered with failure and counted, those requests fail, everything else completes.
#[test]
fn pri_requests_outside_ram_fail_cleanly() {
    if !kvm_available("pri_requests_outside_ram_fail_cleanly") {
        return;
    }
    let cmd = "vio.workload=blk-verify vio.ops=20000 vio.qd=8 vio.pool_pages=8192 vio.bad_every=97 vio.seed=22 vio.stall_s=10";
    let r = pri_run("pri-bad", cmd);
    let (res, d) = (&r.result, &r.device);
    let bad = 20_000 / 97;
    assert_eq!(u(res, "ops"), 20_000, "{res}\n{}", r.stderr);
    assert_eq!(u(res, "bad_failed"), bad, "{res}");
    assert_eq!(u(res, "bad_succeeded"), 0, "{res}");
    assert_eq!(u(res, "mismatches"), 0, "{res}");
    assert_eq!(u(res, "io_errors"), 0, "{res}");
    assert_eq!(d["pri_outside_ram"].as_u64(), Some(bad), "{d}");
    assert_eq!(d["pri_host_failures"].as_u64(), Some(bad), "{d}");
    assert_eq!(
        d["pri_failed"].as_u64(),
        Some(bad),
        "the device's side: {d}"
    );
    assert_eq!(d["pri_timeouts"].as_u64(), Some(0), "{d}");
    assert_eq!(d["failed"].as_u64(), Some(0), "{d}");
}
