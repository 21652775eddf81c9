//! The VM-wide interrupt controllers of the `user` backend: IOAPIC, dual 8259 PIC and the GSI
//! wiring between device lines and both, behind one lock; messages go out on the APIC bus.
//!
//! Lock discipline: the lock covers only the chip models. Messages the IOAPIC produces are
//! collected under the lock and put on the bus after it is released, so a poster never kicks or
//! rings a doorbell while holding it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use irqchip::ioapic::{IoApic, IoApicConfig};
use irqchip::pic::DualPic;
use irqchip::routing::{GsiRouting, RouteTarget, SourceId};
use irqchip::vcpu::VmBus;
use irqchip::{InterruptMessage, Vector};

use super::notify::Notifier;

/// Guest-physical base of the IOAPIC's register window (MP spec / ACPI MADT default).
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the IOAPIC's register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// The single source that drives every GSI from the VMM's device model.
const DEVICE_SOURCE: SourceId = SourceId(0);

struct Chips {
    ioapic: IoApic,
    pic: DualPic,
    routing: GsiRouting,
}

/// IOAPIC + PIC + routing of one VM. Shared by every thread.
pub struct Platform {
    chips: Mutex<Chips>,
    /// The PIC's INTR output as of the last change, readable without the lock before each entry.
    pic_intr: AtomicBool,
    bus: Arc<VmBus>,
    notifier: Arc<Notifier>,
}

impl Platform {
    pub fn new(bus: Arc<VmBus>, notifier: Arc<Notifier>) -> Self {
        let ioapic = IoApic::new(IoApicConfig::default());
        let routing = GsiRouting::pc_default(ioapic.pins());
        Self {
            chips: Mutex::new(Chips {
                ioapic,
                pic: DualPic::new(),
                routing,
            }),
            pic_intr: AtomicBool::new(false),
            bus,
            notifier,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Chips> {
        self.chips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drives GSI `gsi` to `level` (device lines: serial IRQ 4, pc-testdev lines).
    pub fn set_gsi(&self, gsi: u32, level: bool) {
        let mut messages = Vec::new();
        {
            let mut chips = self.lock();
            let Chips {
                ioapic,
                pic,
                routing,
            } = &mut *chips;
            let result =
                routing.set_source_level(
                    gsi,
                    DEVICE_SOURCE,
                    level,
                    &mut |target, lvl| match target {
                        RouteTarget::Pic { irq } => pic.set_irq(irq, lvl),
                        RouteTarget::IoApic { pin } => {
                            ioapic.set_line(pin, lvl, &mut |m| messages.push(m))
                        }
                        RouteTarget::Msi(m) => messages.push(m),
                    },
                );
            if let Err(e) = result {
                tracing::warn!(gsi, level, "GSI routing: {e}");
            }
            self.update_pic_intr(&chips);
        }
        self.deliver(&messages);
    }

    /// A guest read of the IOAPIC window.
    pub fn ioapic_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().ioapic.mmio_read(offset, data);
    }

    /// A guest write to the IOAPIC window (may deliver: unmasking an asserted level pin, the EOI
    /// register).
    pub fn ioapic_write(&self, offset: u64, data: &[u8]) {
        let mut messages = Vec::new();
        self.lock()
            .ioapic
            .mmio_write(offset, data, &mut |m| messages.push(m));
        self.deliver(&messages);
    }

    /// A local APIC's EOI broadcast for a level-triggered vector: clears remote IRR, re-delivers
    /// a still-asserted line.
    pub fn eoi(&self, vector: Vector) {
        let mut messages = Vec::new();
        self.lock()
            .ioapic
            .end_of_interrupt(vector, &mut |m| messages.push(m));
        self.deliver(&messages);
    }

    /// True for the PIC's ports (0x20/0x21, 0xA0/0xA1, ELCR 0x4D0/0x4D1).
    pub fn is_pic_port(port: u16) -> bool {
        DualPic::handles_port(port)
    }

    /// A guest `in` from PIC ports, byte by byte.
    pub fn pic_read(&self, port: u16, data: &mut [u8]) {
        let mut chips = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *byte = if DualPic::handles_port(p) {
                chips.pic.port_read(p)
            } else {
                0xFF
            };
        }
        // A poll-mode read acknowledges, which may lower INTR.
        self.update_pic_intr(&chips);
    }

    /// A guest `out` to PIC ports, byte by byte.
    pub fn pic_write(&self, port: u16, data: &[u8]) {
        let mut chips = self.lock();
        for (i, byte) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if DualPic::handles_port(p) {
                chips.pic.port_write(p, *byte);
            }
        }
        self.update_pic_intr(&chips);
    }

    /// The PIC's INTR output (to LINT0 in ExtINT mode, or straight to a disabled APIC).
    pub fn pic_intr(&self) -> bool {
        self.pic_intr.load(Ordering::SeqCst)
    }

    /// The INTA cycle: the vector the PIC supplies (spurious IRQ 7/15 if the request vanished).
    /// Call only when the interrupt will certainly be injected.
    pub fn pic_acknowledge(&self) -> Vector {
        let mut chips = self.lock();
        let vector = chips.pic.acknowledge();
        self.update_pic_intr(&chips);
        vector
    }

    /// Publishes INTR; on a rising edge every vCPU re-evaluates (any of them may have LINT0 in
    /// ExtINT mode, which only its own thread knows), as KVM kicks every vCPU that accepts PIC
    /// interrupts.
    fn update_pic_intr(&self, chips: &Chips) {
        let out = chips.pic.output();
        let was = self.pic_intr.swap(out, Ordering::SeqCst);
        if out && !was {
            self.notifier.wake_all();
        }
    }

    fn deliver(&self, messages: &[InterruptMessage]) {
        for m in messages {
            self.bus
                .deliver(m, &mut |target, how| self.notifier.notify(target, how));
        }
    }
}
