//! `split` mode: the local APICs are KVM's (KVM_CAP_SPLIT_IRQCHIP), the IOAPIC, the dual 8259
//! PIC and the GSI routing table are userspace models from the `irqchip` crate.
//!
//! # What runs where
//!
//! * KVM: every LAPIC register (no exit), the APIC timer, IPIs, HLT (a halted vCPU blocks
//!   inside KVM_RUN), INIT/SIPI and the MP state. `before_entry` therefore always says `Enter`.
//! * Userspace: the same `irqchip::chip::PcIrqChip` as in `user` mode (`GsiRouting::pc_default`:
//!   ISA IRQ n to PIC line n and IOAPIC pin n, IRQ 0 to pin 2, GSIs 16-23 to the IOAPIC only;
//!   the `DualPic` at ports 0x20/0x21, 0xA0/0xA1 and 0x4D0/0x4D1; the `IoApic` at 0xFEC00000;
//!   PCI pins 16 and up active-low), so `user` and `split` guests see the same machine. Only
//!   its [`MessageSink`] differs: [`KvmSink`] instead of the APIC bus.
//!
//! # IOAPIC messages
//!
//! The IOAPIC model decides when a pin sends (edge, level with remote IRR, re-delivery after
//! EOI, unmasking a held level pin); each message it sends reaches [`KvmSink::deliver`], is
//! encoded as an MSI (`irqchip::msi::MsiMessage::encode`) and handed to KVM's LAPICs with
//! KVM_SIGNAL_MSI, under the chip's device locks, so messages reach KVM in the order the model
//! produced them.
//!
//! KVM must also report the guest's EOI of a level-triggered IOAPIC vector, which its LAPIC
//! otherwise keeps to itself: KVM reserves GSIs `0..pins` for the userspace IOAPIC and, for each
//! MSI route on those GSIs whose data says "level", makes its LAPIC exit with
//! KVM_EXIT_IOAPIC_EOI when that vector is EOIed on a vCPU the route targets. So pin i is
//! routed as GSI i with the message its redirection entry describes, masked or not (an entry
//! masked while its interrupt is in service must still see the EOI, or remote IRR would stick),
//! and every redirection-table write that changes a route reinstalls the table
//! (KVM_SET_GSI_ROUTING, from [`KvmSink::redirection_changed`], under the IOAPIC lock). The routes are never fired: delivery is KVM_SIGNAL_MSI, decided by the
//! model. The EOI exit is handled on the vCPU thread before it re-enters: remote IRR clears and
//! a line still asserted is delivered again.
//!
//! # The PIC's ExtINT (seed 003)
//!
//! With the LAPIC in KVM, only KVM knows whether a vCPU's LINT0 accepts the PIC (unmasked
//! ExtINT, or the APIC hardware-disabled): it sets `kvm_run.ready_for_interrupt_injection` only
//! when that LAPIC accepts PIC interrupts *and* the vCPU can take an interrupt now (IF=1, no
//! interrupt shadow, no ExtINT already queued). The protocol:
//!
//! 1. Any change that raises the PIC's INTR (a device line, a PIC port write) publishes it
//!    (`PcIrqChip::pic_intr`, one atomic) and, through [`KvmSink::pic_intr_rose`], kicks every
//!    other vCPU: an acceptor in the guest or halted inside KVM_RUN must come out to
//!    rendezvous, and which vCPUs accept is not known here.
//! 2. At every entry, a vCPU that sees INTR high reads `ready_for_interrupt_injection` from its
//!    last exit. If set, it takes the PIC lock, checks INTR again and runs the PIC's INTA
//!    (`PcIrqChip::pic_acknowledge_if_pending`), and queues the vector with KVM_INTERRUPT: KVM said it will inject
//!    it at this entry, so the PIC is acknowledged only when the injection is certain, and the
//!    lock makes exactly one vCPU win each request. A halted acceptor wakes (KVM's halt loop
//!    sees the queued ExtINT).
//! 3. Otherwise (IF=0, or KVM still holds an ExtINT) it sets `request_interrupt_window`; KVM
//!    returns KVM_EXIT_IRQ_WINDOW_OPEN when the vCPU can take an interrupt, and step 2 runs at
//!    that entry. A vCPU whose LINT0 does not accept never gets that exit: the request costs it
//!    nothing.
//!
//! A vector queued with KVM_INTERRUPT is not in KVM_GET_VCPU_EVENTS until KVM injects it at the
//! next guest entry (`docs/kvm-facts.md`); as injection happens in `before_entry`, right before
//! KVM_RUN, only a KVM_RUN that returns before entering (a kick's `immediate_exit`) leaves it
//! queued across a loop iteration. A snapshot taken at the top of the vCPU loop therefore first
//! runs the vCPU into the guest once more (`VcpuIrqchip::injection_in_flight`, see
//! `crate::snapshot`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use irqchip::chip::{MessageSink, PcIrqChip, PcIrqChipConfig};
use irqchip::ioapic::{IoApic, IOAPIC_DEFAULT_BASE};
use irqchip::msi::{MsiAddressing, MsiError, MsiMessage};
use irqchip::pic::DualPic;
use irqchip::routing::SourceId;
use irqchip::{DeliveryMode, EoiMessage, InterruptMessage, Notify, VcpuIndex, Vector};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use super::eoi_probe::{EoiProbe, OutstandingEois};
use super::kernel::{
    kvm_mp_state, kvm_restore_apic, kvm_restore_events, kvm_save_fabric, kvm_signal_msi,
    set_initial_kvm_mp_state, KvmApicIds, SuppressEoiBroadcast,
};
use super::step::Stepper;
use super::{
    validate_msi, ChipContext, ChipExit, ChipFeatures, EntryDecision, ExitHandled, HostEvent,
    InterruptLines, Irqchip, IrqchipError, IrqchipMode, MsiDelivery, PlatformFabric, VcpuFabric,
    VcpuIrqchip, VcpuKicker, IRQ_LINES,
};
use crate::api::model::PlatformInfo;
use crate::kvm::{self, KvmError};

