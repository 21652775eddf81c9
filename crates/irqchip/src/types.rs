//! Vocabulary shared by every device of the chip: vectors, APIC IDs, delivery modes and the
//! interrupt message that travels on the (virtual) APIC bus.
//!
//! One message type serves every source: an ICR write (SDM vol. 3 §11.6.1), an IOAPIC
//! redirection entry (82093AA §3.2.4) and a PCI MSI (SDM vol. 3 §11.11) all decode into an
//! [`InterruptMessage`], and the bus resolves it to target vCPUs the same way.

use serde::{Deserialize, Serialize};

/// An interrupt vector (0-255). Vectors 0-15 are illegal for fixed and lowest-priority delivery
/// (SDM vol. 3 §11.5.2, "illegal vector" ESR bits).
pub type Vector = u8;

/// Index of a vCPU in the VM (0 = bootstrap processor). Not the APIC ID.
pub type VcpuIndex = usize;

/// Time as the caller sees it, in nanoseconds of a monotonic clock that starts when the VM is
/// created. The chip never reads a host clock: every call that depends on time takes one of these.
pub type Nanos = u64;

/// A local APIC ID. xAPIC IDs are 8 bits (bits 31:24 of the ID register); x2APIC IDs are 32 bits.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ApicId(pub u32);

/// Delivery mode field, bits 10:8 of the ICR, of an IOAPIC redirection entry and of MSI data
/// (SDM vol. 3 §11.6.1). Encoding 3 is reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// The vector goes to every destination; it is accepted into IRR.
    Fixed = 0,
    /// The vector goes to the destination with the lowest priority (SDM vol. 3 §11.6.2.4).
    LowestPriority = 1,
    /// A system-management interrupt; the vector is ignored (must be 0).
    Smi = 2,
    /// A non-maskable interrupt; the vector is ignored.
    Nmi = 4,
    /// INIT: the destination resets (SDM vol. 3 §9.4, §11.4.7.3); the vector is ignored.
    Init = 5,
    /// Start-up IPI: a processor in wait-for-SIPI starts at `vector << 12` (SDM vol. 3 §9.4.3).
    StartUp = 6,
    /// The destination takes the vector from the 8259-compatible PIC by an INTA cycle, as for an
    /// interrupt from an external controller (SDM vol. 3 §11.6.1).
    ExtInt = 7,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; `None` for the reserved encoding 3.
    pub fn from_bits(bits: u32) -> Option<Self> {
        match bits & 0x7 {
            0 => Some(Self::Fixed),
            1 => Some(Self::LowestPriority),
            2 => Some(Self::Smi),
            4 => Some(Self::Nmi),
            5 => Some(Self::Init),
            6 => Some(Self::StartUp),
            7 => Some(Self::ExtInt),
            _ => None,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u32 {
        self as u32
    }

    /// Fixed and lowest-priority interrupts carry a vector that lands in IRR; the others are
    /// events with their own pins on the processor (NMI, SMI, INIT, SIPI, ExtINT).
    pub fn uses_irr(self) -> bool {
        matches!(self, Self::Fixed | Self::LowestPriority)
    }
}

/// Destination mode, bit 11 of the ICR (SDM vol. 3 §11.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is matched against each APIC's logical destination (LDR and DFR,
    /// SDM vol. 3 §11.6.2.2).
    Logical,
}

/// Trigger mode, bit 15 of the ICR / redirection entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TriggerMode {
    /// Accepted once per message; TMR clear, no EOI broadcast.
    Edge,
    /// The source holds the line until the EOI; TMR set, the EOI is broadcast
    /// (SDM vol. 3 §11.8.5).
    Level,
}

/// Destination shorthand, bits 19:18 of the ICR (SDM vol. 3 §11.6.1). Only IPIs use it; IOAPIC
/// and MSI messages always have `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shorthand {
    /// No shorthand: the destination field decides.
    None,
    /// Only the sending APIC.
    SelfOnly,
    /// Every APIC, the sender included.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decodes ICR bits 19:18, already shifted to bits 1:0.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 0x3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }
}

/// How the destination field of a message must be read.
///
/// An xAPIC-mode sender and the IOAPIC / MSI write 8-bit destinations where 0xFF is broadcast;
/// an x2APIC-mode sender writes 32-bit destinations where 0xFFFF_FFFF is broadcast
/// (SDM vol. 3 §11.12.9). MSIs with the extended destination ID (bits 11:5 of the address) carry
/// up to 15 bits and use `Xapic` format with a wider value: 0xFF stays broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationFormat {
    /// 8-bit destinations, 0xFF is the broadcast.
    Xapic,
    /// 32-bit destinations, 0xFFFF_FFFF is the broadcast.
    X2apic,
}

