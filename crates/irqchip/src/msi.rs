//! Message-signalled interrupts: the address/data pair a PCI device writes (SDM vol. 3 §11.11),
//! decoded into the bus's [`InterruptMessage`] and encoded back (for a VMM that programs KVM MSI
//! routes from messages).
//!
//! Address (SDM vol. 3 §11.11.1, figure "Layout of the MSI Message Address Register"):
//! bits 31:20 = 0xFEE, 19:12 destination ID, 11:4 reserved, 3 redirection hint (RH),
//! 2 destination mode (DM, 1 = logical), 1:0 don't care; bits 63:32 zero.
//! Data (§11.11.2): bits 7:0 vector, 10:8 delivery mode (011 and 110 reserved: there is no
//! start-up IPI by MSI), 14 level (only meaningful for level trigger), 15 trigger mode
//! (1 = level); bits 31:16 reserved and ignored.
//!
//! Redirection hint: RH = 1 means "the processor with the lowest interrupt priority among the
//! destinations" (§11.11.1). KVM arbitrates every message with RH set so, whatever its delivery
//! mode or DM (`kvm_lowest_prio_delivery`), and the decoded message says so
//! ([`InterruptMessage::redirection_hint`]); a fixed message with RH = DM = 1 also decodes as
//! [`DeliveryMode::LowestPriority`], the same delivery. RH = 0 leaves the delivery mode as the
//! data says; the destination mode always follows DM (as in KVM, which also reads DM regardless
//! of RH). Encoding sets RH from the hint.
//!
//! Level: every decoded MSI asserts ([`InterruptMessage::level_assert`]), as in KVM.
//!
//! Extended destination ID ([`MsiAddressing::ExtendedDestId`]): the convention Linux guests use
//! on hypervisors that advertise it (KVM's `KVM_FEATURE_MSI_EXT_DEST_ID`), where address bits
//! 11:5 carry destination bits 14:8, addressing APIC IDs up to 32767 without an IOMMU. Bit 4 then
//! marks the interrupt-remapping format, which this chip has no IOMMU for: such addresses are an
//! error. The decoded message keeps [`DestinationFormat::Xapic`] (0xFF stays broadcast).

use serde::{Deserialize, Serialize};

use crate::types::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, MessageSource, Shorthand,
    TriggerMode,
};

/// The interrupt address window, 0xFEE0_0000-0xFEEF_FFFF (SDM vol. 3 §11.11.1).
pub const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;
/// Bits of the address that must equal [`MSI_ADDRESS_BASE`]: 63:20.
const ADDRESS_WINDOW_MASK: u64 = !0xF_FFFF;
/// Destination ID, address bits 19:12.
const ADDRESS_DEST_SHIFT: u32 = 12;
const ADDRESS_DEST_MASK: u32 = 0xFF;
/// Extended destination ID, address bits 11:5 = destination bits 14:8.
const ADDRESS_EXT_DEST_SHIFT: u32 = 5;
const ADDRESS_EXT_DEST_MASK: u32 = 0x7F;
const EXT_DEST_DESTINATION_SHIFT: u32 = 8;
/// Interrupt-remapping format flag (only checked with the extended destination ID).
const ADDRESS_REMAPPABLE: u64 = 1 << 4;
/// Redirection hint, address bit 3.
const ADDRESS_REDIRECTION_HINT: u64 = 1 << 3;
/// Destination mode, address bit 2: 1 = logical.
const ADDRESS_DEST_LOGICAL: u64 = 1 << 2;

const DATA_VECTOR_MASK: u32 = 0xFF;
const DATA_DELIVERY_MODE_SHIFT: u32 = 8;
const DATA_DELIVERY_MODE_MASK: u32 = 0x7;
const DATA_LEVEL_ASSERT: u32 = 1 << 14;
const DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// Delivery-mode encodings the MSI data register reserves (SDM vol. 3 §11.11.2).
const DELIVERY_MODE_RESERVED_3: u32 = 0b011;
const DELIVERY_MODE_START_UP: u32 = 0b110;

