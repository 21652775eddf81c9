//! The (virtual) APIC bus: resolves an [`InterruptMessage`] to the vCPUs it addresses and posts it
//! to their [`InterruptSink`]s.
//!
//! Every local APIC publishes a [`TopologyEntry`] (ID, LDR, DFR model, xAPIC/x2APIC mode, enable
//! bits). The bus keeps an immutable snapshot of all entries plus lookup tables built from them
//! behind an [`ArcSwap`]: delivery loads the snapshot without taking a lock, and
//! [`ApicBus::update_topology`] rebuilds it copy-on-write (changes are rare: boot, CPU bring-up,
//! mode switches).
//!
//! # Destination rules (SDM vol. 3 §11.6.2, §11.12.9, §11.12.10)
//! * Shorthands (§11.6.1) ignore the destination field and need a [`MessageSource::Vcpu`]; a
//!   device message with a shorthand reaches nobody.
//! * Physical: the destination equals the target's APIC ID. xAPIC-mode targets are addressed by
//!   their 8-bit ID; x2APIC-mode targets by their full 32-bit ID (also when the message has xAPIC
//!   format: KVM compares the full ID, so an xAPIC-format destination 0x05 never reaches an
//!   x2APIC-mode target whose ID is 0x105). A destination above 0xFF reaches an xAPIC-mode
//!   target whose initial (x2APIC) ID, [`TopologyEntry::initial_id`], equals it — KVM's "hotplug"
//!   rule (with 32-bit APIC IDs enabled), which makes a vCPU with an ID past 255 addressable by
//!   extended-destination-ID MSIs before it switches to x2APIC mode. Several targets with the
//!   same ID all receive (xAPIC IDs are writable, and an xAPIC-mode vCPU with initial ID 300
//!   reads ID 300 & 0xFF = 44): each APIC compares the destination for itself.
//! * Logical, per target model: xAPIC flat (`LDR[31:24] & MDA != 0`), xAPIC cluster (high
//!   nibbles equal, low nibbles intersect), x2APIC cluster (bits 31:16 equal, bits 15:0
//!   intersect). Each target applies its own model to the destination value.
//! * Broadcast is decided by the message format: 0xFF for [`DestinationFormat::Xapic`],
//!   0xFFFF_FFFF for [`DestinationFormat::X2apic`], in both physical and logical mode. An
//!   xAPIC-format 0xFF reaches x2APIC-mode targets as a broadcast only when it comes from a
//!   device (IOAPIC/MSI): KVM's "x2APIC broadcast quirk", which keeps legacy IOAPIC broadcasts
//!   working after the guest switches to x2APIC. From a vCPU (a mixed-mode system, which the SDM
//!   does not support) it is a unicast to x2APIC ID 0xFF, as in KVM. Deviation from KVM: KVM keys
//!   broadcast on the *target's* mode, so there an x2APIC-format 0xFF is a broadcast for xAPIC-mode
//!   targets and 0xFFFF_FFFF never reaches them; we carry the format in the message and use it.
//!
//! # Destinations a source cannot express
//! xAPIC mode has 8-bit destinations where 0xFF is the broadcast, so an xAPIC-mode vCPU's IPI,
//! an IOAPIC entry or an MSI without the extended destination ID can only name APIC IDs 0-254.
//! The decoders read only the bits the format has (`msi`, `ioapic`: address bits 11:5 and entry
//! bits 55:49 are reserved and ignored unless the VMM enables the extended destination ID), so
//! a guest that tries to name APIC ID 300 writes 300 & 0xFF = 44 and reaches the APIC(s) whose ID
//! is 44; nothing is widened or guessed. With the extended destination ID, devices name 15-bit
//! IDs (up to 32767), except that 0xFF stays the broadcast (the quirk above): a device message
//! cannot reach APIC ID 255 alone, an x2APIC IPI can. Encoding a wider destination into an MSI
//! is an error ([`crate::msi::MsiError::DestinationOutOfRange`]).
//!
//! # Scaling (up to KVM's 1024 vCPUs and past)
//! The snapshot holds an ID -> vCPUs table per addressing kind (8-bit xAPIC ID, initial ID for
//! the hotplug rule, 32-bit x2APIC ID, x2APIC cluster, xAPIC cluster, flat-model bit), indexed
//! directly for keys below 4096 (`id_table`). A physical destination costs two probes (the
//! xAPIC-mode and x2APIC-mode tables) whatever the number of vCPUs; a logical destination one
//! probe per cluster table plus one per set bit of the MDA's low byte (flat model), then only
//! the members found; a broadcast or an "all" shorthand walks the enabled list once; "self" is
//! one check. Lowest priority compares the PPRs of the accepting addressed targets only.
//! [`ApicBus::resolve_with_cost`] counts this work ([`ResolveCost`]) so tests pin it. A rebuild
//! is O(N + largest ID) and happens only when a vCPU publishes a changed entry (APIC ID, mode,
//! hardware or software enable, LDR, DFR); the snapshot is a few dozen bytes per vCPU
//! ([`ApicBus::topology_heap_bytes`]).
//!
//! # Acceptance (SDM vol. 3 §11.4.3, §11.4.7.2)
//! A hardware-disabled APIC (IA32_APIC_BASE.EN = 0) receives nothing. A software-disabled APIC
//! (SVR bit 8 = 0) receives INIT, SIPI, NMI and SMI only — the four messages §11.4.7.2 says it
//! "responds normally" to; fixed, lowest-priority and ExtINT messages are dropped for it (KVM
//! drops fixed/lowest-priority there and never delivers ExtINT through the bus at all).
//!
//! # Lowest priority (SDM vol. 3 §11.6.2.4)
//! Exactly one accepting target of the destination set receives the vector: the one with the
//! lowest published PPR (full 8-bit compare). Ties are broken round-robin: the bus keeps one
//! rotation counter; among the `n` tied targets (in vCPU index order) the one at position
//! `counter % n` wins, and a delivery that had a tie advances the counter. [`ApicBus::resolve`]
//! reports the target the next delivery would pick without advancing it. KVM arbitrates with its
//! own arbitration counter or vector hashing; we do real PPR arbitration. The SDM's "focus
//! processor" rule (a target already servicing the vector wins) is not modelled.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

mod id_table;

use id_table::IdTable;

use crate::types::{
    ApicEvents, DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, InterruptSink,
    MessageSource, Notify, Shorthand, TopologyEntry, TriggerMode, VcpuIndex, Vector,
};

