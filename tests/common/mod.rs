//! Helpers for integration tests: boot the real VMM on KVM with the test guest.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod net;

pub const VMM: &str = env!("CARGO_BIN_EXE_vio-hypervisor");

/// True when /dev/kvm is usable; otherwise says loudly that the test is skipped.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n*** SKIPPED {test}: /dev/kvm is not present on this machine; this test boots a real VM ***\n");
    false
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest ELF built by scripts/build-guest.sh (or VIO_GUEST_ELF).
pub fn guest_elf() -> PathBuf {
    let p = std::env::var_os("VIO_GUEST_ELF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace().join("guest/target/x86_64-unknown-linux-gnu/release/vio-guest")
        });
    assert!(
        p.is_file(),
        "guest ELF {} missing: run scripts/build-guest.sh",
        p.display()
    );
    p
}

/// A disk image on tmpfs, removed on drop.
pub struct TmpDisk {
    pub path: PathBuf,
}

impl TmpDisk {
    pub fn new(name: &str, size: u64) -> Self {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "vio-test-{}-{}-{name}.img",
            std::process::id(),
            unique()
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        TmpDisk { path }
    }

    pub fn arg(&self) -> String {
        format!("path={}", self.path.display())
    }
}

impl Drop for TmpDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running VMM whose serial output (stdout) is read line by line. Dropping it kills the VMM
/// if it still runs and removes its API socket, so a failing test leaves nothing behind.
pub struct Vm {
    pub child: Child,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    pub stdout: Vec<String>,
    api: Option<PathBuf>,
}

pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Outcome {
    pub fn result(&self) -> Value {
        self.line_json("VIO-GUEST-RESULT ").unwrap_or_else(|| {
            panic!(
                "no RESULT line\n{}stdout:\n{}\nstderr:\n{}",
                self.summary(),
                self.stdout.join("\n"),
                self.stderr
            )
        })
    }

    pub fn line_json(&self, prefix: &str) -> Option<Value> {
        let lines: Vec<&String> = self
            .stdout
            .iter()
            .filter(|l| l.starts_with(prefix))
            .collect();
        assert!(
            lines.len() <= 1 || prefix != "VIO-GUEST-RESULT ",
            "more than one RESULT line"
        );
        lines
            .last()
            .map(|l| serde_json::from_str(l[prefix.len()..].trim()).expect("RESULT is JSON"))
    }

    /// The lines that tell what went wrong, first: a long log is cut in the middle by whoever
    /// shows it, and the counters (a stalled ring's indices) are logged near its end.
    fn summary(&self) -> String {
        let key = |l: &&str| {
            l.contains(" counters: ")
                || l.contains(" WARN:")
                || l.contains(" ERROR:")
                || l.starts_with("seccomp: ")
        };
        let lines: Vec<&str> = self.stderr.lines().filter(key).take(40).collect();
        if lines.is_empty() {
            return String::new();
        }
        format!("key stderr lines:\n{}\n", lines.join("\n"))
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?}\n{}stdout:\n{}\nstderr:\n{}",
            self.status,
            self.summary(),
            self.stdout.join("\n"),
            self.stderr
        )
    }
}

impl Vm {
    pub fn spawn(args: &[String]) -> Vm {
        Self::spawn_with_env(args, &[])
    }

    pub fn spawn_with_env(args: &[String], env: &[(String, String)]) -> Vm {
        Self::spawn_in(args, env, false)
    }

