//! Applying INIT and SIPI to a KVM vCPU: the architectural state after INIT (SDM vol. 3 Table
//! 10-1, as data in `irqchip::mpstate::reset_state`) through KVM_SET_SREGS / KVM_SET_REGS /
//! KVM_SET_DEBUGREGS / KVM_SET_VCPU_EVENTS / KVM_SET_MSRS, and the SIPI start (real mode at CS =
//! vector << 8, base vector << 12, RIP 0; SDM §9.4.3).
//!
//! In `user` mode KVM never sees the INIT, so its own `kvm_vcpu_reset(init_event = true)` does
//! not run: everything INIT changes is written here.
//!
//! * Written: RIP, RFLAGS, the sixteen general registers (RDX = the processor signature), CR0
//!   (CD and NW kept, `cr0_from`), CR2, CR3, CR4, CR8 (the TPR, which `LocalApic::init_reset`
//!   clears), IA32_EFER, every segment register with its hidden part (so IA32_FS_BASE and
//!   IA32_GS_BASE, which are the FS and GS bases), GDTR, IDTR, LDTR, TR, DR0-DR3, DR6, DR7; pending
//!   exceptions, a queued interrupt, NMI state and the interrupt shadow are dropped; and the MSRs
//!   of [`INIT_CLEARED_MSRS`] go to 0.
//! * Kept, as the table says (`ArchResetState::preserved`: the fields INIT leaves `None`): x87,
//!   MMX and SSE state, XCR0, the TSC, IA32_PAT, MTRRs, SMBASE, performance counters, machine
//!   check, IA32_APIC_BASE and every other MSR (SYSENTER_*, STAR, LSTAR, CSTAR, FMASK,
//!   KERNEL_GS_BASE, TSC_AUX, ...).
//!
//! The guest `init_state` (crates/irqvm/guests) checks both lists from inside a real vCPU.
//!
//! Cost (issue 13, docs/benchmarks.md "AP bring-up"): an ioctl costs ~4-5 µs here and an AP's
//! start-up waits for them, so INIT takes six (KVM_GET_SREGS, then one KVM_SET_* per group and
//! one batched KVM_GET_MSRS), a SIPI accepted together with its INIT adds none (the start is
//! folded into the INIT state, [`ArchResetState::apply_start`]), and a later SIPI two (the
//! registers INIT wrote are kept, [`InitApplied`], so nothing is read back), or none where the
//! next KVM_RUN follows at once ([`stage_sipi`]: through `kvm_run`'s synced registers).

use kvm_bindings::{
    kvm_dtable, kvm_msr_entry, kvm_segment, Msrs, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::{SyncReg, VcpuFd};

use irqchip::mpstate::SipiAction;
use irqchip::mpstate::{gpr, ArchResetState, DescriptorTable, ResetCause, SegmentState};

use crate::backend::IrqchipError;
use crate::kvm::KvmError;

/// An MSR that INIT clears although it is not part of the register state `kvm_sregs` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitClearedMsr {
    pub index: u32,
    pub name: &'static str,
}

const fn msr(index: u32, name: &'static str) -> InitClearedMsr {
    InitClearedMsr { index, name }
}