/// Broadcast destinations of the two formats (SDM vol. 3 §11.6.2.1, §11.12.9).
const XAPIC_BROADCAST: u32 = 0xFF;
const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;

/// One MSI write: the 64-bit address and 32-bit data a device sends.
///
/// ```
/// use irqchip::msi::{MsiError, MsiMessage};
/// use irqchip::{DeliveryMode, DestinationMode, TriggerMode};
///
/// // Destination APIC ID 2 (address bits 19:12); vector 0x51, fixed, edge, level bit 14 set
/// // (asserted), as Linux writes it.
/// let msi = MsiMessage { address: 0xFEE0_2000, data: 0x4051 };
/// let message = msi.decode().unwrap();
/// assert_eq!((message.vector, message.destination), (0x51, 2));
/// assert_eq!(message.delivery_mode, DeliveryMode::Fixed);
/// assert_eq!(message.destination_mode, DestinationMode::Physical);
/// assert_eq!(message.trigger, TriggerMode::Edge);
/// assert_eq!(MsiMessage::encode(&message), Ok(msi));
///
/// // Redirection hint (bit 3) with logical destination (bit 2): lowest priority.
/// let hinted = MsiMessage { address: 0xFEE0_300C, data: 0x0051 };
/// assert_eq!(hinted.decode().unwrap().delivery_mode, DeliveryMode::LowestPriority);
///
/// // Outside the 0xFEExxxxx window, or a reserved delivery mode: refused, never guessed.
/// let stray = MsiMessage { address: 0xFEC0_0000, data: 0x0051 };
/// assert_eq!(stray.decode(), Err(MsiError::NotInterruptAddress(0xFEC0_0000)));
/// let reserved = MsiMessage { address: 0xFEE0_0000, data: 0x0351 };
/// assert_eq!(reserved.decode(), Err(MsiError::ReservedDeliveryMode(0b011)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Address: in the window 0xFEE00000-0xFEEFFFFF; destination ID in bits 19:12, redirection
    /// hint bit 3, destination mode bit 2 (SDM vol. 3 §11.11.1).
    pub address: u64,
    /// Data: vector in bits 7:0, delivery mode 10:8, level bit 14, trigger mode bit 15
    /// (SDM vol. 3 §11.11.2).
    pub data: u32,
}

/// How wide the destination ID of an MSI address is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MsiAddressing {
    /// The SDM layout: 8-bit destination ID in bits 19:12.
    #[default]
    Standard,
    /// Bits 11:5 extend the destination to 15 bits (enabled when the VMM advertises the
    /// extended destination ID feature to the guest).
    ExtendedDestId,
}

impl MsiAddressing {
    /// The widest destination this layout can carry.
    pub fn max_destination(self) -> u32 {
        match self {
            Self::Standard => ADDRESS_DEST_MASK,
            Self::ExtendedDestId => {
                (ADDRESS_EXT_DEST_MASK << EXT_DEST_DESTINATION_SHIFT) | ADDRESS_DEST_MASK
            }
        }
    }
}

/// Why an MSI could not be decoded or a message could not be encoded as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsiError {
    #[error("address {0:#x} is outside the MSI window 0xFEE00000-0xFEEFFFFF")]
    /// The address is outside the interrupt window 0xFEE00000-0xFEEFFFFF (SDM vol. 3 §11.11.1).
    NotInterruptAddress(u64),
    #[error("delivery mode {0:#05b} is reserved in MSI data")]
    /// The data's delivery mode is a reserved encoding (3), or start-up, which MSI cannot send.
    ReservedDeliveryMode(u32),
    #[error("address {0:#x} uses the interrupt-remapping format")]
    /// With the extended destination ID, the address sets bit 4: the interrupt-remapping
    /// (remappable) format, whose other bits are not a destination.
    RemappableFormat(u64),
    #[error("destination {destination:#x} does not fit an MSI destination (max {max:#x})")]
    /// The destination does not fit in the address's destination field(s).
    DestinationOutOfRange {
        /// The destination asked for.
        destination: u32,
        /// The widest destination the addressing mode carries.
        max: u32,
    },
    #[error("x2APIC destination 0xFF would read as the xAPIC broadcast in an MSI")]
    /// The x2APIC destination 0xFF would be read back as the xAPIC broadcast.
    AmbiguousBroadcast,
    #[error("destination shorthands cannot be sent by MSI")]
    /// The message uses a destination shorthand, which only the ICR can express.
    Shorthand,
}

