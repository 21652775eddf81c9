//! The whole interrupt architecture of a PC in one object: device lines go in, vectors come out
//! at the right vCPU.
//!
//! [`PcIrqChip`] owns the VM-wide devices, the dual 8259 PIC, the IOAPIC and the GSI routing
//! table (the PC default: ISA IRQs to PIC and IOAPIC, IRQ 0 to IOAPIC pin 2, PCI GSIs 16+ to the
//! IOAPIC), and the [`ApicSystem`] (the APIC bus and every vCPU's posting inbox). It hands out
//! one [`VcpuInterrupts`] per vCPU at creation, which the vCPU threads own. Every method takes
//! `&self` and may be called from any thread: device threads raise lines and send MSIs, vCPU
//! threads forward guest accesses to the IOAPIC and PIC, EOIs, and the PIC's INTA.
//!
//! # Data flow
//!
//! ```text
//! set_gsi / pulse_gsi --> GsiRouting --+--> DualPic::set_irq ----> INTR --> wake LINT0 ExtINT vCPUs
//!                                      +--> IoApic::set_line --+
//!                                      +--> MSI route ---------+--> ApicBus --> VcpuInbox (kick/wake)
//! signal_msi ----------------------------------------------------+
//! ioapic_mmio_write, eoi (IOAPIC re-delivery) ------------------+
//! ```
//!
//! # Locking
//!
//! Three mutexes, always taken in the order routing, PIC, IOAPIC; [`PcIrqChip::pic_intr`] and
//! [`PcIrqChip::pic_acknowledge`] take the PIC alone. A routed level change is applied to the
//! devices while the routing lock is held, so two threads changing the same line reach the
//! devices in the order the table saw them. Posting to the bus is lock-free and never blocks.
//! The `notify` callback (kick a vCPU in guest mode, ring a blocked one's doorbell) is called
//! after every lock is released, so it may do anything, including calling back into the chip.
//!
//! # Polarity of the IOAPIC pins (decision)
//!
//! GSI levels are logical (true = the device requests an interrupt). The IOAPIC models the
//! electrical wire and its INTPOL bit ([`IoApic::set_line`]), so the chip converts: ISA pins
//! 0-15 are active-high (wire = level), PCI pins 16 and up are active-low (wire = !level) and are
//! driven high (idle) when the chip is created. These are the polarities the firmware tables of
//! the VMM must declare (ISA: MADT defaults; PCI: ACPI `_PRT` / MP table, level, active-low), and
//! the ones Linux programs. A guest that programs a PCI pin active-high sees an idle line as
//! asserted, as on hardware; KVM instead ignores INTPOL and passes logical levels. PIC inputs are
//! active-high and take the logical level.
//!
//! # The 8259's INTR
//!
//! After every call that can change the PIC (a routed level, a PIC port access), the chip
//! compares INTR before and after; when it rose, [`ApicSystem::wake_pic_acceptors`] posts a
//! wake-up to each vCPU whose local APIC takes PIC interrupts now (LINT0 unmasked in ExtINT mode,
//! or the APIC globally disabled), kicking it if it is in guest mode and waking it if it is
//! blocked. The vCPU loop then passes [`PcIrqChip::pic_intr`] to
//! [`VcpuInterrupts::next_injection`], and on [`crate::vcpu::Injection::ExtInt`] calls
//! [`VcpuInterrupts::take_extint`] and [`PcIrqChip::pic_acknowledge`] (the INTA cycle) only
//! once it is certain to inject the vector. An INTA never raises INTR from low, so it needs no
//! notification.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::ioapic::{IoApic, IoApicConfig};
use crate::msi::{MsiAddressing, MsiError, MsiMessage};
use crate::pic::DualPic;
use crate::routing::{GsiRouting, RouteTarget, RoutingError, SourceId, ISA_IRQS};
use crate::snapshot::{ChipSnapshot, DeviceSnapshot, SnapshotError};
use crate::types::{EoiMessage, InterruptMessage, Notify, VcpuIndex, Vector};
use crate::vcpu::{ApicSystem, ApicSystemConfig, VcpuInterrupts, VmBus};

