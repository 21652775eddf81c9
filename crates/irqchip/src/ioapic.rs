//! The I/O APIC: an Intel 82093AA-compatible redirection table that turns interrupt lines into
//! [`InterruptMessage`]s for the APIC bus.
//!
//! # Registers (82093AA datasheet §3.1, §3.2)
//!
//! Two direct registers live in the MMIO window: IOREGSEL (offset 0x00, an 8-bit index) and
//! IOWIN (offset 0x10, the 32-bit window onto the selected indirect register). Version 0x20
//! parts (the IOxAPIC of later chipsets) add the EOI register at 0x40: writing a vector there
//! has the same effect as a broadcast EOI message for that vector (a "directed EOI", used by
//! local APICs that suppress EOI broadcast, SDM vol. 3 §11.8.5). The indirect registers are
//! IOAPICID (0x00), IOAPICVER (0x01), IOAPICARB (0x02) and the redirection table, one 64-bit
//! entry per pin at 0x10 + 2 * pin (low dword) and 0x11 + 2 * pin (high dword).
//!
//! ## MMIO access rules (defined here; the datasheet only allows aligned dword accesses)
//!
//! * Only the low 8 bits of the offset are decoded, so the 256-byte register block repeats
//!   through whatever window the VMM maps (a 4 KiB page at 0xFEC0_0000 normally), as in KVM and
//!   QEMU.
//! * An access is decoded by the address of its first byte, as KVM decodes it (the datasheet
//!   leaves other sizes and alignments undefined). A read at 0x00 returns IOREGSEL, at 0x10 the
//!   selected indirect register (zero-extended for an 8-byte read, truncated for 1 and 2
//!   bytes), anywhere else 0 (reserved space and the write-only EOI register). Reads have no
//!   side effect.
//! * A write at 0x00 sets IOREGSEL from its first byte (bits 31:8 are reserved). A write at
//!   0x10 writes the indirect register with its first four bytes; a 1- or 2-byte write is
//!   zero-extended to a dword, as KVM does (QEMU drops it). A write at 0x40 is the EOI register
//!   (version 0x20 only; its first byte is the vector). Writes starting anywhere else, even
//!   ones that span 0x10-0x13, are ignored.
//! * Undefined indirect registers (0x03-0x0F and entries past the last pin) read all ones
//!   ([`UNDEFINED_REGISTER`], KVM's value; the datasheet calls them reserved) and ignore writes.
//!
//! # Lines (82093AA §2.4, §3.2.4)
//!
//! [`IoApic::set_line`] gives the raw electrical level of a pin. The entry's polarity bit
//! (INTPOL, bit 13) decides whether high or low is "asserted": ISA interrupts are active-high
//! and edge-triggered, PCI INTx lines are active-low, level-triggered and idle HIGH. A VMM must
//! therefore drive a PCI pin high while its device is idle (call `set_line(pin, true)` once at
//! VM creation, when every entry is still masked); a PCI wire left low reads as asserted once
//! the guest programs the pin active-low. KVM and QEMU take the logical level instead and
//! ignore INTPOL; modelling the wire lets a guest that programs the wrong polarity see what
//! hardware would do. The polarity inverter sits before the edge detector, so a write that
//! flips INTPOL while the wire is static is a transition like any other.
//!
//! * Edge-sensitive entries deliver once per assertion (the transition from not asserted to
//!   asserted) while unmasked. An edge on a masked pin is lost, not latched: "Edge-sensitive
//!   interrupts signaled on a masked interrupt pin are ignored (i.e., not delivered or held
//!   pending)" (82093AA §3.2.4, mask bit). KVM agrees: it only re-services level pins when an
//!   entry is written, so unmasking an edge pin never delivers. (KVM does remember an
//!   undelivered edge across KVM_SET_IOAPIC; there is no equivalent here.)
//! * Level-sensitive entries deliver while asserted, unmasked and with remote IRR clear, and
//!   the delivery sets remote IRR once a local APIC accepted the message (the `out` callback
//!   returns how many did; 82093AA §3.2.4, KVM alike): a message nobody accepts leaves remote
//!   IRR clear, and the asserted pin is sent again at its entry's next write. An EOI for the
//!   entry's vector clears remote IRR and, if the pin is still asserted and unmasked, delivers
//!   again. Unmasking an asserted level entry delivers it. A level line held asserted is thus
//!   delivered once per EOI, never more.
//! * NMI, INIT, SMI and ExtINT entries programmed level-triggered: the datasheet says NMI and
//!   INIT "are treated as edge triggered even if programmed as level" and that SMI and ExtINT
//!   "require an edge trigger mode" (§3.2.4, delivery mode). KVM instead treats them like any
//!   level entry: the delivery sets remote IRR, which blocks the pin until an EOI for the
//!   entry's vector field or a switch to edge clears it. This model follows KVM for what the
//!   guest sees (remote IRR and the pin's blocking, [`RedirectionEntry::awaits_eoi`]); their
//!   messages still carry `TriggerMode::Edge`, since these modes have no TMR bit to set.
//! * Delivery modes 3 and 6 (StartUp, which an IOAPIC cannot send) are reserved: such an entry
//!   sends nothing and does not set remote IRR, and [`IoApic::pin_message`] returns `None`.
//!
//! # Register side effects (KVM arch/x86/kvm/ioapic.c semantics)
//!
//! Remote IRR (bit 14) and delivery status (bit 12) are read-only; delivery is instantaneous in
//! this model, so delivery status always reads 0 (idle). Every other bit, the reserved bits
//! 55:17 included, is stored and reads back as written, as in KVM (the datasheet leaves the
//! reserved bits undefined; Linux writes them as 0). Whenever an entry is edge-triggered
//! its remote IRR is cleared: Linux switches an entry to edge and back to clear a stuck remote
//! IRR on IOAPICs without an EOI register, and KVM implements that. After every entry write the
//! pin is re-evaluated: an asserted, unmasked level entry with remote IRR clear is delivered
//! (this covers unmask-while-asserted and edge-to-level switches), and an edge entry delivers if
//! the write itself asserted the pin (an INTPOL flip).
//!
//! # Extended destination ID
//!
//! An entry's destination is bits 63:56. With [`IoApic::with_extended_destination_id`], bits
//! 55:49 (stored like every reserved bit, see above) carry destination bits 14:8 (15-bit APIC
//! IDs); without it they do not route. This is the layout Linux uses for hypervisors that
//! advertise an extended destination ID (its `virt_destid_8_14` field; the MSI equivalent is
//! address bits 11:5). Bit 48, which chipsets documented as part of an 8-bit "EDID" field and
//! which interrupt remapping uses as the format bit, stays reserved (stored, no effect). The
//! message keeps `DestinationFormat::Xapic`: 0xFF is still broadcast.
//!
//! # What the caller must know
//!
//! Every delivery is one call of `out` with the message. A level entry sets remote IRR only
//! when `out` reports that a local APIC accepted it (a caller that cannot tell returns 1 for a
//! message it handed on), and a message nobody accepted is not retried: the real part would keep
//! retrying with delivery status set; here the entry's next write or an EOI of its vector sends
//! it again. There is no EOI-storm throttling (KVM delays re-delivery after 10,000 back-to-back
//! EOIs of an asserted line): the chip has no clock, and every operation does at most one
//! delivery per pin, so the work per call is bounded.

use serde::{Deserialize, Serialize};

use crate::types::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, MessageSource, Shorthand,
    TriggerMode, Vector,
};

/// Where firmware conventionally maps the first IOAPIC (MP specification §3.6.6).
pub const IOAPIC_DEFAULT_BASE: u64 = 0xFEC0_0000;

/// Offsets in the MMIO window (82093AA §3.1). Only the low 8 bits of an offset are decoded.
pub const IOREGSEL_OFFSET: u8 = 0x00;
/// IOWIN: the 32-bit data window onto the register IOREGSEL selects (82093AA §3.1).
pub const IOWIN_OFFSET: u8 = 0x10;
/// The EOI register of version 0x20 IOAPICs.
pub const EOI_OFFSET: u8 = 0x40;
const MMIO_DECODE_MASK: u64 = 0xFF;
const IOWIN_BYTES: usize = 4;

/// Indirect register indexes, written to IOREGSEL (82093AA §3.2).
pub const REG_ID: u8 = 0x00;
/// IOAPICVER: version in bits 7:0, maximum redirection entry in bits 23:16 (82093AA §3.2.2).
pub const REG_VERSION: u8 = 0x01;
/// IOAPICARB: the bus arbitration ID, read-only (82093AA §3.2.3).
pub const REG_ARBITRATION: u8 = 0x02;
/// Index of the low half of redirection entry 0; entry `n` is at `0x10 + 2n` (low) and
/// `0x11 + 2n` (high) (82093AA §3.2.4).
pub const REG_REDIRECTION_BASE: u8 = 0x10;

/// IOAPICID / IOAPICARB: the 4-bit ID in bits 27:24 (82093AA §3.2.1, §3.2.3).
pub const ID_SHIFT: u32 = 24;
/// Width mask of the 4-bit IOAPIC ID (after shifting by [`ID_SHIFT`]).
pub const ID_MASK: u8 = 0xF;
/// IOAPICVER: maximum redirection entry (pins - 1) in bits 23:16 (82093AA §3.2.2).
pub const VERSION_MAX_ENTRY_SHIFT: u32 = 16;

/// The 82093AA's version number: no EOI register.
pub const VERSION_82093AA: u8 = 0x11;
/// Version of the chipset IOxAPICs with the EOI register at 0x40 (the default here).
pub const VERSION_WITH_EOI_REGISTER: u8 = 0x20;

