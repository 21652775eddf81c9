//! The VM-wide devices alone: `ioapic_window`, `pic_ports`, `msi_decode` and `routing_updates`.
//! Each checks its device's guest-visible rules after every step and a serde round trip.

use std::collections::BTreeMap;

use irqchip::ioapic::{IoApic, IoApicConfig};
use irqchip::msi::{MsiAddressing, MsiMessage};
use irqchip::pic::DualPic;
use irqchip::routing::{GsiRouting, RouteTarget, SourceId, MAX_TARGETS_PER_GSI};
use irqchip::{DestinationMode, InterruptMessage, MessageSource, Shorthand, TriggerMode};
use serde::{de::DeserializeOwned, Serialize};

use super::input::Input;

const MAX_STEPS: usize = 5000;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let json = serde_json::to_string(value).expect("serializes");
    let back: T = serde_json::from_str(&json).expect("its own JSON deserializes");
    assert_eq!(&back, value, "JSON round trip");
}

// ---- IOAPIC ----

/// `ioapic_window`: IOREGSEL/IOWIN/EOI accesses of any offset and size, line changes and EOI
/// messages. Every message must be what an unmasked entry says; a level entry with remote IRR
/// set sends nothing on a line change, and a level delivery sets remote IRR exactly when a local
/// APIC accepted it (flag bit 6: nobody accepts; 82093AA §3.2.4); the selected register reads
/// back.
pub fn ioapic(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let config = IoApicConfig {
        pins: 1 + input.below(120),
        id: flags & 0xF,
        version: if flags & 16 == 0 { 0x20 } else { 0x11 },
    };
    let Ok(ioapic) = IoApic::try_new(config) else {
        return;
    };
    let mut ioapic = ioapic.with_extended_destination_id(flags & 32 != 0);
    let accepted = usize::from(flags & 64 == 0);
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let mut sent = Vec::new();
        match input.u8() % 5 {
            0 => {
                let offset = input.pick_or(&[0u64, 0x10, 0x40, 0x20, 0x14, 0x1000], Input::u64);
                let len = input.pick(&[4usize, 4, 4, 1, 2, 3, 8, 0]);
                let data = input.bytes(len).to_vec();
                ioapic.mmio_write(offset, &data, &mut |m| {
                    sent.push(m);
                    accepted
                });
                for message in &sent {
                    let from_entry =
                        (0..ioapic.pins()).any(|pin| ioapic.pin_message(pin) == Some(*message));
                    assert!(from_entry, "message {message:?} of no unmasked entry");
                }
            }
            1 => {
                let offset = input.pick_or(&[0u64, 0x10, 0x40, 0x44], |i| u64::from(i.u16()));
                let mut data = vec![0u8; input.below(9)];
                ioapic.mmio_read(offset, &mut data);
                if offset == 0 && data.len() == 4 {
                    assert_eq!(
                        u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                        u32::from(ioapic.ioregsel()),
                        "IOREGSEL reads back"
                    );
                }
            }
            2 | 3 => {
                let (pin, level) = (input.below(130), input.bool());
                let before = ioapic.entry(pin);
                ioapic.set_line(pin, level, &mut |m| {
                    sent.push(m);
                    accepted
                });
                assert!(sent.len() <= 1, "one line change, {} messages", sent.len());
                if let Some(message) = sent.first() {
                    assert_eq!(
                        Some(*message),
                        ioapic.pin_message(pin),
                        "message of pin {pin}"
                    );
                    let entry = before.expect("a message from an existing pin");
                    assert!(
                        !(entry.level_sensitive() && entry.remote_irr()),
                        "level pin {pin} re-sent with remote IRR set"
                    );
                    if entry.level_sensitive() {
                        assert_eq!(
                            ioapic.entry(pin).is_some_and(|e| e.remote_irr()),
                            accepted > 0,
                            "a level delivery sets remote IRR when accepted"
                        );
                    }
                }
            }
            _ => {
                let vector = input.u8();
                ioapic.end_of_interrupt(vector, &mut |m| {
                    sent.push(m);
                    accepted
                });
                for message in &sent {
                    assert_eq!(message.vector, vector, "EOI re-delivered another vector");
                }
            }
        }
    }
    round_trip(&ioapic);
}

// ---- PIC ----

