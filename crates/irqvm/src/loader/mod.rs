//! Kernel loading: multiboot v1 (ELF32, ELF64 with a 32-bit entry, a.out kludge), plain ELF32,
//! plain ELF64 (entered in long mode) and raw binaries.
//!
//! The loader is pure apart from writing guest memory: it parses the image, copies its segments,
//! builds the boot information (multiboot info block, memory map, command line, modules) and
//! returns the register state the boot vCPU must start with ([`BootState`]). Images are hostile
//! input: every offset and size is checked, nothing can panic or allocate without bound.
//!
//! Low-memory layout the loader owns (kernels may not load into it):
//!
//! | range | use |
//! |---|---|
//! | 0x1000-0x1FFF | boot GDT (flat 32-bit code/data, 64-bit code) |
//! | 0x2000-0x7FFF | long-mode identity page tables (ELF64 only) |
//! | 0x10000-0x8FFFF | multiboot info block, memory map, modules list, strings |
//! | 0x90000-0x9EFFF | initial stack (ESP = 0x9F000) |
//!
//! Modules (`--initrd`) go after the kernel's highest byte, page aligned.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestRam, HIGH_RAM_START, LOW_RAM_END};

/// EAX value a multiboot v1 kernel is entered with (spec §3.2).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// Magic of the multiboot v1 header inside the image (spec §3.1.1).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must lie within the first 8192 bytes, 32-bit aligned (spec §3.1.1).
const MULTIBOOT_SEARCH: usize = 8192;

/// Header flag bits (spec §3.1.2): modules page aligned, memory info wanted, video mode wanted,
/// address fields valid (a.out kludge).
const MBH_PAGE_ALIGN: u32 = 1 << 0;
const MBH_MEMORY_INFO: u32 = 1 << 1;
const MBH_AOUT_KLUDGE: u32 = 1 << 16;
/// Bits 0-15 are requirements: a loader that cannot meet one must refuse the image.
const MBH_REQUIRED_MASK: u32 = 0xFFFF;
const MBH_SUPPORTED: u32 = MBH_PAGE_ALIGN | MBH_MEMORY_INFO;

/// Info block flag bits (spec §3.3).
const MBI_MEMORY: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Size of the info block we write (through the VBE fields, spec §3.3), zero padded.
const MBI_SIZE: usize = 120;
/// Memory map entry: size(4) base(8) length(8) type(4); `size` excludes itself (spec §3.3).
const MMAP_ENTRY_SIZE: usize = 24;
const MMAP_AVAILABLE: u32 = 1;
const MMAP_RESERVED: u32 = 2;
/// Module structure: mod_start, mod_end, string, reserved (spec §3.3).
const MODULE_ENTRY_SIZE: usize = 16;

/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x1000;
/// Selectors in the boot GDT.
pub const BOOT_CS32: u16 = 0x08;
pub const BOOT_DS: u16 = 0x10;
pub const BOOT_CS64: u16 = 0x18;
/// Long-mode page tables: PML4, one PDPT, four page directories of 2 MiB pages (4 GiB).
pub const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
/// Boot information area.
pub const INFO_BASE: u64 = 0x1_0000;
const INFO_END: u64 = 0x9_0000;
/// Initial stack pointer (top of the stack area).
pub const BOOT_STACK_TOP: u64 = 0x9_F000;
/// Everything from the GDT to the top of the stack belongs to the loader.
const BOOT_AREA: (u64, u64) = (BOOT_GDT_ADDR, BOOT_STACK_TOP);
/// Conventional memory: the EBDA and ROM area start at 0x9FC00 on a PC.
const LOW_MEMORY_END: u64 = 0x9_FC00;
const EXTENDED_MEMORY_START: u64 = 0x10_0000;
const PAGE: u64 = 4096;

/// The CPU mode the boot vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode, CS base = entry & !0xFFFF (raw images only).
    Real,
    /// 32-bit protected mode, flat segments, paging off (multiboot, ELF32).
    Protected32,
    /// 64-bit long mode, identity paging of the first 4 GiB (plain ELF64).
    Long64,
}

/// Register state of the boot vCPU after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootState {
    pub mode: CpuMode,
    pub rip: u64,
    pub rsp: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rdi: u64,
}

/// What kind of image was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    MultibootElf32,
    MultibootElf64,
    MultibootAout,
    Elf32,
    Elf64,
    Raw,
}