/// Redirection entry fields (82093AA §3.2.4).
pub const RTE_VECTOR_MASK: u64 = 0xFF;
/// Delivery mode, bits 10:8 (same encoding as [`DeliveryMode`]).
pub const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
/// Mask of the delivery mode field.
pub const RTE_DELIVERY_MODE_MASK: u64 = 0x7 << RTE_DELIVERY_MODE_SHIFT;
/// Destination mode: set for logical, clear for physical (bit 11).
pub const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
/// Delivery status, read-only: set while a message is pending on the bus (bit 12).
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Interrupt input pin polarity: set for active low (bit 13).
pub const RTE_POLARITY_ACTIVE_LOW: u64 = 1 << 13;
/// Remote IRR, read-only: set when a level-triggered interrupt is accepted by a local APIC,
/// cleared by its EOI (bit 14).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Trigger mode: set for level, clear for edge (bit 15).
pub const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
/// Interrupt mask: a masked pin sends nothing (bit 16).
pub const RTE_MASKED: u64 = 1 << 16;
/// Destination bits 14:8 when the extended destination ID is enabled (Linux `virt_destid_8_14`).
pub const RTE_EXT_DEST_SHIFT: u32 = 49;
/// Mask of the extended destination bits 14:8 (bits 55:49 of the entry).
pub const RTE_EXT_DEST_MASK: u64 = 0x7F << RTE_EXT_DEST_SHIFT;
/// Destination field, bits 63:56: an APIC ID (physical) or a logical destination (logical).
pub const RTE_DEST_SHIFT: u32 = 56;
/// Mask of the destination field.
pub const RTE_DEST_MASK: u64 = 0xFF << RTE_DEST_SHIFT;
/// Bits the guest can write: every bit but delivery status and remote IRR. The 82093AA
/// (§3.2.4) calls bits 55:17 reserved; KVM's IOAPIC stores whatever the guest writes there and
/// reads it back, and so does this model. Reserved bits (and bits 55:49 without the extended
/// destination ID) have no effect on delivery.
pub const RTE_WRITABLE: u64 = !(RTE_DELIVERY_STATUS | RTE_REMOTE_IRR);

/// What IOWIN reads for an indirect register that does not exist (0x03-0x0F, entries past the
/// last pin): all ones, as KVM's IOAPIC returns (the 82093AA calls them reserved, §3.2).
pub const UNDEFINED_REGISTER: u32 = 0xFFFF_FFFF;

/// Default number of pins (the 82093AA has 24).
pub const DEFAULT_PINS: usize = 24;
/// The most pins the register interface can reach: IOREGSEL is 8 bits, so the last entry's
/// high dword is index 0x10 + 2 * 119 + 1 = 0xFF. (IOAPICVER's 8-bit field could report 256,
/// but entries past 119 could never be programmed.)
pub const MAX_PINS: usize = 120;

/// Construction parameters of an [`IoApic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IoApicConfig {
    /// Number of input pins, 1..=[`MAX_PINS`] (24 by default).
    pub pins: usize,
    /// Initial (and after reset) IOAPIC ID, 0..=15.
    pub id: u8,
    /// Value of IOAPICVER bits 7:0: 0x11 (82093AA) or 0x20 (with EOI register). Any value is
    /// accepted; the EOI register exists when it is 0x20 or more.
    pub version: u8,
}

impl Default for IoApicConfig {
    fn default() -> Self {
        Self {
            pins: DEFAULT_PINS,
            id: 0,
            version: VERSION_WITH_EOI_REGISTER,
        }
    }
}

/// Why an [`IoApicConfig`] (or a snapshot) was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoApicConfigError {
    #[error("IOAPIC pin count {0} is outside 1..={MAX_PINS} (IOREGSEL can index 120 entries)")]
    /// The pin count is not in `1..=MAX_PINS`.
    PinCount(usize),
    #[error("IOAPIC ID {0} does not fit the 4-bit IOAPICID field")]
    /// The ID does not fit in 4 bits.
    Id(u8),
    #[error("IOAPIC snapshot has {found} pin states for {expected} configured pins")]
    /// A snapshot's pin states do not match the configured pin count.
    PinStateCount {
        /// The configured pin count.
        expected: usize,
        /// The snapshot's pin states.
        found: usize,
    },
}

impl IoApicConfig {
    /// Checks the pin count and ID.
    pub fn validate(&self) -> Result<(), IoApicConfigError> {
        if !(1..=MAX_PINS).contains(&self.pins) {
            return Err(IoApicConfigError::PinCount(self.pins));
        }
        if self.id > ID_MASK {
            return Err(IoApicConfigError::Id(self.id));
        }
        Ok(())
    }

    /// The nearest valid configuration: pins clamped to 1..=MAX_PINS, ID truncated to 4 bits.
    pub fn clamped(self) -> Self {
        Self {
            pins: self.pins.clamp(1, MAX_PINS),
            id: self.id & ID_MASK,
            version: self.version,
        }
    }

    fn has_eoi_register(&self) -> bool {
        self.version >= VERSION_WITH_EOI_REGISTER
    }
}

/// One 64-bit redirection table entry, as the guest reads it (82093AA §3.2.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RedirectionEntry(pub u64);

impl RedirectionEntry {
    /// The power-on value: masked, everything else 0 (the datasheet leaves the rest undefined).
    pub const RESET: Self = Self(RTE_MASKED);

    /// The vector delivered for this pin (bits 7:0).
    pub fn vector(self) -> Vector {
        (self.0 & RTE_VECTOR_MASK) as Vector
    }

    /// The delivery mode, `None` for the reserved encoding 3.
    pub fn delivery_mode(self) -> Option<DeliveryMode> {
        DeliveryMode::from_bits(
            ((self.0 & RTE_DELIVERY_MODE_MASK) >> RTE_DELIVERY_MODE_SHIFT) as u32,
        )
    }

