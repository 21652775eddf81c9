//! Initial register state of the boot vCPU, from the loader's [`BootState`].

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::loader::{BootState, CpuMode, BOOT_CS32, BOOT_CS64, BOOT_DS, BOOT_GDT, BOOT_GDT_ADDR};

/// CR0 bits (SDM vol. 3 §2.5).
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
/// IA32_EFER bits (SDM vol. 3 §2.2.1).
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always 1; IF (bit 9) stays clear (multiboot spec §3.2).
pub const RFLAGS_RESERVED: u64 = 0x2;

/// Code segment type: execute/read, accessed. Data: read/write, accessed.
const TYPE_CODE: u8 = 0xB;
const TYPE_DATA: u8 = 0x3;

/// A flat DPL-0 segment: base 0, limit 4 GiB with 4-KiB granularity, S = 1, present; `long`
/// gives a 64-bit code segment (L = 1, D = 0), else D/B = 1.
pub(crate) fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn real_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xFFFF,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    }
}

/// Sets `sregs`/`regs` (which start as KVM's reset state) to the boot state: multiboot's
/// 32-bit protected mode with flat segments and paging off (multiboot spec §3.2), long mode with
/// the loader's identity page tables, or real mode.
pub fn apply_boot_state(boot: &BootState, sregs: &mut kvm_sregs, regs: &mut kvm_regs) {
    *regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: boot.rip,
        rsp: boot.rsp,
        rax: boot.rax,
        rbx: boot.rbx,
        rdi: boot.rdi,
        ..Default::default()
    };
    match boot.mode {
        CpuMode::Real => {
            let cs = ((boot.rip >> 4) as u16) & 0xF000;
            sregs.cs = real_segment(cs, TYPE_CODE);
            let data = real_segment(0, TYPE_DATA);
            set_data_segments(sregs, data);
            regs.rip = boot.rip - (u64::from(cs) << 4);
            return;
        }
        CpuMode::Protected32 => {
            sregs.cs = flat_segment(BOOT_CS32, TYPE_CODE, false);
            sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW | CR0_PG)) | CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        CpuMode::Long64 => {
            sregs.cs = flat_segment(BOOT_CS64, TYPE_CODE, true);
            sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = crate::loader::PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    set_data_segments(sregs, flat_segment(BOOT_DS, TYPE_DATA, false));
    sregs.gdt.base = BOOT_GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
}

fn set_data_segments(sregs: &mut kvm_sregs, seg: kvm_segment) {
    sregs.ds = seg;
    sregs.es = seg;
    sregs.fs = seg;
    sregs.gs = seg;
    sregs.ss = seg;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(mode: CpuMode, rip: u64) -> BootState {
        BootState {
            mode,
            rip,
            rsp: 0x9F000,
            rax: 0x2BAD_B002,
            rbx: 0x10000,
            rdi: 0,
        }
    }

    fn reset_sregs() -> kvm_sregs {
        kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        }
    }

    #[test]
    fn multiboot_state_is_flat_protected_mode_with_if_clear_spec_3_2() {
        let (mut s, mut r) = (reset_sregs(), kvm_regs::default());
        apply_boot_state(&boot(CpuMode::Protected32, 0x10_0000), &mut s, &mut r);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(s.cr0 & (CR0_CD | CR0_NW), 0);
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.g),
            (0, !0, 1, 0, 1)
        );
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((seg.base, seg.limit, seg.type_, seg.present), (0, !0, 3, 1));
        }
        assert_eq!(r.rflags & (1 << 9), 0, "IF clear");
        assert_eq!((r.rax, r.rbx, r.rip), (0x2BAD_B002, 0x10000, 0x10_0000));
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn long_mode_state_enables_paging_and_lma() {
        let (mut s, mut r) = (reset_sregs(), kvm_regs::default());
        apply_boot_state(&boot(CpuMode::Long64, 0x20_0000), &mut s, &mut r);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.l, s.cs.db, s.cs.selector), (1, 0, BOOT_CS64));
        assert_eq!(s.cr3, crate::loader::PML4_ADDR);
    }

    #[test]
    fn real_mode_state_splits_entry_into_cs_and_ip() {
        let (mut s, mut r) = (reset_sregs(), kvm_regs::default());
        apply_boot_state(&boot(CpuMode::Real, 0x1_7C00), &mut s, &mut r);
        assert_eq!((s.cs.selector, s.cs.base), (0x1000, 0x1_0000));
        assert_eq!(r.rip, 0x7C00);
        assert_eq!(s.cr0 & CR0_PE, 0);
    }
}
