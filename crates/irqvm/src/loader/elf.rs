//! ELF32 and ELF64 executables (System V ABI, "ELF Header" and "Program Header" chapters), read
//! with the `object` crate's zero-copy ELF reader: it bounds-checks every header and segment
//! against the file and never panics on hostile input. This module adds what a loader needs on
//! top: the class/machine/type policy, PT_LOAD segments as [`Segment`]s, and the entry point.
//!
//! Plain images become [`ImageKind::Elf32`] (entered in protected mode) or [`ImageKind::Elf64`]
//! (entered in long mode); multiboot ELF kernels are parsed here too, from `multiboot`.
//!
//! Why not linux-loader's `Elf` (0.14, the release built on vm-memory 0.18): it reads every
//! image as ELF64, while the guests crates/irqvm/build.rs makes are ELF32 (converted so QEMU's
//! multiboot loader takes them too); and it copies each segment into guest memory as it reads
//! it, where this loader checks all of them (RAM, boot area, overlap) before writing any.
//! linux-loader is the right tool for the Linux boot protocols (the PVH note of a vmlinux, the
//! bzImage setup header), which are formats of their own beside this one.

use object::elf::{
    FileHeader32, FileHeader64, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, EM_386, EM_X86_64, ET_EXEC,
    EV_CURRENT, PT_LOAD,
};
use object::read::elf::{FileHeader, ProgramHeader};
use object::LittleEndian;

use crate::loader::boot_state::{CpuMode, Entry, Handoff};
use crate::loader::error::{ElfError, LoaderError};
use crate::loader::image::{ImageKind, KernelImage};
use crate::loader::layout::Segment;

/// More program headers than any kernel needs; bounds the work a hostile image can cause.
pub(super) const MAX_PHNUM: usize = 512;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offsets into `e_ident`.
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const EI_VERSION: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ElfClass {
    Elf32,
    Elf64,
}

/// The loadable part of an ELF executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ElfImage<'a> {
    pub class: ElfClass,
    /// `e_entry` as the file gives it (virtual for a higher-half kernel).
    pub entry: u64,
    pub segments: Vec<ElfSegment<'a>>,
}

/// A PT_LOAD segment: where it goes physically and where the kernel sees it virtually.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ElfSegment<'a> {
    pub segment: Segment<'a>,
    pub vaddr: u64,
}

pub(super) fn is_elf(image: &[u8]) -> bool {
    image.starts_with(ELF_MAGIC)
}

/// A plain (non-multiboot) ELF executable: ELF32 entered in 32-bit protected mode at the
/// physical address of its entry point, ELF64 in long mode with the first 4 GiB identity mapped.
pub(super) fn parse_plain(image: &[u8]) -> Result<KernelImage<'_>, LoaderError> {
    let elf = parse(image)?;
    let rip = elf.physical_entry()?;
    let (kind, mode, handoff) = match elf.class {
        ElfClass::Elf32 => (ImageKind::Elf32, CpuMode::Protected32, Handoff::Ebx),
        ElfClass::Elf64 => (ImageKind::Elf64, CpuMode::Long64, Handoff::RbxRdi),
    };
    Ok(KernelImage {
        kind,
        segments: elf.segments(),
        entry: Entry { mode, rip, handoff },
    })
}

/// Parses the ELF header and its PT_LOAD program headers.
pub(super) fn parse(image: &[u8]) -> Result<ElfImage<'_>, ElfError> {
    if !is_elf(image) {
        return Err(ElfError::NoMagic);
    }
    let class = *image.get(EI_CLASS).ok_or(ElfError::HeaderTruncated)?;
    if image.get(EI_DATA).ok_or(ElfError::HeaderTruncated)? != &ELFDATA2LSB.0 {
        return Err(ElfError::NotLittleEndian);
    }
    // The version byte is checked here so that the reader's "unsupported header" can only mean a
    // truncated one.
    if image.get(EI_VERSION).ok_or(ElfError::HeaderTruncated)? != &EV_CURRENT.0 {
        return Err(ElfError::UnsupportedVersion);
    }
    if class == ELFCLASS32.0 {
        parse_class::<FileHeader32<LittleEndian>>(image, ElfClass::Elf32)
    } else if class == ELFCLASS64.0 {
        parse_class::<FileHeader64<LittleEndian>>(image, ElfClass::Elf64)
    } else {
        Err(ElfError::UnknownClass(class))
    }
}