thread_local! {
    /// `ApicBus::deliver`'s target list, kept per thread so delivery does not allocate.
    static SCRATCH: std::cell::Cell<Vec<VcpuIndex>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Broadcast destination in xAPIC format (8-bit IDs, SDM vol. 3 §11.6.2.1).
pub const XAPIC_BROADCAST: u32 = 0xFF;
/// Broadcast destination in x2APIC format (32-bit IDs, SDM vol. 3 §11.12.9).
pub const X2APIC_BROADCAST: u32 = 0xFFFF_FFFF;

/// Bits of an xAPIC ID / logical ID (the ID and LDR registers hold them in bits 31:24).
const XAPIC_ID_MASK: u32 = 0xFF;
/// Position of the 8-bit logical ID inside a raw xAPIC LDR register value.
const XAPIC_LDR_SHIFT: u32 = 24;
/// xAPIC cluster model: cluster number in the high nibble, member bitmap in the low nibble
/// (SDM vol. 3 §11.6.2.2).
const XAPIC_CLUSTER_SHIFT: u32 = 4;
const XAPIC_MEMBER_MASK: u32 = 0xF;
/// x2APIC logical ID: cluster ID in bits 31:16, member bitmap in bits 15:0 (SDM vol. 3 §11.12.10).
const X2APIC_CLUSTER_SHIFT: u32 = 16;
const X2APIC_MEMBER_MASK: u32 = 0xFFFF;

/// Watches the posts the bus makes: a VMM's flight recorder and delivery-latency metrics. The
/// bus calls it on the poster's thread, once per target, right before the post lands (so a
/// record made here precedes anything the target can do with the interrupt). It must not call
/// back into the bus and should be short: it runs on every delivery.
pub trait PostObserver: Send + Sync {
    /// `message` is about to be posted to vCPU `target`.
    fn posting(&self, target: VcpuIndex, message: &InterruptMessage);
}

/// The interrupt bus of one VM: the vCPUs' sinks and a lock-free topology snapshot.
pub struct ApicBus<S: InterruptSink> {
    sinks: Vec<Arc<S>>,
    snapshot: ArcSwap<Snapshot>,
    /// Round-robin position for lowest-priority ties (see the module documentation).
    lowest_priority_turn: AtomicU32,
    /// Set at most once, by the VMM, before the vCPUs run ([`ApicBus::set_observer`]).
    observer: std::sync::OnceLock<std::sync::Arc<dyn PostObserver>>,
    /// The vCPUs can enter SMM, so an SMI is accepted ([`ApicBus::with_smm`]).
    smm: bool,
    /// SMI messages refused for want of SMM.
    dropped_smis: AtomicU64,
}

impl<S: InterruptSink> ApicBus<S> {
    /// The lowest-priority round-robin position (a VMM snapshot carries it, so that ties after a
    /// restore go where they would have gone).
    pub fn lowest_priority_turn(&self) -> u32 {
        self.lowest_priority_turn.load(Ordering::Relaxed)
    }

    /// Sets the round-robin position (snapshot restore, with the VM paused).
    pub fn set_lowest_priority_turn(&self, turn: u32) {
        self.lowest_priority_turn.store(turn, Ordering::Relaxed);
    }

    /// A bus for these vCPUs (index = position). Every vCPU starts with a default,
    /// hardware-disabled topology entry, so it receives nothing until its local APIC publishes
    /// one.
    pub fn new(sinks: Vec<Arc<S>>) -> Self {
        let entries = vec![TopologyEntry::default(); sinks.len()];
        Self::with_topology(sinks, entries)
    }

    /// A bus whose vCPUs already published these entries. Missing entries default (disabled);
    /// extra entries are ignored.
    pub fn with_topology(sinks: Vec<Arc<S>>, mut entries: Vec<TopologyEntry>) -> Self {
        entries.resize(sinks.len(), TopologyEntry::default());
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::build(entries)),
            sinks,
            lowest_priority_turn: AtomicU32::new(0),
            observer: std::sync::OnceLock::new(),
            smm: true,
            dropped_smis: AtomicU64::new(0),
        }
    }

    /// Whether the vCPUs can enter system-management mode (a bus starts with it). Without SMM
    /// no local APIC accepts an SMI: [`Self::deliver`] posts it nowhere, wakes nothing and
    /// reports 0 targets (so a level-triggered IOAPIC entry sets no remote IRR), and
    /// [`Self::resolve`] finds no target, as KVM's `__apic_accept_irq` refuses an SMI where
    /// `kvm_inject_smi` fails. The refusals are counted ([`Self::dropped_smis`]).
    pub fn with_smm(mut self, smm: bool) -> Self {
        self.smm = smm;
        self
    }

    /// SMI messages refused for want of SMM ([`Self::with_smm`]).
    pub fn dropped_smis(&self) -> u64 {
        self.dropped_smis.load(Ordering::Relaxed)
    }

    /// An SMI on a bus without SMM: nobody accepts it.
    fn refuses(&self, msg: &InterruptMessage) -> bool {
        !self.smm && msg.delivery_mode == DeliveryMode::Smi
    }

    /// Installs the observer of every later post; false (and nothing changes) if one is
    /// installed already. Without one, delivery pays one load and branch for it.
    pub fn set_observer(&self, observer: std::sync::Arc<dyn PostObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Number of vCPUs on the bus.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// True when the bus has no vCPU.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// The sink of vCPU `index`, if it exists.
    pub fn sink(&self, index: VcpuIndex) -> Option<&Arc<S>> {
        self.sinks.get(index)
    }

    /// The entry vCPU `index` last published.
    pub fn topology_entry(&self, index: VcpuIndex) -> Option<TopologyEntry> {
        self.snapshot.load().entries.get(index).copied()
    }

    /// Publishes vCPU `index`'s new addressing state. The next resolution sees it. An index outside
    /// the bus is ignored (a VMM bug, not something a guest can cause).
    pub fn update_topology(&self, index: VcpuIndex, entry: TopologyEntry) {
        if index >= self.sinks.len() {
            return;
        }
        // rcu: concurrent publishers each retry on top of the other's snapshot, so no update is lost.
        self.snapshot.rcu(|current| {
            if current.entries[index] == entry {
                return Arc::clone(current);
            }
            let mut entries = current.entries.clone();
            entries[index] = entry;
            Arc::new(Snapshot::build(entries))
        });
    }

    /// The vCPUs `msg` would be posted to: every accepting destination, or for lowest priority the
    /// single winner the next delivery would pick. Sorted by index, no duplicates.
    pub fn resolve(&self, msg: &InterruptMessage) -> Vec<VcpuIndex> {
        let mut targets = Vec::new();
        self.targets(msg, TieBreak::Peek, &mut targets);
        targets
    }

    /// [`Self::resolve`], also reporting the work the resolution did (see [`ResolveCost`]).
    pub fn resolve_with_cost(&self, msg: &InterruptMessage) -> (Vec<VcpuIndex>, ResolveCost) {
        let mut targets = Vec::new();
        let mut cost = ResolveCost::default();
        self.targets_counted(msg, TieBreak::Peek, &mut targets, &mut cost);
        (targets, cost)
    }

    /// Heap bytes of the current topology snapshot (entries, candidate lists and ID tables):
    /// the bus's share of the memory per vCPU.
    pub fn topology_heap_bytes(&self) -> usize {
        self.snapshot.load().heap_bytes()
    }

    /// Posts `msg` to its destinations, calls `notify` for every post that asks the caller to kick
    /// or wake the target, and returns the number of targets posted to.
    pub fn deliver(
        &self,
        msg: &InterruptMessage,
        notify: &mut dyn FnMut(VcpuIndex, Notify),
    ) -> usize {
        let msg = &msg.as_delivered();
        let Some(post) = Post::for_message(msg) else {
            return 0;
        };
        if self.refuses(msg) {
            self.dropped_smis.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        // The delivery path allocates nothing (an interrupt's post-to-injection path takes no
        // lock, and an allocator may): the target list is a per-thread scratch buffer, taken
        // out for the call (a re-entrant delivery from `notify` would just get a fresh one).
        let mut targets = SCRATCH.with(std::cell::Cell::take);
        self.targets(msg, TieBreak::Advance, &mut targets);
        let observer = self.observer.get();
        for &index in &targets {
            if let Some(observer) = observer {
                observer.posting(index, msg);
            }
            let outcome = post.apply(self.sinks[index].as_ref());
            if outcome != Notify::None {
                notify(index, outcome);
            }
        }
        let delivered = targets.len();
        SCRATCH.with(|cell| cell.set(targets));
        delivered
    }

    /// Fills `targets` (cleared first) with the vCPUs `msg` is posted to, sorted, no duplicates.
    fn targets(&self, msg: &InterruptMessage, tie_break: TieBreak, targets: &mut Vec<VcpuIndex>) {
        self.targets_counted(msg, tie_break, targets, &mut ResolveCost::default());
    }

    /// [`Self::targets`], adding its work to `cost`.
    fn targets_counted(
        &self,
        msg: &InterruptMessage,
        tie_break: TieBreak,
        targets: &mut Vec<VcpuIndex>,
        cost: &mut ResolveCost,
    ) {
        targets.clear();
        let msg = &msg.as_delivered();
        if msg.is_deassert_nobody_accepts() {
            // SDM vol. 3 §11.6.1: the INIT level de-assert message is not supported by Pentium 4
            // and Xeon processors and is ignored; KVM refuses a fixed one too. It reaches nobody.
            return;
        }
        if self.refuses(msg) {
            return;
        }
        let snapshot = self.snapshot.load();
        snapshot.destinations(msg, targets, cost);
        targets.retain(|&index| accepts(&snapshot.entries[index], msg.delivery_mode));
        // Candidates come from one list (already ascending) or a few (xAPIC- and x2APIC-mode
        // tables, flat-model bits); the sort is linear on an ascending list.
        targets.sort_unstable();
        targets.dedup();
        if msg.arbitrated() {
            // Only the accepting destinations compete: their PPRs are read, nobody else's.
            cost.visited += targets.len();
            let winner = self.lowest_priority_winner(targets, tie_break);
            targets.clear();
            targets.extend(winner);
        }
    }

    /// SDM vol. 3 §11.6.2.4: the candidate with the lowest PPR, ties rotated round-robin.
    ///
    /// The PPRs are published by the other vCPUs' threads and change under this one, so the
    /// lowest PPR, the number of candidates tied at it and a winner are all decided from one
    /// reading of each (the processors' priorities as arbitration saw them at one moment). The
    /// round-robin pick reads them again and may find its turn's candidate moved; it then falls
    /// back to that first winner. (Deciding the tie count from a second reading divided by zero
    /// when every lowest candidate had raised its PPR in between: a `user`-mode vCPU thread's
    /// panic, issue 10.)
    fn lowest_priority_winner(
        &self,
        candidates: &[VcpuIndex],
        tie_break: TieBreak,
    ) -> Option<VcpuIndex> {
        let ppr = |index: VcpuIndex| self.sinks[index].published_ppr();
        let Arbitration {
            lowest,
            tied,
            first,
        } = Arbitration::of(candidates.iter().map(|&index| (index, ppr(index))))?;
        if tied == 1 {
            return Some(first);
        }
        let turn = match tie_break {
            TieBreak::Peek => self.lowest_priority_turn.load(Ordering::Relaxed),
            TieBreak::Advance => self.lowest_priority_turn.fetch_add(1, Ordering::Relaxed),
        };
        // u32 -> usize is lossless on every target this VMM supports (64-bit Linux).
        let pick = candidates
            .iter()
            .copied()
            .filter(|&index| ppr(index) == lowest)
            .nth(turn as usize % tied);
        Some(pick.unwrap_or(first))
    }
}

/// One reading of the candidates' PPRs: the lowest, how many have it (at least 1) and the
/// first of them in candidate order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Arbitration {
    lowest: u8,
    tied: usize,
    first: VcpuIndex,
}

impl Arbitration {
    /// `None` without candidates.
    fn of(pprs: impl Iterator<Item = (VcpuIndex, u8)>) -> Option<Self> {
        let mut best: Option<Self> = None;
        for (index, ppr) in pprs {
            match &mut best {
                Some(b) if ppr == b.lowest => b.tied += 1,
                Some(b) if ppr > b.lowest => {}
                _ => {
                    best = Some(Self {
                        lowest: ppr,
                        tied: 1,
                        first: index,
                    })
                }
            }
        }
        best
    }
}

/// The work of one resolution ([`ApicBus::resolve_with_cost`]), counted in steps rather than
/// time so tests can check how delivery scales with the number of vCPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolveCost {
    /// Table probes: ID, logical-cluster and flat-model-bit lookups. At most 2 for a physical
    /// destination and 10 for a logical one (one per set bit of the MDA's low byte for the
    /// flat model, plus the two cluster tables), whatever the number of vCPUs.
    pub lookups: usize,
    /// vCPU entries examined: the candidates the tables or broadcast lists returned (each then
    /// gets one acceptance check), plus, for lowest priority, the accepting candidates whose PPR
    /// is compared.
    pub visited: usize,
}

/// Whether a lowest-priority resolution consumes its round-robin turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TieBreak {
    /// `resolve`: report the next winner, leave the counter alone.
    Peek,
    /// `deliver`: pick the winner and move the rotation on.
    Advance,
}

/// What a message does to each of its targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Post {
    Vector(Vector, TriggerMode),
    Events(ApicEvents),
}

impl Post {
    /// `None` for a de-assert nobody accepts (the INIT level de-assert and KVM's fixed one).
    fn for_message(msg: &InterruptMessage) -> Option<Self> {
        if msg.is_deassert_nobody_accepts() {
            return None;
        }
        let event = |events: ApicEvents| Some(Self::Events(events));
        let none = ApicEvents::default();
        match msg.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                Some(Self::Vector(msg.vector, msg.trigger))
            }
            DeliveryMode::Nmi => event(ApicEvents { nmi: true, ..none }),
            DeliveryMode::Smi => event(ApicEvents { smi: true, ..none }),
            DeliveryMode::Init => event(ApicEvents { init: true, ..none }),
            DeliveryMode::StartUp => event(ApicEvents {
                sipi: Some(msg.vector),
                ..none
            }),
            DeliveryMode::ExtInt => event(ApicEvents {
                extint: true,
                ..none
            }),
        }
    }

    fn apply<S: InterruptSink + ?Sized>(self, sink: &S) -> Notify {
        match self {
            Self::Vector(vector, trigger) => sink.post_vector(vector, trigger),
            Self::Events(events) => sink.post_events(events),
        }
    }
}

