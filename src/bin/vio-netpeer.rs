//! vio-netpeer: the host-side peer of the test guest's network workloads (`net-echo`,
//! `net-stream`). Attached to a TAP interface (in the network namespace of the process that
//! owns the TAP), it answers the frames of the VIO test protocol: it echoes, sinks (verifying
//! every frame) and sources (on request) frames. All traffic stays on the interface.
//!
//! The protocol (docs/testing.md): Ethernet frames of type 0x88b5 whose payload starts with a
//! 28-byte header — magic "VION", kind, 3 bytes of padding, seq (u64), count (u32), len (u32),
//! FNV-1a checksum of the data (u32) — followed by `len` bytes of data.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use virtio_devices::net::tap::configure_interface;

const ETHERTYPE: u16 = 0x88b5;
const ETH_HLEN: usize = 14;
const HDR_LEN: usize = 28;
const MAGIC: u32 = 0x4e4f_4956; // "VION"
const ECHO_REQ: u8 = 1;
const ECHO_REP: u8 = 2;
const DATA: u8 = 3;
const PULL: u8 = 4;
const STATS_REQ: u8 = 6;
const STATS_REP: u8 = 7;
const RESET: u8 = 8;
/// The largest frame on a TAP with the default MTU.
const MAX_FRAME: usize = 1514;
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The data of frame `seq`: the same function as the guest's (guest/src/net.rs).
fn pattern(seq: u64, i: usize) -> u8 {
    (mix((seq << 16) ^ (i as u64 / 8)) >> (8 * (i % 8))) as u8
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[derive(Default, Debug)]
struct Counts {
    echoes: u64,
    echo_corrupt: u64,
    data_frames: u64,
    data_bytes: u64,
    data_corrupt: u64,
    data_lost: u64,
    data_out_of_order: u64,
    next_seq: u64,
    pulled: u64,
    malformed: u64,
}

struct Header {
    kind: u8,
    seq: u64,
    count: u32,
    len: u32,
    csum: u32,
}

fn parse(frame: &[u8]) -> Option<(Header, &[u8])> {
    let p = frame.get(ETH_HLEN..)?;
    let h = p.get(..HDR_LEN)?;
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    if u32_at(0) != MAGIC {
        return None;
    }
    let hdr = Header {
        kind: h[4],
        seq: u64::from_le_bytes(h[8..16].try_into().unwrap()),
        count: u32_at(16),
        len: u32_at(20),
        csum: u32_at(24),
    };
    let data = p.get(HDR_LEN..HDR_LEN + hdr.len as usize)?;
    Some((hdr, data))
}

/// A frame to `dst` of `kind` carrying `data`.
fn build(out: &mut Vec<u8>, dst: &[u8], kind: u8, seq: u64, count: u32, data: &[u8]) {
    out.clear();
    out.extend_from_slice(dst);
    out.extend_from_slice(&PEER_MAC);
    out.extend_from_slice(&ETHERTYPE.to_be_bytes());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv1a(data).to_le_bytes());
    out.extend_from_slice(data);
}

struct Link {
    sock: File,
}