    /// Physical or logical destination (bit 11).
    pub fn destination_mode(self) -> DestinationMode {
        if self.0 & RTE_DEST_MODE_LOGICAL != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// True when the pin is active low (bit 13); the IOAPIC inverts the wire level.
    pub fn active_low(self) -> bool {
        self.0 & RTE_POLARITY_ACTIVE_LOW != 0
    }

    /// True while a delivered level-triggered interrupt awaits its EOI (bit 14).
    pub fn remote_irr(self) -> bool {
        self.0 & RTE_REMOTE_IRR != 0
    }

    /// The trigger mode bit as programmed.
    pub fn trigger_bit_level(self) -> bool {
        self.0 & RTE_TRIGGER_LEVEL != 0
    }

    /// True when the pin is masked (bit 16).
    pub fn masked(self) -> bool {
        self.0 & RTE_MASKED != 0
    }

    /// The delivery mode the IOAPIC may send: Fixed, LowestPriority, SMI, NMI, INIT, ExtINT.
    /// Encoding 3 and StartUp (6) are reserved for the IOAPIC (§3.2.4).
    pub fn sendable_mode(self) -> Option<DeliveryMode> {
        self.delivery_mode()
            .filter(|mode| *mode != DeliveryMode::StartUp)
    }

    /// True when the pin is level-sensitive: level trigger bit and a vectored delivery mode.
    /// NMI, INIT, SMI and ExtINT are always edge-sensitive (§3.2.4, delivery mode).
    pub fn level_sensitive(self) -> bool {
        self.trigger_bit_level() && self.delivery_mode().is_some_and(DeliveryMode::uses_irr)
    }

    /// True when a delivery from this entry sets remote IRR and the pin then waits for an EOI:
    /// the level trigger bit with any sendable delivery mode. For NMI, INIT, SMI and ExtINT the
    /// datasheet (§3.2.4) would treat the entry as edge; KVM sets remote IRR for them too, and
    /// this model follows KVM.
    pub fn awaits_eoi(self) -> bool {
        self.trigger_bit_level() && self.sendable_mode().is_some()
    }

    /// The destination: bits 63:56, plus bits 55:49 as destination bits 14:8 when `extended`.
    pub fn destination(self, extended: bool) -> u32 {
        let low = ((self.0 & RTE_DEST_MASK) >> RTE_DEST_SHIFT) as u32;
        if extended {
            low | ((((self.0 & RTE_EXT_DEST_MASK) >> RTE_EXT_DEST_SHIFT) as u32) << 8)
        } else {
            low
        }
    }

    fn low_dword(self) -> u32 {
        self.0 as u32
    }

    fn high_dword(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// One input pin: its redirection entry and the raw level of its wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Pin {
    entry: RedirectionEntry,
    /// The electrical level of the input, before the polarity inverter.
    wire_high: bool,
}

impl Pin {
    /// The wire level after INTPOL: true when the device is requesting an interrupt.
    fn asserted(&self) -> bool {
        self.wire_high != self.entry.active_low()
    }
}

/// An 82093AA-compatible IOAPIC. See the module documentation for the rules it implements.
///
/// Serializes its whole state (configuration, ID, IOREGSEL, every entry including remote IRR,
/// and every wire level); deserializing validates it and rejects inconsistent snapshots.
///
/// A level-triggered, active-low PCI pin: the message goes out once per assertion, and while
/// the device keeps the line asserted the EOI makes the IOAPIC send it again (82093AA §3.2.4,
/// remote IRR):
///
/// ```
/// use irqchip::ioapic::{IoApic, IoApicConfig, IOREGSEL_OFFSET, IOWIN_OFFSET};
/// use irqchip::{DeliveryMode, InterruptMessage, TriggerMode};
///
/// // What the APIC bus does with a message: here one local APIC accepts each.
/// fn accept(sent: &mut Vec<InterruptMessage>) -> impl FnMut(InterruptMessage) -> usize + '_ {
///     move |m| {
///         sent.push(m);
///         1
///     }
/// }
/// let mut ioapic = IoApic::new(IoApicConfig::default());
/// let mut sent = Vec::new();
/// ioapic.set_line(16, true, &mut accept(&mut sent)); // PCI idles high
/// let mut program = |ioapic: &mut IoApic, index: u32, value: u32| {
///     ioapic.mmio_write(IOREGSEL_OFFSET.into(), &index.to_le_bytes(), &mut |_| 1);
///     ioapic.mmio_write(IOWIN_OFFSET.into(), &value.to_le_bytes(), &mut |_| 1);
/// };
/// program(&mut ioapic, 0x10 + 2 * 16 + 1, 3 << 24); // destination APIC ID 3
/// program(&mut ioapic, 0x10 + 2 * 16, 0x41 | 1 << 13 | 1 << 15); // vector, active low, level
///
/// ioapic.set_line(16, false, &mut accept(&mut sent)); // the device pulls the wire low
/// assert_eq!(sent.len(), 1);
/// assert_eq!((sent[0].vector, sent[0].destination), (0x41, 3));
/// assert_eq!(sent[0].delivery_mode, DeliveryMode::Fixed);
/// assert_eq!(sent[0].trigger, TriggerMode::Level);
/// assert!(ioapic.entry(16).unwrap().remote_irr());
///
/// // Still asserted at the EOI: delivered again. Deasserted: the EOI only clears remote IRR.
/// ioapic.end_of_interrupt(0x41, &mut accept(&mut sent));
/// assert_eq!(sent.len(), 2);
/// ioapic.set_line(16, true, &mut accept(&mut sent));
/// ioapic.end_of_interrupt(0x41, &mut accept(&mut sent));
/// assert_eq!(sent.len(), 2);
/// assert!(!ioapic.entry(16).unwrap().remote_irr());
///
/// // A message no local APIC accepts leaves remote IRR clear: the held line goes out again
/// // when the entry is next written.
/// ioapic.set_line(16, false, &mut |_| 0);
/// assert!(!ioapic.entry(16).unwrap().remote_irr());
/// program(&mut ioapic, 0x10 + 2 * 16 + 1, 0); // retargeted to APIC ID 0
/// assert!(ioapic.entry(16).unwrap().remote_irr());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "IoApicState")]
pub struct IoApic {
    config: IoApicConfig,
    extended_destination_id: bool,
    id: u8,
    ioregsel: u8,
    pins: Vec<Pin>,
}

/// The serialized form of [`IoApic`], checked before it becomes one.
#[derive(Deserialize)]
struct IoApicState {
    config: IoApicConfig,
    extended_destination_id: bool,
    id: u8,
    ioregsel: u8,
    pins: Vec<Pin>,
}

impl TryFrom<IoApicState> for IoApic {
    type Error = IoApicConfigError;

    fn try_from(state: IoApicState) -> Result<Self, Self::Error> {
        state.config.validate()?;
        if state.pins.len() != state.config.pins {
            return Err(IoApicConfigError::PinStateCount {
                expected: state.config.pins,
                found: state.pins.len(),
            });
        }
        let mut ioapic = Self {
            config: state.config,
            extended_destination_id: state.extended_destination_id,
            id: state.id & ID_MASK,
            ioregsel: state.ioregsel,
            pins: state.pins,
        };
        // Keep only bits a guest could have produced, so the invariants of the live state hold.
        let keep = ioapic.writable_mask() | RTE_REMOTE_IRR;
        for pin in &mut ioapic.pins {
            pin.entry.0 &= keep;
            if !pin.entry.trigger_bit_level() {
                pin.entry.0 &= !RTE_REMOTE_IRR;
            }
        }
        Ok(ioapic)
    }
}

impl IoApic {
    /// A powered-on IOAPIC: every entry masked, every wire low. An invalid configuration is
    /// clamped (see [`IoApicConfig::clamped`]); use [`IoApic::try_new`] to reject it instead.
    pub fn new(cfg: IoApicConfig) -> Self {
        let config = cfg.clamped();
        Self {
            config,
            extended_destination_id: false,
            id: config.id,
            ioregsel: 0,
            pins: vec![
                Pin {
                    entry: RedirectionEntry::RESET,
                    wire_high: false,
                };
                config.pins
            ],
        }
    }

    /// An IOAPIC built from register values and wire levels, for converting another
    /// implementation's state (KVM's `kvm_ioapic_state` in irqvm): `pins[i]` is pin i's
    /// redirection entry (remote IRR included) and the electrical level of its wire. Checked and
    /// scrubbed as a deserialized snapshot is: the configuration must be valid and give one
    /// entry per pin; bits no guest write can set are dropped, and remote IRR on edge entries.
    pub fn from_parts(
        config: IoApicConfig,
        extended_destination_id: bool,
        id: u8,
        ioregsel: u8,
        pins: &[(RedirectionEntry, bool)],
    ) -> Result<Self, IoApicConfigError> {
        Self::try_from(IoApicState {
            config,
            extended_destination_id,
            id,
            ioregsel,
            pins: pins
                .iter()
                .map(|&(entry, wire_high)| Pin { entry, wire_high })
                .collect(),
        })
    }

    /// Like [`IoApic::new`], but an out-of-range pin count or ID is an error.
    pub fn try_new(cfg: IoApicConfig) -> Result<Self, IoApicConfigError> {
        cfg.validate()?;
        Ok(Self::new(cfg))
    }

    /// Enables (or disables) the extended destination ID: entry bits 55:49 become destination
    /// bits 14:8. Only for VMMs that advertise it to the guest (KVM_FEATURE_MSI_EXT_DEST_ID).
    pub fn with_extended_destination_id(mut self, enabled: bool) -> Self {
        self.extended_destination_id = enabled;
        let keep = self.writable_mask() | RTE_REMOTE_IRR;
        for pin in &mut self.pins {
            pin.entry.0 &= keep;
        }
        self
    }

    /// What a system reset does: IOREGSEL 0, ID back to the configured one, every entry masked
    /// with the other bits 0. Wire levels are outside the chip and keep their value.
    pub fn reset(&mut self) {
        self.id = self.config.id;
        self.ioregsel = 0;
        for pin in &mut self.pins {
            pin.entry = RedirectionEntry::RESET;
        }
    }

    /// The configuration this IOAPIC was built with.
    pub fn config(&self) -> IoApicConfig {
        self.config
    }

    /// Number of pins (redirection entries).
    pub fn pins(&self) -> usize {
        self.pins.len()
    }

    /// The current IOAPIC ID: the configured one after reset, then what the guest writes into
    /// IOAPICID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The register index the guest last wrote to IOREGSEL.
    pub fn ioregsel(&self) -> u8 {
        self.ioregsel
    }

    /// True when the entries' bits 55:49 extend the destination to 15 bits.
    pub fn extended_destination_id(&self) -> bool {
        self.extended_destination_id
    }

    /// The redirection entry of `pin`, `None` past the last pin.
    pub fn entry(&self, pin: usize) -> Option<RedirectionEntry> {
        self.pins.get(pin).map(|p| p.entry)
    }

    /// The raw wire level of `pin`, `None` past the last pin.
    pub fn line(&self, pin: usize) -> Option<bool> {
        self.pins.get(pin).map(|p| p.wire_high)
    }

    /// Whether `pin` is asserted (wire level after the polarity bit).
    pub fn is_asserted(&self, pin: usize) -> bool {
        self.pins.get(pin).is_some_and(Pin::asserted)
    }

    // ---- MMIO (82093AA §3.1) ----

    /// A guest read of the MMIO window. Fills every byte of `data`; no side effects. The access
    /// is decoded by its first byte's address, as KVM does: at 0x00 it reads IOREGSEL, at 0x10
    /// the selected indirect register, anywhere else 0; the 32-bit value is zero-extended (an
    /// 8-byte read) or truncated (1 and 2 bytes).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match decode(offset, 0) {
            IOREGSEL_OFFSET => u32::from(self.ioregsel),
            IOWIN_OFFSET => self.read_indirect(),
            _ => 0,
        };
        let bytes = u64::from(value).to_le_bytes();
        for (lane, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(lane).copied().unwrap_or(0);
        }
    }

    /// A guest write to the MMIO window, decoded by its first byte's address as KVM does:
    /// IOREGSEL takes the first byte (bits 31:8 are reserved), IOWIN the first four bytes with
    /// a 1- or 2-byte write zero-extended to a dword (the 82093AA only defines dword accesses,
    /// §3.1; KVM writes the zero-extended value, so a byte write of 0x55 to a low dword leaves
    /// vector 0x55 and every other writable bit 0), the EOI register (version 0x20) the first
    /// byte. Writes starting anywhere else are ignored. Deliveries the write causes go to `out`.
    pub fn mmio_write(
        &mut self,
        offset: u64,
        data: &[u8],
        out: &mut dyn FnMut(InterruptMessage) -> usize,
    ) {
        let Some(&first) = data.first() else {
            return;
        };
        match decode(offset, 0) {
            IOREGSEL_OFFSET => self.ioregsel = first,
            IOWIN_OFFSET => {
                let mut dword = [0u8; IOWIN_BYTES];
                for (to, from) in dword.iter_mut().zip(data) {
                    *to = *from;
                }
                self.write_indirect(u32::from_le_bytes(dword), out);
            }
            EOI_OFFSET if self.config.has_eoi_register() => self.end_of_interrupt(first, out),
            _ => {}
        }
    }