/// SDM vol. 3 §11.4.3 / §11.4.7.2: whether this APIC accepts a message of this mode at all.
fn accepts(entry: &TopologyEntry, mode: DeliveryMode) -> bool {
    let delivered_while_sw_disabled = matches!(
        mode,
        DeliveryMode::Init | DeliveryMode::StartUp | DeliveryMode::Nmi | DeliveryMode::Smi
    );
    entry.hw_enabled && (entry.sw_enabled || delivered_while_sw_disabled)
}

/// The 8-bit ID an xAPIC-mode target is addressed by (the xAPIC ID register's bits 31:24).
fn xapic_id(entry: &TopologyEntry) -> u32 {
    entry.apic_id.0 & XAPIC_ID_MASK
}

/// The 8-bit xAPIC logical ID. Accepts both conventions for `ldr` (the 8-bit field, or the raw
/// register with the field in bits 31:24 and bits 23:0 reserved as zero).
fn xapic_logical_id(entry: &TopologyEntry) -> u32 {
    if entry.ldr > XAPIC_ID_MASK {
        entry.ldr >> XAPIC_LDR_SHIFT
    } else {
        entry.ldr
    }
}

/// One immutable view of the topology with its lookup tables (see "Scaling" in the module
/// documentation). Only hardware-enabled APICs appear in the tables; `entries` keeps every
/// vCPU's last published entry.
#[derive(Debug, Default)]
struct Snapshot {
    entries: Vec<TopologyEntry>,
    /// Hardware-enabled vCPUs, ascending: the candidates of a broadcast or an "all" shorthand.
    enabled: Vec<VcpuIndex>,
    /// Hardware-enabled vCPUs in xAPIC mode, ascending.
    xapic_mode: Vec<VcpuIndex>,
    /// 8-bit xAPIC ID -> xAPIC-mode vCPUs.
    xapic_ids: IdTable,
    /// Initial (x2APIC) ID above 0xFF -> xAPIC-mode vCPUs (KVM's hotplug rule).
    xapic_wide_ids: IdTable,
    /// 32-bit x2APIC ID -> x2APIC-mode vCPUs.
    x2apic_ids: IdTable,
    /// Bit number 0-7 of the 8-bit logical ID -> xAPIC flat-model vCPUs with that bit set.
    flat_bits: IdTable,
    /// Cluster (logical ID bits 7:4) -> xAPIC cluster-model vCPUs.
    xapic_clusters: IdTable,
    /// Cluster (LDR bits 31:16) -> x2APIC-mode vCPUs.
    x2apic_clusters: IdTable,
}

/// The (key, vCPU) pairs the tables of a [`Snapshot`] are built from.
#[derive(Default)]
struct TablePairs {
    xapic_ids: Vec<(u32, VcpuIndex)>,
    xapic_wide_ids: Vec<(u32, VcpuIndex)>,
    x2apic_ids: Vec<(u32, VcpuIndex)>,
    flat_bits: Vec<(u32, VcpuIndex)>,
    xapic_clusters: Vec<(u32, VcpuIndex)>,
    x2apic_clusters: Vec<(u32, VcpuIndex)>,
}

impl TablePairs {
    fn add_xapic(&mut self, index: VcpuIndex, entry: &TopologyEntry) {
        self.xapic_ids.push((xapic_id(entry), index));
        if entry.initial_id.0 > XAPIC_ID_MASK {
            self.xapic_wide_ids.push((entry.initial_id.0, index));
        }
        let logical = xapic_logical_id(entry);
        if entry.dfr_flat {
            let bits = (0..XAPIC_FLAT_BITS).filter(|bit| logical & (1 << bit) != 0);
            self.flat_bits.extend(bits.map(|bit| (bit, index)));
        } else {
            self.xapic_clusters
                .push((logical >> XAPIC_CLUSTER_SHIFT, index));
        }
    }

    fn add_x2apic(&mut self, index: VcpuIndex, entry: &TopologyEntry) {
        self.x2apic_ids.push((entry.apic_id.0, index));
        self.x2apic_clusters
            .push((entry.ldr >> X2APIC_CLUSTER_SHIFT, index));
    }
}

impl Snapshot {
    /// O(N + largest key) per rebuild; rebuilds happen only when a vCPU's entry changes.
    fn build(entries: Vec<TopologyEntry>) -> Self {
        let mut pairs = TablePairs::default();
        let mut enabled = Vec::with_capacity(entries.len());
        let mut xapic_mode = Vec::new();
        for (index, entry) in entries.iter().enumerate().filter(|(_, e)| e.hw_enabled) {
            enabled.push(index);
            if entry.x2apic {
                pairs.add_x2apic(index, entry);
            } else {
                xapic_mode.push(index);
                pairs.add_xapic(index, entry);
            }
        }
        Self {
            entries,
            enabled,
            xapic_mode,
            xapic_ids: IdTable::build(pairs.xapic_ids),
            xapic_wide_ids: IdTable::build(pairs.xapic_wide_ids),
            x2apic_ids: IdTable::build(pairs.x2apic_ids),
            flat_bits: IdTable::build(pairs.flat_bits),
            xapic_clusters: IdTable::build(pairs.xapic_clusters),
            x2apic_clusters: IdTable::build(pairs.x2apic_clusters),
        }
    }

    /// Heap bytes of this snapshot (entries, candidate lists and tables).
    fn heap_bytes(&self) -> usize {
        let list = |v: &Vec<VcpuIndex>| v.capacity() * std::mem::size_of::<VcpuIndex>();
        self.entries.capacity() * std::mem::size_of::<TopologyEntry>()
            + list(&self.enabled)
            + list(&self.xapic_mode)
            + [
                &self.xapic_ids,
                &self.xapic_wide_ids,
                &self.x2apic_ids,
                &self.flat_bits,
                &self.xapic_clusters,
                &self.x2apic_clusters,
            ]
            .iter()
            .map(|table| table.heap_bytes())
            .sum::<usize>()
    }

    /// Appends every hardware-enabled vCPU `msg` addresses (unsorted, before the acceptance
    /// filter).
    fn destinations(
        &self,
        msg: &InterruptMessage,
        targets: &mut Vec<VcpuIndex>,
        cost: &mut ResolveCost,
    ) {
        match msg.shorthand {
            Shorthand::None => self.addressed(msg, targets, cost),
            shorthand => self.shorthand_targets(shorthand, msg.source, targets, cost),
        }
    }

    /// SDM vol. 3 §11.6.1 destination shorthands; they need a sending vCPU.
    fn shorthand_targets(
        &self,
        shorthand: Shorthand,
        source: MessageSource,
        targets: &mut Vec<VcpuIndex>,
        cost: &mut ResolveCost,
    ) {
        let MessageSource::Vcpu(sender) = source else {
            return;
        };
        match shorthand {
            Shorthand::SelfOnly => {
                cost.visited += 1;
                let enabled = self.entries.get(sender).is_some_and(|e| e.hw_enabled);
                targets.extend(enabled.then_some(sender));
            }
            Shorthand::AllExcludingSelf => {
                extend_list(targets, &self.enabled, cost);
                targets.retain(|&index| index != sender);
            }
            Shorthand::AllIncludingSelf | Shorthand::None => {
                extend_list(targets, &self.enabled, cost)
            }
        }
    }

    fn addressed(
        &self,
        msg: &InterruptMessage,
        targets: &mut Vec<VcpuIndex>,
        cost: &mut ResolveCost,
    ) {
        let dest = msg.destination;
        match broadcast_reach(msg) {
            BroadcastReach::All => return extend_list(targets, &self.enabled, cost),
            BroadcastReach::XapicModeOnly => extend_list(targets, &self.xapic_mode, cost),
            BroadcastReach::NotBroadcast => self.addressed_xapic_mode(msg, targets, cost),
        }
        // x2APIC-mode targets only get here for non-broadcasts (and for a vCPU's xAPIC-format
        // 0xFF in a mixed-mode system, which they read as an ordinary 32-bit destination).
        match msg.destination_mode {
            DestinationMode::Physical => extend_key(targets, &self.x2apic_ids, dest, cost),
            DestinationMode::Logical => {
                let members = dest & X2APIC_MEMBER_MASK;
                let cluster = (&self.x2apic_clusters, dest >> X2APIC_CLUSTER_SHIFT);
                self.extend_members(targets, cluster, cost, |entry| entry.ldr & members != 0);
            }
        }
    }

    /// Non-broadcast destinations among xAPIC-mode targets (SDM vol. 3 §11.6.2.1-2).
    fn addressed_xapic_mode(
        &self,
        msg: &InterruptMessage,
        targets: &mut Vec<VcpuIndex>,
        cost: &mut ResolveCost,
    ) {
        let dest = msg.destination;
        match msg.destination_mode {
            DestinationMode::Physical if dest > XAPIC_ID_MASK => {
                extend_key(targets, &self.xapic_wide_ids, dest, cost)
            }
            DestinationMode::Physical => extend_key(targets, &self.xapic_ids, dest, cost),
            DestinationMode::Logical => {
                // Flat model: every target whose logical ID shares a bit with the MDA's low
                // 8 bits (the logical ID has no others).
                let bits = (0..XAPIC_FLAT_BITS).filter(|bit| dest & (1 << bit) != 0);
                bits.for_each(|bit| extend_key(targets, &self.flat_bits, bit, cost));
                let members = dest & XAPIC_MEMBER_MASK;
                let cluster = (&self.xapic_clusters, dest >> XAPIC_CLUSTER_SHIFT);
                self.extend_members(targets, cluster, cost, |entry| {
                    xapic_logical_id(entry) & members != 0
                });
            }
        }
    }

    /// Appends the vCPUs of one logical cluster (a table and its key: one probe) whose member
    /// bits pass `hit`.
    fn extend_members(
        &self,
        targets: &mut Vec<VcpuIndex>,
        (table, key): (&IdTable, u32),
        cost: &mut ResolveCost,
        hit: impl Fn(&TopologyEntry) -> bool,
    ) {
        let cluster = table.get(key);
        cost.lookups += 1;
        cost.visited += cluster.len();
        targets.extend(cluster.iter().filter(|&&i| hit(&self.entries[i])));
    }
}

