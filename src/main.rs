//! vio-hypervisor: boot a VM from the command line, with Cloud Hypervisor's flags.

use clap::{Arg, ArgAction, ArgMatches, Command};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;
use thiserror::Error;
use virtio_devices::seccomp::{self, SeccompError, SeccompMode};
use vmm::config::{
    ConfigError, ConsoleMode, CpusConfig, DiskConfig, MemoryConfig, NetConfig, OptionParser,
    ReclaimConfig, UserDeviceConfig, VmConfig,
};
use vmm::{error_chain, Vmm, VmmExit};

#[derive(Debug, Error)]
enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("Failed to start the VM")]
    Vm(#[from] vmm::VmmError),
    #[error("API server")]
    Api(#[from] vmm::api::http::HttpServerError),
    #[error("The guest crashed: {0}")]
    GuestCrash(String),
    #[error("seccomp")]
    Seccomp(#[from] SeccompError),
}

struct Logger {
    start: Instant,
    out: Mutex<std::io::Stderr>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        let thread = std::thread::current();
        let _ = writeln!(
            self.out.lock().unwrap(),
            "vio-hypervisor: {}.{:06}s: <{}> {}:{}:{} -- {}",
            t.as_secs(),
            t.subsec_micros(),
            thread.name().unwrap_or("?"),
            r.level(),
            r.file().unwrap_or("?"),
            r.line().unwrap_or(0),
            r.args()
        );
    }

    fn flush(&self) {}
}

fn command() -> Command {
    Command::new("vio-hypervisor")
        .version(env!("CARGO_PKG_VERSION"))
        .about("VMM with VIO: memory reclaim for VMs with passthrough virtio devices")
        .arg(
            Arg::new("kernel")
                .long("kernel")
                .value_name("PATH")
                .help("PVH ELF payload to boot"),
        )
        .arg(
            Arg::new("cmdline")
                .long("cmdline")
                .value_name("STRING")
                .help("Payload command line"),
        )
        .arg(
            Arg::new("initramfs")
                .long("initramfs")
                .value_name("PATH")
                .help("Initramfs handed to the payload (PVH module)"),
        )
        .arg(
            Arg::new("memory")
                .long("memory")
                .value_name("size=<size>,shared=on|off")
                .help("Guest RAM (memfd-backed)"),
        )
        .arg(
            Arg::new("cpus")
                .long("cpus")
                .value_name("boot=<n>,max=<n>")
                .help("vCPUs"),
        )
        .arg(
            Arg::new("disk")
                .long("disk")
                .value_name("path=<file>,readonly=on|off,id=<name>,num_queues=<n>,queue_size=<n>")
                .action(ArgAction::Append)
                .help("virtio-blk disk emulated by the VMM (repeatable)"),
        )
        .arg(
            Arg::new("net")
                .long("net")
                .value_name(
                    "tap=<name>,ip=<ipv4>,mask=<ipv4>,mac=<mac>,id=<name>,num_queues=<n>,\
                     queue_size=<n>",
                )
                .action(ArgAction::Append)
                .help("virtio-net device emulated by the VMM over a TAP interface (repeatable)"),
        )
        .arg(
            Arg::new("serial")
                .long("serial")
                .value_name("off|tty|null|file=<path>")
                .help("COM1 output")
                .default_value("tty"),
        )
        .arg(
            Arg::new("console")
                .long("console")
                .value_name("off|tty|null|file=<path>")
                .help("virtio-console (accepted, not provided)")
                .default_value("off"),
        )
        .arg(
            Arg::new("reclaim")
                .long("reclaim")
                .value_name("interval_ms=<ms>,idle_ms=<ms>,target_pct=<0..100>,store=<dir>,compress=lz4|none,store_max=<size>,fault_latency_us=<us>")
                .help("Guest memory reclaim settings (with --memory reclaim=on)"),
        )
        .arg(
            Arg::new("user-device")
                .long("user-device")
                .value_name("socket=<path>,id=<name>,io_fds=on|off")
                .action(ArgAction::Append)
                .help("Passthrough device served over vfio-user (repeatable)"),
        )
        .arg(
            Arg::new("vio")
                .long("vio")
                .value_name("socket=<path>,id=<name>,mode=snoop,poll_us=<us>")
                .action(ArgAction::Append)
                .help("vfio-user device passed through under VIO: memory stays reclaimable (repeatable)"),
        )
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .value_name("path=<socket>|<socket>")
                .help("Serve the HTTP API on a Unix socket"),
        )
        .arg(
            Arg::new("seccomp")
                .long("seccomp")
                .value_name("true|false|log")
                .default_value("true")
                .value_parser(|s: &str| s.parse::<SeccompMode>())
                .help(
                    "Confine every thread to the system calls it needs: true (a forbidden call \
                     ends the VMM), log (the kernel logs it) or false",
                ),
        )
        .arg(
            Arg::new("v")
                .short('v')
                .action(ArgAction::Count)
                .help("More log output (repeatable)"),
        )
}

