//! The bench harness itself: `scripts/bench.sh --quick` runs every suite of the paper's set
//! small (with our own binary as `--peer-vmm`), and each must produce well-formed results in
//! which every configuration has numbers.
//! What the numbers are is not checked here (performance claims come from full runs).

mod common;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const SUITES: [&str; 7] = [
    "overhead", "iopf", "memory", "switch", "upgrade", "walker", "net",
];
/// Suites that draw a plot.
const PLOTTED: [&str; 4] = ["overhead", "iopf", "memory", "net"];

fn load(dir: &Path, suite: &str, ext: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("{suite}-")) && n.ends_with(ext)
        })
}

fn positive_number(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some_and(|x| x > 0.0),
        Value::Object(m) => m.values().any(positive_number),
        Value::Array(a) => a.iter().any(positive_number),
        _ => false,
    }
}

#[test]
fn quick_bench_produces_numbers_for_every_configuration() {
    if !common::kvm_available("quick_bench_produces_numbers_for_every_configuration") {
        return;
    }
    let out = tempfile_dir();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Our own binary as the peer VMM: its configurations must show up like any other.
    let run = Command::new(root.join("scripts/bench.sh"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .arg("--peer-vmm")
        .arg(env!("CARGO_BIN_EXE_vio-hypervisor"))
        .current_dir(root)
        .output()
        .expect("scripts/bench.sh runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed: {stderr}");
    // Progress lines name the suite, the configuration and the repetition.
    assert!(
        stderr.contains("overhead: vio snoop, latency_us=0, qd=1, run 1/1"),
        "{stderr}"
    );
    for suite in SUITES {
        let path = load(&out, suite, ".json").unwrap_or_else(|| panic!("no {suite} results"));
        let j: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(j["suite"], suite);
        assert_eq!(j["quick"], true);
        assert!(j["machine"]["cores"].as_u64().unwrap() > 0);
        let rows = j["rows"].as_array().unwrap();
        assert!(!rows.is_empty(), "{suite}: no rows");
        for r in rows {
            assert!(
                !r["result"].as_str().unwrap().is_empty(),
                "{suite}: empty row {r}"
            );
        }
        let reps = j["repetitions"].as_array().unwrap();
        assert!(!reps.is_empty(), "{suite}: no repetitions");
        for r in reps {
            assert!(
                r["config"].is_string(),
                "{suite}: repetition without a configuration: {r}"
            );
            assert!(
                positive_number(&r["numbers"]),
                "{suite}: a repetition without numbers: {r}"
            );
        }
        if suite == "overhead" {
            let configs: BTreeSet<String> = reps
                .iter()
                .map(|r| {
                    let c = r["config"].as_str().unwrap();
                    assert!(r["numbers"]["iops"].as_f64().unwrap() > 0.0, "{r}");
                    c.split(',').next().unwrap().to_string()
                })
                .collect();
            for want in [
                "emulated virtio-blk",
                "vdpu passthrough",
                "vio snoop",
                "vio auto",
                "peer emulated virtio-blk",
                "peer vdpu passthrough",
            ] {
                assert!(configs.contains(want), "overhead: no {want} in {configs:?}");
            }
        }
        if PLOTTED.contains(&suite) {
            let png = load(&out, suite, ".png").unwrap_or_else(|| panic!("no {suite} plot"));
            let bytes = std::fs::read(png).unwrap();
            assert!(bytes.starts_with(b"\x89PNG"), "{suite}: not a PNG");
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vio-bench-quick-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