/// Result of loading: the start state plus what was loaded, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    pub kind: ImageKind,
    pub boot: BootState,
    /// Guest-physical address of the multiboot info block.
    pub info_addr: u64,
    /// First byte after the kernel image (including bss).
    pub kernel_end: u64,
}

/// A raw binary: copied to `load_addr` and entered at `entry` in `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawImage {
    pub load_addr: u64,
    pub entry: u64,
    pub mode: CpuMode,
}

/// A boot module (`--initrd`): its bytes and the string the kernel sees for it.
#[derive(Clone, Debug)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: String,
}

/// Everything the loader needs.
#[derive(Clone, Debug)]
pub struct LoadRequest<'a> {
    pub kernel: &'a [u8],
    /// The kernel's command line as the kernel sees it: "FILENAME ARGS" (see [`kernel_cmdline`]).
    pub cmdline: String,
    pub modules: Vec<Module<'a>>,
    /// Load the kernel as a raw binary instead of detecting its format.
    pub raw: Option<RawImage>,
}

/// Errors from loading a kernel: each names what is wrong with the image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    #[error("the kernel image is empty")]
    Empty,
    #[error("unknown kernel format: not ELF and no multiboot header in the first 8 KiB")]
    UnknownFormat,
    #[error("malformed ELF image: {0}")]
    BadElf(&'static str),
    #[error("malformed multiboot header: {0}")]
    BadMultiboot(&'static str),
    #[error("the multiboot header asks for features irqvm cannot provide (flags {0:#x})")]
    UnsupportedMultibootFlags(u32),
    #[error("{what} at {addr:#x}+{len:#x} is outside guest RAM")]
    OutOfRam {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("{what} at {addr:#x}+{len:#x} overlaps the loader's boot area 0x1000-0x9f000")]
    OverlapsBootArea {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("the entry point {0:#x} is not inside a loaded segment")]
    EntryOutsideImage(u64),
    #[error("the entry point {0:#x} is above 4 GiB, out of reach of the boot mode (32-bit, or long mode with the first 4 GiB mapped)")]
    EntryAbove4G(u64),
    #[error("the command line and module names do not fit in the boot information area")]
    BootInfoTooLarge,
    #[error("a raw image in real mode must be entered below 1 MiB (entry {0:#x})")]
    RealModeEntry(u64),
}

/// The command line a multiboot kernel sees, as QEMU and GRUB pass it: the kernel's file name
/// followed by the arguments.
pub fn kernel_cmdline(file_name: &str, args: &str) -> String {
    if args.is_empty() {
        file_name.to_string()
    } else {
        format!("{file_name} {args}")
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let bytes = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// The multiboot v1 header fields (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MultibootHeader {
    /// File offset of the header.
    offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

/// Finds a multiboot header: magic, flags and checksum summing to 0, 4-byte aligned, in the
/// first 8 KiB (spec §3.1.1).
fn find_multiboot_header(image: &[u8]) -> Result<Option<MultibootHeader>, LoaderError> {
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
                u32_at(image, offset + 12 + 4 * i)
                    .ok_or(LoaderError::BadMultiboot("address fields truncated"))
            };
            header.header_addr = field(0)?;
            header.load_addr = field(1)?;
            header.load_end_addr = field(2)?;
            header.bss_end_addr = field(3)?;
            header.entry_addr = field(4)?;
        }
        return Ok(Some(header));
    }
    Ok(None)
}

