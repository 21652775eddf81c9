//! Linux's bzImage and its 64-bit boot protocol (Linux Documentation/arch/x86/boot.rst, "THE
//! LINUX/X86 BOOT PROTOCOL" and "64-bit BOOT PROTOCOL"). The file is the real-mode setup code
//! (`setup_sects` + 1 sectors of 512 bytes, with the setup header at 0x1F1) followed by the
//! protected-mode kernel (a self-decompressing stub around the compressed vmlinux). The loader
//! copies the protected-mode kernel to its preferred load address, fills a zero page
//! (`boot_params`) with a copy of the setup header, the command line pointer, the initrd and the
//! e820 memory map, and enters `startup_64` (load address + 0x200) in long mode with the loader's
//! identity page tables (covering the kernel's `init_size`, the zero page and the command line)
//! and RSI = the zero page.
//!
//! boot.rst asks for a GDT with a flat 64-bit code segment at selector 0x10 (`__BOOT_CS`) and
//! data at 0x18 (`__BOOT_DS`). The boot vCPU starts in [`CpuMode::Long64`] with irqvm's boot GDT,
//! whose 64-bit code is at 0x18 and data at 0x10 (the layout the multiboot guests use), because
//! `startup_64` depends on neither selector: its first instructions (Debian's 6.1, disassembled)
//! load 0 into DS/ES/SS/FS/GS, then `lgdt` its own GDT and `lretq` to its own CS before using a
//! selector. What it does need is RSI = the zero page (it reads `kernel_alignment` and
//! `init_size` from it at once), which [`crate::loader::LoadedKernel::rsi`] carries.
//!
//! From linux-loader this takes the `setup_header` and `boot_params` structs (the ABI, packed and
//! `ByteValued`) and `LinuxBootConfigurator`, which writes the zero page after checking it fits
//! in guest memory. It leaves linux-loader's `BzImage` loader: that copies the kernel into guest
//! memory while it reads the header, loads at `code32_start` (1 MiB) rather than `pref_address`,
//! and checks neither the protocol version, nor the 64-bit entry flag, nor that `init_size`
//! (the memory the kernel decompresses into) fits in RAM; here the header is checked first and
//! the kernel becomes one `Segment` that `layout::load_segments` checks like any other.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use vm_memory::{ByteValued, GuestAddress};

use crate::loader::boot_state::{CpuMode, Entry, Handoff};
use crate::loader::error::{BzImageError, LoaderError};
use crate::loader::image::{ImageKind, KernelImage};
use crate::loader::layout::{linux_memory_map, place_modules, Segment, EXTENDED_MEMORY_START};
use crate::loader::linux::{write_cmdline, BootPlatform, PARAMS_ADDR};
use crate::loader::request::LoadRequest;
use crate::memory::GuestRam;

/// Offset of the setup header in the image and in the zero page (boot.rst, "THE REAL-MODE
/// KERNEL HEADER").
pub const SETUP_HEADER_OFFSET: usize = 0x1F1;
/// `header` field: "HdrS", at 0x202.
const HDRS_OFFSET: usize = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const BOOT_FLAG: u16 = 0xAA55;
/// 2.12 adds `xloadflags`, which says whether the kernel has the 64-bit entry.
const MIN_PROTOCOL: u16 = 0x020C;
/// 2.14 adds `acpi_rsdp_addr` to the zero page.
const RSDP_PROTOCOL: u16 = 0x020E;
/// `loadflags` bit 0: the protected-mode kernel runs at 1 MiB or above (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags` bit 0: the kernel has the legacy 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `startup_64` is at this offset from the load address (an ABI, per head_64.S).
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// `type_of_loader` 0xFF: a boot loader without an assigned ID.
pub const TYPE_OF_LOADER_UNDEFINED: u8 = 0xFF;
/// `setup_sects` 0 means 4 (boot.rst, field `setup_sects`).
const DEFAULT_SETUP_SECTS: usize = 4;
const SECTOR: usize = 512;

/// True if the image has the setup header magic "HdrS" at 0x202.
pub(super) fn is_bzimage(image: &[u8]) -> bool {
    image.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS_MAGIC.as_slice())
}

/// Reads and checks the setup header: boot_flag, protocol 2.12 or later, a bzImage (loaded
/// high) with the 64-bit entry point.
pub fn read_setup_header(image: &[u8]) -> Result<setup_header, BzImageError> {
    let mut header = setup_header::default();
    let len = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + len)
        .ok_or(BzImageError::HeaderTruncated)?;
    header.as_mut_slice().copy_from_slice(bytes);
    let (boot_flag, version) = (header.boot_flag, header.version);
    if boot_flag != BOOT_FLAG {
        return Err(BzImageError::BadBootFlag(boot_flag));
    }
    if version < MIN_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld(version));
    }
    if header.loadflags & LOADED_HIGH == 0 {
        return Err(BzImageError::NotLoadedHigh);
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry);
    }
    Ok(header)
}

