//! Applying a snapshot to a freshly built VM (`Vm::restore`): the checks first, then each
//! vCPU in KVM's order, then the VM-wide state.

use irqchip::chip::{ioapic_wire_level, PcIrqChipConfig};
use irqchip::lapic::LapicConfig;
use irqchip::snapshot::VcpuSnapshot;
use kvm_ioctls::{VcpuFd, VmFd};

use super::cpu::CpuCaps;
use super::format::{SnapshotError, SnapshotState, VcpuCpuState};
use super::xstate::check_xcr0;
use crate::backend::{Irqchip, IrqchipError, IrqchipMode, PlatformFabric, VcpuFabric, VcpuIrqchip};
use crate::devices::Devices;

/// Every check that needs the target VM, before anything is applied: the model's checks of
/// the interrupt state (version, vCPUs against the target's local APIC configuration, APIC
/// state, MP state, IOAPIC shape, levels against routing), what KVM's local APIC cannot
/// take (a pending SMI: no SMM on this host; an IOAPIC past 24 pins), and each vCPU's XSAVE
/// area and XCR0 against what this KVM supports (`caps`).
pub fn check(
    state: &SnapshotState,
    target: IrqchipMode,
    lapics: &[LapicConfig],
    extended_destination_id: bool,
    caps: CpuCaps,
) -> Result<(), SnapshotError> {
    state.check_shape()?;
    check_xstate(state, caps)?;
    state.chip.check_vcpus(lapics)?;
    let config = PcIrqChipConfig::new(lapics.len());
    state.chip.devices.check(
        config.ioapic.clamped(),
        extended_destination_id,
        ioapic_wire_level,
    )?;
    if target != IrqchipMode::User {
        super::convert::ioapic_to_kvm(&state.chip.devices.ioapic)?;
        if let Some(vcpu) = state.chip.vcpus.iter().position(|v| v.pending.smi) {
            return Err(SnapshotError::Vcpu {
                vcpu,
                what: "a pending SMI cannot be given to KVM's local APIC here (no SMM)".into(),
            });
        }
    }
    Ok(())
}

/// Each vCPU's XSAVE area and XCR0 against this KVM's (`XsaveArea::check_for`, `check_xcr0`).
fn check_xstate(state: &SnapshotState, caps: CpuCaps) -> Result<(), SnapshotError> {
    for (vcpu, cpu) in state.vcpus.iter().enumerate() {
        let fail = |problem| SnapshotError::Xsave { vcpu, problem };
        if let Some(area) = &cpu.xsave {
            area.check_for(caps.xsave).map_err(fail)?;
        }
        if let (Some(x), true) = (&cpu.xcrs, caps.xcrs) {
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            for xcr in x.xcrs[..n].iter().filter(|x| x.xcr == 0) {
                check_xcr0(xcr.value, caps.xsave).map_err(fail)?;
            }
        }
    }
    Ok(())
}

fn vcpu_error(vcpu: usize) -> impl Fn(IrqchipError) -> SnapshotError {
    move |e| SnapshotError::Vcpu {
        vcpu,
        what: e.to_string(),
    }
}

/// One vCPU, in KVM's order: SREGS (IA32_APIC_BASE the model's), REGS, XCRS, the XSAVE area
/// (or FPU); the local APIC; the MSRs (IA32_TSC first, IA32_TSC_DEADLINE last) and debug
/// registers; the events and the MP state.
pub fn apply_vcpu(
    fd: &mut VcpuFd,
    chip: &mut dyn VcpuIrqchip,
    cpu: &VcpuCpuState,
    part: &VcpuSnapshot,
    caps: CpuCaps,
) -> Result<(), SnapshotError> {
    let index = part.index;
    let fail = vcpu_error(index);
    let fabric = VcpuFabric {
        model: part.clone(),
        cpu_events: cpu.events,
    };
    super::cpu::apply_registers(fd, cpu, part.lapic.apic_base(), caps)
        .map_err(|e| fail(e.into()))?;
    let saved_tsc = super::cpu::saved_tsc(cpu).unwrap_or(0);
    let deadline = chip.restore_apic(fd, &fabric, saved_tsc).map_err(&fail)?;
    super::cpu::apply_msrs(fd, cpu, deadline).map_err(|e| fail(e.into()))?;
    chip.restore_events(fd, &fabric).map_err(&fail)?;
    Ok(())
}

/// The VM-wide state, after every vCPU: the platform (KVM_SET_IRQCHIP re-delivers asserted
/// level pins into the restored local APICs), the round-robin position, the devices, kvmclock.
pub fn apply_vm(
    state: &SnapshotState,
    chip: &dyn Irqchip,
    devices: &Devices,
    vm: &VmFd,
) -> Result<(), SnapshotError> {
    chip.restore_platform(&PlatformFabric {
        devices: state.chip.devices.clone(),
        lowest_priority_turn: state.lowest_priority_turn,
    })
    .map_err(|e| SnapshotError::Shape(format!("platform: {e}")))?;
    devices
        .restore_state(&state.devices)
        .map_err(|e| SnapshotError::Shape(e.to_string()))?;
    let clock = kvm_bindings::kvm_clock_data {
        clock: state.time.kvm_clock_ns,
        ..Default::default()
    };
    if let Err(e) = vm.set_clock(&clock) {
        tracing::warn!("KVM_SET_CLOCK refused the saved kvmclock: {e}");
    }
    Ok(())
}

/// The EOIs a save caught between the guest and the IOAPIC, applied to `state`'s IOAPIC: a
/// level-triggered entry whose remote IRR is set while no local APIC holds its vector (in IRR
/// or ISR) was EOIed by the guest, but the IOAPIC has not seen it yet. In `split` mode KVM hands
/// that EOI to userspace only when the vCPU next returns from KVM_RUN
/// (docs/irqchip-modes.md, "Known KVM limits"), so a save can fall in between; restored as is,
/// remote IRR would never clear and the line would never be delivered again. Returns the
/// messages of the entries whose line is still asserted (82093AA §3.2.4: the EOI re-delivers
/// them), for a target whose IOAPIC does not re-deliver on its own (`user`, `split`;
/// KVM_SET_IRQCHIP does it in `kernel` mode).
pub fn settle_held_level_eois(state: &mut SnapshotState) -> Vec<irqchip::types::InterruptMessage> {
    let ioapic = &mut state.chip.devices.ioapic;
    let held = |vector| {
        state
            .chip
            .vcpus
            .iter()
            .any(|v| v.lapic.irr().contains(vector) || v.lapic.isr().contains(vector))
    };
    let mut settled: Vec<irqchip::types::Vector> = (0..ioapic.pins())
        .filter_map(|pin| ioapic.entry(pin))
        .filter(|e| e.level_sensitive() && e.remote_irr() && !held(e.vector()))
        .map(|e| e.vector())
        .collect();
    settled.sort_unstable();
    settled.dedup();
    let mut redeliver = Vec::new();
    for vector in settled {
        // Taken as accepted (remote IRR set again): the restored VM delivers them once its
        // vCPUs exist, to the destinations the entries name.
        ioapic.end_of_interrupt(vector, &mut |message| {
            redeliver.push(message);
            1
        });
    }
    redeliver
}