/// `pic_ports`: byte reads and writes of any port (command, data, ELCR, others), line changes
/// and INTA cycles. INTR must agree with the pending vector, INTA must return it (or the
/// master's IR7 when INTR is low), ELCR's fixed bits stay clear.
pub fn pic(data: &[u8]) {
    let mut input = Input::new(data);
    let mut pic = DualPic::new();
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 4 {
            0 => {
                let port = input.pick_or(&[0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1], Input::u16);
                pic.port_write(port, input.u8());
            }
            1 => {
                let port = input.pick_or(&[0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1], Input::u16);
                let value = pic.port_read(port);
                if !DualPic::handles_port(port) {
                    assert_eq!(value, 0xFF, "undecoded port {port:#x}");
                }
            }
            2 => pic.set_irq(input.u8() % 20, input.bool()),
            _ => {
                let pending = pic.pending_vector();
                let spurious = pic.master().spurious_vector();
                let vector = pic.acknowledge();
                assert_eq!(vector, pending.unwrap_or(spurious), "INTA vector");
            }
        }
        assert_eq!(
            pic.output(),
            pic.pending_vector().is_some(),
            "INTR vs pending vector"
        );
        for chip in [pic.master(), pic.slave()] {
            assert_eq!(
                chip.elcr() & !chip.role().elcr_writable(),
                0,
                "ELCR fixed bits"
            );
        }
    }
    round_trip(&pic);
}

// ---- MSI ----

/// `msi_decode`: any address/data pair in both destination layouts. A decode must agree with
/// the fields of SDM vol. 3 §11.11.1-2 read here independently, accept exactly the interrupt
/// window and the non-reserved delivery modes, and encode back to a message that decodes the
/// same.
pub fn msi(data: &[u8]) {
    let mut input = Input::new(data);
    while !input.is_empty() {
        let address = match input.u8() % 4 {
            0 => input.u64(),
            _ => 0xFEE0_0000 | u64::from(input.u32() & 0xF_FFFF),
        };
        let msi = MsiMessage {
            address,
            data: input.u32(),
        };
        let addressing = if input.bool() {
            MsiAddressing::ExtendedDestId
        } else {
            MsiAddressing::Standard
        };
        check_msi(msi, addressing);
    }
}

fn check_msi(msi: MsiMessage, addressing: MsiAddressing) {
    let extended = addressing == MsiAddressing::ExtendedDestId;
    let mode_bits = (msi.data >> 8) & 7;
    let in_window = msi.address >> 20 == 0xFEE;
    let decodable =
        in_window && ![3, 6].contains(&mode_bits) && !(extended && msi.address & 0x10 != 0);
    let decoded = msi.decode_with(addressing);
    assert_eq!(
        decoded.is_ok(),
        decodable,
        "{msi:x?} {addressing:?}: {decoded:?}"
    );
    let Ok(message) = decoded else { return };
    let logical = msi.address & 4 != 0;
    let hint = msi.address & 8 != 0;
    let mut destination = (msi.address >> 12) as u32 & 0xFF;
    if extended {
        destination |= ((msi.address >> 5) as u32 & 0x7F) << 8;
    }
    let level = msi.data & (1 << 15) != 0;
    let mode = if mode_bits == 0 && logical && hint {
        1
    } else {
        mode_bits
    };
    assert_eq!(message.vector, msi.data as u8, "vector");
    assert_eq!(message.delivery_mode.bits(), mode, "delivery mode");
    assert_eq!(
        message.destination_mode == DestinationMode::Logical,
        logical,
        "destination mode"
    );
    assert_eq!(message.trigger == TriggerMode::Level, level, "trigger");
    // Every MSI asserts, bit 14 or not (KVM's `kvm_set_msi_irq`); RH is carried as the hint.
    assert!(message.level_assert, "level");
    assert_eq!(message.redirection_hint, hint, "redirection hint");
    assert_eq!(message.destination, destination, "destination");
    assert_eq!(message.shorthand, Shorthand::None);
    assert_eq!(message.source, MessageSource::Device);
    let encoded = MsiMessage::encode_with(&message, addressing).expect("a decoded message encodes");
    assert_eq!(
        encoded.decode_with(addressing),
        Ok(message),
        "encode/decode round trip"
    );
}

// ---- routing ----

fn line_key(target: &RouteTarget) -> Option<(bool, usize)> {
    match *target {
        RouteTarget::Pic { irq } => Some((false, usize::from(irq))),
        RouteTarget::IoApic { pin } => Some((true, pin)),
        RouteTarget::Msi(_) => None,
    }
}

