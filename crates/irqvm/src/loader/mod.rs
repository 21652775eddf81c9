//! Kernel loading: multiboot v1 (ELF32, ELF64 with a 32-bit entry, a.out kludge), plain ELF32,
//! plain ELF64 (entered in long mode) and raw binaries.
//!
//! The loader is pure apart from writing guest memory. Images are hostile input: every offset and
//! size is checked, nothing can panic or allocate without bound. Its parts, in the order
//! [`load`] uses them:
//!
//! | module | role |
//! |---|---|
//! | `multiboot`, `elf`, `raw` | formats: each reads an image into a [`ImageKind`], segments and an entry point, touching no guest memory |
//! | `layout` | the low-memory layout the loader owns, the guest memory map, and the checks that place segments in RAM |
//! | `multiboot::info` | the boot information every format gets today (multiboot info block, memory map, command line, modules) |
//! | `boot_state` | what the boot vCPU starts with: GDT, long-mode page tables, registers ([`BootState`]) |
//! | `request`, `error` | the caller's [`LoadRequest`] and the typed [`LoaderError`] |
//!
//! A Linux boot protocol (PVH vmlinux, bzImage) slots in as one more format module beside these,
//! with its own boot information writer (start_info or zero page, the same memory map).
//! Modules (`--initrd`) go after the kernel's highest byte, page aligned.

mod boot_state;
mod elf;
mod error;
mod image;
mod layout;
mod multiboot;
mod raw;
mod request;

pub use boot_state::{
    BootState, CpuMode, BOOT_CS32, BOOT_CS64, BOOT_DS, BOOT_GDT, MULTIBOOT_BOOTLOADER_MAGIC,
};
pub use error::{ElfError, LoaderError, MultibootError};
pub use image::ImageKind;
pub use layout::{BOOT_GDT_ADDR, BOOT_STACK_TOP, INFO_BASE, PML4_ADDR};
pub use multiboot::MULTIBOOT_HEADER_MAGIC;
pub use request::{kernel_cmdline, LoadRequest, Module, RawImage};

use crate::memory::GuestRam;
use image::KernelImage;

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

/// Loads the kernel and its boot information; returns how the boot vCPU must start. Nothing is
/// written to guest memory unless the image parsed and its entry point is reachable.
pub fn load(mem: &GuestRam, req: &LoadRequest<'_>) -> Result<LoadedKernel, LoaderError> {
    let image = parse(req)?;
    image.entry.check()?;
    let what = match image.kind {
        ImageKind::Raw => "raw image",
        _ => "kernel segment",
    };
    let kernel_end = layout::load_segments(mem, what, &image.segments)?;
    let info_addr = multiboot::write_boot_info(mem, &req.cmdline, &req.modules, kernel_end)?;
    boot_state::write_mode_structures(mem, image.entry.mode)?;
    Ok(LoadedKernel {
        kind: image.kind,
        boot: image.entry.boot_state(info_addr),
        info_addr,
        kernel_end,
    })
}

/// Recognises the image's format: raw if the caller says so, multiboot if it has a multiboot
/// header (which may describe an ELF file), plain ELF otherwise.
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
    if elf::is_elf(kernel) {
        return elf::parse_plain(kernel);
    }
    Err(LoaderError::UnknownFormat)
}

#[cfg(test)]
mod tests;
