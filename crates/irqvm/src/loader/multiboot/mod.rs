//! Multiboot v1 (the Multiboot Specification 0.6.96): finding and checking the header (§3.1),
//! loading the image it describes (ELF, or the a.out kludge's address fields, §3.1.3), and in
//! [`info`] the boot information block (§3.3). No crate implements multiboot v1, hence our own.

pub(super) mod info;

pub use info::write_boot_info;

use crate::loader::boot_state::{CpuMode, Entry, Handoff};
use crate::loader::elf::{self, ElfClass};
use crate::loader::error::{LoaderError, MultibootError};
use crate::loader::image::{ImageKind, KernelImage};
use crate::loader::layout::Segment;

/// Magic of the multiboot v1 header inside the image (spec §3.1.1).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must lie within the first 8192 bytes, 32-bit aligned (spec §3.1.1).
const MULTIBOOT_SEARCH: usize = 8192;

/// Header flag bits (spec §3.1.2): modules page aligned, memory info wanted, video mode wanted,
/// address fields valid (a.out kludge).
const MBH_PAGE_ALIGN: u32 = 1 << 0;
const MBH_MEMORY_INFO: u32 = 1 << 1;
pub(super) const MBH_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader that cannot meet one must refuse the image.
const MBH_REQUIRED_MASK: u32 = 0xFFFF;
const MBH_SUPPORTED: u32 = MBH_PAGE_ALIGN | MBH_MEMORY_INFO;

/// The multiboot v1 header fields (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MultibootHeader {
    /// File offset of the header.
    offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Parses a multiboot kernel; `Ok(None)` if the image has no multiboot header.
pub(super) fn parse(image: &[u8]) -> Result<Option<KernelImage<'_>>, LoaderError> {
    let Some(header) = find_header(image)? else {
        return Ok(None);
    };
    if header.flags & MBH_REQUIRED_MASK & !MBH_SUPPORTED != 0 {
        return Err(LoaderError::UnsupportedMultibootFlags(header.flags));
    }
    let (kind, segments, rip) = if header.flags & MBH_AOUT_KLUDGE != 0 {
        let (segment, entry) = aout_segment(image, &header)?;
        (ImageKind::MultibootAout, vec![segment], entry)
    } else if elf::is_elf(image) {
        // An ELF64 multiboot kernel is still entered in 32-bit mode (spec §3.2), at the physical
        // address of its entry point.
        let elf = elf::parse(image)?;
        let kind = match elf.class {
            ElfClass::Elf32 => ImageKind::MultibootElf32,
            ElfClass::Elf64 => ImageKind::MultibootElf64,
        };
        (kind, elf.segments(), elf.physical_entry()?)
    } else {
        return Err(MultibootError::NoLoadInformation.into());
    };
    Ok(Some(KernelImage {
        kind,
        segments,
        entry: Entry {
            mode: CpuMode::Protected32,
            rip,
            handoff: Handoff::Multiboot,
        },
    }))
}

/// Finds a multiboot header: magic, flags and checksum summing to 0, 4-byte aligned, in the
/// first 8 KiB (spec §3.1.1).
pub(super) fn find_header(image: &[u8]) -> Result<Option<MultibootHeader>, MultibootError> {
    let limit = image.len().min(MULTIBOOT_SEARCH);
    for offset in (0..limit).step_by(4) {
        let (Some(magic), Some(flags), Some(checksum)) = (
            u32_at(image, offset),
            u32_at(image, offset + 4),
            u32_at(image, offset + 8),
        ) else {
            break;
        };
        if magic != MULTIBOOT_HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(checksum) != 0
        {
            continue;
        }
        return header_at(image, offset, flags).map(Some);
    }
    Ok(None)
}

/// The header at `offset` whose magic and checksum are valid; the address fields are read
/// only when flag 16 says they are there.
fn header_at(image: &[u8], offset: usize, flags: u32) -> Result<MultibootHeader, MultibootError> {
    let mut header = MultibootHeader {
        offset,
        flags,
        header_addr: 0,
        load_addr: 0,
        load_end_addr: 0,
        bss_end_addr: 0,
        entry_addr: 0,
    };
    if flags & MBH_AOUT_KLUDGE != 0 {
        let field = |i: usize| {
            u32_at(image, offset + 12 + 4 * i).ok_or(MultibootError::AddressFieldsTruncated)
        };
        header.header_addr = field(0)?;
        header.load_addr = field(1)?;
        header.load_end_addr = field(2)?;
        header.bss_end_addr = field(3)?;
        header.entry_addr = field(4)?;
    }
    Ok(header)
}

/// The segment of an a.out-kludge image (spec §3.1.3) and its entry point: the text starts at
/// file offset `header_offset - (header_addr - load_addr)`.
fn aout_segment<'a>(
    image: &'a [u8],
    h: &MultibootHeader,
) -> Result<(Segment<'a>, u64), LoaderError> {
    if h.header_addr < h.load_addr {
        return Err(MultibootError::HeaderBelowLoadAddr.into());
    }
    let header_delta = (h.header_addr - h.load_addr) as usize;
    let file_offset = h
        .offset
        .checked_sub(header_delta)
        .ok_or(MultibootError::LoadAddrBeforeFile)?;
    let available = image
        .get(file_offset..)
        .ok_or(MultibootError::LoadAddrBeforeFile)?;
    let load_size = if h.load_end_addr == 0 {
        available.len() as u64
    } else if h.load_end_addr < h.load_addr {
        return Err(MultibootError::LoadEndBelowLoadAddr.into());
    } else {
        u64::from(h.load_end_addr - h.load_addr)
    };
    let data = usize::try_from(load_size)
        .ok()
        .and_then(|len| available.get(..len))
        .ok_or(MultibootError::LoadEndBeyondFile)?;
    let load_addr = u64::from(h.load_addr);
    let load_end = load_addr + load_size;
    let mem_end = match u64::from(h.bss_end_addr) {
        0 => load_end,
        bss_end if bss_end < load_end => return Err(MultibootError::BssEndBelowLoadEnd.into()),
        bss_end => bss_end,
    };
    let entry = u64::from(h.entry_addr);
    if entry < load_addr || entry >= mem_end {
        return Err(LoaderError::EntryOutsideImage(entry));
    }
    let segment = Segment {
        paddr: load_addr,
        data,
        mem_size: mem_end - load_addr,
    };
    Ok((segment, entry))
}
