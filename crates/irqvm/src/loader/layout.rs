//! Where things go in guest-physical memory, and the checks that place a kernel image there.
//!
//! Low-memory layout the loader owns (kernels may not load into it):
//!
//! | range | use |
//! |---|---|
//! | 0x1000-0x1FFF | boot GDT (flat 32-bit code/data, 64-bit code) |
//! | 0x2000-0x7FFF | long-mode identity page tables (ELF64 only) |
//! | 0x10000-0x8FFFF | boot information (multiboot info block, memory map, modules list, strings) |
//! | 0x90000-0x9EFFF | initial stack (ESP = 0x9F000) |
//!
//! A format parser describes its image as [`Segment`]s; [`load_segments`] checks every one
//! (inside RAM, off the boot area, not overlapping another) before it writes any, so a refused
//! image leaves guest memory untouched.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::loader::error::LoaderError;
use crate::memory::{GuestRam, HIGH_RAM_START, LOW_RAM_END};

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x1000;
/// Long-mode page tables: PML4, one PDPT, four page directories of 2 MiB pages (4 GiB).
pub const PML4_ADDR: u64 = 0x2000;
pub(super) const PDPT_ADDR: u64 = 0x3000;
pub(super) const PD_ADDR: u64 = 0x4000;
/// Boot information area.
pub const INFO_BASE: u64 = 0x1_0000;
pub(super) const INFO_END: u64 = 0x9_0000;
/// Initial stack pointer (top of the stack area).
pub const BOOT_STACK_TOP: u64 = 0x9_F000;
/// Everything from the GDT to the top of the stack belongs to the loader.
const BOOT_AREA: (u64, u64) = (BOOT_GDT_ADDR, BOOT_STACK_TOP);
/// Conventional memory: the EBDA and ROM area start at 0x9FC00 on a PC.
pub(super) const LOW_MEMORY_END: u64 = 0x9_FC00;
pub(super) const EXTENDED_MEMORY_START: u64 = 0x10_0000;
pub(super) const PAGE: u64 = 4096;

/// One piece of an image and where it goes: `data` is copied to `paddr`, the rest of
/// `mem_size` (bss) stays zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment<'a> {
    pub paddr: u64,
    pub data: &'a [u8],
    /// Bytes the segment occupies in memory, at least `data.len()`.
    pub mem_size: u64,
}

impl Segment<'_> {
    pub fn end(&self) -> u64 {
        self.paddr.saturating_add(self.mem_size)
    }
}

/// What a RAM range holds, as the memory map tells the guest. The numbers are the address range
/// types of the multiboot memory map (spec §3.3) and of E820 (ACPI spec §15), which agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum RangeKind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MapEntry {
    pub base: u64,
    pub len: u64,
    pub kind: RangeKind,
}

/// The guest's physical memory map (a PC's: conventional memory, the EBDA, the BIOS ROM,
/// extended memory, RAM above 4 GiB), shared by every boot protocol that passes one.
pub(super) fn memory_map(mem: &GuestRam) -> Vec<MapEntry> {
    let entry = |base, len, kind| MapEntry { base, len, kind };
    let total = crate::memory::ram_size(mem);
    let low_end = total.min(LOW_RAM_END);
    let mut map = vec![
        entry(0, LOW_MEMORY_END, RangeKind::Ram),
        entry(
            LOW_MEMORY_END,
            0xA_0000 - LOW_MEMORY_END,
            RangeKind::Reserved,
        ),
        entry(0xF_0000, 0x1_0000, RangeKind::Reserved),
        entry(
            EXTENDED_MEMORY_START,
            low_end - EXTENDED_MEMORY_START,
            RangeKind::Ram,
        ),
    ];
    if total > low_end {
        map.push(entry(HIGH_RAM_START, total - low_end, RangeKind::Ram));
    }
    map
}

/// Start of the PC BIOS area (0xE0000-0xFFFFF): where a BIOS keeps its ROM and the ACPI RSDP
/// (ACPI 6.5 §5.2.5.1: the OS scans 0xE0000-0xFFFFF for it). irqvm's ACPI tables live there.
pub const BIOS_AREA_START: u64 = 0xE_0000;
/// The 32-bit MMIO hole the devices use: IOAPIC at 0xFEC00000, LAPIC at 0xFEE00000, up to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xFEC0_0000;

