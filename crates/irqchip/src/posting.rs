//! Lock-free posting of interrupts to a vCPU from any thread (seed 001).
//!
//! Every vCPU owns one [`VcpuInbox`], shared through an `Arc` with the threads that send it
//! interrupts (other vCPUs' IPIs, device threads, a VMM's timer thread). It plays the part of
//! the posted-interrupt descriptor of VMX APIC virtualization (SDM vol. 3C, "Posted-Interrupt
//! Processing", §29.6 / §30.6 by edition): a 256-bit posted-interrupt request bitmap (PIR), an
//! "outstanding notification" bit (ON), plus what a userspace APIC also needs: the trigger mode
//! of each posted vector (the TMR the local APIC sets on acceptance, SDM vol. 3 §11.5.5), a latch
//! for INIT/SIPI/NMI/SMI/ExtINT, a "wakeup" request, the vCPU's execution mode and its published
//! processor priority (PPR, SDM vol. 3 §11.8.3.1, for lowest-priority arbitration).
//!
//! # Protocol
//!
//! A poster writes the payload (level bit, PIR bit or event bits), then sets ON. Only the poster
//! that turns ON on owns the notification: it reads the target's mode and returns what
//! its caller must do ([`Notify::Kick`] for a vCPU in guest mode, [`Notify::Wake`] for a blocked
//! one, [`Notify::None`] for one outside guest mode, which will drain before it enters). Every
//! later poster finds ON set and returns [`Notify::None`]: the first notification covers it.
//!
//! One exception saves a wake-up per AP start-up (issue 13): an INIT alone, posted to an AP that
//! sleeps in wait-for-SIPI ([`VcpuMode::AwaitingSipi`]: never started, or INIT already taken),
//! is announced but not notified. Taking that INIT would change nothing but the registers and the
//! local APIC the AP already has in their INIT state, and the AP would go back to sleep; the SIPI
//! that follows wakes it and it takes both in one drain (INIT first, seed 000), still in its own
//! context and exactly once. ON therefore has two bits: ANNOUNCED (something to drain) and
//! NOTIFIED (a kick or wake was sent for it). Every post sets ANNOUNCED; ordinary posts set
//! NOTIFIED too and notify when they turn it on, so the first post after a deferred INIT wakes
//! the AP. An INIT poster that finds NOTIFIED set owns nothing (that notification covers it);
//! one that finds only ANNOUNCED decides by the mode it reads, like a first poster (what an
//! earlier poster deferred, an INIT or a vector below, says nothing about this INIT). A poster
//! that notifies after a deferral claims NOTIFIED with a second RMW (below). Everything posted
//! while the INIT waits is drained with it, as it would be had it landed before the AP woke:
//! INIT first, then the SIPI; an NMI, SMI or ExtINT of the same drain is cleared by the INIT, as
//! KVM clears those queued before its target accepts an INIT (`kvm_vcpu_reset`). The AP cannot
//! run guest code in between: every drain and [`VcpuInbox::try_block`] sees ANNOUNCED (memory
//! ordering below).
//!
//! The vCPU clears ON before it takes the payload, so a post that lands after the clear sets ON
//! again and notifies again. Before entering the guest the vCPU publishes `InGuest` FIRST and
//! drains after; before sleeping it publishes `Blocked` first and checks ON after.
//!
//! # No kick below the in-service class (issue 14)
//!
//! A fixed (or lowest-priority) vector whose priority class (`vector >> 4`) is not above the
//! class of the highest vector in the target's ISR cannot be delivered before that interrupt's
//! EOI (SDM vol. 3 §11.8.3.1: PPR ≥ ISRV, and a vector is delivered only when its class is above
//! PPR's). A VMM whose vCPUs exit on every EOI (`user` mode: the xAPIC page is MMIO and the
//! x2APIC EOI MSR is filtered) then need not kick such a vCPU: the EOI's exit is followed by an
//! entry, and the entry drains. The kick it saves costs the poster a signal and the target a
//! signal handler and often an EINTR return; in `irq_host`, where the host thread's next
//! interrupt lands while the previous handler runs, before its EOI, skipping it took the
//! median from 112 to 90 µs (line) and 121 to 90 µs (MSI) per interrupt (docs/benchmarks.md).
//!
//! The vCPU publishes its in-service class ([`VcpuInbox::publish_in_service`], `Relaxed` like
//! the PPR): [`VcpuInbox::begin_guest_entry_in_service`] stores it BEFORE `InGuest` and the
//! drain, and the vCPU stores it again when an acknowledge raises it after the drain. The TPR
//! is deliberately not part of it: a CR8 write lowers it without an exit on this host
//! (docs/kvm-facts.md), so a kick may help a vector the TPR alone holds. A vector post
//! (`raise_vector_notification`) then:
//! 1. `fetch_or(ANNOUNCED)`; NOTIFIED already set → [`Notify::None`] (covered, as before);
//! 2. reads the class and the mode (after the RMW); `InGuest` and the vector's class ≤ the
//!    class → [`Notify::None`], NOTIFIED left clear (the skip);
//! 3. otherwise claims NOTIFIED with a CAS from exactly ANNOUNCED (it gives up, with
//!    [`Notify::None`], if another poster claimed it, whose notification covers this payload,
//!    or a drain cleared ON, which took it), then notifies by the mode read after the CAS.
//!
//! So NOTIFIED is only ever set by an RMW that the mode read deciding its notification follows,
//! as before; a skipped post leaves NOTIFIED clear, so the next post that can help (a higher
//! class, an NMI, an INIT, a wake-up) still owns a notification and kicks. A drain between a
//! poster's two RMWs makes the CAS fail (ON 0) or, if a skipped post announced again in
//! between, makes its kick a spare one.
//!
//! Why a skip loses nothing. Let P be the skipping poster's RMW of ON. The vector is drained by
//! the first drain after P in ON's order; until then every `try_block` reads ANNOUNCED and
//! refuses to sleep. The only guest run that can happen before that drain is the one entered
//! by the vCPU's last RMW before P (each entry drains first), call its drain D. P's RMW follows
//! D, so it synchronizes with D (all later modifications of ON are RMWs, which continue D's
//! release sequence), and the class P reads is the one stored before D or a later one: the rise
//! of an acknowledge before that run's KVM_RUN (the class the run has), a fall from an EOI
//! during the exit that ends it, or one stored before the next drain, which takes the vector
//! anyway. None is above the class of the run itself, so the vector's class is not above the
//! run's in-service class: the run cannot deliver it, and the EOI that could unblock it is an
//! exit. Had the vCPU published a fall after D instead of before (the test-only
//! `broken-class-order` build), P could read the class of an interrupt already EOId and skip
//! the kick the guest needs; `tests/loom_posting.rs` finds that, and finds the loss when a
//! skip sets NOTIFIED (`broken-deferral-notified`: the deliverable vector after it kicks
//! nobody). One fall after D is left, an INIT's reset of the local APIC (the class goes to 0):
//! the reset APIC is software-disabled and drops fixed vectors until the guest writes its SVR,
//! which exits (SDM vol. 3 §11.4.7.2, §11.4.7.3), so what a post skipped then could not have
//! been delivered either. And a VMM that lets its guest end an interrupt without an exit (a
//! paravirtual EOI) publishes the class the run may fall to after D on purpose, with
//! [`VcpuInbox::publish_eoi_without_exit`]: the store, then an RMW of ON, which tells it whether
//! a post came in between (then the guest must not skip its EOI write, which stays an exit);
//! every poster whose RMW follows synchronizes with it and reads the lower class.
//!
//! The same rule spares the kicks into a run that cannot take any maskable interrupt before it
//! exits ([`VcpuInbox::publish_interrupts_blocked_until_exit`], the highest class, published as
//! a rise after the drain): the guest's IF is clear and the VMM stops it, with single steps or
//! breakpoints, wherever IF may be set, while an interrupt already waits for that window. Its
//! exit is the one that may unblock the vector, like the EOI's above. Where such a stop is
//! missed (an exception or interrupt handler that sets IF where the VMM did not look), the
//! vector waits for the same exit as the interrupt already waiting: KVM's interrupt-window
//! exit, which the VMM requested for it.