/// The MSRs INIT sets to 0 besides IA32_EFER (which goes through `kvm_sregs`). Table 10-1 keeps
/// "all other MSRs"; these are the exceptions a VMM must apply itself:
/// * KVM's paravirtual MSRs: the guest OS that INIT restarts has not asked for a clock page,
///   steal-time record, async-PF area or PV-EOI word, and KVM must stop writing guest memory for
///   the old one. KVM's own INIT (`kvm_vcpu_reset`, and `kvm_lapic_reset` for PV EOI) clears
///   them; kernel and split mode get that from KVM, user mode from here.
/// * IA32_SPEC_CTRL and IA32_UMWAIT_CONTROL: KVM's VMX and SVM INIT paths clear them, so the
///   guest sees the same in every irqchip mode.
/// * IA32_BNDCFGS (MPX) and the CET MSRs: INIT clears them (the MPX and CET chapters of SDM vol.
///   1; KVM clears BNDCFGS at INIT too).
///
/// Only those KVM lists in KVM_GET_MSR_INDEX_LIST are touched ([`init_cleared_msrs`]), and only
/// when they are not already 0.
pub const INIT_CLEARED_MSRS: &[InitClearedMsr] = &[
    msr(0x12, "MSR_KVM_SYSTEM_TIME"),
    msr(0x4B56_4D01, "MSR_KVM_SYSTEM_TIME_NEW"),
    msr(0x4B56_4D02, "MSR_KVM_ASYNC_PF_EN"),
    msr(0x4B56_4D03, "MSR_KVM_STEAL_TIME"),
    msr(0x4B56_4D04, "MSR_KVM_PV_EOI_EN"),
    msr(0x4B56_4D06, "MSR_KVM_ASYNC_PF_INT"),
    msr(0x48, "IA32_SPEC_CTRL"),
    msr(0xE1, "IA32_UMWAIT_CONTROL"),
    msr(0xD90, "IA32_BNDCFGS"),
    msr(0x6A0, "IA32_U_CET"),
    msr(0x6A2, "IA32_S_CET"),
    msr(0x6A4, "IA32_PL0_SSP"),
    msr(0x6A5, "IA32_PL1_SSP"),
    msr(0x6A6, "IA32_PL2_SSP"),
    msr(0x6A7, "IA32_PL3_SSP"),
    msr(0x6A8, "IA32_INTERRUPT_SSP_TABLE_ADDR"),
];

/// The entries of [`INIT_CLEARED_MSRS`] that KVM knows (`kvm_msrs`: its KVM_GET_MSR_INDEX_LIST).
/// An MSR KVM does not list cannot hold a value a guest wrote.
pub fn init_cleared_msrs(kvm_msrs: &[u32]) -> Vec<InitClearedMsr> {
    INIT_CLEARED_MSRS
        .iter()
        .copied()
        .filter(|m| kvm_msrs.contains(&m.index))
        .collect()
}

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

/// The registers an INIT wrote, kept while the vCPU waits for its SIPI: the SIPI then changes
/// CS and RIP in them and writes them back without reading them first. Valid only until the
/// vCPU runs or its registers are written otherwise (the caller drops it then).
#[derive(Clone, Debug)]
pub struct InitApplied {
    sregs: kvm_bindings::kvm_sregs,
    regs: kvm_bindings::kvm_regs,
}

/// Loads the state after INIT into `vcpu`: `state` is `ArchResetState::after_init`, whose `None`
/// fields are what INIT keeps (with [`ArchResetState::apply_start`] already applied when the
/// SIPI came with it); `msrs` are the [`init_cleared_msrs`] of this KVM. A power-up state is
/// refused: KVM_CREATE_VCPU already did the power-up, and user mode has no RESET.
pub fn apply_init(
    vcpu: &VcpuFd,
    state: &ArchResetState,
    msrs: &[InitClearedMsr],
) -> Result<InitApplied, IrqchipError> {
    if state.cause != ResetCause::Init {
        return Err(IrqchipError::NotInitState);
    }
    let applied = apply_init_registers(vcpu, state)?;
    clear_msrs(vcpu, msrs)?;
    Ok(applied)
}