impl Link {
    /// A packet socket for the protocol's frames on `iface`, which may not exist yet.
    fn open(iface: &str, wait: Duration) -> io::Result<Link> {
        let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
        let deadline = Instant::now() + wait;
        let index = loop {
            // SAFETY: `name` is a valid C string.
            let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if i != 0 {
                break i;
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("no interface {iface}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let proto = ETHERTYPE.to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let sock = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let link = Link { sock };
        // Room for a window of the guest's frames while this process is descheduled.
        link.setsockopt(libc::SO_RCVBUFFORCE, 16 << 20)?;
        link.setsockopt(libc::SO_SNDBUFFORCE, 16 << 20)?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel's own IPv6 chatter on the interface is not the guest's business.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{iface}/disable_ipv6"), "1");
        Ok(link)
    }

    fn setsockopt(&self, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the option takes an int of the size given.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is readable for its length.
            let n =
                unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // A full transmit queue drains by itself: the guest's reads free it.
            if e.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(e);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

fn serve(link: &Link) -> io::Result<Counts> {
    let mut c = Counts::default();
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(MAX_FRAME);
    let mut data = Vec::with_capacity(MAX_FRAME);
    while !STOP.load(Ordering::Relaxed) {
        let n = match link.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            // The TAP's owner went away (the VM stopped): the run is over.
            Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => break,
            Err(e) => return Err(e),
        };
        let frame = &buf[..n];
        let Some((h, payload)) = parse(frame) else {
            c.malformed += 1;
            continue;
        };
        let src = &frame[6..12];
        match h.kind {
            ECHO_REQ => {
                c.echoes += 1;
                if fnv1a(payload) != h.csum {
                    c.echo_corrupt += 1;
                }
                build(&mut out, src, ECHO_REP, h.seq, 0, payload);
                link.send(&out)?;
            }
            DATA => {
                c.data_frames += 1;
                c.data_bytes += payload.len() as u64;
                let ok = fnv1a(payload) == h.csum
                    && payload
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == pattern(h.seq, i));
                if !ok {
                    c.data_corrupt += 1;
                }
                if h.seq >= c.next_seq {
                    c.data_lost += h.seq - c.next_seq;
                    c.next_seq = h.seq + 1;
                } else {
                    c.data_out_of_order += 1;
                }
            }
            PULL => {
                let len = (h.len as usize).min(MAX_FRAME - ETH_HLEN - HDR_LEN);
                for seq in h.seq..h.seq + u64::from(h.count) {
                    data.clear();
                    data.extend((0..len).map(|i| pattern(seq, i)));
                    build(&mut out, src, DATA, seq, 0, &data);
                    link.send(&out)?;
                    c.pulled += 1;
                }
            }
            STATS_REQ => {
                data.clear();
                for v in [c.data_frames, c.data_corrupt, c.data_lost, c.data_bytes] {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                build(&mut out, src, STATS_REP, h.seq, 0, &data);
                link.send(&out)?;
            }
            RESET => {
                c.data_frames = 0;
                c.data_bytes = 0;
                c.data_corrupt = 0;
                c.data_lost = 0;
                c.data_out_of_order = 0;
                c.next_seq = 0;
                build(&mut out, src, RESET, h.seq, 0, &[]);
                link.send(&out)?;
            }
            _ => c.malformed += 1,
        }
    }
    Ok(c)
}

/// `10.0.0.1/24` as an address and its netmask.
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let bad = || format!("\"{s}\" is not ADDR/PREFIX (e.g. 192.168.249.1/24)");
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u32 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    Ok((addr, Ipv4Addr::from(mask)))
}

/// Moves this (single-threaded) process into the network namespace of process `pid`.
fn join_netns(pid: u32) -> io::Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    // SAFETY: setns on an open namespace descriptor; no other thread exists yet.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> ExitCode {
    let m = clap::Command::new("vio-netpeer")
        .about("Host-side peer of the test guest's network workloads: echo, sink and source")
        .arg(
            clap::Arg::new("iface")
                .long("iface")
                .required(true)
                .value_name("NAME")
                .help("The TAP interface to attach to"),
        )
        .arg(
            clap::Arg::new("netns-pid")
                .long("netns-pid")
                .value_name("PID")
                .value_parser(clap::value_parser!(u32))
                .help("Join this process's network namespace first"),
        )
        .arg(
            clap::Arg::new("ip")
                .long("ip")
                .value_name("ADDR/PREFIX")
                .value_parser(parse_cidr)
                .help(
                    "Give the interface this IPv4 address (and bring it up), so that the host's \
                     own stack answers the guest too (ping)",
                ),
        )
        .arg(
            clap::Arg::new("wait-s")
                .long("wait-s")
                .value_name("SECONDS")
                .default_value("20")
                .value_parser(clap::value_parser!(u64))
                .help("How long to wait for the interface to appear"),
        )
        .get_matches();
    if let Some(&pid) = m.get_one::<u32>("netns-pid") {
        if let Err(e) = join_netns(pid) {
            eprintln!("Error: Failed to join the network namespace of {pid}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // SAFETY: the handlers only store to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let iface = m.get_one::<String>("iface").unwrap();
    let wait = Duration::from_secs(*m.get_one::<u64>("wait-s").unwrap());
    let link = match Link::open(iface, wait) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: Failed to attach to {iface}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(&(ip, mask)) = m.get_one::<(Ipv4Addr, Ipv4Addr)>("ip") {
        if let Err(e) = configure_interface(iface, Some(ip), Some(mask)) {
            eprintln!("Error: Failed to give {iface} the address {ip}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("VIO-NETPEER-READY {iface}");
    match serve(&link) {
        Ok(c) => {
            println!(
                "VIO-NETPEER {{\"echoes\":{},\"echo_corrupt\":{},\"data_frames\":{},\
                 \"data_bytes\":{},\"data_corrupt\":{},\"data_lost\":{},\"data_out_of_order\":{},\
                 \"pulled\":{},\"malformed\":{}}}",
                c.echoes,
                c.echo_corrupt,
                c.data_frames,
                c.data_bytes,
                c.data_corrupt,
                c.data_lost,
                c.data_out_of_order,
                c.pulled,
                c.malformed
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