//! # Memory ordering
//!
//! Both halves have the shape of the store-buffering (Dekker) pattern: the poster writes ON then
//! reads the mode, the vCPU writes the mode then reads ON. If the two reads were plain loads,
//! acquire/release would not be enough (each write may still sit in its core's store buffer
//! when the other side reads): the poster would see `OutsideGuest` and not kick while the vCPU
//! sees ON clear and enters the guest (or sleeps) with work pending. The usual cures are SeqCst
//! on all four accesses or a `fence(SeqCst)` between each write and read.
//!
//! This inbox instead makes the vCPU's access to ON a read-modify-write too: the drain clears it
//! with `swap(0)` and [`VcpuInbox::try_block`] reads it with `fetch_or(0)`; the poster sets
//! it with `fetch_or`; all `AcqRel`. RMWs of one location are totally ordered (its
//! modification order) and each reads the value just before it, so one of two things holds:
//! - the vCPU's RMW comes first: the poster's RMW reads the value the vCPU wrote (or one written
//!   after it by other posters' RMWs, which continue its release sequence), so it synchronizes
//!   with the vCPU's RMW, and the mode store sequenced before that RMW happens-before the
//!   poster's mode load: the poster sees `InGuest` / `Blocked` (or a later mode) and notifies;
//! - the poster's RMW comes first: the vCPU's RMW reads ON set and synchronizes with it, so the
//!   drain sees the poster's payload, and `try_block` refuses to sleep.
//!
//! That is the Dekker guarantee without a fence or a SeqCst access (C++20 [intro.races],
//! [atomics.order] release sequences); on x86 the RMWs are the `lock`-prefixed instructions the
//! protocol needs anyway, so it costs no `mfence`. It is also the form loom checks exactly (loom
//! treats SeqCst accesses as AcqRel, and a SeqCst-loads version made it report false deadlocks).
//!
//! The deferred INIT needs one more step: a poster that reads `AwaitingSipi` after its RMW of ON
//! (which turned ON from 0 to ANNOUNCED) may see a mode the AP has already left, woken by a ring
//! for an earlier post. It still cannot lose the INIT: the AP, once woken, publishes
//! `OutsideGuest` and then clears ON with an RMW before it can enter the guest. Had that RMW come
//! before the poster's, the poster's RMW would synchronize with it and its mode load would see
//! `OutsideGuest` or a later mode, not the `AwaitingSipi` stored before. So it comes after, reads
//! ANNOUNCED and drains the INIT. The only sleep the INIT can wait through is the one whose
//! `try_block` RMW preceded the poster's RMW, which is what the deferral means.
//!
//! The payload rides on release/acquire: a poster's PIR `fetch_or` is `Release` and the drain's
//! PIR `swap` is `Acquire`, so the trigger bit written before it (`Relaxed`) is visible to the
//! drain that takes the PIR bit. The event word is its own payload (`Release`/`Acquire`). The
//! mode carries no data (`Relaxed`, ordered by the ON RMWs above), the published PPR is a
//! hint for arbitration (`Relaxed`), and the in-service class is ordered like the mode (above).
//! [`VcpuInbox::has_pending`] is a plain load: a hint, never used for a decision that could lose
//! a notification.
//!
//! # The vCPU's loop (what the VMM does)
//!
//! ```text
//! loop {
//!     kvm_run.immediate_exit = 0;             // before begin_guest_entry, or a kick is lost
//!     let posted = inbox.begin_guest_entry_in_service(isr.highest()); // class, InGuest, drain
//!     /* feed `posted` to the LAPIC / MP state, inject; an acknowledge publishes the new class */
//!     KVM_RUN;                                // a Kick = signal whose handler sets immediate_exit
//!     inbox.end_guest_entry();
//!     /* on HLT with nothing deliverable: */
//!     if inbox.try_block() { inbox.block_until_rung(); }   // else: work pending, drain it
//!     /* an AP in wait-for-SIPI blocks with try_block_awaiting_sipi() instead */
//! }
//! ```
//!
//! # Example: post, notify, drain
//!
//! ```
//! # #[cfg(feature = "loom")] loom::model(example);
//! # #[cfg(not(feature = "loom"))] example();
//! # fn example() {
//! use irqchip::posting::{VcpuInbox, VcpuMode};
//! use irqchip::{ApicEvents, InterruptSink, Notify, TriggerMode};
//!
//! let inbox = VcpuInbox::new(); // shared as Arc<VcpuInbox> in a VMM
//!
//! // The vCPU is about to run the guest: posts from now on must kick it out.
//! assert!(inbox.begin_guest_entry().is_empty());
//! assert_eq!(inbox.mode(), VcpuMode::InGuest);
//! assert_eq!(inbox.post_vector(0x30, TriggerMode::Edge), Notify::Kick);
//! // ON is already set: the first poster's kick covers this one.
//! assert_eq!(inbox.post_vector(0x31, TriggerMode::Level), Notify::None);
//!
//! // Kicked out, the vCPU drains both vectors at once, with their trigger modes.
//! inbox.end_guest_entry();
//! let posted = inbox.drain();
//! assert_eq!(posted.vectors().collect::<Vec<_>>(), [0x30, 0x31]);
//! assert!(!posted.is_level(0x30) && posted.is_level(0x31));
//!
//! // Halted with nothing to do, it blocks; a post now asks the poster to wake it.
//! assert!(inbox.try_block());
//! let nmi = ApicEvents { nmi: true, ..Default::default() };
//! assert_eq!(inbox.post_events(nmi), Notify::Wake);
//! inbox.ring_doorbell(); // what the poster does for Notify::Wake
//! inbox.block_until_rung(); // returns at once: the ring came first and is not lost
//! assert!(inbox.drain().events.nmi);
//! assert_eq!(inbox.mode(), VcpuMode::OutsideGuest);
//! # }
//! ```

use crate::sync::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use crate::types::{ApicEvents, InterruptSink, Notify, TriggerMode, Vector};
use std::sync::PoisonError;
use std::time::Instant;

#[cfg(feature = "loom")]
use loom::sync::{Condvar, Mutex};
#[cfg(not(feature = "loom"))]
use std::sync::{Condvar, Mutex};

/// Number of 64-bit words in a 256-bit vector bitmap.
pub const BITMAP_WORDS: usize = 4;

/// A 256-bit bitmap indexed by vector: bit `v % 64` of word `v / 64`.
pub type VectorBitmap = [u64; BITMAP_WORDS];

/// The most NMIs one drain reports: KVM's `process_nmi` lets at most two be pending, so further
/// NMIs posted before the same drain coalesce.
pub const MAX_POSTED_NMIS: u8 = 2;

// Layout of the event word. The SIPI vector lives in the word itself, so a newer SIPI replaces
// the vector of one not yet consumed (a real APIC latches one start-up vector).
const EV_INIT: u32 = 1 << 0;
const EV_NMI: u32 = 1 << 1;
const EV_SMI: u32 = 1 << 2;
const EV_EXTINT: u32 = 1 << 3;
const EV_SIPI: u32 = 1 << 4;
const EV_WAKEUP: u32 = 1 << 5;
/// A second NMI posted while `EV_NMI` was already set: the inbox counts NMIs up to
/// [`MAX_POSTED_NMIS`] (KVM's `nmi_queued` counts them all, and its `process_nmi` keeps at most
/// two, so more than two between drains can never make a difference).
const EV_NMI_SECOND: u32 = 1 << 6;
const EV_SIPI_VECTOR_SHIFT: u32 = 8;
/// ON bit: something was posted and not yet drained.
const ON_ANNOUNCED: u8 = 1 << 0;
/// ON bit: a notification (kick or wake, or none for a vCPU outside guest mode) was decided for
/// what is announced. Clear while only a deferred INIT is announced (module doc).
const ON_NOTIFIED: u8 = 1 << 1;
const EV_SIPI_VECTOR_MASK: u32 = 0xFF << EV_SIPI_VECTOR_SHIFT;

/// Where a vCPU's thread is, as posters see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VcpuMode {
    /// Running VMM code (exit handling, device emulation): it drains before it next enters.
    OutsideGuest = 0,
    /// Inside (or committed to entering) `KVM_RUN`: it must be kicked out to see new work.
    InGuest = 1,
    /// Asleep (halted, in AP Reset Hold, or a BSP set to wait for SIPI) until its doorbell rings.
    Blocked = 2,
    /// Asleep as an AP in wait-for-SIPI (never started, or its INIT taken): an INIT alone does
    /// not wake it (module doc); anything else does.
    AwaitingSipi = 3,
}

impl VcpuMode {
    fn from_u8(raw: u8) -> Self {
        match raw {
            1 => Self::InGuest,
            2 => Self::Blocked,
            3 => Self::AwaitingSipi,
            _ => Self::OutsideGuest,
        }
    }

    /// What the poster that owns the notification must do for a vCPU in this mode.
    fn notify(self) -> Notify {
        match self {
            Self::InGuest => Notify::Kick,
            Self::Blocked | Self::AwaitingSipi => Notify::Wake,
            Self::OutsideGuest => Notify::None,
        }
    }
}

/// Everything taken from an inbox by one drain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Posted {
    /// Posted vectors (to set in IRR).
    pub pir: VectorBitmap,
    /// The subset of `pir` posted level-triggered (to set in TMR; the others clear their TMR bit).
    pub level: VectorBitmap,
    /// INIT / SIPI / NMI / SMI / ExtINT latched since the last drain (`events.nmi`: at least
    /// one NMI; `nmis` says how many).
    pub events: ApicEvents,
    /// How many NMIs were posted since the last drain, up to [`MAX_POSTED_NMIS`].
    pub nmis: u8,
    /// Someone asked the vCPU to re-evaluate its local state (e.g. its LAPIC timer expired).
    pub wakeup: bool,
}