/// Shape of a PC's interrupt chip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcIrqChipConfig {
    pub apic: ApicSystemConfig,
    pub ioapic: IoApicConfig,
    /// Extended destination ID (15-bit APIC IDs) in IOAPIC entries and MSI addresses; only for
    /// VMMs that advertise it to the guest (KVM_FEATURE_MSI_EXT_DEST_ID).
    pub extended_destination_id: bool,
}

impl PcIrqChipConfig {
    /// `vcpus` vCPUs with the default clocks, x2APIC and directed EOI offered, a 24-pin
    /// IOAPIC with the EOI register (version 0x20), 8-bit destinations.
    pub fn new(vcpus: usize) -> Self {
        Self {
            apic: ApicSystemConfig {
                vcpus,
                clock: Default::default(),
                x2apic: true,
                directed_eoi: true,
                apic_ids: Default::default(),
            },
            ioapic: IoApicConfig::default(),
            extended_destination_id: false,
        }
    }

    fn msi_addressing(&self) -> MsiAddressing {
        if self.extended_destination_id {
            MsiAddressing::ExtendedDestId
        } else {
            MsiAddressing::Standard
        }
    }
}

/// The electrical level of IOAPIC pin `pin` when its GSI is `asserted` (see "Polarity" in the
/// module documentation): PCI pins (16 and up) are active-low.
pub fn ioapic_wire_level(pin: usize, asserted: bool) -> bool {
    if pin_is_active_low(pin) {
        !asserted
    } else {
        asserted
    }
}

fn pin_is_active_low(pin: usize) -> bool {
    pin >= ISA_IRQS as usize
}

/// The interrupt chip of a PC: 8259 pair, IOAPIC, GSI routing, APIC bus and inboxes. See the
/// module documentation.
pub struct PcIrqChip {
    config: PcIrqChipConfig,
    // Lock order: routing, pic, ioapic.
    routing: Mutex<GsiRouting>,
    pic: Mutex<DualPic>,
    ioapic: Mutex<IoApic>,
    apic: ApicSystem,
}

/// The devices a routed change reaches, with the notifications it produced.
struct Sinks<'a> {
    pic: &'a mut DualPic,
    ioapic: &'a mut IoApic,
    bus: &'a VmBus,
    notes: &'a mut Vec<(VcpuIndex, Notify)>,
}

impl Sinks<'_> {
    /// Applies one change the routing table forwards.
    fn forward(&mut self, target: RouteTarget, level: bool) {
        match target {
            RouteTarget::Pic { irq } => self.pic.set_irq(irq, level),
            RouteTarget::IoApic { pin } => {
                let (bus, notes) = (self.bus, &mut *self.notes);
                self.ioapic
                    .set_line(pin, ioapic_wire_level(pin, level), &mut |message| {
                        post(bus, &message, notes);
                    });
            }
            // The table sends an MSI target on rising edges only.
            RouteTarget::Msi(message) if level => {
                post(self.bus, &message, self.notes);
            }
            RouteTarget::Msi(_) => {}
        }
    }
}

/// Puts `message` on the bus and records the notifications its posts ask for.
fn post(bus: &VmBus, message: &InterruptMessage, notes: &mut Vec<(VcpuIndex, Notify)>) -> usize {
    bus.deliver(message, &mut |index, how| notes.push((index, how)))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a device lock cannot leave a device half-updated in a way later
    // calls could not handle (every state is valid), so a poisoned lock is used as is.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn send_notes(notes: Vec<(VcpuIndex, Notify)>, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
    for (index, how) in notes {
        notify(index, how);
    }
}

impl PcIrqChip {
    /// Builds the chip and the per-vCPU halves (vCPU i at position i, to move into its thread).
    /// The routing table is the PC default and the PCI pins (16 and up) are driven idle-high.
    pub fn new(config: PcIrqChipConfig) -> (Self, Vec<VcpuInterrupts>) {
        let (apic, vcpus) = ApicSystem::new(config.apic);
        let mut ioapic =
            IoApic::new(config.ioapic).with_extended_destination_id(config.extended_destination_id);
        for pin in (0..ioapic.pins()).filter(|pin| pin_is_active_low(*pin)) {
            // Every entry is masked at power-on: this delivers nothing.
            ioapic.set_line(pin, ioapic_wire_level(pin, false), &mut |_| {});
        }
        let routing = GsiRouting::pc_default(ioapic.pins());
        let chip = Self {
            config,
            routing: Mutex::new(routing),
            pic: Mutex::new(DualPic::new()),
            ioapic: Mutex::new(ioapic),
            apic,
        };
        (chip, vcpus)
    }