    /// The indirect register selected by IOREGSEL, as IOWIN reads it (82093AA §3.2).
    fn read_indirect(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => self.id_register(),
            REG_VERSION => self.version_register(),
            index => match self.redirection_slot(index) {
                Some((pin, false)) => self.pins[pin].entry.low_dword(),
                Some((pin, true)) => self.pins[pin].entry.high_dword(),
                // Reserved in the 82093AA (§3.2); KVM reads them as all ones.
                None => UNDEFINED_REGISTER,
            },
        }
    }

    /// IOAPICID bits 27:24. IOAPICARB reads the same: the arbitration ID is loaded from the ID
    /// (82093AA §3.2.3) and this model has no bus arbitration to rotate it.
    fn id_register(&self) -> u32 {
        u32::from(self.id) << ID_SHIFT
    }

    /// IOAPICVER: version in bits 7:0, maximum redirection entry in bits 23:16 (§3.2.2).
    fn version_register(&self) -> u32 {
        let max_entry = self.pins.len().saturating_sub(1) as u32 & 0xFF;
        (max_entry << VERSION_MAX_ENTRY_SHIFT) | u32::from(self.config.version)
    }

    fn write_indirect(&mut self, value: u32, out: &mut dyn FnMut(InterruptMessage) -> usize) {
        match self.ioregsel {
            REG_ID => self.id = ((value >> ID_SHIFT) as u8) & ID_MASK,
            REG_VERSION | REG_ARBITRATION => {} // read-only
            index => {
                if let Some((pin, high)) = self.redirection_slot(index) {
                    self.write_entry_dword(pin, high, value, out);
                }
            }
        }
    }

    /// Maps an indirect register index to (pin, is-high-dword), `None` when out of the table.
    fn redirection_slot(&self, index: u8) -> Option<(usize, bool)> {
        let offset = usize::from(index.checked_sub(REG_REDIRECTION_BASE)?);
        let pin = offset / 2;
        (pin < self.pins.len()).then_some((pin, offset % 2 == 1))
    }

    fn writable_mask(&self) -> u64 {
        RTE_WRITABLE
    }

    /// Writes one half of an entry, keeping read-only and reserved bits, then re-evaluates the
    /// pin (82093AA §3.2.4).
    fn write_entry_dword(
        &mut self,
        index: usize,
        high: bool,
        value: u32,
        out: &mut dyn FnMut(InterruptMessage) -> usize,
    ) {
        let writable = self.writable_mask();
        let Some(pin) = self.pins.get_mut(index) else {
            return;
        };
        let was_asserted = pin.asserted();
        let (half_mask, shifted) = if high {
            (0xFFFF_FFFF_0000_0000, u64::from(value) << 32)
        } else {
            (0x0000_0000_FFFF_FFFF, u64::from(value))
        };
        let changeable = half_mask & writable;
        pin.entry.0 = (pin.entry.0 & !changeable) | (shifted & changeable);
        // Linux relies on an edge-triggered entry dropping remote IRR (KVM ioapic.c does this),
        // which is how it clears a stuck one on IOAPICs without an EOI register.
        if !pin.entry.trigger_bit_level() {
            pin.entry.0 &= !RTE_REMOTE_IRR;
        }
        self.evaluate_pin(index, was_asserted, out);
    }

    // ---- Lines and EOI ----

    /// Sets the raw wire level of `pin` (before the polarity bit). Out-of-range pins are
    /// ignored. Delivers per the entry's trigger mode (see the module documentation).
    pub fn set_line(
        &mut self,
        pin: usize,
        level: bool,
        out: &mut dyn FnMut(InterruptMessage) -> usize,
    ) {
        let Some(p) = self.pins.get_mut(pin) else {
            return;
        };
        let was_asserted = p.asserted();
        p.wire_high = level;
        self.evaluate_pin(pin, was_asserted, out);
    }

    /// An EOI for `vector`, from a local APIC's EOI broadcast or the EOI register: clears
    /// remote IRR of every entry with that vector and re-delivers those whose level line is
    /// still asserted and unmasked (82093AA §3.2.4, remote IRR; SDM vol. 3 §11.8.5).
    pub fn end_of_interrupt(
        &mut self,
        vector: Vector,
        out: &mut dyn FnMut(InterruptMessage) -> usize,
    ) {
        for index in 0..self.pins.len() {
            let pin = &mut self.pins[index];
            if pin.entry.vector() != vector {
                continue;
            }
            pin.entry.0 &= !RTE_REMOTE_IRR;
            let asserted = pin.asserted();
            if pin.entry.awaits_eoi() && asserted {
                self.deliver(index, out);
            }
        }
    }

    /// The message `pin` would send now, `None` when it is masked, its delivery mode is
    /// reserved, or the pin does not exist. For VMMs that turn the redirection table into KVM
    /// MSI routes (split irqchip).
    pub fn pin_message(&self, pin: usize) -> Option<InterruptMessage> {
        if self.pins.get(pin)?.entry.masked() {
            return None;
        }
        self.entry_message(pin)
    }

    /// The message `pin`'s redirection entry describes, whether masked or not; `None` when its
    /// delivery mode is reserved or the pin does not exist.
    pub fn entry_message(&self, pin: usize) -> Option<InterruptMessage> {
        let entry = self.pins.get(pin)?.entry;
        let delivery_mode = entry.sendable_mode()?;
        Some(InterruptMessage {
            vector: entry.vector(),
            delivery_mode,
            destination_mode: entry.destination_mode(),
            trigger: if entry.level_sensitive() {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level_assert: true,
            shorthand: Shorthand::None,
            destination: entry.destination(self.extended_destination_id),
            format: DestinationFormat::Xapic,
            source: MessageSource::Device,
            redirection_hint: false,
        })
    }

    /// Applies the delivery rule after anything that may have changed a pin's input or entry.
    /// `was_asserted` is the pin's asserted state before the change.
    fn evaluate_pin(
        &mut self,
        index: usize,
        was_asserted: bool,
        out: &mut dyn FnMut(InterruptMessage) -> usize,
    ) {
        let Some(pin) = self.pins.get(index) else {
            return;
        };
        let asserted = pin.asserted();
        let entry = pin.entry;
        let deliver = if entry.awaits_eoi() {
            asserted && !entry.remote_irr()
        } else {
            asserted && !was_asserted
        };
        if deliver {
            self.deliver(index, out);
        }
    }

    /// Sends the entry's message if it is unmasked and sendable. A level-sensitive entry whose
    /// message a local APIC accepted then waits for its EOI (remote IRR set). 82093AA §3.2.4
    /// sets remote IRR "when local APIC(s) accept the level interrupt", and KVM's IOAPIC only
    /// when the delivery reached one (`ioapic_service`): a message nobody accepts (no such
    /// destination, every one software-disabled) leaves it clear, so the still-asserted line is
    /// sent again at the entry's next write or an EOI of its vector rather than staying
    /// blocked by an EOI that cannot come.
    fn deliver(&mut self, index: usize, out: &mut dyn FnMut(InterruptMessage) -> usize) {
        let Some(message) = self.pin_message(index) else {
            return;
        };
        let accepted = out(message) > 0;
        if let Some(pin) = self.pins.get_mut(index) {
            if accepted && pin.entry.awaits_eoi() {
                pin.entry.0 |= RTE_REMOTE_IRR;
            }
        }
    }
}

