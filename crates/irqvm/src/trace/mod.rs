//! The interrupt flight recorder and the delivery-latency metrics.
//!
//! One [`Tracer`] per VM, shared by every thread. While recording is on, each thread that sees a
//! step of an interrupt's life records an [`Event`] into a bounded lock-free ring: vCPU thread
//! `i` into ring `i`, every other thread (devices, the API) into the
//! platform ring. A full ring drops its oldest event and counts it ([`Ring`]). Stopping the
//! recording drains the rings into a [`Dump`], which [`chrome`] writes as Chrome Trace Event
//! JSON (Perfetto, chrome://tracing) and [`report`] reads back for percentiles and an SVG.
//!
//! Interrupt ids: every post gets a fresh id, stored in a per-(target vCPU, vector) slot before
//! the post lands. The target's injection of that vector takes the id out of the slot (so a
//! later post of the same vector, which the IRR would merge with a pending one, leaves the
//! earlier post without an injection of its own), keeps it while the vector is in service and
//! gives it to the EOI. The writer joins post, injection and EOI by that id.
//!
//! Cost with recording off: each hook is one relaxed load of [`Tracer::on`] and a branch that
//! is never taken; nothing allocates and nothing locks. The latency histograms
//! ([`latency`]) are always on in `user` mode; they cost a clock read and a relaxed store per
//! post, injection and EOI, beside a KVM exit or ioctl each (docs/benchmarks.md has the bench).

pub mod chrome;
pub mod hooks;
pub mod latency;
pub mod report;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use irqchip::bus::PostObserver;
use irqchip::{DeliveryMode, InterruptMessage, MessageSource, VcpuIndex};

pub use latency::Latency;

/// Events each ring keeps by default (per vCPU, and for the platform ring): 5 MiB a ring.
pub const DEFAULT_CAPACITY: usize = 1 << 17;
/// Events all rings of a VM keep together at most by default (80 MiB): a VM with many vCPUs gets
/// smaller rings.
pub const DEFAULT_TOTAL: usize = 1 << 21;
/// "No vCPU" in [`Event::vcpu`].
pub const NO_VCPU: u16 = u16::MAX;

/// What happened. The meaning of [`Event`]'s `vector`, `id` and `arg` per kind is given here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An interrupt message posted to vCPU `vcpu` ([`NO_VCPU`]: handed to KVM's LAPICs with
    /// KVM_SIGNAL_MSI, which choose the target unseen): `vector`, `id`, `source`, `arg` = the
    /// message as [`PostArg`] packs it (delivery mode, trigger, destination, KVM's answer).
    Post,
    /// The poster kicked `vcpu` out of guest mode.
    Kick,
    /// The poster rang `vcpu`'s doorbell (it was blocked).
    Wake,
    /// `vcpu` enters the guest (KVM_RUN).
    Entry,
    /// `vcpu` left the guest: `arg` = [`ExitReason`] code, `id` = the port, address or MSR.
    Exit,
    /// `vcpu` blocks outside the guest: `arg` = 1 halted, 2 wait for SIPI, 3 AP reset hold.
    Block,
    /// `vcpu` returned from its block.
    Unblock,
    /// `vcpu` injects `vector` (KVM_INTERRUPT): `id` of its post (0 if unknown), `arg` = 0 for an
    /// APIC vector, 1 for a PIC ExtINT, 2 for an NMI (KVM_NMI, vector 2).
    Inject,
    /// `vcpu`'s guest ended `vector`, `id` as injected (or, for [`EOI_KVM`], as posted), `arg` =
    /// how it was seen: [`EOI_LAPIC`] (a write of the model's EOI register, the highest in-service
    /// vector), [`EOI_PIC`] (an OCW2 that took the PIC interrupt out of service), [`EOI_KVM`]
    /// (KVM_EXIT_IOAPIC_EOI: KVM's LAPIC retired a level-triggered IOAPIC vector).
    Eoi,
    /// `vcpu` accepted a latched INIT (architectural reset).
    InitAccept,
    /// `vcpu` accepted a SIPI with this `vector`.
    SipiAccept,
    /// `vcpu`'s MP state became `arg` (a KVM_MP_STATE_* value).
    MpState,
    /// `vcpu`'s APIC timer deadline became `arg` (VM-clock ns; 0 = disarmed).
    TimerArm,
    /// `vcpu`'s APIC timer expired and set `vector` (the post of source timer has the id).
    TimerFire,
    /// An IOAPIC entry with `vector` got remote IRR set (`arg` = 1, a level interrupt delivered)
    /// or an EOI of `vector` reached the IOAPIC, which clears it (`arg` = 0); `id` = the post
    /// that set it (0 if not recorded).
    RemoteIrr,
    /// The PIC's INTA cycle on `vcpu` supplied `vector` (`id` = the interrupt's id), `arg` = the
    /// ISA IRQ it served (255: not one of the PIC's current vectors).
    PicInta,
    /// A device line changed level: `vector` = the GSI, `arg` = 1 asserted, 0 deasserted.
    Line,
}

