//! Live upgrade on KVM (`vm.send-migration` with `local`, `vm.receive-migration`): a running VM
//! moves to a new VMM process with its passthrough device attached and working, guest RAM
//! handed over (not copied), the device's connection kept.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(240);
const RAM: u64 = 512 << 20;

/// One test at a time: each runs two or three 512 MiB VMs and a device on two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn info(vm: &Vm) -> Value {
    let (s, b) = vm.api("GET", "vm.vio-info", "");
    assert_eq!(s, 200, "{b}");
    serde_json::from_str::<Value>(&b).unwrap()[0].clone()
}

fn counters(vm: &Vm) -> Value {
    let (s, b) = vm.api("GET", "vm.counters", "");
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

fn assert_clean(res: &Value, device: &Value, what: &str) {
    assert_eq!(u(res, "mismatches"), 0, "{what}: {res}");
    assert_eq!(u(res, "io_errors"), 0, "{what}: {res}");
    assert!(u(res, "ops") > 0, "{what}: {res}");
    assert_eq!(device["iopf"].as_u64(), Some(0), "{what}: {device}");
    assert_eq!(device["failed"].as_u64(), Some(0), "{what}: {device}");
}

/// blk-verify for `secs` seconds of guest time at QD 16 over `pool` data pages spread across
/// guest RAM.
fn workload(secs: u64, pool: u64) -> String {
    format!(
        "vio.workload=blk-verify vio.ops=1000000000 vio.qd=16 vio.pool_pages={pool} vio.seed=11 \
         vio.phases=0:{secs}s vio.stall_s=5"
    )
}

/// A VM with vdpu passed through as `flag` (plus `extra` options) running `cmdline`, once its
/// guest drives the device; the disk and the device live as long as the returned values.
fn busy_vm(
    name: &str,
    memory: &str,
    flag: &str,
    extra: &str,
    cmdline: &str,
) -> (TmpDisk, Vdpu, Vm) {
    let disk = TmpDisk::new(name, 64 << 20);
    let vdpu = Vdpu::start(name, &disk);
    let mut vm = VmBuilder::new(&format!("{name}-a"))
        .memory(memory)
        .cmdline(cmdline)
        .device(flag, &vdpu, extra)
        .api_socket()
        .verbose()
        .spawn();
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("the guest drives the device");
    (disk, vdpu, vm)
}

/// The paper's path into VIO: a VM booted as plain passthrough by a VMM without VIO is live
/// upgraded into a VIO VMM (the device kept attached and busy), switched to snoop, and then
/// its memory is reclaimed under churn: every byte verifies, the device never faults.
#[test]
fn legacy_passthrough_vm_enters_vio_by_live_upgrade() {
    if !kvm_available("legacy_passthrough_vm_enters_vio_by_live_upgrade") {
        return;
    }
    let _one = one_at_a_time();
    // 256 MiB of data buffers: half of guest RAM is resident before reclaim starts.
    let (_disk, _vdpu, mut a) = busy_vm(
        "up-legacy",
        "size=512M,shared=on",
        "--user-device",
        "",
        &workload(14, 65536),
    );
    a.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("the guest drives the device");
    let before = memfd_allocated(a.pid()).unwrap();
    assert!(before > RAM / 4, "resident before: {before}");
    let mut b = receiver("up-legacy-b");
    let report = upgrade_ok(a, &b, "legacy");
    assert!(u(&report, "downtime_us") > 0, "{report}");

    let i = info(&b);
    assert_eq!(
        i["mode"], "passthrough",
        "held under VIO, passed through: {i}"
    );
    let (s, body) = b.api(
        "PUT",
        "vm.vio-mode",
        &json!({"id": "dpu0", "mode": "snoop"}).to_string(),
    );
    assert_eq!(s, 200, "{body}");
    let (s, cfg) = b.api("GET", "vm.info", "");
    assert_eq!(s, 200);
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(
        cfg["config"]["user_devices"][0]["vio"]["mode"], "passthrough",
        "the received configuration holds the device under VIO: {cfg}"
    );
    let churn = Churn::start(b.api_path(), b.pid(), RAM / 2, false);
    b.wait_line("VIO-GUEST-RESULT", TIMEOUT)
        .expect("the workload finishes in the new VMM");
    let passes = churn.finish();
    let out = b.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let device = logged_counters(&out.stderr, "dpu0");
    assert_clean(&out.result(), &device, "after the upgrade");
    let reclaimed: u64 = passes.iter().map(|p| p.0).sum();
    assert!(reclaimed > RAM / 4, "{passes:?}");
    let least = passes.iter().map(|p| p.1).min().unwrap();
    assert!(
        least < RAM / 4,
        "the new VMM's memfd fell below a quarter of RAM: {passes:?}"
    );
    assert!(device["faultins"].as_u64().unwrap() > 0, "{device}");
}

/// A VM whose device is already snooped, with reclaim churning, upgraded twice in a row (A to
/// B to C): reclaimed pages stay reclaimed across each upgrade and come back from the same
/// store; requests in flight at each upgrade complete.
#[test]
fn snooped_vm_upgrades_twice_under_churn() {
    if !kvm_available("snooped_vm_upgrades_twice_under_churn") {
        return;
    }
    let _one = one_at_a_time();
    let (_disk, _vdpu, a) = busy_vm(
        "up-twice",
        "size=512M,shared=on,reclaim=on",
        "--vio",
        ",mode=snoop",
        &workload(16, 16384),
    );
    let churn = Churn::start(a.api_path(), a.pid(), RAM / 2, false);
    std::thread::sleep(Duration::from_secs(2));
    let passes_a = churn.finish();
    let reclaimed_a = u(&counters(&a)["memory"], "reclaimed_bytes");
    assert!(reclaimed_a > 0, "{passes_a:?}");

    let b = receiver("up-twice-b");
    upgrade_ok(a, &b, "twice-ab");
    let m = counters(&b)["memory"].clone();
    assert!(
        u(&m, "reclaimed_bytes") > 0,
        "pages reclaimed before the upgrade are still reclaimed: {m}"
    );
    assert_eq!(info(&b)["mode"], "snoop");
    let churn = Churn::start(b.api_path(), b.pid(), RAM / 2, false);
    std::thread::sleep(Duration::from_secs(2));
    churn.finish();

    let mut c = receiver("up-twice-c");
    upgrade_ok(b, &c, "twice-bc");
    let churn = Churn::start(c.api_path(), c.pid(), RAM / 2, false);
    c.wait_line("VIO-GUEST-RESULT", TIMEOUT)
        .expect("the workload finishes in the third VMM");
    let passes = churn.finish();
    let out = c.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let device = logged_counters(&out.stderr, "dpu0");
    assert_clean(&out.result(), &device, "after two upgrades");
    let memory = logged_counters(&out.stderr, "memory");
    assert!(
        u(&memory, "cpu_refaults") + u(&memory, "dma_faultins") > 0,
        "pages came back from the store: {memory}"
    );
    let least = passes.iter().map(|p| p.1).min().unwrap();
    assert!(least < RAM / 4, "{passes:?}");
}

/// A paused VM with two vCPUs and a VMM-emulated virtio-blk disk: the transport's registers,
/// the queues and where the device was in each move; the VM arrives paused and does nothing
/// until resumed; the workload then goes on against the same image, whose file has been moved
/// away meanwhile (the descriptor moves, nothing is reopened by path).
#[test]
fn emulated_disk_vm_upgrades() {
    if !kvm_available("emulated_disk_vm_upgrades") {
        return;
    }
    let _one = one_at_a_time();
    let disk = TmpDisk::new("up-disk", 64 << 20);
    let mut a = VmBuilder::new("up-disk-a")
        .memory("size=512M,shared=on")
        .cmdline(&workload(8, 4096))
        .disk(&disk)
        .flag("--cpus", "boot=2")
        .api_socket()
        .verbose()
        .spawn();
    a.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("the guest drives the disk");
    assert_eq!(a.api("PUT", "vm.pause", "").0, 204);
    let moved = disk.path.with_extension("moved");
    std::fs::rename(&disk.path, &moved).unwrap();
    let mut b = receiver("up-disk-b");
    upgrade_ok(a, &b, "disk");
    let (_, state) = b.api("GET", "vm.info", "");
    assert!(state.contains("\"Paused\""), "arrives paused: {state}");
    let requests = |vm: &Vm| u(&counters(vm)["_disk0"], "queue0_requests");
    let before = requests(&b);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(requests(&b), before, "nothing runs while paused");
    assert_eq!(b.api("PUT", "vm.resume", "").0, 204);
    b.wait_line("VIO-GUEST-RESULT", TIMEOUT)
        .expect("the workload finishes in the new VMM");
    let out = b.finish(TIMEOUT);
    std::fs::rename(&moved, &disk.path).unwrap();
    assert!(out.status.success(), "{}", out.describe());
    let res = out.result();
    assert_eq!(u(&res, "mismatches"), 0, "{res}");
    assert_eq!(u(&res, "io_errors"), 0, "{res}");
    let disk0 = logged_counters(&out.stderr, "_disk0");
    assert!(
        u(&disk0, "queue0_requests") > 0,
        "the new VMM's disk served requests: {disk0}"
    );
}

/// A running VM with a VMM-emulated virtio-net device, mid-echo: the TAP's descriptor moves
/// (the interface, its namespace and its queued frames stay), the new VMM's device serves the
/// rest of the echoes, and not one frame is lost or corrupted on the way.
#[test]
fn emulated_net_vm_upgrades() {
    if !kvm_available("emulated_net_vm_upgrades") {
        return;
    }
    let _one = one_at_a_time();
    let ops = 100_000;
    let mut a = VmBuilder::new("up-net-a")
        .netns()
        .memory("size=512M,shared=on")
        .cmdline(&format!("vio.workload=net-echo vio.ops={ops} vio.len=100"))
        .flag("--net", "tap=vionet0,id=net0")
        .api_socket()
        .verbose()
        .spawn();
    let peer = net::NetPeer::attach(a.pid(), "vionet0");
    a.wait_line("VIO-GUEST-INFO", Duration::from_secs(60))
        .expect("the guest reaches the peer");
    std::thread::sleep(Duration::from_millis(300));
    let b = receiver("up-net-b");
    upgrade_ok(a, &b, "net");
    let out = b.finish(TIMEOUT);
    let peer = peer.finish();
    assert!(out.status.success(), "{}", out.describe());
    let res = out.result();
    assert_eq!(u(&res, "ops"), ops, "{res}");
    assert_eq!(u(&res, "lost"), 0, "{res}");
    assert_eq!(u(&res, "mismatches"), 0, "{res}");
    assert_eq!(u(&peer, "echoes"), ops, "{peer}");
    let net0 = logged_counters(&out.stderr, "net0");
    assert!(
        u(&net0, "rx_frames") > 0 && u(&net0, "rx_frames") < ops,
        "the new VMM's device served the rest: {net0}"
    );
}

/// The receiver dies while it rebuilds the VM: the sender keeps the VM, which runs on and
/// finishes its workload with every byte verified.
#[test]
fn receiver_killed_midway_leaves_the_vm_running() {
    if !kvm_available("receiver_killed_midway_leaves_the_vm_running") {
        return;
    }
    let _one = one_at_a_time();
    let (_disk, _vdpu, mut a) = busy_vm(
        "up-kill",
        "size=512M,shared=on,reclaim=on",
        "--user-device",
        "",
        &workload(8, 4096),
    );
    let sock = std::env::temp_dir().join(format!("vio-test-{}-up-kill-b.sock", std::process::id()));
    let mut b = std::process::Command::new(VMM)
        .args(["--api-socket", sock.to_str().unwrap()])
        .env("VIO_TEST_RECEIVE_STALL_MS", "60000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "receiver API never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mig = migration_socket("kill");
    let _ = std::fs::remove_file(&mig);
    let url = format!("unix:{}", mig.display());
    let recv_sock = sock.clone();
    let recv_body = json!({ "receiver_url": url }).to_string();
    std::thread::spawn(move || api(&recv_sock, "PUT", "vm.receive-migration", &recv_body));
    wait_listening(&mig);
    let killer = std::thread::spawn(move || {
        // The receiver has the state (it stalls before rebuilding): kill it then.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = b.kill();
        let _ = b.wait();
    });
    let t0 = Instant::now();
    let (s, body) = a.api(
        "PUT",
        "vm.send-migration",
        &json!({ "destination_url": url, "local": true }).to_string(),
    );
    killer.join().unwrap();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(s, 500, "the send fails: {body}");
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "it failed late"
    );
    let (s, state) = a.api("GET", "vm.info", "");
    assert_eq!(s, 200);
    assert!(state.contains("\"Running\""), "{state}");
    a.wait_line("VIO-GUEST-RESULT", TIMEOUT)
        .expect("the workload finishes in the old VMM");
    let out = a.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let device = logged_counters(&out.stderr, "dpu0");
    assert_clean(&out.result(), &device, "after a failed upgrade");
}

/// Writes one frame of the migration channel (docs/vio.md, "Live upgrade").
fn frame(s: &mut UnixStream, v: &Value) {
    let body = v.to_string();
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(b"VIOM");
    h[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    s.write_all(&h).unwrap();
    s.write_all(body.as_bytes()).unwrap();
}

fn read_frame(s: &mut UnixStream) -> Value {
    let mut h = [0u8; 24];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..4], b"VIOM");
    let n = u64::from_le_bytes(h[8..16].try_into().unwrap()) as usize;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The format is versioned: a receiver refuses a sender of another version with a clear error,
/// and a sender refused by its receiver keeps its VM.
#[test]
fn an_unknown_migration_version_is_refused_both_ways() {
    if !kvm_available("an_unknown_migration_version_is_refused_both_ways") {
        return;
    }
    let _one = one_at_a_time();
    // A receiver, and a sender from the future.
    let b = receiver("up-version-b");
    let mig = migration_socket("version-b");
    let _ = std::fs::remove_file(&mig);
    let url = format!("unix:{}", mig.display());
    let b_api = b.api_path().to_path_buf();
    let body = json!({ "receiver_url": url }).to_string();
    let recv = std::thread::spawn(move || api(&b_api, "PUT", "vm.receive-migration", &body));
    wait_listening(&mig);
    let mut s = UnixStream::connect(&mig).unwrap();
    frame(
        &mut s,
        &json!({"type": "hello", "version": 99, "build": "future"}),
    );
    let reply = read_frame(&mut s);
    assert_eq!(reply["type"], "refuse", "{reply}");
    assert!(
        reply["reason"].as_str().unwrap().contains("version 99"),
        "{reply}"
    );
    let (status, text) = recv.join().unwrap();
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("version 99 is not supported"), "{text}");
    let (status, _) = b.api("GET", "vmm.ping", "");
    assert_eq!(status, 200, "the receiver is still up");

    // A sender, and a receiver that refuses it.
    let a = VmBuilder::new("up-version-a")
        .memory("size=256M,shared=on")
        .cmdline("vio.workload=mem-verify vio.mem_mb=16 vio.rounds=30 vio.idle_ms=200")
        .api_socket()
        .spawn();
    a.wait_api(Duration::from_secs(10));
    let mig = migration_socket("version-a");
    let _ = std::fs::remove_file(&mig);
    let listener = UnixListener::bind(&mig).unwrap();
    let refuser = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let hello = read_frame(&mut s);
        frame(
            &mut s,
            &json!({"type": "refuse", "reason": "this receiver is picky"}),
        );
        hello
    });
    let (status, text) = a.api(
        "PUT",
        "vm.send-migration",
        &json!({ "destination_url": format!("unix:{}", mig.display()), "local": true }).to_string(),
    );
    let hello = refuser.join().unwrap();
    let _ = std::fs::remove_file(&mig);
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["version"], 1);
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("this receiver is picky"), "{text}");
    // Not local, not unix: refused before anything happens.
    let (status, text) = a.api(
        "PUT",
        "vm.send-migration",
        &json!({ "destination_url": "tcp:127.0.0.1:6000", "local": true }).to_string(),
    );
    assert_eq!(status, 400, "{text}");
    let (status, text) = a.api(
        "PUT",
        "vm.send-migration",
        &json!({ "destination_url": "unix:/nowhere", "local": false }).to_string(),
    );
    assert_eq!(status, 400, "{text}");
    let out = a.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(u(&out.result(), "mismatches"), 0);

    // Private guest RAM cannot be handed over: refused up front.
    let p = VmBuilder::new("up-private")
        .memory("size=128M")
        .cmdline("vio.workload=mem-verify vio.mem_mb=16 vio.rounds=10 vio.idle_ms=200")
        .api_socket()
        .spawn();
    p.wait_api(Duration::from_secs(10));
    let (status, text) = p.api(
        "PUT",
        "vm.send-migration",
        &json!({ "destination_url": "unix:/nowhere", "local": true }).to_string(),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("shared guest RAM"), "{text}");
    let out = p.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
}
