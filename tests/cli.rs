//! Command-line errors: one clear line naming the flag and value, exit code 1, no panic.
//! These fail before KVM is touched, so they run everywhere.

mod common;

use common::VMM;
use std::process::Command;

fn fails_with(args: &[&str], expected: &[&str]) {
    let out = Command::new(VMM).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let first = stderr
        .lines()
        .find(|l| l.starts_with("Error"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    for e in expected {
        assert!(
            first.contains(e),
            "{args:?}: expected \"{e}\" in \"{first}\""
        );
    }
}

fn kernel() -> String {
    // Any existing file passes the existence check that runs after syntax checks.
    env!("CARGO_BIN_EXE_vio-hypervisor").to_string()
}

#[test]
fn bad_memory_size() {
    fails_with(
        &["--kernel", &kernel(), "--memory", "size=12X"],
        &["--memory", "size=12X", "invalid size"],
    );
}

#[test]
fn zero_boot_vcpus() {
    fails_with(
        &["--kernel", &kernel(), "--cpus", "boot=0"],
        &["--cpus", "boot=0", "at least 1"],
    );
}

#[test]
fn unknown_key() {
    fails_with(
        &["--kernel", &kernel(), "--disk", "path=/x,speed=fast"],
        &["--disk", "unknown key \"speed\""],
    );
}

#[test]
fn missing_disk_file() {
    fails_with(
        &[
            "--kernel",
            &kernel(),
            "--disk",
            "path=/nonexistent/disk.img",
        ],
        &["/nonexistent/disk.img", "does not exist"],
    );
}

#[test]
fn missing_kernel_file() {
    fails_with(
        &["--kernel", "/nonexistent/kernel"],
        &["/nonexistent/kernel", "does not exist"],
    );
}

#[test]
fn no_kernel() {
    fails_with(&["--memory", "size=64M"], &["--kernel is required"]);
}

#[test]
fn bad_serial_mode() {
    fails_with(
        &["--kernel", &kernel(), "--serial", "pty"],
        &["--serial", "pty"],
    );
}

#[test]
fn kernel_without_pvh_note() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("*** SKIPPED kernel_without_pvh_note: /dev/kvm is not present ***");
        return;
    }
    // The VMM binary itself is an ELF without a PVH note.
    fails_with(
        &["--kernel", &kernel(), "--memory", "size=64M"],
        &["Failed to load the kernel"],
    );
}

#[test]
fn version_and_help() {
    let v = Command::new(VMM).arg("--version").output().unwrap();
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("vio-hypervisor "));
    let h = Command::new(VMM).arg("--help").output().unwrap();
    assert!(h.status.success());
    let h = String::from_utf8_lossy(&h.stdout);
    for flag in [
        "--kernel",
        "--cmdline",
        "--memory",
        "--cpus",
        "--disk",
        "--serial",
        "--console",
    ] {
        assert!(h.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn bad_vio_devices() {
    fails_with(
        &[
            "--kernel",
            &kernel(),
            "--vio",
            "socket=/tmp/x.sock,mode=elastic",
        ],
        &["--vio", "mode must be snoop, passthrough or auto"],
    );
    fails_with(
        &[
            "--kernel",
            &kernel(),
            "--vio",
            "socket=/tmp/x.sock,poll_us=0",
        ],
        &["--vio", "poll_us must be 1..1000000"],
    );
    fails_with(
        &["--kernel", &kernel(), "--vio", "id=v0"],
        &["--vio", "socket is required"],
    );
    fails_with(
        &["--kernel", &kernel(), "--vio", "socket=/tmp/x.sock"],
        &["shared"],
    );
}