/// Sets every MSR of `msrs` that is not 0 to 0: one KVM_GET_MSRS for all of them, then a
/// KVM_SET_MSRS only for those that read non-zero (a guest rarely leaves one set; writing 0
/// regardless would have side effects, e.g. a kvmclock MSR write asks KVM for a clock update of
/// every vCPU). KVM_GET_MSRS stops at the first MSR it cannot read: that one is skipped (the
/// guest cannot have set it either) and the rest read again. One that reads non-zero and cannot
/// be cleared is an error.
fn clear_msrs(vcpu: &VcpuFd, msrs: &[InitClearedMsr]) -> Result<(), IrqchipError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let (values, unreadable) = read_msrs(vcpu, rest);
        for (m, value) in rest.iter().zip(&values) {
            if *value != 0 {
                write_msr(vcpu, m.index, 0).map_err(|source| IrqchipError::InitMsr {
                    name: m.name,
                    index: m.index,
                    source,
                })?;
            }
        }
        // Past the values read, and past the one KVM refused to read.
        let skip = values.len() + usize::from(unreadable);
        rest = rest.get(skip..).unwrap_or_default();
    }
    Ok(())
}

/// One KVM_GET_MSRS of `msrs`: the values KVM read, in order, and whether it stopped early at
/// one it could not read (the next one). A failed ioctl counts as "could not read the first".
fn read_msrs(vcpu: &VcpuFd, msrs: &[InitClearedMsr]) -> (Vec<u64>, bool) {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            ..Default::default()
        })
        .collect();
    let Ok(mut list) = Msrs::from_entries(&entries) else {
        return (Vec::new(), true);
    };
    let read = vcpu.get_msrs(&mut list).unwrap_or(0).min(msrs.len());
    let values = list.as_slice()[..read].iter().map(|e| e.data).collect();
    (values, read < msrs.len())
}

fn one_msr(index: u32, data: u64) -> Result<Msrs, KvmError> {
    Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|_| KvmError::TooManyEntries {
        what: "KVM_SET_MSRS list",
        entries: 1,
    })
}

pub(super) fn write_msr(vcpu: &VcpuFd, index: u32, value: u64) -> Result<(), KvmError> {
    let written = vcpu
        .set_msrs(&one_msr(index, value)?)
        .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
    if written == 1 {
        Ok(())
    } else {
        Err(KvmError::Ioctl {
            what: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })
    }
}

/// The register part of INIT: sregs (with EFER and CR8), general registers, debug registers,
/// pending events. Only the sregs are read first (INIT keeps CR0.CD/NW, IA32_APIC_BASE and the
/// rest `kvm_sregs` carries); the others are written whole.
fn apply_init_registers(vcpu: &VcpuFd, state: &ArchResetState) -> Result<InitApplied, KvmError> {
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
    // The TPR: LocalApic::init_reset cleared it; KVM keeps CR8 as its mirror.
    sregs.cr8 = 0;
    // INIT discards an interrupt KVM still had queued for injection.
    sregs.interrupt_bitmap = [0; 4];
    #[cfg(test)]
    tests::injected_failure("KVM_SET_SREGS")?;
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

    // Every field of kvm_debugregs is INIT's (`flags` must be 0).
    let debug = kvm_bindings::kvm_debugregs {
        db: state.dr0_3,
        dr6: state.dr6,
        dr7: state.dr7,
        ..Default::default()
    };
    vcpu.set_debug_regs(&debug)
        .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;

    // Pending exceptions, a queued interrupt, NMIs KVM still holds (from KVM_NMI while the vCPU
    // was in an NMI handler), NMI blocking and the interrupt shadow end with INIT, as KVM's
    // kvm_vcpu_reset(init_event) clears them in the other modes. KVM applies `nmi.pending` and
    // `interrupt.shadow` only when their VALID flags say so: without them, an NMI queued before
    // the INIT would be injected at the first instruction after the SIPI. All zero but those
    // flags: what KVM always applies (exception, interrupt, NMI injected and masked) is cleared,
    // and what it applies only with another flag (SMM, SIPI vector, payload, triple fault) it
    // leaves alone, as a read-modify-write with these flags did.
    let events = kvm_bindings::kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    vcpu.set_vcpu_events(&events)
        .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(InitApplied { sregs, regs })
}

