//! vdpu: serve a virtio-blk or virtio-net PCI function over vfio-user.

use clap::{Arg, ArgAction, ArgGroup, Command};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use vdpu::device::{build_blk, build_net, BlkConfig, NetFunctionConfig};
use virtio_devices::seccomp::{self, SeccompMode};

static DUMP_COUNTERS: AtomicBool = AtomicBool::new(false);
static EXIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    DUMP_COUNTERS.store(true, Ordering::Relaxed);
}

extern "C" fn on_exit_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    EXIT.store(true, Ordering::Relaxed);
}

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("vdpu: {}: {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> ExitCode {
    let m = Command::new("vdpu")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Software DPU: a virtio-blk or virtio-net PCI function over vfio-user, DMA through \
             an IOMMU model",
        )
        .arg(
            Arg::new("socket")
                .long("socket")
                .value_name("PATH")
                .required(true)
                .help("vfio-user socket to listen on"),
        )
        .arg(
            Arg::new("blk")
                .long("blk")
                .value_name(
                    "path=FILE[,readonly=on,num_queues=N,queue_size=N,id=NAME,latency_us=N,\
                     pri=on,pri_timeout_ms=N]",
                )
                .help(
                    "The virtio-blk function; pri=on turns a DMA to an unmapped page into a \
                     page request to the client (the PRI baseline) instead of an I/O error",
                ),
        )
        .arg(
            Arg::new("net")
                .long("net")
                .value_name("tap=NAME[,mac=MAC,queue_size=N,id=NAME]")
                .help("The virtio-net function, on TAP interface NAME (created if missing)"),
        )
        .group(
            ArgGroup::new("function")
                .args(["blk", "net"])
                .required(true),
        )
        .arg(
            Arg::new("seccomp")
                .long("seccomp")
                .value_name("true|false|log")
                .default_value("true")
                .value_parser(|s: &str| s.parse::<SeccompMode>())
                .help(
                    "Confine every thread to the system calls it needs: true (a forbidden call \
                     ends vdpu), log (the kernel logs it) or false",
                ),
        )
        .arg(
            Arg::new("v")
                .short('v')
                .action(ArgAction::Count)
                .help("More log output"),
        )
        .get_matches();
    log::set_max_level(match m.get_count("v") {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    });
    let _ = log::set_logger(&Logger);
    let built = match (m.get_one::<String>("blk"), m.get_one::<String>("net")) {
        (Some(blk), _) => {
            BlkConfig::parse(blk).and_then(|c| Ok((build_blk(&c)?, c.path.display().to_string())))
        }
        (None, Some(net)) => {
            NetFunctionConfig::parse(net).and_then(|c| Ok((build_net(&c)?, c.tap)))
        }
        (None, None) => {
            eprintln!("Error: --blk or --net is required");
            return ExitCode::FAILURE;
        }
    };
    let (mut dev, backend) = match built {
        Ok(d) => d,
        Err(e) => {
            eprintln!("Error: {}", vio::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let path = std::path::PathBuf::from(m.get_one::<String>("socket").unwrap());
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("Error: Failed to listen on {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_sigusr1);
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGTERM, on_exit_signal);
    let _ = vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_exit_signal);
    // Every file and socket vdpu opens is open by now: from here on it only serves.
    let mode = *m.get_one::<SeccompMode>("seccomp").unwrap();
    if let Err(e) =
        seccomp::init(mode, vdpu::seccomp::filters()).and_then(|()| seccomp::confine("vdpu"))
    {
        eprintln!("Error: {e}");
        return ExitCode::FAILURE;
    }
    let counters = dev.counters_handle();
    // Signal handlers only set flags; this thread does the printing (and the exit).
    let printer = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::narrow("signals");
            loop {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if DUMP_COUNTERS.swap(false, Ordering::Relaxed) {
                    eprintln!("vdpu counters: {}", counters());
                }
                if EXIT.load(Ordering::Relaxed) {
                    eprintln!("vdpu counters: {}", counters());
                    std::process::exit(0);
                }
            }
        });
    if let Err(e) = printer {
        eprintln!("Error: Failed to start the signal thread: {e}");
        return ExitCode::FAILURE;
    }
    log::info!("Serving {backend} on {}", path.display());
    vdpu::server::run(listener, &mut dev);
    ExitCode::SUCCESS
}
