//! Arbitrary `vm.create` bodies (and live-upgrade configurations) through parsing and
//! validation. A configuration that is accepted must survive its own round trip: what
//! `vm.info` reports is accepted again, unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::VmConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let _ = VmConfig::from_json(body);
    if let Ok(c) = VmConfig::from_migration_json(body) {
        let json = c.to_json();
        let again = VmConfig::from_migration_json(&json.to_string())
            .unwrap_or_else(|e| panic!("an accepted configuration's JSON is refused: {e}"));
        assert_eq!(again.to_json(), json);
    }
});
