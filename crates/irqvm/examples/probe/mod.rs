//! What the host probes that assemble their guest at run time share: `as`/`ld`/`objcopy` into a
//! flat image at a load address, the addresses of named symbols, and 64-bit interrupt gates.

use std::path::Path;
use std::process::Command;

/// Assembles `source` (64-bit GNU as) linked at `load` into a flat binary in `dir`; returns the
/// binary and the addresses of `symbols`, in their order.
pub fn assemble(dir: &Path, source: &str, load: u64, symbols: &[&str]) -> (Vec<u8>, Vec<u64>) {
    let src = dir.join("probe.S");
    std::fs::write(&src, source).expect("write the guest source");
    let run = |cmd: &mut Command| assert!(cmd.status().expect("binutils").success(), "{cmd:?}");
    run(Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(dir.join("probe.o"))
        .arg(&src));
    run(Command::new("ld")
        .arg(format!("-Ttext={load:#x}"))
        .arg("-o")
        .arg(dir.join("probe.elf"))
        .arg(dir.join("probe.o")));
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(dir.join("probe.elf"))
        .arg(dir.join("probe.bin")));
    let nm = Command::new("nm")
        .arg(dir.join("probe.elf"))
        .output()
        .expect("nm");
    let table = String::from_utf8_lossy(&nm.stdout).to_string();
    let addr = |name: &str| {
        table
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .and_then(|l| u64::from_str_radix(l.split(' ').next()?, 16).ok())
            .unwrap_or_else(|| panic!("no symbol {name}"))
    };
    let image = std::fs::read(dir.join("probe.bin")).expect("probe.bin");
    (image, symbols.iter().map(|s| addr(s)).collect())
}

/// An interrupt gate (64-bit code selector 0x18, DPL 0, present).
pub fn gate(handler: u64) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x18u16.to_le_bytes());
    g[5] = 0x8E;
    g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    g
}
