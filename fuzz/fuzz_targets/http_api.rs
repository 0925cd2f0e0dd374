//! Arbitrary bytes on an API connection: the HTTP request parser and the routing behind it
//! (request bodies, including a whole `vm.create` VmConfig), as a connection reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for r in vmm::api::http::route_requests(data) {
        if let Err(e) = r {
            // Whatever a client sends is the client's error, said on one line.
            assert!((400..500).contains(&e.status()), "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
});
