//! ch-remote: drive a running vio-hypervisor through its API socket, with Cloud Hypervisor's
//! subcommands.

use clap::{Arg, ArgMatches, Command};
use std::path::PathBuf;
use std::process::ExitCode;

fn command() -> Command {
    let simple = |name: &'static str, about: &'static str| Command::new(name).about(about);
    Command::new("ch-remote")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Remotely control a vio-hypervisor VMM")
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .value_name("PATH")
                .required(true)
                .help("HTTP API socket"),
        )
        .subcommand_required(true)
        .subcommand(simple("ping", "Ping the VMM"))
        .subcommand(simple("info", "Info on the VM"))
        .subcommand(simple("counters", "Counters from the VM's devices"))
        .subcommand(simple("pause", "Pause the VM"))
        .subcommand(simple("resume", "Resume the VM"))
        .subcommand(simple("shutdown", "Shut the VM down"))
        .subcommand(simple("reboot", "Reboot the VM"))
        .subcommand(simple("boot", "Boot a created VM"))
        .subcommand(simple("delete", "Delete a VM"))
        .subcommand(simple("shutdown-vmm", "Shut the VMM down"))
        .subcommand(simple(
            "vio-info",
            "Mode, request rate, queues and last switch of every vio device",
        ))
        .subcommand(
            Command::new("vio-mode")
                .about("Run a vio device snooped, passed through, or switched by its request rate")
                .arg(Arg::new("id").required(true).value_name("id"))
                .arg(
                    Arg::new("mode")
                        .required(true)
                        .value_parser(["snoop", "passthrough", "auto"])
                        .value_name("mode"),
                ),
        )
        .subcommand(
            Command::new("reclaim")
                .about("Reclaim up to <size> of the coldest guest memory now")
                .arg(
                    Arg::new("size")
                        .required(true)
                        .value_name("size")
                        .help("bytes, or with K/M/G"),
                )
                .arg(
                    Arg::new("unsafe-unmap-dma")
                        .long("unsafe-unmap-dma")
                        .action(clap::ArgAction::SetTrue)
                        .help("also reclaim DMA-mapped pages (the device will fault)"),
                ),
        )
        .subcommand(
            Command::new("send-migration")
                .about("Hand the VM over to another VMM (a live upgrade), then exit")
                .arg(
                    Arg::new("send_migration_config")
                        .required(true)
                        .value_name("url")
                        .help("unix:PATH of the receiving VMM"),
                )
                .arg(
                    Arg::new("send_migration_local")
                        .long("local")
                        .action(clap::ArgAction::SetTrue)
                        .help("Local migration: guest RAM is handed over, not copied"),
                ),
        )
        .subcommand(
            Command::new("receive-migration")
                .about("Wait for a VMM to hand its VM over")
                .arg(
                    Arg::new("receive_migration_config")
                        .required(true)
                        .value_name("url")
                        .help("unix:PATH to listen on"),
                ),
        )
        .subcommand(
            Command::new("create")
                .about("Create a VM from a JSON configuration")
                .arg(
                    Arg::new("path")
                        .required(true)
                        .value_name("vm_config.json")
                        .help("VmConfig JSON file"),
                ),
        )
}

fn run(m: &ArgMatches) -> Result<String, String> {
    let socket = PathBuf::from(m.get_one::<String>("api-socket").expect("required"));
    let (name, sub) = m.subcommand().expect("subcommand required");
    let (method, endpoint, body) = match name {
        "ping" => ("GET", "vmm.ping", None),
        "info" => ("GET", "vm.info", None),
        "counters" => ("GET", "vm.counters", None),
        "pause" => ("PUT", "vm.pause", None),
        "resume" => ("PUT", "vm.resume", None),
        "shutdown" => ("PUT", "vm.shutdown", None),
        "reboot" => ("PUT", "vm.reboot", None),
        "boot" => ("PUT", "vm.boot", None),
        "delete" => ("PUT", "vm.delete", None),
        "shutdown-vmm" => ("PUT", "vmm.shutdown", None),
        "vio-info" => ("GET", "vm.vio-info", None),
        "vio-mode" => {
            let id = sub.get_one::<String>("id").expect("required");
            let mode = sub.get_one::<String>("mode").expect("required");
            let body = serde_json::json!({ "id": id, "mode": mode });
            ("PUT", "vm.vio-mode", Some(body.to_string()))
        }
        "reclaim" => {
            let raw = sub.get_one::<String>("size").expect("required");
            let bytes = vmm::config::parse_size(raw).map_err(|e| format!("Invalid size: {e}"))?;
            let unsafe_dma = sub.get_flag("unsafe-unmap-dma");
            (
                "PUT",
                "vm.reclaim",
                Some(format!(
                    "{{\"bytes\":{bytes},\"unsafe_unmap_dma\":{unsafe_dma}}}"
                )),
            )
        }
        "send-migration" => {
            let url = sub
                .get_one::<String>("send_migration_config")
                .expect("required");
            let local = sub.get_flag("send_migration_local");
            let body = serde_json::json!({ "destination_url": url, "local": local });
            ("PUT", "vm.send-migration", Some(body.to_string()))
        }
        "receive-migration" => {
            let url = sub
                .get_one::<String>("receive_migration_config")
                .expect("required");
            let body = serde_json::json!({ "receiver_url": url });
            ("PUT", "vm.receive-migration", Some(body.to_string()))
        }
        "create" => {
            let path = sub.get_one::<String>("path").expect("required");
            let body =
                std::fs::read_to_string(path).map_err(|e| format!("Failed to read {path}: {e}"))?;
            ("PUT", "vm.create", Some(body))
        }
        other => return Err(format!("Unknown command {other}")),
    };
    api_client::simple_api_command(&socket, method, endpoint, body.as_deref()).map_err(
        |e| match e {
            api_client::Error::Server { status, message } => format!("Error {status}: {message}"),
            e => {
                let mut msg = e.to_string();
                if let Some(s) = std::error::Error::source(&e) {
                    msg.push_str(&format!(": {s}"));
                }
                msg
            }
        },
    )
}

fn main() -> ExitCode {
    match run(&command().get_matches()) {
        Ok(body) => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
