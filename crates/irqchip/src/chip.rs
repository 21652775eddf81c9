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
//! # Where messages go: the [`MessageSink`]
//!
//! The chip does not deliver an [`InterruptMessage`] itself: it hands every message its IOAPIC
//! sends, every MSI route it fires and every MSI it decodes to a [`MessageSink`], and tells the
//! sink when the PIC's INTR rises and when the IOAPIC's redirection table may have changed. So the
//! PC platform exists once, whoever owns the local APICs:
//!
//! * [`ApicSystem`] is the sink when the local APICs are this crate's too (a VMM's "all in
//!   userspace" mode): messages go on the APIC bus to the vCPUs' posting inboxes, INTR wakes the
//!   vCPUs whose LINT0 takes ExtINT. [`PcIrqChip::new`] builds the chip with it.
//! * A VMM whose local APICs live elsewhere (KVM's split irqchip) passes its own sink to
//!   [`PcIrqChip::with_sink`]: it encodes each message as an MSI for the hypervisor, mirrors the
//!   redirection table into the hypervisor's EOI routes, and decides whom to tell about INTR.
//!
//! Messages reach the sink in the order the devices produced them: the sink is called with the
//! device locks held (see "Locking"), except for [`PcIrqChip::signal_msi`] and
//! [`PcIrqChip::deliver`], which pass through no device.
//!
//! # Locking
//!
//! Three mutexes, always taken in the order routing, PIC, IOAPIC. A few calls take one alone:
//! the PIC's INTA ([`PcIrqChip::pic_acknowledge`], [`PcIrqChip::pic_acknowledge_if_pending`])
//! and [`PcIrqChip::pic_irq_of_vector`] the PIC, [`PcIrqChip::ioapic_mmio_read`] the IOAPIC,
//! [`PcIrqChip::gsi_level`] the routing table; [`PcIrqChip::pic_intr`] takes none (one atomic
//! load of the INTR every change of the PIC publishes). A routed level change is applied to the
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

use std::sync::atomic::{AtomicBool, Ordering};
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
    /// The local APICs: how many vCPUs and the clocks their timers count.
    pub apic: ApicSystemConfig,
    /// The IOAPIC: pin count, ID and version (82093AA §3.2.2).
    pub ioapic: IoApicConfig,
    /// Extended destination ID (15-bit APIC IDs) in IOAPIC entries and MSI addresses; only for
    /// VMMs that advertise it to the guest (KVM_FEATURE_MSI_EXT_DEST_ID).
    pub extended_destination_id: bool,
}