/// Starts a vCPU in wait-for-SIPI per `start`: from the registers its INIT wrote when they
/// are known (two ioctls), else read first.
pub fn apply_sipi(
    vcpu: &VcpuFd,
    start: &SipiAction,
    after_init: Option<InitApplied>,
) -> Result<(), KvmError> {
    let Some((cs_selector, cs_base, rip)) = real_mode_start(start) else {
        return Ok(());
    };
    if let Some(applied) = after_init {
        let (sregs, regs) = applied.started(start);
        vcpu.set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        return vcpu
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"));
    }
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

/// Starts a vCPU per `start` from the registers its INIT wrote without an ioctl: they go into
/// `kvm_run`'s synced registers (KVM_CAP_SYNC_REGS), marked dirty, and the next KVM_RUN loads
/// them before anything else, also when it returns at once for `immediate_exit`
/// (tests/kvm_ioctls.rs). KVM's `sync_regs` loads them with the same functions KVM_SET_SREGS
/// and KVM_SET_REGS call, so the vCPU ends up as [`apply_sipi`] leaves it, two ioctls (~5 µs
/// each here) earlier on the AP's way from its SIPI to its first instruction (issue 13).
///
/// Until that KVM_RUN, KVM still holds the old registers: the caller must make it the next
/// register access of this vCPU (an ioctl reading them would see the old values, one writing
/// them would be overwritten), or call [`flush_staged`]. Returns false for a start that
/// changes no register (a protected-state AP's).
pub fn stage_sipi(vcpu: &mut VcpuFd, start: &SipiAction, after_init: InitApplied) -> bool {
    if real_mode_start(start).is_none() {
        return false;
    }
    let (sregs, regs) = after_init.started(start);
    let synced = vcpu.sync_regs_mut();
    synced.sregs = sregs;
    synced.regs = regs;
    vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
    vcpu.set_sync_dirty_reg(SyncReg::Register);
    true
}

/// Writes what [`stage_sipi`] or [`stage_apic_base`] left in `kvm_run` with the ioctls instead,
/// now, and takes the dirty marks back, for a caller that must read or write the registers before
/// the next KVM_RUN. Only the sets marked dirty are written: a staged IA32_APIC_BASE marks the
/// system registers alone, and the general registers in `kvm_run` are then not KVM's.
pub fn flush_staged(vcpu: &mut VcpuFd) -> Result<(), KvmError> {
    let sregs = SyncReg::SystemRegister as u64;
    let regs = SyncReg::Register as u64;
    let dirty = vcpu.get_kvm_run().kvm_dirty_regs & (sregs | regs);
    if dirty == 0 {
        return Ok(());
    }
    let synced = vcpu.sync_regs();
    if dirty & sregs != 0 {
        vcpu.set_sregs(&synced.sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    }
    if dirty & regs != 0 {
        vcpu.set_regs(&synced.regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    }
    vcpu.get_kvm_run().kvm_dirty_regs &= !dirty;
    Ok(())
}

/// Puts the model's IA32_APIC_BASE into KVM's copy without KVM_SET_MSRS: into the system
/// registers KVM copied into `kvm_run` at the KVM_RUN return just handled
/// (`kvm_valid_regs` had KVM_SYNC_X86_SREGS), marked dirty, so that the next KVM_RUN loads them
/// with KVM_SET_SREGS's function, whose `apic_base` goes through the same host-initiated
/// `kvm_set_apic_base` as KVM_SET_MSRS of 0x1B. Every other field is what KVM just reported and
/// nothing has written since (the caller's condition), so it is written back unchanged; CR8 is
/// then overwritten by `kvm_run.cr8`, which KVM loads after the synced registers. Returns false
/// (nothing staged) when KVM did not copy the system registers at that return.
///
/// The same rule as for [`stage_sipi`]: the next KVM_RUN must be the next register access, or
/// [`flush_staged`] first (INIT and SIPI do, a block does, a pause does).
pub fn stage_apic_base(vcpu: &mut VcpuFd, value: u64) -> bool {
    let sregs = SyncReg::SystemRegister as u64;
    if vcpu.get_kvm_run().kvm_valid_regs & sregs == 0 {
        return false;
    }
    vcpu.sync_regs_mut().sregs.apic_base = value;
    vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
    true
}

/// CS selector, CS base and RIP of a SIPI that starts the vCPU in real mode.
fn real_mode_start(start: &SipiAction) -> Option<(u16, u64, u64)> {
    match *start {
        SipiAction::StartRealMode {
            cs_selector,
            cs_base,
            rip,
        } => Some((cs_selector, cs_base, rip)),
        _ => None,
    }
}

impl InitApplied {
    /// INIT's registers with the SIPI's CS and RIP (SDM §9.4.3).
    fn started(self, start: &SipiAction) -> (kvm_bindings::kvm_sregs, kvm_bindings::kvm_regs) {
        let Self {
            mut sregs,
            mut regs,
        } = self;
        if let Some((cs_selector, cs_base, rip)) = real_mode_start(start) {
            sregs.cs.selector = cs_selector;
            sregs.cs.base = cs_base;
            regs.rip = rip;
        }
        (sregs, regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::mpstate::PreservedState;
    use std::sync::Mutex;

    /// The thread and the ioctl whose next call in `apply_init` fails (test builds only): how a
    /// test makes a sync that cannot fail for any guest value fail anyway, as host trouble would.
    /// Tied to a thread name so that tests running beside it are not hit.
    static FAIL_NEXT: Mutex<Option<(&'static str, &'static str)>> = Mutex::new(None);

    pub(super) fn injected_failure(what: &'static str) -> Result<(), KvmError> {
        let mut slot = FAIL_NEXT.lock().unwrap_or_else(|p| p.into_inner());
        let thread = std::thread::current();
        if *slot == Some((thread.name().unwrap_or(""), what)) {
            *slot = None;
            return Err(KvmError::Ioctl {
                what,
                source: kvm_ioctls::Error::new(libc::EIO),
            });
        }
        Ok(())
    }

    /// INIT drops what KVM holds for the vCPU besides its registers: NMIs queued with KVM_NMI
    /// (KVM keeps up to two while one is in service) and the interrupt shadow. On a bare KVM
    /// vCPU (no irqchip, as in `user` mode): two NMIs and a MOV-SS shadow go in, `apply_init`
    /// runs, and KVM_GET_VCPU_EVENTS must show none of them.
    #[test]
    fn init_drops_the_nmis_and_the_shadow_kvm_holds() {
        use irqchip::mpstate::ArchResetState;
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.nmi().unwrap();
        vcpu.nmi().unwrap();
        let mut events = vcpu.get_vcpu_events().unwrap();
        assert_ne!(events.nmi.pending, 0, "KVM holds the NMIs: {events:?}");
        events.interrupt.shadow = 2; // KVM_X86_SHADOW_INT_MOV_SS
        events.flags = KVM_VCPUEVENT_VALID_SHADOW;
        vcpu.set_vcpu_events(&events).unwrap();
        assert_ne!(vcpu.get_vcpu_events().unwrap().interrupt.shadow, 0);
        apply_init(&vcpu, &ArchResetState::after_init(0x600), &[]).unwrap();
        let after = vcpu.get_vcpu_events().unwrap();
        assert_eq!(after.nmi.pending, 0, "{after:?}");
        assert_eq!(after.nmi.injected, 0, "{after:?}");
        assert_eq!(after.interrupt.shadow, 0, "{after:?}");
    }

    /// An IA32_APIC_BASE staged in the system registers KVM copied out (`stage_apic_base`) and
    /// flushed before the next KVM_RUN (`flush_staged`, as INIT, a block or a pause do) reaches
    /// KVM with KVM_SET_SREGS alone: the general registers in `kvm_run`, which KVM did not copy
    /// out, must not be written over the vCPU's.
    #[test]
    fn a_flushed_apic_base_writes_the_system_registers_only() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert!(
            !stage_apic_base(&mut vcpu, 0xFEE0_0000),
            "nothing staged without the copy"
        );
        vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        vcpu.get_kvm_run().immediate_exit = 1;
        assert!(vcpu.run().is_err(), "EINTR at once");
        vcpu.get_kvm_run().immediate_exit = 0;
        let base = vcpu.sync_regs().sregs.apic_base;
        let disabled = base & !(1 << 11);
        vcpu.sync_regs_mut().regs.rip = regs.rip ^ 0x1000;
        assert!(stage_apic_base(&mut vcpu, disabled));
        flush_staged(&mut vcpu).unwrap();
        assert_eq!(vcpu.get_kvm_run().kvm_dirty_regs, 0);
        assert_eq!(vcpu.get_sregs().unwrap().apic_base, disabled);
        assert_eq!(vcpu.get_regs().unwrap().rip, regs.rip);
    }

    /// The policy for an ioctl on a guest-driven path that fails anyway (docs/architecture.md,
    /// "When the guest misbehaves"): the VM stops cleanly with the full report. A 2-vCPU `user`
    /// VM whose BSP sends INIT to the AP; the AP's KVM_SET_SREGS of the INIT state fails (EIO,
    /// injected): the VM ends with a `VcpuFailure` naming vCPU 1 and the ioctl, with the AP's
    /// registers, instead of an abort or an unexplained stop.
    #[test]
    fn a_failing_init_sync_stops_the_vm_with_a_report() {
        use crate::loader::{CpuMode, RawImage};
        use crate::vm::{Vm, VmConfig, VmError};
        // 32-bit flat code, paging off; the xAPIC page is irqvm's (user mode).
        let code = [
            0xC7, 0x05, 0xF0, 0x00, 0xE0, 0xFE, 0xFF, 0x01, 0x00,
            0x00, // SVR = 0x1FF (enabled)
            0xC7, 0x05, 0x10, 0x03, 0xE0, 0xFE, 0x00, 0x00, 0x00, 0x01, // ICR high: APIC ID 1
            0xC7, 0x05, 0x00, 0x03, 0xE0, 0xFE, 0x00, 0x45, 0x00,
            0x00, // ICR low: INIT, assert
            0xF4, 0xEB, 0xFD, // hlt; jmp back to hlt
        ];
        let mut cfg = VmConfig::new(code.to_vec(), "init-sender");
        cfg.raw = Some(RawImage {
            load_addr: 0x10_0000,
            entry: 0x10_0000,
            mode: CpuMode::Protected32,
        });
        cfg.cpus = 2;
        cfg.irqchip = crate::IrqchipMode::User;
        *FAIL_NEXT.lock().unwrap() = Some(("vcpu1", "KVM_SET_SREGS"));
        let result = Vm::new(&cfg)
            .unwrap()
            .run(Some(std::time::Duration::from_secs(20)));
        let armed = FAIL_NEXT.lock().unwrap().take();
        assert_eq!(armed, None, "the AP never applied the INIT");
        let Err(VmError::Vcpu(failure)) = result else {
            panic!("expected a vCPU failure, got {result:?}");
        };
        assert_eq!(failure.vcpu, 1);
        let report = failure.report();
        eprintln!("{report}");
        assert!(report.contains("KVM_SET_SREGS"), "{report}");
        assert!(failure.state.is_some(), "registers captured: {report}");
        assert!(report.contains("rip 0x"), "{report}");
    }

    /// INIT's MSR clearing reads them in one KVM_GET_MSRS, which stops at the first MSR KVM
    /// cannot read: the MSRs after it must still be cleared. A kvmclock MSR given a non-zero
    /// value with its enable bit clear (KVM keeps it without a clock page; the first of those
    /// KVM takes on a bare vCPU) goes after an index no MSR has, and must read 0 afterwards.
    #[test]
    fn init_clears_the_msrs_after_one_kvm_cannot_read() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let candidates = [
            msr(0x4B56_4D01, "MSR_KVM_SYSTEM_TIME_NEW"),
            msr(0x12, "MSR_KVM_SYSTEM_TIME"),
        ];
        let set = candidates
            .into_iter()
            .find(|m| write_msr(&vcpu, m.index, 0x1000).is_ok())
            .expect("KVM keeps a kvmclock MSR value");
        let read = |index| {
            let mut list = one_msr(index, 0).unwrap();
            assert_eq!(vcpu.get_msrs(&mut list).unwrap(), 1);
            list.as_slice()[0].data
        };
        assert_eq!(read(set.index), 0x1000, "KVM kept the value");
        clear_msrs(&vcpu, &[msr(0x4000_7F3D, "no such MSR"), set]).unwrap();
        assert_eq!(read(set.index), 0, "{} cleared", set.name);
    }

    /// Only the MSRs KVM lists are cleared: the others cannot hold a guest's value.
    #[test]
    fn init_cleared_msrs_are_those_kvm_lists() {
        let kvm = [0x10, 0x4B56_4D01, 0x48, 0x277];
        let got: Vec<u32> = init_cleared_msrs(&kvm).iter().map(|m| m.index).collect();
        assert_eq!(got, vec![0x4B56_4D01, 0x48]);
        assert!(init_cleared_msrs(&[]).is_empty());
    }

    /// SDM Table 10-1: INIT keeps "all other MSRs". None of those may be in the cleared list: the
    /// TSC, PAT, MTRRs, SYSENTER_*, STAR/LSTAR/CSTAR/FMASK, KERNEL_GS_BASE, TSC_AUX, APIC base;
    /// FS/GS base and EFER go through `kvm_sregs`.
    #[test]
    fn msrs_init_keeps_are_not_cleared_table_10_1() {
        let kept = [
            0x10,
            0x1B,
            0x174,
            0x175,
            0x176,
            0x277,
            0x2FF,
            0xC000_0080,
            0xC000_0081,
            0xC000_0082,
            0xC000_0083,
            0xC000_0084,
            0xC000_0100,
            0xC000_0101,
            0xC000_0102,
            0xC000_0103,
        ];
        for m in INIT_CLEARED_MSRS {
            assert!(!kept.contains(&m.index), "{} is kept by INIT", m.name);
        }
    }

    /// What `apply_init` leaves alone is exactly what the INIT state leaves `None` and lists as
    /// preserved (Table 10-1, INIT column "unchanged"): x87/SSE, XCR0, TSC, PAT, MTRRs, SMBASE.
    #[test]
    fn init_state_leaves_fpu_xcr0_tsc_pat_mtrr_smbase_unchanged_table_10_1() {
        let s = ArchResetState::after_init(0x806F8);
        assert_eq!(s.cause, ResetCause::Init);
        assert_eq!(
            (s.xcr0, s.pat, s.tsc, s.smbase, s.mtrr_def_type, s.fpu),
            (None, None, None, None, None, None)
        );
        for p in [
            PreservedState::X87,
            PreservedState::Mmx,
            PreservedState::SseAvx,
            PreservedState::ExtendedControlRegisters,
            PreservedState::Tsc,
            PreservedState::Pat,
            PreservedState::Mtrrs,
            PreservedState::Smbase,
            PreservedState::OtherMsrs,
            PreservedState::Cr0CacheControl,
        ] {
            assert!(s.preserved().contains(&p), "{p:?}");
        }
        assert_eq!(s.efer, 0, "INIT clears IA32_EFER");
        assert_eq!(s.gprs[gpr::RDX], 0x806F8);
    }

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