fn build_config(m: &ArgMatches) -> Result<VmConfig, ConfigError> {
    let kernel = m.get_one::<String>("kernel").ok_or(ConfigError::NoKernel)?;
    let all = |flag: &str| m.get_many::<String>(flag).into_iter().flatten();
    let mut config = VmConfig::new(PathBuf::from(kernel));
    config.payload.cmdline = m.get_one::<String>("cmdline").cloned().unwrap_or_default();
    config.payload.initramfs = m.get_one::<String>("initramfs").map(PathBuf::from);
    if let Some(s) = m.get_one::<String>("memory") {
        config.memory = MemoryConfig::parse(s)?;
    }
    if let Some(s) = m.get_one::<String>("cpus") {
        config.cpus = CpusConfig::parse(s)?;
    }
    if let Some(s) = m.get_one::<String>("reclaim") {
        config.reclaim = ReclaimConfig::parse(s)?;
    }
    config.disks = all("disk")
        .map(|s| DiskConfig::parse(s))
        .collect::<Result<_, _>>()?;
    config.net = all("net")
        .map(|s| NetConfig::parse(s))
        .collect::<Result<_, _>>()?;
    config.user_devices = all("user-device")
        .map(|s| UserDeviceConfig::parse(s))
        .chain(all("vio").map(|s| UserDeviceConfig::parse_vio(s)))
        .collect::<Result<_, _>>()?;
    config.serial = ConsoleMode::parse("serial", m.get_one::<String>("serial").unwrap())?;
    config.console = ConsoleMode::parse("console", m.get_one::<String>("console").unwrap())?;
    config.normalize();
    config.validate()?;
    Ok(config)
}

fn api_socket_path(raw: &str) -> Result<PathBuf, ConfigError> {
    if raw.starts_with("path=") {
        let p = OptionParser::parse("api-socket", raw, &["path"])?;
        return Ok(PathBuf::from(
            p.get("path")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| p.error("empty path"))?,
        ));
    }
    if raw.is_empty() {
        return Err(ConfigError::Parse {
            flag: "api-socket",
            value: raw.into(),
            reason: "empty path".into(),
        });
    }
    Ok(PathBuf::from(raw))
}

fn run(m: &ArgMatches, start: Instant) -> Result<(), Error> {
    // Before anything else runs: every later thread is created under this one's filter.
    let mode = *m.get_one::<SeccompMode>("seccomp").unwrap();
    seccomp::init(mode, vmm::seccomp_filters::filters()?)?;
    seccomp::confine("vmm")?;
    let api = m
        .get_one::<String>("api-socket")
        .map(|s| api_socket_path(s))
        .transpose()?;
    // As in Cloud Hypervisor: with a payload the VM boots at once; without one the VMM
    // waits for vm.create and vm.boot on the API.
    let config = match (m.get_one::<String>("kernel"), &api) {
        (Some(_), _) => Some(build_config(m)?),
        (None, Some(_)) => None,
        (None, None) => return Err(ConfigError::NoKernel.into()),
    };
    let mut vmm = Vmm::new(start);
    if let Some(path) = &api {
        vmm::api::http::start(path, vmm.api_sender())?;
        log::info!("API server on {}", path.display());
    }
    if let Some(config) = config {
        vmm.create(config)?;
        vmm.boot()?;
    }
    match vmm.control_loop() {
        VmmExit::Clean | VmmExit::Migrated => Ok(()),
        VmmExit::GuestCrash(msg) => Err(Error::GuestCrash(msg)),
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let m = command().get_matches();
    let level = match m.get_count("v") {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    log::set_max_level(level);
    let _ = log::set_boxed_logger(Box::new(Logger {
        start,
        out: Mutex::new(std::io::stderr()),
    }));
    match run(&m, start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("Error: {}", error_chain(&e));
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