impl Posted {
    /// True when the drain found nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// True when `vector` was posted.
    pub fn contains(&self, vector: Vector) -> bool {
        bitmap_test(&self.pir, vector)
    }

    /// True when `vector` was posted level-triggered.
    pub fn is_level(&self, vector: Vector) -> bool {
        bitmap_test(&self.level, vector)
    }

    /// The posted vectors, lowest first.
    pub fn vectors(&self) -> impl Iterator<Item = Vector> + '_ {
        (0..=u8::MAX).filter(move |&v| self.contains(v))
    }

    /// Adds a later drain to this one (vectors and flags OR together, a newer SIPI wins).
    pub fn merge(&mut self, later: Posted) {
        for word in 0..BITMAP_WORDS {
            self.pir[word] |= later.pir[word];
            self.level[word] = (self.level[word] & !later.pir[word]) | later.level[word];
        }
        self.events.merge(later.events);
        self.nmis = self.nmis.saturating_add(later.nmis).min(MAX_POSTED_NMIS);
        self.wakeup |= later.wakeup;
    }
}

/// The highest priority class (vectors 0xF0-0xFF): published, it holds every vector.
const HIGHEST_CLASS: u8 = 0xF;

/// True when a fixed vector posted to a vCPU whose highest in-service vector has priority class
/// `in_service_class` cannot be delivered before that vector's EOI: its class is not above it
/// (SDM vol. 3 §11.8.3.1: PPR >= ISRV, and a vector is delivered only when its class is above
/// PPR's). Vectors 0-15 are never held: the APIC refuses them with an error (§11.5.3), which
/// must not wait; and class 0 means nothing in service.
fn held_in_service(vector: Vector, in_service_class: u8) -> bool {
    vector >= 16 && vector >> 4 <= in_service_class
}

fn word_and_mask(vector: Vector) -> (usize, u64) {
    (usize::from(vector >> 6), 1u64 << (vector & 63))
}

fn bitmap_test(bitmap: &VectorBitmap, vector: Vector) -> bool {
    let (word, mask) = word_and_mask(vector);
    bitmap[word] & mask != 0
}

/// The flags of `events` other than NMI, which is counted (`add_nmi`).
fn encode_flags(events: &ApicEvents) -> u32 {
    let mut bits = 0;
    if events.init {
        bits |= EV_INIT;
    }
    if events.smi {
        bits |= EV_SMI;
    }
    if events.extint {
        bits |= EV_EXTINT;
    }
    bits
}

/// One more NMI in the event word: the first sets `EV_NMI`, the second `EV_NMI_SECOND`, and
/// later ones coalesce.
fn add_nmi(word: u32) -> u32 {
    if word & EV_NMI == 0 {
        word | EV_NMI
    } else {
        word | EV_NMI_SECOND
    }
}

fn nmi_count(word: u32) -> u8 {
    u8::from(word & EV_NMI != 0) + u8::from(word & EV_NMI_SECOND != 0)
}

fn decode_events(word: u32) -> (ApicEvents, bool) {
    let sipi_vector = ((word & EV_SIPI_VECTOR_MASK) >> EV_SIPI_VECTOR_SHIFT) as Vector;
    let events = ApicEvents {
        init: word & EV_INIT != 0,
        sipi: (word & EV_SIPI != 0).then_some(sipi_vector),
        nmi: word & EV_NMI != 0,
        smi: word & EV_SMI != 0,
        extint: word & EV_EXTINT != 0,
    };
    (events, word & EV_WAKEUP != 0)
}

/// How a blocked vCPU sleeps and how a poster wakes it: the doorbell of a [`VcpuInbox`].
///
/// Both implementations keep the property the posting protocol relies on: a ring that comes
/// before the sleep is not lost (the next `wait` returns at once), and rings coalesce until a
/// `wait` consumes them. [`Doorbell`] (a mutex and a condvar per vCPU) is the default and needs
/// nothing from the host; [`crate::wake::SharedBell`] shares one kernel wait word between up to
/// 32 vCPUs, so that a broadcast wakes all its sleepers with one syscall (issue 14).
pub trait Bell: Send + Sync {
    /// Wakes the waiter, or makes its next `wait` return at once.
    fn ring(&self);
    /// Sleeps until rung (returns at once if it was rung since the last `wait`), then clears it.
    /// With `until`, returns at that instant too, rung or not, and may return earlier for a
    /// signal to the sleeping thread ([`crate::wake::SharedBell`]); the caller re-checks.
    fn wait(&self, until: Option<Instant>);
}

/// A sleep/wake primitive that does not lose a ring that comes before the sleep: `ring` sets a
/// flag under the lock, `wait` sleeps only while the flag is clear and consumes it.
///
/// A wake-up costs the two futex calls it needs (the condvar's wake and wait) and no more:
/// `ring` notifies only when a waiter sleeps (on Linux every `notify_one` is a futex wake, even
/// with nobody waiting), and only after releasing the lock, so that the woken waiter does not
/// find it still held (a futex wait and wake more on the mutex). Notifying under the lock cost
/// 4.4 futex calls per halted wake-up in `irq_host` (docs/benchmarks.md). Notifying after the
/// unlock loses nothing: a waiter that was seen sleeping is on the condvar before it released
/// the lock, so the notify reaches it.
pub struct Doorbell {
    state: Mutex<BellState>,
    bell: Condvar,
}