    /// `netns`: in a network namespace of its own (see `net::own_netns`).
    pub fn spawn_in(args: &[String], env: &[(String, String)], netns: bool) -> Vm {
        let mut cmd = Command::new(VMM);
        if netns {
            net::own_netns(&mut cmd);
        }
        let mut child = cmd
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vio-hypervisor");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            // Bytes, not `lines()`: one byte that is not UTF-8 on the guest's console (a
            // kernel's serial probe, say) would end a `lines()` loop, close the pipe, and
            // silently drop everything the guest prints after it.
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                if tx
                    .send(line.trim_end_matches(['\r', '\n']).to_string())
                    .is_err()
                {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        Vm {
            child,
            lines,
            stderr: Some(stderr),
            stdout: Vec::new(),
            api: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API socket (the VM was built with `VmBuilder::api_socket`).
    pub fn api_path(&self) -> &Path {
        self.api.as_deref().expect("the VM has an API socket")
    }

    /// One request to the VM's API socket: (status, body); status 0 once the VMM is gone.
    pub fn api(&self, method: &str, endpoint: &str, body: &str) -> (u16, String) {
        api(self.api_path(), method, endpoint, body)
    }

    /// Waits until the API socket accepts connections.
    pub fn wait_api(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while std::os::unix::net::UnixStream::connect(self.api_path()).is_err() {
            assert!(Instant::now() < deadline, "API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.stdout.push(l.clone());
                    if l.starts_with(prefix) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the VMM to exit (killing it after `timeout`).
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
                panic!(
                    "VMM did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{stderr}",
                    self.stdout.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stdout.push(l);
        }
        let stderr = self.stderr.take().unwrap().join().unwrap_or_default();
        Outcome {
            status,
            stdout: std::mem::take(&mut self.stdout),
            stderr,
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(p) = &self.api {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A VMM command line for the test guest: memory, command line, devices, flags, API socket.
pub struct VmBuilder {
    name: String,
    memory: String,
    cmdline: String,
    flags: Vec<(String, String)>,
    kernel: Option<PathBuf>,
    payload: bool,
    api: bool,
    verbose: bool,
    env: Vec<(String, String)>,
    netns: bool,
}

impl VmBuilder {
    /// `name` tells this VM's files apart from other tests'.
    pub fn new(name: &str) -> Self {
        VmBuilder {
            name: name.to_string(),
            memory: "size=512M".into(),
            cmdline: String::new(),
            flags: Vec::new(),
            kernel: None,
            payload: true,
            api: false,
            verbose: false,
            env: Vec::new(),
            netns: false,
        }
    }

    /// An environment variable for the VMM.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Another payload than the test guest (the Linux kernel).
    pub fn kernel(mut self, kernel: &Path) -> Self {
        self.kernel = Some(kernel.to_path_buf());
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.into();
        self
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Any other `--flag value`.
    pub fn flag(mut self, flag: &str, value: &str) -> Self {
        self.flags.push((flag.into(), value.into()));
        self
    }

    pub fn disk(self, disk: &TmpDisk) -> Self {
        let arg = disk.arg();
        self.flag("--disk", &arg)
    }

    /// `vdpu` passed through as `flag` (`--user-device` or `--vio`), id `dpu0`, plus `extra`
    /// options (",io_fds=off").
    pub fn device(self, flag: &str, vdpu: &Vdpu, extra: &str) -> Self {
        let arg = vdpu.arg(extra);
        self.flag(flag, &arg)
    }

    pub fn reclaim(self, policy: &str) -> Self {
        self.flag("--reclaim", policy)
    }

    pub fn api_socket(mut self) -> Self {
        self.api = true;
        self
    }

    /// No kernel: the VMM waits for `vm.create` and `vm.boot` on its API socket.
    pub fn no_payload(mut self) -> Self {
        self.payload = false;
        self.api_socket()
    }

    /// `-v`: the VMM logs each device's counters when it stops the VM (`logged_counters`).
    pub fn verbose(mut self) -> Self {
        self.verbose = true;
        self
    }

    fn api_path(&self) -> PathBuf {
        std::env::temp_dir().join(format!(
            "vio-test-{}-{}.sock",
            std::process::id(),
            self.name
        ))
    }

    pub fn args(&self) -> Vec<String> {
        let mut a = if self.payload {
            let mut a = boot_args(&self.memory, &self.cmdline, &[]);
            if let Some(k) = &self.kernel {
                a[1] = k.display().to_string();
            }
            a
        } else {
            Vec::new()
        };
        for (f, v) in &self.flags {
            a.extend([f.clone(), v.clone()]);
        }
        if self.api {
            a.extend(["--api-socket".into(), self.api_path().display().to_string()]);
        }
        if self.verbose {
            a.push("-v".into());
        }
        a
    }

    /// The VMM runs in a network namespace of its own (its TAPs are seen by nothing else).
    pub fn netns(mut self) -> Self {
        self.netns = true;
        self
    }

    pub fn spawn(self) -> Vm {
        let mut vm = Vm::spawn_in(&self.args(), &self.env, self.netns);
        vm.api = self.api.then(|| self.api_path());
        vm
    }

    /// Runs the VM to completion.
    pub fn run(self, timeout: Duration) -> Outcome {
        self.spawn().finish(timeout)
    }
}

/// Runs the VMM to completion.
pub fn run(args: &[String], timeout: Duration) -> Outcome {
    Vm::spawn(args).finish(timeout)
}

pub fn boot_args(memory: &str, cmdline: &str, disks: &[&TmpDisk]) -> Vec<String> {
    let mut a = vec![
        "--kernel".to_string(),
        guest_elf().display().to_string(),
        "--memory".into(),
        memory.into(),
        "--serial".into(),
        "tty".into(),
        "--console".into(),
        "off".into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    for d in disks {
        a.push("--disk".into());
        a.push(d.arg());
    }
    a
}

pub fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// One HTTP request to the VMM's API socket: (status, body); status 0 if the socket is gone.
pub fn api(sock: &Path, method: &str, endpoint: &str, body: &str) -> (u16, String) {
    use std::io::Write;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return (0, String::new());
    };
    let _ = write!(s, "{method} /api/v1/{endpoint} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// A passthrough device's counters say nothing went wrong: no I/O page fault, not failed, no bad
/// chain, every page acquired, no doorbell lost.
pub fn assert_device_clean(d: &Value) {
    for key in [
        "iopf",
        "failed",
        "bad_chains",
        "acquire_errors",
        "missed_doorbells",
    ] {
        assert_eq!(d[key].as_u64(), Some(0), "{key}: {d}");
    }
}

/// The counters the VMM logged (with -v) for device `id` when it stopped the VM.
pub fn logged_counters(stderr: &str, id: &str) -> Value {
    let key = format!("Device {id} counters: ");
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains(&key))
        .unwrap_or_else(|| panic!("no counters for {id}:\n{stderr}"));
    serde_json::from_str(&line[line.find(&key).unwrap() + key.len()..]).unwrap()
}

/// The vdpu binary built beside the test's own profile (scripts/test.sh builds the workspace).
pub fn vdpu_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join("vdpu");
    assert!(
        p.is_file(),
        "{} missing: build the workspace (cargo build --workspace)",
        p.display()
    );
    p
}

pub struct Vdpu {
    pub child: Child,
    pub sock: PathBuf,
}

impl Vdpu {
    pub fn start(name: &str, disk: &TmpDisk) -> Vdpu {
        Self::start_with(name, disk, "")
    }

    pub fn start_with(name: &str, disk: &TmpDisk, blk_extra: &str) -> Vdpu {
        Self::spawn(name, "--blk", &format!("{}{blk_extra}", disk.arg()), false)
    }

    /// vdpu's network function on TAP `net` (`tap=NAME,...`), in a network namespace of its
    /// own.
    pub fn start_net(name: &str, net: &str) -> Vdpu {
        Self::spawn(name, "--net", net, true)
    }

    fn spawn(name: &str, flag: &str, function: &str, netns: bool) -> Vdpu {
        let sock = std::env::temp_dir().join(format!("vdpu-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new(vdpu_bin());
        if netns {
            net::own_netns(&mut cmd);
        }
        let child = cmd
            .args(["--socket", sock.to_str().unwrap(), flag, function])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(sock.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "vdpu never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Vdpu { child, sock }
    }

    pub fn arg(&self, extra: &str) -> String {
        format!("socket={},id=dpu0{extra}", self.sock.display())
    }

    /// What vdpu said on stderr so far (a failure message should carry it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.sock.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Vdpu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(self.sock.with_extension("log"));
    }
}

/// The allocated bytes of the VMM's guest-RAM memfd, measured from outside the process.
pub fn memfd_allocated(pid: u32) -> Option<u64> {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let p = e.ok()?.path();
        if std::fs::read_link(&p)
            .ok()?
            .to_string_lossy()
            .contains("memfd:vio_guest_ram")
        {
            return std::fs::metadata(&p).ok().map(|m| m.blocks() * 512);
        }
    }
    None
}

/// The Linux guest kernel (`../shared/linux/vmlinux`, or `VIO_LINUX_KERNEL`); `None`, said
/// loudly, when it is absent.
pub fn linux_kernel(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("VIO_LINUX_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/linux/vmlinux"));
    if p.is_file() {
        return Some(p);
    }
    eprintln!(
        "\n*** SKIPPED {test}: the Linux guest kernel {} is not present ***\n",
        p.display()
    );
    None
}

/// The Linux guest's initramfs, built by scripts/build-initramfs.sh.
pub fn linux_initramfs() -> PathBuf {
    let p = workspace().join("build/linux-initramfs.cpio");
    assert!(
        p.is_file(),
        "{} missing: run scripts/build-initramfs.sh",
        p.display()
    );
    p
}

/// What the shared kernel needs on this machine's KVM (../shared/linux/README.md), warnings
/// and worse on the console, /dev/kmsg writers not rate-limited (the guest reports through it:
/// a dropped RESULT line is a failed run), and the workload's parameters.
pub fn linux_cmdline(workload: &str) -> String {
    format!(
        "console=ttyS0 noxsave clearcpuid=popcnt,smap,fsgsbase,rdpid,rdtscp,114,erms,fsrm,pcid,invpcid nopti loglevel=5 printk.devkmsg=on panic=-1 {workload}"
    )
}

/// Console lines that mean the guest kernel is unhappy: a WARN or BUG splat, an oops, a
/// panic, a hung task, an I/O error.
pub fn kernel_trouble(stdout: &[String]) -> Vec<&String> {
    const BAD: &[&str] = &[
        "cut here",
        "WARNING: CPU",
        "Oops",
        "BUG:",
        "Kernel panic",
        "Call Trace",
        "blocked for more than",
        "hung_task",
        "I/O error",
        "blk_update_request",
    ];
    stdout
        .iter()
        .filter(|l| BAD.iter().any(|b| l.contains(b)))
        .collect()
}

/// Reclaims `bytes` of guest RAM (`vm.reclaim`) every 100 ms until stopped; records the host's
/// view of guest RAM after each pass, measured from outside the VMM.
/// The most the host held of guest RAM after any churn pass (the last pass may have raced the
/// VM's exit and found no memfd: those are left out).
pub fn worst_resident(passes: &[(u64, u64, u64)]) -> u64 {
    passes
        .iter()
        .map(|p| p.1)
        .filter(|&b| b != u64::MAX)
        .max()
        .expect("at least one churn pass")
}

pub struct Churn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(u64, u64, u64)>>>,
}

impl Churn {
    pub fn start(api_path: &Path, pid: u32, bytes: u64, unsafe_unmap_dma: bool) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, path) = (stop.clone(), api_path.to_path_buf());
        let body = format!(r#"{{"bytes": {bytes}, "unsafe_unmap_dma": {unsafe_unmap_dma}}}"#);
        let thread = std::thread::spawn(move || {
            let mut passes = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let (status, rep) = api(&path, "PUT", "vm.reclaim", &body);
                if status != 200 {
                    break; // the VM is gone
                }
                let rep: Value = serde_json::from_str(&rep).unwrap();
                passes.push((
                    rep["reclaimed_bytes"].as_u64().unwrap_or(0),
                    memfd_allocated(pid).unwrap_or(u64::MAX),
                    rep["skipped_locked_bytes"].as_u64().unwrap_or(0),
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            passes
        });
        Churn {
            stop,
            thread: Some(thread),
        }
    }

    /// (reclaimed bytes, memfd allocated bytes after, bytes skipped as locked) per pass.
    pub fn finish(mut self) -> Vec<(u64, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Switches `vio` device dpu0 every 50 ms, in both directions, `each` times each way or for as
/// long as the guest runs; returns the switch reports.
pub fn switcher(
    api_path: &Path,
    each: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Value>> {
    let path = api_path.to_path_buf();
    std::thread::spawn(move || {
        let mut reports = Vec::new();
        for mode in ["passthrough", "snoop"].iter().cycle() {
            if stop.load(Ordering::Relaxed) || reports.len() >= 2 * each {
                break;
            }
            let body = format!(r#"{{"id": "dpu0", "mode": "{mode}"}}"#);
            let (status, rep) = api(&path, "PUT", "vm.vio-mode", &body);
            if status != 200 {
                break; // the VM is gone
            }
            reports.push(serde_json::from_str::<Value>(&rep).unwrap()["switch"].clone());
            std::thread::sleep(Duration::from_millis(50));
        }
        reports
    })
}

// Live upgrade (`vm.send-migration` / `vm.receive-migration`, local).

pub fn migration_socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vio-mig-{}-{name}.sock", std::process::id()))
}

/// A VMM started with only an API socket, as a live upgrade's receiver is.
pub fn receiver(name: &str) -> Vm {
    let vm = VmBuilder::new(name).no_payload().verbose().spawn();
    vm.wait_api(Duration::from_secs(10));
    vm
}

/// Waits until `path` accepts connections (the receiver listens).
pub fn wait_listening(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the receiver never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `from` hands its VM to `to`: (the sender's reply, the receiver's reply).
pub fn upgrade(from: &Vm, to: &Vm, name: &str) -> ((u16, String), (u16, String)) {
    let mig = migration_socket(name);
    let _ = std::fs::remove_file(&mig);
    let url = format!("unix:{}", mig.display());
    let to_api = to.api_path().to_path_buf();
    let body = serde_json::json!({ "receiver_url": url }).to_string();
    let recv = std::thread::spawn(move || api(&to_api, "PUT", "vm.receive-migration", &body));
    wait_listening(&mig);
    let sent = from.api(
        "PUT",
        "vm.send-migration",
        &serde_json::json!({ "destination_url": url, "local": true }).to_string(),
    );
    (sent, recv.join().unwrap())
}

/// Upgrades and checks both sides said yes; returns the sender's report.
pub fn upgrade_ok(from: Vm, to: &Vm, name: &str) -> Value {
    let (sent, received) = upgrade(&from, to, name);
    let out = from.finish(Duration::from_secs(20));
    assert_eq!(sent.0, 200, "send: {}\n{}", sent.1, out.describe());
    assert_eq!(received.0, 200, "receive: {}", received.1);
    assert!(
        out.status.success(),
        "the old VMM exits 0: {}",
        out.describe()
    );
    serde_json::from_str(&sent.1).unwrap()
}