/// [`Kind::Eoi`]'s `arg`: the local APIC model's EOI register (`user`).
pub const EOI_LAPIC: u64 = 0;
/// [`Kind::Eoi`]'s `arg`: an OCW2 to the 8259 ended the PIC interrupt.
pub const EOI_PIC: u64 = 1;
/// [`Kind::Eoi`]'s `arg`: KVM's LAPIC retired a level-triggered IOAPIC vector (`split`).
pub const EOI_KVM: u64 = 2;

/// A post's `arg`: bits 2:0 the delivery mode (SDM §11.6.1 encoding: 0 fixed, 1 lowest
/// priority, 4 NMI, 5 INIT, 6 start-up), bit 3 level-triggered, bit 4 logical destination,
/// bit 5 KVM_SIGNAL_MSI reached no LAPIC (or failed), bits 63:32 the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PostArg(pub u64);

impl PostArg {
    const LEVEL: u64 = 1 << 3;
    const LOGICAL: u64 = 1 << 4;
    const UNDELIVERED: u64 = 1 << 5;

    /// A post with this delivery mode only (the target is known).
    pub fn mode(mode: u64) -> Self {
        Self(mode & 7)
    }

    /// The packed form of `message`.
    pub fn of(message: &InterruptMessage) -> Self {
        let mut arg = message.delivery_mode as u64 & 7;
        if message.trigger == irqchip::TriggerMode::Level {
            arg |= Self::LEVEL;
        }
        if message.destination_mode == irqchip::DestinationMode::Logical {
            arg |= Self::LOGICAL;
        }
        Self(arg | u64::from(message.destination) << 32)
    }

    /// The same, marked as reaching no LAPIC.
    pub fn undelivered(self) -> Self {
        Self(self.0 | Self::UNDELIVERED)
    }

    pub fn delivery_mode(self) -> u64 {
        self.0 & 7
    }

    pub fn level(self) -> bool {
        self.0 & Self::LEVEL != 0
    }

    pub fn logical(self) -> bool {
        self.0 & Self::LOGICAL != 0
    }

    pub fn reached_none(self) -> bool {
        self.0 & Self::UNDELIVERED != 0
    }

    pub fn destination(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl Kind {
    /// The name in the trace file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Post => "post",
            Self::Kick => "kick",
            Self::Wake => "wake",
            Self::Entry => "entry",
            Self::Exit => "exit",
            Self::Block => "block",
            Self::Unblock => "unblock",
            Self::Inject => "inject",
            Self::Eoi => "eoi",
            Self::InitAccept => "init_accept",
            Self::SipiAccept => "sipi_accept",
            Self::MpState => "mp_state",
            Self::TimerArm => "timer_arm",
            Self::TimerFire => "timer_fire",
            Self::RemoteIrr => "remote_irr",
            Self::PicInta => "pic_inta",
            Self::Line => "line",
        }
    }
}

