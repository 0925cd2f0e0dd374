//! The configuration model, its CLI syntax and its JSON form.

use super::*;
use std::path::PathBuf;

fn reason(e: ConfigError) -> String {
    e.to_string()
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("12X").is_err());
    assert!(parse_size("M").is_err());
    assert!(parse_size("").is_err());
    assert!(parse_size("99999999999T").is_err());
}

#[test]
fn memory() {
    assert_eq!(
        MemoryConfig::parse("size=1G,shared=on").unwrap(),
        MemoryConfig {
            size: 1 << 30,
            shared: true,
            reclaim: false
        }
    );
    assert!(
        MemoryConfig::parse("size=1G,shared=on,reclaim=on")
            .unwrap()
            .reclaim
    );
    assert!(
        reason(MemoryConfig::parse("size=1G,reclaim=on").unwrap_err()).contains("needs shared=on")
    );
    assert!(!MemoryConfig::parse("size=64M").unwrap().shared);
    let e = reason(MemoryConfig::parse("size=12X").unwrap_err());
    assert!(
        e.contains("--memory") && e.contains("size=12X") && e.contains("invalid size"),
        "{e}"
    );
    assert!(reason(MemoryConfig::parse("size=1M").unwrap_err()).contains("at least 16M"));
    assert!(
        reason(MemoryConfig::parse("size=64M,shared=maybe").unwrap_err()).contains("on or off")
    );
    assert!(reason(MemoryConfig::parse("sise=64M").unwrap_err()).contains("unknown key \"sise\""));
    assert!(reason(MemoryConfig::parse("64M").unwrap_err()).contains("expected key=value"));
}

#[test]
fn cpus() {
    assert_eq!(
        CpusConfig::parse("boot=2").unwrap(),
        CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 2
        }
    );
    let e = reason(CpusConfig::parse("boot=0").unwrap_err());
    assert!(
        e.contains("--cpus") && e.contains("boot must be at least 1"),
        "{e}"
    );
    assert!(reason(CpusConfig::parse("boot=x").unwrap_err()).contains("must be a number"));
    assert!(
        reason(CpusConfig::parse("boot=4,max=2").unwrap_err()).contains("max must not be below")
    );
    assert!(CpusConfig::parse("boot=300").is_err());
}

#[test]
fn disks() {
    let d = DiskConfig::parse("path=/tmp/x.img,readonly=on,id=disk0").unwrap();
    assert_eq!(d.path, PathBuf::from("/tmp/x.img"));
    assert!(d.readonly);
    assert_eq!(d.id.as_deref(), Some("disk0"));
    assert!(reason(DiskConfig::parse("readonly=on").unwrap_err()).contains("path is required"));
    assert!(
        reason(DiskConfig::parse("path=a,queue_size=100").unwrap_err()).contains("power of two")
    );
    assert!(reason(DiskConfig::parse("path=a,path=b").unwrap_err()).contains("given twice"));
    assert!(reason(DiskConfig::parse("path=a,colour=red").unwrap_err()).contains("unknown key"));
}

#[test]
fn reclaim_options() {
    let r = ReclaimConfig::parse("interval_ms=100,idle_ms=200,target_pct=60,compress=none,store_max=1G,fault_latency_us=5000").unwrap();
    assert_eq!(
        (r.interval_ms, r.idle_ms, r.target_pct, r.compress),
        (100, 200, 60, Compression::None)
    );
    assert_eq!((r.store_max_bytes, r.fault_latency_us), (1 << 30, 5000));
    for (bad, want) in [
        ("target_pct=101", "0..100"),
        ("compress=zip", "lz4 or none"),
        ("store=/nonexistent/dir", "does not exist"),
        ("interval=5", "unknown key"),
    ] {
        assert!(
            reason(ReclaimConfig::parse(bad).unwrap_err()).contains(want),
            "{bad}"
        );
    }
}