/// Where the protected-mode kernel goes: `pref_address` (2.10+) if it is a usable address,
/// 1 MiB otherwise. At `pref_address` the kernel runs where it was linked and decompresses in
/// place within `init_size`, which is the range the loader reserves for it.
pub fn load_address(header: &setup_header) -> u64 {
    let pref = header.pref_address;
    if (EXTENDED_MEMORY_START..1 << 32).contains(&pref) {
        pref
    } else {
        EXTENDED_MEMORY_START
    }
}

/// The protected-mode kernel: everything after the setup sectors.
fn protected_mode_kernel<'a>(
    image: &'a [u8],
    header: &setup_header,
) -> Result<&'a [u8], BzImageError> {
    let sects = match usize::from(header.setup_sects) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    let setup = (sects + 1) * SECTOR;
    image
        .get(setup..)
        .filter(|k| !k.is_empty())
        .ok_or(BzImageError::NoProtectedModeKernel {
            setup,
            file: image.len(),
        })
}

/// Parses a bzImage into its protected-mode kernel segment (reserving `init_size` bytes from the
/// load address) and the 64-bit entry.
pub(super) fn parse(image: &[u8]) -> Result<KernelImage<'_>, LoaderError> {
    let header = read_setup_header(image)?;
    let kernel = protected_mode_kernel(image, &header)?;
    if (kernel.len() as u64) <= STARTUP_64_OFFSET {
        return Err(BzImageError::NoStartup64(kernel.len()).into());
    }
    let paddr = load_address(&header);
    let init_size = u64::from(header.init_size);
    Ok(KernelImage {
        kind: ImageKind::BzImage,
        segments: vec![Segment {
            paddr,
            data: kernel,
            mem_size: (kernel.len() as u64).max(init_size),
        }],
        entry: Entry {
            mode: CpuMode::Long64,
            rip: paddr + STARTUP_64_OFFSET,
            handoff: Handoff::Rsi,
        },
    })
}

/// Writes the command line, the initrd (page aligned after the kernel's `init_size`, ending at
/// or below `initrd_addr_max`) and the zero page. Returns the zero page's address, which the
/// kernel gets in RSI.
pub(super) fn write_zero_page(
    mem: &GuestRam,
    req: &LoadRequest<'_>,
    kernel_end: u64,
    platform: &BootPlatform,
) -> Result<u64, LoaderError> {
    let header = read_setup_header(req.kernel)?;
    if req.modules.len() > 1 {
        return Err(LoaderError::TooManyModules {
            count: req.modules.len(),
            max: 1,
        });
    }
    // cmdline_size (2.06+) excludes the NUL.
    let cmdline_ptr = write_cmdline(mem, &req.cmdline, header.cmdline_size as usize)?;
    let initrd_limit = u64::from(header.initrd_addr_max) + 1;
    let data: Vec<&[u8]> = req.modules.iter().map(|m| m.data).collect();
    let initrd = place_modules(mem, &data, kernel_end, initrd_limit.min(1 << 32))?;
    let mut params = zero_page(mem, header, cmdline_ptr, platform);
    if let Some(&(addr, len)) = initrd.first() {
        // Both below 4 GiB (the limit above), so the 32-bit fields hold them.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    let boot = BootParams::new(&params, GuestAddress(PARAMS_ADDR));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(|_| LoaderError::OutOfRam {
        what: "zero page",
        addr: PARAMS_ADDR,
        len: std::mem::size_of::<boot_params>() as u64,
    })?;
    Ok(PARAMS_ADDR)
}

/// The zero page without the initrd: the image's setup header (boot.rst: the loader copies it
/// and fills in its "write" fields), the loader type, the command line and the e820 map.
fn zero_page(
    mem: &GuestRam,
    header: setup_header,
    cmdline_ptr: u64,
    platform: &BootPlatform,
) -> boot_params {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED;
    params.hdr.code32_start = load_address(&header) as u32;
    params.hdr.cmd_line_ptr = cmdline_ptr as u32;
    if header.version >= RSDP_PROTOCOL {
        params.acpi_rsdp_addr = platform.acpi_rsdp.unwrap_or(0);
    }
    let map = linux_memory_map(mem);
    for (slot, e) in params
        .e820_table
        .iter_mut()
        .zip(map.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: e.base,
            size: e.len,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    params
}
