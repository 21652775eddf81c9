//! What the two Linux boot protocols ([`super::pvh`] and [`super::bzimage`]) share: where their
//! parameter blocks and command line go in the boot information area, the platform facts they
//! pass on (the ACPI RSDP), and the command line writer.
//!
//! | address | holds |
//! |---|---|
//! | 0x10000 | the zero page (`boot_params`, 4 KiB) or PVH's `hvm_start_info` |
//! | 0x11000 | PVH module list (`hvm_modlist_entry`s, one page) |
//! | 0x12000 | PVH memory map (`hvm_memmap_table_entry`s, one page) |
//! | 0x20000-0x8FFFF | the kernel command line, NUL terminated |

use crate::loader::error::LoaderError;
use crate::loader::layout::{write_guest, INFO_BASE, INFO_END, PAGE};
use crate::memory::GuestRam;

/// The zero page or `hvm_start_info`.
pub(super) const PARAMS_ADDR: u64 = INFO_BASE;
pub(super) const PVH_MODLIST_ADDR: u64 = INFO_BASE + PAGE;
pub(super) const PVH_MEMMAP_ADDR: u64 = INFO_BASE + 2 * PAGE;
pub(super) const CMDLINE_ADDR: u64 = INFO_BASE + 0x1_0000;
/// Longest command line the area holds, without its NUL.
pub(super) const CMDLINE_MAX: usize = (INFO_END - CMDLINE_ADDR - 1) as usize;

/// Facts about the platform a Linux boot protocol hands to the kernel, which the loader cannot
/// know by itself. Multiboot and plain images ignore them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootPlatform {
    /// Guest-physical address of the ACPI RSDP (see [`crate::acpi`]): PVH passes it in
    /// `hvm_start_info.rsdp_paddr`, the zero page in `acpi_rsdp_addr` (protocol 2.14+). `None`
    /// leaves both 0, and Linux scans 0xE0000-0xFFFFF for the RSDP itself.
    pub acpi_rsdp: Option<u64>,
}

/// Writes the command line (NUL terminated) at [`CMDLINE_ADDR`]; `max` is the longest the kernel
/// accepts, without the NUL. Returns its address.
pub(super) fn write_cmdline(mem: &GuestRam, cmdline: &str, max: usize) -> Result<u64, LoaderError> {
    let max = max.min(CMDLINE_MAX);
    if cmdline.len() > max {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    if cmdline.contains('\0') {
        return Err(LoaderError::CmdlineHasNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    write_guest(mem, "command line", CMDLINE_ADDR, &bytes)?;
    Ok(CMDLINE_ADDR)
}
