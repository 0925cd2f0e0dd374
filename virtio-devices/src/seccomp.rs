//! Per-thread seccomp filters (`--seccomp true|false|log`, as in Cloud Hypervisor).
//!
//! Every thread of the VMM and of vdpu confines itself when it starts, to the system calls its
//! work needs. A thread inherits the filter of the thread that created it and adds its own, so
//! what a thread may do is the intersection of its filter and its creators': a process's main
//! thread allows everything any of its threads does, and each thread narrows from there.
//!
//! With `true` a forbidden call raises SIGSYS, whose handler names the thread and the call on
//! stderr and ends the process (a VMM that does something it never should is compromised or
//! broken; either way it must not go on). With `log` the kernel logs the call (the audit log)
//! and lets it through. With `false` nothing is filtered.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::btree_map::{BTreeMap, Entry};
use std::str::FromStr;
use std::sync::OnceLock;
use thiserror::Error;

/// The exit status of a process ended by a forbidden system call (as if killed by SIGSYS).
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true` (the default): a forbidden call ends the process.
    Trap,
    /// `log`: a forbidden call is logged by the kernel and allowed.
    Log,
    /// `false`: no filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            "false" => Ok(SeccompMode::Off),
            _ => Err(format!("seccomp must be true, false or log, not {s:?}")),
        }
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("The seccomp filters were already set")]
    AlreadySet,
    #[error("No seccomp filter for {0} threads")]
    UnknownThread(&'static str),
    #[error("Failed to install the SIGSYS handler")]
    Signal(#[source] std::io::Error),
    #[error("Invalid seccomp rule for {0}")]
    Rule(&'static str, #[source] seccompiler::BackendError),
    #[error("Failed to build the seccomp filter of {0}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("Failed to load the seccomp filter of {0}")]
    Load(&'static str, #[source] seccompiler::Error),
}

/// The system calls a thread may make, beyond `BASE`: a call with no rules is allowed with any
/// arguments, one with rules only when one of them matches.
pub type Rules = Vec<(i64, Vec<SeccompRule>)>;

/// Each kind of thread the process has, and what it may call beyond `BASE`.
pub type Filters = BTreeMap<&'static str, Rules>;

struct Setting {
    mode: SeccompMode,
    filters: Filters,
}

static SETTING: OnceLock<Setting> = OnceLock::new();

/// Sets the process's mode and its threads' filters, once, before any thread confines
/// itself. Until then (library tests, fuzzing) `confine` does nothing.
pub fn init(mode: SeccompMode, filters: Filters) -> Result<(), SeccompError> {
    SETTING
        .set(Setting { mode, filters })
        .map_err(|_| SeccompError::AlreadySet)?;
    if mode != SeccompMode::Off {
        // glibc reads /proc/sys/vm/overcommit_memory the first time it shrinks a thread's own
        // malloc arena, from whichever thread frees: with the one (main) arena it never does,
        // and no thread needs to open files for it. Threads keep their own caches (tcache).
        // SAFETY: a plain setting of the allocator, before the process has other threads.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    if mode == SeccompMode::Trap {
        // SAFETY: a plain sigaction with a handler that only formats into a stack buffer and
        // makes async-signal-safe calls (write, exit_group).
        let r = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(SeccompError::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

thread_local! {
    /// The confined thread's name, for the SIGSYS handler (no allocation there).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Confines the calling thread to `BASE` and the rules of its kind, `name`.
pub fn confine(name: &'static str) -> Result<(), SeccompError> {
    let Some(setting) = SETTING.get() else {
        return Ok(());
    };
    let mismatch = match setting.mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = setting
        .filters
        .get(name)
        .cloned()
        .ok_or(SeccompError::UnknownThread(name))?;
    let thread = std::thread::current();
    let shown = thread.name().unwrap_or(name).as_bytes();
    let mut label = [0u8; 16];
    let n = shown.len().min(15);
    label[..n].copy_from_slice(&shown[..n]);
    NAME.with(|c| c.set(label));
    let prog = program(name, rules, mismatch)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Load(name, e))
}

/// `confine` for a thread created by a confined one: if its own filter cannot be loaded it
/// says so and goes on under its creator's, which already bounds it.
pub fn narrow(name: &'static str) {
    if let Err(e) = confine(name) {
        log::error!("{e}; the thread keeps its creator's filter");
    }
}

/// The BPF program `confine` loads.
pub fn program(
    name: &'static str,
    rules: Rules,
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, r) in base(name)?.into_iter().chain(rules) {
        match map.entry(nr) {
            Entry::Vacant(v) => {
                v.insert(r);
            }
            // A call allowed outright in one list stays allowed outright.
            Entry::Occupied(mut o) if o.get().is_empty() || r.is_empty() => o.get_mut().clear(),
            Entry::Occupied(mut o) => o.get_mut().extend(r),
        }
    }
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(name, e))?;
    filter.try_into().map_err(|e| SeccompError::Build(name, e))
}

/// A rule matching argument `arg` equal to one of `values` (one rule per value).
pub fn arg_is(
    name: &'static str,
    arg: u8,
    values: &[u64],
) -> Result<Vec<SeccompRule>, SeccompError> {
    values
        .iter()
        .map(|&v| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(|e| SeccompError::Rule(name, e))
        })
        .collect()
}

/// `ioctl` with one of `requests`.
pub fn ioctls(name: &'static str, requests: &[u64]) -> Result<Rules, SeccompError> {
    Ok(vec![(libc::SYS_ioctl, arg_is(name, 1, requests)?)])
}

/// Calls with any arguments.
pub fn any(calls: &[i64]) -> Rules {
    calls.iter().map(|&c| (c, Vec::new())).collect()
}

/// What every thread does: memory, locks, time, its own signals and life cycle, reading and
/// writing descriptors it holds, logging, and starting helper threads (a new thread names
/// itself and loads its own filter under its creator's).
fn base(name: &'static str) -> Result<Rules, SeccompError> {
    let mut r = any(&[
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_futex,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_madvise,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_nanosleep,
        libc::SYS_poll,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_restart_syscall,
        libc::SYS_rseq,
        // glibc installs its own handler at the process's first pthread_create.
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        // A thread loading its own filter (one that can only narrow what it may do).
        libc::SYS_seccomp,
        libc::SYS_set_robust_list,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        libc::SYS_writev,
    ]);
    r.push((
        libc::SYS_prctl,
        arg_is(
            name,
            0,
            &[
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                libc::PR_SET_NO_NEW_PRIVS as u64,
            ],
        )?,
    ));
    // try_clone of a descriptor, and the flags of one.
    r.push((
        libc::SYS_fcntl,
        arg_is(
            name,
            1,
            &[
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
            ],
        )?,
    ));
    Ok(r)
}

/// An event loop: epoll over eventfds and timers.
pub const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// The virtio-blk worker: its queues' eventfds and timers, and the disk image it was given.
pub fn virtio_blk_worker() -> Rules {
    let mut r = any(EVENT_LOOP);
    r.extend(any(&[
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        libc::SYS_lseek,
    ]));
    r
}

/// The virtio-net worker: its queues' eventfds and the TAP it was given (plain reads and
/// writes, in the base set).
pub fn virtio_net_worker() -> Rules {
    any(EVENT_LOOP)
}

/// Creating a TAP interface and configuring its host side: /dev/net/tun, and a datagram socket
/// of the Internet family (no other kind), which only carries the interface ioctls.
pub fn tap_setup(name: &'static str) -> Result<Rules, SeccompError> {
    let inet_dgram = [
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_INET as u64,
        ),
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
        ),
    ]
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .and_then(SeccompRule::new)
    .map_err(|e| SeccompError::Rule(name, e))?;
    let mut r = vec![(libc::SYS_socket, vec![inet_dgram])];
    r.extend(ioctls(name, crate::net::tap::TAP_IOCTLS)?);
    r.extend(any(&[libc::SYS_openat]));
    Ok(r)
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's siginfo for a seccomp trap: three ints and padding, then the union's
    // _sigsys member { void *call_addr; int syscall; unsigned arch; } (libc has no accessor).
    const SI_SYSCALL: usize = 24;
    // SAFETY: a SIGSYS raised by seccomp carries a full siginfo_t of that layout.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL) as *const i32) };
    let name = NAME.with(|c| c.get());
    let mut msg = [0u8; 160];
    let mut len = 0;
    for part in [
        &b"seccomp: thread '"[..],
        &name[..name.iter().position(|&b| b == 0).unwrap_or(16)],
        b"' made a forbidden system call (",
    ] {
        msg[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    len += write_decimal(&mut msg[len..], nr);
    let tail = b"); the process stops\n";
    msg[len..len + tail.len()].copy_from_slice(tail);
    len += tail.len();
    // SAFETY: write and exit_group are async-signal-safe; msg outlives the call.
    unsafe {
        libc::write(2, msg.as_ptr() as *const libc::c_void, len);
        libc::syscall(libc::SYS_exit_group, EXIT_FORBIDDEN);
    }
}

fn write_decimal(out: &mut [u8], v: i32) -> usize {
    let mut digits = [0u8; 12];
    let (mut n, mut i) = (v.unsigned_abs(), 0);
    loop {
        digits[i] = b'0' + (n % 10) as u8;
        i += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut len = 0;
    if v < 0 {
        out[0] = b'-';
        len = 1;
    }
    for d in digits[..i].iter().rev() {
        out[len] = *d;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_cloud_hypervisors() {
        assert_eq!("true".parse(), Ok(SeccompMode::Trap));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("false".parse(), Ok(SeccompMode::Off));
        assert!("yes".parse::<SeccompMode>().is_err());
    }

    #[test]
    fn the_worker_filter_builds() {
        let p = program("virtio-blk", virtio_blk_worker(), SeccompAction::Trap).unwrap();
        assert!(p.len() > 40, "{} instructions", p.len());
    }

    #[test]
    fn decimals() {
        let mut b = [0u8; 12];
        for (v, s) in [(0, "0"), (41, "41"), (-7, "-7"), (435, "435")] {
            let n = write_decimal(&mut b, v);
            assert_eq!(&b[..n], s.as_bytes());
        }
    }
}