/// Who put a message on the bus. Shorthands and "all excluding self" need the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageSource {
    /// An IPI written to the ICR (or SELF_IPI) of this vCPU's local APIC.
    Vcpu(VcpuIndex),
    /// An IOAPIC redirection entry, an MSI, or the VMM itself.
    Device,
}

/// An interrupt message on the APIC bus: what an ICR write, an IOAPIC redirection entry or an MSI
/// produces, before it is resolved to destination vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterruptMessage {
    /// The interrupt vector (ignored for NMI, SMI and INIT; the start page for SIPI).
    pub vector: Vector,
    /// How the destination handles the message.
    pub delivery_mode: DeliveryMode,
    /// Physical (APIC ID) or logical (LDR match) destination.
    pub destination_mode: DestinationMode,
    /// Edge or level trigger mode (bit 15); level makes the target set TMR.
    pub trigger: TriggerMode,
    /// Level field of the ICR (bit 14). Only meaningful for INIT: `false` with level trigger is
    /// the "INIT level de-assert" message, which modern processors ignore (SDM vol. 3 §11.6.1).
    pub level_assert: bool,
    /// Destination shorthand (IPIs only).
    pub shorthand: Shorthand,
    /// The destination ID, read according to `destination_mode` and `format`.
    pub destination: u32,
    /// How wide `destination` is and which value is the broadcast.
    pub format: DestinationFormat,
    /// Who sent it: the shorthands "self" and "all excluding self" need the sender.
    pub source: MessageSource,
    /// The redirection hint of an MSI (address bit 3, SDM vol. 3 §11.11.1): the message goes to
    /// one of its destinations, the one with the lowest priority, whatever its delivery mode,
    /// as KVM arbitrates it (`kvm_lowest_prio_delivery`). False for IPIs and IOAPIC messages.
    /// Absent in messages saved before it existed: false.
    #[serde(default)]
    pub redirection_hint: bool,
}

impl InterruptMessage {
    /// A fixed, edge-triggered, physically addressed device interrupt: the common case.
    pub fn fixed(vector: Vector, apic_id: u32) -> Self {
        Self {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Physical,
            trigger: TriggerMode::Edge,
            level_assert: true,
            shorthand: Shorthand::None,
            destination: apic_id,
            format: DestinationFormat::Xapic,
            source: MessageSource::Device,
            redirection_hint: false,
        }
    }

    /// The message as KVM's APIC bus delivers it (`kvm_irq_delivery_to_apic`, "phys broadcast
    /// and lowest prio"): an arbitrated message ([`Self::arbitrated`]) with physical destination
    /// 0xFF is delivered in fixed mode, whatever its format, shorthand or source. A
    /// lowest-priority one to the xAPIC broadcast then goes to every APIC it addresses (so does
    /// one with an all shorthand and 0xFF left in the destination field); one with an MSI's
    /// redirection hint is still arbitrated, to one APIC, and its NMI, SMI, INIT or ExtINT
    /// becomes the vector field (measured: KVM delivered such an NMI to no CPU; by its code it
    /// set the field's vector, 0 there, which is never taken). In x2APIC format without a
    /// shorthand 0xFF addresses the one APIC with ID 255, which takes it either way. The SDM
    /// describes no arbitration among the APICs of a broadcast (§11.6.2.4 arbitrates among a
    /// destination set, §11.11.1 forbids FFH with the hint), so this follows KVM; every other
    /// message is unchanged.
    pub fn as_delivered(&self) -> Self {
        let lowest_to_broadcast_id = self.arbitrated()
            && self.destination_mode == DestinationMode::Physical
            && self.destination == 0xFF;
        if lowest_to_broadcast_id {
            Self {
                delivery_mode: DeliveryMode::Fixed,
                ..*self
            }
        } else {
            *self
        }
    }

    /// Whether the bus gives the message to one of its destinations, the lowest-priority one:
    /// lowest-priority delivery mode, or an MSI's redirection hint (KVM's
    /// `kvm_lowest_prio_delivery`).
    pub fn arbitrated(&self) -> bool {
        self.delivery_mode == DeliveryMode::LowestPriority || self.redirection_hint
    }