/// Where a post came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// Not a post, or a device message whose origin the poster did not say.
    #[default]
    Unknown,
    /// An IPI from this vCPU's ICR.
    Ipi(u16),
    /// The IOAPIC, for this GSI (`None`: a re-delivery after EOI or an unmask).
    Ioapic(Option<u8>),
    /// A message-signalled interrupt (a device or the control API).
    Msi,
    /// The local APIC timer of the target.
    Timer,
    /// The 8259 PIC (through the INTA cycle).
    Pic,
    /// The host (control API NMI/INIT/SIPI).
    Host,
}

impl Source {
    /// The name in the trace file and the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "device",
            Self::Ipi(_) => "ipi",
            Self::Ioapic(_) => "ioapic",
            Self::Msi => "msi",
            Self::Timer => "timer",
            Self::Pic => "pic",
            Self::Host => "host",
        }
    }
}

/// Why a vCPU left the guest ([`Kind::Exit`]'s `arg`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// KVM_RUN returned EINTR (a kick).
    Kick = 0,
    PioRead = 1,
    PioWrite = 2,
    MmioRead = 3,
    MmioWrite = 4,
    RdMsr = 5,
    WrMsr = 6,
    Hlt = 7,
    IrqWindow = 8,
    IoapicEoi = 9,
    Other = 10,
}

impl ExitReason {
    pub fn name(code: u64) -> &'static str {
        const NAMES: [&str; 11] = [
            "kick",
            "pio_read",
            "pio_write",
            "mmio_read",
            "mmio_write",
            "rdmsr",
            "wrmsr",
            "hlt",
            "irq_window",
            "ioapic_eoi",
            "other",
        ];
        NAMES.get(code as usize).copied().unwrap_or("other")
    }

    /// The reason and its detail (port, address, MSR or vector) for the vCPU loop's record of
    /// an exit.
    pub fn of(exit: &crate::vcpu::report::LastExit) -> (Self, u64) {
        use crate::vcpu::report::LastExit as E;
        match *exit {
            E::Interrupted => (Self::Kick, 0),
            E::Pio { port, write, .. } => (
                Self::pick(write, Self::PioWrite, Self::PioRead),
                port.into(),
            ),
            E::Mmio { addr, write, .. } => {
                (Self::pick(write, Self::MmioWrite, Self::MmioRead), addr)
            }
            E::Msr { index, write } => (Self::pick(write, Self::WrMsr, Self::RdMsr), index.into()),
            E::Hlt => (Self::Hlt, 0),
            E::IrqWindowOpen => (Self::IrqWindow, 0),
            E::IoapicEoi { vector } => (Self::IoapicEoi, vector.into()),
            _ => (Self::Other, 0),
        }
    }

    fn pick(write: bool, w: Self, r: Self) -> Self {
        if write {
            w
        } else {
            r
        }
    }
}

/// One recorded step. Field meanings per [`Kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Nanoseconds since the VM's epoch (monotonic clock).
    pub ns: u64,
    pub kind: Kind,
    /// The vCPU the event is about (a post's target), or [`NO_VCPU`].
    pub vcpu: u16,
    pub vector: u8,
    pub source: Source,
    pub id: u64,
    pub arg: u64,
}

impl Event {
    pub fn new(ns: u64, kind: Kind, vcpu: usize) -> Self {
        Self {
            ns,
            kind,
            vcpu: u16::try_from(vcpu).unwrap_or(NO_VCPU),
            vector: 0,
            source: Source::Unknown,
            id: 0,
            arg: 0,
        }
    }

    pub fn vector(mut self, vector: u8) -> Self {
        self.vector = vector;
        self
    }

    pub fn id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    pub fn arg(mut self, arg: u64) -> Self {
        self.arg = arg;
        self
    }

    pub fn source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }
}

