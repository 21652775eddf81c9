//! The conversion between the `irqchip` model's interrupt state and KVM's formats: pure
//! functions, no ioctl. Each direction is documented where it loses or normalises something;
//! docs/architecture.md ("Snapshots across modes: the conversion") has the whole list.
//!
//! | model | KVM | here |
//! |---|---|---|
//! | `LocalApic` (+ clock) | `kvm_lapic_state`, IA32_APIC_BASE, IA32_TSC_DEADLINE | [`lapic_to_kvm`], [`lapic_from_kvm`] |
//! | `IoApic` | `kvm_ioapic_state` | [`ioapic_to_kvm`], [`ioapic_from_kvm`] |
//! | `DualPic` | two `kvm_pic_state` | [`pic_to_kvm`], [`pic_from_kvm`] |
//! | `PendingEvents`, `MpStateMachine` | `kvm_vcpu_events`, MP state | [`events_to_kvm`], [`events_from_kvm`] |
//!
//! The model's side is on a snapshot's timeline (`irqchip::snapshot`): the save instant is
//! time 0, so a timer's state at 0 is its state when KVM's was (or will be) read or written.

mod events;
mod ioapic;
mod lapic;
mod pic;
#[cfg(test)]
mod tests;

pub use events::{events_from_kvm, events_to_kvm, KvmVcpuEvents, ModelVcpuEvents};
pub use ioapic::{ioapic_from_kvm, ioapic_to_kvm, KVM_PINS};
pub use lapic::{lapic_from_kvm, lapic_to_kvm, page_reg, set_page_reg, KvmLapic, LapicFormat};
pub use pic::{pic_from_kvm, pic_to_kvm};

use irqchip::ioapic::IoApicConfigError;

/// Why a state could not be converted. Nothing partial is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// With 32-bit x2APIC IDs, KVM's page in x2APIC mode must hold the vCPU's own ID
    /// (`kvm_apic_state_fixup` refuses any other).
    #[error("x2APIC ID {found:#x} in the LAPIC page is not the vCPU's ({expected:#x})")]
    X2apicId {
        /// The vCPU's APIC ID.
        expected: u32,
        /// The page's.
        found: u32,
    },
    /// The registers describe no reachable local APIC state.
    #[error("invalid local APIC state: {0}")]
    Lapic(&'static str),
    /// KVM's IOAPIC has 24 pins.
    #[error("an IOAPIC with {0} pins does not fit KVM's 24")]
    IoApicPins(usize),
    /// The model's IOAPIC window is fixed at 0xFEC00000.
    #[error("IOAPIC relocated to {0:#x}")]
    IoApicBase(u64),
    /// The IOAPIC state was refused.
    #[error("invalid IOAPIC state: {0}")]
    IoApic(IoApicConfigError),
    /// An MP state the model has no equivalent of.
    #[error("MP state {0} has no equivalent in the model")]
    MpState(u32),
}