/// What the doorbell's lock protects.
#[derive(Default)]
struct BellState {
    rung: bool,
    /// A waiter is (about to be) asleep on the condvar.
    sleeping: bool,
}

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    /// A doorbell that has not been rung.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(BellState::default()),
            bell: Condvar::new(),
        }
    }

    /// Wakes the waiter, or makes its next `wait` return at once.
    pub fn ring(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.rung = true;
        let sleeping = state.sleeping;
        drop(state);
        if sleeping {
            self.bell.notify_one();
        }
    }

    /// Sleeps until rung (returns at once if it was rung since the last `wait`), then clears it.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// [`Self::wait`], returning at `until` too (a ring that comes after that is kept for the
    /// next `wait`).
    pub fn wait_until(&self, until: Option<Instant>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.rung {
            let left = until.map(|u| u.saturating_duration_since(Instant::now()));
            if left.is_some_and(|left| left.is_zero()) {
                return;
            }
            state.sleeping = true;
            state = match left {
                None => self
                    .bell
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(left) => {
                    self.bell
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            state.sleeping = false;
        }
        state.rung = false;
    }
}

impl Bell for Doorbell {
    fn ring(&self) {
        Doorbell::ring(self);
    }

    fn wait(&self, until: Option<Instant>) {
        Doorbell::wait_until(self, until);
    }
}

/// The posting inbox of one vCPU: written by any thread, drained only by the vCPU's own thread.
pub struct VcpuInbox {
    pir: [AtomicU64; BITMAP_WORDS],
    /// Trigger mode of the last post of each vector (1 = level). Not cleared by a drain: a level
    /// post sets its bit and an edge post clears it, both before the PIR bit, as the TMR is
    /// written on every acceptance (SDM vol. 3 §11.5.5).
    level: [AtomicU64; BITMAP_WORDS],
    /// Outstanding notification (`ON_ANNOUNCED`, `ON_NOTIFIED`): set by posters after their
    /// payload, cleared by the drain.
    on: AtomicU8,
    events: AtomicU32,
    mode: AtomicU8,
    ppr: AtomicU8,
    /// Priority class (vector >> 4) of the highest vector in the vCPU's ISR, 0 if none: a
    /// fixed vector of this class or lower cannot be delivered before that interrupt's EOI, so
    /// it needs no kick (module doc, "No kick below the in-service class").
    in_service: AtomicU8,
    doorbell: Box<dyn Bell>,
}

impl Default for VcpuInbox {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuInbox {
    /// An empty inbox for a vCPU outside guest mode, PPR 0, with a [`Doorbell`] of its own.
    pub fn new() -> Self {
        Self::with_bell(Box::new(Doorbell::new()))
    }

    /// [`Self::new`] with the doorbell `bell` (e.g. a [`crate::wake::SharedBell`]).
    pub fn with_bell(bell: Box<dyn Bell>) -> Self {
        Self {
            pir: std::array::from_fn(|_| AtomicU64::new(0)),
            level: std::array::from_fn(|_| AtomicU64::new(0)),
            on: AtomicU8::new(0),
            events: AtomicU32::new(0),
            mode: AtomicU8::new(VcpuMode::OutsideGuest as u8),
            ppr: AtomicU8::new(0),
            in_service: AtomicU8::new(0),
            doorbell: bell,
        }
    }

    // ---- poster side (any thread, lock-free, no syscalls) ----

    /// Asks the vCPU to re-evaluate its local state (its own LAPIC timer expired, a pause
    /// request...). Delivered as `Posted::wakeup` by the next drain.
    pub fn post_wakeup(&self) -> Notify {
        self.events.fetch_or(EV_WAKEUP, Ordering::Release);
        self.raise_notification()
    }

    /// Rings the vCPU's doorbell: what the caller of a post does when told [`Notify::Wake`].
    /// May take a lock and make a syscall, unlike the posts.
    pub fn ring_doorbell(&self) {
        self.doorbell.ring();
    }

    /// Sets ON; the poster that turns NOTIFIED on owns the notification (see module doc).
    fn raise_notification(&self) -> Notify {
        let old = self
            .on
            .fetch_or(ON_ANNOUNCED | ON_NOTIFIED, Ordering::AcqRel);
        if old & ON_NOTIFIED != 0 {
            return Notify::None;
        }
        // Reading the mode after an AcqRel RMW of ON is what makes this race-free against the
        // vCPU's "mode, then RMW of ON" (see module doc).
        self.mode().notify()
    }

    /// Announces an INIT alone: like [`Self::raise_notification`], except that an AP asleep in
    /// wait-for-SIPI is not woken; the next ordinary post notifies (module doc). A poster that
    /// finds NOTIFIED set owns nothing; one that finds only ANNOUNCED (a deferred INIT or a
    /// deferred vector) decides again by the mode it reads, since what was deferred for a vector
    /// does not hold for an INIT.
    fn raise_init_notification(&self) -> Notify {
        #[cfg(feature = "broken-init-deferral")]
        let early_mode = self.mode();
        let old = self.on.fetch_or(ON_ANNOUNCED, Ordering::AcqRel);
        if old & ON_NOTIFIED != 0 {
            return Notify::None;
        }
        // The test-only broken variant reads the mode before the RMW, which the loom model must
        // catch (an INIT deferred while the AP was already on its way into the guest).
        #[cfg(feature = "broken-init-deferral")]
        let mode = early_mode;
        #[cfg(not(feature = "broken-init-deferral"))]
        let mode = self.mode();
        if mode == VcpuMode::AwaitingSipi {
            return Notify::None;
        }
        self.claim_notification()
    }

    /// Announces a fixed or lowest-priority vector: like [`Self::raise_notification`], except
    /// that a vCPU in guest mode whose published in-service class is at least the vector's
    /// class is not kicked (module doc, "No kick below the in-service class").
    fn raise_vector_notification(&self, vector: Vector) -> Notify {
        // The test-only broken variant sets NOTIFIED with ANNOUNCED, also when it defers: a
        // later post of a vector the guest could take then kicks nobody (loom must catch it).
        let broken = cfg!(feature = "broken-deferral-notified");
        let bits = if broken {
            ON_ANNOUNCED | ON_NOTIFIED
        } else {
            ON_ANNOUNCED
        };
        let old = self.on.fetch_or(bits, Ordering::AcqRel);
        if old & ON_NOTIFIED != 0 {
            return Notify::None;
        }
        // Both read after the RMW of ON, as `raise_notification` reads the mode: the class is
        // then at least as new as the one the vCPU published before its last drain (module
        // doc).
        let class = self.in_service.load(Ordering::Relaxed);
        let mode = self.mode();
        if mode == VcpuMode::InGuest && held_in_service(vector, class) {
            // Deferred: ANNOUNCED stays set with NOTIFIED clear, so the drain of the entry
            // after the EOI's exit takes the vector, `try_block` refuses to sleep on it, and
            // the next post that may help still owns a notification.
            return Notify::None;
        }
        if broken {
            return mode.notify();
        }
        self.claim_notification()
    }

    /// After this poster's RMW announced its payload and found NOTIFIED clear: turns NOTIFIED
    /// on, unless another poster did so first (its notification covers this payload) or a
    /// drain took the payload (ANNOUNCED cleared), and then notifies by the mode read after
    /// this second RMW. NOTIFIED is therefore only ever set by an RMW followed by the mode read
    /// that decided the notification, as in `raise_notification`; a drain between the two RMWs
    /// at worst makes the notification a spare one (ANNOUNCED set again by a later poster).
    fn claim_notification(&self) -> Notify {
        // ON has two bits: the claim succeeds only from "announced, not notified".
        let claimed = self.on.compare_exchange(
            ON_ANNOUNCED,
            ON_ANNOUNCED | ON_NOTIFIED,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        match claimed {
            Ok(_) => self.mode().notify(),
            Err(_) => Notify::None,
        }
    }

    /// The mode the vCPU last published.
    pub fn mode(&self) -> VcpuMode {
        VcpuMode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    /// True while a notification is outstanding (something posted and not yet drained). A hint
    /// (plain load): the protocol itself decides with [`Self::try_block`].
    pub fn has_pending(&self) -> bool {
        self.on.load(Ordering::Acquire) != 0
    }

    // ---- vCPU side (the vCPU's own thread only) ----

    /// Publishes the priority lowest-priority arbitration should see (SDM vol. 3 §11.8.3.1).
    pub fn publish_ppr(&self, ppr: u8) {
        self.ppr.store(ppr, Ordering::Relaxed);
    }

    /// Publishes the highest vector in the local APIC's ISR (`None`: nothing in service), which
    /// spares kicks for vectors that cannot be delivered before its EOI. A rise (an interrupt
    /// acknowledged for injection) may be published any time, even after the entry's drain: a
    /// poster that reads the older, lower class only sends a spare kick. A fall (an EOI, an
    /// INIT, a restore) must be published before the next [`Self::begin_guest_entry_in_service`]
    /// drains, which that call does itself (module doc, "No kick below the in-service class").
    /// The caller must only publish what its guest cannot change without an exit to it: in
    /// `user` mode every EOI is one (MMIO or a filtered x2APIC MSR).
    pub fn publish_in_service(&self, highest: Option<Vector>) {
        self.in_service
            .store(highest.map_or(0, |vector| vector >> 4), Ordering::Relaxed);
    }

    /// Publishes that the run about to begin cannot take any fixed or lowest-priority vector
    /// before it exits to the VMM: the guest's IF is clear (or an interrupt shadow holds) and
    /// the VMM has made sure it exits where that may end (it single-steps the guest, or stops it
    /// with breakpoints at every instruction ahead that may set IF, or at a HLT), with an
    /// interrupt-window exit requested in case a stop is missed. The exit then
    /// drains what was posted, exactly as the EOI's exit does for a vector the in-service class
    /// holds, so posts of such vectors need not kick: this is the highest class (every vector
    /// from 16 up is held), a rise with [`Self::publish_in_service`]'s rules (after the entry's
    /// drain, before KVM_RUN; the next [`Self::begin_guest_entry_in_service`] publishes the
    /// real class again before it drains). NMIs, INIT, SIPI, SMI, ExtINT and wake-ups still
    /// notify.
    pub fn publish_interrupts_blocked_until_exit(&self) {
        self.in_service.store(HIGHEST_CLASS, Ordering::Relaxed);
    }

    /// For a run about to begin in which the guest may retire its highest in-service vector
    /// without an exit (a paravirtual EOI: the guest clears a flag in its memory instead of
    /// writing the EOI register): publishes `highest_after`, the highest vector still in service
    /// once that one is retired, THEN reads ON with an RMW. This is a fall published after the
    /// entry's drain, which [`Self::publish_in_service`] otherwise forbids; the RMW makes it safe
    /// (module doc, "No kick below the in-service class"):
    /// - true: nothing was announced since the drain, and every poster whose RMW of ON comes later
    ///   synchronizes with this one and reads this class or a newer one, so a vector the guest
    ///   could take once it has retired the in-service one kicks;
    /// - false: a post landed since the drain and may have read the higher class and skipped
    ///   its kick. The VMM must then not let the guest skip its EOI write: that EOI exits, and
    ///   the entry after it drains the post.
    ///
    /// Call it after everything else of the entry (drain, acknowledge), right before KVM_RUN.
    #[cfg(not(feature = "broken-pv-eoi-order"))]
    pub fn publish_eoi_without_exit(&self, highest_after: Option<Vector>) -> bool {
        self.publish_in_service(highest_after);
        self.on.fetch_or(0, Ordering::AcqRel) & ON_ANNOUNCED == 0
    }

    /// Test-only broken variant (feature `broken-pv-eoi-order`): reads ON before it publishes
    /// the fall, so a poster between the two reads the higher class and skips the kick the
    /// guest needs once it has retired its vector (the loom model must catch it).
    #[cfg(feature = "broken-pv-eoi-order")]
    pub fn publish_eoi_without_exit(&self, highest_after: Option<Vector>) -> bool {
        let quiet = self.on.fetch_or(0, Ordering::AcqRel) & ON_ANNOUNCED == 0;
        self.publish_in_service(highest_after);
        quiet
    }

    /// The priority class [`Self::publish_in_service`] last published (0: nothing in service).
    pub fn published_in_service_class(&self) -> u8 {
        self.in_service.load(Ordering::Relaxed)
    }

    /// Call right before `KVM_RUN`: publishes `InGuest`, THEN drains. Any post the drain misses
    /// sees `InGuest` and kicks. Draining first would lose a post that lands in between: it sees
    /// `OutsideGuest` and does not kick, and the guest runs without it (seed 001, second race).
    /// Publishes "nothing in service" first: [`Self::begin_guest_entry_in_service`] with `None`
    /// (every post to this entry notifies as before issue 14's deferral).
    pub fn begin_guest_entry(&self) -> Posted {
        self.begin_guest_entry_in_service(None)
    }

    /// [`Self::begin_guest_entry`] for a vCPU whose highest in-service vector is `highest`:
    /// publishes its class, THEN `InGuest`, THEN drains, so that a poster whose RMW of ON
    /// follows the drain reads this class or a newer one, never the higher class of an
    /// interrupt whose EOI the vCPU has handled since (module doc).
    #[cfg(not(any(feature = "broken-ordering", feature = "broken-class-order")))]
    pub fn begin_guest_entry_in_service(&self, highest: Option<Vector>) -> Posted {
        self.publish_in_service(highest);
        self.set_mode(VcpuMode::InGuest);
        self.drain()
    }

    /// Test-only broken variant (feature `broken-ordering`): drains before publishing
    /// `InGuest`, the race of seed 001 that the loom model must catch.
    #[cfg(feature = "broken-ordering")]
    pub fn begin_guest_entry_in_service(&self, highest: Option<Vector>) -> Posted {
        self.publish_in_service(highest);
        let posted = self.drain();
        self.set_mode(VcpuMode::InGuest);
        posted
    }

    /// Test-only broken variant (feature `broken-class-order`): publishes the in-service class
    /// after the drain, so a poster that follows the drain may still read the class of an
    /// interrupt already EOId and skip a kick the guest needs (the loom model must catch it).
    #[cfg(all(feature = "broken-class-order", not(feature = "broken-ordering")))]
    pub fn begin_guest_entry_in_service(&self, highest: Option<Vector>) -> Posted {
        self.set_mode(VcpuMode::InGuest);
        let posted = self.drain();
        self.publish_in_service(highest);
        posted
    }

    /// Call right after `KVM_RUN` returns: posts now return [`Notify::None`], since the vCPU
    /// drains before it enters again (or refuses to block).
    pub fn end_guest_entry(&self) {
        self.set_mode(VcpuMode::OutsideGuest);
    }

    /// Takes everything posted so far. Safe in any mode on the vCPU's thread; a post that races
    /// with it is either taken now or has set ON again (and notified by the mode it saw).
    pub fn drain(&self) -> Posted {
        if self.on.swap(0, Ordering::AcqRel) == 0 {
            // Nothing announced. A poster whose payload is already in but whose ON is not yet
            // set will set ON after this swap and notify by the mode it reads then.
            return Posted::default();
        }
        let mut posted = Posted::default();
        for word in 0..BITMAP_WORDS {
            let pir = self.pir[word].swap(0, Ordering::Acquire);
            posted.pir[word] = pir;
            posted.level[word] = self.level[word].load(Ordering::Relaxed) & pir;
        }
        let word = self.events.swap(0, Ordering::Acquire);
        let (events, wakeup) = decode_events(word);
        posted.nmis = nmi_count(word);
        posted.events = events;
        posted.wakeup = wakeup;
        posted
    }

    /// First half of blocking (HLT with nothing deliverable, or waiting for SIPI): publishes
    /// `Blocked`, THEN checks for posted work. Returns `true` when the caller must now call
    /// [`Self::block_until_rung`]; `false` (mode back to `OutsideGuest`) when work is pending:
    /// drain it and re-evaluate instead of sleeping. Any post the check misses sees `Blocked`
    /// and returns [`Notify::Wake`].
    pub fn try_block(&self) -> bool {
        self.try_block_as(VcpuMode::Blocked)
    }

    /// [`Self::try_block`] for an AP in wait-for-SIPI (never started, or its INIT taken) whose
    /// local APIC is in its INIT state: an INIT posted alone while it sleeps is left announced
    /// and taken with the next post, the SIPI (module doc).
    pub fn try_block_awaiting_sipi(&self) -> bool {
        self.try_block_as(VcpuMode::AwaitingSipi)
    }

    fn try_block_as(&self, mode: VcpuMode) -> bool {
        self.set_mode(mode);
        // An RMW, not a load, so that it is ordered against the posters' RMWs (module doc).
        if self.on.fetch_or(0, Ordering::AcqRel) != 0 {
            self.set_mode(VcpuMode::OutsideGuest);
            return false;
        }
        true
    }

    /// Second half of blocking, only after [`Self::try_block`] returned `true`: sleeps until the
    /// doorbell rings, then publishes `OutsideGuest`. It may return with nothing posted (a ring
    /// left over from a post that [`Self::try_block`] had already seen): the caller drains,
    /// re-evaluates and blocks again if there is still nothing to do.
    pub fn block_until_rung(&self) {
        self.block_until_rung_or(None);
    }

    /// [`Self::block_until_rung`], returning at `until` too (or at a signal, on a doorbell
    /// that sees them): for a vCPU whose own APIC timer expires then, which no poster rings
    /// for. A ring that comes later is kept for the next sleep.
    pub fn block_until_rung_or(&self, until: Option<Instant>) {
        self.doorbell.wait(until);
        self.set_mode(VcpuMode::OutsideGuest);
    }

    /// `Relaxed`: entering `InGuest` / `Blocked` is always followed by an `AcqRel` RMW of ON,
    /// which publishes it to the next poster (module doc); leaving them needs no ordering (a
    /// poster that still sees the old mode sends a harmless extra kick or ring).
    fn set_mode(&self, mode: VcpuMode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    fn post_level_bit(&self, vector: Vector, trigger: TriggerMode) {
        let (word, mask) = word_and_mask(vector);
        let slot = &self.level[word];
        match trigger {
            TriggerMode::Level => {
                slot.fetch_or(mask, Ordering::Relaxed);
            }
            // Skip the RMW in the common case (the bit is already clear): a level post that
            // happened before this one is visible here by coherence.
            TriggerMode::Edge if slot.load(Ordering::Relaxed) & mask != 0 => {
                slot.fetch_and(!mask, Ordering::Relaxed);
            }
            TriggerMode::Edge => {}
        }
    }
}

impl InterruptSink for VcpuInbox {
    /// Trigger bit, then PIR bit (`Release`, carries the trigger bit), then ON.
    fn post_vector(&self, vector: Vector, trigger: TriggerMode) -> Notify {
        self.post_level_bit(vector, trigger);
        let (word, mask) = word_and_mask(vector);
        self.pir[word].fetch_or(mask, Ordering::Release);
        self.raise_vector_notification(vector)
    }

    /// Event bits, then ON. Empty: no-op. A SIPI replaces the vector of a pending one, and an
    /// INIT discards a pending SIPI posted before it (as `ApicEvents::merge` says: the INIT
    /// resets the target first, so that SIPI would no longer find it waiting). An NMI is counted
    /// (up to [`MAX_POSTED_NMIS`]), not just flagged: two NMIs from two senders must not become
    /// one before the target decides how many it may keep pending (KVM's `process_nmi`).
    fn post_events(&self, events: ApicEvents) -> Notify {
        let flags = encode_flags(&events);
        let new_sipi = events
            .sipi
            .map(|vector| EV_SIPI | (u32::from(vector) << EV_SIPI_VECTOR_SHIFT));
        if events.init || new_sipi.is_some() || events.nmi {
            let replace = |word: u32| {
                let kept_sipi = if events.init {
                    0
                } else {
                    word & (EV_SIPI | EV_SIPI_VECTOR_MASK)
                };
                let others = word & !(EV_SIPI | EV_SIPI_VECTOR_MASK);
                let others = if events.nmi { add_nmi(others) } else { others };
                Some(others | flags | new_sipi.unwrap_or(kept_sipi))
            };
            // The closure always returns Some, so this cannot fail.
            let _ = self
                .events
                .fetch_update(Ordering::Release, Ordering::Relaxed, replace);
        } else if flags != 0 {
            self.events.fetch_or(flags, Ordering::Release);
        } else {
            return Notify::None;
        }
        let init_alone = ApicEvents {
            init: true,
            ..ApicEvents::default()
        };
        if events == init_alone {
            self.raise_init_notification()
        } else {
            self.raise_notification()
        }
    }

    fn published_ppr(&self) -> u8 {
        self.ppr.load(Ordering::Relaxed)
    }
}

// `Posted` is plain data (no atomics), so its tests run in every build, loom's included.
#[cfg(test)]
mod posted_tests {
    use super::*;

    fn posted(edge: &[Vector], level: &[Vector]) -> Posted {
        let mut out = Posted::default();
        for &vector in edge.iter().chain(level) {
            let (word, mask) = word_and_mask(vector);
            out.pir[word] |= mask;
        }
        for &vector in level {
            let (word, mask) = word_and_mask(vector);
            out.level[word] |= mask;
        }
        out
    }

    #[test]
    fn merge_ors_the_vectors_of_both_drains() {
        let mut earlier = posted(&[0x20, 0x41], &[]);
        earlier.merge(posted(&[0x41, 0xFF], &[]));
        assert_eq!(
            earlier.vectors().collect::<Vec<_>>(),
            vec![0x20, 0x41, 0xFF]
        );
        assert_eq!(earlier.level, [0; BITMAP_WORDS]);
    }

    /// The trigger of a vector posted in both drains is the later one's (SDM vol. 3 §11.5.5:
    /// TMR follows the trigger of the last acceptance); a vector posted only earlier keeps its own.
    #[test]
    fn merge_takes_the_later_trigger_of_a_vector_posted_twice() {
        let mut earlier = posted(&[0x30], &[0x31, 0x32, 0x80]);
        earlier.merge(posted(&[0x31], &[0x30, 0x90]));
        assert_eq!(
            earlier,
            posted(&[0x31], &[0x30, 0x32, 0x80, 0x90]),
            "0x30 edge->level, 0x31 level->edge, 0x32/0x80 kept, 0x90 new"
        );
    }

    #[test]
    fn merge_combines_events_and_wakeup() {
        let mut earlier = Posted {
            events: ApicEvents {
                sipi: Some(0x10),
                nmi: true,
                ..Default::default()
            },
            ..Default::default()
        };
        earlier.merge(Posted {
            events: ApicEvents {
                sipi: Some(0x9A),
                extint: true,
                ..Default::default()
            },
            wakeup: true,
            ..Default::default()
        });
        let expected = ApicEvents {
            sipi: Some(0x9A),
            nmi: true,
            extint: true,
            ..Default::default()
        };
        assert_eq!(earlier.events, expected, "flags OR, the newer SIPI wins");
        assert!(earlier.wakeup);
        earlier.merge(Posted::default());
        assert!(earlier.wakeup, "a later drain without a wakeup keeps it");
        assert_eq!(earlier.events, expected);
    }

    #[test]
    fn merge_with_an_empty_drain_is_the_identity_both_ways() {
        let full = Posted {
            wakeup: true,
            ..posted(&[0x22, 0xEF], &[0x23])
        };
        let mut into_full = full;
        into_full.merge(Posted::default());
        assert_eq!(into_full, full);
        let mut into_empty = Posted::default();
        into_empty.merge(full);
        assert_eq!(into_empty, full);
        assert!(!into_empty.is_empty());
    }
}

// Unit tests use std atomics; under `--features loom` the atomics are loom's and only work
// inside a loom model (tests/loom_posting.rs).
#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::thread;

    fn edge(inbox: &VcpuInbox, vector: Vector) -> Notify {
        inbox.post_vector(vector, TriggerMode::Edge)
    }

    // SDM vol. 3C "Posted-Interrupt Processing": every one of the 256 PIR bits is distinct.
    #[test]
    fn pir_posts_and_drains_every_vector() {
        let inbox = VcpuInbox::new();
        for vector in 0..=u8::MAX {
            edge(&inbox, vector);
            let posted = inbox.drain();
            assert_eq!(posted.vectors().collect::<Vec<_>>(), vec![vector]);
            assert!(!posted.is_level(vector));
            assert!(inbox.drain().is_empty(), "vector {vector} drained twice");
        }
    }

    #[test]
    fn pir_holds_all_256_vectors_at_once() {
        let inbox = VcpuInbox::new();
        for vector in 0..=u8::MAX {
            edge(&inbox, vector);
        }
        let posted = inbox.drain();
        assert_eq!(posted.pir, [u64::MAX; BITMAP_WORDS]);
        assert_eq!(posted.vectors().count(), 256);
    }

    // SDM vol. 3 §11.5.5: TMR set on acceptance of a level-triggered vector, cleared for edge.
    #[test]
    fn level_bit_follows_the_trigger_of_the_last_post() {
        let inbox = VcpuInbox::new();
        for vector in (0..=u8::MAX).step_by(7) {
            inbox.post_vector(vector, TriggerMode::Level);
            let posted = inbox.drain();
            assert!(posted.contains(vector) && posted.is_level(vector));
            edge(&inbox, vector);
            let posted = inbox.drain();
            assert!(posted.contains(vector) && !posted.is_level(vector));
        }
    }

    #[test]
    fn level_bits_are_reported_only_for_posted_vectors() {
        let inbox = VcpuInbox::new();
        inbox.post_vector(0x30, TriggerMode::Level);
        inbox.drain();
        edge(&inbox, 0x31);
        let posted = inbox.drain();
        assert_eq!(posted.level, [0; BITMAP_WORDS]);
        inbox.post_vector(0x30, TriggerMode::Level);
        assert!(inbox.drain().is_level(0x30));
    }

    #[test]
    fn only_the_first_post_notifies_until_drained() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry();
        assert_eq!(edge(&inbox, 0x40), Notify::Kick);
        assert_eq!(edge(&inbox, 0x41), Notify::None);
        assert_eq!(
            inbox.post_events(ApicEvents {
                nmi: true,
                ..Default::default()
            }),
            Notify::None
        );
        assert_eq!(inbox.post_wakeup(), Notify::None);
        inbox.end_guest_entry();
        let posted = inbox.begin_guest_entry();
        assert!(posted.contains(0x40) && posted.contains(0x41) && posted.events.nmi);
        assert!(posted.wakeup);
        assert_eq!(edge(&inbox, 0x42), Notify::Kick);
    }

    #[test]
    fn notify_depends_on_the_published_mode() {
        let inbox = VcpuInbox::new();
        assert_eq!(inbox.mode(), VcpuMode::OutsideGuest);
        assert_eq!(edge(&inbox, 0x50), Notify::None);
        assert!(inbox.begin_guest_entry().contains(0x50));
        assert_eq!(inbox.mode(), VcpuMode::InGuest);
        assert_eq!(edge(&inbox, 0x51), Notify::Kick);
        inbox.end_guest_entry();
        inbox.drain();
        assert!(inbox.try_block());
        assert_eq!(inbox.mode(), VcpuMode::Blocked);
        assert_eq!(edge(&inbox, 0x52), Notify::Wake);
        inbox.ring_doorbell();
        inbox.block_until_rung();
        assert_eq!(inbox.mode(), VcpuMode::OutsideGuest);
        assert!(inbox.drain().contains(0x52));
    }

    /// Issue 13: an INIT alone does not wake an AP asleep in wait-for-SIPI, but is announced
    /// (the AP could not sleep through it, nor drain without it), and the next post wakes it.
    #[test]
    fn an_init_alone_leaves_an_ap_awaiting_sipi_asleep_until_the_sipi() {
        let init = ApicEvents {
            init: true,
            ..Default::default()
        };
        let sipi = ApicEvents {
            sipi: Some(0x9A),
            ..Default::default()
        };
        let inbox = VcpuInbox::new();
        assert!(inbox.try_block_awaiting_sipi());
        assert_eq!(inbox.mode(), VcpuMode::AwaitingSipi);
        assert_eq!(inbox.post_events(init), Notify::None);
        assert!(inbox.has_pending());
        assert_eq!(inbox.post_events(init), Notify::None, "still deferred");
        assert_eq!(inbox.post_events(sipi), Notify::Wake);
        assert_eq!(inbox.post_events(sipi), Notify::None, "notified already");
        inbox.ring_doorbell();
        inbox.block_until_rung();
        let posted = inbox.drain();
        assert!(posted.events.init);
        assert_eq!(
            posted.events.sipi,
            Some(0x9A),
            "the SIPI came after the INIT"
        );
    }

    /// Only an INIT alone to an AP awaiting SIPI is deferred: an INIT wakes a halted vCPU, and
    /// anything else wakes an AP awaiting SIPI.
    #[test]
    fn everything_else_still_wakes() {
        let init = ApicEvents {
            init: true,
            ..Default::default()
        };
        let inbox = VcpuInbox::new();
        assert!(inbox.try_block());
        assert_eq!(inbox.post_events(init), Notify::Wake);
        let others: [&dyn Fn(&VcpuInbox) -> Notify; 3] =
            [&|i| edge(i, 0x20), &|i| i.post_wakeup(), &|i| {
                i.post_events(ApicEvents {
                    init: true,
                    nmi: true,
                    ..Default::default()
                })
            }];
        for post in others {
            let inbox = VcpuInbox::new();
            assert!(inbox.try_block_awaiting_sipi());
            assert_eq!(post(&inbox), Notify::Wake);
        }
    }

    #[test]
    fn every_kind_of_post_notifies() {
        let cases: [&dyn Fn(&VcpuInbox) -> Notify; 4] = [
            &|i| edge(i, 0x20),
            &|i| i.post_vector(0x21, TriggerMode::Level),
            &|i| {
                i.post_events(ApicEvents {
                    init: true,
                    ..Default::default()
                })
            },
            &|i| i.post_wakeup(),
        ];
        for post in cases {
            let inbox = VcpuInbox::new();
            inbox.begin_guest_entry();
            assert_eq!(post(&inbox), Notify::Kick);
            assert!(!inbox.drain().is_empty());
        }
    }

    /// Issue 14: with 0x30 in service (class 3), a vector of class 3 or lower cannot be
    /// delivered before its EOI (SDM vol. 3 §11.8.3.1), so its post skips the kick, leaving it
    /// announced but not notified; a vector of a higher class still kicks, once.
    #[test]
    fn a_vector_the_in_service_class_holds_skips_the_kick() {
        let inbox = VcpuInbox::new();
        assert!(inbox.begin_guest_entry_in_service(Some(0x30)).is_empty());
        assert_eq!(inbox.published_in_service_class(), 3);
        assert_eq!(edge(&inbox, 0x31), Notify::None);
        assert_eq!(inbox.post_vector(0x20, TriggerMode::Level), Notify::None);
        assert!(inbox.has_pending());
        assert_eq!(edge(&inbox, 0x41), Notify::Kick, "class 4 is deliverable");
        assert_eq!(edge(&inbox, 0x42), Notify::None, "notified already");
        assert_eq!(edge(&inbox, 0x32), Notify::None);
        inbox.end_guest_entry();
        let posted = inbox.begin_guest_entry_in_service(Some(0x41));
        assert_eq!(
            posted.vectors().collect::<Vec<_>>(),
            [0x20, 0x31, 0x32, 0x41, 0x42]
        );
        assert!(posted.is_level(0x20));
        assert_eq!(edge(&inbox, 0x4F), Notify::None, "class 4 now in service");
        assert_eq!(edge(&inbox, 0x50), Notify::Kick);
    }

    /// The skip needs the vCPU in guest mode (outside it nothing is kicked anyway, and a vCPU
    /// halted in a handler is woken as before), something in service (the TPR alone holds
    /// nothing: a CR8 write lowers it without an exit), and a legal vector (0-15 are refused
    /// with an error that must not wait).
    #[test]
    fn only_a_running_vcpu_with_a_vector_in_service_skips_kicks() {
        let inbox = VcpuInbox::new();
        inbox.publish_in_service(Some(0xEF));
        assert_eq!(edge(&inbox, 0x31), Notify::None, "outside guest mode");
        inbox.drain();
        assert!(inbox.try_block());
        assert_eq!(edge(&inbox, 0x31), Notify::Wake, "halted in the handler");
        inbox.ring_doorbell();
        inbox.block_until_rung();
        inbox.drain();

        inbox.publish_ppr(0xF0);
        inbox.begin_guest_entry_in_service(None);
        assert_eq!(edge(&inbox, 0x31), Notify::Kick, "held by the TPR only");
        inbox.end_guest_entry();
        inbox.begin_guest_entry_in_service(Some(0x10));
        assert_eq!(edge(&inbox, 0x05), Notify::Kick, "illegal vector");
        inbox.end_guest_entry();
        inbox.drain();
        inbox.begin_guest_entry();
        assert_eq!(inbox.published_in_service_class(), 0);
        assert_eq!(edge(&inbox, 0x10), Notify::Kick, "nothing in service");
    }

    /// A run that cannot take a maskable interrupt before it exits holds every legal vector
    /// (no kick) but no event; the next entry publishes the real class again before it drains.
    #[test]
    fn a_run_blocked_until_its_exit_holds_every_vector_but_no_event() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry();
        inbox.publish_interrupts_blocked_until_exit();
        assert_eq!(edge(&inbox, 0xFF), Notify::None);
        assert_eq!(edge(&inbox, 0x10), Notify::None);
        assert_eq!(
            edge(&inbox, 0x05),
            Notify::Kick,
            "illegal vectors are never held"
        );
        inbox.end_guest_entry();
        assert_eq!(inbox.begin_guest_entry().vectors().count(), 3);
        assert_eq!(inbox.published_in_service_class(), 0);
        inbox.publish_interrupts_blocked_until_exit();
        let nmi = ApicEvents {
            nmi: true,
            ..Default::default()
        };
        assert_eq!(inbox.post_events(nmi), Notify::Kick);
        inbox.end_guest_entry();
        inbox.begin_guest_entry();
        assert_eq!(edge(&inbox, 0x20), Notify::Kick, "the next run takes it");
    }

    /// A rise of the class published after the entry's drain (an interrupt acknowledged for
    /// injection) takes effect for the posts that read it.
    #[test]
    fn a_class_published_after_the_drain_applies_to_later_posts() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry();
        inbox.publish_in_service(Some(0x61));
        assert_eq!(edge(&inbox, 0x60), Notify::None);
        assert_eq!(edge(&inbox, 0x70), Notify::Kick);
    }

    /// A vCPU that halts in the handler with a skipped vector announced refuses to sleep: its
    /// drain finds the vector (still held by the in-service class, so it may then sleep).
    #[test]
    fn a_skipped_vector_keeps_the_vcpu_from_sleeping_until_drained() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry_in_service(Some(0x30));
        assert_eq!(edge(&inbox, 0x31), Notify::None);
        inbox.end_guest_entry();
        assert!(!inbox.try_block());
        assert_eq!(inbox.mode(), VcpuMode::OutsideGuest);
        assert!(inbox.drain().contains(0x31));
        assert!(inbox.try_block());
    }

    /// Only NOTIFIED owns a notification: an NMI, a wake-up or an INIT after a skipped kick
    /// still kicks (an INIT is no vector an ISR holds).
    #[test]
    fn other_posts_after_a_skipped_kick_still_kick() {
        let posts: [&dyn Fn(&VcpuInbox) -> Notify; 3] = [
            &|i| {
                i.post_events(ApicEvents {
                    nmi: true,
                    ..Default::default()
                })
            },
            &|i| i.post_wakeup(),
            &|i| {
                i.post_events(ApicEvents {
                    init: true,
                    ..Default::default()
                })
            },
        ];
        for post in posts {
            let inbox = VcpuInbox::new();
            inbox.begin_guest_entry_in_service(Some(0x30));
            assert_eq!(edge(&inbox, 0x31), Notify::None);
            assert_eq!(post(&inbox), Notify::Kick);
            assert_eq!(edge(&inbox, 0x90), Notify::None, "notified already");
        }
    }

    /// The claim of NOTIFIED, the second RMW of a post that may help, with a drain between it
    /// and the poster's first RMW (built by hand: the payload and ANNOUNCED, the drain, then
    /// the claim). The drain took the payload: the claim gives up and sets nothing, so the
    /// next post notifies. With a skipped post announced again in between, the claim notifies
    /// (a spare kick) and owns NOTIFIED.
    #[test]
    fn a_drain_between_the_two_rmws_of_a_post() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry_in_service(Some(0x30));
        inbox.pir[1].fetch_or(1 << 1, Ordering::Release); // vector 0x41
        inbox.on.fetch_or(ON_ANNOUNCED, Ordering::AcqRel);
        assert!(inbox.drain().contains(0x41), "the drain took the payload");
        assert_eq!(inbox.claim_notification(), Notify::None);
        assert!(!inbox.has_pending(), "no NOTIFIED without ANNOUNCED");
        assert_eq!(edge(&inbox, 0x31), Notify::None, "skipped: held");
        assert_eq!(inbox.claim_notification(), Notify::Kick, "a spare kick");
        assert_eq!(edge(&inbox, 0x42), Notify::None, "the claim owns NOTIFIED");
        assert!(inbox.drain().contains(0x31));
        assert_eq!(edge(&inbox, 0x42), Notify::Kick);
    }

    #[test]
    fn empty_events_post_nothing() {
        let inbox = VcpuInbox::new();
        inbox.begin_guest_entry();
        assert_eq!(inbox.post_events(ApicEvents::default()), Notify::None);
        assert!(!inbox.has_pending());
    }

    // SDM vol. 3 §11.6.1 / §9.4: INIT, NMI, SMI, ExtINT latch; one start-up vector is held.
    #[test]
    fn event_word_merges_flags_and_newer_sipi_wins() {
        let inbox = VcpuInbox::new();
        inbox.post_events(ApicEvents {
            init: true,
            ..Default::default()
        });
        inbox.post_events(ApicEvents {
            sipi: Some(0x10),
            ..Default::default()
        });
        inbox.post_events(ApicEvents {
            sipi: Some(0x9F),
            nmi: true,
            ..Default::default()
        });
        inbox.post_events(ApicEvents {
            smi: true,
            extint: true,
            ..Default::default()
        });
        let posted = inbox.drain();
        let expected = ApicEvents {
            init: true,
            sipi: Some(0x9F),
            nmi: true,
            smi: true,
            extint: true,
        };
        assert_eq!(posted.events, expected);
        assert!(!posted.wakeup);
        assert!(inbox.drain().is_empty());
    }

    /// Two NMIs posted before a drain are two (KVM's `nmi_queued` counts them); a third
    /// coalesces, since no state lets more than two be pending (`process_nmi`).
    #[test]
    fn nmis_are_counted_up_to_two_per_drain() {
        let inbox = VcpuInbox::new();
        let nmi = ApicEvents {
            nmi: true,
            ..Default::default()
        };
        assert!(inbox.drain().is_empty());
        inbox.post_events(nmi);
        let one = inbox.drain();
        assert_eq!((one.events.nmi, one.nmis), (true, 1));
        inbox.post_events(nmi);
        inbox.post_events(ApicEvents {
            nmi: true,
            sipi: Some(0x10),
            ..Default::default()
        });
        let two = inbox.drain();
        assert_eq!(
            (two.events.nmi, two.nmis, two.events.sipi),
            (true, 2, Some(0x10))
        );
        for _ in 0..5 {
            inbox.post_events(nmi);
        }
        assert_eq!(inbox.drain().nmis, MAX_POSTED_NMIS);
        let mut merged = Posted::default();
        merged.merge(two);
        merged.merge(one);
        assert_eq!(merged.nmis, MAX_POSTED_NMIS);
        assert_eq!(inbox.drain().nmis, 0);
    }

    /// Two threads posting an NMI at the same moment: the drains see exactly two.
    #[test]
    fn concurrent_nmis_from_two_threads_both_count() {
        for _ in 0..200 {
            let inbox = Arc::new(VcpuInbox::new());
            let senders: Vec<_> = (0..2)
                .map(|_| {
                    let inbox = inbox.clone();
                    thread::spawn(move || {
                        inbox.post_events(ApicEvents {
                            nmi: true,
                            ..Default::default()
                        })
                    })
                })
                .collect();
            let mut total = inbox.drain().nmis;
            for sender in senders {
                sender.join().unwrap();
            }
            total += inbox.drain().nmis;
            assert_eq!(total, 2);
        }
    }

    #[test]
    fn every_sipi_vector_round_trips() {
        let inbox = VcpuInbox::new();
        for vector in 0..=u8::MAX {
            inbox.post_events(ApicEvents {
                sipi: Some(vector),
                ..Default::default()
            });
            assert_eq!(inbox.drain().events.sipi, Some(vector));
        }
    }

    #[test]
    fn wakeup_is_drained_once() {
        let inbox = VcpuInbox::new();
        assert_eq!(inbox.post_wakeup(), Notify::None);
        let posted = inbox.drain();
        assert!(posted.wakeup && posted.events.is_empty() && posted.pir == [0; 4]);
        assert!(!inbox.drain().wakeup);
    }

    #[test]
    fn try_block_refuses_while_work_is_pending() {
        let inbox = VcpuInbox::new();
        edge(&inbox, 0x60);
        assert!(!inbox.try_block());
        assert_eq!(inbox.mode(), VcpuMode::OutsideGuest);
        assert!(inbox.drain().contains(0x60));
        inbox.post_wakeup();
        assert!(!inbox.try_block());
        inbox.drain();
        assert!(inbox.try_block());
    }

    #[test]
    fn published_ppr_is_what_was_published() {
        let inbox = VcpuInbox::new();
        assert_eq!(inbox.published_ppr(), 0);
        inbox.publish_ppr(0x7F);
        assert_eq!(inbox.published_ppr(), 0x7F);
    }

    #[test]
    fn doorbell_rung_before_wait_is_not_lost() {
        let bell = Doorbell::new();
        bell.ring();
        bell.wait(); // returns at once: the ring was remembered
    }

    #[test]
    fn doorbell_wakes_a_waiting_thread() {
        let bell = Arc::new(Doorbell::new());
        let waiter = {
            let bell = Arc::clone(&bell);
            thread::spawn(move || bell.wait())
        };
        bell.ring();
        waiter.join().unwrap();
    }

    #[test]
    fn blocked_vcpu_is_woken_by_a_post_from_another_thread() {
        for round in 0..200u32 {
            let inbox = Arc::new(VcpuInbox::new());
            let vector = (round % 240 + 16) as Vector;
            let vcpu = {
                let inbox = Arc::clone(&inbox);
                thread::spawn(move || {
                    if inbox.try_block() {
                        inbox.block_until_rung();
                    }
                    inbox.drain()
                })
            };
            if edge(&inbox, vector) == Notify::Wake {
                inbox.ring_doorbell();
            }
            assert!(vcpu.join().unwrap().contains(vector));
        }
    }

    /// Posters each post their share of the vectors, then wait until the consumer has seen it
    /// before posting it again, so every post is counted exactly once (no coalescing).
    #[test]
    fn stress_every_post_is_drained_exactly_once() {
        const POSTERS: usize = 4;
        const ROUNDS: usize = 50;
        const SPIN_LIMIT: usize = 50_000_000;
        let inbox = Arc::new(VcpuInbox::new());
        let seen: Arc<Vec<AtomicUsize>> = Arc::new((0..256).map(|_| AtomicUsize::new(0)).collect());
        let posters_done = Arc::new(AtomicUsize::new(0));

        let consumer = {
            let (inbox, seen, done) = (
                Arc::clone(&inbox),
                Arc::clone(&seen),
                Arc::clone(&posters_done),
            );
            thread::spawn(move || {
                let record = |posted: Posted| {
                    for v in posted.vectors() {
                        seen[usize::from(v)].fetch_add(1, Ordering::SeqCst);
                    }
                };
                while done.load(Ordering::SeqCst) < POSTERS {
                    record(inbox.begin_guest_entry());
                    inbox.end_guest_entry();
                    thread::yield_now();
                }
                record(inbox.drain());
            })
        };
        let posters: Vec<_> = (0..POSTERS)
            .map(|p| {
                let (inbox, seen, done) = (
                    Arc::clone(&inbox),
                    Arc::clone(&seen),
                    Arc::clone(&posters_done),
                );
                thread::spawn(move || {
                    let mine: Vec<Vector> = (0..=u8::MAX)
                        .filter(|v| usize::from(*v) % POSTERS == p)
                        .collect();
                    for round in 0..ROUNDS {
                        for &v in &mine {
                            inbox.post_vector(v, TriggerMode::Edge);
                        }
                        for &v in &mine {
                            let slot = &seen[usize::from(v)];
                            let mut spins = 0;
                            while slot.load(Ordering::SeqCst) <= round {
                                spins += 1;
                                assert!(
                                    spins < SPIN_LIMIT,
                                    "vector {v} of round {round} never drained"
                                );
                                thread::yield_now();
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        for poster in posters {
            poster.join().unwrap();
        }
        consumer.join().unwrap();
        for (v, count) in seen.iter().enumerate() {
            assert_eq!(count.load(Ordering::SeqCst), ROUNDS, "vector {v}");
        }
        assert!(inbox.drain().is_empty());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Post(Vector, bool),
        Events(u8, Option<Vector>),
        Drain,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (any::<u8>(), any::<bool>()).prop_map(|(v, level)| Step::Post(v, level)),
            1 => (0u8..16, proptest::option::of(any::<u8>())).prop_map(|(f, s)| Step::Events(f, s)),
            2 => Just(Step::Drain),
        ]
    }

    proptest! {
        /// One thread, any interleaving of posts and drains: every posted vector comes out of
        /// exactly one drain (posts of a vector already pending coalesce, as in IRR), with the
        /// trigger of its last post; events come out once, the newest SIPI vector winning.
        #[test]
        fn drains_return_exactly_what_was_posted(steps in proptest::collection::vec(step(), 0..64)) {
            let inbox = VcpuInbox::new();
            let mut pending: BTreeSet<Vector> = BTreeSet::new();
            let mut level_of = [false; 256];
            let mut pending_events = ApicEvents::default();
            let mut pending_nmis = 0u8;
            let check = |posted: Posted, pending: &mut BTreeSet<Vector>, events: &mut ApicEvents, nmis: &mut u8, level_of: &[bool; 256]| {
                let drained: BTreeSet<Vector> = posted.vectors().collect();
                prop_assert_eq!(&drained, &*pending);
                for v in drained {
                    prop_assert_eq!(posted.is_level(v), level_of[usize::from(v)]);
                }
                prop_assert_eq!(posted.events, *events);
                prop_assert_eq!(posted.nmis, *nmis);
                pending.clear();
                *events = ApicEvents::default();
                *nmis = 0;
                Ok(())
            };
            for step in steps {
                match step {
                    Step::Post(v, level) => {
                        let trigger = if level { TriggerMode::Level } else { TriggerMode::Edge };
                        inbox.post_vector(v, trigger);
                        pending.insert(v);
                        level_of[usize::from(v)] = level;
                    }
                    Step::Events(flags, sipi) => {
                        let events = ApicEvents {
                            init: flags & 1 != 0, nmi: flags & 2 != 0, smi: flags & 4 != 0,
                            extint: flags & 8 != 0, sipi,
                        };
                        inbox.post_events(events);
                        pending_events.merge(events);
                        if events.nmi {
                            pending_nmis = (pending_nmis + 1).min(MAX_POSTED_NMIS);
                        }
                    }
                    Step::Drain => check(inbox.drain(), &mut pending, &mut pending_events, &mut pending_nmis, &level_of)?,
                }
                prop_assert_eq!(inbox.has_pending(), !pending.is_empty() || !pending_events.is_empty());
            }
            check(inbox.drain(), &mut pending, &mut pending_events, &mut pending_nmis, &level_of)?;
            prop_assert!(inbox.drain().is_empty());
        }
    }
}
