//! The Xen PVH entry of an ELF kernel, as Linux implements it (Linux
//! Documentation/arch/x86/boot.rst and arch/x86/platform/pvh/; Xen's
//! xen/include/public/arch-x86/hvm/start_info.h and elfnote.h): a vmlinux carries an ELF note
//! "Xen" of type XEN_ELFNOTE_PHYS32_ENTRY (18) whose descriptor is the physical address of its
//! 32-bit entry. The loader copies the PT_LOAD segments to their physical addresses and enters
//! there in 32-bit protected mode with paging off, flat CS/DS/ES/SS, IF clear, and EBX = the
//! physical address of an `hvm_start_info` (version 1: command line, modules, RSDP, memory map).
//!
//! From linux-loader this takes the `hvm_start_info`/`hvm_modlist_entry`/
//! `hvm_memmap_table_entry` structs (the ABI, already `ByteValued`) and `PvhBootConfigurator`,
//! which writes them after checking they fit in guest memory. It leaves linux-loader's `Elf`
//! loader, which finds the note only while loading: it copies each segment into guest memory as
//! it parses (this loader checks every segment, RAM, boot area and overlap, before writing any)
//! and reads the note with its own parser beside the one `elf.rs` uses, so two parsers could
//! disagree about one image. The note is read here with the same `object` reader as the
//! segments, which bounds-checks every note against its segment.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use object::elf::{FileHeader32, FileHeader64, ELFCLASS32, ELFCLASS64};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian;
use vm_memory::GuestAddress;

use crate::loader::boot_state::{CpuMode, Entry, Handoff};
use crate::loader::elf::{self, MAX_PHNUM};
use crate::loader::error::{LoaderError, PvhError};
use crate::loader::image::{ImageKind, KernelImage};
use crate::loader::layout::{linux_memory_map, place_modules, PAGE};
use crate::loader::linux::{
    write_cmdline, BootPlatform, CMDLINE_MAX, PARAMS_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
};
use crate::loader::request::LoadRequest;
use crate::memory::GuestRam;

/// The note type of the 32-bit PVH entry point (Xen elfnote.h).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The note's owner name (without its NUL).
const XEN_NOTE_NAME: &[u8] = b"Xen";
/// `hvm_start_info.magic` (start_info.h: XEN_HVM_START_MAGIC_VALUE).
pub const XEN_HVM_START_MAGIC: u32 = 0x336E_C578;
/// Version 1 adds the memory map fields.
const START_INFO_VERSION: u32 = 1;
/// One page of `hvm_modlist_entry`s (32 bytes each).
const MAX_MODULES: usize = (PAGE as usize) / std::mem::size_of::<hvm_modlist_entry>();
const EI_CLASS: usize = 4;

/// Parses an ELF kernel with a PVH entry note; `Ok(None)` if the image is not ELF or has no
/// such note (then it is a plain ELF image).
pub(super) fn parse(image: &[u8]) -> Result<Option<KernelImage<'_>>, LoaderError> {
    let Some(rip) = phys32_entry(image)? else {
        return Ok(None);
    };
    let elf = elf::parse(image)?;
    let segments = elf.segments();
    // The note gives a physical address: it must lie in a segment's physical range.
    if !segments
        .iter()
        .any(|s| rip >= s.paddr && rip - s.paddr < s.mem_size)
    {
        return Err(LoaderError::EntryOutsideImage(rip));
    }
    Ok(Some(KernelImage {
        kind: ImageKind::Pvh,
        segments,
        entry: Entry {
            mode: CpuMode::Protected32,
            rip,
            handoff: Handoff::Ebx,
        },
    }))
}