#[test]
fn user_devices() {
    let u = UserDeviceConfig::parse("socket=/tmp/v.sock,id=dpu0").unwrap();
    assert_eq!(
        u,
        UserDeviceConfig {
            socket: "/tmp/v.sock".into(),
            id: Some("dpu0".into()),
            io_fds: None,
            vio: None,
            pri: false,
        }
    );
    assert!(
        UserDeviceConfig::parse("socket=/tmp/v.sock,pri=on")
            .unwrap()
            .pri
    );
    assert!(UserDeviceConfig::parse("socket=/tmp/v.sock,pri=maybe").is_err());
    let v = UserDeviceConfig::parse_vio("socket=/tmp/v.sock,id=v0,poll_us=50").unwrap();
    assert_eq!(
        v.vio,
        Some(VioConfig {
            poll_us: 50,
            ..VioConfig::new(VioMode::Snoop)
        })
    );
    let a = UserDeviceConfig::parse_vio(
        "socket=/tmp/v.sock,mode=auto,iops_high=900,iops_low=100,dwell_ms=250",
    )
    .unwrap();
    assert_eq!(
        a.vio,
        Some(VioConfig {
            mode: VioMode::Auto,
            iops_high: 900,
            iops_low: 100,
            dwell_ms: 250,
            ..VioConfig::new(VioMode::Auto)
        })
    );
    assert_eq!(v.id.as_deref(), Some("v0"));
    assert!(!v.vio.unwrap().lockpage, "off unless asked for");
    let l = UserDeviceConfig::parse_vio("socket=/s,lockpage=on,lock_budget_pct=25").unwrap();
    assert_eq!(
        l.vio.map(|v| (v.lockpage, v.lock_budget_pct)),
        Some((true, 25))
    );
    let l = UserDeviceConfig::parse_vio("socket=/s,lockpage=on").unwrap();
    assert_eq!(
        l.vio.map(|v| v.lock_budget_pct),
        Some(VioConfig::DEFAULT_LOCK_BUDGET_PCT)
    );
    for (bad, want) in [
        (
            "socket=/s,lock_budget_pct=0",
            "lock_budget_pct must be 1..100",
        ),
        (
            "socket=/s,lock_budget_pct=101",
            "lock_budget_pct must be 1..100",
        ),
        (
            "socket=/s,lock_budget_pct=-1",
            "lock_budget_pct must be a number",
        ),
        ("socket=/s,lockpage=maybe", "lockpage"),
        (
            "socket=/s,mode=elastic",
            "mode must be snoop, passthrough or auto",
        ),
        (
            "socket=/s,iops_high=10,iops_low=10",
            "iops_low must be below iops_high",
        ),
        ("socket=/s,dwell_ms=0", "dwell_ms must be 1..3600000"),
        ("socket=/s,poll_us=0", "1..1000000"),
        ("socket=/s,poll_us=x", "poll_us"),
        ("mode=snoop", "socket is required"),
    ] {
        assert!(
            reason(UserDeviceConfig::parse_vio(bad).unwrap_err()).contains(want),
            "{bad}"
        );
    }
    let cfg = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock","vio":{{"mode":"snoop"}}}}]}}"#, kernel())).unwrap();
    assert_eq!(
        cfg.user_devices[0].vio.unwrap().poll_us,
        VioConfig::DEFAULT_POLL_US
    );
    assert_eq!(cfg.to_json()["user_devices"][0]["vio"]["mode"], "snoop");
    assert!(VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock","vio":{{"mode":"fast"}}}}]}}"#, kernel())).is_err());
    let pri = |dev: &str| {
        VmConfig::from_json(&format!(
            r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{dev}]}}"#,
            kernel()
        ))
    };
    let c = pri(r#"{"socket":"/tmp/x.sock","pri":true}"#).unwrap();
    assert!(c.user_devices[0].pri);
    assert_eq!(c.to_json()["user_devices"][0]["pri"], true);
    let e = pri(r#"{"socket":"/tmp/x.sock","pri":true,"vio":{"mode":"snoop"}}"#).unwrap_err();
    assert!(e.to_string().contains("user_devices[0].pri"), "{e}");
    assert!(u.io_fds() && !v.io_fds(), "a vio device owns its doorbells");
    assert!(!UserDeviceConfig::parse("socket=/s,io_fds=off")
        .unwrap()
        .io_fds());
    assert!(reason(UserDeviceConfig::parse("id=x").unwrap_err()).contains("socket is required"));
    assert!(
        reason(UserDeviceConfig::parse("socket=/s,bus=1").unwrap_err()).contains("unknown key")
    );
    let mut cfg = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}},"memory":{{"size":67108864,"shared":true}},"user_devices":[{{"socket":"/tmp/x.sock"}}]}}"#, kernel())).unwrap();
    assert_eq!(cfg.user_devices.len(), 1);
    cfg.memory.shared = false;
    assert_eq!(
        cfg.validate(),
        Err(ConfigError::UserDeviceNeedsSharedMemory)
    );
}

