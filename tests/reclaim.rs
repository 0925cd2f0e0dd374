//! Guest memory reclaim, end to end on KVM: pages leave the host, and come back on access.

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(180);

/// mem-verify over 75% of RAM while the policy reclaimer runs and vm.reclaim is called every
/// 100 ms: every page verifies, pages really come back through faults, and the host gets the
/// memory back while the guest idles.
#[test]
fn mem_verify_under_reclaim() {
    if !kvm_available("mem_verify_under_reclaim") {
        return;
    }
    let mut vm = VmBuilder::new("reclaim-mem")
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline("vio.workload=mem-verify vio.mem_mb=384 vio.rounds=2 vio.idle_ms=2500")
        .reclaim("interval_ms=200,idle_ms=300,target_pct=70")
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-BOOT", Duration::from_secs(60))
        .expect("guest boots");
    let pid = vm_pid(&vm);
    let mut low = u64::MAX;
    let mut reclaimed = 0u64;
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed() < TIMEOUT {
        let (status, body) = vm.api("PUT", "vm.reclaim", r#"{"bytes": 67108864}"#);
        if status == 0 {
            break; // the VMM exited
        }
        if status == 200 {
            calls += 1;
            reclaimed += serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["reclaimed_bytes"].as_u64())
                .unwrap_or(0);
        }
        if let Some(a) = memfd_allocated(pid) {
            low = low.min(a);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "ops"), 2 * 384 * 256);
    assert!(calls > 10, "vm.reclaim was called {calls} times");
    let m = logged_counters(&out.stderr, "memory");
    assert!(m["cpu_refaults"].as_u64().unwrap() > 0, "{m}");
    // The guest keeps 384 MiB of data alive (every page verified); the host held at least 60%
    // of guest RAM less than that while the guest idled.
    let working_set: u64 = 384 << 20;
    assert!(
        low + (512 << 20) * 6 / 10 <= working_set,
        "memfd allocation never fell below {low} bytes"
    );
    assert!(
        reclaimed >= working_set,
        "reclaimed {reclaimed} bytes in all"
    );
}

fn vm_pid(vm: &Vm) -> u32 {
    vm.pid()
}

/// blk-verify on the VMM-emulated disk under reclaim churn: the device thread's accesses to
/// reclaimed pages fault them back in correctly.
#[test]
fn blk_verify_emulated_under_reclaim() {
    if !kvm_available("blk_verify_emulated_under_reclaim") {
        return;
    }
    let disk = TmpDisk::new("reclaim-blk", 64 << 20);
    let mut vm = VmBuilder::new("reclaim-blk")
        .memory("size=512M,shared=on,reclaim=on")
        .cmdline("vio.workload=blk-verify vio.ops=200000 vio.qd=16 vio.pool_pages=8192 vio.rate=60000 vio.seed=8")
        .disk(&disk)
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-BOOT", Duration::from_secs(60))
        .expect("guest boots");
    let mut reclaimed = 0u64;
    loop {
        let (status, body) = vm.api("PUT", "vm.reclaim", r#"{"bytes": 268435456}"#);
        if status == 0 {
            break;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&body) {
            reclaimed += v["reclaimed_bytes"].as_u64().unwrap_or(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "ops"), 200_000);
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    assert_eq!(u(&r, "io_errors"), 0, "{r}");
    assert!(reclaimed > 64 << 20, "reclaimed only {reclaimed}");
    let m = logged_counters(&out.stderr, "memory");
    assert!(m["cpu_refaults"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn reclaim_requires_shared_memory_and_enablement() {
    let out = std::process::Command::new(VMM)
        .args(["--kernel", VMM, "--memory", "size=64M,reclaim=on"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs shared=on"));
    if !kvm_available("reclaim_requires_shared_memory_and_enablement") {
        return;
    }
    let mut vm = VmBuilder::new("reclaim-off")
        .memory("size=128M,shared=on")
        .cmdline("vio.workload=mem-verify vio.mem_mb=8 vio.rounds=1000 vio.idle_ms=10")
        .api_socket()
        .spawn();
    vm.wait_line("VIO-GUEST-BOOT", Duration::from_secs(30))
        .unwrap();
    let (status, body) = vm.api("PUT", "vm.reclaim", r#"{"bytes": 4096}"#);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("not enabled"), "{body}");
    assert_eq!(vm.api("PUT", "vm.reclaim", r#"{"byte": 1}"#).0, 400);
    let (status, body) = vm.api(
        "PUT",
        "vm.reclaim",
        r#"{"bytes": 4096, "dma_only": true, "unsafe_unmap_dma": true}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("exclude each other"), "{body}");
    assert_eq!(vm.api("PUT", "vmm.shutdown", "").0, 204);
    let _ = vm.finish(TIMEOUT);
}

/// A VM created through the API (`vm.create` JSON) with a reclaim policy: the policy is the one
/// the JSON asked for (`vm.info` reports it) and it acts on its own, with no `vm.reclaim` call,
/// up to its target and no further (30% of RAM, where the default would take 50%).
#[test]
fn reclaim_policy_set_through_the_api_acts() {
    if !kvm_available("reclaim_policy_set_through_the_api_acts") {
        return;
    }
    const RAM: u64 = 256 << 20;
    let mut vm = VmBuilder::new("reclaim-api").no_payload().verbose().spawn();
    vm.wait_api(Duration::from_secs(10));
    let config = serde_json::json!({
        "payload": {
            "kernel": guest_elf(),
            "cmdline": "vio.workload=mem-verify vio.mem_mb=160 vio.rounds=1 vio.idle_ms=8000",
        },
        "memory": {"size": RAM, "shared": true, "reclaim": true},
        "reclaim": {"interval_ms": 100, "idle_ms": 200, "target_pct": 30},
        "serial": {"mode": "Tty"},
    });
    let (status, body) = vm.api("PUT", "vm.create", &config.to_string());
    assert_eq!(status, 204, "{body}");
    let (status, body) = vm.api("GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["config"]["reclaim"]["target_pct"], 30, "{info}");
    assert_eq!(vm.api("PUT", "vm.boot", "").0, 204);
    vm.wait_line("VIO-GUEST-BOOT", Duration::from_secs(60))
        .expect("guest boots");
    let mut most = 0;
    loop {
        let (status, body) = vm.api("GET", "vm.counters", "");
        if status != 200 {
            break; // the guest powered off
        }
        let c: Value = serde_json::from_str(&body).unwrap();
        most = most.max(c["memory"]["reclaimed_bytes"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "mismatches"), 0, "{r}");
    // The policy works in whole pages.
    let target = (RAM * 30 / 100).next_multiple_of(4096);
    assert!(
        most >= 60 << 20,
        "the policy reclaimed at most {most} bytes of the idle 160 MiB"
    );
    assert!(
        most <= target,
        "{most} bytes reclaimed: past the 30% target ({target})"
    );
    let m = logged_counters(&out.stderr, "memory");
    assert_eq!(m["reclaim_runs"].as_u64().map(|n| n > 0), Some(true), "{m}");
}
