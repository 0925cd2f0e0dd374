fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed={dir}/guest.ld");
    println!("cargo:rerun-if-changed={dir}/src/boot.S");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--no-dynamic-linker",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T{dir}/guest.ld");
}