/// Bits of an xAPIC flat-model logical ID (SDM vol. 3 §11.6.2.2).
const XAPIC_FLAT_BITS: u32 = 8;

/// Appends a whole candidate list.
fn extend_list(targets: &mut Vec<VcpuIndex>, list: &[VcpuIndex], cost: &mut ResolveCost) {
    cost.visited += list.len();
    targets.extend_from_slice(list);
}

/// Appends the vCPUs `table` holds under `key`: one probe.
fn extend_key(targets: &mut Vec<VcpuIndex>, table: &IdTable, key: u32, cost: &mut ResolveCost) {
    let hits = table.get(key);
    cost.lookups += 1;
    extend_list(targets, hits, cost);
}

/// Which targets a message reaches as a broadcast (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BroadcastReach {
    NotBroadcast,
    /// An xAPIC-format 0xFF from a vCPU: broadcast for xAPIC-mode targets only.
    XapicModeOnly,
    All,
}

fn broadcast_reach(msg: &InterruptMessage) -> BroadcastReach {
    match (msg.format, msg.destination, msg.source) {
        (DestinationFormat::X2apic, X2APIC_BROADCAST, _) => BroadcastReach::All,
        // KVM's x2APIC broadcast quirk: devices still speak 8-bit destinations.
        (DestinationFormat::Xapic, XAPIC_BROADCAST, MessageSource::Device) => BroadcastReach::All,
        (DestinationFormat::Xapic, XAPIC_BROADCAST, MessageSource::Vcpu(_)) => {
            BroadcastReach::XapicModeOnly
        }
        _ => BroadcastReach::NotBroadcast,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ApicId;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU8;
    use std::sync::Mutex;

    /// One post a fake vCPU received.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Posted {
        Vector(Vector, TriggerMode),
        Events(ApicEvents),
    }

    /// A fake vCPU: records posts, answers with a configurable `Notify` and PPR.
    struct FakeVcpu {
        posts: Mutex<Vec<Posted>>,
        answer: Mutex<Notify>,
        ppr: AtomicU8,
    }

    impl FakeVcpu {
        fn new() -> Self {
            Self {
                posts: Mutex::new(Vec::new()),
                answer: Mutex::new(Notify::None),
                ppr: AtomicU8::new(0),
            }
        }

        fn posts(&self) -> Vec<Posted> {
            self.posts.lock().unwrap().clone()
        }

        fn record(&self, posted: Posted) -> Notify {
            self.posts.lock().unwrap().push(posted);
            *self.answer.lock().unwrap()
        }
    }

    impl InterruptSink for FakeVcpu {
        fn post_vector(&self, vector: Vector, trigger: TriggerMode) -> Notify {
            self.record(Posted::Vector(vector, trigger))
        }
        fn post_events(&self, events: ApicEvents) -> Notify {
            self.record(Posted::Events(events))
        }
        fn published_ppr(&self) -> u8 {
            self.ppr.load(Ordering::Relaxed)
        }
    }

    fn bus(entries: &[TopologyEntry]) -> ApicBus<FakeVcpu> {
        let sinks = entries.iter().map(|_| Arc::new(FakeVcpu::new())).collect();
        ApicBus::with_topology(sinks, entries.to_vec())
    }

    fn xapic(id: u32, ldr: u32, flat: bool) -> TopologyEntry {
        TopologyEntry {
            apic_id: ApicId(id),
            initial_id: ApicId(id),
            x2apic: false,
            hw_enabled: true,
            sw_enabled: true,
            ldr,
            dfr_flat: flat,
        }
    }

    fn flat(id: u32, ldr: u32) -> TopologyEntry {
        xapic(id, ldr, true)
    }

    fn cluster(id: u32, ldr: u32) -> TopologyEntry {
        xapic(id, ldr, false)
    }

    /// x2APIC mode with the LDR the hardware derives from the ID (SDM vol. 3 §11.12.10.2).
    fn x2(id: u32) -> TopologyEntry {
        TopologyEntry {
            apic_id: ApicId(id),
            initial_id: ApicId(id),
            x2apic: true,
            hw_enabled: true,
            sw_enabled: true,
            ldr: ((id >> 4) << 16) | (1 << (id & 0xF)),
            dfr_flat: false,
        }
    }

    fn msg(mode: DestinationMode, format: DestinationFormat, dest: u32) -> InterruptMessage {
        InterruptMessage {
            destination_mode: mode,
            format,
            destination: dest,
            ..InterruptMessage::fixed(0x40, 0)
        }
    }

    fn phys(dest: u32) -> InterruptMessage {
        msg(DestinationMode::Physical, DestinationFormat::Xapic, dest)
    }

    fn phys_x2(dest: u32) -> InterruptMessage {
        msg(DestinationMode::Physical, DestinationFormat::X2apic, dest)
    }

    fn logical(dest: u32) -> InterruptMessage {
        msg(DestinationMode::Logical, DestinationFormat::Xapic, dest)
    }

    fn logical_x2(dest: u32) -> InterruptMessage {
        msg(DestinationMode::Logical, DestinationFormat::X2apic, dest)
    }

    fn from_vcpu(m: InterruptMessage, sender: VcpuIndex) -> InterruptMessage {
        InterruptMessage {
            source: MessageSource::Vcpu(sender),
            ..m
        }
    }

    fn shorthand(
        s: Shorthand,
        sender: MessageSource,
        format: DestinationFormat,
    ) -> InterruptMessage {
        InterruptMessage {
            shorthand: s,
            source: sender,
            format,
            destination: 0x1234_5678, // ignored with a shorthand
            ..InterruptMessage::fixed(0x41, 0)
        }
    }

    fn with_mode(m: InterruptMessage, mode: DeliveryMode) -> InterruptMessage {
        InterruptMessage {
            delivery_mode: mode,
            ..m
        }
    }

    fn deliver_collect(
        bus: &ApicBus<FakeVcpu>,
        m: &InterruptMessage,
    ) -> (usize, Vec<(VcpuIndex, Notify)>) {
        let mut notified = Vec::new();
        let reached = bus.deliver(m, &mut |i, n| notified.push((i, n)));
        (reached, notified)
    }

    /// Records what an observer is shown, and checks the post had not landed yet.
    struct Watch {
        seen: Mutex<Vec<(VcpuIndex, Vector)>>,
        bus: std::sync::OnceLock<std::sync::Arc<ApicBus<FakeVcpu>>>,
    }

    impl PostObserver for Watch {
        fn posting(&self, target: VcpuIndex, message: &InterruptMessage) {
            if let Some(bus) = self.bus.get() {
                let sink = bus.sink(target).unwrap();
                assert!(sink.posts().is_empty(), "the observer runs before the post");
            }
            self.seen.lock().unwrap().push((target, message.vector));
        }
    }

    /// The observer sees each target of a broadcast once, before its post; only one can be set.
    #[test]
    fn the_post_observer_sees_every_target_before_its_post() {
        let b = std::sync::Arc::new(bus(&[flat(0, 1), flat(1, 2), flat(2, 4)]));
        let watch = std::sync::Arc::new(Watch {
            seen: Mutex::new(Vec::new()),
            bus: std::sync::OnceLock::new(),
        });
        let _ = watch.bus.set(b.clone());
        assert!(b.set_observer(watch.clone()));
        assert!(!b.set_observer(watch.clone()), "set once");
        let m = phys(0xFF);
        assert_eq!(deliver_collect(&b, &m).0, 3);
        let seen = watch.seen.lock().unwrap().clone();
        assert_eq!(seen, [(0, m.vector), (1, m.vector), (2, m.vector)]);
    }

    // ---- physical destinations, SDM vol. 3 §11.6.2.1 ----

    #[test]
    fn sdm_11_6_2_1_physical_xapic_unicast_reaches_matching_id() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(7, 4)]);
        assert_eq!(b.resolve(&phys(7)), vec![2]);
        assert_eq!(b.resolve(&phys(0)), vec![0]);
    }

    #[test]
    fn sdm_11_6_2_1_physical_xapic_broadcast_ff_reaches_all() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(2, 4)]);
        assert_eq!(b.resolve(&phys(0xFF)), vec![0, 1, 2]);
        assert_eq!(b.resolve(&from_vcpu(phys(0xFF), 1)), vec![0, 1, 2]);
    }

    #[test]
    fn sdm_11_6_2_1_physical_to_nonexistent_id_reaches_nobody() {
        let b = bus(&[flat(0, 1), x2(1)]);
        let m = phys(9);
        assert!(b.resolve(&m).is_empty());
        assert_eq!(deliver_collect(&b, &m).0, 0);
        assert!(b.sink(0).unwrap().posts().is_empty());
        assert!(b.sink(1).unwrap().posts().is_empty());
        assert!(b.resolve(&phys_x2(0x1_0000)).is_empty());
    }

    #[test]
    fn sdm_11_6_2_1_duplicate_xapic_ids_all_receive() {
        // Two APICs given the same (writable) xAPIC ID both match, as on hardware.
        let b = bus(&[flat(3, 1), flat(3, 2), flat(4, 4)]);
        assert_eq!(b.resolve(&phys(3)), vec![0, 1]);
    }

    #[test]
    fn sdm_11_12_9_physical_x2apic_32bit_ids_and_broadcast() {
        let b = bus(&[x2(0), x2(0x1234), x2(0xFF), x2(0x0001_0000)]);
        assert_eq!(b.resolve(&phys_x2(0x1234)), vec![1]);
        assert_eq!(b.resolve(&phys_x2(0x0001_0000)), vec![3]);
        // In x2APIC format 0xFF is an ordinary ID.
        assert_eq!(b.resolve(&from_vcpu(phys_x2(0xFF), 0)), vec![2]);
        assert_eq!(
            b.resolve(&from_vcpu(phys_x2(X2APIC_BROADCAST), 0)),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn kvm_quirk_device_xapic_broadcast_reaches_x2apic_targets() {
        let b = bus(&[x2(0), x2(0x300), flat(5, 1)]);
        // IOAPIC / MSI broadcast 0xFF: every target, x2APIC mode included.
        assert_eq!(b.resolve(&phys(0xFF)), vec![0, 1, 2]);
        assert_eq!(b.resolve(&logical(0xFF)), vec![0, 1, 2]);
    }

    #[test]
    fn mixed_mode_vcpu_xapic_ff_is_unicast_for_x2apic_targets() {
        // An xAPIC-mode sender's 0xFF: broadcast for xAPIC-mode targets, x2APIC ID 0xFF otherwise.
        let b = bus(&[x2(0), x2(0xFF), flat(5, 1)]);
        assert_eq!(b.resolve(&from_vcpu(phys(0xFF), 2)), vec![1, 2]);
    }

    #[test]
    fn mixed_mode_xapic_format_compares_full_x2apic_id() {
        // KVM compares the full 32-bit ID: destination 0x05 does not reach x2APIC ID 0x105.
        let b = bus(&[x2(0x105), x2(0x05)]);
        assert_eq!(b.resolve(&phys(0x05)), vec![1]);
    }

    #[test]
    fn x2apic_format_broadcast_reaches_xapic_mode_targets_too() {
        let b = bus(&[x2(1), flat(2, 1)]);
        assert_eq!(
            b.resolve(&from_vcpu(phys_x2(X2APIC_BROADCAST), 0)),
            vec![0, 1]
        );
        assert_eq!(
            b.resolve(&from_vcpu(logical_x2(X2APIC_BROADCAST), 0)),
            vec![0, 1]
        );
    }

    #[test]
    fn kvm_hotplug_hack_wide_destination_reaches_xapic_mode_target_with_wide_id() {
        // An xAPIC-mode vCPU whose (initial) ID does not fit 8 bits is reachable by an
        // extended-destination-ID MSI carrying the full ID, and by its truncated 8-bit ID.
        let b = bus(&[flat(0x123, 1), flat(0x23, 2)]);
        assert_eq!(b.resolve(&phys(0x123)), vec![0]);
        assert_eq!(b.resolve(&phys(0x23)), vec![0, 1]);
    }

    #[test]
    fn kvm_hotplug_rule_keys_on_the_initial_id_not_the_writable_xapic_id() {
        // The guest rewrote the xAPIC ID of the vCPU with initial ID 300 to 5: 5 reaches it as
        // an 8-bit ID, 300 still does as a wide one (KVM compares its x2APIC ID), 44 (300's low
        // byte) no longer does. A destination that fits 8 bits never uses the initial ID.
        let mut moved = flat(5, 1);
        moved.initial_id = ApicId(300);
        let mut small = flat(7, 2);
        small.initial_id = ApicId(0x12);
        let b = bus(&[moved, small]);
        assert_eq!(b.resolve(&phys(5)), vec![0]);
        assert_eq!(b.resolve(&phys(300)), vec![0]);
        assert!(b.resolve(&phys(44)).is_empty());
        assert!(b.resolve(&phys(0x12)).is_empty());
        assert_eq!(b.resolve(&phys(7)), vec![1]);
    }

    // ---- logical destinations, SDM vol. 3 §11.6.2.2 ----

    #[test]
    fn sdm_11_6_2_2_flat_model_mda_and_ldr_intersect() {
        let b = bus(&[flat(0, 0x01), flat(1, 0x02), flat(2, 0x04), flat(3, 0x0C)]);
        assert_eq!(b.resolve(&logical(0x01)), vec![0]);
        assert_eq!(b.resolve(&logical(0x06)), vec![1, 2, 3]);
        assert_eq!(b.resolve(&logical(0x08)), vec![3]);
        assert!(b.resolve(&logical(0x30)).is_empty());
    }

    #[test]
    fn sdm_11_6_2_2_flat_model_ff_is_broadcast_even_for_ldr_zero() {
        let b = bus(&[flat(0, 0x00), flat(1, 0x02)]);
        assert_eq!(b.resolve(&logical(0xFF)), vec![0, 1]);
        assert_eq!(b.resolve(&from_vcpu(logical(0xFF), 1)), vec![0, 1]);
        assert_eq!(b.resolve(&logical(0x7F)), vec![1]);
    }

    #[test]
    fn sdm_11_6_2_2_cluster_model_cluster_equal_members_intersect() {
        let b = bus(&[
            cluster(0, 0x11),
            cluster(1, 0x12),
            cluster(2, 0x21),
            cluster(3, 0x2C),
        ]);
        assert_eq!(b.resolve(&logical(0x13)), vec![0, 1]);
        assert_eq!(b.resolve(&logical(0x21)), vec![2]);
        assert_eq!(b.resolve(&logical(0x24)), vec![3]);
        assert!(b.resolve(&logical(0x31)).is_empty());
        assert!(b.resolve(&logical(0x10)).is_empty());
        assert_eq!(b.resolve(&logical(0xFF)), vec![0, 1, 2, 3]);
    }

    #[test]
    fn ldr_accepts_raw_register_convention() {
        // 0x0200_0000 is the LDR register with logical ID 0x02 in bits 31:24.
        let b = bus(&[flat(0, 0x0200_0000), cluster(1, 0x1100_0000)]);
        assert_eq!(b.resolve(&logical(0x02)), vec![0]);
        assert_eq!(b.resolve(&logical(0x11)), vec![1]);
    }

    #[test]
    fn sdm_11_12_10_x2apic_logical_cluster_and_members() {
        let b = bus(&[x2(0x00), x2(0x01), x2(0x11), x2(0x12)]);
        // cluster 0, members bits 0 and 1
        assert_eq!(b.resolve(&logical_x2(0x0000_0003)), vec![0, 1]);
        // cluster 1, member bit 2 = ID 0x12
        assert_eq!(b.resolve(&logical_x2(0x0001_0004)), vec![3]);
        assert_eq!(b.resolve(&logical_x2(0x0001_0006)), vec![2, 3]);
        // member bits of the wrong cluster reach nobody
        assert!(b.resolve(&logical_x2(0x0002_0006)).is_empty());
        assert_eq!(
            b.resolve(&from_vcpu(logical_x2(X2APIC_BROADCAST), 0)),
            vec![0, 1, 2, 3]
        );
    }

    /// kvm-unit-tests' ioapic "ioapic logical destination mode": an IOAPIC entry's 8-bit logical
    /// destination 0x0D reaches x2APIC-mode APICs as the x2APIC logical ID 0x0000_000D, cluster 0
    /// members 0, 2 and 3 (SDM vol. 3 §11.12.10.2; KVM's `kvm_apic_mda` passes a device's
    /// destination on unchanged unless it is the 0xFF broadcast).
    #[test]
    fn device_xapic_format_logical_destination_in_x2apic_cluster_0() {
        let b = bus(&[x2(0), x2(1), x2(2), x2(3)]);
        assert_eq!(b.resolve(&logical(0x0D)), vec![0, 2, 3]);
        assert_eq!(b.resolve(&logical(0x02)), vec![1]);
    }

    // ---- shorthands, SDM vol. 3 §11.6.1 ----

    #[test]
    fn sdm_11_6_1_shorthands_xapic_and_x2apic() {
        for (format, entries) in [
            (
                DestinationFormat::Xapic,
                vec![flat(0, 1), flat(1, 2), flat(2, 4)],
            ),
            (DestinationFormat::X2apic, vec![x2(0), x2(1), x2(2)]),
        ] {
            let b = bus(&entries);
            let me = MessageSource::Vcpu(1);
            assert_eq!(
                b.resolve(&shorthand(Shorthand::SelfOnly, me, format)),
                vec![1]
            );
            assert_eq!(
                b.resolve(&shorthand(Shorthand::AllIncludingSelf, me, format)),
                vec![0, 1, 2]
            );
            assert_eq!(
                b.resolve(&shorthand(Shorthand::AllExcludingSelf, me, format)),
                vec![0, 2]
            );
        }
    }

    #[test]
    fn shorthand_without_sending_vcpu_reaches_nobody() {
        let b = bus(&[flat(0, 1), flat(1, 2)]);
        for s in [
            Shorthand::SelfOnly,
            Shorthand::AllIncludingSelf,
            Shorthand::AllExcludingSelf,
        ] {
            let m = shorthand(s, MessageSource::Device, DestinationFormat::Xapic);
            assert!(b.resolve(&m).is_empty(), "{s:?}");
        }
        // A sender index outside the bus is not "self" for anyone.
        let m = shorthand(
            Shorthand::SelfOnly,
            MessageSource::Vcpu(9),
            DestinationFormat::Xapic,
        );
        assert!(b.resolve(&m).is_empty());
    }

    #[test]
    fn shorthands_skip_hw_disabled_targets() {
        let mut off = flat(2, 4);
        off.hw_enabled = false;
        let b = bus(&[flat(0, 1), flat(1, 2), off]);
        let m = shorthand(
            Shorthand::AllIncludingSelf,
            MessageSource::Vcpu(0),
            DestinationFormat::Xapic,
        );
        assert_eq!(b.resolve(&m), vec![0, 1]);
    }

    // ---- acceptance, SDM vol. 3 §11.4.3 and §11.4.7.2 ----

    const ALL_MODES: [DeliveryMode; 7] = [
        DeliveryMode::Fixed,
        DeliveryMode::LowestPriority,
        DeliveryMode::Smi,
        DeliveryMode::Nmi,
        DeliveryMode::Init,
        DeliveryMode::StartUp,
        DeliveryMode::ExtInt,
    ];

    #[test]
    fn sdm_11_4_3_hw_disabled_target_receives_nothing() {
        let mut off = flat(0, 1);
        off.hw_enabled = false;
        let b = bus(&[off]);
        for mode in ALL_MODES {
            for m in [phys(0), phys(0xFF), logical(0xFF), logical(1)] {
                let m = with_mode(m, mode);
                assert!(b.resolve(&m).is_empty(), "{mode:?}");
                assert_eq!(deliver_collect(&b, &m).0, 0);
            }
        }
        assert!(b.sink(0).unwrap().posts().is_empty());
    }

    #[test]
    fn sdm_11_4_7_2_sw_disabled_target_takes_init_sipi_nmi_smi_only() {
        let mut sleepy = flat(0, 1);
        sleepy.sw_enabled = false;
        let b = bus(&[sleepy]);
        for mode in ALL_MODES {
            let expected = matches!(
                mode,
                DeliveryMode::Init | DeliveryMode::StartUp | DeliveryMode::Nmi | DeliveryMode::Smi
            );
            let reached = b.resolve(&with_mode(phys(0), mode));
            assert_eq!(reached == vec![0], expected, "{mode:?}");
        }
    }

    /// Without SMM an SMI reaches nobody (KVM's LAPIC refuses it where `kvm_inject_smi` fails):
    /// no target, no post, 0 delivered (so no remote IRR for a level IOAPIC entry), counted
    /// once per message. Every other mode is unaffected.
    #[test]
    fn without_smm_an_smi_is_accepted_by_nobody() {
        let b = bus(&[flat(0, 1), flat(1, 2)]).with_smm(false);
        let smi = with_mode(phys(0xFF), DeliveryMode::Smi);
        assert!(b.resolve(&smi).is_empty());
        assert!(b.resolve_with_cost(&smi).0.is_empty());
        assert_eq!(deliver_collect(&b, &smi).0, 0);
        assert_eq!(b.dropped_smis(), 1);
        assert!(b.sink(0).unwrap().posts().is_empty() && b.sink(1).unwrap().posts().is_empty());
        let nmi = with_mode(phys(0xFF), DeliveryMode::Nmi);
        assert_eq!(deliver_collect(&b, &nmi).0, 2);
        let with = bus(&[flat(0, 1), flat(1, 2)]);
        assert_eq!(deliver_collect(&with, &smi).0, 2);
        assert_eq!(with.dropped_smis(), 0);
    }

    // ---- delivery modes, SDM vol. 3 §11.6.1 ----

    fn single_post(mode: DeliveryMode, trigger: TriggerMode) -> Vec<Posted> {
        let b = bus(&[flat(0, 1)]);
        let m = InterruptMessage {
            trigger,
            ..with_mode(phys(0), mode)
        };
        assert_eq!(deliver_collect(&b, &m).0, 1, "{mode:?}");
        b.sink(0).unwrap().posts()
    }

    #[test]
    fn sdm_11_6_1_fixed_and_lowest_post_vector_with_trigger() {
        use TriggerMode::{Edge, Level};
        assert_eq!(
            single_post(DeliveryMode::Fixed, Edge),
            vec![Posted::Vector(0x40, Edge)]
        );
        assert_eq!(
            single_post(DeliveryMode::Fixed, Level),
            vec![Posted::Vector(0x40, Level)]
        );
        assert_eq!(
            single_post(DeliveryMode::LowestPriority, Level),
            vec![Posted::Vector(0x40, Level)]
        );
    }

    #[test]
    fn sdm_11_6_1_event_modes_post_matching_event() {
        let none = ApicEvents::default();
        let cases = [
            (DeliveryMode::Nmi, ApicEvents { nmi: true, ..none }),
            (DeliveryMode::Smi, ApicEvents { smi: true, ..none }),
            (DeliveryMode::Init, ApicEvents { init: true, ..none }),
            (
                DeliveryMode::StartUp,
                ApicEvents {
                    sipi: Some(0x40),
                    ..none
                },
            ),
            (
                DeliveryMode::ExtInt,
                ApicEvents {
                    extint: true,
                    ..none
                },
            ),
        ];
        for (mode, events) in cases {
            assert_eq!(
                single_post(mode, TriggerMode::Edge),
                vec![Posted::Events(events)],
                "{mode:?}"
            );
        }
    }

    #[test]
    fn sdm_11_6_1_init_level_deassert_reaches_nobody() {
        let b = bus(&[flat(0, 1), flat(1, 2)]);
        let deassert = InterruptMessage {
            trigger: TriggerMode::Level,
            level_assert: false,
            ..with_mode(from_vcpu(phys(0xFF), 0), DeliveryMode::Init)
        };
        assert!(deassert.is_init_deassert());
        assert!(b.resolve(&deassert).is_empty());
        assert_eq!(deliver_collect(&b, &deassert).0, 0);
        // The asserting INIT (level, assert) is delivered.
        let assert_init = InterruptMessage {
            level_assert: true,
            ..deassert
        };
        assert_eq!(deliver_collect(&b, &assert_init).0, 2);
        assert!(b.sink(0).unwrap().posts().len() == 1);
    }

    #[test]
    fn notify_called_only_for_kick_or_wake() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(2, 4)]);
        *b.sink(1).unwrap().answer.lock().unwrap() = Notify::Kick;
        *b.sink(2).unwrap().answer.lock().unwrap() = Notify::Wake;
        let (reached, notified) = deliver_collect(&b, &phys(0xFF));
        assert_eq!(reached, 3);
        assert_eq!(notified, vec![(1, Notify::Kick), (2, Notify::Wake)]);
    }

    // ---- lowest priority, SDM vol. 3 §11.6.2.4 ----

    fn lowest(m: InterruptMessage) -> InterruptMessage {
        with_mode(m, DeliveryMode::LowestPriority)
    }

    fn set_ppr(b: &ApicBus<FakeVcpu>, index: VcpuIndex, ppr: u8) {
        b.sink(index).unwrap().ppr.store(ppr, Ordering::Relaxed);
    }

    #[test]
    fn sdm_11_6_2_4_lowest_priority_picks_lowest_ppr() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(2, 4)]);
        set_ppr(&b, 0, 0x30);
        set_ppr(&b, 1, 0x10);
        set_ppr(&b, 2, 0x20);
        let m = lowest(logical(0x07));
        assert_eq!(b.resolve(&m), vec![1]);
        assert_eq!(deliver_collect(&b, &m).0, 1);
        assert_eq!(b.sink(1).unwrap().posts().len(), 1);
        assert!(b.sink(0).unwrap().posts().is_empty());
        // Only the destination set competes: vCPU 1 is not addressed by 0x05.
        assert_eq!(b.resolve(&lowest(logical(0x05))), vec![2]);
        // Full 8-bit compare: 0x21 loses to 0x20 within the same class.
        set_ppr(&b, 0, 0x21);
        assert_eq!(b.resolve(&lowest(logical(0x05))), vec![2]);
    }

    /// KVM delivers lowest priority to physical ID 0xFF as fixed to every APIC it addresses
    /// (`kvm_irq_delivery_to_apic`); measured in `kernel` mode, an xAPIC broadcast reached both
    /// vCPUs. The x2APIC broadcast 0xFFFFFFFF still picks one, and 0xFF in x2APIC format
    /// without a shorthand addresses APIC ID 255 alone.
    #[test]
    fn lowest_priority_to_physical_0xff_goes_to_every_addressed_apic_as_kvm() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(2, 4)]);
        set_ppr(&b, 1, 0x10);
        set_ppr(&b, 2, 0x20);
        let m = lowest(phys(0xFF));
        assert_eq!(b.resolve(&m), vec![0, 1, 2]);
        assert_eq!(deliver_collect(&b, &m).0, 3);
        let x2 = bus(&[x2(0), x2(1), x2(2)]);
        set_ppr(&x2, 0, 0x30);
        set_ppr(&x2, 2, 0x30);
        assert_eq!(x2.resolve(&lowest(phys_x2(0xFFFF_FFFF))), vec![1]);
        assert!(x2.resolve(&lowest(phys_x2(0xFF))).is_empty());
        // An all shorthand with 0xFF left in the destination field goes fixed to all, in
        // either format (KVM tests the field).
        let all = InterruptMessage {
            shorthand: Shorthand::AllExcludingSelf,
            ..from_vcpu(lowest(phys_x2(0xFF)), 0)
        };
        assert_eq!(x2.resolve(&all), vec![1, 2]);
        // From a device, 0xFF is the broadcast for x2APIC-mode APICs too (KVM's quirk).
        assert_eq!(x2.resolve(&lowest(phys(0xFF))), vec![0, 1, 2]);
    }

    #[test]
    fn sdm_11_6_2_4_lowest_priority_skips_sw_disabled_candidates() {
        let mut sleepy = flat(0, 1);
        sleepy.sw_enabled = false;
        let b = bus(&[sleepy, flat(1, 2)]);
        set_ppr(&b, 1, 0xF0);
        assert_eq!(b.resolve(&lowest(logical(0x03))), vec![1]);
        assert!(b.resolve(&lowest(logical(0x01))).is_empty());
    }

    #[test]
    fn lowest_priority_ties_rotate_round_robin_in_index_order() {
        let b = bus(&[flat(0, 1), flat(1, 2), flat(2, 4), flat(3, 8)]);
        set_ppr(&b, 3, 0x50); // not tied
        let m = lowest(logical(0x0F));
        let mut winners = Vec::new();
        for _ in 0..7 {
            let predicted = b.resolve(&m);
            // resolve peeks: asking twice does not move the rotation.
            assert_eq!(b.resolve(&m), predicted);
            let before: Vec<usize> = (0..4).map(|i| b.sink(i).unwrap().posts().len()).collect();
            assert_eq!(deliver_collect(&b, &m).0, 1);
            let after: Vec<usize> = (0..4).map(|i| b.sink(i).unwrap().posts().len()).collect();
            let got: Vec<usize> = (0..4).filter(|&i| after[i] != before[i]).collect();
            assert_eq!(got, predicted);
            winners.push(got[0]);
        }
        assert_eq!(winners, vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn lowest_priority_without_tie_does_not_advance_rotation() {
        let b = bus(&[flat(0, 1), flat(1, 2)]);
        set_ppr(&b, 0, 0x10);
        let m = lowest(logical(0x03));
        for _ in 0..3 {
            assert_eq!(deliver_collect(&b, &m).0, 1);
        }
        set_ppr(&b, 0, 0);
        assert_eq!(b.resolve(&m), vec![0]);
    }

    /// A vCPU whose published PPR is `first` at its first reading and `then` afterwards: its
    /// thread accepts an interrupt or raises its TPR while another thread's delivery arbitrates.
    struct ShiftingPpr {
        first: u8,
        then: u8,
        reads: AtomicU32,
        posts: Mutex<Vec<Vector>>,
    }

    impl InterruptSink for ShiftingPpr {
        fn post_vector(&self, vector: Vector, _: TriggerMode) -> Notify {
            self.posts.lock().unwrap().push(vector);
            Notify::None
        }
        fn post_events(&self, _: ApicEvents) -> Notify {
            Notify::None
        }
        fn published_ppr(&self) -> u8 {
            if self.reads.fetch_add(1, Ordering::Relaxed) == 0 {
                self.first
            } else {
                self.then
            }
        }
    }

    /// Delivers a lowest-priority message to logical 0x07 (flat vCPUs 0-2 whose PPRs read
    /// `pprs`: first reading, later ones) and returns how many it reached and each vCPU's posts.
    fn lowest_priority_among_shifting(pprs: [(u8, u8); 3]) -> (usize, Vec<Vec<Vector>>) {
        let sinks: Vec<Arc<ShiftingPpr>> = pprs
            .iter()
            .map(|&(first, then)| {
                Arc::new(ShiftingPpr {
                    first,
                    then,
                    reads: AtomicU32::new(0),
                    posts: Mutex::new(Vec::new()),
                })
            })
            .collect();
        let bus = ApicBus::with_topology(sinks.clone(), vec![flat(0, 1), flat(1, 2), flat(2, 4)]);
        let reached = bus.deliver(&lowest(logical(0x07)), &mut |_, _| {});
        let posts = sinks
            .iter()
            .map(|s| s.posts.lock().unwrap().clone())
            .collect();
        (reached, posts)
    }

    /// Issue 10: the arbitration read the PPRs once for the lowest value and again to count the
    /// candidates at it; a candidate that raised its PPR in between left none, and the
    /// round-robin pick divided by zero on the sending vCPU's thread. SDM vol. 3 §11.6.2.4: one
    /// processor accepts the message, the lowest-priority one as arbitration saw it.
    #[test]
    fn lowest_priority_arbitrates_on_one_reading_of_pprs_that_change_meanwhile() {
        // vCPU 0 alone lowest at the first look, then the highest.
        let (reached, posts) =
            lowest_priority_among_shifting([(0x10, 0x30), (0x20, 0x20), (0x20, 0x20)]);
        assert_eq!(reached, 1);
        assert_eq!(posts, vec![vec![0x40], vec![], vec![]]);
        // vCPUs 0 and 1 tied lowest at the first look, both higher than vCPU 2 at the next one:
        // the turn's pick finds neither, and the first of the tie takes it.
        let (reached, posts) =
            lowest_priority_among_shifting([(0x10, 0x30), (0x10, 0x30), (0x20, 0x20)]);
        assert_eq!(reached, 1);
        assert_eq!(posts, vec![vec![0x40], vec![], vec![]]);
    }

    // ---- topology updates ----

    #[test]
    fn topology_update_is_visible_to_next_delivery() {
        let b = ApicBus::new(vec![Arc::new(FakeVcpu::new()), Arc::new(FakeVcpu::new())]);
        // Nothing published yet: everyone is disabled.
        assert!(b.resolve(&phys(0xFF)).is_empty());
        b.update_topology(0, flat(0, 1));
        b.update_topology(1, flat(1, 2));
        assert_eq!(b.resolve(&phys(1)), vec![1]);
        // The guest moves vCPU 1 to ID 5 and to x2APIC mode later.
        b.update_topology(1, flat(5, 2));
        assert!(b.resolve(&phys(1)).is_empty());
        assert_eq!(deliver_collect(&b, &phys(5)).0, 1);
        assert_eq!(b.sink(1).unwrap().posts().len(), 1);
        b.update_topology(1, x2(0x500));
        assert!(b.resolve(&phys(5)).is_empty());
        assert_eq!(b.resolve(&from_vcpu(phys_x2(0x500), 0)), vec![1]);
        assert_eq!(b.topology_entry(1), Some(x2(0x500)));
    }

    #[test]
    fn topology_update_outside_bus_is_ignored() {
        let b = bus(&[flat(0, 1)]);
        b.update_topology(7, flat(7, 2));
        assert_eq!(b.len(), 1);
        assert!(b.resolve(&phys(7)).is_empty());
        assert_eq!(b.topology_entry(7), None);
    }

    // ---- property tests ----

    fn arb_id() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..6,
            Just(0xFF),
            0x100u32..0x103,
            0x1_0000u32..0x1_0002,
            any::<u32>()
        ]
    }

    fn arb_ldr() -> impl Strategy<Value = u32> {
        prop_oneof![
            0u32..0x100,
            0u32..0x4_0000,
            (0u32..0x100).prop_map(|l| l << 24),
            any::<u32>()
        ]
    }

    fn arb_entry() -> impl Strategy<Value = TopologyEntry> {
        (arb_id(), any::<bool>(), 0u8..8, arb_ldr(), any::<bool>()).prop_map(
            |(id, x2apic, enables, ldr, dfr_flat)| TopologyEntry {
                apic_id: ApicId(id),
                initial_id: ApicId(id),
                x2apic,
                // mostly enabled, sometimes hardware- or software-disabled
                hw_enabled: enables != 0,
                sw_enabled: enables != 1,
                ldr,
                dfr_flat,
            },
        )
    }

    fn arb_mode() -> impl Strategy<Value = DeliveryMode> {
        (0u32..8).prop_filter_map("reserved", DeliveryMode::from_bits)
    }

    fn arb_message(vcpus: usize) -> impl Strategy<Value = InterruptMessage> {
        let dest = prop_oneof![arb_id(), arb_ldr(), Just(X2APIC_BROADCAST)];
        let source = prop_oneof![
            Just(MessageSource::Device),
            (0..vcpus + 1).prop_map(MessageSource::Vcpu)
        ];
        let shorthand = prop_oneof![
            4 => Just(Shorthand::None),
            1 => (0u32..4).prop_map(Shorthand::from_bits)
        ];
        (
            (
                any::<u8>(),
                arb_mode(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            (shorthand, dest, any::<bool>(), source, any::<bool>()),
        )
            .prop_map(
                |((vector, mode, logical, level, assert), (shorthand, dest, x2, source, hint))| {
                    InterruptMessage {
                        vector,
                        delivery_mode: mode,
                        destination_mode: if logical {
                            DestinationMode::Logical
                        } else {
                            DestinationMode::Physical
                        },
                        trigger: if level {
                            TriggerMode::Level
                        } else {
                            TriggerMode::Edge
                        },
                        level_assert: assert,
                        shorthand,
                        destination: dest,
                        format: if x2 {
                            DestinationFormat::X2apic
                        } else {
                            DestinationFormat::Xapic
                        },
                        source,
                        // Only MSIs carry the hint.
                        redirection_hint: hint && source == MessageSource::Device,
                    }
                },
            )
    }

    fn arb_system() -> impl Strategy<Value = (Vec<TopologyEntry>, Vec<u8>, InterruptMessage)> {
        (1usize..9).prop_flat_map(|n| {
            (
                proptest::collection::vec(arb_entry(), n),
                proptest::collection::vec(prop_oneof![Just(0u8), Just(0x20), any::<u8>()], n),
                arb_message(n),
            )
        })
    }

    /// The SDM's rules, one target at a time, with no tables: does `msg` address `entry`?
    fn reference_addresses(
        entry: &TopologyEntry,
        index: VcpuIndex,
        msg: &InterruptMessage,
    ) -> bool {
        let sender = match msg.source {
            MessageSource::Vcpu(s) => Some(s),
            MessageSource::Device => None,
        };
        match msg.shorthand {
            Shorthand::SelfOnly => return sender == Some(index),
            Shorthand::AllIncludingSelf => return sender.is_some(),
            Shorthand::AllExcludingSelf => return sender.is_some() && sender != Some(index),
            Shorthand::None => {}
        }
        let d = msg.destination;
        let broadcast = match msg.format {
            DestinationFormat::X2apic => d == 0xFFFF_FFFF,
            // 0xFF: always for xAPIC-mode targets; for x2APIC-mode ones only from a device.
            DestinationFormat::Xapic => d == 0xFF && (!entry.x2apic || sender.is_none()),
        };
        if broadcast {
            return true;
        }
        match (msg.destination_mode, entry.x2apic) {
            (DestinationMode::Physical, true) => d == entry.apic_id.0,
            (DestinationMode::Physical, false) if d > 0xFF => d == entry.initial_id.0,
            (DestinationMode::Physical, false) => d == entry.apic_id.0 % 256,
            (DestinationMode::Logical, true) => {
                entry.ldr >> 16 == d >> 16 && entry.ldr & d & 0xFFFF != 0
            }
            (DestinationMode::Logical, false) => {
                let l = if entry.ldr >= 256 {
                    entry.ldr >> 24
                } else {
                    entry.ldr
                };
                if entry.dfr_flat {
                    l & d != 0
                } else {
                    l >> 4 == d >> 4 && l & d & 0xF != 0
                }
            }
        }
    }

    fn reference_accepts(entry: &TopologyEntry, mode: DeliveryMode) -> bool {
        let always = [
            DeliveryMode::Init,
            DeliveryMode::StartUp,
            DeliveryMode::Nmi,
            DeliveryMode::Smi,
        ];
        entry.hw_enabled && (entry.sw_enabled || always.contains(&mode))
    }

    /// KVM's delivery mode for `msg`: lowest priority or the redirection hint to the xAPIC
    /// physical broadcast ID go fixed ("phys broadcast and lowest prio").
    fn reference_mode(msg: &InterruptMessage) -> DeliveryMode {
        let to_ff = msg.destination_mode == DestinationMode::Physical && msg.destination == 0xFF;
        let lowest = msg.delivery_mode == DeliveryMode::LowestPriority || msg.redirection_hint;
        if to_ff && lowest {
            DeliveryMode::Fixed
        } else {
            msg.delivery_mode
        }
    }

    fn reference_set(entries: &[TopologyEntry], msg: &InterruptMessage) -> Vec<VcpuIndex> {
        let mode = reference_mode(msg);
        let vectored_or_init = matches!(
            mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority | DeliveryMode::Init
        );
        if msg.trigger == TriggerMode::Level && !msg.level_assert && vectored_or_init {
            return Vec::new();
        }
        (0..entries.len())
            .filter(|&i| reference_addresses(&entries[i], i, msg))
            .filter(|&i| reference_accepts(&entries[i], mode))
            .collect()
    }

    /// Lowest priority picks one target, except to physical ID 0xFF, which KVM delivers to
    /// every addressed APIC as fixed (written out here apart from `as_delivered`).
    fn arbitrated(msg: &InterruptMessage) -> bool {
        let to_ff = msg.destination_mode == DestinationMode::Physical && msg.destination == 0xFF;
        msg.redirection_hint || msg.delivery_mode == DeliveryMode::LowestPriority && !to_ff
    }

    fn bus_with_pprs(entries: &[TopologyEntry], pprs: &[u8]) -> ApicBus<FakeVcpu> {
        let b = bus(entries);
        for (i, &ppr) in pprs.iter().enumerate() {
            set_ppr(&b, i, ppr);
        }
        b
    }

    proptest! {
        #[test]
        fn resolve_agrees_with_sdm_reference((entries, pprs, msg) in arb_system()) {
            let b = bus_with_pprs(&entries, &pprs);
            let expected = reference_set(&entries, &msg);
            let got = b.resolve(&msg);
            if arbitrated(&msg) {
                prop_assert_eq!(got.len(), expected.len().min(1));
                if let Some(&winner) = got.first() {
                    prop_assert!(expected.contains(&winner));
                    let lowest = expected.iter().map(|&i| pprs[i]).min().unwrap();
                    prop_assert_eq!(pprs[winner], lowest);
                }
            } else {
                prop_assert_eq!(got, expected);
            }
        }

        #[test]
        fn deliver_posts_once_per_target_and_matches_resolve((entries, pprs, msg) in arb_system()) {
            let b = bus_with_pprs(&entries, &pprs);
            let predicted = b.resolve(&msg);
            let mut notified = Vec::new();
            for i in 0..entries.len() {
                *b.sink(i).unwrap().answer.lock().unwrap() =
                    [Notify::None, Notify::Kick, Notify::Wake][i % 3];
            }
            let reached = b.deliver(&msg, &mut |i, n| notified.push((i, n)));
            let posted: Vec<VcpuIndex> = (0..entries.len())
                .filter(|&i| !b.sink(i).unwrap().posts().is_empty())
                .collect();
            for i in 0..entries.len() {
                prop_assert!(b.sink(i).unwrap().posts().len() <= 1);
            }
            prop_assert_eq!(reached, posted.len());
            prop_assert_eq!(&posted, &predicted);
            let expected_notes: Vec<(VcpuIndex, Notify)> = posted
                .iter()
                .filter(|&&i| i % 3 != 0)
                .map(|&i| (i, [Notify::None, Notify::Kick, Notify::Wake][i % 3]))
                .collect();
            prop_assert_eq!(notified, expected_notes);
        }
    }

    // ---- scale: up to 1024 vCPUs (KVM_CAP_MAX_VCPUS here) ----

    /// `n` x2APIC-mode vCPUs with IDs 0..n and the LDRs the hardware derives.
    fn x2_system(n: usize) -> ApicBus<FakeVcpu> {
        bus(&(0..n as u32).map(x2).collect::<Vec<_>>())
    }

    #[test]
    fn unicast_work_is_constant_whatever_the_vcpu_count() {
        for n in [1usize, 16, 255, 256, 1024] {
            let b = x2_system(n);
            let last = n as u32 - 1;
            for m in [from_vcpu(phys_x2(last), 0), phys(last & 0x7F)] {
                let (got, cost) = b.resolve_with_cost(&m);
                assert_eq!(got.len(), 1, "n {n} {m:?}");
                // One probe of the xAPIC-mode table, one of the x2APIC-mode table, one hit.
                assert_eq!(
                    cost,
                    ResolveCost {
                        lookups: 2,
                        visited: 1
                    },
                    "n {n}"
                );
                // Lowest priority also reads the winner's PPR, except to ID 0xFF, which goes
                // fixed (`InterruptMessage::as_delivered`).
                let (_, cost) = b.resolve_with_cost(&lowest(m));
                let visited = if m.destination == 0xFF { 1 } else { 2 };
                assert_eq!(
                    cost,
                    ResolveCost {
                        lookups: 2,
                        visited
                    },
                    "n {n}"
                );
            }
            // An ID nobody has costs the same probes and visits nobody.
            let (got, cost) = b.resolve_with_cost(&from_vcpu(phys_x2(5000), 0));
            assert!(got.is_empty());
            assert_eq!(
                cost,
                ResolveCost {
                    lookups: 2,
                    visited: 0
                }
            );
        }
    }

    #[test]
    fn logical_cluster_work_is_the_cluster_whatever_the_vcpu_count() {
        for n in [16usize, 256, 1024] {
            let b = x2_system(n);
            let cluster = (n as u32 - 1) >> 4;
            let m = from_vcpu(logical_x2(cluster << 16 | 0x8001), 0);
            let (got, cost) = b.resolve_with_cost(&m);
            let first = (cluster << 4) as usize;
            assert_eq!(got, vec![first, first + 15]);
            // The flat-model bit of MDA bit 0 + the xAPIC cluster (both empty here) + the
            // x2APIC cluster; its 16 members are examined, nobody else.
            assert_eq!(
                cost,
                ResolveCost {
                    lookups: 3,
                    visited: 16
                },
                "n {n}"
            );
            // Lowest priority compares the PPRs of the 2 addressed targets only.
            set_ppr(&b, first, 0x20);
            let (got, cost) = b.resolve_with_cost(&lowest(m));
            assert_eq!(got, vec![first + 15]);
            assert_eq!(
                cost,
                ResolveCost {
                    lookups: 3,
                    visited: 18
                },
                "n {n}"
            );
        }
    }

    #[test]
    fn broadcast_and_shorthand_work_is_the_targets() {
        for n in [1usize, 256, 1024] {
            let b = x2_system(n);
            let (got, cost) = b.resolve_with_cost(&from_vcpu(phys_x2(X2APIC_BROADCAST), 0));
            assert_eq!(got.len(), n);
            assert_eq!(
                cost,
                ResolveCost {
                    lookups: 0,
                    visited: n
                }
            );
            let all_but = shorthand(
                Shorthand::AllExcludingSelf,
                MessageSource::Vcpu(0),
                DestinationFormat::X2apic,
            );
            assert_eq!(b.resolve_with_cost(&all_but).1.visited, n);
            let own = InterruptMessage {
                shorthand: Shorthand::SelfOnly,
                ..all_but
            };
            let (got, cost) = b.resolve_with_cost(&own);
            assert_eq!(got, vec![0]);
            assert_eq!(
                cost,
                ResolveCost {
                    lookups: 0,
                    visited: 1
                },
                "self IPI is O(1)"
            );
        }
    }

    #[test]
    fn snapshot_is_rebuilt_only_when_an_entry_changes() {
        let b = x2_system(64);
        let before = b.snapshot.load_full();
        b.update_topology(7, x2(7));
        assert!(
            Arc::ptr_eq(&before, &b.snapshot.load_full()),
            "same entry: no rebuild"
        );
        let mut disabled = x2(7);
        disabled.sw_enabled = false;
        b.update_topology(7, disabled);
        assert!(!Arc::ptr_eq(&before, &b.snapshot.load_full()));
        assert!(b.resolve(&from_vcpu(phys_x2(7), 0)).is_empty());
    }

    #[test]
    fn ids_past_the_dense_range_are_still_found() {
        let ids = [0u32, 4095, 4096, 0x7FFF, 0xFFFF_FFFE];
        let b = bus(&ids.map(x2));
        for (index, id) in ids.into_iter().enumerate() {
            assert_eq!(
                b.resolve(&from_vcpu(phys_x2(id), 0)),
                vec![index],
                "ID {id:#x}"
            );
        }
    }

    #[test]
    fn topology_tables_cost_little_memory_per_vcpu() {
        let b = x2_system(1024);
        let per_vcpu = b.topology_heap_bytes() / 1024;
        // Entry (16) + enabled list (8) + ID table (8 + 4) + cluster table (8 + 1/4) ...
        assert!(per_vcpu <= 64, "{per_vcpu} bytes per vCPU");
    }

    /// A topology as a guest of `n` vCPUs can make it: IDs mostly in the machine's range
    /// (colliding, with gaps) and sometimes anything; x2APIC LDRs mostly as the hardware derives
    /// them; every mode, model and enable state.
    fn arb_scaled_entry(n: u32) -> impl Strategy<Value = TopologyEntry> {
        let id = prop_oneof![4 => 0..2 * n, 1 => arb_id()];
        let ldr = prop_oneof![3 => Just(None), 1 => arb_ldr().prop_map(Some)];
        (id.clone(), id, 0u8..4, ldr, any::<bool>(), 0u8..8).prop_map(
            move |(id, initial, mode, ldr, dfr_flat, enables)| {
                let x2apic = mode != 0;
                let derived = ((id >> 4) << 16) | (1 << (id & 0xF));
                TopologyEntry {
                    apic_id: ApicId(if x2apic { id } else { id & 0xFF }),
                    initial_id: ApicId(if x2apic { id } else { initial }),
                    x2apic,
                    hw_enabled: enables != 0,
                    sw_enabled: enables != 1,
                    ldr: ldr.unwrap_or(if x2apic { derived } else { (id & 0xFF) << 24 }),
                    dfr_flat,
                }
            },
        )
    }

    /// Messages aimed mostly at what exists: IDs and clusters of the machine's range.
    fn arb_scaled_message(n: u32) -> impl Strategy<Value = InterruptMessage> {
        let dest = prop_oneof![
            0..2 * n,
            (0..((2 * n) >> 4) + 1, any::<u16>()).prop_map(|(c, bits)| c << 16 | u32::from(bits)),
            any::<u8>().prop_map(u32::from),
            Just(XAPIC_BROADCAST),
            Just(X2APIC_BROADCAST),
        ];
        (arb_message(n as usize), dest)
            .prop_map(|(m, destination)| InterruptMessage { destination, ..m })
    }

    fn arb_scaled_system(
    ) -> impl Strategy<Value = (Vec<TopologyEntry>, Vec<u8>, Vec<InterruptMessage>)> {
        prop_oneof![1u32..=64, 1u32..=1024].prop_flat_map(|n| {
            (
                proptest::collection::vec(arb_scaled_entry(n), n as usize),
                proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], n as usize),
                proptest::collection::vec(arb_scaled_message(n), 1..24),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// The tables agree with the one-target-at-a-time reference on machines of up to 1024
        /// vCPUs, and a resolution never examines more entries than the reference would.
        #[test]
        fn tables_agree_with_reference_up_to_1024_vcpus(
            (entries, pprs, msgs) in arb_scaled_system()
        ) {
            let b = bus_with_pprs(&entries, &pprs);
            for msg in &msgs {
                let expected = reference_set(&entries, msg);
                let (got, cost) = b.resolve_with_cost(msg);
                if arbitrated(msg) {
                    prop_assert_eq!(got.len(), expected.len().min(1));
                    if let Some(&winner) = got.first() {
                        let lowest = expected.iter().map(|&i| pprs[i]).min().unwrap();
                        prop_assert!(expected.contains(&winner));
                        prop_assert_eq!(pprs[winner], lowest);
                    }
                } else {
                    prop_assert_eq!(&got, &expected, "{:?}", msg);
                }
                prop_assert!(cost.lookups <= 10);
                // Flat-model vCPUs can be found once per shared bit: at most 8 times each.
                prop_assert!(cost.visited <= 8 * entries.len() + expected.len());
            }
        }
    }
}
