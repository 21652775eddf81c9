//! Builds the guest test kernels (crates/irqvm/guests) into $OUT_DIR/guests and tells the crate
//! where they are: `env!("IRQVM_GUESTS_DIR")`. The built-in demo embeds `demo.elf` from there.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guests = manifest.join("guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("guests");
    println!("cargo:rerun-if-changed={}", guests.display());
    if !guests.join("Makefile").exists() {
        panic!(
            "irqvm: {} has no Makefile: the guest test kernels are missing (merge the `guests` branch)",
            guests.display()
        );
    }
    let status = Command::new("make")
        .arg("-C")
        .arg(&guests)
        .arg(format!("OUT={}", out.display()))
        .status()
        .unwrap_or_else(|e| {
            panic!("irqvm: cannot run make for the guests: {e} (is make installed?)")
        });
    if !status.success() {
        panic!(
            "irqvm: building the guests failed ({status}); they need gcc, as, ld and objcopy for x86-64"
        );
    }
    println!("cargo:rustc-env=IRQVM_GUESTS_DIR={}", out.display());
}
