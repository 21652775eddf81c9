//! Kernel loading: multiboot v1 (ELF32, ELF64 with a 32-bit entry, a.out kludge), Linux (a
//! bzImage through the 64-bit boot protocol, an ELF vmlinux through its PVH entry), plain ELF32,
//! plain ELF64 (entered in long mode) and raw binaries.
//!
//! The loader is pure apart from writing guest memory. Images are hostile input: every offset and
//! size is checked, nothing can panic or allocate without bound. Its parts, in the order
//! [`load`] uses them:
//!
//! | module | role |
//! |---|---|
//! | `multiboot`, `bzimage`, `pvh`, `elf`, `raw` | formats: each reads an image into a [`ImageKind`], segments and an entry point, touching no guest memory |
//! | `layout` | the low-memory layout the loader owns, the guest memory maps (multiboot's, and Linux's e820/PVH map), and the checks that place segments in RAM |
//! | `multiboot::info` | the boot information of every non-Linux format (multiboot info block, memory map, command line, modules) |
//! | `bzimage::write_zero_page`, `pvh::write_start_info`, `linux` | the Linux boot information: zero page or `hvm_start_info`, command line, initrd, memory map |
//! | `boot_state` | what the boot vCPU starts with: GDT, long-mode page tables, registers ([`BootState`]) |
//! | `request`, `error` | the caller's [`LoadRequest`] and the typed [`LoaderError`] |
//!
//! Formats are recognised in this order: a multiboot header (the project's own guests), the
//! bzImage magic "HdrS", an ELF image with a PVH note, a plain ELF image. Modules (`--initrd`) go
//! after the kernel's highest byte (for a bzImage, after its `init_size`), page aligned.

mod boot_state;
pub mod bzimage;
mod elf;
mod error;
mod image;
mod layout;
mod linux;
mod multiboot;
pub mod pvh;
mod raw;
mod request;

pub use boot_state::{
    BootState, CpuMode, BOOT_CS32, BOOT_CS64, BOOT_DS, BOOT_GDT, MULTIBOOT_BOOTLOADER_MAGIC,
};
pub use error::{BzImageError, ElfError, LoaderError, MultibootError, PvhError};
pub use image::ImageKind;
pub use layout::{BIOS_AREA_START, BOOT_GDT_ADDR, BOOT_STACK_TOP, INFO_BASE, PML4_ADDR};
pub use linux::BootPlatform;
pub use multiboot::MULTIBOOT_HEADER_MAGIC;
pub use request::{kernel_cmdline, LoadRequest, Module, RawImage};

use crate::memory::GuestRam;
use image::KernelImage;

/// Result of loading: the start state plus what was loaded, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    pub kind: ImageKind,
    pub boot: BootState,
    /// Guest-physical address of the boot information: the multiboot info block, or for Linux
    /// the zero page (bzImage) or `hvm_start_info` (PVH).
    pub info_addr: u64,
    /// First byte after the kernel image (including bss; for a bzImage, its `init_size`).
    pub kernel_end: u64,
    /// RSI of the boot vCPU, which [`BootState`] does not carry: the zero page for a bzImage
    /// (Linux's 64-bit boot protocol), 0 for every other format.
    pub rsi: u64,
}

/// Loads the kernel and its boot information; returns how the boot vCPU must start. Nothing is
/// written to guest memory unless the image parsed and its entry point is reachable.
pub fn load(mem: &GuestRam, req: &LoadRequest<'_>) -> Result<LoadedKernel, LoaderError> {
    load_with(mem, req, &BootPlatform::default())
}

/// [`load`], passing a Linux kernel the platform facts in `platform` (the ACPI RSDP).
pub fn load_with(
    mem: &GuestRam,
    req: &LoadRequest<'_>,
    platform: &BootPlatform,
) -> Result<LoadedKernel, LoaderError> {
    let image = parse(req)?;
    image.entry.check()?;
    let what = match image.kind {
        ImageKind::Raw => "raw image",
        _ => "kernel segment",
    };
    let kernel_end = layout::load_segments(mem, what, &image.segments)?;
    let info_addr = match image.kind {
        ImageKind::Pvh => pvh::write_start_info(mem, req, kernel_end, platform)?,
        ImageKind::BzImage => bzimage::write_zero_page(mem, req, kernel_end, platform)?,
        _ => multiboot::write_boot_info(mem, &req.cmdline, &req.modules, kernel_end)?,
    };
    boot_state::write_mode_structures(mem, image.entry.mode)?;
    Ok(LoadedKernel {
        kind: image.kind,
        boot: image.entry.boot_state(info_addr),
        info_addr,
        kernel_end,
        rsi: image.entry.rsi(info_addr),
    })
}

/// The format [`load`] would load `kernel` as (not raw), without touching guest memory: for
/// choosing the command line ([`ImageKind::is_linux`]) before loading.
pub fn detect(kernel: &[u8]) -> Result<ImageKind, LoaderError> {
    let req = LoadRequest {
        kernel,
        cmdline: String::new(),
        modules: Vec::new(),
        raw: None,
    };
    parse(&req).map(|image| image.kind)
}

/// Recognises the image's format: raw if the caller says so, multiboot if it has a multiboot
/// header (which may describe an ELF file), then a bzImage ("HdrS"), an ELF vmlinux with a PVH
/// entry note, and plain ELF.
fn parse<'a>(req: &LoadRequest<'a>) -> Result<KernelImage<'a>, LoaderError> {
    let kernel = req.kernel;
    if kernel.is_empty() {
        return Err(LoaderError::Empty);
    }
    if let Some(raw) = req.raw {
        return Ok(raw::parse(kernel, raw));
    }
    if let Some(image) = multiboot::parse(kernel)? {
        return Ok(image);
    }
    if bzimage::is_bzimage(kernel) {
        return bzimage::parse(kernel);
    }
    if let Some(image) = pvh::parse(kernel)? {
        return Ok(image);
    }
    if elf::is_elf(kernel) {
        return elf::parse_plain(kernel);
    }
    Err(LoaderError::UnknownFormat)
}

#[cfg(test)]
mod tests;
