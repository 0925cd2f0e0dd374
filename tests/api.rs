//! The REST API and ch-remote, end to end on KVM.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CH_REMOTE: &str = env!("CARGO_BIN_EXE_ch-remote");

fn ch_remote(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(CH_REMOTE)
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn ok_json(sock: &Path, args: &[&str]) -> Value {
    let (ok, out, err) = ch_remote(sock, args);
    assert!(ok, "ch-remote {args:?} failed: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|_| panic!("ch-remote {args:?} printed non-JSON: {out}"))
}

fn ok(sock: &Path, args: &[&str]) {
    let (ok, _, err) = ch_remote(sock, args);
    assert!(ok, "ch-remote {args:?} failed: {err}");
}

fn state(sock: &Path) -> String {
    ok_json(sock, &["info"])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A VMM with only an API socket, waiting for `vm.create`.
fn start_vmm(name: &str) -> (Vm, PathBuf) {
    let vm = VmBuilder::new(&format!("api-{name}"))
        .no_payload()
        .verbose()
        .spawn();
    vm.wait_api(Duration::from_secs(10));
    let sock = vm.api_path().to_path_buf();
    (vm, sock)
}

fn write_config(dir: &Path, disk: &TmpDisk, cmdline: &str) -> PathBuf {
    let cfg = serde_json::json!({
        "payload": {"kernel": guest_elf(), "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20, "shared": true},
        "disks": [{"path": disk.path, "id": "disk0"}],
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    let p = dir.join(format!(
        "vio-api-{}-{}.json",
        std::process::id(),
        disk.path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

fn disk_ops(sock: &Path) -> u64 {
    let c = ok_json(sock, &["counters"]);
    c["disk0"]["read_ops"].as_u64().unwrap() + c["disk0"]["write_ops"].as_u64().unwrap()
}

/// Lifecycle through ch-remote: create, boot, pause, resume, shutdown, boot again, delete,
/// shutdown-vmm.
#[test]
fn lifecycle_through_ch_remote() {
    if !kvm_available("lifecycle_through_ch_remote") {
        return;
    }
    let disk = TmpDisk::new("api-life", 64 << 20);
    let cfg = write_config(
        &std::env::temp_dir(),
        &disk,
        "vio.workload=blk-verify vio.ops=100000000 vio.qd=16",
    );
    let (mut vm, sock) = start_vmm("lifecycle");
    // Only the owner can connect (docs/api.md).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    let ping = ok_json(&sock, &["ping"]);
    assert_eq!(ping["pid"].as_u64(), Some(u64::from(vm.pid())));
    assert!(
        ping["version"].is_string()
            && ping["build_version"].is_string()
            && ping["features"].is_array()
    );
    let (okay, _, err) = ch_remote(&sock, &["info"]);
    assert!(!okay && err.contains("409"), "info before create: {err}");

    ok(&sock, &["create", cfg.to_str().unwrap()]);
    assert_eq!(state(&sock), "Created");
    let info = ok_json(&sock, &["info"]);
    assert_eq!(info["config"]["memory"]["size"].as_u64(), Some(256 << 20));
    assert_eq!(info["memory_actual_size"].as_u64(), Some(256 << 20));
    ok(&sock, &["boot"]);
    assert_eq!(state(&sock), "Running");
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest runs");
    assert!(disk_ops(&sock) > 0, "counters move while running");

    ok(&sock, &["pause"]);
    assert_eq!(state(&sock), "Paused");
    let before = disk_ops(&sock);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        disk_ops(&sock),
        before,
        "counters do not advance while paused"
    );
    let (okay, _, err) = ch_remote(&sock, &["pause"]);
    assert!(!okay && err.contains("409"), "pause while paused: {err}");
    ok(&sock, &["resume"]);
    assert_eq!(state(&sock), "Running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while disk_ops(&sock) == before {
        assert!(
            Instant::now() < deadline,
            "counters never moved after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    ok(&sock, &["shutdown"]);
    assert_eq!(state(&sock), "Shutdown");
    ok(&sock, &["boot"]);
    assert_eq!(state(&sock), "Running");
    ok(&sock, &["reboot"]);
    assert_eq!(state(&sock), "Running");
    ok(&sock, &["shutdown"]);
    ok(&sock, &["delete"]);
    let (okay, _, _) = ch_remote(&sock, &["info"]);
    assert!(!okay, "info after delete");
    ok(&sock, &["shutdown-vmm"]);
    let out = vm.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
    let _ = std::fs::remove_file(&cfg);
}

/// A pause while requests are in flight shows up in the guest's latency, and the run still
/// verifies every block. The guest's power-off ends the VMM, as in Cloud Hypervisor.
#[test]
fn pause_gap_is_visible_to_the_guest() {
    if !kvm_available("pause_gap_is_visible_to_the_guest") {
        return;
    }
    let disk = TmpDisk::new("api-gap", 64 << 20);
    let cfg = write_config(
        &std::env::temp_dir(),
        &disk,
        // Paced to last ~7 s however fast the machine is, so the pause lands mid-run even when
        // the test thread is slow to see the first progress line (a loaded CI box).
        "vio.workload=blk-verify vio.ops=1500000 vio.rate=200000 vio.qd=16 vio.seed=5",
    );
    let (mut vm, sock) = start_vmm("gap");
    ok(&sock, &["create", cfg.to_str().unwrap()]);
    ok(&sock, &["boot"]);
    vm.wait_line("VIO-GUEST-PROGRESS", Duration::from_secs(60))
        .expect("guest runs");
    ok(&sock, &["pause"]);
    std::thread::sleep(Duration::from_secs(1));
    ok(&sock, &["resume"]);
    let out = vm.finish(Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.describe());
    let r = out.result();
    assert_eq!(u(&r, "ops"), 1_500_000);
    assert_eq!(u(&r, "mismatches"), 0);
    assert_eq!(u(&r, "io_errors"), 0);
    assert!(
        // 0.8: the guest's TSC is calibrated against the PM timer, a few % off on a loaded host.
        u(&r, "lat_max_ns") >= 800_000_000,
        "the 1 s pause is not in the latency: {r}"
    );
    let _ = std::fs::remove_file(&cfg);
}

/// Raw HTTP exchange; returns (status, body).
/// Sends `raw` and reads the response the way Cloud Hypervisor's own ch-remote does: the status
/// code is everything between `HTTP/1.1 ` and the line's end, trimmed; the body is what
/// `Content-Length: ` (exactly so spelt) announces. A response that client could not parse is
/// status 0, so every request a test makes here checks the wire format too.
fn http(sock: &Path, raw: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    ch_remote_parse(&text).unwrap_or((0, text))
}

fn ch_remote_parse(res: &str) -> Option<(u16, String)> {
    let o = res.find("HTTP/1.1")?;
    let status = res[o + "HTTP/1.1 ".len()..o + res[o..].find('\r')?]
        .trim()
        .parse()
        .ok()?;
    let (head, body) = res.split_once("\r\n\r\n")?;
    let len: usize = match head.find("Content-Length: ") {
        Some(h) => head[h + 16..].split('\r').next()?.parse().ok()?,
        None => 0,
    };
    (body.len() == len).then(|| (status, body.to_string()))
}

fn req(method: &str, endpoint: &str, body: &str) -> Vec<u8> {
    format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

#[test]
fn every_error_class_and_the_server_keeps_serving() {
    if !kvm_available("every_error_class_and_the_server_keeps_serving") {
        return;
    }
    let (vm, sock) = start_vmm("errors");
    let kernel = guest_elf();
    let k = kernel.display();

    // A client that connects and sends nothing must not block anyone.
    let stuck = UnixStream::connect(&sock).unwrap();
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();

    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            req("PUT", "vm.create", "{not json"),
            400,
            "Invalid VM configuration",
        ),
        (
            req(
                "PUT",
                "vm.create",
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"wheels":4}}"#),
            ),
            400,
            "unknown field `wheels`",
        ),
        (
            req(
                "PUT",
                "vm.create",
                &format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":12}}}}"#),
            ),
            400,
            "memory.size",
        ),
        (
            req(
                "PUT",
                "vm.create",
                r#"{"payload":{"kernel":"/nonexistent"}}"#,
            ),
            400,
            "does not exist",
        ),
        (req("PUT", "vm.create", ""), 400, "needs a VmConfig"),
        (req("PUT", "vm.boot", ""), 409, "No VM is created"),
        (req("PUT", "vm.pause", ""), 409, "not running"),
        (req("PUT", "vm.resume", ""), 409, "not paused"),
        (req("GET", "vm.counters", ""), 409, "not booted"),
        (req("GET", "vm.explode", ""), 404, "Unknown endpoint"),
        (
            b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            404,
            "Unknown endpoint",
        ),
        (req("GET", "vm.boot", ""), 405, "not allowed"),
        (req("DELETE", "vm.info", ""), 405, "not allowed"),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
            "exceeds",
        ),
        (b"garbage\r\n\r\n".to_vec(), 400, "Malformed request line"),
        (
            b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n".to_vec(),
            400,
            "version",
        ),
        (
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
            "Content-Length",
        ),
        (
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            400,
            "Transfer-Encoding",
        ),
        (
            [
                b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: ".to_vec(),
                vec![b'a'; 20000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            400,
            "exceeds",
        ),
        (
            vec![0xff, 0xfe, b'\r', b'\n', b'\r', b'\n'],
            400,
            "not UTF-8",
        ),
    ];
    for (raw, status, text) in &cases {
        let (got, body) = http(&sock, raw);
        assert_eq!(
            got,
            *status,
            "{}: {body}",
            String::from_utf8_lossy(&raw[..raw.len().min(60)])
        );
        assert!(body.contains(text), "expected \"{text}\" in \"{body}\"");
        assert_eq!(
            body.trim_end().lines().count(),
            1,
            "one-line message: {body}"
        );
        let (ping, _) = http(&sock, &req("GET", "vmm.ping", ""));
        assert_eq!(
            ping,
            200,
            "server stops serving after {}",
            String::from_utf8_lossy(&raw[..raw.len().min(60)])
        );
    }
    // Truncated request then close.
    let mut t = UnixStream::connect(&sock).unwrap();
    t.write_all(b"PUT /api/v1/vm.cr").unwrap();
    drop(t);

    // An internal failure is a 500: the disk vanishes between create and boot.
    let disk = TmpDisk::new("vanish", 1 << 20);
    let body = format!(
        r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":67108864}},"disks":[{{"path":"{}"}}]}}"#,
        disk.path.display()
    );
    let created = http(&sock, &req("PUT", "vm.create", &body));
    assert_eq!(created.0, 204, "{created:?} for {body}");
    assert_eq!(
        http(&sock, &req("PUT", "vm.create", &body)).0,
        409,
        "create twice"
    );
    std::fs::remove_file(&disk.path).unwrap();
    let (status, msg) = http(&sock, &req("PUT", "vm.boot", ""));
    assert_eq!(status, 500, "{msg}");
    assert!(msg.contains("disk image"), "{msg}");
    let (status, info) = http(&sock, &req("GET", "vm.info", ""));
    assert_eq!(status, 200);
    assert!(info.contains("\"state\":\"Created\""), "{info}");

    // Keep-alive: two requests on one connection.
    let mut ka = UnixStream::connect(&sock).unwrap();
    ka.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ka.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut both = String::new();
    let _ = ka.read_to_string(&mut both);
    assert_eq!(both.matches("HTTP/1.1 200 \r\n").count(), 2, "{both}");

    drop(stuck);
    drop(half);
    assert_eq!(http(&sock, &req("PUT", "vmm.shutdown", "")).0, 204);
    let out = vm.finish(Duration::from_secs(30));
    assert!(out.status.success(), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

#[test]
fn ch_remote_reports_errors() {
    let sock = std::env::temp_dir().join(format!("vio-api-{}-nobody.sock", std::process::id()));
    let (okay, _, err) = ch_remote(&sock, &["ping"]);
    assert!(!okay);
    assert!(err.contains("Failed to connect"), "{err}");
    let out = Command::new(CH_REMOTE)
        .args(["--api-socket", "/x", "create", "/nonexistent.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to read /nonexistent.json"));
}