/// Size of the IOAPIC's MMIO window claimed from the exits.
const IOAPIC_WINDOW: u64 = 0x1000;
/// The one source that drives every GSI from the VMM's devices.
const DEVICE_SOURCE: SourceId = SourceId(0);

thread_local! {
    /// The index of the split-mode vCPU this thread runs, so that a PIC change made by a vCPU's
    /// own exit does not kick that vCPU (it looks at INTR before re-entering anyway).
    static CURRENT_VCPU: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Counters of the split backend (relaxed; reports, tests and the docs' measurements).
#[derive(Debug, Default)]
pub struct SplitStats {
    /// IOAPIC messages handed to KVM with KVM_SIGNAL_MSI.
    pub msis_signalled: AtomicU64,
    /// KVM_EXIT_IOAPIC_EOI exits handled.
    pub ioapic_eois: AtomicU64,
    /// KVM_SET_GSI_ROUTING calls made after redirection-table changes.
    pub route_updates: AtomicU64,
    /// PIC vectors acknowledged and queued with KVM_INTERRUPT.
    pub extints_injected: AtomicU64,
    /// Entries made with `request_interrupt_window` set for a pending ExtINT.
    pub window_requests: AtomicU64,
    /// Kicks sent because the PIC's INTR rose.
    pub extint_kicks: AtomicU64,
    /// Well-formed MSIs from host threads and devices (`InterruptLines::signal_msi`).
    pub host_msis: AtomicU64,
    /// EOI probes that found their vCPU halted with level EOIs outstanding and ran KVM's loop
    /// for it (`backend::eoi_probe`).
    pub eoi_probe_wakes: AtomicU64,
}

/// A plain copy of [`SplitStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitStatsSnapshot {
    pub msis_signalled: u64,
    pub ioapic_eois: u64,
    pub route_updates: u64,
    pub extints_injected: u64,
    pub window_requests: u64,
    pub extint_kicks: u64,
    pub host_msis: u64,
    pub eoi_probe_wakes: u64,
}

impl SplitStats {
    pub fn snapshot(&self) -> SplitStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SplitStatsSnapshot {
            msis_signalled: get(&self.msis_signalled),
            ioapic_eois: get(&self.ioapic_eois),
            route_updates: get(&self.route_updates),
            extints_injected: get(&self.extints_injected),
            window_requests: get(&self.window_requests),
            extint_kicks: get(&self.extint_kicks),
            host_msis: get(&self.host_msis),
            eoi_probe_wakes: get(&self.eoi_probe_wakes),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Where the userspace IOAPIC's messages go in `split` mode: KVM's LAPICs (KVM_SIGNAL_MSI), with
/// the redirection table mirrored into KVM's EOI routes (module documentation).
pub struct KvmSink {
    vm: Arc<VmFd>,
    /// The flight recorder: each message handed to KVM is a post without a target.
    tracer: Arc<crate::trace::Tracer>,
    kicker: Arc<dyn VcpuKicker>,
    stats: SplitStats,
    /// How the guest's IOAPIC entries and MSIs carry destinations (extended destination ID
    /// when advertised).
    addressing: MsiAddressing,
    /// How KVM reads APIC IDs in this VM (with or without 32-bit IDs).
    ids: KvmApicIds,
    /// The MSI route of each IOAPIC pin as last installed in KVM (index = pin = GSI), and the
    /// last KVM_SET_GSI_ROUTING failure, which the vCPU whose IOAPIC write caused it reports.
    routes: Mutex<InstalledRoutes>,
    /// Level-triggered messages whose EOI exit has not come yet ([`super::eoi_probe`]).
    outstanding: OutstandingEois,
}

#[derive(Default)]
struct InstalledRoutes {
    installed: Vec<Option<MsiMessage>>,
    failure: Option<KvmError>,
}

impl KvmSink {
    fn routes(&self) -> std::sync::MutexGuard<'_, InstalledRoutes> {
        // Plain data, valid between calls: a panic elsewhere does not corrupt it.
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs the pins' MSI routes in KVM (KVM_SET_GSI_ROUTING replaces the whole table; KVM
    /// then rescans which vectors need an EOI exit on each vCPU).
    fn install(&self, wanted: &[Option<MsiMessage>]) -> Result<(), KvmError> {
        let routes: Vec<(u32, MsiMessage)> = wanted
            .iter()
            .enumerate()
            .filter_map(|(pin, r)| r.map(|msi| (pin as u32, msi)))
            .collect();
        let mut table = KvmIrqRouting::new(routes.len()).map_err(|_| KvmError::TooManyEntries {
            what: "KVM_SET_GSI_ROUTING table",
            entries: routes.len(),
        })?;
        for (slot, (gsi, msi)) in table.as_mut_slice().iter_mut().zip(&routes) {
            *slot = msi_route(*gsi, *msi);
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(KvmError::ioctl("KVM_SET_GSI_ROUTING"))?;
        bump(&self.stats.route_updates);
        Ok(())
    }

    /// The KVM_SET_GSI_ROUTING failure of the last redirection-table change, if any.
    fn take_route_failure(&self) -> Option<KvmError> {
        self.routes().failure.take()
    }
}

impl MessageSink for KvmSink {
    /// KVM_SIGNAL_MSI of the message (under the chip's locks: in the model's order).
    fn deliver(&self, message: &InterruptMessage, _: &mut dyn FnMut(VcpuIndex, Notify)) -> usize {
        if message.delivery_mode == DeliveryMode::ExtInt {
            // An IOAPIC entry in ExtINT mode asks the target to fetch the vector from the 8259
            // (virtual wire through the IOAPIC). The PC wiring here connects INTR to LINT0 only
            // and KVM's LAPIC cannot take an ExtINT message, so it is dropped.
            tracing::debug!(
                ?message,
                "IOAPIC ExtINT message dropped (not wired in split mode)"
            );
            return 0;
        }
        let msi = match kvm_msi(message, self.addressing, self.ids) {
            Ok(Some(msi)) => msi,
            Ok(None) => {
                tracing::debug!(?message, "IOAPIC message names an APIC ID no vCPU has");
                let at = crate::trace::hooks::stamp(&self.tracer);
                crate::trace::hooks::untargeted_post(&self.tracer, at, message, None, false);
                return 0;
            }
            Err(e) => {
                crate::warn_ratelimited!(?message, "IOAPIC message has no MSI form: {e}");
                return 0;
            }
        };
        bump(&self.stats.msis_signalled);
        if message.trigger == irqchip::TriggerMode::Level {
            // The one level latency split mode can see: post to KVM's EOI exit.
            let latency = self.tracer.latency();
            latency.level_posted(message.vector, self.tracer.now());
        }
        let at = crate::trace::hooks::stamp(&self.tracer);
        let result = kvm_signal_msi(&self.vm, msi);
        let reached = matches!(result, Ok(MsiDelivery::Delivered));
        if reached && message.trigger == irqchip::TriggerMode::Level {
            self.outstanding.signalled();
        }
        crate::trace::hooks::untargeted_post(&self.tracer, at, message, None, reached);
        match result {
            Ok(MsiDelivery::Delivered) => 1,
            Ok(MsiDelivery::NoTarget) => {
                tracing::debug!(?message, "KVM_SIGNAL_MSI reached no vCPU");
                0
            }
            Err(e) => {
                // What the guest programmed cannot reach a vCPU: dropped, as hardware would.
                crate::warn_ratelimited!(?message, "{e}");
                0
            }
        }
    }

    /// INTR rose: every vCPU except the calling one comes out of KVM_RUN once to check whether
    /// its LAPIC takes the PIC's interrupt (only KVM knows, see the module documentation).
    fn pic_intr_rose(&self, notify: &mut dyn FnMut(VcpuIndex, Notify)) {
        let me = CURRENT_VCPU.with(Cell::get);
        for index in (0..self.kicker.vcpus()).filter(|&i| Some(i) != me) {
            bump(&self.stats.extint_kicks);
            notify(index, Notify::Kick);
        }
    }

    /// Reinstalls the EOI routes if a pin's wanted route changed.
    fn redirection_changed(&self, ioapic: &IoApic) {
        let wanted: Vec<Option<MsiMessage>> = (0..ioapic.pins())
            .map(|pin| eoi_route(ioapic, pin, self.addressing, self.ids))
            .collect();
        let mut routes = self.routes();
        if wanted == routes.installed {
            return;
        }
        match self.install(&wanted) {
            Ok(()) => routes.installed = wanted,
            Err(e) => routes.failure = Some(e),
        }
    }
}

/// The MSI route pin `pin` needs now: its entry's message whether masked or not, with the
/// entry's trigger mode (a level route is what makes KVM exit on the EOI). `None` for delivery
/// modes that have no EOI and no MSI form here (ExtINT, reserved), and for a destination no
/// vCPU holds.
fn eoi_route(
    ioapic: &IoApic,
    pin: usize,
    addressing: MsiAddressing,
    ids: KvmApicIds,
) -> Option<MsiMessage> {
    let message = ioapic.entry_message(pin)?;
    if !matches!(
        message.delivery_mode,
        DeliveryMode::Fixed | DeliveryMode::LowestPriority
    ) {
        return None;
    }
    kvm_msi(&message, addressing, ids).ok().flatten()
}

/// `message` as an MSI in the form KVM reads with the VM's APIC ID setting (`None`: see
/// [`to_kvm_format`]).
fn kvm_msi(
    message: &InterruptMessage,
    addressing: MsiAddressing,
    ids: KvmApicIds,
) -> Result<Option<MsiMessage>, MsiError> {
    MsiMessage::encode_with(message, addressing).map(|msi| to_kvm_format(msi, ids))
}

/// Address bit 2: the destination mode (1 = logical, SDM vol. 3 §11.11.1).
const MSI_LOGICAL: u64 = 1 << 2;

/// An MSI with an extended destination ID (address bits 11:5, destination bits 14:8) as KVM
/// must get it. KVM itself ignores bits 11:5; QEMU, which advertises
/// KVM_FEATURE_MSI_EXT_DEST_ID the same way, translates before handing an MSI to KVM.
/// - With 32-bit APIC IDs on ([`KvmApicIds::Wide`]) the bits move to where KVM reads
///   destination bits 31:8: `address_hi[31:8]` (KVM's `x86_msi_msg_get_destid`).
/// - Without them KVM reads 8 bits, and every APIC ID is below 255. A physical destination past
///   8 bits names no vCPU: `None` (KVM would have truncated it to another vCPU's ID). A logical
///   one keeps its low 8 bits; that loses only x2APIC-mode vCPUs 8-14 of cluster 0, which a
///   15-bit logical destination could name and which no guest reaches this way (Linux uses the
///   extended ID in physical mode only).
///
/// A message without the extended bits is unchanged.
pub(crate) fn to_kvm_format(msi: MsiMessage, ids: KvmApicIds) -> Option<MsiMessage> {
    const EXT_DEST_SHIFT: u32 = 5;
    const EXT_DEST_MASK: u64 = 0x7F << EXT_DEST_SHIFT;
    let ext = (msi.address & EXT_DEST_MASK) >> EXT_DEST_SHIFT;
    if ext == 0 {
        return Some(msi);
    }
    let low = msi.address & !EXT_DEST_MASK;
    let address = match ids {
        KvmApicIds::Wide => low | (ext << 8) << 32,
        KvmApicIds::Xapic if msi.address & MSI_LOGICAL != 0 => low,
        KvmApicIds::Xapic => return None,
    };
    Some(MsiMessage {
        address,
        data: msi.data,
    })
}

/// One `KVM_IRQ_ROUTING_MSI` entry.
fn msi_route(gsi: u32, msi: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = msi.address as u32;
    entry.u.msi.address_hi = (msi.address >> 32) as u32;
    entry.u.msi.data = msi.data;
    entry
}

/// Everything the split backend shares between threads: the PC platform with its KVM sink.
pub struct SplitShared {
    chip: PcIrqChip<KvmSink>,
    kicker: Arc<dyn VcpuKicker>,
}

impl SplitShared {
    fn stats(&self) -> &SplitStats {
        &self.chip.sink().stats
    }

    fn tracer(&self) -> &crate::trace::Tracer {
        &self.chip.sink().tracer
    }

    /// Carries out what a chip call asks for: the sink only ever asks for kicks.
    fn notify(&self) -> impl FnMut(VcpuIndex, Notify) + '_ {
        |index, how| {
            if how != Notify::None {
                crate::trace::hooks::notified(self.tracer(), index, true);
                self.kicker.kick(index);
            }
        }
    }

    /// Drives a device line: recorded as a line change, and the IOAPIC's messages it causes as
    /// posts from that GSI.
    fn set_gsi(&self, gsi: u32, level: bool) {
        let tracer = self.tracer();
        crate::trace::hooks::line(tracer, gsi, level);
        let source = crate::trace::Source::Ioapic(u8::try_from(gsi).ok());
        let set = || {
            self.chip
                .set_gsi(gsi, DEVICE_SOURCE, level, &mut self.notify())
        };
        if let Err(e) = crate::trace::hooks::posting_for(tracer, source, set) {
            // Only a GSI above the table or too many sources can fail; neither is reachable
            // through `InterruptLines` (lines are checked, one source), so it is only logged.
            crate::warn_ratelimited!(gsi, level, "GSI routing: {e}");
        }
    }

    /// A guest write to the IOAPIC window: may send (unmasking a held level pin, the EOI
    /// register) and may change routes, which are reinstalled before the vCPU re-enters.
    fn ioapic_write(&self, offset: u64, data: &[u8]) -> Result<(), IrqchipError> {
        if offset == u64::from(irqchip::ioapic::EOI_OFFSET) {
            // A directed EOI (SVR bit 12 set): KVM, honouring the suppression, sent no EOI exit
            // for it, so it is the EOI the probe waits for. (A guest that also writes the
            // register after a broadcast EOI makes the count run low early: the probe then rests
            // until the next level message, which is all the count decides.)
            self.chip.sink().outstanding.eoi_seen();
            crate::trace::hooks::ioapic_eoi_register(self.tracer(), data);
        }
        let source = crate::trace::Source::Ioapic(None);
        crate::trace::hooks::posting_for(self.tracer(), source, || {
            self.chip
                .ioapic_mmio_write(offset, data, &mut self.notify())
        });
        match self.chip.sink().take_route_failure() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// KVM_EXIT_IOAPIC_EOI: the guest EOIed a level-triggered vector of the IOAPIC.
    fn ioapic_eoi(&self, vector: Vector) {
        bump(&self.stats().ioapic_eois);
        self.chip.sink().outstanding.eoi_seen();
        let source = crate::trace::Source::Ioapic(None);
        crate::trace::hooks::posting_for(self.tracer(), source, || {
            self.chip.eoi(EoiMessage { vector }, &mut self.notify())
        });
    }

    /// A guest `in` from PIC ports, byte by byte (a poll-mode read is an INTA).
    fn pic_read(&self, port: u16, data: &mut [u8]) {
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
    fn pic_write(&self, port: u16, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if DualPic::handles_port(p) {
                crate::trace::hooks::pic_write(
                    self.tracer(),
                    || {
                        self.chip
                            .pic_port_write_ending(p, *byte, &mut self.notify())
                    },
                    || self.chip.pic_port_write(p, *byte, &mut self.notify()),
                );
            }
        }
    }
}

/// `split` mode. See the module documentation.
pub struct SplitIrqchip {
    shared: Arc<SplitShared>,
    features: ChipFeatures,
    cpu: crate::cpumodel::CpuModel,
    /// The flight recorder: entries and exits (the vCPU loop); here the device lines, each
    /// message handed to KVM (the sink's posts, host MSIs and events), kicks, the PIC's INTA,
    /// ExtINT injection and OCW2 EOI, and the EOI exits of level-triggered IOAPIC vectors;
    /// KVM's LAPICs show nothing else.
    tracer: Arc<crate::trace::Tracer>,
    /// Guest RAM, for the vCPUs' single-stepping ([`crate::backend::step`]).
    memory: crate::memory::GuestRam,
    /// `VmConfig::exact_irq_boundaries`.
    exact_irq_boundaries: bool,
}

impl SplitIrqchip {
    /// KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP) with the IOAPIC's pin count as the number of
    /// reserved GSIs, before any vCPU exists.
    pub fn new(ctx: ChipContext<'_>) -> Result<Self, IrqchipError> {
        crate::kvm::require_cap(ctx.kvm, Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP")?;
        let mut config = PcIrqChipConfig::new(ctx.kicker.vcpus());
        config.extended_destination_id = ctx.cpu.ext_dest_id;
        let pins = config.ioapic.clamped().pins;
        let ids = KvmApicIds::for_model(&ctx.cpu);
        let sink = KvmSink {
            ids,
            addressing: if ctx.cpu.ext_dest_id {
                MsiAddressing::ExtendedDestId
            } else {
                MsiAddressing::Standard
            },
            vm: ctx.vm.clone(),
            tracer: ctx.tracer.clone(),
            kicker: ctx.kicker.clone(),
            stats: SplitStats::default(),
            outstanding: OutstandingEois::default(),
            routes: Mutex::new(InstalledRoutes {
                installed: vec![None; pins],
                failure: None,
            }),
        };
        let chip = PcIrqChip::with_sink(config, sink);
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = pins as u64;
        ctx.vm
            .enable_cap(&cap)
            .map_err(KvmError::ioctl("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
        super::kernel::enable_x2apic_api(
            ctx.kvm,
            &ctx.vm,
            ids,
            SuppressEoiBroadcast::HonourWhereOffered,
        )?;
        Ok(Self {
            features: ChipFeatures::from(&ctx.cpu),
            cpu: ctx.cpu,
            tracer: ctx.tracer,
            memory: ctx.memory.clone(),
            exact_irq_boundaries: ctx.exact_irq_boundaries,
            shared: Arc::new(SplitShared {
                chip,
                kicker: ctx.kicker,
            }),
        })
    }

    pub fn stats(&self) -> SplitStatsSnapshot {
        self.shared.stats().snapshot()
    }
}

impl Drop for SplitIrqchip {
    fn drop(&mut self) {
        tracing::debug!(stats = ?self.stats(), "split irqchip");
    }
}

impl InterruptLines for SplitIrqchip {
    fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError> {
        if line >= IRQ_LINES {
            return Err(IrqchipError::NoSuchLine(line));
        }
        self.shared.set_gsi(line, level);
        Ok(())
    }

    /// KVM_SIGNAL_MSI straight to KVM's LAPICs (validated first). No chip lock: a host MSI
    /// does not pass through the userspace IOAPIC, so it has no order to keep with its messages.
    fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError> {
        let msi = validate_msi(address, data)?;
        bump(&self.shared.stats().host_msis);
        let sink = self.shared.chip.sink();
        let kvm = match sink.addressing {
            MsiAddressing::ExtendedDestId => to_kvm_format(msi, sink.ids),
            MsiAddressing::Standard => Some(msi),
        };
        let at = crate::trace::hooks::stamp(&sink.tracer);
        let result = match kvm {
            Some(kvm) => kvm_signal_msi(&sink.vm, kvm),
            None => Ok(MsiDelivery::NoTarget),
        };
        if let Some(message) = at.and_then(|_| msi.decode_with(sink.addressing).ok()) {
            let reached = matches!(result, Ok(MsiDelivery::Delivered));
            let source = Some(crate::trace::Source::Msi);
            crate::trace::hooks::untargeted_post(&sink.tracer, at, &message, source, reached);
        }
        result
    }
}

impl Irqchip for SplitIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::Split
    }

    fn features(&self) -> ChipFeatures {
        self.features
    }

    /// The MP state is KVM's, as in `kernel` mode: the BSP runnable, APs waiting for their SIPI
    /// inside KVM_RUN.
    fn create_vcpu_chip(
        &self,
        index: usize,
        vcpu: &VcpuFd,
    ) -> Result<Box<dyn VcpuIrqchip>, IrqchipError> {
        set_initial_kvm_mp_state(index, vcpu)?;
        Ok(Box::new(SplitVcpuChip {
            index,
            shared: self.shared.clone(),
            probe: crate::trace::VcpuProbe::new(self.tracer.clone(), index),
            in_flight: false,
            stepper: Stepper::new(self.memory.clone(), self.exact_irq_boundaries),
            held_timer: Default::default(),
            eoi_probe: EoiProbe::default(),
        }))
    }

    /// Nothing to do: a halted vCPU blocks inside KVM_RUN, which the kick interrupts.
    fn wake_vcpu(&self, _index: usize) {}

    /// The userspace PICs, IOAPIC and routing (one short hold of the chip's device locks).
    fn platform_info(&self) -> Result<PlatformInfo, IrqchipError> {
        Ok(crate::api::platform::from_devices(
            &self.shared.chip.save_devices(),
        ))
    }

    /// KVM_SIGNAL_MSI to the vCPU's initial APIC ID (`kvm_send_event`), recorded as a host post
    /// to that vCPU.
    fn send_event(&self, index: usize, event: HostEvent) -> Result<MsiDelivery, IrqchipError> {
        self.tracer
            .host_event(index, event.vector(), event.delivery_mode());
        super::kvm_send_event(&self.shared.chip.sink().vm, &self.cpu, index, event)
    }

    fn counters(&self, out: &mut dyn FnMut(Option<usize>, &str, u64)) {
        let s = self.stats();
        let all = [
            ("msis_signalled", s.msis_signalled),
            ("ioapic_eois", s.ioapic_eois),
            ("route_updates", s.route_updates),
            ("extints_injected", s.extints_injected),
            ("window_requests", s.window_requests),
            ("extint_kicks", s.extint_kicks),
            ("host_msis", s.host_msis),
            ("eoi_probe_wakes", s.eoi_probe_wakes),
        ];
        for (name, value) in all {
            out(None, name, value);
        }
        self.tracer
            .latency()
            .visit(&mut |name, value| out(None, name, value));
    }

    /// The userspace PICs, IOAPIC and routing (KVM's LAPICs keep no readable round-robin).
    fn save_platform(&self) -> Result<PlatformFabric, IrqchipError> {
        Ok(PlatformFabric {
            devices: self.shared.chip.save_devices(),
            lowest_priority_turn: 0,
        })
    }

    /// Installs the devices (checked again) and mirrors the redirection table into KVM's EOI
    /// routes.
    fn restore_platform(&self, platform: &PlatformFabric) -> Result<(), IrqchipError> {
        self.shared.chip.restore_device_state(&platform.devices)?;
        match self.shared.chip.sink().take_route_failure() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// The per-vCPU half of `split` mode: ExtINT injection and the exits of the userspace chips.
struct SplitVcpuChip {
    index: usize,
    shared: Arc<SplitShared>,
    probe: crate::trace::VcpuProbe,
    /// A PIC vector was queued with KVM_INTERRUPT and no guest exit has been seen since.
    in_flight: bool,
    /// Single-stepping to the boundary where a waiting ExtINT can go in.
    stepper: Stepper,
    /// KVM's held-back LAPIC timer expiry across a pause.
    held_timer: super::kvm_timer::HeldTimer,
    /// Gets a level EOI out of a vCPU that halted with it pending in KVM.
    eoi_probe: EoiProbe,
}

impl SplitVcpuChip {
    /// Step 2 and 3 of the ExtINT protocol (module documentation). Returns whether to request
    /// an interrupt window.
    fn offer_extint(&mut self, vcpu: &mut VcpuFd) -> Result<bool, IrqchipError> {
        let chip = &self.shared.chip;
        if !chip.pic_intr() {
            self.stepper.end(vcpu)?;
            return Ok(false);
        }
        // KVM computed this at the last exit, for the state the vCPU is still in: LINT0
        // accepts the PIC, IF=1, no interrupt shadow, no ExtINT already queued.
        if vcpu.get_kvm_run().ready_for_interrupt_injection == 0 {
            // KVM's window exit comes only at its next exit, ~1 ms late here: if this LAPIC
            // takes the PIC (so IF or a shadow holds the ExtINT), step to the boundary instead.
            if self.stepper.enabled() && lint0_takes_pic(vcpu)? {
                self.stepper.step(vcpu)?;
            } else {
                self.stepper.end(vcpu)?;
            }
            return Ok(true);
        }
        // The boundary: stepping off before KVM injects, so the frame gets the guest's RFLAGS.
        self.stepper.end(vcpu)?;
        if let Some(vector) = chip.pic_acknowledge_if_pending() {
            kvm::inject_interrupt(vcpu, vector)?;
            self.in_flight = true;
            bump(&self.shared.stats().extints_injected);
            let irq = self.probe.on().then(|| chip.pic_irq_of_vector(vector));
            self.probe.injected_extint(vector, irq.flatten());
        }
        // KVM holds one ExtINT at a time: a further request waits for the next window.
        Ok(chip.pic_intr())
    }
}

/// KVM's LAPIC of this vCPU takes the 8259's INTR: LVT LINT0 unmasked in ExtINT mode (KVM's
/// `kvm_apic_accept_pic_intr`; a globally disabled APIC, where LINT0 is the INTR pin, is not
/// looked at, so such a vCPU waits for KVM's window as before).
fn lint0_takes_pic(vcpu: &VcpuFd) -> Result<bool, IrqchipError> {
    let lapic = vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
    // `regs` is the 1 KiB register page as C chars; LVT0 is the little-endian dword at 0x350.
    let byte = |i: usize| u32::from(lapic.regs[0x350 + i] as u8);
    let lvt0 = byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24;
    // SDM vol. 3 §11.5.1: bit 16 mask, bits 10:8 delivery mode (111b ExtINT).
    Ok(lvt0 & (1 << 16) == 0 && (lvt0 >> 8) & 7 == 7)
}

impl VcpuIrqchip for SplitVcpuChip {
    fn before_entry(&mut self, vcpu: &mut VcpuFd) -> Result<EntryDecision, IrqchipError> {
        CURRENT_VCPU.with(|c| c.set(Some(self.index)));
        let window = self.offer_extint(vcpu)?;
        if window {
            bump(&self.shared.stats().window_requests);
        }
        vcpu.get_kvm_run().request_interrupt_window = u8::from(window);
        self.eoi_probe
            .before_entry(&self.shared.chip.sink().outstanding);
        Ok(EntryDecision::Enter)
    }

    fn after_exit(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        let outstanding = &self.shared.chip.sink().outstanding;
        if self.eoi_probe.after_exit(vcpu, outstanding)? {
            bump(&self.shared.stats().eoi_probe_wakes);
        }
        Ok(())
    }

    /// The EOI probe's KVM_RUN passes KVM's loop only ([`super::eoi_probe`]).
    fn run_without_entry(&self) -> bool {
        self.eoi_probe.probing()
    }

    fn handle_exit(&mut self, exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError> {
        let shared = &self.shared;
        match exit {
            ChipExit::MmioRead { addr, data } => match ioapic_offset(*addr) {
                Some(offset) => shared.chip.ioapic_mmio_read(offset, data),
                None => return Ok(ExitHandled::NotMine),
            },
            ChipExit::MmioWrite { addr, data } => match ioapic_offset(*addr) {
                Some(offset) => shared.ioapic_write(offset, data)?,
                None => return Ok(ExitHandled::NotMine),
            },
            ChipExit::PioRead { port, data } if DualPic::handles_port(*port) => {
                shared.pic_read(*port, data)
            }
            ChipExit::PioWrite { port, data } if DualPic::handles_port(*port) => {
                shared.pic_write(*port, data)
            }
            ChipExit::IoapicEoi { vector } => {
                let tracer = self.probe.tracer();
                tracer.latency().level_eoi(*vector, tracer.now());
                self.probe.kvm_eoi(*vector);
                shared.ioapic_eoi(*vector)
            }
            // `before_entry` injects at this entry.
            ChipExit::IrqWindowOpen => {}
            // One instruction stepped towards an ExtINT boundary: `before_entry` looks again.
            ChipExit::SingleStep => {}
            _ => return Ok(ExitHandled::NotMine),
        }
        Ok(ExitHandled::Handled)
    }

    /// Never called: `before_entry` always says `Enter`.
    fn block(&mut self, _deadline: Option<Instant>) {}

    /// KVM's: MP state, INIT and SIPI belong to its LAPIC in split mode.
    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError> {
        kvm_mp_state(vcpu)
    }

    fn save_fabric(
        &mut self,
        vcpu: &mut VcpuFd,
        lapic: irqchip::lapic::LapicConfig,
    ) -> Result<VcpuFabric, IrqchipError> {
        kvm_save_fabric(vcpu, lapic, &self.held_timer, self.shared.chip.sink().ids)
    }

    fn restore_apic(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
        _saved_tsc: u64,
    ) -> Result<Option<u64>, IrqchipError> {
        kvm_restore_apic(vcpu, fabric, self.shared.chip.sink().ids)
    }

    fn restore_events(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
    ) -> Result<(), IrqchipError> {
        kvm_restore_events(vcpu, fabric)
    }

    /// The ExtINT queued with KVM_INTERRUPT is invisible to KVM_GET_VCPU_EVENTS until the guest
    /// has entered with it (docs/kvm-facts.md).
    fn injection_in_flight(&self) -> bool {
        self.in_flight || self.held_timer.needs_flush()
    }

    fn flush_without_entry(&self) -> bool {
        !self.in_flight && self.held_timer.needs_flush()
    }

    fn guest_ran(&mut self) {
        self.in_flight = false;
    }

    fn pause_started(&mut self, vcpu: &mut VcpuFd, entered: bool) -> Result<(), IrqchipError> {
        self.held_timer.pause_started(vcpu, entered)
    }

    fn pause_ended(&mut self) {
        self.held_timer.pause_ended();
    }

    fn interrupted(&mut self, vcpu: &mut VcpuFd, through_loop: bool) -> Result<(), IrqchipError> {
        self.held_timer.interrupted(vcpu, through_loop)
    }
}

/// The offset of `addr` in the IOAPIC's window, if it is there.
fn ioapic_offset(addr: u64) -> Option<u64> {
    let offset = addr.checked_sub(IOAPIC_DEFAULT_BASE)?;
    (offset < IOAPIC_WINDOW).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::ioapic::IoApicConfig;
    use irqchip::TriggerMode;

    /// Writes redirection entry `pin` (82093AA §3.2.4: IOREGSEL at 0, IOWIN at 0x10).
    fn program(ioapic: &mut IoApic, pin: u32, low: u32) {
        for (index, value) in [(0x11 + 2 * pin, 0u32), (0x10 + 2 * pin, low)] {
            ioapic.mmio_write(0, &index.to_le_bytes(), &mut |_| 1);
            ioapic.mmio_write(0x10, &value.to_le_bytes(), &mut |_| 1);
        }
    }

    /// The EOI route of a pin is its entry as an MSI, masked or not, with the entry's trigger
    /// mode (a level route is what makes KVM exit on the EOI); ExtINT entries have none.
    #[test]
    fn eoi_routes_follow_the_redirection_entries() {
        let mut ioapic = IoApic::new(IoApicConfig::default());
        program(&mut ioapic, 4, 0x41 | 1 << 15 | 1 << 16);
        let route = eoi_route(&ioapic, 4, MsiAddressing::Standard, KvmApicIds::Xapic)
            .expect("a masked level entry keeps its route");
        let message = route.decode().unwrap();
        assert_eq!(message.vector, 0x41);
        assert_eq!(message.trigger, TriggerMode::Level);
        program(&mut ioapic, 5, 0x42 | 7 << 8);
        assert_eq!(
            eoi_route(&ioapic, 5, MsiAddressing::Standard, KvmApicIds::Xapic),
            None,
            "ExtINT has no MSI form"
        );
    }

    /// APIC ID 0x123 through the extended destination ID (bits 11:5 = 0x01, bits 19:12 = 0x23)
    /// reaches KVM with 32-bit IDs as destination bits 31:8 in address_hi; an 8-bit destination
    /// is unchanged.
    #[test]
    fn extended_destination_ids_move_to_address_hi_for_kvm() {
        let ext = MsiMessage {
            address: 0xFEE0_0000 | 0x23 << 12 | 0x01 << 5,
            data: 0x4041, // edge, asserted (as the model encodes it), vector 0x41
        };
        let kvm = to_kvm_format(ext, KvmApicIds::Wide).unwrap();
        assert_eq!(kvm.address, 0x0000_0100_FEE2_3000);
        assert_eq!(kvm.data, 0x4041);
        let plain = MsiMessage {
            address: 0xFEE0_5000,
            data: 0x41,
        };
        assert_eq!(to_kvm_format(plain, KvmApicIds::Wide), Some(plain));
        let message = ext.decode_with(MsiAddressing::ExtendedDestId).unwrap();
        assert_eq!(message.destination, 0x123);
        let wide = kvm_msi(&message, MsiAddressing::ExtendedDestId, KvmApicIds::Wide);
        assert_eq!(wide, Ok(Some(kvm)));
    }

    /// Without 32-bit IDs KVM reads 8 destination bits: a physical destination past them names
    /// no vCPU and is not handed to KVM (which would truncate 0x123 to vCPU 0x23); a logical one
    /// keeps its low byte; an 8-bit one is unchanged.
    #[test]
    fn extended_destination_ids_without_32bit_ids_never_reach_a_truncated_id() {
        let physical = MsiMessage {
            address: 0xFEE0_0000 | 0x23 << 12 | 0x01 << 5,
            data: 0x41,
        };
        assert_eq!(to_kvm_format(physical, KvmApicIds::Xapic), None);
        let logical = MsiMessage {
            address: physical.address | MSI_LOGICAL,
            data: 0x41,
        };
        let kept = to_kvm_format(logical, KvmApicIds::Xapic).unwrap();
        assert_eq!(kept.address, 0xFEE2_3004);
        let plain = MsiMessage {
            address: 0xFEE0_5000,
            data: 0x41,
        };
        assert_eq!(to_kvm_format(plain, KvmApicIds::Xapic), Some(plain));
        let message = physical.decode_with(MsiAddressing::ExtendedDestId).unwrap();
        let narrow = kvm_msi(&message, MsiAddressing::ExtendedDestId, KvmApicIds::Xapic);
        assert_eq!(narrow, Ok(None));
    }
}
