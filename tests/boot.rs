//! The foundation, end to end on KVM: boot the test guest, run its workloads through the
//! VMM-emulated virtio-blk disk, and check the VMM's exit paths.

mod common;

use common::*;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

fn blk_verify(name: &str, qd: u32, indirect: u32, event_idx: u32) {
    if !kvm_available(name) {
        return;
    }
    let disk = TmpDisk::new(name, 64 << 20);
    let ops = 20_000;
    let cmdline =
        format!("vio.workload=blk-verify vio.ops={ops} vio.qd={qd} vio.indirect={indirect} vio.event_idx={event_idx} vio.seed=7");
    let out = VmBuilder::new(name)
        .cmdline(&cmdline)
        .disk(&disk)
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(r["workload"], "blk-verify");
    assert_eq!(u(&r, "ops"), ops, "{r}");
    assert_eq!(u(&r, "reads") + u(&r, "writes"), ops);
    assert!(u(&r, "reads") > 0 && u(&r, "writes") > 0);
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    assert!(
        u(&r, "iops") > 0 && u(&r, "lat_p50_ns") > 0 && u(&r, "lat_p99_ns") >= u(&r, "lat_p50_ns")
    );
    assert_eq!(
        out.stdout
            .iter()
            .filter(|l| l.starts_with("VIO-GUEST-RESULT"))
            .count(),
        1
    );
    assert!(out
        .stdout
        .iter()
        .any(|l| l.starts_with("VIO-GUEST-PROGRESS")));
    let info = out.line_json("VIO-GUEST-INFO ").expect("GET_ID answered");
    assert_eq!(info["device_id"], "_disk0");
    assert_eq!(u(&info, "capacity_sectors"), (64 << 20) / 512);
}

#[test]
fn blk_verify_qd1_direct() {
    blk_verify("blk_verify_qd1_direct", 1, 0, 0);
}

#[test]
fn blk_verify_qd1_indirect() {
    blk_verify("blk_verify_qd1_indirect", 1, 1, 0);
}

#[test]
fn blk_verify_qd16_direct() {
    blk_verify("blk_verify_qd16_direct", 16, 0, 0);
}

#[test]
fn blk_verify_qd16_indirect() {
    blk_verify("blk_verify_qd16_indirect", 16, 1, 0);
}

#[test]
fn blk_verify_event_idx_qd1() {
    blk_verify("blk_verify_event_idx_qd1", 1, 0, 1);
}

#[test]
fn blk_verify_event_idx_qd16_indirect() {
    blk_verify("blk_verify_event_idx_qd16_indirect", 16, 1, 1);
}

/// The verifier can fail: the disk is overwritten behind the guest's back mid-run.
#[test]
fn blk_verify_detects_corruption() {
    if !kvm_available("blk_verify_detects_corruption") {
        return;
    }
    // 16 blocks: every one is written within the first second and read again after.
    let disk = TmpDisk::new("corrupt", 16 * 4096);
    let cmdline = "vio.workload=blk-verify vio.ops=300000 vio.qd=1 vio.rate=50000 vio.seed=3";
    let mut vm = VmBuilder::new("corrupt")
        .memory("size=256M")
        .cmdline(cmdline)
        .disk(&disk)
        .spawn();
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest makes progress");
    std::fs::write(&disk.path, vec![0xa5u8; 16 * 4096]).unwrap();
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "ops"), 300_000);
    assert!(u(&r, "mismatches") > 0, "corruption went unnoticed: {r}");
    assert_eq!(u(&r, "io_errors"), 0);
}

#[test]
fn mem_verify_64m() {
    if !kvm_available("mem_verify_64m") {
        return;
    }
    let out = VmBuilder::new("mem64")
        .memory("size=256M")
        .cmdline("vio.workload=mem-verify vio.mem_mb=64 vio.rounds=3 vio.idle_ms=20")
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(r["workload"], "mem-verify");
    assert_eq!(u(&r, "ops"), 3 * 64 * 256);
    assert_eq!(u(&r, "mismatches"), 0);
}

#[test]
fn mem_verify_larger_than_ram_is_an_error() {
    if !kvm_available("mem_verify_larger_than_ram_is_an_error") {
        return;
    }
    let out = VmBuilder::new("mem-too-large")
        .memory("size=64M")
        .cmdline("vio.workload=mem-verify vio.mem_mb=128")
        .run(TIMEOUT);
    assert!(
        out.status.success(),
        "guest reports the error and powers off: {}",
        out.describe()
    );
    assert!(out.line_json("VIO-GUEST-RESULT ").is_none());
    assert!(
        out.stdout
            .iter()
            .any(|l| l.contains("VIO-GUEST-ERROR") && l.contains("does not fit")),
        "{}",
        out.describe()
    );
}

#[test]
fn guest_triple_fault_exits_nonzero() {
    if !kvm_available("guest_triple_fault_exits_nonzero") {
        return;
    }
    let out = VmBuilder::new("triple-fault")
        .memory("size=64M")
        .cmdline("vio.workload=triple-fault")
        .run(TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("triple fault"), "{}", out.describe());
}

#[test]
fn two_vcpus_boot() {
    if !kvm_available("two_vcpus_boot") {
        return;
    }
    let disk = TmpDisk::new("smp", 8 << 20);
    let out = VmBuilder::new("smp")
        .memory("size=128M")
        .cmdline("vio.workload=blk-verify vio.ops=2000 vio.qd=4")
        .disk(&disk)
        .flag("--cpus", "boot=2")
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(u(&out.result(), "mismatches"), 0);
}

#[test]
fn readonly_disk_fails_writes_only() {
    if !kvm_available("readonly_disk_fails_writes_only") {
        return;
    }
    let disk = TmpDisk::new("ro", 8 << 20);
    let out = VmBuilder::new("ro")
        .memory("size=128M")
        .cmdline("vio.workload=blk-verify vio.ops=1000 vio.qd=1 vio.write_pct=50")
        .flag("--disk", &format!("{},readonly=on", disk.arg()))
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    // Every write fails with IOERR (plus the final flush is fine); reads succeed.
    assert_eq!(u(&r, "io_errors"), u(&r, "writes"), "{r}");
    assert_eq!(u(&r, "mismatches"), 0);
}

/// The POST-code port timestamps the guest's first CPL3 instruction.
#[test]
fn boot_progress_is_logged() {
    if !kvm_available("boot_progress_is_logged") {
        return;
    }
    let out = VmBuilder::new("progress")
        .memory("size=64M")
        .cmdline("vio.workload=mem-verify vio.mem_mb=1 vio.rounds=1")
        .verbose()
        .run(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("Guest boot progress: code 0x40"),
        "{}",
        out.describe()
    );
}
