//! Links the binary at its fixed address with its package's linker script (`linker.ld`,
//! bare-metal target only). Shared: the test guest builds with this script too
//! (`build` in guest/test/Cargo.toml).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed={dir}/linker.ld");
    if std::env::var("TARGET").unwrap_or_default() == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
