//! seccomp (`--seccomp true|false|log`), end to end on KVM: every thread of the VMM and of
//! vdpu runs filtered while a VM does real work, and a forbidden call is caught.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);
const PROBE_ENV: &str = "VIO_TEST_SECCOMP_PROBE";

/// Each thread of `pid`: name -> (seccomp mode, number of filters), from /proc.
fn threads(pid: u32) -> BTreeMap<String, (u32, u32)> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from {status}"))
        };
        out.insert(
            comm.trim().to_string(),
            (field("Seccomp:"), field("Seccomp_filters:")),
        );
    }
    out
}

/// A VM with every kind of VMM thread but an emulated device's: two vCPUs, a vdpu under VIO
/// (snoop and monitor threads), reclaim (fault and policy threads), the API.
fn busy_vm(name: &str, seccomp: &str) -> (Vm, Vdpu, TmpDisk) {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let vm = VmBuilder::new(name)
        .memory("size=256M,shared=on,reclaim=on")
        .flag("--cpus", "boot=2")
        .cmdline("vio.workload=blk-verify vio.ops=30000 vio.qd=8")
        .device("--vio", &vdpu, "")
        .reclaim("interval_ms=50,target_pct=50")
        .flag("--seccomp", seccomp)
        .api_socket()
        .verbose()
        .spawn();
    (wait_for_guest(vm), vdpu, disk)
}

fn wait_for_guest(mut vm: Vm) -> Vm {
    if vm
        .wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .is_none()
    {
        panic!("the guest does not run: {}", vm.finish(TIMEOUT).describe());
    }
    vm
}

/// Every thread of `pid` is filtered, each under its creator's filter and its own.
fn all_confined(pid: u32, main: &str) -> BTreeMap<String, (u32, u32)> {
    let t = threads(pid);
    for (name, &(mode, filters)) in &t {
        assert_eq!(mode, 2, "{name} is not filtered: {t:?}");
        let want = if name == main { 1 } else { 2 };
        assert!(filters >= want, "{name} has {filters} filters: {t:?}");
    }
    t
}

fn finished_clean(vm: Vm) {
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    assert!(!out.stderr.contains("forbidden"), "{}", out.describe());
}

#[test]
fn every_thread_is_confined_and_the_vm_does_its_work() {
    if !kvm_available("every_thread_is_confined_and_the_vm_does_its_work") {
        return;
    }
    let (vm, vdpu, _disk) = busy_vm("seccomp-on", "true");
    let t = all_confined(vm.pid(), "vio-hypervisor");
    for want in [
        "vcpu0",
        "vcpu1",
        "dpu0-snoop",
        "dpu0-monitor",
        "uffd",
        "reclaim",
        "http-server",
        "api-forward",
    ] {
        assert!(t.contains_key(want), "no {want} thread: {t:?}");
    }
    let d = all_confined(vdpu.child.id(), "vdpu");
    assert!(d.contains_key("signals"), "{d:?}");
    finished_clean(vm);
    assert!(!vdpu.log().contains("forbidden"), "{}", vdpu.log());

    // An emulated disk's worker, created by the vCPU that activated it.
    let local = TmpDisk::new("seccomp-local", 16 << 20);
    let vm = wait_for_guest(
        VmBuilder::new("seccomp-local")
            .cmdline("vio.workload=blk-verify vio.ops=100000000 vio.qd=8")
            .disk(&local)
            .api_socket()
            .spawn(),
    );
    let t = all_confined(vm.pid(), "vio-hypervisor");
    assert!(t.contains_key("virtio-blk"), "{t:?}");
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(!out.stderr.contains("forbidden"), "{}", out.describe());
}

#[test]
fn seccomp_false_loads_no_filter() {
    if !kvm_available("seccomp_false_loads_no_filter") {
        return;
    }
    let (vm, vdpu, _disk) = busy_vm("seccomp-off", "false");
    let t = threads(vm.pid());
    assert!(t.values().all(|&(mode, _)| mode == 0), "{t:?}");
    // vdpu was started with its default, true.
    all_confined(vdpu.child.id(), "vdpu");
    finished_clean(vm);
}

/// A VMM waiting for `vm.create`, with the test-only probe endpoint.
fn probe_vmm(name: &str, seccomp: &str) -> Vm {
    let vm = VmBuilder::new(name)
        .no_payload()
        .flag("--seccomp", seccomp)
        .env(PROBE_ENV, "1")
        .spawn();
    vm.wait_api(Duration::from_secs(10));
    vm
}

#[test]
fn a_forbidden_call_ends_the_vmm() {
    if !kvm_available("a_forbidden_call_ends_the_vmm") {
        return;
    }
    let vm = probe_vmm("seccomp-trap", "true");
    let (status, _) = vm.api("PUT", "vmm.seccomp-probe", "");
    assert_eq!(status, 0, "the probe was answered");
    let out = vm.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(128 + 31), "{}", out.describe());
    assert!(
        out.stderr
            .contains("seccomp: thread 'http-conn' made a forbidden system call (41)"),
        "{}",
        out.describe()
    );
}

#[test]
fn log_and_false_let_a_forbidden_call_through() {
    if !kvm_available("log_and_false_let_a_forbidden_call_through") {
        return;
    }
    for mode in ["log", "false"] {
        let vm = probe_vmm(&format!("seccomp-{mode}"), mode);
        assert_eq!(vm.api("PUT", "vmm.seccomp-probe", "").0, 204, "{mode}");
        assert_eq!(vm.api("GET", "vmm.ping", "").0, 200, "{mode}");
        assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204, "{mode}");
        let out = vm.finish(Duration::from_secs(10));
        assert!(out.status.success(), "{mode}: {}", out.describe());
        assert!(
            out.stderr.contains("an IPv4 socket was opened"),
            "{mode}: {}",
            out.describe()
        );
    }
}

#[test]
fn the_probe_is_test_only() {
    if !kvm_available("the_probe_is_test_only") {
        return;
    }
    let vm = VmBuilder::new("seccomp-noprobe").no_payload().spawn();
    vm.wait_api(Duration::from_secs(10));
    assert_eq!(vm.api("PUT", "vmm.seccomp-probe", "").0, 404);
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    let out = vm.finish(Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.describe());
}