    /// True for a de-assert (level trigger, level bit clear) that no APIC accepts: the INIT
    /// level de-assert, which Pentium 4 and later ignore (SDM vol. 3 §11.6.1), and a fixed or
    /// lowest-priority one, which KVM's APICs refuse (`__apic_accept_irq`). The ICR never sends
    /// the latter ([`crate::lapic::IcrError::LevelDeassert`]) and every MSI and IOAPIC message
    /// asserts, so the bus meets it only as a message converted to fixed
    /// ([`Self::as_delivered`]).
    pub fn is_deassert_nobody_accepts(&self) -> bool {
        let deasserts = self.trigger == TriggerMode::Level && !self.level_assert;
        deasserts && (self.delivery_mode == DeliveryMode::Init || self.delivery_mode.uses_irr())
    }

    /// The message with its level bit set, as every MSI is delivered (KVM's `kvm_set_msi_irq`
    /// sets the level to 1 whatever data bit 14 says; [`crate::msi::MsiMessage::decode`] does
    /// the same).
    pub fn asserting(&self) -> Self {
        Self {
            level_assert: true,
            ..*self
        }
    }

    /// True for the INIT level de-assert IPI, which is accepted by the bus and then ignored.
    pub fn is_init_deassert(&self) -> bool {
        self.delivery_mode == DeliveryMode::Init
            && self.trigger == TriggerMode::Level
            && !self.level_assert
    }
}

/// The EOI message a local APIC broadcasts to the IOAPICs when a level-triggered vector is
/// acknowledged (SDM vol. 3 §11.8.5), unless EOI broadcast is suppressed (SVR bit 12), and the
/// message of a directed EOI (write to the IOAPIC EOI register, version 0x20).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EoiMessage {
    /// The vector being acknowledged, matched against each IOAPIC entry's vector.
    pub vector: Vector,
}

/// What the bus needs to know about one local APIC to resolve destinations: its ID, its logical
/// addressing and whether it accepts anything at all. A local APIC publishes a new one whenever
/// the guest changes any of these (ID, LDR, DFR, APIC base mode or enable bit, SVR enable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopologyEntry {
    /// The ID the APIC answers to now: the 8-bit (guest-writable) xAPIC ID in xAPIC mode, the
    /// 32-bit x2APIC ID in x2APIC mode.
    pub apic_id: ApicId,
    /// The initial APIC ID the VMM assigned (the x2APIC ID, also in xAPIC mode, where the ID
    /// register shows only its low 8 bits). The bus matches an xAPIC-mode APIC against a
    /// physical destination above 0xFF by this ID (KVM's "hotplug" rule, see `bus`). Entries
    /// saved before this field existed read it as 0.
    #[serde(default)]
    pub initial_id: ApicId,
    /// x2APIC mode (IA32_APIC_BASE.EXTD set).
    pub x2apic: bool,
    /// Globally enabled (IA32_APIC_BASE.EN). A globally disabled APIC receives nothing
    /// (SDM vol. 3 §11.4.3).
    pub hw_enabled: bool,
    /// Software enabled (SVR bit 8). A software-disabled APIC still accepts INIT, SIPI, NMI and
    /// SMI, and its IRR/ISR keep their state (SDM vol. 3 §11.4.7.2).
    pub sw_enabled: bool,
    /// Logical destination register as read: xAPIC bits 31:24, x2APIC the whole 32 bits.
    pub ldr: u32,
    /// DFR model: `true` for flat (0xF), `false` for cluster (0x0). Ignored in x2APIC mode,
    /// which is always cluster.
    pub dfr_flat: bool,
}

/// An error the guest sees as a general-protection fault (#GP(0)) on the access that caused it.
/// The VMM turns it into an injected #GP (or, for MSR exits, the `error` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestFault {
    #[error("general protection fault: {0}")]
    /// The access faults, with what was wrong.
    GeneralProtection(&'static str),
}

/// The non-vector events a local APIC latches for its processor: INIT, SIPI (with its vector),
/// NMI, SMI and ExtINT (SDM vol. 3 §11.6.1, §9.4). Posters set them from any thread (see
/// `posting`); only the target vCPU, in its own context, consumes them (see `mpstate`), so an INIT
/// can never be lost to a HLT the target executes at the same moment (seed 000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApicEvents {
    /// INIT, to be accepted in the target's own context.
    pub init: bool,
    /// A pending start-up IPI and its vector. A second SIPI before the first is consumed
    /// replaces the vector, as the latch on a real APIC holds one.
    pub sipi: Option<Vector>,
    /// A non-maskable interrupt.
    pub nmi: bool,
    /// A system-management interrupt.
    pub smi: bool,
    /// The APIC was asked to take an interrupt vector from the 8259 PIC (an INTA cycle).
    pub extint: bool,
}