/// The memory map a Linux boot protocol passes (e820 in the zero page, `hvm_memmap_table_entry`s
/// for PVH): the multiboot map with the whole BIOS area 0xE0000-0xFFFFF reserved (the ACPI tables
/// are there) and the MMIO hole 0xFEC00000-0xFFFFFFFF reserved, as a PC BIOS reports them, so
/// Linux never takes either for RAM or gives it to a PCI BAR.
pub(super) fn linux_memory_map(mem: &GuestRam) -> Vec<MapEntry> {
    let mut map: Vec<MapEntry> = memory_map(mem)
        .into_iter()
        .map(|e| match e {
            MapEntry {
                base: 0xF_0000,
                kind: RangeKind::Reserved,
                ..
            } => MapEntry {
                base: BIOS_AREA_START,
                len: EXTENDED_MEMORY_START - BIOS_AREA_START,
                kind: RangeKind::Reserved,
            },
            other => other,
        })
        .collect();
    map.push(MapEntry {
        base: MMIO_HOLE_START,
        len: HIGH_RAM_START - MMIO_HOLE_START,
        kind: RangeKind::Reserved,
    });
    map.sort_by_key(|e| e.base);
    map
}

/// Copies boot modules (an initrd) into guest memory one after the other from `start`, each page
/// aligned, and returns where each went. Every module must end at or below `limit` (4 GiB for
/// 32-bit address fields, or a kernel's `initrd_addr_max`) and lie in RAM.
pub(super) fn place_modules(
    mem: &GuestRam,
    modules: &[&[u8]],
    start: u64,
    limit: u64,
) -> Result<Vec<(u64, u64)>, LoaderError> {
    let mut placed = Vec::with_capacity(modules.len());
    let mut next = start.max(EXTENDED_MEMORY_START);
    for data in modules {
        let addr = next.next_multiple_of(PAGE);
        let len = data.len() as u64;
        if !in_ram(mem, addr, len) || addr.saturating_add(len) > limit {
            return Err(LoaderError::OutOfRam {
                what: "module",
                addr,
                len,
            });
        }
        write_guest(mem, "module", addr, data)?;
        placed.push((addr, len));
        next = addr + len;
    }
    Ok(placed)
}

/// True if `[addr, addr+len)` is RAM (one region: the loader never straddles the hole).
pub(super) fn in_ram(mem: &GuestRam, addr: u64, len: u64) -> bool {
    let Some(last) = addr.checked_add(len.max(1) - 1) else {
        return false;
    };
    mem.iter()
        .any(|r| addr >= r.start_addr().0 && last <= r.last_addr().0)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Checks a range the kernel occupies: inside RAM, not on the loader's own structures.
pub(super) fn check_kernel_range(
    mem: &GuestRam,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), LoaderError> {
    if !in_ram(mem, addr, len) {
        return Err(LoaderError::OutOfRam { what, addr, len });
    }
    if overlaps((addr, addr.saturating_add(len)), BOOT_AREA) {
        return Err(LoaderError::OverlapsBootArea { what, addr, len });
    }
    Ok(())
}

/// Refuses segments that share a byte of memory: the ELF spec has PT_LOAD segments ascend
/// without overlap, and a later one silently overwriting an earlier one hides a broken image.
fn check_disjoint(segments: &[Segment<'_>]) -> Result<(), LoaderError> {
    let mut sorted: Vec<&Segment<'_>> = segments.iter().collect();
    sorted.sort_by_key(|s| s.paddr);
    for pair in sorted.windows(2) {
        if pair[1].paddr < pair[0].end() {
            return Err(LoaderError::OverlappingSegments {
                first: pair[0].paddr,
                second: pair[1].paddr,
            });
        }
    }
    Ok(())
}

pub(super) fn write_guest(
    mem: &GuestRam,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), LoaderError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| LoaderError::OutOfRam {
            what,
            addr,
            len: data.len() as u64,
        })
}

/// Checks every segment, then copies them into guest memory; returns the first byte after the
/// highest one. Fresh guest memory is zero, so bss needs no writes; its range is still checked.
pub(super) fn load_segments(
    mem: &GuestRam,
    what: &'static str,
    segments: &[Segment<'_>],
) -> Result<u64, LoaderError> {
    for s in segments {
        check_kernel_range(mem, what, s.paddr, s.mem_size)?;
    }
    check_disjoint(segments)?;
    for s in segments {
        write_guest(mem, what, s.paddr, s.data)?;
    }
    Ok(segments.iter().map(Segment::end).max().unwrap_or(0))
}
