//! Applying INIT and SIPI to a KVM vCPU: the architectural state after INIT (SDM vol. 3 Table
//! 10-1, as data in `irqchip::mpstate::reset_state`) through KVM_SET_SREGS / KVM_SET_REGS /
//! KVM_SET_DEBUGREGS / KVM_SET_VCPU_EVENTS, and the SIPI start (real mode at CS = vector << 8,
//! base vector << 12, RIP 0; SDM §9.4.3).
//!
//! What INIT keeps is not written: CR0.CD/NW (through `cr0_from`), x87/SSE state, XCR0, MSRs
//! other than EFER (EFER goes through `kvm_sregs`), the TSC, IA32_APIC_BASE.

use kvm_bindings::{kvm_dtable, kvm_segment};
use kvm_ioctls::VcpuFd;

use irqchip::mpstate::SipiAction;
use irqchip::mpstate::{gpr, ArchResetState, DescriptorTable, SegmentState};

use crate::kvm::KvmError;

/// A segment in `kvm_segment` form from the VMX access-rights layout the reset table uses
/// (type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15).
fn kvm_segment_of(seg: SegmentState) -> kvm_segment {
    let ar = seg.access_rights;
    let bit = |n: u16| ((ar >> n) & 1) as u8;
    kvm_segment {
        base: seg.base,
        limit: seg.limit,
        selector: seg.selector,
        type_: (ar & 0xF) as u8,
        present: bit(7),
        dpl: ((ar >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: 0,
        padding: 0,
    }
}

fn kvm_dtable_of(t: DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

/// Loads the state after INIT into `vcpu`.
pub fn apply_init(vcpu: &VcpuFd, state: &ArchResetState) -> Result<(), KvmError> {
    let mut sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
    sregs.cs = kvm_segment_of(state.cs);
    sregs.ds = kvm_segment_of(state.ds);
    sregs.es = kvm_segment_of(state.es);
    sregs.fs = kvm_segment_of(state.fs);
    sregs.gs = kvm_segment_of(state.gs);
    sregs.ss = kvm_segment_of(state.ss);
    sregs.ldt = kvm_segment_of(state.ldtr);
    sregs.tr = kvm_segment_of(state.tr);
    sregs.gdt = kvm_dtable_of(state.gdtr);
    sregs.idt = kvm_dtable_of(state.idtr);
    sregs.cr0 = state.cr0_from(sregs.cr0);
    sregs.cr2 = state.cr2;
    sregs.cr3 = state.cr3;
    sregs.cr4 = state.cr4;
    sregs.efer = state.efer;
    // INIT discards an interrupt KVM still had queued for injection.
    sregs.interrupt_bitmap = [0; 4];
    vcpu.set_sregs(&sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;

    let g = &state.gprs;
    let regs = kvm_bindings::kvm_regs {
        rax: g[gpr::RAX],
        rbx: g[gpr::RBX],
        rcx: g[gpr::RCX],
        rdx: g[gpr::RDX],
        rsi: g[gpr::RSI],
        rdi: g[gpr::RDI],
        rsp: g[gpr::RSP],
        rbp: g[gpr::RBP],
        r8: g[gpr::R8],
        r9: g[gpr::R9],
        r10: g[gpr::R10],
        r11: g[gpr::R11],
        r12: g[gpr::R12],
        r13: g[gpr::R13],
        r14: g[gpr::R14],
        r15: g[gpr::R15],
        rip: state.rip,
        rflags: state.rflags,
    };
    vcpu.set_regs(&regs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;

    let mut debug = vcpu
        .get_debug_regs()
        .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?;
    debug.db = state.dr0_3;
    debug.dr6 = state.dr6;
    debug.dr7 = state.dr7;
    vcpu.set_debug_regs(&debug)
        .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;

    // Pending exceptions, a queued interrupt and NMI blocking end with INIT (KVM's
    // kvm_vcpu_reset clears them too).
    let mut events = vcpu
        .get_vcpu_events()
        .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    events.exception.injected = 0;
    events.exception.pending = 0;
    events.interrupt.injected = 0;
    events.interrupt.shadow = 0;
    events.nmi.injected = 0;
    events.nmi.pending = 0;
    events.nmi.masked = 0;
    events.flags = 0;
    vcpu.set_vcpu_events(&events)
        .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Starts a vCPU in wait-for-SIPI per `start`.
pub fn apply_sipi(vcpu: &VcpuFd, start: &SipiAction) -> Result<(), KvmError> {
    let SipiAction::StartRealMode {
        cs_selector,
        cs_base,
        rip,
    } = *start
    else {
        return Ok(());
    };
    let mut sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
    sregs.cs.selector = cs_selector;
    sregs.cs.base = cs_base;
    vcpu.set_sregs(&sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
    regs.rip = rip;
    vcpu.set_regs(&regs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table 10-1's CS (code, execute/read, accessed, present) maps to KVM's fields.
    #[test]
    fn reset_code_segment_maps_to_kvm_fields() {
        let s = kvm_segment_of(SegmentState::RESET_CODE);
        assert_eq!((s.selector, s.base, s.limit), (0xF000, 0xFFFF_0000, 0xFFFF));
        assert_eq!(
            (s.type_, s.s, s.present, s.dpl, s.db, s.l, s.g),
            (0xB, 1, 1, 0, 0, 0, 0)
        );
        let t = kvm_segment_of(SegmentState::RESET_TR);
        assert_eq!((t.type_, t.s, t.present), (0xB, 0, 1));
    }
}