/// `routing_updates`: route changes, source levels and pulses on any GSI. The harness keeps its
/// own table of source levels and of the level last forwarded to each line, and checks: a GSI's
/// wire is the OR of its sources; every PIC line / IOAPIC pin is driven at the OR of the wires
/// routed to it, and the forwarded level agrees; an MSI target is sent only on a rising wire.
pub fn routing(data: &[u8]) {
    let mut input = Input::new(data);
    let pins = 1 + input.below(120);
    let mut table = if input.bool() {
        GsiRouting::pc_default(pins)
    } else {
        GsiRouting::new(pins)
    };
    let mut sources: BTreeMap<u32, BTreeMap<u32, bool>> = BTreeMap::new();
    let mut lines: BTreeMap<(bool, usize), bool> = BTreeMap::new();
    let mut gsis: Vec<u32> = (0..24).collect();
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let gsi = if input.u8() < 240 {
            u32::from(input.u8() % 32)
        } else {
            input.u32() % 1100
        };
        gsis.push(gsi);
        let wire_before = table.wire_level(gsi);
        let mut forwarded = Vec::new();
        let mut out = |target: RouteTarget, level: bool| forwarded.push((target, level));
        let mut rising = false;
        match input.u8() % 4 {
            0 => {
                let count = input.below(MAX_TARGETS_PER_GSI + 2);
                let targets: Vec<RouteTarget> = (0..count)
                    .map(|_| match input.u8() % 3 {
                        0 => RouteTarget::Pic {
                            irq: input.u8() % 18,
                        },
                        1 => RouteTarget::IoApic {
                            pin: input.below(130),
                        },
                        _ => RouteTarget::Msi(InterruptMessage::fixed(
                            input.u8(),
                            u32::from(input.u8()),
                        )),
                    })
                    .collect();
                let _ = table.set_route(gsi, &targets, &mut out);
            }
            1 => table.remove(gsi, &mut out),
            2 => {
                let (source, level) = (input.u32() % 40, input.bool());
                if table
                    .set_source_level(gsi, SourceId(source), level, &mut out)
                    .is_ok()
                {
                    sources.entry(gsi).or_default().insert(source, level);
                    rising = !wire_before && level;
                }
            }
            _ => {
                let source = input.u32() % 40;
                let was = sources
                    .get(&gsi)
                    .and_then(|s| s.get(&source))
                    .copied()
                    .unwrap_or(false);
                if table.pulse(gsi, SourceId(source), &mut out).is_ok() {
                    // A pulse ends low for this source.
                    sources.entry(gsi).or_default().insert(source, false);
                    rising = !wire_before && !was;
                }
            }
        }
        for (target, level) in forwarded {
            match line_key(&target) {
                Some(key) => {
                    lines.insert(key, level);
                }
                None => assert!(rising && level, "MSI {target:?} sent without a rising wire"),
            }
        }
        check_routing(&table, &sources, &lines, &gsis, pins);
    }
    round_trip(&table);
}

fn check_routing(
    table: &GsiRouting,
    sources: &BTreeMap<u32, BTreeMap<u32, bool>>,
    lines: &BTreeMap<(bool, usize), bool>,
    gsis: &[u32],
    pins: usize,
) {
    for gsi in gsis {
        let any = sources.get(gsi).is_some_and(|s| s.values().any(|l| *l));
        assert_eq!(
            table.wire_level(*gsi),
            any,
            "GSI {gsi}: wire is not the OR of its sources"
        );
    }
    let mut driven: BTreeMap<(bool, usize), bool> = BTreeMap::new();
    for (gsi, targets) in table.routes() {
        for key in targets.iter().filter_map(line_key) {
            *driven.entry(key).or_default() |= table.wire_level(gsi);
        }
    }
    let targets = (0..16u8)
        .map(|irq| RouteTarget::Pic { irq })
        .chain((0..pins).map(|pin| RouteTarget::IoApic { pin }));
    for target in targets {
        let key = line_key(&target).expect("a line");
        let expected = driven.get(&key).copied().unwrap_or(false);
        assert_eq!(
            table.target_level(target),
            expected,
            "{target:?}: not the OR of its wires"
        );
        assert_eq!(
            lines.get(&key).copied().unwrap_or(false),
            expected,
            "{target:?}: forwarded level"
        );
    }
}