/// True when a write to `address` is an interrupt message rather than a memory write.
pub fn is_interrupt_address(address: u64) -> bool {
    address & ADDRESS_WINDOW_MASK == MSI_ADDRESS_BASE
}

impl MsiMessage {
    /// Decodes with the standard 8-bit destination.
    pub fn decode(&self) -> Result<InterruptMessage, MsiError> {
        self.decode_with(MsiAddressing::Standard)
    }

    /// Decodes with the given destination layout (SDM vol. 3 §11.11.1-2).
    pub fn decode_with(&self, addressing: MsiAddressing) -> Result<InterruptMessage, MsiError> {
        if !is_interrupt_address(self.address) {
            return Err(MsiError::NotInterruptAddress(self.address));
        }
        if addressing == MsiAddressing::ExtendedDestId && self.address & ADDRESS_REMAPPABLE != 0 {
            return Err(MsiError::RemappableFormat(self.address));
        }
        let logical = self.address & ADDRESS_DEST_LOGICAL != 0;
        let hint = self.address & ADDRESS_REDIRECTION_HINT != 0;
        let mut delivery_mode = self.delivery_mode()?;
        if hint && logical && delivery_mode == DeliveryMode::Fixed {
            delivery_mode = DeliveryMode::LowestPriority;
        }
        let trigger = if self.data & DATA_TRIGGER_LEVEL != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        };
        Ok(InterruptMessage {
            vector: (self.data & DATA_VECTOR_MASK) as u8,
            delivery_mode,
            destination_mode: if logical {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            trigger,
            // Every MSI asserts. The level bit is "don't care" for edge trigger (§11.11.2); for
            // level trigger the SDM reads it as the input's level, but KVM delivers every MSI as
            // an assert (`kvm_set_msi_irq`), so a level-triggered INIT with bit 14 clear is an
            // INIT, not an ignored de-assert, in every irqchip mode.
            level_assert: true,
            shorthand: Shorthand::None,
            destination: self.destination(addressing),
            format: DestinationFormat::Xapic,
            source: MessageSource::Device,
            redirection_hint: hint,
        })
    }

    /// Encodes with the standard 8-bit destination.
    pub fn encode(msg: &InterruptMessage) -> Result<Self, MsiError> {
        Self::encode_with(msg, MsiAddressing::Standard)
    }

    /// Encodes `msg` as the MSI a device would send. Decoding the result gives `msg` back for
    /// every message a decode can produce (xAPIC format, device source, edge messages asserted);
    /// an x2APIC-format message is re-expressed in xAPIC format (its broadcast becomes 0xFF).
    pub fn encode_with(
        msg: &InterruptMessage,
        addressing: MsiAddressing,
    ) -> Result<Self, MsiError> {
        if msg.shorthand != Shorthand::None {
            return Err(MsiError::Shorthand);
        }
        if msg.delivery_mode == DeliveryMode::StartUp {
            return Err(MsiError::ReservedDeliveryMode(DELIVERY_MODE_START_UP));
        }
        let destination = encodable_destination(msg, addressing)?;
        let mut address = MSI_ADDRESS_BASE
            | u64::from(destination & ADDRESS_DEST_MASK) << ADDRESS_DEST_SHIFT
            | u64::from(destination >> EXT_DEST_DESTINATION_SHIFT) << ADDRESS_EXT_DEST_SHIFT;
        if msg.destination_mode == DestinationMode::Logical {
            address |= ADDRESS_DEST_LOGICAL;
        }
        if msg.redirection_hint {
            address |= ADDRESS_REDIRECTION_HINT;
        }
        let mut data = u32::from(msg.vector) | msg.delivery_mode.bits() << DATA_DELIVERY_MODE_SHIFT;
        if msg.level_assert {
            data |= DATA_LEVEL_ASSERT;
        }
        if msg.trigger == TriggerMode::Level {
            data |= DATA_TRIGGER_LEVEL;
        }
        Ok(Self { address, data })
    }