/// One loadable segment of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// Where it goes in guest-physical memory.
    paddr: u64,
    /// Where the kernel expects it virtually (ELF p_vaddr; equal to paddr otherwise).
    vaddr: u64,
    file_offset: usize,
    file_size: u64,
    mem_size: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.paddr.saturating_add(self.mem_size)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ElfClass {
    Elf32,
    Elf64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ElfImage {
    class: ElfClass,
    entry: u64,
    segments: Vec<Segment>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;
/// More program headers than any kernel needs; bounds the work a hostile image can cause.
const MAX_PHNUM: usize = 512;

fn is_elf(image: &[u8]) -> bool {
    image.len() >= 4 && &image[..4] == ELF_MAGIC
}

/// Parses the ELF header and PT_LOAD program headers (System V ABI, "ELF header" and "Program
/// header" chapters), checking every offset against the file.
fn parse_elf(image: &[u8]) -> Result<ElfImage, LoaderError> {
    let bad = LoaderError::BadElf;
    if !is_elf(image) {
        return Err(bad("no ELF magic"));
    }
    let class = match image.get(4) {
        Some(1) => ElfClass::Elf32,
        Some(2) => ElfClass::Elf64,
        _ => return Err(bad("unknown ELF class")),
    };
    if image.get(5) != Some(&1) {
        return Err(bad("not little-endian"));
    }
    let e_type = u16_at(image, 16).ok_or(bad("header truncated"))?;
    let machine = u16_at(image, 18).ok_or(bad("header truncated"))?;
    if e_type != ET_EXEC {
        return Err(bad("not an executable (ET_EXEC)"));
    }
    let (entry, phoff, phentsize, phnum, min_phentsize) = match class {
        ElfClass::Elf32 => {
            if machine != EM_386 {
                return Err(bad("ELF32 image is not for i386"));
            }
            (
                u64::from(u32_at(image, 24).ok_or(bad("header truncated"))?),
                u64::from(u32_at(image, 28).ok_or(bad("header truncated"))?),
                u16_at(image, 42).ok_or(bad("header truncated"))?,
                u16_at(image, 44).ok_or(bad("header truncated"))?,
                32,
            )
        }
        ElfClass::Elf64 => {
            if machine != EM_X86_64 {
                return Err(bad("ELF64 image is not for x86-64"));
            }
            (
                u64_at(image, 24).ok_or(bad("header truncated"))?,
                u64_at(image, 32).ok_or(bad("header truncated"))?,
                u16_at(image, 54).ok_or(bad("header truncated"))?,
                u16_at(image, 56).ok_or(bad("header truncated"))?,
                56,
            )
        }
    };
    let phentsize = usize::from(phentsize);
    let phnum = usize::from(phnum);
    if phentsize < min_phentsize {
        return Err(bad("program header entries too small"));
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(bad("no or too many program headers"));
    }
    let phoff = usize::try_from(phoff).map_err(|_| bad("program headers outside the file"))?;
    let table_len = phentsize
        .checked_mul(phnum)
        .ok_or(bad("program headers outside the file"))?;
    let table_end = phoff
        .checked_add(table_len)
        .ok_or(bad("program headers outside the file"))?;
    if table_end > image.len() {
        return Err(bad("program headers outside the file"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if let Some(segment) = parse_program_header(image, ph, class)? {
            segments.push(segment);
        }
    }
    if segments.is_empty() {
        return Err(bad("no loadable (PT_LOAD) segment"));
    }
    Ok(ElfImage {
        class,
        entry,
        segments,
    })
}

/// One program header at file offset `ph` (already known to be inside the file); `None` unless
/// it is a non-empty PT_LOAD.
fn parse_program_header(
    image: &[u8],
    ph: usize,
    class: ElfClass,
) -> Result<Option<Segment>, LoaderError> {
    let bad = LoaderError::BadElf;
    let trunc = bad("program header truncated");
    let p_type = u32_at(image, ph).ok_or(trunc.clone())?;
    let (offset, vaddr, paddr, filesz, memsz) = match class {
        ElfClass::Elf32 => (
            u64::from(u32_at(image, ph + 4).ok_or(trunc.clone())?),
            u64::from(u32_at(image, ph + 8).ok_or(trunc.clone())?),
            u64::from(u32_at(image, ph + 12).ok_or(trunc.clone())?),
            u64::from(u32_at(image, ph + 16).ok_or(trunc.clone())?),
            u64::from(u32_at(image, ph + 20).ok_or(trunc)?),
        ),
        ElfClass::Elf64 => (
            u64_at(image, ph + 8).ok_or(trunc.clone())?,
            u64_at(image, ph + 16).ok_or(trunc.clone())?,
            u64_at(image, ph + 24).ok_or(trunc.clone())?,
            u64_at(image, ph + 32).ok_or(trunc.clone())?,
            u64_at(image, ph + 40).ok_or(trunc)?,
        ),
    };
    if p_type != PT_LOAD || memsz == 0 {
        return Ok(None);
    }
    if filesz > memsz {
        return Err(bad("segment file size exceeds its memory size"));
    }
    let in_file = offset
        .checked_add(filesz)
        .is_some_and(|end| end <= image.len() as u64);
    if !in_file {
        return Err(bad("segment data outside the file"));
    }
    if paddr.checked_add(memsz).is_none() || vaddr.checked_add(memsz).is_none() {
        return Err(bad("segment wraps around the address space"));
    }
    Ok(Some(Segment {
        paddr,
        vaddr,
        file_offset: offset as usize,
        file_size: filesz,
        mem_size: memsz,
    }))
}

/// Translates an ELF entry point given as a virtual address inside a segment to its physical
/// address, as GRUB does for higher-half kernels; physical entries pass unchanged.
fn physical_entry(elf: &ElfImage) -> Result<u64, LoaderError> {
    let entry = elf.entry;
    if elf
        .segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.end())
    {
        return Ok(entry);
    }
    elf.segments
        .iter()
        .find(|s| entry >= s.vaddr && entry - s.vaddr < s.mem_size)
        .map(|s| s.paddr + (entry - s.vaddr))
        .ok_or(LoaderError::EntryOutsideImage(entry))
}

/// The segments of an a.out-kludge image (spec §3.1.3): the text starts at file offset
/// `header_offset - (header_addr - load_addr)`.
fn aout_segments(image: &[u8], h: &MultibootHeader) -> Result<(Segment, u64), LoaderError> {
    let bad = LoaderError::BadMultiboot;
    if h.header_addr < h.load_addr {
        return Err(bad("header_addr is below load_addr"));
    }
    let header_delta = (h.header_addr - h.load_addr) as usize;
    let file_offset = h.offset.checked_sub(header_delta).ok_or(bad(
        "load_addr places the image before the start of the file",
    ))?;
    let available = (image.len() - file_offset) as u64;
    let load_size = if h.load_end_addr == 0 {
        available
    } else {
        if h.load_end_addr < h.load_addr {
            return Err(bad("load_end_addr is below load_addr"));
        }
        u64::from(h.load_end_addr - h.load_addr)
    };
    if load_size > available {
        return Err(bad("load_end_addr is beyond the end of the file"));
    }
    let load_end = u64::from(h.load_addr) + load_size;
    let mem_end = if h.bss_end_addr == 0 {
        load_end
    } else if u64::from(h.bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below the end of the loaded data"));
    } else {
        u64::from(h.bss_end_addr)
    };
    let entry = u64::from(h.entry_addr);
    if entry < u64::from(h.load_addr) || entry >= mem_end.max(load_end) {
        return Err(LoaderError::EntryOutsideImage(entry));
    }
    let segment = Segment {
        paddr: u64::from(h.load_addr),
        vaddr: u64::from(h.load_addr),
        file_offset,
        file_size: load_size,
        mem_size: mem_end - u64::from(h.load_addr),
    };
    Ok((segment, entry))
}

/// True if `[addr, addr+len)` is RAM (one region: the loader never straddles the hole).
fn in_ram(mem: &GuestRam, addr: u64, len: u64) -> bool {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
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
fn check_kernel_range(
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

fn write_guest(
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

/// Copies segments into guest memory. Fresh guest memory is zero, so bss needs no writes; the
/// bss range is still checked against RAM.
fn load_segments(mem: &GuestRam, image: &[u8], segments: &[Segment]) -> Result<u64, LoaderError> {
    let mut end = 0;
    for s in segments {
        check_kernel_range(mem, "kernel segment", s.paddr, s.mem_size)?;
        let data = &image[s.file_offset..s.file_offset + s.file_size as usize];
        write_guest(mem, "kernel segment", s.paddr, data)?;
        end = end.max(s.end());
    }
    Ok(end)
}

/// Loads the kernel and its boot information; returns how the boot vCPU must start.
pub fn load(mem: &GuestRam, req: &LoadRequest<'_>) -> Result<LoadedKernel, LoaderError> {
    if req.kernel.is_empty() {
        return Err(LoaderError::Empty);
    }
    if let Some(raw) = req.raw {
        return load_raw(mem, req, raw);
    }
    let header = find_multiboot_header(req.kernel)?;
    let (kind, segments, entry) = match header {
        Some(h) => {
            if h.flags & MBH_REQUIRED_MASK & !MBH_SUPPORTED != 0 {
                return Err(LoaderError::UnsupportedMultibootFlags(h.flags));
            }
            if h.flags & MBH_AOUT_KLUDGE != 0 {
                let (segment, entry) = aout_segments(req.kernel, &h)?;
                (ImageKind::MultibootAout, vec![segment], entry)
            } else if is_elf(req.kernel) {
                let elf = parse_elf(req.kernel)?;
                let kind = match elf.class {
                    ElfClass::Elf32 => ImageKind::MultibootElf32,
                    ElfClass::Elf64 => ImageKind::MultibootElf64,
                };
                let entry = physical_entry(&elf)?;
                (kind, elf.segments, entry)
            } else {
                return Err(LoaderError::BadMultiboot(
                    "neither ELF nor address fields (flag 16) given",
                ));
            }
        }
        None if is_elf(req.kernel) => {
            let elf = parse_elf(req.kernel)?;
            let kind = match elf.class {
                ElfClass::Elf32 => ImageKind::Elf32,
                ElfClass::Elf64 => ImageKind::Elf64,
            };
            let entry = match kind {
                ImageKind::Elf64 => elf.entry,
                _ => physical_entry(&elf)?,
            };
            (kind, elf.segments, entry)
        }
        None => return Err(LoaderError::UnknownFormat),
    };
    let kernel_end = load_segments(mem, req.kernel, &segments)?;
    let info_addr = write_boot_info(mem, req, kernel_end)?;
    write_boot_gdt(mem)?;
    let boot = match kind {
        ImageKind::Elf64 => {
            if entry > u64::from(u32::MAX) {
                return Err(LoaderError::EntryAbove4G(entry));
            }
            write_identity_page_tables(mem)?;
            BootState {
                mode: CpuMode::Long64,
                rip: entry,
                rsp: BOOT_STACK_TOP,
                rax: 0,
                rbx: info_addr,
                rdi: info_addr,
            }
        }
        _ => {
            if entry > u64::from(u32::MAX) {
                return Err(LoaderError::EntryAbove4G(entry));
            }
            let multiboot = header.is_some();
            BootState {
                mode: CpuMode::Protected32,
                rip: entry,
                rsp: BOOT_STACK_TOP,
                rax: if multiboot {
                    u64::from(MULTIBOOT_BOOTLOADER_MAGIC)
                } else {
                    0
                },
                rbx: info_addr,
                rdi: 0,
            }
        }
    };
    Ok(LoadedKernel {
        kind,
        boot,
        info_addr,
        kernel_end,
    })
}

fn load_raw(
    mem: &GuestRam,
    req: &LoadRequest<'_>,
    raw: RawImage,
) -> Result<LoadedKernel, LoaderError> {
    let len = req.kernel.len() as u64;
    check_kernel_range(mem, "raw image", raw.load_addr, len)?;
    write_guest(mem, "raw image", raw.load_addr, req.kernel)?;
    let kernel_end = raw.load_addr + len;
    let info_addr = write_boot_info(mem, req, kernel_end)?;
    write_boot_gdt(mem)?;
    match raw.mode {
        CpuMode::Long64 | CpuMode::Protected32 if raw.entry > u64::from(u32::MAX) => {
            return Err(LoaderError::EntryAbove4G(raw.entry))
        }
        CpuMode::Long64 => write_identity_page_tables(mem)?,
        CpuMode::Real if raw.entry >= EXTENDED_MEMORY_START => {
            return Err(LoaderError::RealModeEntry(raw.entry))
        }
        _ => {}
    }
    Ok(LoadedKernel {
        kind: ImageKind::Raw,
        boot: BootState {
            mode: raw.mode,
            rip: raw.entry,
            rsp: BOOT_STACK_TOP,
            rax: 0,
            rbx: info_addr,
            rdi: info_addr,
        },
        info_addr,
        kernel_end,
    })
}

/// A GDT with flat segments (Intel SDM vol. 3 §3.4.5): 0x08 32-bit code, 0x10 data, 0x18 64-bit
/// code. The multiboot kernel must load its own GDT; this one backs the initial selectors.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00CF_9B00_0000_FFFF, // code: base 0, limit 4 GiB, G, D, P, DPL0, execute/read, accessed
    0x00CF_9300_0000_FFFF, // data: base 0, limit 4 GiB, G, B, P, DPL0, read/write, accessed
    0x00AF_9B00_0000_FFFF, // 64-bit code: L set, D clear
];

fn write_boot_gdt(mem: &GuestRam) -> Result<(), LoaderError> {
    let bytes: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write_guest(mem, "boot GDT", BOOT_GDT_ADDR, &bytes)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (SDM vol. 3 §4.5): PML4[0] -> PDPT,
/// PDPT[0..4] -> four page directories.
fn write_identity_page_tables(mem: &GuestRam) -> Result<(), LoaderError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write_guest(
        mem,
        "page tables",
        PML4_ADDR,
        &(PDPT_ADDR | PRESENT_RW).to_le_bytes(),
    )?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * PAGE;
        write_guest(
            mem,
            "page tables",
            PDPT_ADDR + i * 8,
            &(pd | PRESENT_RW).to_le_bytes(),
        )?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|j| {
                let addr = (i * 512 + j) << 21;
                (addr | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes()
            })
            .collect();
        write_guest(mem, "page tables", pd, &entries)?;
    }
    Ok(())
}

/// The e820-style memory map the guest sees (spec §3.3 "mmap").
fn memory_map(mem: &GuestRam) -> Vec<(u64, u64, u32)> {
    let total = crate::memory::ram_size(mem);
    let low_end = total.min(LOW_RAM_END);
    let mut map = vec![
        (0, LOW_MEMORY_END, MMAP_AVAILABLE),
        (LOW_MEMORY_END, 0xA_0000 - LOW_MEMORY_END, MMAP_RESERVED),
        (0xF_0000, 0x1_0000, MMAP_RESERVED),
        (
            EXTENDED_MEMORY_START,
            low_end - EXTENDED_MEMORY_START,
            MMAP_AVAILABLE,
        ),
    ];
    if total > low_end {
        map.push((HIGH_RAM_START, total - low_end, MMAP_AVAILABLE));
    }
    map
}

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

    fn put_u32(&mut self, at: usize, value: u32) {
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
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

/// Places the modules (page aligned) after the kernel and writes the multiboot info block (spec §3.3) with
/// memory sizes, memory map, command line, modules and boot loader name. Returns its address.
fn write_boot_info(
    mem: &GuestRam,
    req: &LoadRequest<'_>,
    kernel_end: u64,
) -> Result<u64, LoaderError> {
    let mut area = InfoArea { bytes: Vec::new() };
    let (info, info_addr) = area.alloc(MBI_SIZE, 8)?;
    let total = crate::memory::ram_size(mem);
    let low_end = total.min(LOW_RAM_END);
    let mut flags = MBI_MEMORY | MBI_CMDLINE | MBI_MMAP | MBI_BOOT_LOADER_NAME;
    area.put_u32(info + 4, (LOW_MEMORY_END / 1024) as u32);
    let upper_kib = (low_end - EXTENDED_MEMORY_START) / 1024;
    area.put_u32(info + 8, u32::try_from(upper_kib).unwrap_or(u32::MAX));

    let cmdline = area.string(&req.cmdline)?;
    area.put_u32(info + 16, cmdline as u32);

    let map = memory_map(mem);
    let (mmap, mmap_addr) = area.alloc(map.len() * MMAP_ENTRY_SIZE, 8)?;
    for (i, (base, len, kind)) in map.iter().enumerate() {
        let e = mmap + i * MMAP_ENTRY_SIZE;
        area.put_u32(e, (MMAP_ENTRY_SIZE - 4) as u32);
        area.put_u64(e + 4, *base);
        area.put_u64(e + 12, *len);
        area.put_u32(e + 20, *kind);
    }
    area.put_u32(info + 44, (map.len() * MMAP_ENTRY_SIZE) as u32);
    area.put_u32(info + 48, mmap_addr as u32);

    if !req.modules.is_empty() {
        flags |= MBI_MODS;
        let (mods, mods_addr) = area.alloc(req.modules.len() * MODULE_ENTRY_SIZE, 8)?;
        let mut next = kernel_end.max(EXTENDED_MEMORY_START);
        for (i, module) in req.modules.iter().enumerate() {
            // Always page aligned, which also satisfies header flag 0 (spec §3.1.2).
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
            area.put_u32(e, start as u32);
            area.put_u32(e + 4, (start + len) as u32);
            area.put_u32(e + 8, name as u32);
            next = start + len;
        }
        area.put_u32(info + 20, req.modules.len() as u32);
        area.put_u32(info + 24, mods_addr as u32);
    }
    let name = area.string("irqvm")?;
    area.put_u32(info + 64, name as u32);
    area.put_u32(info, flags);
    write_guest(mem, "boot information", INFO_BASE, &area.bytes)?;
    Ok(info_addr)
}

#[cfg(test)]
mod tests;
