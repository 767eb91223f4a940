//! Links the guest with its own linker script (PVH note, fixed load address).
fn main() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/guest.ld");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=src/boot.s");
}