    pub fn config(&self) -> PcIrqChipConfig {
        self.config
    }

    /// The APIC bus and inboxes (for the VMM's kick/wake paths and VMM-originated messages).
    pub fn apic_system(&self) -> &ApicSystem {
        &self.apic
    }

    pub fn bus(&self) -> &Arc<VmBus> {
        self.apic.bus()
    }

    /// Runs `change` on the devices under the locks, wakes the PIC's acceptors if INTR rose,
    /// then, with every lock released, passes the notifications to `notify`.
    fn with_devices<R>(
        &self,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
        change: impl FnOnce(&mut GsiRouting, &mut Sinks<'_>) -> R,
    ) -> R {
        let mut notes = Vec::new();
        let result = {
            let mut routing = lock(&self.routing);
            let mut pic = lock(&self.pic);
            let mut ioapic = lock(&self.ioapic);
            let intr_before = pic.output();
            let mut sinks = Sinks {
                pic: &mut pic,
                ioapic: &mut ioapic,
                bus: self.apic.bus(),
                notes: &mut notes,
            };
            let result = change(&mut routing, &mut sinks);
            if !intr_before && pic.output() {
                self.apic
                    .wake_pic_acceptors(&mut |index, how| notes.push((index, how)));
            }
            result
        };
        send_notes(notes, notify);
        result
    }

    // ---- device lines ----

    /// Sets the level `source` drives on `gsi` (true = asserted). The wire is the OR of its
    /// sources; a change reaches the GSI's PIC line / IOAPIC pin (PCI pins inverted, see the
    /// module documentation), and a rising edge sends its MSI route.
    pub fn set_gsi(
        &self,
        gsi: u32,
        source: SourceId,
        level: bool,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<(), RoutingError> {
        self.with_devices(notify, |routing, sinks| {
            routing.set_source_level(gsi, source, level, &mut |target, level| {
                sinks.forward(target, level)
            })
        })
    }

    /// An edge-triggered device interrupt: `source` raises then lowers `gsi`.
    pub fn pulse_gsi(
        &self,
        gsi: u32,
        source: SourceId,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<(), RoutingError> {
        self.with_devices(notify, |routing, sinks| {
            routing.pulse(gsi, source, &mut |target, level| {
                sinks.forward(target, level)
            })
        })
    }

    /// Replaces the targets of `gsi`; an asserted wire moves to its new line targets at once
    /// (see `routing`).
    pub fn set_route(
        &self,
        gsi: u32,
        targets: &[RouteTarget],
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<(), RoutingError> {
        self.with_devices(notify, |routing, sinks| {
            routing.set_route(gsi, targets, &mut |target, level| {
                sinks.forward(target, level)
            })
        })
    }

    /// Routes `gsi` to a device's MSI (sent on each later rising edge of the GSI).
    pub fn bind_msi(
        &self,
        gsi: u32,
        msi: MsiMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<(), BindMsiError> {
        let message = msi.decode_with(self.config.msi_addressing())?;
        Ok(self.set_route(gsi, &[RouteTarget::Msi(message)], notify)?)
    }

    /// Whether the wire of `gsi` is asserted.
    pub fn gsi_level(&self, gsi: u32) -> bool {
        lock(&self.routing).wire_level(gsi)
    }

    // ---- messages ----

    /// A device's MSI write. Returns the number of vCPUs it reached.
    pub fn signal_msi(
        &self,
        msi: MsiMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<usize, MsiError> {
        let message = msi.decode_with(self.config.msi_addressing())?;
        Ok(self.deliver(&message, notify))
    }

    /// Puts a message of the VMM's own on the bus (an NMI from the watchdog, for instance).
    pub fn deliver(
        &self,
        message: &InterruptMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> usize {
        // No device lock is held here, so the notifications need no buffering: the bus hands
        // them straight to `notify` (and allocates nothing).
        self.apic.bus().deliver(message, notify)
    }

    /// A local APIC's broadcast EOI of a level-triggered vector: clears remote IRR of the IOAPIC
    /// entries with that vector and re-delivers those whose line is still asserted (82093AA
    /// §3.2.4; SDM vol. 3 §11.8.5).
    pub fn eoi(&self, eoi: EoiMessage, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.with_devices(notify, |_, sinks| {
            let (bus, notes) = (sinks.bus, &mut *sinks.notes);
            sinks.ioapic.end_of_interrupt(eoi.vector, &mut |message| {
                post(bus, &message, notes);
            });
        });
    }

    // ---- guest accesses ----

    /// A guest read of the IOAPIC's MMIO window (`offset` from its base). No side effects.
    pub fn ioapic_mmio_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.ioapic).mmio_read(offset, data);
    }

    /// A guest write to the IOAPIC's MMIO window; deliveries it causes (an unmasked asserted
    /// level entry, the EOI register) go to the bus.
    pub fn ioapic_mmio_write(
        &self,
        offset: u64,
        data: &[u8],
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) {
        self.with_devices(notify, |_, sinks| {
            let (bus, notes) = (sinks.bus, &mut *sinks.notes);
            sinks.ioapic.mmio_write(offset, data, &mut |message| {
                post(bus, &message, notes);
            });
        });
    }

    /// A guest byte read of a PIC port (a poll-mode read acknowledges, hence `notify`).
    pub fn pic_port_read(&self, port: u16, notify: &mut dyn FnMut(VcpuIndex, Notify)) -> u8 {
        self.with_devices(notify, |_, sinks| sinks.pic.port_read(port))
    }

    /// A guest byte write to a PIC port (command, data or ELCR).
    pub fn pic_port_write(&self, port: u16, value: u8, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.with_devices(notify, |_, sinks| sinks.pic.port_write(port, value));
    }

    /// The 8259's INTR output: pass it to [`VcpuInterrupts::next_injection`].
    pub fn pic_intr(&self) -> bool {
        lock(&self.pic).output()
    }

    /// The INTA cycle: the vector to inject for an ExtINT. Call it only when the vCPU is
    /// certain to inject (it moves the request into the PIC's ISR).
    pub fn pic_acknowledge(&self) -> Vector {
        lock(&self.pic).acknowledge()
    }

    /// A system reset of the devices (PIC and IOAPIC to their power-on registers). Line levels
    /// and routes are outside the chips and are kept.
    pub fn reset_devices(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.with_devices(notify, |_, sinks| {
            sinks.pic.reset();
            sinks.ioapic.reset();
        });
    }

    // ---- snapshots ----

    /// The device part of a snapshot (PIC, IOAPIC, routing with levels), taken atomically.
    pub fn save_devices(&self) -> DeviceSnapshot {
        let routing = lock(&self.routing);
        let pic = lock(&self.pic);
        let ioapic = lock(&self.ioapic);
        DeviceSnapshot {
            pic: pic.clone(),
            ioapic: ioapic.clone(),
            routing: routing.clone(),
        }
    }

    /// Checks a whole snapshot against this chip without changing anything: version, vCPU
    /// count, every vCPU part against its vCPU's configuration, and the devices (see
    /// `snapshot`).
    pub fn check_snapshot(&self, snapshot: &ChipSnapshot) -> Result<(), SnapshotError> {
        let configs: Vec<_> = (0..self.apic.vcpus())
            .filter_map(|index| self.apic.lapic_config(index))
            .collect();
        snapshot.check_vcpus(&configs)?;
        snapshot.devices.check(
            self.config.ioapic.clamped(),
            self.config.extended_destination_id,
            ioapic_wire_level,
        )
    }

    /// Checks `snapshot` ([`Self::check_snapshot`]) and installs its devices. Then each vCPU
    /// thread restores its own part with [`VcpuInterrupts::restore`]. The VM must be paused.
    pub fn restore_devices(&self, snapshot: &ChipSnapshot) -> Result<(), SnapshotError> {
        self.check_snapshot(snapshot)?;
        let devices = &snapshot.devices;
        let mut routing = lock(&self.routing);
        let mut pic = lock(&self.pic);
        let mut ioapic = lock(&self.ioapic);
        *routing = devices.routing.clone();
        *pic = devices.pic.clone();
        *ioapic = devices.ioapic.clone();
        Ok(())
    }
}

/// Why [`PcIrqChip::bind_msi`] failed: the message does not decode, or the route is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindMsiError {
    #[error(transparent)]
    Msi(#[from] MsiError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip(vcpus: usize) -> (PcIrqChip, Vec<VcpuInterrupts>) {
        PcIrqChip::new(PcIrqChipConfig::new(vcpus))
    }

    /// The decision documented under "Polarity": ISA pins active-high, PCI pins active-low.
    #[test]
    fn pci_pins_are_active_low_and_idle_high() {
        assert!(ioapic_wire_level(4, true));
        assert!(!ioapic_wire_level(4, false));
        assert!(!ioapic_wire_level(16, true));
        assert!(ioapic_wire_level(23, false));
        let (chip, _) = chip(1);
        let devices = chip.save_devices();
        for pin in 0..devices.ioapic.pins() {
            assert_eq!(devices.ioapic.line(pin), Some(pin >= 16), "pin {pin}");
        }
    }

    /// A GSI change reaches the PIC line and the IOAPIC wire (inverted for PCI pins), and a
    /// route change under an asserted wire moves the level (routing module, "Changing routes").
    #[test]
    fn gsi_levels_reach_pic_and_ioapic_wires() {
        let (chip, _) = chip(1);
        let source = SourceId(3);
        chip.set_gsi(5, source, true, &mut |_, _| {}).unwrap();
        chip.set_gsi(17, source, true, &mut |_, _| {}).unwrap();
        let devices = chip.save_devices();
        assert!(devices.pic.line(5));
        assert_eq!(devices.ioapic.line(5), Some(true));
        assert_eq!(
            devices.ioapic.line(17),
            Some(false),
            "asserted PCI pin is low"
        );
        chip.set_route(5, &[RouteTarget::IoApic { pin: 7 }], &mut |_, _| {})
            .unwrap();
        let devices = chip.save_devices();
        assert!(!devices.pic.line(5), "the old target is lowered");
        assert_eq!(devices.ioapic.line(7), Some(true), "the new one raised");
        assert!(chip.gsi_level(5));
        assert_eq!(
            chip.set_gsi(5000, source, true, &mut |_, _| {}),
            Err(RoutingError::GsiOutOfRange(5000))
        );
    }

    /// The notify callback runs with no chip lock held: it may call back into the chip.
    #[test]
    fn notify_may_call_back_into_the_chip() {
        let (chip, mut cpus) = chip(1);
        let lint0_extint = (7u32 << 8).to_le_bytes();
        cpus[0].mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0, &mut |_, _| {});
        cpus[0].mmio_write(0x350, &lint0_extint, 0, &mut |_, _| {});
        for (port, value) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            chip.pic_port_write(port, value, &mut |_, _| {});
        }
        chip.pic_port_write(0x21, 0xFE, &mut |_, _| {});
        assert!(cpus[0].inbox().try_block(), "the BSP sleeps");
        let mut seen = Vec::new();
        chip.pulse_gsi(0, SourceId(0), &mut |index, how| {
            seen.push((index, how, chip.pic_intr(), chip.gsi_level(0)));
        })
        .unwrap();
        assert_eq!(seen, vec![(0, Notify::Wake, true, false)]);
    }

    /// Guest hostility: odd MMIO sizes and offsets, unknown ports, EOIs of unknown vectors and
    /// INTA with nothing pending do nothing harmful.
    #[test]
    fn hostile_accesses_are_harmless() {
        let (chip, _) = chip(2);
        for offset in [0u64, 1, 0xF, 0x10, 0x13, 0x3F, 0x40, 0xFFF, u64::MAX] {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut data = vec![0xA5; len];
                chip.ioapic_mmio_read(offset, &mut data);
                chip.ioapic_mmio_write(offset, &data, &mut |_, _| {});
            }
        }
        for port in [0u16, 0x20, 0x21, 0x22, 0xA0, 0xA1, 0x4D0, 0x4D1, 0xFFFF] {
            chip.pic_port_write(port, 0xFF, &mut |_, _| {});
            let _ = chip.pic_port_read(port, &mut |_, _| {});
        }
        chip.eoi(EoiMessage { vector: 0 }, &mut |_, _| {});
        let _ = chip.pic_acknowledge();
        chip.reset_devices(&mut |_, _| {});
        assert!(!chip.pic_intr());
    }
}