impl ApicEvents {
    /// True when nothing is latched.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Adds the newer events `other` to the latch: flags OR together, a newer SIPI vector wins,
    /// and a newer INIT discards an older pending SIPI (the INIT resets the processor, so that
    /// SIPI can no longer find it in wait-for-SIPI; KVM drops it the same way).
    pub fn merge(&mut self, other: ApicEvents) {
        if other.init {
            self.sipi = None;
        }
        self.init |= other.init;
        self.sipi = other.sipi.or(self.sipi);
        self.nmi |= other.nmi;
        self.smi |= other.smi;
        self.extint |= other.extint;
    }
}

/// How the chip converts the caller's [`Nanos`] to the two clocks the local APIC timer counts:
/// the APIC timer's input clock (the "bus clock", before the divide configuration register;
/// KVM uses 1 GHz) and the guest's time-stamp counter (for TSC-deadline mode,
/// SDM vol. 3 §11.5.4.1). The guest TSC at time `t` is `tsc_at_zero + t * tsc_hz / 1e9`; the VMM
/// keeps the guest's real TSC consistent with that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClockConfig {
    /// The APIC timer's input clock in Hz (before the divide configuration); KVM uses 1 GHz.
    pub apic_bus_hz: u64,
    /// The guest's time-stamp counter frequency in Hz.
    pub tsc_hz: u64,
    /// The guest TSC at time 0 of the caller's timeline.
    pub tsc_at_zero: u64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            apic_bus_hz: 1_000_000_000,
            tsc_hz: 1_000_000_000,
            tsc_at_zero: 0,
        }
    }
}

/// What a poster must do to the target vCPU's thread after posting to it (seed 001).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Notify {
    /// Nothing: the target is outside guest mode and will look at its posted work before it
    /// next enters, or another poster already owns the notification.
    None,
    /// The target is (or is about to be) in guest mode: force it out (signal + immediate_exit).
    Kick,
    /// The target is blocked waiting for work (halted, or waiting for SIPI): wake its thread.
    Wake,
}

/// Anything that can receive interrupts from the bus: the posting inbox of a vCPU in a VMM, or a
/// fake vCPU in a test. Every method may be called from any thread and must not block.
pub trait InterruptSink: Send + Sync {
    /// Posts a fixed or lowest-priority vector (level-triggered ones must set TMR on acceptance).
    fn post_vector(&self, vector: Vector, trigger: TriggerMode) -> Notify;
    /// Latches non-vector events (INIT, SIPI, NMI, SMI, ExtINT).
    fn post_events(&self, events: ApicEvents) -> Notify;
    /// The processor priority (PPR, SDM vol. 3 §11.8.3.1) the target last published, used for
    /// lowest-priority arbitration.
    fn published_ppr(&self) -> u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_newer_sipi_vector_wins() {
        let mut latch = ApicEvents {
            sipi: Some(1),
            ..Default::default()
        };
        latch.merge(ApicEvents {
            sipi: Some(2),
            ..Default::default()
        });
        assert_eq!(latch.sipi, Some(2));
    }

    /// SDM vol. 3 §9.4.4 (MP init): a SIPI only means something to a processor in
    /// wait-for-SIPI; an INIT that arrives after it resets the processor first.
    #[test]
    fn merge_newer_init_discards_older_sipi() {
        let mut latch = ApicEvents {
            sipi: Some(1),
            ..Default::default()
        };
        latch.merge(ApicEvents {
            init: true,
            ..Default::default()
        });
        assert_eq!(
            latch,
            ApicEvents {
                init: true,
                ..Default::default()
            }
        );
        latch.merge(ApicEvents {
            sipi: Some(3),
            ..Default::default()
        });
        assert_eq!(latch.sipi, Some(3));
        assert!(latch.init);
    }

    #[test]
    fn delivery_mode_round_trips_and_rejects_reserved() {
        for bits in 0..8 {
            match DeliveryMode::from_bits(bits) {
                Some(mode) => assert_eq!(mode.bits(), bits),
                None => assert_eq!(bits, 3),
            }
        }
    }
}