impl PcIrqChipConfig {
    /// `vcpus` vCPUs with the default clocks, x2APIC and directed EOI offered, MAXPHYADDR 52
    /// (set `apic.max_phys_addr` to what the guest's CPUID says), no SMM (SMIs dropped), a
    /// 24-pin IOAPIC with the EOI register (version 0x20), 8-bit destinations.
    pub fn new(vcpus: usize) -> Self {
        Self {
            apic: ApicSystemConfig {
                vcpus,
                clock: Default::default(),
                x2apic: true,
                directed_eoi: true,
                cmci: false,
                max_phys_addr: crate::lapic::regs::MAX_PHYS_ADDR_LIMIT,
                apic_ids: Default::default(),
                smm: false,
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

/// Where the chip's interrupt messages go (see "Where messages go" in the module
/// documentation). Called from any thread, with the chip's device locks held except where
/// [`PcIrqChip`] says otherwise: a sink must not call back into the chip.
pub trait MessageSink: Send + Sync {
    /// Delivers one message (an IOAPIC pin, an MSI route, a decoded MSI) to the local APICs it
    /// names, reporting through `notify` which vCPUs to kick or wake. Returns how many local
    /// APICs accepted it, as far as the sink knows (a sink that cannot tell returns 1 for a
    /// message it handed on, 0 for one it dropped). An IOAPIC level entry whose message no
    /// local APIC accepted keeps remote IRR clear (82093AA §3.2.4, [`IoApic`]).
    fn deliver(
        &self,
        message: &InterruptMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> usize;

    /// The 8259's INTR output rose: tell, through `notify`, the vCPUs that must look at it
    /// (those whose LINT0 may take ExtINT).
    fn pic_intr_rose(&self, notify: &mut dyn FnMut(VcpuIndex, Notify));

    /// The IOAPIC's redirection table may have changed (a guest write to its window, a reset,
    /// a restore). A sink that mirrors the entries elsewhere (a hypervisor's EOI routes) reads
    /// them here; the default does nothing.
    fn redirection_changed(&self, ioapic: &IoApic) {
        let _ = ioapic;
    }
}

/// The local APICs are this crate's: messages go on the APIC bus to the posting inboxes, and a
/// rising INTR wakes the vCPUs whose APIC takes PIC interrupts.
impl MessageSink for ApicSystem {
    fn deliver(
        &self,
        message: &InterruptMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> usize {
        self.bus().deliver(message, notify)
    }

    fn pic_intr_rose(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.wake_pic_acceptors(notify);
    }
}

/// The interrupt chip of a PC: 8259 pair, IOAPIC, GSI routing, and the [`MessageSink`] its
/// messages go to (by default the APIC bus and inboxes). See the module documentation.
pub struct PcIrqChip<S: MessageSink = ApicSystem> {
    config: PcIrqChipConfig,
    // Lock order: routing, pic, ioapic.
    routing: Mutex<GsiRouting>,
    pic: Mutex<DualPic>,
    ioapic: Mutex<IoApic>,
    /// The PIC's INTR as of the last change, stored under the PIC lock (SeqCst) before anyone
    /// is told it rose, so [`PcIrqChip::pic_intr`] is one load, with no lock.
    intr: AtomicBool,
    sink: S,
}

/// The devices a routed change reaches, with the notifications it produced.
struct Sinks<'a> {
    pic: &'a mut DualPic,
    ioapic: &'a mut IoApic,
    sink: &'a dyn MessageSink,
    notes: &'a mut Vec<(VcpuIndex, Notify)>,
}

impl Sinks<'_> {
    /// Applies one change the routing table forwards.
    fn forward(&mut self, target: RouteTarget, level: bool) {
        match target {
            RouteTarget::Pic { irq } => self.pic.set_irq(irq, level),
            RouteTarget::IoApic { pin } => {
                let (sink, notes) = (self.sink, &mut *self.notes);
                self.ioapic
                    .set_line(pin, ioapic_wire_level(pin, level), &mut |message| {
                        post(sink, &message, notes)
                    });
            }
            // The table sends an MSI target on rising edges only.
            RouteTarget::Msi(message) if level => {
                post(self.sink, &message, self.notes);
            }
            RouteTarget::Msi(_) => {}
        }
    }
}

/// Hands `message` to the sink and records the notifications it asks for; returns how many
/// local APICs accepted it.
fn post(
    sink: &dyn MessageSink,
    message: &InterruptMessage,
    notes: &mut Vec<(VcpuIndex, Notify)>,
) -> usize {
    sink.deliver(message, &mut |index, how| notes.push((index, how)))
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
    /// Builds the chip with its local APICs ([`ApicSystem`] as the sink) and the per-vCPU
    /// halves (vCPU i at position i, to move into its thread). The routing table is the PC
    /// default and the PCI pins (16 and up) are driven idle-high.
    pub fn new(config: PcIrqChipConfig) -> (Self, Vec<VcpuInterrupts>) {
        let (apic, vcpus) = ApicSystem::new(config.apic);
        (Self::with_sink(config, apic), vcpus)
    }

    /// [`Self::new`] with vCPU `i`'s inbox ringing and sleeping on `bell(i)`
    /// ([`ApicSystem::with_bells`]).
    pub fn with_bells(
        config: PcIrqChipConfig,
        bell: impl FnMut(VcpuIndex) -> Box<dyn crate::posting::Bell>,
    ) -> (Self, Vec<VcpuInterrupts>) {
        let (apic, vcpus) = ApicSystem::with_bells(config.apic, bell);
        (Self::with_sink(config, apic), vcpus)
    }

    /// The APIC bus and inboxes (for the VMM's kick/wake paths and VMM-originated messages).
    pub fn apic_system(&self) -> &ApicSystem {
        &self.sink
    }

    /// The APIC bus.
    pub fn bus(&self) -> &Arc<VmBus> {
        self.sink.bus()
    }

    /// Checks a whole snapshot against this chip without changing anything: version, vCPU
    /// count, every vCPU part against its vCPU's configuration, and the devices (see
    /// `snapshot`).
    pub fn check_snapshot(&self, snapshot: &ChipSnapshot) -> Result<(), SnapshotError> {
        let configs: Vec<_> = (0..self.sink.vcpus())
            .filter_map(|index| self.sink.lapic_config(index))
            .collect();
        snapshot.check_vcpus(&configs)?;
        self.check_devices(snapshot)
    }

    /// Checks `snapshot` ([`Self::check_snapshot`]) and installs its devices. Then each vCPU
    /// thread restores its own part with [`VcpuInterrupts::restore`]. The VM must be paused.
    pub fn restore_devices(&self, snapshot: &ChipSnapshot) -> Result<(), SnapshotError> {
        self.check_snapshot(snapshot)?;
        self.install_devices(snapshot);
        Ok(())
    }
}

impl<S: MessageSink> PcIrqChip<S> {
    /// Builds the PC platform (PIC, IOAPIC, routing) around `sink`, which receives every
    /// message (see "Where messages go"); `config.apic` is the sink's business and unused here.
    /// The routing table is the PC default and the PCI pins (16 and up) are driven idle-high.
    pub fn with_sink(config: PcIrqChipConfig, sink: S) -> Self {
        let mut ioapic =
            IoApic::new(config.ioapic).with_extended_destination_id(config.extended_destination_id);
        for pin in (0..ioapic.pins()).filter(|pin| pin_is_active_low(*pin)) {
            // Every entry is masked at power-on: this delivers nothing.
            ioapic.set_line(pin, ioapic_wire_level(pin, false), &mut |_| 0);
        }
        let routing = GsiRouting::pc_default(ioapic.pins());
        Self {
            config,
            routing: Mutex::new(routing),
            pic: Mutex::new(DualPic::new()),
            ioapic: Mutex::new(ioapic),
            intr: AtomicBool::new(false),
            sink,
        }
    }

    /// The configuration the chip was built with.
    pub fn config(&self) -> PcIrqChipConfig {
        self.config
    }

    /// The sink the chip's messages go to.
    pub fn sink(&self) -> &S {
        &self.sink
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
                sink: &self.sink,
                notes: &mut notes,
            };
            let result = change(&mut routing, &mut sinks);
            let intr = pic.output();
            // Published before anyone is told (below, and the notifications after the
            // unlock), so a vCPU woken for INTR reads it high.
            self.intr.store(intr, Ordering::SeqCst);
            if !intr_before && intr {
                self.sink
                    .pic_intr_rose(&mut |index, how| notes.push((index, how)));
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

    /// A device's MSI write, decoded once and handed to the sink (no device lock: an MSI passes
    /// through no device). Returns the number of vCPUs it reached. A message that does not
    /// decode (address outside 0xFEExxxxx, reserved delivery mode) reaches nobody.
    pub fn signal_msi(
        &self,
        msi: MsiMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> Result<usize, MsiError> {
        let message = self.decode_msi(msi)?;
        Ok(self.deliver(&message, notify))
    }

    /// An MSI as the message [`Self::signal_msi`] delivers (the chip's destination layout).
    pub fn decode_msi(&self, msi: MsiMessage) -> Result<InterruptMessage, MsiError> {
        msi.decode_with(self.config.msi_addressing())
    }

    /// Hands a message of the VMM's own to the sink (an NMI from the watchdog, for instance).
    pub fn deliver(
        &self,
        message: &InterruptMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> usize {
        // No device lock is held here, so the notifications need no buffering: the sink hands
        // them straight to `notify` (and the APIC bus allocates nothing).
        self.sink.deliver(message, notify)
    }

    /// A local APIC's broadcast EOI of a level-triggered vector: clears remote IRR of the IOAPIC
    /// entries with that vector and re-delivers those whose line is still asserted (82093AA
    /// §3.2.4; SDM vol. 3 §11.8.5).
    pub fn eoi(&self, eoi: EoiMessage, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.with_devices(notify, |_, sinks| {
            let (sink, notes) = (sinks.sink, &mut *sinks.notes);
            sinks
                .ioapic
                .end_of_interrupt(eoi.vector, &mut |message| post(sink, &message, notes));
        });
    }

    // ---- guest accesses ----

    /// A guest read of the IOAPIC's MMIO window (`offset` from its base). No side effects.
    pub fn ioapic_mmio_read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.ioapic).mmio_read(offset, data);
    }

    /// A guest write to the IOAPIC's MMIO window; deliveries it causes (an unmasked asserted
    /// level entry, the EOI register) go to the sink, which then sees the redirection table
    /// ([`MessageSink::redirection_changed`]), still under the IOAPIC lock.
    pub fn ioapic_mmio_write(
        &self,
        offset: u64,
        data: &[u8],
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) {
        self.with_devices(notify, |_, sinks| {
            let (sink, notes) = (sinks.sink, &mut *sinks.notes);
            sinks
                .ioapic
                .mmio_write(offset, data, &mut |message| post(sink, &message, notes));
            sink.redirection_changed(sinks.ioapic);
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

    /// [`Self::pic_port_write`], returning the ISA IRQs the write took out of service (bit n =
    /// IRQ n, see `DualPic::in_service_irqs`): what an OCW2 EOI (specific or not) ended, for an
    /// observer that joins the EOI with the interrupt it ends.
    pub fn pic_port_write_ending(
        &self,
        port: u16,
        value: u8,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> u16 {
        self.with_devices(notify, |_, sinks| {
            let before = sinks.pic.in_service_irqs();
            sinks.pic.port_write(port, value);
            before & !sinks.pic.in_service_irqs()
        })
    }

    /// The ISA IRQ whose INTA gave `vector` (`DualPic::irq_of_vector`), read under the PIC lock.
    pub fn pic_irq_of_vector(&self, vector: Vector) -> Option<u8> {
        lock(&self.pic).irq_of_vector(vector)
    }

    /// The 8259's INTR output: pass it to [`VcpuInterrupts::next_injection`]. One atomic load
    /// (the value every change of the PIC publishes), so a vCPU may read it before each entry.
    pub fn pic_intr(&self) -> bool {
        self.intr.load(Ordering::SeqCst)
    }

    /// The INTA cycle: the vector to inject for an ExtINT. Call it only when the vCPU is
    /// certain to inject (it moves the request into the PIC's ISR).
    pub fn pic_acknowledge(&self) -> Vector {
        let mut pic = lock(&self.pic);
        let vector = pic.acknowledge();
        self.intr.store(pic.output(), Ordering::SeqCst);
        vector
    }

    /// The INTA cycle only if INTR is still high, checked and acknowledged under one lock: of
    /// several vCPUs that race for one request, exactly one gets its vector (the others
    /// `None`). For a VMM that cannot tell in advance which vCPU takes the PIC's interrupt.
    pub fn pic_acknowledge_if_pending(&self) -> Option<Vector> {
        let mut pic = lock(&self.pic);
        let vector = pic.output().then(|| pic.acknowledge());
        self.intr.store(pic.output(), Ordering::SeqCst);
        vector
    }

    /// A system reset of the devices (PIC and IOAPIC to their power-on registers). Line levels
    /// and routes are outside the chips and are kept.
    pub fn reset_devices(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        self.with_devices(notify, |_, sinks| {
            sinks.pic.reset();
            sinks.ioapic.reset();
            sinks.sink.redirection_changed(sinks.ioapic);
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

    /// Checks the device part of `snapshot` against this chip's shape (IOAPIC, destinations,
    /// levels consistent with routing).
    fn check_devices(&self, snapshot: &ChipSnapshot) -> Result<(), SnapshotError> {
        self.check_device_state(&snapshot.devices)
    }

    /// Checks a device snapshot alone against this chip's shape (IOAPIC, destinations, levels
    /// consistent with routing), whatever the sink: for a VMM whose local APICs are not the
    /// model's (KVM's in `split` mode).
    pub fn check_device_state(&self, devices: &DeviceSnapshot) -> Result<(), SnapshotError> {
        devices.check(
            self.config.ioapic.clamped(),
            self.config.extended_destination_id,
            ioapic_wire_level,
        )
    }

    /// Checks ([`Self::check_device_state`]) and installs a device snapshot alone, telling the
    /// sink the new redirection table. The VM must be paused.
    pub fn restore_device_state(&self, devices: &DeviceSnapshot) -> Result<(), SnapshotError> {
        self.check_device_state(devices)?;
        self.install_device_state(devices);
        Ok(())
    }

    /// Installs the (checked) devices of `snapshot`.
    fn install_devices(&self, snapshot: &ChipSnapshot) {
        self.install_device_state(&snapshot.devices);
    }

    fn install_device_state(&self, devices: &DeviceSnapshot) {
        let mut routing = lock(&self.routing);
        let mut pic = lock(&self.pic);
        let mut ioapic = lock(&self.ioapic);
        *routing = devices.routing.clone();
        *pic = devices.pic.clone();
        *ioapic = devices.ioapic.clone();
        self.intr.store(pic.output(), Ordering::SeqCst);
        self.sink.redirection_changed(&ioapic);
    }
}

/// Why [`PcIrqChip::bind_msi`] failed: the message does not decode, or the route is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindMsiError {
    #[error(transparent)]
    /// The MSI address/data pair does not decode to an interrupt message.
    Msi(#[from] MsiError),
    #[error(transparent)]
    /// The routing table refused the route (for example a GSI past the table).
    Routing(#[from] RoutingError),
}

// Single-threaded tests of the chip's logic. Every chip owns `VcpuInterrupts`, whose inboxes use
// the `sync` wrappers; under `--features loom` those are loom's and panic outside a loom model.
// The cross-thread protocol they wrap is model-checked by tests/loom_posting.rs, and these tests
// run in the default build (`cargo test`), as posting.rs's own unit tests do.
#[cfg(all(test, not(feature = "loom")))]
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

    /// 82093AA §3.2.4 (and KVM): a level entry's remote IRR is set only when a local APIC
    /// accepted its message. Neither an absent APIC ID nor a software-disabled APIC accepts a
    /// fixed interrupt (SDM vol. 3 §11.4.7.2), so the held line stays unblocked and goes out
    /// again when the guest points the entry at a CPU that takes it.
    #[test]
    fn level_entry_remote_irr_waits_for_an_accepting_apic() {
        let (chip, mut cpus) = chip(2);
        // CPU 0 software-enabled; CPU 1 keeps its reset SVR (software-disabled).
        cpus[0].mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0, &mut |_, _| {});
        let program = |destination: u32| {
            for (index, value) in [(0x19u32, destination << 24), (0x18, 0x44 | 1 << 15)] {
                chip.ioapic_mmio_write(0, &index.to_le_bytes(), &mut |_, _| {});
                chip.ioapic_mmio_write(0x10, &value.to_le_bytes(), &mut |_, _| {});
            }
        };
        let remote_irr = || chip.save_devices().ioapic.entry(4).unwrap().remote_irr();
        program(0x55);
        chip.set_gsi(4, SourceId(0), true, &mut |_, _| {}).unwrap();
        assert!(!remote_irr(), "absent destination");
        program(1);
        assert!(!remote_irr(), "software-disabled destination");
        assert!(!cpus[1].inbox().has_pending());
        program(0);
        assert!(remote_irr(), "CPU 0 took it");
        assert!(cpus[0].inbox().has_pending());
    }

    /// What a [`MessageSink`] was told, in order.
    #[derive(Debug, PartialEq)]
    enum SinkEvent {
        Message(InterruptMessage),
        IntrRose,
        /// The vector of pin 4's entry when the redirection table was shown.
        Table(Option<Vector>),
    }

    /// A sink that records every call: the chip's side of a VMM whose APICs are elsewhere.
    #[derive(Default)]
    struct RecordingSink(Mutex<Vec<SinkEvent>>);

    impl MessageSink for RecordingSink {
        fn deliver(
            &self,
            message: &InterruptMessage,
            notify: &mut dyn FnMut(VcpuIndex, Notify),
        ) -> usize {
            lock(&self.0).push(SinkEvent::Message(*message));
            notify(0, Notify::Kick);
            1
        }

        fn pic_intr_rose(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
            lock(&self.0).push(SinkEvent::IntrRose);
            notify(1, Notify::Kick);
        }

        fn redirection_changed(&self, ioapic: &IoApic) {
            let vector = ioapic.entry_message(4).map(|m| m.vector);
            lock(&self.0).push(SinkEvent::Table(vector));
        }
    }

    /// The chip with both 8259As masked (they start unmasked, as KVM's), as a guest that uses
    /// the IOAPIC leaves them, so device lines show only as IOAPIC messages.
    fn sink_chip() -> PcIrqChip<RecordingSink> {
        let chip = PcIrqChip::with_sink(PcIrqChipConfig::new(2), RecordingSink::default());
        chip.pic_port_write(crate::pic::MASTER_DATA_PORT, 0xFF, &mut |_, _| {});
        chip.pic_port_write(crate::pic::SLAVE_DATA_PORT, 0xFF, &mut |_, _| {});
        take(&chip);
        chip
    }

    fn take(chip: &PcIrqChip<RecordingSink>) -> Vec<SinkEvent> {
        std::mem::take(&mut *lock(&chip.sink().0))
    }

    /// Writes the low dword of pin `pin`'s redirection entry (82093AA §3.2.4: IOREGSEL at 0,
    /// IOWIN at 0x10, entry n at index 0x10 + 2n) and its destination (APIC ID 0).
    fn program_pin(chip: &PcIrqChip<RecordingSink>, pin: u8, low: u32) {
        let write = |index: u8, value: u32| {
            chip.ioapic_mmio_write(0, &u32::from(index).to_le_bytes(), &mut |_, _| {});
            chip.ioapic_mmio_write(0x10, &value.to_le_bytes(), &mut |_, _| {});
        };
        write(0x11 + 2 * pin, 0);
        write(0x10 + 2 * pin, low);
    }

    /// An edge on a device line reaches the sink as the IOAPIC entry's message, and the
    /// notifications the sink asks for reach the caller.
    #[test]
    fn ioapic_messages_go_to_the_sink() {
        let chip = sink_chip();
        program_pin(&chip, 4, 0x41);
        let shown = take(&chip);
        assert_eq!(
            shown.len(),
            4,
            "every IOAPIC write shows the table: {shown:?}"
        );
        assert_eq!(shown.last(), Some(&SinkEvent::Table(Some(0x41))));
        let mut notes = Vec::new();
        chip.pulse_gsi(4, SourceId(0), &mut |i, how| notes.push((i, how)))
            .unwrap();
        assert_eq!(
            take(&chip),
            vec![SinkEvent::Message(InterruptMessage::fixed(0x41, 0))]
        );
        assert_eq!(notes, vec![(0, Notify::Kick)]);
    }

    /// A level pin sends once, holds (remote IRR) while the line stays high, and sends again
    /// after the EOI the VMM reports: the EOI bookkeeping a split irqchip relies on.
    #[test]
    fn level_pins_resend_after_eoi_through_the_sink() {
        let chip = sink_chip();
        program_pin(&chip, 4, 0x42 | 1 << 15);
        take(&chip);
        chip.set_gsi(4, SourceId(0), true, &mut |_, _| {}).unwrap();
        chip.set_gsi(4, SourceId(1), true, &mut |_, _| {}).unwrap();
        let sent = take(&chip);
        assert_eq!(
            sent.len(),
            1,
            "remote IRR holds the second assertion: {sent:?}"
        );
        assert!(matches!(&sent[0], SinkEvent::Message(m) if m.vector == 0x42));
        chip.eoi(EoiMessage { vector: 0x42 }, &mut |_, _| {});
        assert!(matches!(&take(&chip)[..], [SinkEvent::Message(m)] if m.vector == 0x42));
        chip.set_gsi(4, SourceId(0), false, &mut |_, _| {}).unwrap();
        chip.set_gsi(4, SourceId(1), false, &mut |_, _| {}).unwrap();
        chip.eoi(EoiMessage { vector: 0x42 }, &mut |_, _| {});
        assert_eq!(take(&chip), vec![], "a lowered line is not sent again");
    }

    /// INTR rising is reported to the sink once, `pic_intr` follows it without a lock, and of
    /// two acknowledgements racing for one request only the first gets the vector.
    #[test]
    fn pic_intr_rises_through_the_sink_and_is_acknowledged_once() {
        let chip = sink_chip();
        // ICW1-4: vectors 0x30-0x37, slave on IRQ 2, 8086 mode; unmask IRQ 0.
        for (port, value) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01)] {
            chip.pic_port_write(port, value, &mut |_, _| {});
        }
        chip.pic_port_write(0x21, 0xFE, &mut |_, _| {});
        take(&chip);
        assert!(!chip.pic_intr());
        let mut notes = Vec::new();
        chip.set_gsi(0, SourceId(0), true, &mut |i, how| notes.push((i, how)))
            .unwrap();
        assert!(chip.pic_intr());
        assert_eq!(take(&chip), vec![SinkEvent::IntrRose]);
        assert_eq!(notes, vec![(1, Notify::Kick)]);
        assert_eq!(chip.pic_acknowledge_if_pending(), Some(0x30));
        assert_eq!(chip.pic_acknowledge_if_pending(), None);
        assert!(!chip.pic_intr());
    }

    /// An MSI is decoded once and handed to the sink; a malformed one reaches nobody.
    #[test]
    fn msis_are_decoded_and_handed_to_the_sink() {
        let chip = sink_chip();
        let msi = MsiMessage {
            address: 0xFEE0_1000,
            data: 0x45,
        };
        assert_eq!(chip.signal_msi(msi, &mut |_, _| {}), Ok(1));
        assert_eq!(
            take(&chip),
            vec![SinkEvent::Message(InterruptMessage::fixed(0x45, 1))]
        );
        let bad = MsiMessage {
            address: 0xFED0_0000,
            data: 0x45,
        };
        assert!(chip.signal_msi(bad, &mut |_, _| {}).is_err());
        assert_eq!(take(&chip), vec![]);
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
