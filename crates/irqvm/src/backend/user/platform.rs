//! The VM-wide interrupt controllers of the `user` backend: `irqchip::chip::PcIrqChip` (IOAPIC,
//! dual 8259 PIC, GSI routing and the APIC bus, thread-safe), with every kick or wake it asks for
//! carried out by the [`Notifier`]. The chip calls back only after releasing its locks.

use std::sync::Arc;

use irqchip::chip::PcIrqChip;
use irqchip::msi::{MsiError, MsiMessage};
use irqchip::pic::DualPic;
use irqchip::routing::SourceId;
use irqchip::{EoiMessage, Vector};

use super::notify::Notifier;
use crate::trace::{hooks, Source, Tracer};

/// Guest-physical base of the IOAPIC's register window (MP spec / ACPI MADT default).
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the IOAPIC's register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// The single source that drives every GSI from the VMM's device model.
const DEVICE_SOURCE: SourceId = SourceId(0);

/// The PC chip of one VM plus the way to reach its vCPUs. Shared by every thread.
pub struct Platform {
    chip: PcIrqChip,
    notifier: Arc<Notifier>,
    tracer: Arc<Tracer>,
}

impl Platform {
    pub fn new(chip: PcIrqChip, notifier: Arc<Notifier>, tracer: Arc<Tracer>) -> Self {
        Self {
            chip,
            notifier,
            tracer,
        }
    }

    pub fn chip(&self) -> &PcIrqChip {
        &self.chip
    }

    fn notify(&self) -> impl FnMut(usize, irqchip::Notify) + '_ {
        self.notifier.batched()
    }

    /// Drives GSI `gsi` to `level` (device lines: serial IRQ 4, pc-testdev lines).
    pub fn set_gsi(&self, gsi: u32, level: bool) {
        let source = Source::Ioapic(u8::try_from(gsi).ok());
        hooks::line(&self.tracer, gsi, level);
        let set = || {
            self.chip
                .set_gsi(gsi, DEVICE_SOURCE, level, &mut self.notify())
        };
        if let Err(e) = hooks::posting_for(&self.tracer, source, set) {
            crate::warn_ratelimited!(gsi, level, "GSI routing: {e}");
        }
    }

    /// A message-signalled interrupt from a host thread or device: decoded with the chip's
    /// destination layout and posted on the APIC bus. Returns how many vCPUs it reached.
    pub fn signal_msi(&self, msi: MsiMessage) -> Result<usize, MsiError> {
        self.chip.signal_msi(msi, &mut self.notify())
    }

    /// A guest read of the IOAPIC window.
    pub fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        self.chip.ioapic_mmio_read(offset, data);
    }

    /// A guest write to the IOAPIC window (may deliver: unmasking an asserted level pin, the EOI
    /// register).
    pub fn ioapic_write(&self, offset: u64, data: &[u8]) {
        if offset == u64::from(irqchip::ioapic::EOI_OFFSET) {
            hooks::ioapic_eoi_register(&self.tracer, data);
        }
        hooks::posting_for(&self.tracer, Source::Ioapic(None), || {
            self.chip
                .ioapic_mmio_write(offset, data, &mut self.notify())
        });
    }

    /// A local APIC's EOI broadcast for a level-triggered vector: clears remote IRR, re-delivers
    /// a still-asserted line.
    pub fn eoi(&self, vector: Vector) {
        hooks::ioapic_eoi(&self.tracer, vector);
        hooks::posting_for(&self.tracer, Source::Ioapic(None), || {
            self.chip.eoi(EoiMessage { vector }, &mut self.notify())
        });
    }

    /// True for the PIC's ports (0x20/0x21, 0xA0/0xA1, ELCR 0x4D0/0x4D1).
    pub fn is_pic_port(port: u16) -> bool {
        DualPic::handles_port(port)
    }

    /// A guest `in` from PIC ports, byte by byte (16- and 32-bit accesses split).
    pub fn pic_read(&self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *byte = if DualPic::handles_port(p) {
                self.chip.pic_port_read(p, &mut self.notify())
            } else {
                0xFF
            };
        }
    }

    /// A guest `out` to PIC ports, byte by byte (an OCW2 that ends a PIC interrupt is recorded
    /// as its EOI).
    pub fn pic_write(&self, port: u16, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if DualPic::handles_port(p) {
                hooks::pic_write(
                    &self.tracer,
                    || {
                        self.chip
                            .pic_port_write_ending(p, *byte, &mut self.notify())
                    },
                    || self.chip.pic_port_write(p, *byte, &mut self.notify()),
                );
            }
        }
    }

    /// The PIC's INTR output (to LINT0 in ExtINT mode, or straight to a disabled APIC). The chip
    /// wakes the vCPUs that accept it when it rises.
    pub fn pic_intr(&self) -> bool {
        self.chip.pic_intr()
    }

    /// The INTA cycle: the vector the PIC supplies (spurious IRQ 7/15 if the request vanished).
    /// Call only when the interrupt will certainly be injected.
    pub fn pic_acknowledge(&self) -> Vector {
        self.chip.pic_acknowledge()
    }
}
