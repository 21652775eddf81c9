//! What can be wrong with a kernel image or a load request: each variant names the problem, so
//! a caller (and a test) can match it.

/// Errors from loading a kernel: each names what is wrong with the image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    #[error("the kernel image is empty")]
    Empty,
    #[error(
        "unknown kernel format: no multiboot header in the first 8 KiB, not a bzImage, not ELF"
    )]
    UnknownFormat,
    #[error("malformed ELF image: {0}")]
    BadElf(#[from] ElfError),
    #[error("malformed multiboot header: {0}")]
    BadMultiboot(#[from] MultibootError),
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
    #[error("the kernel segments at {first:#x} and {second:#x} overlap in memory")]
    OverlappingSegments { first: u64, second: u64 },
    #[error("the entry point {0:#x} is not inside a loaded segment")]
    EntryOutsideImage(u64),
    #[error("the entry point {0:#x} is above 4 GiB, out of reach of the boot mode (32-bit, or long mode with the first 4 GiB mapped)")]
    EntryAbove4G(u64),
    #[error("the command line and module names do not fit in the boot information area")]
    BootInfoTooLarge,
    #[error("a raw image in real mode must be entered below 1 MiB (entry {0:#x})")]
    RealModeEntry(u64),
    #[error("malformed bzImage: {0}")]
    BadBzImage(#[from] BzImageError),
    #[error("malformed PVH note: {0}")]
    BadPvhNote(#[from] PvhError),
    #[error("the command line is {len} bytes, more than the {max} the kernel accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the command line contains a NUL byte, which would end it early")]
    CmdlineHasNul,
    #[error("{count} modules given; this boot protocol takes at most {max}")]
    TooManyModules { count: usize, max: usize },
}

/// What is wrong with a bzImage's setup header (Linux Documentation/arch/x86/boot.rst).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BzImageError {
    #[error("the image ends inside the setup header")]
    HeaderTruncated,
    #[error("boot_flag is {0:#x}, not 0xaa55")]
    BadBootFlag(u16),
    #[error("boot protocol {0:#x} is older than 2.12, the first with the 64-bit entry flag")]
    ProtocolTooOld(u16),
    #[error("the kernel has no 64-bit entry point (xloadflags bit XLF_KERNEL_64 clear)")]
    No64BitEntry,
    #[error("not a bzImage (loadflags LOADED_HIGH clear: a zImage loads below 1 MiB)")]
    NotLoadedHigh,
    #[error(
        "the setup code ({setup} bytes) leaves no protected-mode kernel in the {file}-byte file"
    )]
    NoProtectedModeKernel { setup: usize, file: usize },
    #[error("the protected-mode kernel ({0} bytes) ends before startup_64 at offset 0x200")]
    NoStartup64(usize),
}

/// What is wrong with the Xen PVH entry note of an ELF kernel (Xen's elfnote.h,
/// XEN_ELFNOTE_PHYS32_ENTRY).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PvhError {
    #[error("a PT_NOTE segment is malformed or outside the file")]
    MalformedNotes,
    #[error("the PHYS32_ENTRY descriptor is {0} bytes, not 4 or 8")]
    DescriptorSize(usize),
    #[error("the PHYS32_ENTRY address {0:#x} is above 4 GiB")]
    EntryAbove4G(u64),
}

/// What is wrong with an ELF image (System V ABI, "ELF Header" and "Program Header" chapters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("no ELF magic")]
    NoMagic,
    #[error("unknown ELF class {0} (neither ELF32 nor ELF64)")]
    UnknownClass(u8),
    #[error("not little-endian")]
    NotLittleEndian,
    #[error("header truncated")]
    HeaderTruncated,
    #[error("unsupported ELF version in the identification bytes")]
    UnsupportedVersion,
    #[error("not an executable (e_type {0}, ET_EXEC wanted)")]
    NotExecutable(u16),
    #[error("ELF32 image is not for i386 (e_machine {0})")]
    NotI386(u16),
    #[error("ELF64 image is not for x86-64 (e_machine {0})")]
    NotX86_64(u16),
    #[error("program header entries of {0} bytes, not the size of the class")]
    ProgramHeaderSize(u16),
    #[error("no program headers")]
    NoProgramHeaders,
    #[error("{count} program headers, more than the {max} irqvm accepts")]
    TooManyProgramHeaders { count: usize, max: usize },
    #[error("program headers outside the file")]
    ProgramHeadersOutsideFile,
    #[error("segment file size exceeds its memory size")]
    FileSizeExceedsMemSize,
    #[error("segment data outside the file")]
    SegmentDataOutsideFile,
    #[error("segment wraps around the address space")]
    SegmentWraps,
    #[error("no loadable (PT_LOAD) segment")]
    NoLoadableSegment,
}

/// What is wrong with a multiboot v1 header (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MultibootError {
    #[error("address fields truncated")]
    AddressFieldsTruncated,
    #[error("neither ELF nor address fields (flag 16) given")]
    NoLoadInformation,
    #[error("header_addr is below load_addr")]
    HeaderBelowLoadAddr,
    #[error("load_addr places the image before the start of the file")]
    LoadAddrBeforeFile,
    #[error("load_end_addr is below load_addr")]
    LoadEndBelowLoadAddr,
    #[error("load_end_addr is beyond the end of the file")]
    LoadEndBeyondFile,
    #[error("bss_end_addr is below the end of the loaded data")]
    BssEndBelowLoadEnd,
}
