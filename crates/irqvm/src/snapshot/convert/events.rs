//! vCPU events and MP state: the model's [`PendingEvents`] and [`MpStateMachine`] <->
//! KVM's `kvm_vcpu_events` and `kvm_mp_state` values.

use irqchip::mpstate::{kvm_abi, MpState, MpStateMachine};
use irqchip::snapshot::PendingEvents;
use kvm_bindings::{
    kvm_vcpu_events, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    KVM_VCPUEVENT_VALID_SMM,
};

use super::ConvertError;

/// The most NMIs KVM keeps pending (`process_nmi`): one to inject and one held behind it.
const MAX_PENDING_NMIS: u8 = 2;

/// A vCPU's interrupt events in KVM's terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvmVcpuEvents {
    /// For KVM_SET_VCPU_EVENTS.
    pub events: kvm_vcpu_events,
    /// For KVM_SET_MP_STATE.
    pub mp_state: u32,
}

/// The model's pending events and MP state merged into `cpu`, the events KVM holds for the
/// processor itself (exception, injected interrupt and NMI, NMI mask, interrupt shadow, SMM),
/// which the model does not have and which are kept as they are.
///
/// * NMIs: `nmi.pending` counts the model's (one, two with `nmi_held`) plus any `cpu` already
///   holds (queued by KVM_NMI in `user` mode), at most 2, as KVM's `process_nmi` keeps them
///   (KVM_SET_VCPU_EVENTS queues that many since KVM's "Save/restore all NMIs when multiple
///   NMIs are pending").
/// * SMI: `smi.pending`; a latched INIT: `smi.latched_init` (both under
///   KVM_VCPUEVENT_VALID_SMM).
/// * The last SIPI vector: `sipi_vector` (KVM_VCPUEVENT_VALID_SIPI_VECTOR; KVM keeps it in
///   `apic->sipi_vector`).
/// * A latched SIPI that the next accept step would honour (in wait-for-SIPI, or behind a
///   latched INIT on an AP, which puts it there first): MP state SIPI_RECEIVED, which KVM turns
///   into INIT_RECEIVED plus a pending SIPI with that vector. A SIPI the accept step would drop
///   (behind an INIT on a vCPU whose IA32_APIC_BASE.BSP flag, `bsp_flag`, is set; or outside
///   wait-for-SIPI with no INIT latched) is dropped here.
/// * A pending ExtINT is dropped: in KVM's modes the PIC's INTR output, which the PIC state
///   keeps, raises it again.
pub fn events_to_kvm(
    pending: &PendingEvents,
    mp: &MpStateMachine,
    bsp_flag: bool,
    cpu: &kvm_vcpu_events,
) -> KvmVcpuEvents {
    let mut events = *cpu;
    let model_nmis = u8::from(pending.nmi) + u8::from(pending.nmi_held);
    events.nmi.pending = cpu
        .nmi
        .pending
        .saturating_add(model_nmis)
        .min(MAX_PENDING_NMIS);
    events.smi.pending = u8::from(pending.smi);
    let latched = mp.pending_events();
    events.smi.latched_init = u8::from(latched.init);
    events.sipi_vector = u32::from(mp.last_sipi_vector());
    events.flags |=
        KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    let sipi_honoured = mp.state() == MpState::InitReceived || (latched.init && !bsp_flag);
    let mp_state = match latched.sipi {
        Some(vector) if sipi_honoured => {
            events.sipi_vector = u32::from(vector);
            kvm_abi::SIPI_RECEIVED
        }
        _ => mp.state().to_kvm(),
    };
    KvmVcpuEvents { events, mp_state }
}

/// What [`events_from_kvm`] gives: the model's side and what stays with the processor.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelVcpuEvents {
    /// Pending NMI and SMI (ExtINT is never pending: see [`events_to_kvm`]).
    pub pending: PendingEvents,
    /// MP state, latched INIT and SIPI, last SIPI vector.
    pub mp: MpStateMachine,
    /// `events` with the parts the model took cleared (`nmi.pending`, `smi.pending`,
    /// `smi.latched_init`): what a `user`-mode VMM gives KVM_SET_VCPU_EVENTS.
    pub cpu: kvm_vcpu_events,
}

/// KVM's events and MP state as the model's. NMI counts past 2 are 2 (as `process_nmi` would
/// make them); SIPI_RECEIVED is wait-for-SIPI with a SIPI latched, its vector `sipi_vector`
/// (the last SIPI vector too, when KVM_VCPUEVENT_VALID_SIPI_VECTOR is set; else 0, since
/// KVM_GET_VCPU_EVENTS never reports it). Refused: MP states the model has no equivalent of
/// (STOPPED, CHECK_STOP, OPERATING, LOAD are s390's; SUSPENDED is Xen's).
pub fn events_from_kvm(kvm: &KvmVcpuEvents, bsp: bool) -> Result<ModelVcpuEvents, ConvertError> {
    let events = &kvm.events;
    let valid = |flag: u32| events.flags & flag != 0;
    let nmis = if valid(KVM_VCPUEVENT_VALID_NMI_PENDING) {
        events.nmi.pending.min(MAX_PENDING_NMIS)
    } else {
        0
    };
    let smm = valid(KVM_VCPUEVENT_VALID_SMM);
    let last_sipi = if valid(KVM_VCPUEVENT_VALID_SIPI_VECTOR) {
        // Truncation: a SIPI vector is 8 bits (SDM §11.6.1).
        events.sipi_vector as u8
    } else {
        0
    };
    let (state, sipi) = match kvm.mp_state {
        kvm_abi::RUNNABLE => (MpState::Runnable, None),
        kvm_abi::UNINITIALIZED => (MpState::Uninitialized, None),
        kvm_abi::INIT_RECEIVED => (MpState::InitReceived, None),
        kvm_abi::HALTED => (MpState::Halted, None),
        kvm_abi::AP_RESET_HOLD => (MpState::ApResetHold, None),
        kvm_abi::SIPI_RECEIVED => (MpState::InitReceived, Some(last_sipi)),
        other => return Err(ConvertError::MpState(other)),
    };
    let mp = MpStateMachine::from_parts(
        bsp,
        state,
        smm && events.smi.latched_init != 0,
        sipi,
        last_sipi,
    );
    let pending = PendingEvents {
        nmi: nmis >= 1,
        nmi_held: nmis >= 2,
        smi: smm && events.smi.pending != 0,
        extint: false,
    };
    let mut cpu = *events;
    cpu.nmi.pending = 0;
    cpu.smi.pending = 0;
    cpu.smi.latched_init = 0;
    Ok(ModelVcpuEvents { pending, mp, cpu })
}