/// A bounded multi-producer ring that keeps the newest events: `crossbeam_queue::ArrayQueue`
/// (lock-free) with `force_push`, which replaces the oldest element when full.
pub struct Ring {
    queue: ArrayQueue<Event>,
    dropped: AtomicU64,
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn push(&self, event: Event) {
        if self.queue.force_push(event).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes every event and the drop count, leaving the ring empty.
    fn drain(&self, out: &mut Vec<Event>) -> u64 {
        while let Some(e) = self.queue.pop() {
            out.push(e);
        }
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

/// What a recording produced: every event in time order, and what each ring dropped (index =
/// vCPU, the last one the platform ring).
#[derive(Clone, Debug, Default)]
pub struct Dump {
    pub vcpus: usize,
    pub mode: String,
    pub events: Vec<Event>,
    pub dropped: Vec<u64>,
}

impl Dump {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// Errors of starting or stopping a recording.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("a trace is already being recorded")]
    AlreadyOn,
    #[error("no trace is being recorded")]
    NotOn,
    #[error("cannot write the trace to {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the trace {path}: {reason}")]
    Read { path: String, reason: String },
}

thread_local! {
    /// The ring the current thread records into (its vCPU index; the platform ring otherwise).
    static RING: Cell<Option<usize>> = const { Cell::new(None) };
    /// What the current thread is posting for, when the bus message cannot say (a device line,
    /// an MSI, an EOI's re-delivery).
    static POSTING_FOR: Cell<Source> = const { Cell::new(Source::Unknown) };
}

/// Marks the current thread as vCPU `index`'s (its events go to ring `index`).
pub fn set_thread_vcpu(index: usize) {
    RING.with(|r| r.set(Some(index)));
}

/// The vCPU whose thread this is (a guest's port write is handled on its vCPU's thread).
pub fn thread_vcpu() -> Option<usize> {
    RING.with(Cell::get)
}

/// Runs `f` with device posts attributed to `source` (only call it while recording: it costs
/// two thread-local writes).
pub fn posting_for<R>(source: Source, f: impl FnOnce() -> R) -> R {
    let before = POSTING_FOR.with(|s| s.replace(source));
    let r = f();
    POSTING_FOR.with(|s| s.set(before));
    r
}

/// The source the current thread posts for ([`posting_for`]; `Unknown` outside it).
pub fn posting_source() -> Source {
    POSTING_FOR.with(Cell::get)
}

/// The flight recorder of one VM, and its latency histograms.
pub struct Tracer {
    on: AtomicBool,
    epoch: Instant,
    vcpus: usize,
    mode: String,
    rings: OnceLock<Vec<Ring>>,
    /// Capacity asked for at the first start (the rings are allocated once, then reused).
    capacity: AtomicU64,
    next_id: AtomicU64,
    /// Per target vCPU and vector: the id of the latest post not yet injected.
    pending: Box<[[AtomicU64; 256]]>,
    /// Per vector: the id of the latest level-triggered IOAPIC post whose remote IRR its EOI
    /// has not cleared yet.
    remote_irr: Box<[AtomicU64; 256]>,
    /// Per ISA IRQ: the PIC interrupt in service (`id << 8 | vector`, 0 = none), from its INTA
    /// to the OCW2 that ends it.
    pic_in_service: [AtomicU64; 16],
    /// Serialises start and stop (never taken by a recording thread).
    control: Mutex<()>,
    latency: Latency,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("on", &self.on())
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// A tracer for `vcpus` vCPUs whose clock starts at `epoch` (the VM clock's).
    pub fn new(vcpus: usize, epoch: Instant, mode: &str) -> Self {
        Self {
            on: AtomicBool::new(false),
            epoch,
            vcpus,
            mode: mode.to_string(),
            rings: OnceLock::new(),
            capacity: AtomicU64::new(DEFAULT_CAPACITY.min(DEFAULT_TOTAL / (vcpus + 1)) as u64),
            next_id: AtomicU64::new(1),
            pending: (0..vcpus)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            remote_irr: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            pic_in_service: std::array::from_fn(|_| AtomicU64::new(0)),
            control: Mutex::new(()),
            latency: {
                let latency = Latency::new();
                latency.init(vcpus);
                latency
            },
        }
    }

    /// True while recording: the one check every hook makes first.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Nanoseconds since the epoch.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Sets the ring capacity used when the rings are first allocated (before the first start).
    pub fn set_capacity(&self, events: usize) {
        self.capacity.store(events as u64, Ordering::Relaxed);
    }

    /// Starts recording (rings emptied, drop counts zeroed).
    pub fn start(&self) -> Result<(), TraceError> {
        let _guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if self.on() {
            return Err(TraceError::AlreadyOn);
        }
        let rings = self.rings.get_or_init(|| {
            let capacity = self.capacity.load(Ordering::Relaxed) as usize;
            (0..=self.vcpus).map(|_| Ring::new(capacity)).collect()
        });
        let mut scratch = Vec::new();
        for ring in rings {
            ring.drain(&mut scratch);
            scratch.clear();
        }
        let slots = self.pending.iter().flatten();
        for slot in slots
            .chain(self.remote_irr.iter())
            .chain(&self.pic_in_service)
        {
            slot.store(0, Ordering::Relaxed);
        }
        self.on.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops recording and takes what was recorded. Events a thread was recording at this very
    /// moment may land after the drain; the next start discards them.
    pub fn stop(&self) -> Result<Dump, TraceError> {
        let _guard = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.on.swap(false, Ordering::SeqCst) {
            return Err(TraceError::NotOn);
        }
        let mut events = Vec::new();
        let dropped = self
            .rings
            .get()
            .map(|rings| rings.iter().map(|r| r.drain(&mut events)).collect())
            .unwrap_or_default();
        events.sort_by_key(|e| e.ns);
        Ok(Dump {
            vcpus: self.vcpus,
            mode: self.mode.clone(),
            events,
            dropped,
        })
    }

    /// Records `event` into the current thread's ring. Call only when [`Self::on`].
    pub fn record(&self, event: Event) {
        let Some(rings) = self.rings.get() else {
            return;
        };
        let index = RING.with(Cell::get).filter(|&i| i < self.vcpus);
        if let Some(ring) = rings.get(index.unwrap_or(self.vcpus)) {
            ring.push(event);
        }
    }

    /// A fresh interrupt id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a post of `vector` to `target` from `source` at `ns` (`arg`: the message), giving
    /// it a fresh id; for a vector that is injected (fixed, lowest priority, NMI as vector 2)
    /// the target's injection takes the id, and a level-triggered IOAPIC post that reached a
    /// local APIC has its id wait for the EOI that clears its remote IRR (recorded here as set). Call only when [`Self::on`].
    pub fn post(&self, ns: u64, target: usize, vector: u8, source: Source, arg: PostArg) -> u64 {
        let id = self.next_id();
        let joined = match arg.delivery_mode() {
            0 | 1 => Some(vector),
            4 => Some(2),
            _ => None,
        };
        if let (Some(v), Some(slot)) = (joined, self.pending.get(target)) {
            slot[usize::from(v)].store(id, Ordering::Release);
        }
        let event = Event::new(ns, Kind::Post, target)
            .vector(vector)
            .source(source)
            .id(id)
            .arg(arg.0);
        self.record(event);
        // A message no local APIC took leaves remote IRR clear (82093AA §3.2.4, `IoApic`).
        if arg.level() && !arg.reached_none() && matches!(source, Source::Ioapic(_)) {
            self.remote_irr[usize::from(vector)].store(id, Ordering::Release);
            let set = Event::new(ns, Kind::RemoteIrr, usize::MAX)
                .vector(vector)
                .id(id)
                .arg(1);
            self.record(set);
        }
        id
    }

    /// The id of the level-triggered IOAPIC post of `vector` whose remote IRR an EOI clears
    /// now (0 if none was recorded).
    pub fn take_remote_irr(&self, vector: u8) -> u64 {
        self.remote_irr[usize::from(vector)].swap(0, Ordering::Acquire)
    }

    /// The PIC's INTA gave `vector` for ISA IRQ `irq` on `vcpu`: records it with a fresh id,
    /// which the interrupt keeps until the OCW2 that ends it. Call only when [`Self::on`].
    pub fn pic_inta(&self, ns: u64, vcpu: usize, vector: u8, irq: Option<u8>) -> u64 {
        let id = self.next_id();
        if let Some(slot) = irq.and_then(|irq| self.pic_in_service.get(usize::from(irq))) {
            slot.store(id << 8 | u64::from(vector), Ordering::Release);
        }
        let inta = Event::new(ns, Kind::PicInta, vcpu)
            .vector(vector)
            .id(id)
            .arg(irq.map_or(255, u64::from))
            .source(Source::Pic);
        self.record(inta);
        id
    }

    /// An OCW2 took the ISA IRQs in `ended` (bit n = IRQ n) out of service: an EOI for each
    /// on the writing vCPU, joined with its INTA. One whose INTA was not recorded (it came
    /// before the recording started) has no vector to show and is left out. Call only when
    /// [`Self::on`].
    pub fn pic_eoi(&self, ended: u16) {
        let vcpu = thread_vcpu().unwrap_or(usize::MAX);
        for (irq, slot) in self.pic_in_service.iter().enumerate() {
            if ended & 1 << irq == 0 {
                continue;
            }
            let joined = slot.swap(0, Ordering::Acquire);
            if joined == 0 {
                continue;
            }
            let event = Event::new(self.now(), Kind::Eoi, vcpu)
                .vector(joined as u8)
                .id(joined >> 8)
                .arg(EOI_PIC);
            self.record(event);
        }
    }

    /// Takes the id of the latest post of `vector` to `vcpu` (0 if none was recorded).
    pub fn take_pending(&self, vcpu: usize, vector: u8) -> u64 {
        self.pending.get(vcpu).map_or(0, |slot| {
            slot[usize::from(vector)].swap(0, Ordering::Acquire)
        })
    }

    /// A poster's notification of `target` (kick or doorbell).
    pub fn notified(&self, target: usize, kick: bool) {
        let kind = if kick { Kind::Kick } else { Kind::Wake };
        self.record(Event::new(self.now(), kind, target));
    }

    /// The control API's event at `vcpu` (NMI, INIT, SIPI), which bypasses the bus.
    pub fn host_event(&self, vcpu: usize, vector: u8, delivery_mode: u32) {
        if self.on() {
            let arg = PostArg::mode(delivery_mode.into());
            self.post(self.now(), vcpu, vector, Source::Host, arg);
        }
    }
}

/// Delivery modes whose vector goes through IRR/ISR (fixed, lowest priority).
fn uses_irr(mode: DeliveryMode) -> bool {
    matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
}

/// The bus's view of the tracer (`user` mode): every post, before it lands.
pub struct BusObserver(pub Arc<Tracer>);

impl PostObserver for BusObserver {
    fn posting(&self, target: VcpuIndex, message: &InterruptMessage) {
        let tracer = &self.0;
        let now = tracer.now();
        if uses_irr(message.delivery_mode) {
            tracer.latency.posted(target, message.vector, now);
        }
        if !tracer.on() {
            return;
        }
        let source = match message.source {
            MessageSource::Vcpu(from) => Source::Ipi(u16::try_from(from).unwrap_or(NO_VCPU)),
            MessageSource::Device => POSTING_FOR.with(Cell::get),
        };
        tracer.post(now, target, message.vector, source, PostArg::of(message));
    }
}

/// One vCPU's view: what it injected and has in service, for the EOI's join and latency.
pub struct VcpuProbe {
    tracer: Arc<Tracer>,
    index: usize,
    /// Per vector: (id, injection time) while in service (an ISR bit per vector, so one each).
    in_service: Box<[(u64, u64); 256]>,
    last_mp: Option<u32>,
}

impl VcpuProbe {
    pub fn new(tracer: Arc<Tracer>, index: usize) -> Self {
        Self {
            tracer,
            index,
            in_service: Box::new([(0, 0); 256]),
            last_mp: None,
        }
    }

    pub fn tracer(&self) -> &Tracer {
        &self.tracer
    }

    #[inline]
    pub fn on(&self) -> bool {
        self.tracer.on()
    }

    /// The local APIC's `vector` went in with KVM_INTERRUPT.
    pub fn injected(&mut self, vector: u8) {
        let now = self.tracer.now();
        self.tracer.latency.injected(self.index, vector, now);
        let mut id = 0;
        if self.tracer.on() {
            id = self.tracer.take_pending(self.index, vector);
            let event = Event::new(now, Kind::Inject, self.index)
                .vector(vector)
                .id(id);
            self.tracer.record(event);
        }
        self.in_service[usize::from(vector)] = (id, now);
    }

    /// The PIC's `vector` (ISA IRQ `irq`) went in with KVM_INTERRUPT after its INTA, which is
    /// recorded here with a fresh id, as its post. An ExtINT vector never enters the local
    /// APIC's ISR: its EOI is an OCW2 ([`Tracer::pic_eoi`]).
    pub fn injected_extint(&mut self, vector: u8, irq: Option<u8>) {
        if self.tracer.on() {
            let now = self.tracer.now();
            let id = self.tracer.pic_inta(now, self.index, vector, irq);
            let event = Event::new(now, Kind::Inject, self.index)
                .vector(vector)
                .id(id)
                .arg(1);
            self.tracer.record(event);
        }
    }

    /// An NMI went in with KVM_NMI.
    pub fn injected_nmi(&self) {
        if self.tracer.on() {
            let id = self.tracer.take_pending(self.index, 2);
            let event = Event::new(self.tracer.now(), Kind::Inject, self.index)
                .vector(2)
                .id(id)
                .arg(2);
            self.tracer.record(event);
        }
    }

    /// The guest EOIed `vector` (the highest in service when it wrote EOI).
    pub fn eoi(&mut self, vector: u8) {
        let now = self.tracer.now();
        let (id, since) = std::mem::take(&mut self.in_service[usize::from(vector)]);
        if since != 0 {
            self.tracer.latency.eoi(vector, now.saturating_sub(since));
        }
        if self.tracer.on() {
            let event = Event::new(now, Kind::Eoi, self.index).vector(vector).id(id);
            self.tracer.record(event);
        }
    }

    /// KVM_EXIT_IOAPIC_EOI (`split`): KVM's LAPIC retired level-triggered `vector`; the EOI is
    /// joined with the IOAPIC post whose remote IRR it clears (recorded here too).
    pub fn kvm_eoi(&self, vector: u8) {
        if self.tracer.on() {
            let id = self.tracer.take_remote_irr(vector);
            let now = self.tracer.now();
            let eoi = Event::new(now, Kind::Eoi, self.index)
                .vector(vector)
                .id(id)
                .arg(EOI_KVM);
            self.tracer.record(eoi);
            let clear = Event::new(now, Kind::RemoteIrr, usize::MAX)
                .vector(vector)
                .id(id);
            self.tracer.record(clear);
        }
    }

    /// The APIC timer expired at `deadline` (VM-clock ns) and set `vector` in IRR: a post of
    /// source timer dated at the deadline.
    pub fn timer_fired(&self, deadline: u64, vector: u8) {
        self.tracer.latency.posted(self.index, vector, deadline);
        if self.tracer.on() {
            let fire = Event::new(deadline, Kind::TimerFire, self.index).vector(vector);
            self.tracer.record(fire);
            let arg = PostArg::mode(0);
            self.tracer
                .post(deadline, self.index, vector, Source::Timer, arg);
        }
    }

    /// Records `kind` on this vCPU with `arg` (call only when on).
    pub fn event(&self, kind: Kind, arg: u64) {
        self.tracer
            .record(Event::new(self.tracer.now(), kind, self.index).arg(arg));
    }

    /// Records an MP state change (call only when on).
    pub fn mp_state(&mut self, state: u32) {
        if self.last_mp != Some(state) {
            self.last_mp = Some(state);
            self.event(Kind::MpState, state.into());
        }
    }
}

#[cfg(test)]
mod tests;
