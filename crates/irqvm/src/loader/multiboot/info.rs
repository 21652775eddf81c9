//! The multiboot v1 boot information (spec §3.3): the info block with memory sizes, the memory
//! map, the command line, the modules and the boot loader's name. Every image format irqvm
//! loads today gets it (plain ELF and raw images find it through EBX/RDI).

use crate::loader::error::LoaderError;
use crate::loader::layout::{
    in_ram, memory_map, write_guest, EXTENDED_MEMORY_START, INFO_BASE, INFO_END, LOW_MEMORY_END,
    PAGE,
};
use crate::loader::request::Module;
use crate::memory::{GuestRam, LOW_RAM_END};

/// Info block flag bits (spec §3.3).
pub(in crate::loader) const MBI_MEMORY: u32 = 1 << 0;
pub(in crate::loader) const MBI_CMDLINE: u32 = 1 << 2;
pub(in crate::loader) const MBI_MODS: u32 = 1 << 3;
pub(in crate::loader) const MBI_MMAP: u32 = 1 << 6;
const MBI_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Size of the info block we write (through the VBE fields, spec §3.3), zero padded.
const MBI_SIZE: usize = 120;
/// Byte offsets of the info block fields we fill (spec §3.3).
const MBI_FLAGS: usize = 0;
const MBI_MEM_LOWER: usize = 4;
const MBI_MEM_UPPER: usize = 8;
const MBI_CMDLINE_ADDR: usize = 16;
const MBI_MODS_COUNT: usize = 20;
const MBI_MODS_ADDR: usize = 24;
const MBI_MMAP_LENGTH: usize = 44;
const MBI_MMAP_ADDR: usize = 48;
const MBI_LOADER_NAME: usize = 64;
/// Memory map entry: size(4) base(8) length(8) type(4); `size` excludes itself (spec §3.3).
const MMAP_ENTRY_SIZE: usize = 24;
/// Module structure: mod_start, mod_end, string, reserved (spec §3.3).
const MODULE_ENTRY_SIZE: usize = 16;

/// A bump allocator over a host copy of the boot information area.
struct InfoArea {
    bytes: Vec<u8>,
}

impl InfoArea {
    fn alloc(&mut self, len: usize, align: usize) -> Result<(usize, u64), LoaderError> {
        let start = self.bytes.len().next_multiple_of(align);
        let end = start
            .checked_add(len)
            .ok_or(LoaderError::BootInfoTooLarge)?;
        if end as u64 > INFO_END - INFO_BASE {
            return Err(LoaderError::BootInfoTooLarge);
        }
        self.bytes.resize(end, 0);
        Ok((start, INFO_BASE + start as u64))
    }

    /// Stores `value` at `at`, inside a range `alloc` returned. Guest addresses in the info block
    /// are 32 bits wide; everything the area holds is below 1 MiB, so they fit.
    fn put_u32(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
    }

    fn put_u64(&mut self, at: usize, value: u64) {
        self.bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// A NUL-terminated string; returns its guest address.
    fn string(&mut self, s: &str) -> Result<u64, LoaderError> {
        let (at, addr) = self.alloc(s.len() + 1, 1)?;
        self.bytes[at..at + s.len()].copy_from_slice(s.as_bytes());
        Ok(addr)
    }
}

/// Places the modules (page aligned) after the kernel and writes the multiboot info block with
/// memory sizes, memory map, command line, modules and boot loader name. Returns its address.
pub fn write_boot_info(
    mem: &GuestRam,
    cmdline: &str,
    modules: &[Module<'_>],
    kernel_end: u64,
) -> Result<u64, LoaderError> {
    let mut area = InfoArea { bytes: Vec::new() };
    let (info, info_addr) = area.alloc(MBI_SIZE, 8)?;
    let mut flags = MBI_MEMORY | MBI_CMDLINE | MBI_MMAP | MBI_BOOT_LOADER_NAME;
    let low_end = crate::memory::ram_size(mem).min(LOW_RAM_END);
    area.put_u32(info + MBI_MEM_LOWER, LOW_MEMORY_END / 1024);
    let upper_kib = (low_end - EXTENDED_MEMORY_START) / 1024;
    area.put_u32(info + MBI_MEM_UPPER, upper_kib.min(u64::from(u32::MAX)));
    let cmdline = area.string(cmdline)?;
    area.put_u32(info + MBI_CMDLINE_ADDR, cmdline);
    write_memory_map(mem, &mut area, info)?;
    if !modules.is_empty() {
        flags |= MBI_MODS;
        write_modules(mem, &mut area, info, modules, kernel_end)?;
    }
    let name = area.string("irqvm")?;
    area.put_u32(info + MBI_LOADER_NAME, name);
    area.put_u32(info + MBI_FLAGS, u64::from(flags));
    write_guest(mem, "boot information", INFO_BASE, &area.bytes)?;
    Ok(info_addr)
}

/// The "mmap" fields: the guest's memory map in multiboot's entry format.
fn write_memory_map(mem: &GuestRam, area: &mut InfoArea, info: usize) -> Result<(), LoaderError> {
    let map = memory_map(mem);
    let (mmap, mmap_addr) = area.alloc(map.len() * MMAP_ENTRY_SIZE, 8)?;
    for (i, entry) in map.iter().enumerate() {
        let e = mmap + i * MMAP_ENTRY_SIZE;
        area.put_u32(e, (MMAP_ENTRY_SIZE - 4) as u64);
        area.put_u64(e + 4, entry.base);
        area.put_u64(e + 12, entry.len);
        area.put_u32(e + 20, entry.kind as u64);
    }
    area.put_u32(info + MBI_MMAP_LENGTH, (map.len() * MMAP_ENTRY_SIZE) as u64);
    area.put_u32(info + MBI_MMAP_ADDR, mmap_addr);
    Ok(())
}

/// Copies the modules into guest memory one after the other from the end of the kernel, each
/// page aligned (which also satisfies header flag 0, spec §3.1.2), and writes their list. A
/// module's addresses are 32-bit fields, so it must end below 4 GiB.
fn write_modules(
    mem: &GuestRam,
    area: &mut InfoArea,
    info: usize,
    modules: &[Module<'_>],
    kernel_end: u64,
) -> Result<(), LoaderError> {
    let (mods, mods_addr) = area.alloc(modules.len() * MODULE_ENTRY_SIZE, 8)?;
    let mut next = kernel_end.max(EXTENDED_MEMORY_START);
    for (i, module) in modules.iter().enumerate() {
        let start = next.next_multiple_of(PAGE);
        let len = module.data.len() as u64;
        if !in_ram(mem, start, len) || start.saturating_add(len) > u64::from(u32::MAX) {
            return Err(LoaderError::OutOfRam {
                what: "module",
                addr: start,
                len,
            });
        }
        write_guest(mem, "module", start, module.data)?;
        let name = area.string(&module.cmdline)?;
        let e = mods + i * MODULE_ENTRY_SIZE;
        area.put_u32(e, start);
        area.put_u32(e + 4, start + len);
        area.put_u32(e + 8, name);
        next = start + len;
    }
    area.put_u32(info + MBI_MODS_COUNT, modules.len() as u64);
    area.put_u32(info + MBI_MODS_ADDR, mods_addr);
    Ok(())
}