fn parse_class<H: FileHeader<Endian = LittleEndian>>(
    image: &[u8],
    class: ElfClass,
) -> Result<ElfImage<'_>, ElfError> {
    let header = H::parse(image).map_err(|_| ElfError::HeaderTruncated)?;
    let e = LittleEndian;
    let e_type = header.e_type(e).0;
    if e_type != ET_EXEC.0 {
        return Err(ElfError::NotExecutable(e_type));
    }
    let machine = header.e_machine(e).0;
    match class {
        ElfClass::Elf32 if machine != EM_386.0 => return Err(ElfError::NotI386(machine)),
        ElfClass::Elf64 if machine != EM_X86_64.0 => return Err(ElfError::NotX86_64(machine)),
        _ => {}
    }
    let phentsize = header.e_phentsize(e);
    if usize::from(phentsize) != std::mem::size_of::<H::ProgramHeader>() {
        return Err(ElfError::ProgramHeaderSize(phentsize));
    }
    let headers = header
        .program_headers(e, image)
        .map_err(|_| ElfError::ProgramHeadersOutsideFile)?;
    if headers.is_empty() {
        return Err(ElfError::NoProgramHeaders);
    }
    if headers.len() > MAX_PHNUM {
        return Err(ElfError::TooManyProgramHeaders {
            count: headers.len(),
            max: MAX_PHNUM,
        });
    }
    let mut segments = Vec::new();
    for ph in headers {
        if let Some(segment) = load_segment(ph, image)? {
            segments.push(segment);
        }
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegment);
    }
    Ok(ElfImage {
        class,
        entry: header.e_entry(e).into(),
        segments,
    })
}

/// One program header as a segment to load; `None` unless it is a non-empty PT_LOAD.
fn load_segment<'a, P: ProgramHeader<Endian = LittleEndian>>(
    ph: &P,
    image: &'a [u8],
) -> Result<Option<ElfSegment<'a>>, ElfError> {
    let e = LittleEndian;
    let mem_size: u64 = ph.p_memsz(e).into();
    if ph.p_type(e) != PT_LOAD || mem_size == 0 {
        return Ok(None);
    }
    let file_size: u64 = ph.p_filesz(e).into();
    if file_size > mem_size {
        return Err(ElfError::FileSizeExceedsMemSize);
    }
    let data = ph
        .data(e, image)
        .map_err(|()| ElfError::SegmentDataOutsideFile)?;
    let paddr: u64 = ph.p_paddr(e).into();
    let vaddr: u64 = ph.p_vaddr(e).into();
    if paddr.checked_add(mem_size).is_none() || vaddr.checked_add(mem_size).is_none() {
        return Err(ElfError::SegmentWraps);
    }
    Ok(Some(ElfSegment {
        segment: Segment {
            paddr,
            data,
            mem_size,
        },
        vaddr,
    }))
}

impl<'a> ElfImage<'a> {
    pub fn segments(&self) -> Vec<Segment<'a>> {
        self.segments.iter().map(|s| s.segment).collect()
    }

    /// The entry point as a physical address: unchanged if it lies inside a segment's physical
    /// range, translated through the segment that holds it virtually otherwise (a higher-half
    /// kernel linked at 0xC0100000 but loaded at 1 MiB, as GRUB does).
    pub fn physical_entry(&self) -> Result<u64, LoaderError> {
        let entry = self.entry;
        let physical = |s: &ElfSegment<'_>| {
            entry >= s.segment.paddr && entry - s.segment.paddr < s.segment.mem_size
        };
        if self.segments.iter().any(physical) {
            return Ok(entry);
        }
        self.segments
            .iter()
            .find(|s| entry >= s.vaddr && entry - s.vaddr < s.segment.mem_size)
            .map(|s| s.segment.paddr + (entry - s.vaddr))
            .ok_or(LoaderError::EntryOutsideImage(entry))
    }
}