/// The PHYS32_ENTRY address from the image's PT_NOTE segments, if it has one. A header the ELF
/// reader rejects yields `None`: `elf::parse_plain` then reports what is wrong with it.
pub(super) fn phys32_entry(image: &[u8]) -> Result<Option<u64>, LoaderError> {
    if !elf::is_elf(image) {
        return Ok(None);
    }
    match image.get(EI_CLASS) {
        Some(&c) if c == ELFCLASS32.0 => find_entry::<FileHeader32<LittleEndian>>(image),
        Some(&c) if c == ELFCLASS64.0 => find_entry::<FileHeader64<LittleEndian>>(image),
        _ => Ok(None),
    }
}

fn find_entry<H: FileHeader<Endian = LittleEndian>>(
    image: &[u8],
) -> Result<Option<u64>, LoaderError> {
    let e = LittleEndian;
    let Ok(header) = H::parse(image) else {
        return Ok(None);
    };
    let Ok(headers) = header.program_headers(e, image) else {
        return Ok(None);
    };
    for ph in headers.iter().take(MAX_PHNUM) {
        let notes = ph.notes(e, image).map_err(|_| PvhError::MalformedNotes)?;
        let Some(mut notes) = notes else {
            continue;
        };
        while let Some(note) = notes.next().map_err(|_| PvhError::MalformedNotes)? {
            if note.name() == XEN_NOTE_NAME && note.n_type(e).0 == XEN_ELFNOTE_PHYS32_ENTRY {
                return decode_entry(note.desc()).map(Some);
            }
        }
    }
    Ok(None)
}

/// The descriptor is the entry address: Linux emits it with `_ASM_PTR` (8 bytes in a 64-bit
/// kernel), Xen and FreeBSD with `.long` (4 bytes). It must be below 4 GiB: it is entered with
/// paging off.
fn decode_entry(desc: &[u8]) -> Result<u64, LoaderError> {
    let addr = match desc.len() {
        4 => u64::from(u32::from_le_bytes(desc.try_into().unwrap_or_default())),
        8 => u64::from_le_bytes(desc.try_into().unwrap_or_default()),
        n => return Err(PvhError::DescriptorSize(n).into()),
    };
    if addr > u64::from(u32::MAX) {
        return Err(PvhError::EntryAbove4G(addr).into());
    }
    Ok(addr)
}

/// Writes the command line, the modules (page aligned after the kernel, below 4 GiB; Linux takes
/// the first as its initrd), the memory map and `hvm_start_info`. Returns the address of
/// `hvm_start_info`, which the kernel gets in EBX.
pub(super) fn write_start_info(
    mem: &GuestRam,
    req: &LoadRequest<'_>,
    kernel_end: u64,
    platform: &BootPlatform,
) -> Result<u64, LoaderError> {
    if req.modules.len() > MAX_MODULES {
        return Err(LoaderError::TooManyModules {
            count: req.modules.len(),
            max: MAX_MODULES,
        });
    }
    let cmdline_paddr = write_cmdline(mem, &req.cmdline, CMDLINE_MAX)?;
    let data: Vec<&[u8]> = req.modules.iter().map(|m| m.data).collect();
    let placed = place_modules(mem, &data, kernel_end, 1 << 32)?;
    // Module strings are left out (cmdline_paddr 0): Linux reads only the first module's address
    // and size (arch/x86/platform/pvh/enlighten.c).
    let modlist: Vec<hvm_modlist_entry> = placed
        .iter()
        .map(|&(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .collect();
    let memmap: Vec<hvm_memmap_table_entry> = linux_memory_map(mem)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.base,
            size: e.len,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modlist.len() as u32,
        modlist_paddr: if modlist.is_empty() {
            0
        } else {
            PVH_MODLIST_ADDR
        },
        cmdline_paddr,
        rsdp_paddr: platform.acpi_rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PARAMS_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modlist.is_empty() {
        params.set_modules(&modlist, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|_| LoaderError::OutOfRam {
        what: "hvm_start_info",
        addr: PARAMS_ADDR,
        len: 3 * PAGE,
    })?;
    Ok(PARAMS_ADDR)
}
