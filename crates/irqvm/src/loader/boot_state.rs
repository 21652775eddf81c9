//! The boot vCPU's starting state, whatever the image format: the boot GDT, the long-mode
//! identity page tables, and the registers that hand the boot information to the kernel.

use crate::loader::error::LoaderError;
use crate::loader::layout::{
    write_guest, BOOT_GDT_ADDR, BOOT_STACK_TOP, EXTENDED_MEMORY_START, PAGE, PDPT_ADDR, PD_ADDR,
    PML4_ADDR,
};
use crate::memory::GuestRam;

/// Selectors in the boot GDT.
pub const BOOT_CS32: u16 = 0x08;
pub const BOOT_DS: u16 = 0x10;
pub const BOOT_CS64: u16 = 0x18;
/// A GDT with flat segments (Intel SDM vol. 3 §3.4.5): 0x08 32-bit code, 0x10 data, 0x18 64-bit
/// code. The multiboot kernel must load its own GDT; this one backs the initial selectors.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00CF_9B00_0000_FFFF, // code: base 0, limit 4 GiB, G, D, P, DPL0, execute/read, accessed
    0x00CF_9300_0000_FFFF, // data: base 0, limit 4 GiB, G, B, P, DPL0, read/write, accessed
    0x00AF_9B00_0000_FFFF, // 64-bit code: L set, D clear
];

/// EAX value a multiboot v1 kernel is entered with (spec §3.2).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

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

/// How the kernel learns where its boot information is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Handoff {
    /// Multiboot v1 (spec §3.2): EAX = 0x2BADB002, EBX = the info block.
    Multiboot,
    /// A plain ELF32 image: EBX = the info block, nothing claims multiboot.
    Ebx,
    /// Plain ELF64 and raw images: RBX and RDI = the info block (RDI is the first argument of
    /// the System V AMD64 calling convention, so a C entry point receives it).
    RbxRdi,
    /// Linux's 64-bit boot protocol (boot.rst): RSI = the zero page, nothing else. [`BootState`]
    /// has no RSI: `LoadedKernel::rsi` carries it to the vCPU setup.
    Rsi,
}

/// Where and how a format wants its image entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub mode: CpuMode,
    /// Guest-physical entry point (identity mapped in long mode).
    pub rip: u64,
    pub handoff: Handoff,
}

impl Entry {
    /// Refuses an entry point the start mode cannot reach: above 4 GiB in protected mode (no
    /// paging) or long mode (only the first 4 GiB are mapped), at or above 1 MiB in real mode.
    pub fn check(&self) -> Result<(), LoaderError> {
        match self.mode {
            CpuMode::Protected32 | CpuMode::Long64 if self.rip > u64::from(u32::MAX) => {
                Err(LoaderError::EntryAbove4G(self.rip))
            }
            CpuMode::Real if self.rip >= EXTENDED_MEMORY_START => {
                Err(LoaderError::RealModeEntry(self.rip))
            }
            _ => Ok(()),
        }
    }

    /// The registers the boot vCPU starts with when the boot information is at `info_addr`.
    pub fn boot_state(&self, info_addr: u64) -> BootState {
        let (rax, rbx, rdi) = match self.handoff {
            Handoff::Multiboot => (u64::from(MULTIBOOT_BOOTLOADER_MAGIC), info_addr, 0),
            Handoff::Ebx => (0, info_addr, 0),
            Handoff::RbxRdi => (0, info_addr, info_addr),
            Handoff::Rsi => (0, 0, 0),
        };
        BootState {
            mode: self.mode,
            rip: self.rip,
            rsp: BOOT_STACK_TOP,
            rax,
            rbx,
            rdi,
        }
    }

    /// RSI of the boot vCPU: the zero page for Linux's 64-bit boot protocol, 0 otherwise.
    pub fn rsi(&self, info_addr: u64) -> u64 {
        match self.handoff {
            Handoff::Rsi => info_addr,
            _ => 0,
        }
    }
}

/// Writes the structures the start mode needs: the GDT always (its selectors back the initial
/// segment registers), the identity page tables for long mode.
pub(super) fn write_mode_structures(mem: &GuestRam, mode: CpuMode) -> Result<(), LoaderError> {
    write_boot_gdt(mem)?;
    if mode == CpuMode::Long64 {
        write_identity_page_tables(mem)?;
    }
    Ok(())
}

fn write_boot_gdt(mem: &GuestRam) -> Result<(), LoaderError> {
    let bytes: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write_guest(mem, "boot GDT", BOOT_GDT_ADDR, &bytes)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (SDM vol. 3 §4.5): `PML4[0]` -> PDPT,
/// `PDPT[0..4]` -> four page directories.
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