#[test]
fn serial() {
    assert_eq!(
        ConsoleMode::parse("serial", "tty").unwrap(),
        ConsoleMode::Tty
    );
    assert_eq!(
        ConsoleMode::parse("serial", "off").unwrap(),
        ConsoleMode::Off
    );
    assert_eq!(
        ConsoleMode::parse("serial", "file=/tmp/s").unwrap(),
        ConsoleMode::File("/tmp/s".into())
    );
    assert!(reason(ConsoleMode::parse("serial", "pty").unwrap_err()).contains("expected key=value"));
    assert!(ConsoleMode::parse("serial", "file=").is_err());
}

fn kernel() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

#[test]
fn json_round_trip() {
    let body = format!(
        r#"{{"payload":{{"kernel":"{}","cmdline":"a=b"}},"cpus":{{"boot_vcpus":2,"max_vcpus":2}},
            "memory":{{"size":268435456,"shared":true}},"serial":{{"mode":"Tty"}},"console":{{"mode":"Off"}},
            "rng":{{"src":"/dev/urandom"}},"net":null,"devices":[]}}"#,
        kernel()
    );
    let c = VmConfig::from_json(&body).unwrap();
    assert_eq!(c.cpus.boot_vcpus, 2);
    assert_eq!(
        c.memory,
        MemoryConfig {
            size: 256 << 20,
            shared: true,
            reclaim: false
        }
    );
    assert_eq!(c.serial, ConsoleMode::Tty);
    let again = VmConfig::from_json(&c.to_json().to_string()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn json_errors() {
    let k = kernel();
    let bad = [
        ("{", "Invalid VM configuration"),
        (r#"{"payload":{}}"#, "missing field `kernel`"),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"colour":1}}"#),
            "unknown field `colour`",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}","bogus":1}}}}"#),
            "unknown field `bogus`",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"tap":"t0","mtu":9000}}]}}"#),
            "net[0].mtu: not supported",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"num_queues":4}}]}}"#),
            "net[0].num_queues: num_queues must be 2",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"mac":"01:02:03:04:05:06"}}]}}"#),
            "multicast",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"net":[{{"tap":"a/b"}}]}}"#),
            "net[0].tap: tap must be an interface name",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":1024}}}}"#),
            "at least 16M",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":0}}}}"#),
            "at least 1",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"serial":{{"mode":"Pty"}}}}"#),
            "console mode \"Pty\" is not supported",
        ),
        (
            &format!(r#"{{"payload":{{"kernel":"{k}"}},"memory":{{"size":"big"}}}}"#),
            "Invalid VM configuration",
        ),
        (r#"{"payload":{"kernel":"/nonexistent"}}"#, "does not exist"),
    ];
    for (body, want) in bad {
        let e = VmConfig::from_json(body).unwrap_err().to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn net_option() {
    let n = NetConfig::parse(
        "tap=vt0,ip=10.1.2.3,mask=255.255.0.0,mac=02:00:00:00:00:09,id=n1,queue_size=64",
    )
    .unwrap();
    assert_eq!(n.tap.as_deref(), Some("vt0"));
    assert_eq!(n.ip, std::net::Ipv4Addr::new(10, 1, 2, 3));
    assert_eq!(n.mask, std::net::Ipv4Addr::new(255, 255, 0, 0));
    assert_eq!((n.num_queues, n.queue_size), (2, 64));
    let d = NetConfig::parse("tap=vt0").unwrap();
    assert_eq!(
        d.ip,
        std::net::Ipv4Addr::new(192, 168, 249, 1),
        "Cloud Hypervisor's default"
    );
    for (bad, want) in [
        ("tap=vt0,ip=300.1.1.1", "ip must be an IPv4 address"),
        ("tap=vt0,num_queues=1", "num_queues must be 2"),
        ("tap=vt0,queue_size=100", "power of two"),
        ("tap=vt0,mac=xx", "not a MAC address"),
        ("tap=0123456789abcdef", "1..15 bytes"),
        ("tap=vt0,speed=fast", "unknown"),
    ] {
        let e = reason(NetConfig::parse(bad).unwrap_err());
        assert!(e.contains(want), "{bad}: {e}");
    }
}

/// A network device as Cloud Hypervisor writes it: its defaults for what this VMM does not
/// have are accepted, the rest is the model's.
#[test]
fn cloud_hypervisor_net_config() {
    let body = format!(
        r#"{{"payload":{{"kernel":"{}"}},"net":[{{"tap":"vmtap0","ip":"10.0.0.1","mask":"255.0.0.0",
            "mac":"52:54:00:aa:bb:cc","host_mac":null,"mtu":null,"iommu":false,"num_queues":2,
            "queue_size":128,"vhost_user":false,"vhost_socket":null,"vhost_mode":"Client","id":"n0",
            "fds":null,"rate_limiter_config":null,"pci_segment":0,"offload_tso":true,
            "offload_ufo":true,"offload_csum":true}}]}}"#,
        kernel()
    );
    let mut c = VmConfig::from_json(&body).unwrap();
    c.normalize();
    let n = &c.net[0];
    assert_eq!(n.tap.as_deref(), Some("vmtap0"));
    assert_eq!(n.ip, std::net::Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(n.mac.as_deref(), Some("52:54:00:aa:bb:cc"));
    assert_eq!((n.num_queues, n.queue_size), (2, 128));
    assert_eq!(n.mac_bytes(), [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    // An unnamed device gets an id and a fixed random MAC (it must survive a live upgrade).
    let mut c = VmConfig::from_json(&format!(
        r#"{{"payload":{{"kernel":"{}"}},"net":[{{}}]}}"#,
        kernel()
    ))
    .unwrap();
    c.normalize();
    let n = &c.net[0];
    assert_eq!(n.id.as_deref(), Some("_net0"));
    let mac = n.mac_bytes();
    assert_eq!(mac[0] & 3, 2, "unicast, locally administered: {mac:?}");
    assert_eq!(n.mac_bytes(), mac);
    let again = VmConfig::from_json(&c.to_json().to_string()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn missing_files() {
    let cfg = VmConfig::new("/nonexistent/kernel".into());
    assert_eq!(
        cfg.validate(),
        Err(ConfigError::KernelMissing("/nonexistent/kernel".into()))
    );
}

/// One model: what the CLI builds and what `vm.create` parses are the same values, reclaim
/// policy included, and `vm.info`'s JSON parses back to the same configuration.
#[test]
fn cli_and_json_build_the_same_config() {
    let k = kernel();
    let dir = std::env::temp_dir();
    let mut cli = VmConfig::new(k.clone().into());
    cli.memory = MemoryConfig::parse("size=256M,shared=on,reclaim=on").unwrap();
    cli.cpus = CpusConfig::parse("boot=2").unwrap();
    cli.reclaim = ReclaimConfig::parse(&format!(
        "interval_ms=100,idle_ms=200,target_pct=60,store={},compress=none,store_max=1G",
        dir.display()
    ))
    .unwrap();
    cli.user_devices.push(
        UserDeviceConfig::parse_vio("socket=/tmp/v.sock,id=v0,poll_us=50,mode=auto,iops_high=8000")
            .unwrap(),
    );
    cli.serial = ConsoleMode::Null;
    let json = VmConfig::from_json(&format!(
        r#"{{"payload":{{"kernel":"{k}"}},"cpus":{{"boot_vcpus":2}},
            "memory":{{"size":268435456,"shared":true,"reclaim":true}},
            "reclaim":{{"interval_ms":100,"idle_ms":200,"target_pct":60,"store":"{}",
                        "compress":"none","store_max":1073741824}},
            "user_devices":[{{"socket":"/tmp/v.sock","id":"v0","vio":{{"mode":"auto","poll_us":50,"iops_high":8000}}}}]}}"#,
        dir.display()
    ))
    .unwrap();
    assert_eq!(json, cli);
    assert_eq!(
        VmConfig::from_json(&cli.to_json().to_string()).unwrap(),
        cli
    );
    assert_eq!(cli.to_json()["reclaim"]["target_pct"], 60);
    for (body, want) in [
        (
            r#""reclaim":{"target_pct":101}"#,
            "target_pct must be 0..100",
        ),
        (r#""reclaim":{"compress":"zip"}"#, "unknown variant `zip`"),
        (
            r#""reclaim":{"store":"/nonexistent/dir"}"#,
            "does not exist",
        ),
        (r#""reclaim":{"interval":5}"#, "unknown field `interval`"),
    ] {
        let e = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{k}"}},{body}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn defaults_are_the_models() {
    let c = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{}"}}}}"#, kernel())).unwrap();
    assert_eq!(c.memory, MemoryConfig::default());
    assert_eq!(c.memory.size, 512 << 20);
    assert_eq!((c.cpus.boot_vcpus, c.cpus.max_vcpus), (1, 1));
    assert_eq!(c.reclaim, ReclaimConfig::default());
    assert_eq!(
        MemoryConfig::parse("shared=on").unwrap().size,
        MemoryConfig::DEFAULT_SIZE
    );
}

#[test]
fn initramfs_in_both_front_doors() {
    let k = kernel();
    let c = VmConfig::from_json(&format!(
        r#"{{"payload":{{"kernel":"{k}","initramfs":"{k}"}}}}"#
    ))
    .unwrap();
    assert_eq!(
        c.payload.initramfs.as_deref(),
        Some(std::path::Path::new(&k))
    );
    assert_eq!(c.to_json()["payload"]["initramfs"], k.as_str());
    let e = VmConfig::from_json(&format!(
        r#"{{"payload":{{"kernel":"{k}","initramfs":"/nonexistent.cpio"}}}}"#
    ))
    .unwrap_err();
    assert_eq!(e, ConfigError::InitramfsMissing("/nonexistent.cpio".into()));
    let none = VmConfig::from_json(&format!(r#"{{"payload":{{"kernel":"{k}"}}}}"#)).unwrap();
    assert!(none.to_json()["payload"].get("initramfs").is_none());
}

/// Devices left unnamed get Cloud Hypervisor's ids (one counter, names the user took skipped),
/// and `vm.info` reports them.
#[test]
fn unnamed_devices_get_cloud_hypervisors_ids() {
    let mut c = VmConfig::new(kernel().into());
    for (path, id) in [("/a", None), ("/b", Some("_disk1")), ("/c", None)] {
        c.disks.push(DiskConfig {
            id: id.map(str::to_string),
            ..DiskConfig::parse(&format!("path={path}")).unwrap()
        });
    }
    c.user_devices
        .push(UserDeviceConfig::parse("socket=/tmp/v.sock").unwrap());
    c.normalize();
    let ids: Vec<_> = c.disks.iter().map(|d| d.id.clone().unwrap()).collect();
    assert_eq!(ids, ["_disk0", "_disk1", "_disk2"]);
    assert_eq!(c.user_devices[0].id.as_deref(), Some("_vfio_user3"));
    assert_eq!(c.to_json()["disks"][2]["id"], "_disk2");
}
