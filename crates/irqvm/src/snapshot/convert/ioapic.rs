//! IOAPIC: the model's [`IoApic`] <-> KVM's `kvm_ioapic_state` (KVM_GET_IRQCHIP with
//! KVM_IRQCHIP_IOAPIC).

use irqchip::chip::ioapic_wire_level;
use irqchip::ioapic::{IoApic, IoApicConfig, RedirectionEntry, IOAPIC_DEFAULT_BASE};
use kvm_bindings::{kvm_ioapic_state, KVM_IOAPIC_NUM_PINS};

use super::ConvertError;

/// Pins KVM's IOAPIC has.
pub const KVM_PINS: usize = KVM_IOAPIC_NUM_PINS as usize;

/// The logical level of `pin` for a wire at `wire_high`: the inverse of the board wiring
/// ([`ioapic_wire_level`]: PCI pins 16 and up are active-low), not of the entry's INTPOL.
fn logical_level(pin: usize, wire_high: bool) -> bool {
    ioapic_wire_level(pin, true) == wire_high
}

/// The model's IOAPIC in KVM's terms. Each entry is copied bit for bit (remote IRR included,
/// INTPOL too, which KVM stores but ignores). `irr` holds the logical level of each
/// level-triggered pin, the level the VMM last gave KVM_IRQ_LINE (the wire with the board's
/// inversion undone, not the entry's INTPOL); edge-triggered pins read 0, because KVM_SET_IRQCHIP
/// re-asserts every `irr` bit (`kvm_ioapic_inject_all`) and an edge pin would deliver again,
/// while the model already delivered it (or lost it while masked). Refused: more pins than
/// KVM's 24.
pub fn ioapic_to_kvm(ioapic: &IoApic) -> Result<kvm_ioapic_state, ConvertError> {
    if ioapic.pins() > KVM_PINS {
        return Err(ConvertError::IoApicPins(ioapic.pins()));
    }
    let mut state = kvm_ioapic_state {
        base_address: IOAPIC_DEFAULT_BASE,
        ioregsel: u32::from(ioapic.ioregsel()),
        id: u32::from(ioapic.id()),
        ..Default::default()
    };
    for pin in 0..ioapic.pins() {
        let (Some(entry), Some(wire)) = (ioapic.entry(pin), ioapic.line(pin)) else {
            continue;
        };
        state.redirtbl[pin].bits = entry.0;
        if entry.trigger_bit_level() && logical_level(pin, wire) {
            state.irr |= 1 << pin;
        }
    }
    Ok(state)
}

/// KVM's IOAPIC as the model's, configured as `config` (at most 24 pins; KVM's entries past
/// them are ignored) with the extended destination ID as given. A pin's wire is at the level
/// its `irr` bit gives through the board wiring (see [`ioapic_to_kvm`]); the VMM, which
/// knows every line's level in every mode, may check them against its routing table. Entries
/// are scrubbed as a snapshot's are (delivery status, reserved bits, remote IRR of edge
/// entries). Refused: a relocated IOAPIC (the model's window is fixed), too many pins.
pub fn ioapic_from_kvm(
    state: &kvm_ioapic_state,
    config: IoApicConfig,
    extended_destination_id: bool,
) -> Result<IoApic, ConvertError> {
    if state.base_address != IOAPIC_DEFAULT_BASE {
        return Err(ConvertError::IoApicBase(state.base_address));
    }
    if config.pins > KVM_PINS {
        return Err(ConvertError::IoApicPins(config.pins));
    }
    let pins: Vec<(RedirectionEntry, bool)> = (0..config.pins)
        .map(|pin| {
            // SAFETY: `bits` is the whole 64-bit entry; every bit pattern is a valid u64.
            let bits = unsafe { state.redirtbl[pin].bits };
            let asserted = state.irr & (1 << pin) != 0;
            (RedirectionEntry(bits), ioapic_wire_level(pin, asserted))
        })
        .collect();
    // Truncations: KVM keeps the 4-bit ID and the 8-bit IOREGSEL in u32 fields.
    IoApic::from_parts(
        config,
        extended_destination_id,
        state.id as u8,
        state.ioregsel as u8,
        &pins,
    )
    .map_err(ConvertError::IoApic)
}