/// The register address a byte lane of an access lands on (low 8 bits decoded).
fn decode(offset: u64, lane: usize) -> u8 {
    (offset.wrapping_add(lane as u64) & MMIO_DECODE_MASK) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Messages = Vec<InterruptMessage>;

    /// The bus's side of a delivery: collects each message into `got`, one local APIC accepting.
    fn accept(got: &mut Messages) -> impl FnMut(InterruptMessage) -> usize + '_ {
        move |m| {
            got.push(m);
            1
        }
    }

    fn ioapic() -> IoApic {
        IoApic::new(IoApicConfig::default())
    }

    fn select(io: &mut IoApic, index: u8) {
        io.mmio_write(
            u64::from(IOREGSEL_OFFSET),
            &u32::from(index).to_le_bytes(),
            &mut |_| panic!("an IOREGSEL write delivers nothing"),
        );
    }

    fn write_reg(io: &mut IoApic, index: u8, value: u32) -> Messages {
        select(io, index);
        let mut got = Vec::new();
        io.mmio_write(
            u64::from(IOWIN_OFFSET),
            &value.to_le_bytes(),
            &mut accept(&mut got),
        );
        got
    }

    fn read_reg(io: &mut IoApic, index: u8) -> u32 {
        select(io, index);
        let mut data = [0u8; 4];
        io.mmio_read(u64::from(IOWIN_OFFSET), &mut data);
        u32::from_le_bytes(data)
    }

    fn low_index(pin: usize) -> u8 {
        REG_REDIRECTION_BASE + 2 * pin as u8
    }

    /// Writes an entry the way Linux does: high dword first, then the low dword.
    fn write_entry(io: &mut IoApic, pin: usize, entry: u64) -> Messages {
        let mut got = write_reg(io, low_index(pin) + 1, (entry >> 32) as u32);
        got.extend(write_reg(io, low_index(pin), entry as u32));
        got
    }

    fn read_entry(io: &mut IoApic, pin: usize) -> u64 {
        let low = read_reg(io, low_index(pin));
        let high = read_reg(io, low_index(pin) + 1);
        (u64::from(high) << 32) | u64::from(low)
    }

    fn set_line(io: &mut IoApic, pin: usize, level: bool) -> Messages {
        let mut got = Vec::new();
        io.set_line(pin, level, &mut accept(&mut got));
        got
    }

    fn eoi(io: &mut IoApic, vector: Vector) -> Messages {
        let mut got = Vec::new();
        io.end_of_interrupt(vector, &mut accept(&mut got));
        got
    }

    fn eoi_register(io: &mut IoApic, vector: Vector) -> Messages {
        let mut got = Vec::new();
        io.mmio_write(
            u64::from(EOI_OFFSET),
            &u32::from(vector).to_le_bytes(),
            &mut accept(&mut got),
        );
        got
    }

    /// A fixed, physical, active-high, unmasked entry to APIC ID `dest`.
    fn rte(vector: Vector, level: bool, dest: u8) -> u64 {
        let trigger = if level { RTE_TRIGGER_LEVEL } else { 0 };
        u64::from(vector) | trigger | (u64::from(dest) << RTE_DEST_SHIFT)
    }

    fn with_mode(entry: u64, mode: u64) -> u64 {
        (entry & !RTE_DELIVERY_MODE_MASK) | (mode << RTE_DELIVERY_MODE_SHIFT)
    }

    fn level_pin(io: &mut IoApic, pin: usize, vector: Vector) {
        assert!(write_entry(io, pin, rte(vector, true, 0)).is_empty());
    }

    fn edge_pin(io: &mut IoApic, pin: usize, vector: Vector) {
        assert!(write_entry(io, pin, rte(vector, false, 0)).is_empty());
    }

    // ---- Registers (82093AA §3.1, §3.2) ----

    #[test]
    fn ioregsel_is_an_8bit_read_write_register_datasheet_3_1_1() {
        let mut io = ioapic();
        io.mmio_write(0x00, &0xDEAD_BE12u32.to_le_bytes(), &mut |_| unreachable!());
        let mut data = [0xAAu8; 4];
        io.mmio_read(0x00, &mut data);
        assert_eq!(
            u32::from_le_bytes(data),
            0x12,
            "bits 31:8 are reserved, read 0"
        );
        assert_eq!(io.ioregsel(), 0x12);
        io.mmio_write(0x00, &[0x01], &mut |_| unreachable!());
        assert_eq!(io.ioregsel(), 0x01, "a byte write reaches IOREGSEL");
    }

    #[test]
    fn version_register_reports_version_and_max_entry_datasheet_3_2_2() {
        let mut io = ioapic();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020);
        assert!(write_reg(&mut io, REG_VERSION, 0xFFFF_FFFF).is_empty());
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0020, "read-only");
        let mut old = IoApic::new(IoApicConfig {
            pins: 4,
            id: 0,
            version: VERSION_82093AA,
        });
        assert_eq!(read_reg(&mut old, REG_VERSION), 0x0003_0011);
        let mut big = IoApic::new(IoApicConfig {
            pins: MAX_PINS,
            ..IoApicConfig::default()
        });
        assert_eq!(read_reg(&mut big, REG_VERSION), 0x0077_0020);
    }

    #[test]
    fn id_register_only_bits_27_24_writable_datasheet_3_2_1() {
        let mut io = IoApic::new(IoApicConfig {
            id: 5,
            ..IoApicConfig::default()
        });
        assert_eq!(read_reg(&mut io, REG_ID), 0x0500_0000);
        write_reg(&mut io, REG_ID, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0F00_0000);
        assert_eq!(io.id(), 0xF);
        write_reg(&mut io, REG_ID, 0x0300_0000);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0300_0000);
    }

    #[test]
    fn arbitration_register_is_read_only_and_follows_id_datasheet_3_2_3() {
        let mut io = ioapic();
        write_reg(&mut io, REG_ID, 0x0900_0000);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0900_0000);
        write_reg(&mut io, REG_ARBITRATION, 0x0100_0000);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0900_0000);
        assert_eq!(
            read_reg(&mut io, REG_ID),
            0x0900_0000,
            "ARB write leaves ID alone"
        );
    }

    #[test]
    fn reset_entries_are_masked_with_other_bits_zero_datasheet_3_2_4() {
        let mut io = ioapic();
        for pin in 0..io.pins() {
            assert_eq!(read_entry(&mut io, pin), RTE_MASKED);
        }
        write_entry(&mut io, 3, rte(0x40, true, 1));
        write_reg(&mut io, REG_ID, 0x0200_0000);
        set_line(&mut io, 3, true);
        io.reset();
        assert_eq!(io.ioregsel(), 0);
        assert_eq!(io.id(), 0);
        assert_eq!(read_entry(&mut io, 3), RTE_MASKED);
        assert_eq!(io.line(3), Some(true), "wires are outside the chip");
    }

    #[test]
    fn redirection_entry_writable_fields_round_trip_datasheet_3_2_4() {
        let mut io = ioapic();
        // Every bit but 12 (delivery status) and 14 (remote IRR) reads back, reserved ones
        // included, as in KVM (kernel mode on this host: 0xFFFFAFFF and 0xFFFFFFFF).
        write_reg(&mut io, low_index(2), 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, low_index(2)), 0xFFFF_AFFF);
        write_reg(&mut io, low_index(2) + 1, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, low_index(2) + 1), 0xFFFF_FFFF);
        // Each field on its own.
        for (bits, field) in [
            (0xABu64, "vector"),
            (5 << RTE_DELIVERY_MODE_SHIFT, "delivery mode"),
            (RTE_DEST_MODE_LOGICAL, "destination mode"),
            (RTE_POLARITY_ACTIVE_LOW, "polarity"),
            (RTE_TRIGGER_LEVEL | RTE_MASKED, "trigger mode"),
            (RTE_MASKED, "mask"),
            (0x5Au64 << RTE_DEST_SHIFT | RTE_MASKED, "destination"),
        ] {
            write_entry(&mut io, 7, bits);
            assert_eq!(read_entry(&mut io, 7), bits, "{field}");
        }
        let entry = io.entry(7).unwrap();
        assert_eq!(entry.destination(false), 0x5A);
        assert!(entry.masked());
    }

    #[test]
    fn extended_destination_id_bits_55_49_behind_flag_linux_virt_destid() {
        let mut io = ioapic().with_extended_destination_id(true);
        write_reg(&mut io, low_index(0) + 1, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, low_index(0) + 1), 0xFFFF_FFFF);
        // APIC ID 0x1234: bits 7:0 in 63:56, bits 14:8 in 55:49.
        let entry = rte(0x30, false, 0x34) | (0x12u64 << RTE_EXT_DEST_SHIFT);
        write_entry(&mut io, 0, entry);
        let got = set_line(&mut io, 0, true);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].destination, 0x1234);
        assert_eq!(got[0].format, DestinationFormat::Xapic);
        // Without the flag the same bits are stored (read back) but do not route.
        let mut plain = ioapic();
        write_entry(&mut plain, 0, entry);
        assert_eq!(read_entry(&mut plain, 0), entry);
        assert_eq!(set_line(&mut plain, 0, true)[0].destination, 0x34);
    }

    #[test]
    fn remote_irr_and_delivery_status_are_read_only_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 1, 0x41);
        assert_eq!(set_line(&mut io, 1, true).len(), 1);
        assert!(io.entry(1).unwrap().remote_irr());
        // Rewrite the low dword with remote IRR 0 and delivery status 1.
        let low = (rte(0x41, true, 0) | RTE_DELIVERY_STATUS) as u32;
        assert!(write_reg(&mut io, low_index(1), low).is_empty());
        let entry = read_entry(&mut io, 1);
        assert_ne!(entry & RTE_REMOTE_IRR, 0, "remote IRR kept");
        assert_eq!(
            entry & RTE_DELIVERY_STATUS,
            0,
            "delivery status kept (idle)"
        );
        // And remote IRR cannot be set by a write either.
        level_pin(&mut io, 2, 0x42);
        write_reg(
            &mut io,
            low_index(2),
            (rte(0x42, true, 0) | RTE_REMOTE_IRR) as u32,
        );
        assert!(!io.entry(2).unwrap().remote_irr());
    }

    #[test]
    fn undefined_indirect_registers_read_all_ones_and_ignore_writes_as_kvm() {
        let mut io = IoApic::new(IoApicConfig {
            pins: 4,
            ..IoApicConfig::default()
        });
        let before = io.clone();
        for index in (0x03..REG_REDIRECTION_BASE).chain(low_index(4)..=0xFF) {
            assert!(write_reg(&mut io, index, 0xFFFF_FFFF).is_empty());
            assert_eq!(read_reg(&mut io, index), 0xFFFF_FFFF, "index {index:#x}");
        }
        // Only IOREGSEL changed.
        io.ioregsel = before.ioregsel;
        assert_eq!(io, before);
        // The last entry is in range.
        write_reg(&mut io, low_index(3) + 1, 0x0700_0000);
        assert_eq!(read_reg(&mut io, low_index(3) + 1), 0x0700_0000);
    }

    #[test]
    fn ioregsel_reaches_entry_119_at_index_0xff_datasheet_3_1_1() {
        let mut io = IoApic::new(IoApicConfig {
            pins: MAX_PINS,
            ..IoApicConfig::default()
        });
        write_reg(&mut io, 0xFF, 0x0800_0000);
        assert_eq!(io.entry(119).unwrap().destination(false), 0x08);
        assert_eq!(read_reg(&mut io, 0xFE), RTE_MASKED as u32);
    }

    // ---- MMIO access rules (module documentation) ----

    #[test]
    fn byte_and_word_iowin_writes_are_zero_extended_as_kvm() {
        // Kernel mode on this host: a byte write of 0x55 to a masked low dword reads 0x55, a
        // word write of 0x1234 reads 0x0234 (bit 12 is read-only).
        let mut io = ioapic();
        select(&mut io, low_index(0));
        io.mmio_write(0x10, &[0x55], &mut |_| 1);
        assert_eq!(read_entry(&mut io, 0), 0x55);
        select(&mut io, low_index(0));
        io.mmio_write(0x10, &0x1234u16.to_le_bytes(), &mut |_| 1);
        assert_eq!(read_entry(&mut io, 0), 0x0234);
        // Writes that start past 0x10 are ignored.
        write_entry(&mut io, 0, RTE_MASKED);
        select(&mut io, low_index(0));
        for (offset, len) in [(0x12u64, 2usize), (0x11, 3), (0x13, 4), (0x0C, 8)] {
            io.mmio_write(offset, &vec![0u8; len], &mut |_| unreachable!());
            assert_eq!(read_entry(&mut io, 0), RTE_MASKED, "{offset:#x}/{len}");
        }
    }

    #[test]
    fn accesses_decode_by_their_first_byte_as_kvm() {
        let mut io = ioapic();
        select(&mut io, low_index(0) + 1);
        io.mmio_write(0x10, &0xFFFF_FFFF_0300_0000u64.to_le_bytes(), &mut |_| 1);
        assert_eq!(read_reg(&mut io, low_index(0) + 1), 0x0300_0000);
        // A dword write at 0x00 sets IOREGSEL from its low byte.
        io.mmio_write(0x00, &0x1234_5678u32.to_le_bytes(), &mut |_| 1);
        assert_eq!(io.ioregsel(), 0x78);
        select(&mut io, low_index(0) + 1);
        // Byte and word reads at 0x10 truncate the register; at 0x13 they read 0.
        let mut word = [0u8; 2];
        io.mmio_read(0x12, &mut word);
        assert_eq!(word, [0, 0]);
        let mut byte = [0xFFu8; 1];
        io.mmio_read(0x13, &mut byte);
        assert_eq!(byte[0], 0);
        let mut qword = [0xFFu8; 8];
        io.mmio_read(0x10, &mut qword);
        assert_eq!(u64::from_le_bytes(qword), 0x0300_0000);
        let mut reserved = [0xFFu8; 4];
        for offset in [0x04u64, 0x20, 0x40, 0x80, 0xFC] {
            io.mmio_read(offset, &mut reserved);
            assert_eq!(reserved, [0; 4], "{offset:#x}");
        }
    }

    #[test]
    fn registers_repeat_every_256_bytes_datasheet_3_1() {
        let mut io = ioapic();
        io.mmio_write(0x300, &[REG_VERSION], &mut |_| 1);
        let mut data = [0u8; 4];
        io.mmio_read(0xF10, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0017_0020);
        // Offsets near u64::MAX wrap without overflow.
        io.mmio_read(u64::MAX - 1, &mut data);
        io.mmio_write(u64::MAX, &[1, 2, 3, 4, 5, 6, 7, 8], &mut |_| 1);
    }

    // ---- Edge-triggered pins (82093AA §3.2.4, trigger mode and mask) ----

    #[test]
    fn edge_pin_delivers_once_per_rising_edge_datasheet_3_2_4() {
        let mut io = ioapic();
        edge_pin(&mut io, 4, 0x34);
        let got = set_line(&mut io, 4, true);
        assert_eq!(got, vec![InterruptMessage::fixed(0x34, 0)]);
        assert!(
            set_line(&mut io, 4, true).is_empty(),
            "no edge while held high"
        );
        assert!(set_line(&mut io, 4, false).is_empty(), "falling edge");
        assert_eq!(set_line(&mut io, 4, true).len(), 1);
        assert!(
            !io.entry(4).unwrap().remote_irr(),
            "edge never sets remote IRR"
        );
        assert!(eoi(&mut io, 0x34).is_empty(), "EOI does not re-send edges");
    }

    #[test]
    fn edge_on_masked_pin_is_lost_not_latched_datasheet_3_2_4_mask() {
        let mut io = ioapic();
        write_entry(&mut io, 4, rte(0x34, false, 0) | RTE_MASKED);
        assert!(set_line(&mut io, 4, true).is_empty());
        assert!(
            write_entry(&mut io, 4, rte(0x34, false, 0)).is_empty(),
            "unmask: lost"
        );
        assert!(set_line(&mut io, 4, false).is_empty());
        assert_eq!(set_line(&mut io, 4, true).len(), 1, "next edge delivers");
    }

    // ---- Level-triggered pins (82093AA §3.2.4, remote IRR) ----

    #[test]
    fn level_pin_delivers_and_sets_remote_irr_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        let got = set_line(&mut io, 9, true);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].trigger, TriggerMode::Level);
        assert_eq!(got[0].vector, 0x59);
        assert_ne!(read_entry(&mut io, 9) & RTE_REMOTE_IRR, 0);
        assert!(set_line(&mut io, 9, true).is_empty(), "remote IRR blocks");
    }

    /// Counts the messages in `sent`; no local APIC accepts them.
    fn refuse(sent: &mut usize) -> impl FnMut(InterruptMessage) -> usize + '_ {
        move |_| {
            *sent += 1;
            0
        }
    }

    #[test]
    fn level_message_nobody_accepts_leaves_remote_irr_clear_datasheet_3_2_4() {
        // 82093AA §3.2.4: remote IRR is set when local APIC(s) accept the level interrupt.
        // KVM alike (kernel mode on this host: a level entry to absent APIC ID 0x55 reads
        // 0x8061 after the line rose, no remote IRR).
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        let mut sent = 0;
        io.set_line(9, true, &mut refuse(&mut sent));
        assert_eq!(sent, 1);
        assert!(!io.entry(9).unwrap().remote_irr());
        // Nothing blocks the held line: an EOI of its vector sends it again (still refused),
        // and so does the next write of its entry, which a local APIC now takes.
        io.end_of_interrupt(0x59, &mut refuse(&mut sent));
        assert_eq!(sent, 2);
        assert!(!io.entry(9).unwrap().remote_irr());
        let got = write_reg(&mut io, low_index(9) + 1, 0);
        assert_eq!(got.len(), 1, "retargeting the entry delivers the held line");
        assert!(io.entry(9).unwrap().remote_irr());
        // Accepted now: the pin waits for the EOI again.
        assert!(write_reg(&mut io, low_index(9) + 1, 0).is_empty());
    }

    #[test]
    fn edge_message_nobody_accepts_is_lost_datasheet_3_2_4() {
        let mut io = ioapic();
        write_entry(&mut io, 4, rte(0x34, false, 0x55));
        let mut sent = 0;
        io.set_line(4, true, &mut refuse(&mut sent));
        assert_eq!(sent, 1);
        assert!(!io.entry(4).unwrap().remote_irr());
        assert!(
            write_entry(&mut io, 4, rte(0x34, false, 0)).is_empty(),
            "not latched"
        );
    }

    #[test]
    fn eoi_clears_remote_irr_and_redelivers_while_asserted_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        for _ in 0..3 {
            let got = eoi(&mut io, 0x59);
            assert_eq!(got.len(), 1, "once per EOI while held high");
            assert!(io.entry(9).unwrap().remote_irr());
        }
        assert!(eoi(&mut io, 0x58).is_empty(), "other vector");
    }

    #[test]
    fn eoi_after_deassert_clears_remote_irr_without_delivery_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        assert!(set_line(&mut io, 9, false).is_empty());
        assert!(eoi(&mut io, 0x59).is_empty());
        assert!(!io.entry(9).unwrap().remote_irr());
        assert_eq!(
            set_line(&mut io, 9, true).len(),
            1,
            "next assertion delivers"
        );
    }

    /// kvm-unit-tests' ioapic "Reconfigure self": the handler lowers the line and moves the entry to
    /// another APIC (the high dword alone) before its EOI. The EOI names the vector, not the
    /// destination, so Remote IRR clears (82093AA §3.2.4; KVM's `__kvm_ioapic_update_eoi` matches
    /// entries by vector too) and nothing is sent.
    #[test]
    fn eoi_clears_remote_irr_after_the_entry_moved_to_another_apic_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        assert_eq!(set_line(&mut io, 9, true).len(), 1);
        assert!(set_line(&mut io, 9, false).is_empty());
        assert!(write_reg(&mut io, low_index(9) + 1, 1 << 24).is_empty());
        let entry = io.entry(9).unwrap();
        assert!(entry.remote_irr(), "a destination write keeps Remote IRR");
        assert_eq!(read_entry(&mut io, 9) >> 56, 1);
        assert!(eoi(&mut io, 0x59).is_empty(), "the line is low");
        assert!(!io.entry(9).unwrap().remote_irr());
    }

    /// kvm-unit-tests' ioapic "coalesce simultaneous level interrupts": a level line that drops,
    /// rises and drops again while Remote IRR is set is sampled, not latched, so the EOI with the
    /// line low sends nothing (82093AA §3.2.4).
    #[test]
    fn pulse_while_remote_irr_set_is_gone_at_the_eoi_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        assert_eq!(set_line(&mut io, 9, true).len(), 1);
        for level in [false, true, false] {
            assert!(set_line(&mut io, 9, level).is_empty(), "held by Remote IRR");
        }
        assert!(eoi(&mut io, 0x59).is_empty());
        assert!(!io.entry(9).unwrap().remote_irr());
    }

    #[test]
    fn reassert_before_eoi_waits_for_eoi_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        set_line(&mut io, 9, false);
        assert!(set_line(&mut io, 9, true).is_empty());
        assert_eq!(eoi(&mut io, 0x59).len(), 1);
    }

    #[test]
    fn masked_level_pin_is_not_delivered_at_eoi_datasheet_3_2_4_mask() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        write_reg(
            &mut io,
            low_index(9),
            (rte(0x59, true, 0) | RTE_MASKED) as u32,
        );
        assert!(eoi(&mut io, 0x59).is_empty());
        assert!(!io.entry(9).unwrap().remote_irr());
    }

    #[test]
    fn unmasking_asserted_level_pin_delivers_datasheet_3_2_4_mask() {
        let mut io = ioapic();
        write_entry(&mut io, 9, rte(0x59, true, 0) | RTE_MASKED);
        assert!(set_line(&mut io, 9, true).is_empty());
        let got = write_reg(&mut io, low_index(9), rte(0x59, true, 0) as u32);
        assert_eq!(got.len(), 1);
        assert!(io.entry(9).unwrap().remote_irr());
        // Re-writing the same unmasked entry does not deliver again.
        assert!(write_reg(&mut io, low_index(9), rte(0x59, true, 0) as u32).is_empty());
    }

    #[test]
    fn switching_level_to_edge_clears_remote_irr_kvm_ioapic() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        assert!(write_reg(&mut io, low_index(9), rte(0x59, false, 0) as u32).is_empty());
        assert!(!io.entry(9).unwrap().remote_irr());
        // Back to level with the line still asserted: Linux's EOI emulation re-delivers.
        assert_eq!(
            write_reg(&mut io, low_index(9), rte(0x59, true, 0) as u32).len(),
            1
        );
    }

    #[test]
    fn eoi_serves_every_level_entry_with_the_vector_datasheet_3_2_4() {
        let mut io = ioapic();
        level_pin(&mut io, 16, 0x60);
        level_pin(&mut io, 17, 0x60);
        edge_pin(&mut io, 18, 0x60);
        set_line(&mut io, 16, true);
        set_line(&mut io, 17, true);
        assert_eq!(set_line(&mut io, 18, true).len(), 1);
        assert_eq!(
            eoi(&mut io, 0x60).len(),
            2,
            "both level pins, not the edge pin"
        );
    }

    #[test]
    fn eoi_register_acts_as_eoi_on_version_0x20() {
        let mut io = ioapic();
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        set_line(&mut io, 9, false);
        assert!(eoi_register(&mut io, 0x59).is_empty());
        assert!(!io.entry(9).unwrap().remote_irr());
        set_line(&mut io, 9, true);
        assert_eq!(
            eoi_register(&mut io, 0x59).len(),
            1,
            "re-delivery while high"
        );
        let mut byte = Vec::new();
        io.mmio_write(0x40, &[0x59], &mut accept(&mut byte));
        assert_eq!(byte.len(), 1, "a byte write carries the vector");
    }

    #[test]
    fn no_eoi_register_on_version_0x11() {
        let mut io = IoApic::new(IoApicConfig {
            version: VERSION_82093AA,
            ..IoApicConfig::default()
        });
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        set_line(&mut io, 9, false);
        assert!(eoi_register(&mut io, 0x59).is_empty());
        assert!(
            io.entry(9).unwrap().remote_irr(),
            "0x40 is reserved on the 82093AA"
        );
        assert!(eoi(&mut io, 0x59).is_empty());
        assert!(
            !io.entry(9).unwrap().remote_irr(),
            "EOI messages still work"
        );
    }

    // ---- Polarity (82093AA §3.2.4, INTPOL) ----

    #[test]
    fn active_low_pin_asserts_on_low_wire_datasheet_3_2_4_intpol() {
        let mut io = ioapic();
        // A PCI line: idle high, active low, level.
        assert!(set_line(&mut io, 16, true).is_empty(), "masked at reset");
        write_entry(&mut io, 16, rte(0x70, true, 0) | RTE_POLARITY_ACTIVE_LOW);
        assert!(!io.is_asserted(16));
        assert_eq!(
            set_line(&mut io, 16, false).len(),
            1,
            "device pulls the line low"
        );
        assert!(set_line(&mut io, 16, true).is_empty());
        assert!(eoi(&mut io, 0x70).is_empty());
        // An active-low edge pin triggers on the falling wire.
        edge_pin(&mut io, 3, 0x23);
        write_reg(
            &mut io,
            low_index(3),
            (rte(0x23, false, 0) | RTE_MASKED) as u32,
        );
        set_line(&mut io, 3, true);
        write_reg(
            &mut io,
            low_index(3),
            (rte(0x23, false, 0) | RTE_POLARITY_ACTIVE_LOW) as u32,
        );
        assert_eq!(set_line(&mut io, 3, false).len(), 1);
        assert!(set_line(&mut io, 3, true).is_empty());
    }

    #[test]
    fn polarity_flip_on_static_wire_is_an_edge_datasheet_3_2_4_intpol() {
        let mut io = ioapic();
        edge_pin(&mut io, 3, 0x23);
        // Wire low, active-high: not asserted. Flip to active-low: the detector sees a rise.
        let got = write_reg(
            &mut io,
            low_index(3),
            (rte(0x23, false, 0) | RTE_POLARITY_ACTIVE_LOW) as u32,
        );
        assert_eq!(got.len(), 1);
    }

    // ---- Delivery modes (82093AA §3.2.4, delivery mode) ----

    #[test]
    fn every_sendable_delivery_mode_passes_through_datasheet_3_2_4() {
        for mode in [
            DeliveryMode::Fixed,
            DeliveryMode::LowestPriority,
            DeliveryMode::Smi,
            DeliveryMode::Nmi,
            DeliveryMode::Init,
            DeliveryMode::ExtInt,
        ] {
            let mut io = ioapic();
            let entry =
                with_mode(rte(0x31, false, 2), u64::from(mode.bits())) | RTE_DEST_MODE_LOGICAL;
            write_entry(&mut io, 0, entry);
            let got = set_line(&mut io, 0, true);
            let expected = InterruptMessage {
                vector: 0x31,
                delivery_mode: mode,
                destination_mode: DestinationMode::Logical,
                trigger: TriggerMode::Edge,
                level_assert: true,
                shorthand: Shorthand::None,
                destination: 2,
                format: DestinationFormat::Xapic,
                source: MessageSource::Device,
                redirection_hint: false,
            };
            assert_eq!(got, vec![expected], "{mode:?}");
            assert_eq!(io.pin_message(0), Some(expected));
        }
    }

    #[test]
    fn reserved_and_startup_delivery_modes_send_nothing_datasheet_3_2_4() {
        for mode in [3u64, 6] {
            let mut io = ioapic();
            write_entry(&mut io, 0, with_mode(rte(0x31, true, 0), mode));
            assert!(set_line(&mut io, 0, true).is_empty(), "mode {mode}");
            assert!(!io.entry(0).unwrap().remote_irr());
            assert_eq!(io.pin_message(0), None);
            assert!(eoi(&mut io, 0x31).is_empty());
        }
    }

    #[test]
    fn nmi_init_smi_extint_programmed_level_set_remote_irr_as_kvm() {
        // 82093AA §3.2.4 would treat them as edge; KVM's IOAPIC sets remote IRR and blocks the
        // pin until an EOI for the entry's vector field (kernel mode on this host: an NMI
        // entry programmed level reads 0xC402 after one assertion).
        for mode in [
            DeliveryMode::Nmi,
            DeliveryMode::Init,
            DeliveryMode::Smi,
            DeliveryMode::ExtInt,
        ] {
            let mut io = ioapic();
            write_entry(
                &mut io,
                0,
                with_mode(rte(0x02, true, 0), u64::from(mode.bits())),
            );
            let got = set_line(&mut io, 0, true);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].trigger, TriggerMode::Edge, "{mode:?}");
            assert!(io.entry(0).unwrap().remote_irr(), "{mode:?}");
            set_line(&mut io, 0, false);
            assert!(
                set_line(&mut io, 0, true).is_empty(),
                "blocked by remote IRR"
            );
            assert_eq!(eoi(&mut io, 0x02).len(), 1, "EOI of the vector field");
            // Switching the entry to edge clears remote IRR.
            write_entry(
                &mut io,
                0,
                with_mode(rte(0x02, false, 0), u64::from(mode.bits())),
            );
            assert!(!io.entry(0).unwrap().remote_irr());
        }
    }

    #[test]
    fn lowest_priority_level_message_fields_datasheet_3_2_4() {
        let mut io = ioapic();
        let entry = with_mode(rte(0x99, true, 0x0F), 1) | RTE_DEST_MODE_LOGICAL;
        write_entry(&mut io, 5, entry);
        let got = set_line(&mut io, 5, true);
        assert_eq!(got[0].delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(got[0].destination_mode, DestinationMode::Logical);
        assert_eq!(got[0].trigger, TriggerMode::Level);
        assert_eq!(got[0].destination, 0x0F);
        assert_eq!(got[0].source, MessageSource::Device);
    }

    // ---- pin_message, configuration, bounds, snapshot ----

    #[test]
    fn pin_message_is_none_when_masked_or_out_of_range() {
        let mut io = ioapic();
        assert_eq!(io.pin_message(0), None, "masked at reset");
        assert_eq!(io.pin_message(24), None);
        assert_eq!(io.pin_message(usize::MAX), None);
        level_pin(&mut io, 0, 0x50);
        let msg = io.pin_message(0).unwrap();
        assert_eq!(set_line(&mut io, 0, true), vec![msg]);
    }

    /// Split irqchip routes are installed for masked entries too, so that unmasking needs no
    /// route change: `entry_message` ignores the mask bit (82093AA §3.2.4, bit 16).
    #[test]
    fn entry_message_ignores_the_mask_bit_only() {
        let mut io = ioapic();
        level_pin(&mut io, 0, 0x50);
        let unmasked = io.pin_message(0).unwrap();
        assert_eq!(io.entry_message(0), Some(unmasked));
        let low = io.entry(0).unwrap().0 as u32;
        write_reg(&mut io, 0x10, low | (1 << 16));
        assert_eq!(io.pin_message(0), None);
        assert_eq!(io.entry_message(0), Some(unmasked));
        assert_eq!(io.entry_message(24), None);
    }

    #[test]
    fn pin_count_and_id_are_validated() {
        for pins in [0, MAX_PINS + 1, usize::MAX] {
            let cfg = IoApicConfig {
                pins,
                ..IoApicConfig::default()
            };
            assert_eq!(
                IoApic::try_new(cfg).unwrap_err(),
                IoApicConfigError::PinCount(pins)
            );
        }
        assert_eq!(
            IoApic::new(IoApicConfig {
                pins: 0,
                ..IoApicConfig::default()
            })
            .pins(),
            1
        );
        assert_eq!(
            IoApic::new(IoApicConfig {
                pins: 100_000,
                ..IoApicConfig::default()
            })
            .pins(),
            MAX_PINS
        );
        let bad_id = IoApicConfig {
            id: 16,
            ..IoApicConfig::default()
        };
        assert_eq!(
            IoApic::try_new(bad_id).unwrap_err(),
            IoApicConfigError::Id(16)
        );
        assert_eq!(IoApic::new(bad_id).id(), 0);
        assert!(IoApic::try_new(IoApicConfig::default()).is_ok());
    }

    #[test]
    fn out_of_range_lines_are_ignored() {
        let mut io = ioapic();
        let before = io.clone();
        assert!(set_line(&mut io, 24, true).is_empty());
        assert!(set_line(&mut io, usize::MAX, true).is_empty());
        assert_eq!(io, before);
        assert_eq!(io.line(24), None);
        assert!(!io.is_asserted(24));
    }

    #[test]
    fn snapshot_round_trips_lines_and_remote_irr() {
        let mut io = ioapic().with_extended_destination_id(true);
        level_pin(&mut io, 9, 0x59);
        set_line(&mut io, 9, true);
        set_line(&mut io, 16, true);
        write_reg(&mut io, REG_ID, 0x0700_0000);
        let json = serde_json::to_string(&io).unwrap();
        let mut back: IoApic = serde_json::from_str(&json).unwrap();
        assert_eq!(back, io);
        assert!(back.entry(9).unwrap().remote_irr());
        assert_eq!(back.line(16), Some(true));
        assert_eq!(
            eoi(&mut back, 0x59).len(),
            1,
            "restored line still asserted"
        );
    }

    #[test]
    fn inconsistent_snapshots_are_rejected() {
        let io = ioapic();
        let mut value = serde_json::to_value(&io).unwrap();
        value["pins"].as_array_mut().unwrap().pop();
        assert!(serde_json::from_value::<IoApic>(value.clone()).is_err());
        value["config"]["pins"] = serde_json::json!(0);
        assert!(serde_json::from_value::<IoApic>(value).is_err());
        // Reserved bits and delivery status in a snapshot are scrubbed.
        let mut value = serde_json::to_value(&io).unwrap();
        value["pins"][0]["entry"] = serde_json::json!(u64::MAX);
        let back: IoApic = serde_json::from_value(value).unwrap();
        assert_eq!(back.entry(0).unwrap().0, RTE_WRITABLE | RTE_REMOTE_IRR);
    }

    // ---- Properties ----

    #[derive(Clone, Debug)]
    enum Op {
        Line(usize, bool),
        Mask(usize, bool),
        Trigger(usize, bool),
        Eoi(usize, bool),
    }

    const PROP_PINS: usize = 4;

    fn prop_vector(pin: usize) -> Vector {
        0x40 + pin as Vector
    }

    fn op() -> impl Strategy<Value = Op> {
        let pin = 0..PROP_PINS;
        prop_oneof![
            4 => (pin.clone(), any::<bool>()).prop_map(|(p, v)| Op::Line(p, v)),
            1 => (pin.clone(), any::<bool>()).prop_map(|(p, m)| Op::Mask(p, m)),
            1 => (pin.clone(), any::<bool>()).prop_map(|(p, l)| Op::Trigger(p, l)),
            2 => (pin, any::<bool>()).prop_map(|(p, r)| Op::Eoi(p, r)),
        ]
    }

    /// What the test knows about a pin, independently of the IOAPIC's own state.
    #[derive(Clone, Copy, Default)]
    struct Expect {
        asserted: bool,
        masked: bool,
        level: bool,
        /// A level delivery has gone out and no EOI (or switch to edge) has answered it.
        outstanding: bool,
    }

    fn program(io: &mut IoApic, pin: usize, e: &Expect) -> Messages {
        let mask = if e.masked { RTE_MASKED } else { 0 };
        write_reg(
            io,
            low_index(pin),
            (rte(prop_vector(pin), e.level, 0) | mask) as u32,
        )
    }

    proptest! {
        /// 82093AA §3.2.4: (a) every rising edge on an unmasked edge pin is delivered exactly
        /// once and nothing else delivers an edge pin; (b) a level pin is delivered only while
        /// asserted, never twice without an EOI (or a switch to edge) in between, and is
        /// delivered again at EOI iff still asserted and unmasked.
        #[test]
        fn deliveries_follow_edges_levels_and_eois(ops in proptest::collection::vec(op(), 1..120)) {
            let mut io = ioapic();
            let mut pins = [Expect { masked: true, ..Expect::default() }; PROP_PINS];
            for (pin, e) in pins.iter_mut().enumerate() {
                e.masked = false;
                program(&mut io, pin, e);
            }
            for op in ops {
                let (pin, got) = match op {
                    Op::Line(p, v) => (p, set_line(&mut io, p, v)),
                    Op::Mask(p, m) => {
                        pins[p].masked = m;
                        (p, program(&mut io, p, &pins[p]))
                    }
                    Op::Trigger(p, l) => {
                        pins[p].level = l;
                        (p, program(&mut io, p, &pins[p]))
                    }
                    Op::Eoi(p, via_register) if via_register => (p, eoi_register(&mut io, prop_vector(p))),
                    Op::Eoi(p, _) => (p, eoi(&mut io, prop_vector(p))),
                };
                for m in &got {
                    prop_assert_eq!(m.vector, prop_vector(pin), "only the touched pin delivers");
                }
                let e = &mut pins[pin];
                let expected = match op {
                    Op::Line(_, v) if !e.level => {
                        let rising = v && !e.asserted;
                        e.asserted = v;
                        usize::from(rising && !e.masked)
                    }
                    Op::Line(_, v) => {
                        e.asserted = v;
                        usize::from(v && !e.masked && !e.outstanding)
                    }
                    Op::Mask(..) | Op::Trigger(..) => {
                        if !e.level {
                            e.outstanding = false;
                        }
                        usize::from(e.level && e.asserted && !e.masked && !e.outstanding)
                    }
                    Op::Eoi(..) => {
                        e.outstanding = false;
                        usize::from(e.level && e.asserted && !e.masked)
                    }
                };
                prop_assert_eq!(got.len(), expected, "after {:?}", op);
                if expected == 1 {
                    prop_assert!(!e.level || e.asserted, "a level pin delivers only while asserted");
                    e.outstanding = e.level;
                    let trigger = if e.level { TriggerMode::Level } else { TriggerMode::Edge };
                    prop_assert_eq!(got[0].trigger, trigger);
                }
                prop_assert_eq!(io.entry(pin).unwrap().remote_irr(), e.outstanding);
            }
        }

        /// Hostile guest: any MMIO traffic, line changes and EOIs; no panic, at most one
        /// delivery per pin per call, delivery status always idle, and no asserted unmasked
        /// level entry is left waiting without remote IRR (datasheet §3.2.4).
        #[test]
        fn random_mmio_traffic_never_panics(
            pins in 1..=MAX_PINS,
            version in prop_oneof![Just(VERSION_82093AA), Just(VERSION_WITH_EOI_REGISTER), any::<u8>()],
            extended in any::<bool>(),
            ops in proptest::collection::vec(
                (0u8..5, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..10), any::<usize>()),
                1..200,
            ),
        ) {
            let mut io = IoApic::new(IoApicConfig { pins, id: 0, version })
                .with_extended_destination_id(extended);
            for (kind, raw, data, pin) in ops {
                let mut count = 0usize;
                let mut out = |_m: InterruptMessage| {
                    count += 1;
                    1
                };
                // Bias offsets to the live registers half of the time.
                let offset = if raw % 2 == 0 { raw % 0x48 } else { raw };
                match kind {
                    0 => io.mmio_write(offset, &data, &mut out),
                    1 => {
                        let mut buf = data.clone();
                        io.mmio_read(offset, &mut buf);
                    }
                    2 => io.set_line(pin % (pins + 2), raw % 3 == 0, &mut out),
                    3 => io.end_of_interrupt(raw as u8, &mut out),
                    _ => {
                        let _ = io.pin_message(pin);
                    }
                }
                prop_assert!(count <= pins);
                for p in 0..pins {
                    let entry = io.entry(p).unwrap();
                    prop_assert_eq!(entry.0 & RTE_DELIVERY_STATUS, 0);
                    let waiting = entry.awaits_eoi() && !entry.masked() && io.is_asserted(p)
                        && !entry.remote_irr() && entry.sendable_mode().is_some();
                    prop_assert!(!waiting, "pin {} asserted but not delivered", p);
                    prop_assert!(entry.trigger_bit_level() || !entry.remote_irr());
                }
            }
        }
    }
}
