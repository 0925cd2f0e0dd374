//! Network tests' helpers: network namespaces and the host-side peer (`vio-netpeer`).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const NETPEER: &str = env!("CARGO_BIN_EXE_vio-netpeer");

/// Starts `cmd` in a new network namespace: the TAPs it creates are its own, no other test's
/// and not the host's.
pub fn own_netns(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes a system call.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// `vio-netpeer` on TAP `iface` in the network namespace of process `pid` (the TAP's owner).
pub struct NetPeer {
    child: Child,
}

impl NetPeer {
    pub fn attach(pid: u32, iface: &str) -> NetPeer {
        Self::attach_with(pid, iface, &[])
    }

    /// With more options (`--ip ADDR/PREFIX`: the host's stack answers too).
    pub fn attach_with(pid: u32, iface: &str, extra: &[&str]) -> NetPeer {
        let child = Command::new(NETPEER)
            .args(["--netns-pid", &pid.to_string(), "--iface", iface])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vio-netpeer");
        NetPeer { child }
    }

    /// Stops the peer; what it counted (its `VIO-NETPEER` line).
    pub fn finish(mut self) -> Value {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "vio-netpeer did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        let out = BufReader::new(self.child.stdout.take().unwrap());
        let line = out
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("VIO-NETPEER ").map(str::to_string))
            .unwrap_or_else(|| panic!("vio-netpeer printed no counts: {err}"));
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
