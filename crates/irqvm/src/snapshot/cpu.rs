//! One vCPU's processor state: read on the vCPU's thread at a safe point, written on the
//! restoring thread before the vCPU first runs, in the order KVM needs.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::format::{FpuState, MsrValue, VcpuCpuState};
use super::xstate::XsaveHost;
use crate::kvm::KvmError;

/// What this KVM can save and restore of a processor's register state beyond REGS, SREGS,
/// FPU and the MSRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuCaps {
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// KVM_CAP_XSAVE / KVM_CAP_XSAVE2.
    pub xsave: XsaveHost,
}

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_TSC: u32 = 0x10;
/// IA32_APIC_BASE, IA32_TSC_DEADLINE: the local APIC's, carried by the chip snapshot.
const MSR_APIC_BASE: u32 = 0x1B;
const MSR_TSC_DEADLINE: u32 = 0x6E0;

/// The MSRs a snapshot reads: KVM_GET_MSR_INDEX_LIST without the local APIC's (IA32_APIC_BASE,
/// IA32_TSC_DEADLINE, the x2APIC range), IA32_TSC first.
pub fn snapshot_msrs(index_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = index_list
        .iter()
        .copied()
        .filter(|&i| i != MSR_APIC_BASE && i != MSR_TSC_DEADLINE && !(0x800..=0x8FF).contains(&i))
        .filter(|&i| i != MSR_TSC)
        .collect();
    list.insert(0, MSR_TSC);
    list
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, KvmError> {
    Msrs::from_entries(entries).map_err(|_| KvmError::TooManyEntries {
        what: "KVM_GET/SET_MSRS list",
        entries: entries.len(),
    })
}

/// Reads every MSR of `wanted` that KVM lets this vCPU read. KVM_GET_MSRS stops at the first
/// it refuses and returns how many it read: that one is skipped and the rest read on.
fn read_msrs(vcpu: &VcpuFd, wanted: &[u32]) -> Result<Vec<MsrValue>, KvmError> {
    let mut out = Vec::with_capacity(wanted.len());
    let mut rest = wanted;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries)?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        // Skip the refused one.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Reads one MSR (0 if KVM refuses it).
pub fn read_msr(vcpu: &VcpuFd, index: u32) -> Result<u64, KvmError> {
    let mut msrs = msr_list(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
    Ok(if read == 1 {
        msrs.as_slice()[0].data
    } else {
        0
    })
}

/// Reads the processor state (the vCPU is outside KVM_RUN with no exit half-handled).
pub fn capture(vcpu: &VcpuFd, msrs: &[u32], caps: CpuCaps) -> Result<VcpuCpuState, KvmError> {
    Ok(VcpuCpuState {
        regs: vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?,
        fpu: FpuState::from_kvm(&vcpu.get_fpu().map_err(KvmError::ioctl("KVM_GET_FPU"))?),
        xcrs: if caps.xcrs {
            Some(vcpu.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))?)
        } else {
            None
        },
        xsave: super::xstate::read(vcpu, caps.xsave)?,
        msrs: read_msrs(vcpu, msrs)?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?,
        events: vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Writes the registers, in KVM's order: SREGS (with IA32_APIC_BASE = `apic_base`, the chip
/// snapshot's) before REGS, then XCRS before the XSAVE area (XCR0 before the state it
/// enables: the order docs/kvm-facts.md measured), or the FPU where the snapshot or this KVM
/// has no XSAVE area (the area holds x87 and SSE as well). The local APIC comes next (the caller), then
/// [`apply_msrs`], then the events. The area and XCR0 were checked against `caps` first
/// (`snapshot::restore::check`).
pub fn apply_registers(
    vcpu: &VcpuFd,
    cpu: &VcpuCpuState,
    apic_base: u64,
    caps: CpuCaps,
) -> Result<(), KvmError> {
    let mut sregs = cpu.sregs;
    sregs.apic_base = apic_base;
    vcpu.set_sregs(&sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&cpu.regs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    if let (Some(x), true) = (&cpu.xcrs, caps.xcrs) {
        vcpu.set_xcrs(x).map_err(KvmError::ioctl("KVM_SET_XCRS"))?;
    }
    match (&cpu.xsave, caps.xsave.size) {
        (Some(area), 1..) => super::xstate::write(vcpu, area, caps.xsave),
        // `check_shape` refused malformed FPU arrays.
        _ => match cpu.fpu.to_kvm() {
            Some(fpu) => vcpu.set_fpu(&fpu).map_err(KvmError::ioctl("KVM_SET_FPU")),
            None => Ok(()),
        },
    }
}

/// Writes the MSRs: IA32_TSC first, the others, then IA32_TSC_DEADLINE (`tsc_deadline`, for a
/// KVM local APIC) last, since KVM reads a deadline against the TSC. KVM_SET_MSRS stops at the
/// first MSR it refuses (one this KVM lists but will not take from the host): that one is
/// skipped with a debug line and the rest written. Then the debug registers.
pub fn apply_msrs(
    vcpu: &VcpuFd,
    cpu: &VcpuCpuState,
    tsc_deadline: Option<u64>,
) -> Result<(), KvmError> {
    let mut entries: Vec<kvm_msr_entry> = cpu
        .msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    entries.sort_by_key(|e| e.index != MSR_TSC);
    if let Some(deadline) = tsc_deadline {
        entries.push(kvm_msr_entry {
            index: MSR_TSC_DEADLINE,
            data: deadline,
            ..Default::default()
        });
    }
    let mut rest = entries.as_slice();
    while !rest.is_empty() {
        let written = vcpu
            .set_msrs(&msr_list(rest)?)
            .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        if let Some(refused) = rest.get(written) {
            tracing::debug!(index = refused.index, "KVM refused a saved MSR on restore");
        }
        rest = rest.get(written + 1..).unwrap_or(&[]);
    }
    vcpu.set_debug_regs(&cpu.debugregs)
        .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;
    Ok(())
}

/// The saved IA32_TSC.
pub fn saved_tsc(cpu: &VcpuCpuState) -> Option<u64> {
    cpu.msrs.iter().find(|m| m.index == MSR_TSC).map(|m| m.data)
}
