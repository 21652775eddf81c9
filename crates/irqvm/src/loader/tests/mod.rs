//! Loader tests: each format's happy path and every guest the project builds (`formats`), the
//! multiboot info block field by field (`boot_info`), every malformed-image error by name
//! (`malformed`), and fuzz-style properties: truncations, byte flips, random headers and random
//! bytes never panic, and whatever loads lies inside RAM (`fuzz`).
//!
//! The images are built byte by byte here, so each test controls exactly the field it breaks.

mod boot_info;
mod formats;
mod fuzz;
mod linux;
mod malformed;

use vm_memory::{Bytes, GuestAddress};

use super::multiboot::MBH_AOUT_KLUDGE;
use super::*;
use crate::memory::create_guest_memory;

const MIB: u64 = 1 << 20;

fn ram(size: u64) -> GuestRam {
    create_guest_memory(size).unwrap()
}

fn read_u32(mem: &GuestRam, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn read_u64(mem: &GuestRam, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn read_cstr(mem: &GuestRam, addr: u64) -> String {
    let mut out = Vec::new();
    for i in 0..4096 {
        let b: u8 = mem.read_obj(GuestAddress(addr + i)).unwrap();
        if b == 0 {
            break;
        }
        out.push(b);
    }
    String::from_utf8(out).unwrap()
}

fn request(kernel: &[u8]) -> LoadRequest<'_> {
    LoadRequest {
        kernel,
        cmdline: "kernel.elf".into(),
        modules: vec![],
        raw: None,
    }
}

/// A multiboot header with `flags` and a valid checksum, plus the a.out fields.
fn multiboot_header(flags: u32, fields: [u32; 5]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MULTIBOOT_HEADER_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    let checksum = 0u32
        .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
        .wrapping_sub(flags);
    h.extend_from_slice(&checksum.to_le_bytes());
    for f in fields {
        h.extend_from_slice(&f.to_le_bytes());
    }
    h
}

/// One PT_LOAD segment of a test ELF: `code` at `paddr` (seen at `vaddr`) plus `bss` zero bytes.
struct Seg<'a> {
    vaddr: u32,
    paddr: u32,
    code: &'a [u8],
    bss: u32,
}

const ELF32_EHSIZE: usize = 0x34;
const ELF32_PHENTSIZE: usize = 32;

/// A minimal ELF32 i386 executable with one PT_LOAD per `segs`, their data after the headers.
fn elf32_segments(entry: u32, segs: &[Seg<'_>]) -> Vec<u8> {
    let mut f = vec![0u8; ELF32_EHSIZE];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&(ELF32_EHSIZE as u32).to_le_bytes()); // phoff
    f[40..42].copy_from_slice(&(ELF32_EHSIZE as u16).to_le_bytes()); // ehsize
    f[42..44].copy_from_slice(&(ELF32_PHENTSIZE as u16).to_le_bytes());
    f[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes()); // phnum
    let mut offset = ELF32_EHSIZE + segs.len() * ELF32_PHENTSIZE;
    for s in segs {
        let mut ph = [0u8; ELF32_PHENTSIZE];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&(offset as u32).to_le_bytes());
        ph[8..12].copy_from_slice(&s.vaddr.to_le_bytes());
        ph[12..16].copy_from_slice(&s.paddr.to_le_bytes());
        ph[16..20].copy_from_slice(&(s.code.len() as u32).to_le_bytes());
        ph[20..24].copy_from_slice(&(s.code.len() as u32).wrapping_add(s.bss).to_le_bytes());
        ph[24..28].copy_from_slice(&7u32.to_le_bytes());
        f.extend_from_slice(&ph);
        offset += s.code.len();
    }
    for s in segs {
        f.extend_from_slice(s.code);
    }
    f
}

/// A minimal ELF32 executable: one PT_LOAD of `code` at `paddr` (vaddr `vaddr`) with `bss`
/// extra bytes. The program header is at 0x34, its data at 0x54.
fn elf32(entry: u32, vaddr: u32, paddr: u32, code: &[u8], bss: u32) -> Vec<u8> {
    elf32_segments(
        entry,
        &[Seg {
            vaddr,
            paddr,
            code,
            bss,
        }],
    )
}

/// A minimal ELF64 executable with one PT_LOAD of `code` at `addr`. The program header is at
/// 0x40, its data at 0x78.
fn elf64(entry: u64, addr: u64, code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x78];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&0x40u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 0x40;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// A multiboot ELF32 kernel like the guests: header first in a segment at 1 MiB, entry after it.
fn multiboot_elf32() -> Vec<u8> {
    let mut code = multiboot_header(0x3, [0; 5])[..12].to_vec();
    code.extend_from_slice(&[0xF4; 20]); // hlt
    elf32(0x10_000C, 0x10_0000, 0x10_0000, &code, 0x1000)
}

/// An a.out-kludge image: header at file offset 8, loaded at 0x200000.
fn aout_image() -> Vec<u8> {
    let load = 0x20_0000u32;
    let mut f = vec![0x90u8; 8];
    let header_addr = load + 8;
    let total = 8 + 32 + 16;
    f.extend(multiboot_header(
        MBH_AOUT_KLUDGE | 0x2,
        [
            header_addr,
            load,
            load + total,
            load + total + 0x1000,
            load + 40,
        ],
    ));
    f.extend_from_slice(&[0xF4; 16]);
    f
}
