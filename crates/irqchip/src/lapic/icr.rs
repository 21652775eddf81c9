//! Decoding of the interrupt command register into a bus message (SDM vol. 3 §11.6.1, §11.12.9).

use super::regs::*;
use crate::types::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, MessageSource, Shorthand,
    TriggerMode,
};

/// Why an ICR write sends nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcrError {
    /// Delivery mode 011b or 111b: reserved in the ICR (ExtINT cannot be sent as an IPI,
    /// SDM §11.6.1 figure "Interrupt Command Register"). The write is ignored.
    ReservedDeliveryMode,
    /// Fixed or lowest-priority with a vector below 16: the sender sets ESR "send illegal
    /// vector" and sends nothing (SDM §11.5.3).
    IllegalVector,
    /// Fixed or lowest-priority with level trigger (bit 15) and the level bit (14) clear, the
    /// form of an INIT level de-assert. The SDM leaves it to the processor (§11.6.1: the level
    /// bit must be 1 for every mode but INIT de-assert; Pentium 4 and Xeon issue it as 1
    /// whatever is written). KVM takes the bits as written and no APIC accepts such a message
    /// (`__apic_accept_irq`), so the write sends nothing, in every irqchip mode alike.
    LevelDeassert,
}

/// Decodes ICR bits 31:0 plus the already-extracted destination (xAPIC: ICR bits 63:56,
/// x2APIC: ICR bits 63:32) into the message this APIC puts on the bus.
pub fn decode_icr(
    low: u32,
    destination: u32,
    format: DestinationFormat,
    source: MessageSource,
) -> Result<InterruptMessage, IcrError> {
    let delivery_mode = DeliveryMode::from_bits(low >> ICR_DELIVERY_MODE_SHIFT)
        .filter(|mode| *mode != DeliveryMode::ExtInt)
        .ok_or(IcrError::ReservedDeliveryMode)?;
    // Truncation keeps bits 7:0, the vector field.
    let vector = (low & ICR_VECTOR_MASK) as u8;
    if delivery_mode.uses_irr() && vector < FIRST_LEGAL_VECTOR {
        return Err(IcrError::IllegalVector);
    }
    if delivery_mode.uses_irr() && low & ICR_TRIGGER_LEVEL != 0 && low & ICR_LEVEL_ASSERT == 0 {
        return Err(IcrError::LevelDeassert);
    }
    Ok(InterruptMessage {
        vector,
        delivery_mode,
        destination_mode: if low & ICR_DEST_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        },
        trigger: if low & ICR_TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        },
        level_assert: low & ICR_LEVEL_ASSERT != 0,
        shorthand: Shorthand::from_bits(low >> ICR_SHORTHAND_SHIFT),
        destination,
        format,
        source,
        redirection_hint: false,
    })
}