    fn delivery_mode(&self) -> Result<DeliveryMode, MsiError> {
        let bits = (self.data >> DATA_DELIVERY_MODE_SHIFT) & DATA_DELIVERY_MODE_MASK;
        match bits {
            DELIVERY_MODE_RESERVED_3 | DELIVERY_MODE_START_UP => {
                Err(MsiError::ReservedDeliveryMode(bits))
            }
            _ => DeliveryMode::from_bits(bits).ok_or(MsiError::ReservedDeliveryMode(bits)),
        }
    }

    fn destination(&self, addressing: MsiAddressing) -> u32 {
        // Only bits 19:5 are read; the window check above makes bits 63:32 zero.
        let low = (self.address >> ADDRESS_DEST_SHIFT) as u32 & ADDRESS_DEST_MASK;
        match addressing {
            MsiAddressing::Standard => low,
            MsiAddressing::ExtendedDestId => {
                let high = (self.address >> ADDRESS_EXT_DEST_SHIFT) as u32 & ADDRESS_EXT_DEST_MASK;
                high << EXT_DEST_DESTINATION_SHIFT | low
            }
        }
    }
}

/// The destination value an MSI carries for `msg`, or why it has none.
fn encodable_destination(
    msg: &InterruptMessage,
    addressing: MsiAddressing,
) -> Result<u32, MsiError> {
    let destination = match (msg.format, msg.destination) {
        (DestinationFormat::X2apic, X2APIC_BROADCAST) => XAPIC_BROADCAST,
        (DestinationFormat::X2apic, XAPIC_BROADCAST) => return Err(MsiError::AmbiguousBroadcast),
        (_, destination) => destination,
    };
    let max = addressing.max_destination();
    if destination > max {
        return Err(MsiError::DestinationOutOfRange { destination, max });
    }
    Ok(destination)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::ApicBus;
    use crate::types::{ApicEvents, ApicId, InterruptSink, Notify, TopologyEntry, Vector};
    use proptest::prelude::*;
    use std::sync::Arc;

    fn msi(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    fn decode(address: u64, data: u32) -> InterruptMessage {
        msi(address, data).decode().expect("valid MSI")
    }

    #[test]
    fn sdm_11_11_2_vector_trigger_and_level_fields() {
        let m = decode(0xFEE0_0000, 0x0000_0031);
        assert_eq!(m.vector, 0x31);
        assert_eq!(m.delivery_mode, DeliveryMode::Fixed);
        assert_eq!(m.trigger, TriggerMode::Edge);
        assert!(m.level_assert, "edge MSIs assert whatever bit 14 says");
        assert_eq!(m.source, MessageSource::Device);
        assert_eq!(m.shorthand, Shorthand::None);
        assert_eq!(m.format, DestinationFormat::Xapic);

        let level = decode(0xFEE0_0000, 0x0000_C0A1);
        assert_eq!(
            (level.vector, level.trigger, level.level_assert),
            (0xA1, TriggerMode::Level, true)
        );
        // Level trigger with bit 14 clear still asserts, as KVM takes every MSI (`kvm_set_msi_irq`
        // sets the level to 1): a level-triggered INIT so is an INIT, not an ignored de-assert.
        let init = decode(0xFEE0_0000, 0x0000_8000 | 5 << 8);
        assert_eq!(init.trigger, TriggerMode::Level);
        assert!(init.level_assert);
        assert!(!init.is_init_deassert());
    }

    #[test]
    fn sdm_11_11_2_each_delivery_mode_and_reserved_encodings() {
        let cases = [
            (0, Ok(DeliveryMode::Fixed)),
            (1, Ok(DeliveryMode::LowestPriority)),
            (2, Ok(DeliveryMode::Smi)),
            (3, Err(MsiError::ReservedDeliveryMode(3))),
            (4, Ok(DeliveryMode::Nmi)),
            (5, Ok(DeliveryMode::Init)),
            (6, Err(MsiError::ReservedDeliveryMode(6))),
            (7, Ok(DeliveryMode::ExtInt)),
        ];
        for (bits, expected) in cases {
            let got = msi(0xFEE0_0000, bits << 8 | 0x40)
                .decode()
                .map(|m| m.delivery_mode);
            assert_eq!(got, expected, "mode {bits}");
        }
    }

    #[test]
    fn sdm_11_11_2_reserved_data_bits_are_ignored() {
        assert_eq!(
            decode(0xFEE0_0000, 0xFFFF_0041),
            decode(0xFEE0_0000, 0x0000_0041)
        );
    }

    #[test]
    fn sdm_11_11_1_destination_id_and_destination_mode() {
        let m = decode(0xFEE1_2000, 0x41);
        assert_eq!(
            (m.destination, m.destination_mode),
            (0x12, DestinationMode::Physical)
        );
        let m = decode(0xFEEF_F004, 0x41);
        assert_eq!(
            (m.destination, m.destination_mode),
            (0xFF, DestinationMode::Logical)
        );
        // Bits 1:0 are don't-care, bits 11:4 reserved in the standard layout.
        assert_eq!(decode(0xFEE1_2FF3, 0x41), decode(0xFEE1_2000, 0x41));
    }

    #[test]
    fn sdm_11_11_1_redirection_hint_with_logical_mode_means_lowest_priority() {
        let rh = ADDRESS_REDIRECTION_HINT;
        let dm = ADDRESS_DEST_LOGICAL;
        assert_eq!(
            decode(0xFEE0_1000 | rh | dm, 0x41).delivery_mode,
            DeliveryMode::LowestPriority
        );
        // RH with physical destination: the mode stands, the message is arbitrated (KVM's
        // `kvm_lowest_prio_delivery`: one APIC of a physical broadcast takes it).
        let physical = decode(0xFEE0_1000 | rh, 0x41);
        assert_eq!(physical.delivery_mode, DeliveryMode::Fixed);
        assert!(physical.redirection_hint && physical.arbitrated());
        // RH does not turn other modes into lowest priority, but arbitrates them too.
        let nmi = decode(0xFEE0_1000 | rh | dm, 4 << 8);
        assert_eq!(nmi.delivery_mode, DeliveryMode::Nmi);
        assert!(nmi.arbitrated());
        // RH = 0: the data's mode stands, no arbitration.
        let plain = decode(0xFEE0_1000 | dm, 0x41);
        assert_eq!(plain.delivery_mode, DeliveryMode::Fixed);
        assert!(!plain.redirection_hint && !plain.arbitrated());
        // Encoding keeps the hint.
        assert_eq!(MsiMessage::encode(&nmi).unwrap().address & rh, rh);
    }

    #[test]
    fn sdm_11_11_1_addresses_outside_the_window_are_rejected() {
        for address in [
            0,
            0xFED0_0000,
            0xFEF0_0000,
            0xFFE0_0000,
            0x1_FEE0_0000,
            u64::MAX,
        ] {
            assert_eq!(
                msi(address, 0x41).decode(),
                Err(MsiError::NotInterruptAddress(address)),
                "{address:#x}"
            );
        }
        assert!(is_interrupt_address(0xFEEF_FFFF));
        assert!(!is_interrupt_address(0xFEDF_FFFF));
    }

    #[test]
    fn extended_dest_id_supplies_destination_bits_14_to_8() {
        // destination 0x1234: bits 7:0 = 0x34 at 19:12, bits 14:8 = 0x12 at 11:5.
        let raw = msi(0xFEE0_0000 | 0x34 << 12 | 0x12 << 5, 0x41);
        assert_eq!(
            raw.decode_with(MsiAddressing::ExtendedDestId)
                .unwrap()
                .destination,
            0x1234
        );
        // Without the feature those bits are reserved and ignored.
        assert_eq!(raw.decode().unwrap().destination, 0x34);
        // 0xFF with no extended bits stays the broadcast destination.
        let broadcast = msi(0xFEEF_F000, 0x41).decode_with(MsiAddressing::ExtendedDestId);
        assert_eq!(broadcast.unwrap().destination, 0xFF);
    }

    #[test]
    fn extended_dest_id_rejects_remappable_format() {
        let raw = msi(0xFEE0_0010, 0x41);
        assert_eq!(
            raw.decode_with(MsiAddressing::ExtendedDestId),
            Err(MsiError::RemappableFormat(0xFEE0_0010))
        );
        assert!(raw.decode().is_ok());
    }

    #[test]
    fn encode_lays_out_fields() {
        let m = InterruptMessage {
            trigger: TriggerMode::Level,
            destination_mode: DestinationMode::Logical,
            delivery_mode: DeliveryMode::LowestPriority,
            ..InterruptMessage::fixed(0x51, 0x0C)
        };
        let raw = MsiMessage::encode(&m).unwrap();
        assert_eq!(raw, msi(0xFEE0_C004, 0xC151));
        let wide = MsiMessage::encode_with(
            &InterruptMessage::fixed(0x51, 0x1234),
            MsiAddressing::ExtendedDestId,
        );
        assert_eq!(wide.unwrap().address, 0xFEE3_4000 | 0x12 << 5);
    }

    #[test]
    fn encode_rejects_what_an_msi_cannot_carry() {
        let fixed = InterruptMessage::fixed(0x40, 0x100);
        assert_eq!(
            MsiMessage::encode(&fixed),
            Err(MsiError::DestinationOutOfRange {
                destination: 0x100,
                max: 0xFF
            })
        );
        let too_wide = InterruptMessage::fixed(0x40, 0x8000);
        assert_eq!(
            MsiMessage::encode_with(&too_wide, MsiAddressing::ExtendedDestId),
            Err(MsiError::DestinationOutOfRange {
                destination: 0x8000,
                max: 0x7FFF
            })
        );
        let sipi = InterruptMessage {
            delivery_mode: DeliveryMode::StartUp,
            ..InterruptMessage::fixed(0x9A, 1)
        };
        assert_eq!(
            MsiMessage::encode(&sipi),
            Err(MsiError::ReservedDeliveryMode(6))
        );
        let shorthand = InterruptMessage {
            shorthand: Shorthand::AllExcludingSelf,
            ..InterruptMessage::fixed(0x40, 1)
        };
        assert_eq!(MsiMessage::encode(&shorthand), Err(MsiError::Shorthand));
        let x2_ff = InterruptMessage {
            format: DestinationFormat::X2apic,
            ..InterruptMessage::fixed(0x40, 0xFF)
        };
        assert_eq!(
            MsiMessage::encode(&x2_ff),
            Err(MsiError::AmbiguousBroadcast)
        );
    }

    #[test]
    fn encode_turns_x2apic_broadcast_into_ff() {
        let m = InterruptMessage {
            format: DestinationFormat::X2apic,
            ..InterruptMessage::fixed(0x40, X2APIC_BROADCAST)
        };
        let back = MsiMessage::encode(&m).unwrap().decode().unwrap();
        assert_eq!(
            (back.destination, back.format),
            (0xFF, DestinationFormat::Xapic)
        );
    }

    struct CountingSink(std::sync::atomic::AtomicUsize);

    impl InterruptSink for CountingSink {
        fn post_vector(&self, _: Vector, _: TriggerMode) -> Notify {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Notify::None
        }
        fn post_events(&self, _: ApicEvents) -> Notify {
            Notify::None
        }
        fn published_ppr(&self) -> u8 {
            0
        }
    }

    #[test]
    fn extended_dest_id_msi_reaches_x2apic_vcpu_above_255() {
        let entry = |id| TopologyEntry {
            apic_id: ApicId(id),
            initial_id: ApicId(id),
            x2apic: true,
            hw_enabled: true,
            sw_enabled: true,
            ldr: 0,
            dfr_flat: false,
        };
        let sinks = vec![
            Arc::new(CountingSink(0.into())),
            Arc::new(CountingSink(0.into())),
        ];
        let bus = ApicBus::with_topology(sinks, vec![entry(0x34), entry(0x1234)]);
        let raw = msi(0xFEE0_0000 | 0x34 << 12 | 0x12 << 5, 0x41);
        let m = raw.decode_with(MsiAddressing::ExtendedDestId).unwrap();
        assert_eq!(bus.resolve(&m), vec![1]);
        assert_eq!(bus.resolve(&raw.decode().unwrap()), vec![0]);
    }

    fn arb_encodable(addressing: MsiAddressing) -> impl Strategy<Value = InterruptMessage> {
        let modes = prop_oneof![
            Just(DeliveryMode::Fixed),
            Just(DeliveryMode::LowestPriority),
            Just(DeliveryMode::Smi),
            Just(DeliveryMode::Nmi),
            Just(DeliveryMode::Init),
            Just(DeliveryMode::ExtInt),
        ];
        (
            any::<u8>(),
            modes,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0..=addressing.max_destination(),
        )
            .prop_map(
                |(vector, mut delivery_mode, logical, level, hint, destination)| {
                    let trigger = if level {
                        TriggerMode::Level
                    } else {
                        TriggerMode::Edge
                    };
                    // canonical: a fixed message with RH and DM decodes as lowest priority
                    if hint && logical && delivery_mode == DeliveryMode::Fixed {
                        delivery_mode = DeliveryMode::LowestPriority;
                    }
                    InterruptMessage {
                        vector,
                        delivery_mode,
                        destination_mode: if logical {
                            DestinationMode::Logical
                        } else {
                            DestinationMode::Physical
                        },
                        trigger,
                        // canonical: every decoded MSI asserts (KVM's rule)
                        level_assert: true,
                        shorthand: Shorthand::None,
                        destination,
                        format: DestinationFormat::Xapic,
                        source: MessageSource::Device,
                        redirection_hint: hint,
                    }
                },
            )
    }

    fn arb_addressing() -> impl Strategy<Value = MsiAddressing> {
        prop_oneof![
            Just(MsiAddressing::Standard),
            Just(MsiAddressing::ExtendedDestId)
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(
            (addressing, m) in arb_addressing().prop_flat_map(|a| (Just(a), arb_encodable(a)))
        ) {
            let raw = MsiMessage::encode_with(&m, addressing).unwrap();
            prop_assert!(is_interrupt_address(raw.address));
            prop_assert_eq!(raw.decode_with(addressing), Ok(m));
        }

        #[test]
        fn decode_then_encode_is_stable(
            low in 0u64..0x10_0000, data in any::<u32>(), addressing in arb_addressing()
        ) {
            let raw = msi(MSI_ADDRESS_BASE | low, data);
            if let Ok(m) = raw.decode_with(addressing) {
                let again = MsiMessage::encode_with(&m, addressing).unwrap();
                prop_assert_eq!(again.decode_with(addressing), Ok(m));
            }
        }

        #[test]
        fn decode_never_panics(address in any::<u64>(), data in any::<u32>(), addressing in arb_addressing()) {
            let _ = msi(address, data).decode_with(addressing);
        }
    }
}
