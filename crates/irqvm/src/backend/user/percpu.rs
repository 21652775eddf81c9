//! The per-vCPU half of the `user` backend: one `VcpuInterrupts` driven around KVM_RUN.
//!
//! `before_entry`, in this order (seed 001: publish, then drain, then decide):
//! 1. `begin_guest_entry`: mode InGuest, then drain the inbox. From here a post kicks us, so
//!    nothing posted later can be missed: at worst KVM_RUN returns EINTR at once.
//! 2. `accept_events` (seed 000): INIT -> architectural reset of the registers and the MSRs INIT
//!    clears (`reset`), SIPI -> real-mode start. The APIC's own reset happens inside the model.
//!    A protected-state AP (`--protected-state-aps`, seed 004) gets no register write: its first
//!    SIPI runs its launch state, a later one ends its AP Reset Hold (the GHCB MSR answer).
//! 3. poll the APIC timer with the VM clock; arm this thread's POSIX timer for the next deadline
//!    when it changed, or fired before VM time reached it (`apic_timer`).
//! 4. block? (halted with nothing deliverable, or an AP waiting for SIPI): `end_guest_entry`
//!    first, then `Block`; `block` sleeps on the inbox doorbell (try_block re-checks ON after
//!    publishing Blocked) no later than the timer deadline, whose signal also ends the sleep.
//!    Before sleeping, the vCPU polls its inbox and a near timer deadline for a while
//!    ([`HaltPoll`]).
//! 5. inject: NMIs with KVM_NMI, up to two while none is in service and one while one is
//!    (KVM's `process_nmi`; blocking read with KVM_GET_VCPU_EVENTS); ExtINT and APIC vectors
//!    through `kvm_run`'s synced events (KVM_SYNC_X86_EVENTS; KVM_INTERRUPT where they are
//!    stale) only if KVM said `ready_for_interrupt_injection` and IF=1 at the last exit (then
//!    the PIC / APIC is acknowledged, right before the injection); otherwise
//!    `request_interrupt_window`, and,
//!    since KVM reports the window only at its next exit (~1 ms for a spinning guest here), the
//!    guest is single-stepped to the boundary where it can take the interrupt
//!    ([`crate::backend::step`]: IF=0, an STI / MOV SS shadow, or a TPR that only a CR8 write,
//!    which does not exit here, will lower; a HLT runs unstepped to its own exit, an IRETQ to a
//!    breakpoint at its return address), and where stepping is refused or its budget spent,
//!    kicked soon after ([`WindowKick`]; at once if the flags may just be stale).
//! 6. `kvm_run.cr8` = TPR[7:4] (KVM loads it into CR8 on entry without an in-kernel LAPIC).
//!
//! After an exit, CR8 is read back into the TPR before the exit is handled (an MMIO TPR write in
//! the same exit must win over the older CR8), and the mode goes back to OutsideGuest.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{SyncReg, VcpuFd};

use irqchip::mpstate::{
    InitBlocking, MpState, ProtectedStateSipi, SipiAction, SipiDelivery, StandardSipi,
};
use irqchip::vcpu::{ApicAccessResult, Injection, VcpuInterrupts};
use irqchip::{GuestFault, Nanos};

use super::apic_timer::HostTimer;
use super::ghcb::{GhcbMsr, MSR_GHCB};
use super::platform::{Platform, IOAPIC_BASE, IOAPIC_SIZE};
use super::pv_eoi::{PvEoi, MSR_KVM_PV_EOI_EN};
use super::reset::{
    apply_init, apply_sipi, flush_staged, stage_apic_base, stage_sipi, write_msr, InitApplied,
};
use super::{is_apic_msr, Shared, MSR_APIC_BASE};
use crate::backend::step::{ReturnPoint, StepOutcome, Stepper, SyncedRegs};
use crate::backend::{
    BlockReason, ChipExit, EntryDecision, ExitHandled, IrqchipError, VcpuFabric, VcpuIrqchip,
};
use crate::kick::{kick_self, KickTimer};
use crate::kvm::{inject_interrupt, KvmError};
use crate::trace::{Kind, VcpuProbe};

/// Size of the xAPIC register page.
const APIC_PAGE_SIZE: u64 = 0x1000;
/// The most entries in a row an interrupt waits for an NMI KVM holds
/// (`UserVcpuChip::nmi_deliverable_in_kvm`): one is enough where KVM delivers it at the next entry.
const MAX_IRQ_HELD_FOR_NMI: u8 = 2;
/// The EOI register: xAPIC offset 0xB0, x2APIC MSR 0x80B (SDM vol. 3 §11.8.5, §11.12.1.2).
const APIC_EOI_OFFSET: u64 = 0xB0;
const X2APIC_EOI_MSR: u32 = 0x80B;

/// Initial first delay of the self-kick that replaces KVM's interrupt window ([`WindowKick`]).
const WINDOW_KICK_START: Duration = Duration::from_micros(35);
/// The shortest first delay the adaptation goes down to.
const WINDOW_KICK_MIN: Duration = Duration::from_micros(20);
/// Past this delay KVM's own exits (about one a millisecond here) come as soon: stop kicking.
const WINDOW_KICK_LAST: Duration = Duration::from_micros(560);

/// Longest halt poll (KVM's default `halt_poll_ns`).
const HALT_POLL_MAX: Duration = Duration::from_micros(200);
/// A gap this long between two turns of the poll loop means another task ran: stop polling.
const HALT_POLL_PREEMPTED: Duration = Duration::from_micros(50);
/// First poll window after a sleep that a poll would have caught.
const HALT_POLL_START: Duration = Duration::from_micros(10);
/// Open-ended polls in a row that may end in vain (at the full window, or preempted) before
/// polling is switched off.
const HALT_POLL_MISSES: u32 = 2;
/// While switched off, every this many halts one open-ended poll probes whether polling pays
/// again.
const HALT_POLL_PROBE_EVERY: u32 = 8;

/// KVM_RUNs after a SIPI with the system registers copied out at each return
/// (`UserVcpuChip::apic_base_watch`), until the AP first changes IA32_APIC_BASE. An AP's start-up
/// code enables its APIC or switches it to x2APIC mode among its first exits to userspace
/// (`bench_boot`'s at the very first, issue 13); each copy costs KVM a `__get_sregs` at the
/// return, where the change it serves saves a KVM_SET_MSRS ioctl (11-12 µs on the Intel kvm_pvm
/// host, docs/benchmarks.md "Session 14").
const APIC_BASE_WATCH: u8 = 8;

/// How a halt poll ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PollOutcome {
    /// Something was posted: the vCPU re-enters without sleeping.
    Work,
    /// The APIC timer deadline passed: the vCPU re-enters and polls its timer.
    Deadline,
    /// The window ended (or the scheduler ran another task here): sleep.
    GaveUp {
        /// The poll was preempted rather than reaching the end of its window.
        preempted: bool,
    },
}

/// Halt polling, as KVM does for halted vCPUs with an in-kernel LAPIC: before sleeping on the
/// doorbell, spin for a while watching the inbox's ON flag (a plain load) and the APIC timer
/// deadline. A post that lands during the poll sees the vCPU OutsideGuest, so the poster makes
/// no syscall at all, and the vCPU needs no futex wake-up and no scheduler round trip (tens to
/// hundreds of µs on this shared host). The window adapts like KVM's: it doubles (from 10 µs,
/// up to 200 µs) after a sleep short enough that a poll would have caught it, and halves after
/// a sleep longer than the maximum; a timer deadline within 200 µs is always polled for.
///
/// KVM polls only while no other task is runnable on its CPU (`single_task_running`), which
/// userspace cannot ask cheaply. The poll that waits for another thread (a device thread, a
/// vCPU sending an IPI) is what that rule protects: on a host with fewer free cores than
/// spinning threads, the poll takes the core the waker needs, so it never succeeds and delays
/// the very post it waits for (docs/benchmarks.md: `irq_host` and the many-to-one storm lost
/// to `kernel` with it, and its CPU time per interrupt doubled). So the open-ended part is
/// judged by its results: after two polls in a row that ended in vain at the full 200 µs
/// window (or were preempted), it is switched off, and one poll in eight probes whether it
/// pays again (a caught post switches it back on). The deadline part needs no other thread and
/// stays. A poll also stops at once when a gap in its loop shows the scheduler ran another task
/// here.
#[derive(Debug)]
struct HaltPoll {
    window: Duration,
    /// Open-ended polls in a row that gave up (counted only at the full window or preempted).
    misses: u32,
    /// Halts since the open-ended poll was switched off (0: on).
    off_for: u32,
}

impl HaltPoll {
    fn new() -> Self {
        Self {
            window: Duration::ZERO,
            misses: 0,
            off_for: 0,
        }
    }

    /// The open-ended window of this halt's poll: zero while switched off, except for a probe.
    fn open_window(&mut self) -> Duration {
        if self.off_for == 0 {
            return self.window;
        }
        self.off_for = self.off_for.saturating_add(1);
        if self.off_for % HALT_POLL_PROBE_EVERY == 0 {
            self.window.max(HALT_POLL_START)
        } else {
            Duration::ZERO
        }
    }

    /// Spins until work is posted, `deadline` passes, or the window ends.
    fn poll(
        &mut self,
        inbox: &irqchip::posting::VcpuInbox,
        deadline: Option<Instant>,
    ) -> PollOutcome {
        let window = self.open_window();
        let outcome = Self::spin(inbox, deadline, window);
        self.judge(outcome, window);
        outcome
    }

    fn spin(
        inbox: &irqchip::posting::VcpuInbox,
        deadline: Option<Instant>,
        window: Duration,
    ) -> PollOutcome {
        let start = Instant::now();
        let mut until = start + window;
        if let Some(d) = deadline.filter(|&d| d <= start + HALT_POLL_MAX) {
            until = until.max(d);
        }
        let mut last = start;
        loop {
            if inbox.has_pending() {
                return PollOutcome::Work;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return PollOutcome::Deadline;
            }
            // KVM stops polling when another task is runnable on its CPU. From userspace, a
            // gap between two turns of this tight loop says the scheduler ran something else
            // here: stop polling and sleep, so a waker's futex wake-up (which the scheduler
            // favours) brings us back rather than our leftover slice. Yielding instead was
            // measured worse: under load a yield hands the core away for a whole slice.
            let preempted = now.duration_since(last) > HALT_POLL_PREEMPTED;
            if now >= until || preempted {
                return PollOutcome::GaveUp { preempted };
            }
            last = now;
            std::hint::spin_loop();
        }
    }

    /// Switches the open-ended poll off after [`HALT_POLL_MISSES`] vain ones, on after a
    /// caught post. A poll that gave up below the full window says only that the window is
    /// still growing (KVM's rule, `slept`), not that polling cannot pay.
    fn judge(&mut self, outcome: PollOutcome, window: Duration) {
        match outcome {
            PollOutcome::Work if window > Duration::ZERO => {
                self.misses = 0;
                self.off_for = 0;
            }
            PollOutcome::GaveUp { preempted } if preempted || window >= HALT_POLL_MAX => {
                self.misses = self.misses.saturating_add(1);
                if self.misses >= HALT_POLL_MISSES && self.off_for == 0 {
                    self.off_for = 1;
                }
            }
            _ => {}
        }
    }

    /// A sleep of `slept` ended: adapt the window.
    fn slept(&mut self, slept: Duration) {
        if slept <= HALT_POLL_MAX {
            self.window = (self.window * 2).clamp(HALT_POLL_START, HALT_POLL_MAX);
        } else {
            self.window /= 2;
        }
    }
}

/// The wait for an interrupt window, shortened. Without an in-kernel LAPIC, KVM reports an open
/// window (KVM_EXIT_IRQ_WINDOW_OPEN) only at its next exit, which for a spinning guest on this
/// host comes about once a millisecond (`docs/kvm-facts.md`). So while an interrupt waits for the
/// guest to set IF (or leave an STI/MOV-SS shadow), the vCPU may also kick itself with a one-shot
/// timer; every kick is a KVM_RUN return with fresh `if_flag` / `ready_for_interrupt_injection`.
/// Within one wait (an *episode*, from the first "not ready" to the injection) the delay doubles
/// from the current first delay up to 560 µs, then the vCPU leaves it to KVM.
///
/// A kick is not free: a KVM_RUN round trip (~10 µs of guest progress) plus the arming syscall
/// (~7-9 µs here). It pays when the guest spins with IF=1 after the window opened (a self-IPI
/// sent inside `cli`/`popf`, then a wait loop: ~1 ms saved); it is waste when the guest is on its
/// way to an exit anyway (an interrupt handler's `iretq` back to `sti; hlt`). The first delay
/// therefore adapts per vCPU, from 35 µs: an episode ended by a kick halves it (down to 20 µs);
/// an episode that a guest exit ended while a kick was armed (the arming was wasted, and the
/// leftover kick will cost a KVM_RUN return), or in which a kick found the guest still not
/// ready, or a kick left over from an episode that had already ended, doubles it (beyond
/// 560 µs: no kicks at all); an episode that lasted longer than 560 µs with no kick armed (so
/// KVM's own exit ended it) brings kicks back.
#[derive(Debug)]
struct WindowKick {
    /// Created on the vCPU thread at its first use (it signals the thread that creates it).
    timer: Option<KickTimer>,
    /// When the armed timer fires; `None` once seen fired, or forgotten at an injection.
    due: Option<Instant>,
    /// The first delay of the next episode (adaptive, see above).
    first: Duration,
    /// The next delay within the current episode.
    delay: Duration,
    /// The current episode: when it began and how many kicks found the guest still not ready.
    episode: Option<(Instant, u32)>,
}

impl WindowKick {
    fn new() -> Self {
        Self {
            timer: None,
            due: None,
            first: WINDOW_KICK_START,
            delay: WINDOW_KICK_START,
            episode: None,
        }
    }

    /// True (once) when the armed kick's time has passed: this entry follows our kick.
    fn take_fired(&mut self, now: Instant) -> bool {
        let fired = self.due.is_some_and(|due| due <= now);
        if fired {
            self.due = None;
        }
        fired
    }

    /// An interrupt waits and the guest cannot take it: arm the next kick of the episode, unless
    /// one is pending or the backoff is exhausted.
    fn not_ready(&mut self, now: Instant, fired: bool) {
        let (_, useless) = self.episode.get_or_insert_with(|| {
            self.delay = self.first;
            (now, 0)
        });
        if fired {
            *useless += 1;
        }
        if self.due.is_some() || self.delay > WINDOW_KICK_LAST {
            return;
        }
        if self.timer.is_none() {
            match KickTimer::for_current_thread() {
                Ok(t) => self.timer = Some(t),
                Err(e) => {
                    tracing::debug!("no window kick timer ({e}): waiting for KVM's window");
                    self.first = Duration::MAX;
                    self.delay = Duration::MAX;
                    return;
                }
            }
        }
        if let Some(timer) = &self.timer {
            timer.arm(self.delay);
            self.due = Some(now + self.delay);
            self.delay = self.delay.saturating_mul(2);
        }
    }

    /// The interrupt went in (`fired`: right after our kick): end the episode and adapt. An
    /// armed timer is left to fire: a disarm is a syscall right before the entry that delivers
    /// the interrupt, and a leftover kick costs at most one KVM_RUN return (and is counted).
    fn injected(&mut self, now: Instant, fired: bool) {
        let Some((start, useless)) = self.episode.take() else {
            if fired {
                self.leftover();
            }
            return;
        };
        if fired {
            self.first = (self.first / 2).max(WINDOW_KICK_MIN);
        } else if useless > 0 || self.due.is_some() {
            self.first = self.first.saturating_mul(2);
        } else if now.saturating_duration_since(start) > WINDOW_KICK_LAST {
            self.first = (self.first.min(WINDOW_KICK_LAST) / 2).max(WINDOW_KICK_MIN);
        }
        self.due = None;
    }

    /// A kick fired with no episode going on: it only cost a KVM_RUN return.
    fn leftover(&mut self) {
        if self.episode.is_none() {
            self.first = self.first.saturating_mul(2);
        }
    }
}

/// `kvm_run` of the vCPU this chip belongs to, captured on the vCPU thread in `before_entry`.
#[derive(Clone, Copy)]
struct RunPtr(*const kvm_run);

// SAFETY: the pointer is only dereferenced on the vCPU thread that owns the VcpuFd (and so the
// kvm_run mapping); it is carried across threads only as a value, before being set.
unsafe impl Send for RunPtr {}

impl RunPtr {
    /// CR8 and IF as KVM left them at the last KVM_RUN return.
    fn cr8_and_if(self) -> Option<(u64, bool)> {
        if self.0.is_null() {
            return None;
        }
        // Non-null means it was set from `VcpuFd::get_kvm_run` of the VcpuFd whose KVM_RUN just
        // returned on this thread; the mapping lives as long as that VcpuFd, which outlives the
        // chip's use in the vCPU loop.
        // SAFETY: so the mapping is live, and KVM writes these fields only inside KVM_RUN.
        let run = unsafe { &*self.0 };
        Some((run.cr8, run.if_flag != 0))
    }
}

/// How INIT and SIPI treat this vCPU's registers (seed 004).
enum Sipi {
    /// INIT loads the state after INIT, SIPI starts real mode at the vector.
    Standard(StandardSipi),
    /// `--protected-state-aps`, an AP: no register writes; the first SIPI runs the launch state,
    /// later ones end the AP Reset Hold.
    Protected(ProtectedStateSipi),
}

impl Sipi {
    fn plug(&mut self) -> &mut dyn SipiDelivery {
        match self {
            Self::Standard(s) => s,
            Self::Protected(p) => p,
        }
    }
}

pub(crate) struct UserVcpuChip {
    interrupts: VcpuInterrupts,
    sipi: Sipi,
    /// The GHCB MSR, present with `--protected-state-aps` (on every vCPU; only an AP's AP Reset
    /// Hold request parks it).
    ghcb: Option<GhcbMsr>,
    shared: std::sync::Arc<Shared>,
    signature: u32,
    run: RunPtr,
    /// CR8 was already read back for the current exit (in `handle_exit`).
    cr8_synced: bool,
    /// The guest executed HLT with IF=0: only NMI, SMI, INIT or SIPI end that halt.
    halted_with_if_clear: bool,
    /// The registers were just rewritten (INIT/SIPI): KVM's ready flag and IF are stale.
    regs_rewritten: bool,
    /// The POSIX timer of this vCPU's thread that fires its APIC timer.
    host_timer: HostTimer,
    /// KVM's `if_flag` / `ready_for_interrupt_injection` come from an exit handled here, not
    /// from a KVM_RUN that returned EINTR: the exiting instruction may not have completed yet
    /// (at an MMIO read exit RIP is still on it), so "not ready" may be stale.
    flags_from_exit: bool,
    /// The instruction of the last exit has completed, with nothing left for KVM to finish at
    /// the next KVM_RUN (an MMIO write of one fragment, a debug or interrupt-window exit): its
    /// RIP is a boundary where irqvm may hand KVM new registers ([`Self::finish_handler`]).
    /// Kept through a KVM_RUN that returned without an exit.
    exit_insn_done: bool,
    window_kick: WindowKick,
    /// Single-stepping to the exact interrupt boundary ([`crate::backend::step`]).
    stepper: Stepper,
    /// The last injection made at a stepped boundary (what, and the RIP it interrupted), and
    /// whether the one before it was the same: see [`Self::step_to_window`].
    last_stepped: Option<(Injection, u64)>,
    /// Where the handler of the interrupt injected last returns ([`Self::return_point`]): an
    /// interrupt that then waits for IF inside that handler runs to there instead of being
    /// stepped (`Stepper::run_to_return`). Taken by the next episode; dropped once the stack
    /// pointer is back above it ([`Self::forget_returned_handler`]), at INIT and at a restore.
    handler_returns_to: Option<ReturnPoint>,
    stepped_again: bool,
    /// An interrupt or NMI was handed to KVM (synced events, KVM_INTERRUPT, KVM_NMI) and no
    /// KVM_RUN has entered the guest since (a kick's `immediate_exit` returns before the entry):
    /// KVM still holds it and delivers it at the next entry. No stepping then: KVM would push
    /// its TF into that event's frame, and the handler's IRET would hand the guest a #DB of ours.
    kvm_queued: bool,
    /// An NMI went to KVM (KVM_NMI) since KVM last showed none held: it may hold one still, past
    /// the next entry ([`Self::end_halt_for_nmi_in_kvm`]).
    nmi_in_kvm: bool,
    /// Entries in a row that went in without the waiting interrupt because KVM held a
    /// deliverable NMI ([`Self::nmi_deliverable_in_kvm`]); capped, so that a KVM that keeps such
    /// an NMI for a reason of its own cannot hold the interrupt back for good.
    irq_held_for_nmi: u8,
    /// The last exit was an MSR access that takes #GP (`error` set): KVM raises it when the next
    /// KVM_RUN completes the exit, before any instruction runs. Stepping is off for that entry:
    /// KVM_SET_GUEST_DEBUG puts TF into the guest's RFLAGS while RIP is where stepping was armed,
    /// which is the MSR instruction's RIP when the episode began at it, so the #GP frame would
    /// hold TF and the handler's IRET would give the guest a #DB of ours (seen in the `fuzz`
    /// guest, both when stepping began at the exit and one exit earlier;
    /// [`crate::backend::step`]).
    fault_pending: bool,
    halt_poll: HaltPoll,
    /// IA32_APIC_BASE as KVM last saw it, or will see at the next KVM_RUN when it went into the
    /// synced system registers. KVM derives CPUID.1:EDX[9] (APIC present) from its own copy and
    /// answers the guest's RDMSR of 0x1B from it, and the MSR filter keeps the guest's WRMSR from
    /// updating it: `after_exit` pushes the model's value ([`Self::sync_kvm_apic_base`]).
    kvm_apic_base: u64,
    /// KVM_RUNs left for which KVM copies the system registers out at the return although
    /// nothing else asks for them ([`Self::sync_system_registers`]): from a SIPI, so that the
    /// AP's switch to x2APIC mode, one of its first exits, reaches KVM through them instead of a
    /// KVM_SET_MSRS ([`APIC_BASE_WATCH`]).
    apic_base_watch: u8,
    /// The flight recorder's and latency histograms' view of this vCPU (`crate::trace`).
    probe: VcpuProbe,
    /// A vector was handed to KVM (synced events or KVM_INTERRUPT) and no guest exit has been
    /// seen since, nor KVM's events at an EINTR return shown it taken ([`Self::note_taken`]).
    in_flight: bool,
    /// That vector went in through the synced events, whose copy at every return shows whether
    /// KVM still holds it (one queued with KVM_INTERRUPT does not show there before its entry).
    in_flight_synced: bool,
    /// `kvm_run.s.regs.events` holds KVM's events as of the last KVM_RUN return and nothing
    /// has changed them since (see [`Self::queue_interrupt`]).
    events_synced: bool,
    /// `kvm_valid_regs` has KVM_SYNC_X86_EVENTS set on this vCPU's `kvm_run`.
    sync_enabled: bool,
    /// `kvm_valid_regs` has KVM_SYNC_X86_REGS set: always, where KVM offers it (a copy of the
    /// general registers at every return costs nothing measurable next to the exit itself).
    regs_sync_always: bool,
    /// `kvm_valid_regs` has KVM_SYNC_X86_SREGS set as well: while something here reads the
    /// system registers at the next return ([`Self::sync_system_registers`]).
    regs_sync_on: bool,
    /// The guest's RSP as of the last KVM_RUN return, from the synced registers, while no ioctl
    /// wrote the registers since (`registers_written`, and INIT/SIPI or a restore set
    /// `regs_rewritten`): an interrupt injected at this entry pushes its frame below it
    /// ([`ReturnPoint`] without a RIP).
    exit_rsp: Option<u64>,
    /// `kvm_run.s.regs.regs` and `.sregs` hold the registers as of the last KVM_RUN return and
    /// no ioctl wrote them since (cleared by `registers_written`, INIT/SIPI and restores set
    /// `regs_rewritten`).
    regs_fresh: bool,

    /// The registers the last INIT wrote, while the vCPU waits for its SIPI (dropped when it
    /// enters the guest or its registers are restored): the SIPI starts from them.
    after_init: Option<InitApplied>,
    /// KVM's paravirtual EOI: the guest's MSR and the flag armed for the run in progress.
    pv_eoi: PvEoi,
}

impl UserVcpuChip {
    pub(crate) fn new(
        interrupts: VcpuInterrupts,
        shared: std::sync::Arc<Shared>,
        signature: u32,
        protected: bool,
    ) -> Self {
        let kvm_apic_base = interrupts.lapic().apic_base();
        let sipi = if protected {
            Sipi::Protected(ProtectedStateSipi::new())
        } else {
            Sipi::Standard(StandardSipi)
        };
        let ghcb = shared.protected_state_aps.map(|_| GhcbMsr::default());
        let stepper = Stepper::new(shared.memory.clone(), shared.exact_irq_boundaries);
        Self {
            probe: VcpuProbe::new(shared.tracer.clone(), interrupts.index()),
            kvm_apic_base,
            apic_base_watch: 0,
            interrupts,
            sipi,
            ghcb,
            shared,
            signature,
            run: RunPtr(std::ptr::null()),
            cr8_synced: false,
            halted_with_if_clear: false,
            regs_rewritten: false,
            host_timer: HostTimer::default(),
            flags_from_exit: false,
            exit_insn_done: false,
            window_kick: WindowKick::new(),
            stepper,
            last_stepped: None,
            handler_returns_to: None,
            stepped_again: false,
            kvm_queued: false,
            nmi_in_kvm: false,
            irq_held_for_nmi: 0,
            fault_pending: false,
            halt_poll: HaltPoll::new(),
            in_flight: false,
            in_flight_synced: false,
            events_synced: false,
            sync_enabled: false,
            regs_sync_always: false,
            regs_sync_on: false,
            exit_rsp: None,
            regs_fresh: false,
            after_init: None,
            pv_eoi: PvEoi::default(),
        }
    }

    fn counters(&self) -> &super::counters::VcpuCounters {
        &self.shared.counters[self.interrupts.index()]
    }

    fn platform(&self) -> &Platform {
        &self.shared.platform
    }

    /// Takes a posted INIT and SIPI and writes the registers they set. `entering`: KVM_RUN
    /// follows at once with no register access before it, so a SIPI's CS and RIP may go in
    /// through `kvm_run` ([`Self::start_at_sipi`]).
    fn accept_init_sipi(&mut self, vcpu: &mut VcpuFd, entering: bool) -> Result<(), IrqchipError> {
        let outcome = self
            .interrupts
            .accept_events(InitBlocking::NONE, self.sipi.plug());
        if self.probe.on() {
            if outcome.reset.is_some() {
                self.probe.event(Kind::InitAccept, 0);
            }
            if let Some(SipiAction::StartRealMode { cs_base, .. }) = outcome.start {
                self.probe.event(Kind::SipiAccept, cs_base >> 12);
            }
        }
        if outcome.reset.is_some() || outcome.start.is_some() {
            self.events_synced = false;
            // INIT and SIPI read and write the registers with ioctls (or stage their own): an
            // IA32_APIC_BASE staged at the last exit goes in first.
            flush_staged(vcpu)?;
        }
        let mut start = outcome.start;
        if let Some(reset) = outcome.reset {
            // `None` for a protected-state AP: INIT resets only its LAPIC (done by the model).
            // With `after_init` kept, the registers already hold INIT's state and nothing ran
            // or wrote them since (`prepare_wait_for_init`): no write, the SIPI starts from it.
            let state = reset.arch_state(self.signature);
            self.regs_rewritten |= state.is_some();
            // `apply_init` below clears KVM's copy of the MSR with the other INIT-cleared MSRs.
            self.pv_eoi.init(state.is_some());
            // INIT ends whatever handler ran: no return point survives it.
            self.handler_returns_to = None;
            if let Some(mut state) = state.filter(|_| self.after_init.is_none()) {
                // A SIPI accepted with its INIT is folded into the INIT's register writes.
                let folded = start.filter(|s| matches!(s, SipiAction::StartRealMode { .. }));
                if let Some(sipi) = folded {
                    state.apply_start(&sipi);
                    start = None;
                }
                let applied = apply_init(vcpu, &state, &self.shared.init_msrs)?;
                self.after_init = folded.is_none().then_some(applied);
            }
            self.halted_with_if_clear = false;
        }
        match start {
            Some(start @ SipiAction::StartRealMode { .. }) => {
                self.start_at_sipi(vcpu, &start, entering)?;
                self.regs_rewritten = true;
                self.apic_base_watch = APIC_BASE_WATCH;
            }
            Some(SipiAction::ResumeUntouched { first_boot }) => self.resume_untouched(first_boot),
            None => {}
        }
        Ok(())
    }

    /// The SIPI's CS and RIP over the registers INIT wrote. When those are known (`after_init`)
    /// and KVM_RUN comes next (`entering`), they go into `kvm_run`'s synced registers for that
    /// KVM_RUN to load ([`stage_sipi`]): no ioctl between the SIPI and the AP's first
    /// instruction, where a started AP otherwise made two (issue 13). Otherwise KVM_SET_SREGS and
    /// KVM_SET_REGS ([`apply_sipi`]).
    fn start_at_sipi(
        &mut self,
        vcpu: &mut VcpuFd,
        start: &SipiAction,
        entering: bool,
    ) -> Result<(), IrqchipError> {
        match self.after_init.take() {
            Some(applied) if entering && self.shared.sync_regs => {
                if stage_sipi(vcpu, start, applied) {
                    super::counters::bump(&self.counters().synced_sipis);
                }
            }
            after_init => apply_sipi(vcpu, start, after_init)?,
        }
        Ok(())
    }

    /// An AP that has never run (Uninitialized) and is about to sleep until its INIT gets INIT's
    /// register state now, on its own thread while nothing waits for it, and keeps it in
    /// `after_init`: its INIT then writes nothing and its SIPI two register sets (issue 13: the
    /// INIT is taken with the SIPI, `irqchip::posting`, so this work would otherwise sit between
    /// the SIPI and the AP's first instruction). The state is exactly what the INIT would write
    /// (an INIT from power-on changes nothing else it keeps), and no guest code can observe it
    /// before: an Uninitialized vCPU never runs and takes no SIPI. A restore drops `after_init`,
    /// so an INIT after it writes everything again. Not for a protected-state AP (registers
    /// never written) nor the BSP (never Uninitialized).
    fn prepare_wait_for_init(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        if self.after_init.is_some() || self.interrupts.mp_state() != MpState::Uninitialized {
            return Ok(());
        }
        let writable = !matches!(self.sipi, Sipi::Protected(_));
        let reset = irqchip::mpstate::ResetKind::Init {
            write_registers: writable,
        };
        if let Some(state) = reset.arch_state(self.signature) {
            let applied = apply_init(vcpu, &state, &self.shared.init_msrs)?;
            self.after_init = Some(applied);
            self.events_synced = false;
        }
        Ok(())
    }

    /// Seed 004: a protected-state AP runs on from where it is, registers untouched (KVM's flags
    /// of its last exit stay true). The first SIPI runs the launch state; a later one ends the AP
    /// Reset Hold and answers it in the GHCB MSR (sev.c `sev_vcpu_deliver_sipi_vector`).
    fn resume_untouched(&mut self, first_boot: bool) {
        let answered = !first_boot && self.ghcb.as_mut().is_some_and(GhcbMsr::release);
        tracing::debug!(
            vcpu = self.interrupts.index(),
            first_boot,
            answered,
            "protected-state SIPI"
        );
    }

    /// A guest WRMSR of the GHCB MSR: an AP's AP Reset Hold request parks it (seed 004).
    fn write_ghcb(&mut self, value: u64) {
        let Some(ghcb) = self.ghcb.as_mut() else {
            return;
        };
        if ghcb.write(value) && matches!(self.sipi, Sipi::Protected(_)) {
            self.interrupts.ap_reset_hold();
        }
    }

    /// Polls the APIC timer and keeps this thread's POSIX timer on the model's next deadline
    /// (`apic_timer`).
    fn run_timer(&mut self, now: Nanos) -> Result<(), IrqchipError> {
        let due = self.host_timer.armed().filter(|&d| d <= now);
        self.interrupts.poll_timer(now);
        if let Some(deadline) = due {
            self.timer_fired(deadline);
        }
        let next = self.interrupts.next_timer_deadline();
        if next != self.host_timer.armed() && self.probe.on() {
            self.probe.event(Kind::TimerArm, next.unwrap_or(0));
        }
        let clock = &self.shared.clock;
        self.host_timer
            .follow(next, |deadline| clock.to_instant(deadline))
            .map_err(|source| IrqchipError::ApicTimer {
                vcpu: self.interrupts.index(),
                source,
            })
    }

    /// The APIC timer's deadline passed: if its LVT is unmasked and its vector is now pending,
    /// that is a post from the timer, dated at the deadline.
    fn timer_fired(&self, deadline: Nanos) {
        let lvt = self
            .interrupts
            .lapic()
            .lvt(irqchip::lapic::LocalSource::Timer);
        // Truncation keeps bits 7:0, the vector; bit 16 is the mask (SDM §11.5.1).
        let vector = (lvt & 0xFF) as u8;
        if lvt & (1 << 16) == 0 && self.interrupts.lapic().irr().contains(vector) {
            self.probe.timer_fired(deadline, vector);
        }
    }

    fn should_block(&mut self, pic_intr: bool) -> bool {
        let halted = self.interrupts.mp_state() == MpState::Halted;
        if halted
            && self.halted_with_if_clear
            && !self.interrupts.needs_accept(InitBlocking::NONE)
            && !self.interrupts.nmi_pending()
            && !self.interrupts.smi_pending()
        {
            return true;
        }
        let block = self.interrupts.should_block(InitBlocking::NONE, pic_intr);
        if !block {
            self.halted_with_if_clear = false;
        }
        block
    }

    /// Injects what can be injected now, or asks KVM for an interrupt window.
    fn inject(&mut self, vcpu: &mut VcpuFd, pic_intr: bool) -> Result<(), IrqchipError> {
        let now = Instant::now();
        let fired = self.window_kick.take_fired(now);
        let (can_inject, if_set) = {
            let run = vcpu.get_kvm_run();
            run.request_interrupt_window = 0;
            let if_set = run.if_flag != 0;
            let ready = !self.regs_rewritten && run.ready_for_interrupt_injection != 0;
            (ready && if_set, if_set)
        };
        let mut next = self.interrupts.next_injection(pic_intr);
        if next == Some(Injection::Nmi) {
            let blocked = self.nmi_blocked_in_kvm(vcpu, can_inject)?;
            let maskable =
                blocked.and_then(|_| self.maskable_beside_blocked_nmi(can_inject, pic_intr));
            if let Some(maskable) = maskable {
                tracing::debug!(
                    ?maskable,
                    "interrupt goes in beside an NMI waiting for its window"
                );
                next = Some(maskable);
            } else {
                if self.step_to_nmi_window(vcpu, blocked)? {
                    return Ok(());
                }
                // No NMI frame may see KVM's TF: stepping off first.
                self.stepper.end(vcpu)?;
                self.inject_nmis(vcpu)?;
                next = self.interrupts.next_injection(pic_intr);
                if next.is_some() {
                    // KVM takes the NMI first; the interrupt after the next exit.
                    vcpu.get_kvm_run().request_interrupt_window = 1;
                    return Ok(());
                }
            }
        }
        let Some(next) = next else {
            if fired {
                self.window_kick.leftover();
            }
            return self.step_while_tpr_holds(vcpu);
        };
        if can_inject
            && self.irq_held_for_nmi < MAX_IRQ_HELD_FOR_NMI
            && self.nmi_deliverable_in_kvm(vcpu)?
        {
            // KVM delivers its NMI at this entry; the interrupt after the next exit.
            tracing::debug!(?next, "interrupt held behind the NMI KVM holds");
            self.irq_held_for_nmi += 1;
            self.stepper.end(vcpu)?;
            self.kvm_queued = true;
            vcpu.get_kvm_run().request_interrupt_window = 1;
            return Ok(());
        }
        let finished = if can_inject {
            None
        } else {
            self.finish_handler(vcpu, next)?
        };
        if !can_inject && finished.is_none() {
            vcpu.get_kvm_run().request_interrupt_window = 1;
            if !self.step_to_window(vcpu, if_set, next)? {
                self.expedite_window(if_set, now, fired);
            }
            return Ok(());
        }
        // The boundary is here: stepping off before the injection, so the frame gets the
        // guest's own RFLAGS (a return breakpoint the new handler returns to may stay armed).
        let stepped = self.stepper.active();
        let returns_to = finished.or_else(|| self.return_point(stepped));
        let kept = self.stepper.end_for_injection(vcpu)?;
        match finished {
            Some(ReturnPoint { rip: Some(rip), .. }) => self.note_boundary_at(next, rip),
            _ => self.note_boundary(vcpu, stepped.then_some(next))?,
        }
        let vector = match next {
            Injection::Nmi => None,
            Injection::ExtInt => {
                self.interrupts.take_extint();
                Some(self.platform().pic_acknowledge())
            }
            Injection::Vector(_) => self.interrupts.acknowledge_interrupt(),
        };
        let Some(vector) = vector else {
            // Nothing goes in after all: no handler will return to a kept breakpoint, and the
            // vCPU resumes right at it.
            return self.stepper.end(vcpu);
        };
        if kept {
            self.publish_steps();
        }
        self.irq_held_for_nmi = 0;
        self.in_flight_synced = self.queue_interrupt(vcpu, vector)?;
        self.handler_returns_to = returns_to;
        self.in_flight = true;
        self.kvm_queued = true;
        self.counters().injected(vector);
        if matches!(next, Injection::ExtInt) {
            let chip = self.platform().chip();
            let irq = self.probe.on().then(|| chip.pic_irq_of_vector(vector));
            self.probe.injected_extint(vector, irq.flatten());
        } else {
            self.probe.injected(vector);
        }
        self.window_kick.injected(now, fired);
        Ok(())
    }

    /// Where an interrupt injected at this entry returns: RIP and RSP at a stepped boundary
    /// (the registers synced, the stepped instruction complete), else the RSP of the last
    /// return, which locates its frame ([`ReturnPoint`]).
    fn return_point(&self, stepped: bool) -> Option<ReturnPoint> {
        let exact = stepped.then(|| self.stepper.return_point()).flatten();
        let rsp = self.exit_rsp.filter(|_| !self.regs_rewritten);
        exact.or(rsp.map(|rsp| ReturnPoint { rip: None, rsp }))
    }

    /// An interrupt waits for the guest to set IF or leave a shadow: single-step towards that
    /// boundary, or let a HLT run to its own exit (true), or false: stepping refused, its budget
    /// spent, not allowed to begin at this entry (an event KVM delivers here), or the flags may
    /// be stale, which `expedite_window` handles. At a step exit the flags are fresh.
    ///
    /// Forward progress: the same interrupt delivered twice in a row at the same stepped
    /// boundary (a level line still high re-sent at every EOI, the handler EOIing first) would
    /// otherwise come back at that boundary forever and the interrupted code would never run
    /// again. On hardware the IOAPIC's re-send trails the EOI by bus time, during which the
    /// interrupted code moves on; KVM's IOAPIC has its storm rule for the same guests. So a
    /// third such delivery is not stepped to, and takes the window kicks instead.
    fn step_to_window(
        &mut self,
        vcpu: &mut VcpuFd,
        if_set: bool,
        next: Injection,
    ) -> Result<bool, IrqchipError> {
        let stale = self.regs_rewritten || (self.flags_from_exit && if_set);
        let looping = self.came_back_again(next);
        if stale || self.kvm_queued || self.fault_pending || (looping && !self.stepper.active()) {
            self.stepper.end(vcpu)?;
            return Ok(false);
        }
        self.offer_events(vcpu);
        // One use: a record that outlived its handler could only make a later episode late.
        let outcome = match self.handler_returns_to.take() {
            Some(ret) if !self.stepper.active() => self.stepper.run_to_return(vcpu, ret)?,
            _ => self.stepper.step(vcpu)?,
        };
        self.publish_steps();
        // Such a run could spare the kicks of the posts it will drain at its stop
        // (`VcpuInbox::publish_interrupts_blocked_until_exit`): measured, it took two in three of
        // `ipi_storm_16`'s kicks away, but a 4-vCPU Linux boot hung with it (docs/benchmarks.md
        // §14), so the kicks stay until that is understood.
        Ok(outcome != StepOutcome::Fallback)
    }

    /// KVM's events when an NMI pending in the model must wait for the NMI window: NMIs blocked
    /// (the guest's NMI handler runs until its IRET, KVM_GET_VCPU_EVENTS `nmi.masked`), no event
    /// KVM delivers at this entry, nothing of ours rewritten or queued in KVM, and one of the two
    /// ways on open ([`Self::maskable_beside_blocked_nmi`] needs `can_inject`,
    /// [`Self::step_to_nmi_window`] the stepper), so that neither reads the events again.
    fn nmi_blocked_in_kvm(
        &mut self,
        vcpu: &mut VcpuFd,
        can_inject: bool,
    ) -> Result<Option<kvm_bindings::kvm_vcpu_events>, IrqchipError> {
        if self.regs_rewritten || self.kvm_queued || self.fault_pending {
            return Ok(None);
        }
        if !can_inject && !self.stepper.enabled() {
            return Ok(None);
        }
        let events = self.kvm_events(vcpu)?;
        let blocked = events.nmi.masked != 0 && !crate::backend::step::event_due(&events);
        Ok(blocked.then_some(events))
    }

    /// An NMI waits for the NMI window ([`Self::nmi_blocked_in_kvm`]) while the interrupt after
    /// it could go in at this entry (IF set, no shadow). NMI blocking holds back NMIs only (SDM
    /// vol. 3 §6.7.1, §6.8.1): a handler that sets IF takes maskable interrupts, and KVM injects
    /// one while its own NMI waits for the window (`kvm_check_and_inject_events`). Returns that
    /// interrupt; the NMI stays pending in the model for [`Self::step_to_nmi_window`] at the next
    /// exit. Without this the interrupt waited for the NMI handler's IRET and the held NMI's
    /// handler after it.
    fn maskable_beside_blocked_nmi(&self, can_inject: bool, pic_intr: bool) -> Option<Injection> {
        if !can_inject {
            return None;
        }
        self.interrupts.next_maskable_injection(pic_intr)
    }

    /// An NMI is pending while the guest's NMI handler runs (NMIs blocked until the next IRET,
    /// SDM vol. 3 §6.7.1: KVM_GET_VCPU_EVENTS `nmi.masked`). Hardware takes it right after that
    /// IRET, before the instruction the IRET returns to. Handed to KVM now (KVM_NMI), this host
    /// delivers it only at its next exit after the IRET (docs/kvm-facts.md, "NMIs held behind
    /// an NMI in service"): the interrupted code runs on meanwhile, and kvm-unit-tests' eventinj
    /// hung there, its nested NMI taken inside the `printf` the interrupted code had begun
    /// (holding its print lock, which the nested handler's `printf` then waited for forever). So
    /// the NMI stays in the model and the vCPU is stepped towards the IRET, which the stepper
    /// stops at with a breakpoint at its return address ([`Stepper::step_nmi`]); at that exit
    /// NMIs are unblocked and [`Self::inject_nmis`] hands it to KVM, which delivers it at that
    /// boundary. `blocked`: KVM's events if the NMI must wait ([`Self::nmi_blocked_in_kvm`]).
    /// True: stepping goes on. False (stepping off or refused, the budget spent, a HLT, NMIs not
    /// blocked, or an event KVM delivers at this entry): the caller injects as before.
    fn step_to_nmi_window(
        &mut self,
        vcpu: &mut VcpuFd,
        blocked: Option<kvm_bindings::kvm_vcpu_events>,
    ) -> Result<bool, IrqchipError> {
        let Some(events) = blocked else {
            return Ok(false);
        };
        if !self.stepper.enabled() {
            return Ok(false);
        }
        self.stepper.offer_events(Some(events));
        // One NMI stays latched behind the one in service, the rest coalesce: the rule
        // `inject_nmis` applies, applied while the NMI waits here.
        self.interrupts.process_nmi(true);
        let outcome = self.stepper.step_nmi(vcpu)?;
        self.publish_steps();
        Ok(outcome == StepOutcome::Stepping)
    }

    /// KVM's events: as of the last KVM_RUN return (`kvm_run`'s synced copy) if nothing of ours
    /// changed them since (one ioctl less per step), else KVM_GET_VCPU_EVENTS. After an internal
    /// error the recovery (`crate::emulate`) may have set events of its own: read them.
    fn kvm_events(&self, vcpu: &mut VcpuFd) -> Result<kvm_bindings::kvm_vcpu_events, IrqchipError> {
        if self.events_synced && !internal_error_exit(vcpu) {
            return Ok(vcpu.sync_regs().events);
        }
        Ok(vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?)
    }

    /// Offers the stepper KVM's events from `kvm_run` if they are fresh ([`Self::kvm_events`]'s
    /// rule), so that planning a step costs no KVM_GET_VCPU_EVENTS.
    fn offer_events(&mut self, vcpu: &mut VcpuFd) {
        let fresh = self.events_synced && !internal_error_exit(vcpu);
        self.stepper
            .offer_events(fresh.then(|| vcpu.sync_regs().events));
    }

    /// Records an injection: `Some(what)` if it is made at a stepped boundary.
    fn note_boundary(
        &mut self,
        vcpu: &VcpuFd,
        stepped: Option<Injection>,
    ) -> Result<(), IrqchipError> {
        let Some(what) = stepped else {
            self.last_stepped = None;
            self.stepped_again = false;
            return Ok(());
        };
        let rip = self.stepper.regs(vcpu)?.rip;
        self.note_boundary_at(what, rip);
        Ok(())
    }

    /// Records an injection of `what` made at an exact boundary at `rip` ([`Self::step_to_window`]'s
    /// forward-progress rule counts these).
    fn note_boundary_at(&mut self, what: Injection, rip: u64) {
        self.stepped_again = self.last_stepped == Some((what, rip));
        self.last_stepped = Some((what, rip));
    }

    /// An interrupt waits for IF inside the handler of the interrupt injected last: if the rest
    /// of that handler is a way out irqvm can run itself (`Stepper::finish_return`), the
    /// registers after its IRETQ go into `kvm_run` for the next KVM_RUN to load, and the
    /// interrupt goes in with them: the boundary hardware takes it at, with no run of the guest
    /// to a breakpoint there. Returns that boundary (the return RIP and RSP of the handler's
    /// frame, which the new interrupt's handler returns to in turn).
    ///
    /// Only where the last exit's instruction has completed (`exit_insn_done`): KVM finishes an
    /// MMIO read, a port access or an MSR access at the next KVM_RUN from the registers it
    /// holds, after loading the synced ones (an MSR or port exit then skips the instruction at
    /// the new RIP). And, as for stepping, not while registers were rewritten, an event waits in
    /// KVM, an MSR exit's #GP is due, or the same interrupt came back at the same boundary
    /// (`step_to_window`'s forward-progress rule).
    fn finish_handler(
        &mut self,
        vcpu: &mut VcpuFd,
        next: Injection,
    ) -> Result<Option<ReturnPoint>, IrqchipError> {
        let looping = self.came_back_again(next);
        let blocked = self.regs_rewritten || self.kvm_queued || self.fault_pending || looping;
        let Some(ret) = self.handler_returns_to else {
            return Ok(None);
        };
        let able = self.regs_sync_always && !self.shared.guest_pmu;
        if blocked || !self.exit_insn_done || !able {
            return Ok(None);
        }
        self.offer_events(vcpu);
        let Some(after) = self.stepper.finish_return(vcpu, ret)? else {
            return Ok(None);
        };
        vcpu.sync_regs_mut().regs = after;
        vcpu.set_sync_dirty_reg(SyncReg::Register);
        self.handler_returns_to = None;
        self.publish_steps();
        Ok(Some(ReturnPoint {
            rip: Some(after.rip),
            rsp: after.rsp,
        }))
    }

    /// Nothing is deliverable. If the highest requested vector is held only by the TPR, a CR8
    /// write (which does not exit on this host, docs/kvm-facts.md) may release it: run to the
    /// next instruction that may write CR8 and step it (`Stepper::step_past_tpr`;
    /// `sync_cr8_from_exit` reads CR8 back at every exit), as long as the budget lasts.
    /// Otherwise stepping ends; off the fast path this costs nothing (no ioctl unless stepping
    /// was on).
    fn step_while_tpr_holds(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        let event_due = self.kvm_queued || self.fault_pending;
        if !self.regs_rewritten && !event_due && self.held_by_tpr_only() {
            self.offer_events(vcpu);
            self.stepper.step_past_tpr(vcpu)?;
            self.publish_steps();
            return Ok(());
        }
        self.stepper.end(vcpu)
    }

    /// The highest vector in IRR beats the in-service class but not the TPR's (SDM §11.8.3.1):
    /// only a TPR write can make it deliverable.
    fn held_by_tpr_only(&self) -> bool {
        let lapic = self.interrupts.lapic();
        let Some(vector) = lapic.irr().highest() else {
            return false;
        };
        let class = vector >> 4;
        let in_service = lapic.isr().highest().map_or(0, |v| v >> 4);
        lapic.hw_enabled() && class > in_service && class <= lapic.tpr() >> 4
    }

    fn publish_steps(&self) {
        let counters = self.counters();
        counters
            .single_steps
            .store(self.stepper.steps, std::sync::atomic::Ordering::Relaxed);
        counters
            .step_fallbacks
            .store(self.stepper.fallbacks, std::sync::atomic::Ordering::Relaxed);
        counters.return_runs.store(
            self.stepper.return_runs,
            std::sync::atomic::Ordering::Relaxed,
        );
        counters.kept_breakpoints.store(
            self.stepper.kept_breakpoints,
            std::sync::atomic::Ordering::Relaxed,
        );
        counters.stretch_runs.store(
            self.stepper.stretch_runs,
            std::sync::atomic::Ordering::Relaxed,
        );
        counters.finished_returns.store(
            self.stepper.finished_returns,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The forward-progress rule of [`Self::step_to_window`]: `next` was injected at the same
    /// exact boundary twice in a row already.
    fn came_back_again(&self, next: Injection) -> bool {
        self.stepped_again && self.last_stepped.is_some_and(|(what, _)| what == next)
    }

    /// Hands the pending NMIs to KVM, as many as KVM's `process_nmi` rule lets stay pending
    /// (`VcpuInterrupts::process_nmi`): two while no NMI is in service, one while one is (NMIs
    /// blocked until IRET, KVM_GET_VCPU_EVENTS `nmi.masked`, or an NMI injection in flight,
    /// `nmi.injected`). Each goes in with its own KVM_NMI: KVM queues them and injects the
    /// second one itself right after the first one's IRET, which userspace cannot see. KVM
    /// applies the same limit to what it holds in total, so nothing beyond the rule gets in.
    fn inject_nmis(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        let events = vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
        let blocked = events.nmi.masked != 0 || events.nmi.injected != 0;
        self.interrupts.process_nmi(blocked);
        while self.interrupts.take_nmi() {
            vcpu.nmi().map_err(KvmError::ioctl("KVM_NMI"))?;
            self.events_synced = false;
            self.kvm_queued = true;
            self.nmi_in_kvm = true;
            super::counters::bump(&self.counters().nmis_injected);
            self.probe.injected_nmi();
        }
        Ok(())
    }

    /// True when KVM holds an NMI irqvm handed it that it may deliver at the next entry (NMIs not
    /// blocked): then no interrupt may go in with it. Two NMIs handed over at once (two that
    /// reached the model in one drain, `inject_nmis`) leave KVM holding the second one behind the
    /// first one's handler, and this host delivers it only at its first exit after that
    /// handler's IRETQ (docs/kvm-facts.md, "NMIs held behind an NMI in service here"). A pending
    /// NMI goes before a pending maskable interrupt (SDM vol. 3 §6.9, priority among
    /// simultaneous events; KVM's `inject_pending_event` tries the NMI before the interrupt).
    /// But an interrupt handed over with KVM_INTERRUPT counts to KVM as already injected, which
    /// it re-injects before anything else: put in at that exit, the interrupt would run before
    /// the held NMI, as kvm-unit-tests' apic "multiple nmi" sees (guest `nmi_queue`, check 7).
    /// While NMIs are blocked (an NMI handler that sets IF) the interrupt goes in as before: the
    /// held NMI waits for the IRET either way. One KVM_GET_VCPU_EVENTS, only while an NMI went
    /// to KVM since it last showed none held.
    fn nmi_deliverable_in_kvm(&mut self, vcpu: &mut VcpuFd) -> Result<bool, IrqchipError> {
        if !self.nmi_in_kvm {
            return Ok(false);
        }
        let events = self.kvm_events(vcpu)?;
        self.nmi_in_kvm = events.nmi.pending != 0 || events.nmi.injected != 0;
        Ok(events.nmi.pending != 0 && events.nmi.masked == 0 && events.nmi.injected == 0)
    }

    /// A HLT exit while KVM still holds an NMI irqvm handed it: KVM takes two NMIs at once (two
    /// that reached the model in one drain, or one more while it held one), injects one and
    /// delivers the other only at its first exit after that one's IRET (docs/kvm-facts.md, "NMIs
    /// held behind an NMI in service here"), which may be this HLT. Blocking on the doorbell now
    /// would leave that NMI in KVM until something else woke the vCPU: two NMIs sent to an idle
    /// CPU at once were taken once (`common::check_msi_from_host`), and `snapstorm` on 4 vCPUs
    /// lost one NMI in about 200 runs. The halt ends at once, as an NMI ends it, and the next
    /// entry lets KVM deliver it; unless NMIs are blocked (guest `nmi_queue`, check 6). With
    /// synced events this costs no ioctl; without, one KVM_GET_VCPU_EVENTS per halt until KVM
    /// shows no NMI held.
    fn end_halt_for_nmi_in_kvm(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        if !self.nmi_in_kvm || self.interrupts.mp_state() != MpState::Halted {
            return Ok(());
        }
        let events = self.kvm_events(vcpu)?;
        self.nmi_in_kvm = events.nmi.pending != 0 || events.nmi.injected != 0;
        // Held behind an NMI in service (a HLT inside the handler), it waits for the IRET and
        // the halt goes on, as in KVM, where only a deliverable NMI keeps a vCPU runnable: ending
        // it would spin the vCPU through every HLT of such a loop (Linux's stop_this_cpu in NMI
        // context is one).
        let deliverable = events.nmi.injected != 0 || events.nmi.masked == 0;
        if self.nmi_in_kvm && deliverable {
            tracing::debug!(?events.nmi, "halt ended: KVM still holds an NMI");
            self.interrupts.wake_for_held_nmi();
            super::counters::bump(&self.counters().halts_for_kvm_nmi);
        }
        Ok(())
    }

    /// An interrupt waits and KVM said "not ready" (or IF=0): get fresh flags sooner than KVM's
    /// window exit would. IF=1 but "not ready" at an exit means the exiting instruction (at an
    /// MMIO read RIP is still on it) or the registers just rewritten by INIT/SIPI hold it: a
    /// KVM_RUN with `immediate_exit` completes the instruction and returns EINTR with the flags
    /// refreshed, for ~10 µs. With IF=0 (or flags already fresh) the guest itself is not ready:
    /// kick again shortly ([`WindowKick`]).
    fn expedite_window(&mut self, if_set: bool, now: Instant, fired: bool) {
        let stale = self.regs_rewritten || (self.flags_from_exit && if_set);
        if stale {
            kick_self();
        } else {
            self.window_kick.not_ready(now, fired);
        }
    }

    /// Hands `vector` to KVM for the next entry. With KVM_SYNC_X86_EVENTS (`Shared::sync_events`)
    /// and the synced events fresh from the last KVM_RUN return, it goes into
    /// `kvm_run.s.regs.events` marked dirty: the next KVM_RUN applies them as
    /// KVM_SET_VCPU_EVENTS would before it enters, which for the interrupt is what KVM_INTERRUPT
    /// does without a userspace irqchip (`interrupt.injected` = 1, `nr` = the vector, not soft),
    /// and the ioctl (~7 µs here, one per interrupt) is saved. Only the interrupt changes:
    /// `flags` = 0 leaves KVM's pending NMI count, interrupt shadow, SIPI vector and SMM state
    /// alone; the exception and NMI fields go back as KVM reported them at the return, which
    /// nothing has changed since (`events_synced` is cleared by every ioctl of ours that could:
    /// INIT/SIPI, KVM_NMI, a restore), and which hold nothing in flight: KVM reported
    /// `ready_for_interrupt_injection`, which it never does with an exception or NMI pending or
    /// being re-injected. Anything KVM queues while completing the exit (an MSR write's #GP) is
    /// queued after the events are applied. Otherwise (first entry, stale events, a KVM without
    /// the capability) KVM_INTERRUPT.
    fn queue_interrupt(&mut self, vcpu: &mut VcpuFd, vector: u8) -> Result<bool, IrqchipError> {
        if !std::mem::take(&mut self.events_synced) || internal_error_exit(vcpu) {
            // An internal error's recovery (`crate::emulate`) may have set events of its own.
            inject_interrupt(vcpu, vector)?;
            return Ok(false);
        }
        let events = &mut vcpu.sync_regs_mut().events;
        events.flags = 0;
        events.interrupt.injected = 1;
        events.interrupt.nr = vector;
        events.interrupt.soft = 0;
        vcpu.set_sync_dirty_reg(SyncReg::VcpuEvents);
        super::counters::bump(&self.counters().synced_injections);
        Ok(true)
    }

    /// At a KVM_RUN return: an interrupt that went in through the synced events and that KVM no
    /// longer holds (its events, copied out at every return, EINTR ones included) was taken by
    /// the guest, even where no exit followed. A pause waits for that before it holds the vCPU
    /// (`injection_in_flight`); a guest that runs on without exits after its handler (a PV EOI
    /// needs none, `pv_eoi`) would otherwise keep it waiting through every kick of the pause.
    fn note_taken(&mut self, vcpu: &mut VcpuFd) {
        if self.in_flight
            && self.in_flight_synced
            && self.sync_enabled
            && vcpu.sync_regs().events.interrupt.injected == 0
        {
            self.in_flight = false;
        }
    }

    /// Asks KVM to copy its events and the general registers into `kvm_run` at every KVM_RUN
    /// return (once per vCPU).
    fn enable_event_sync(&mut self, vcpu: &mut VcpuFd) {
        if self.shared.sync_events && !self.sync_enabled {
            vcpu.set_sync_valid_reg(SyncReg::VcpuEvents);
            self.sync_enabled = true;
        }
        if self.shared.sync_regs && !self.regs_sync_always {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            self.regs_sync_always = true;
        }
    }

    /// Offers the stepper the registers KVM copied at the last KVM_RUN return, if they are fresh
    /// (this entry only): a step then costs the KVM_RUN and one KVM_TRANSLATE instead of also a
    /// KVM_GET_REGS and a KVM_GET_SREGS (~20 µs a step here, two thirds of it those ioctls:
    /// docs/benchmarks.md, "Single steps with synced registers").
    fn offer_synced_regs(&mut self, vcpu: &VcpuFd) {
        let fresh = std::mem::take(&mut self.regs_fresh) && !self.regs_rewritten;
        let synced = fresh.then(|| {
            let sync = vcpu.sync_regs();
            SyncedRegs {
                regs: sync.regs,
                sregs: sync.sregs,
            }
        });
        self.stepper.offer_synced(synced);
    }

    /// KVM also copies the system registers into `kvm_run` at a KVM_RUN return while something
    /// here reads them; off otherwise, so that ordinary exits do not pay for that copy (KVM reads
    /// every segment, the descriptor tables and the control registers for it). The readers:
    /// - stepping, which plans each step from them;
    /// - the handler of an interrupt with a known return point, which may run: the episode that
    ///   runs it to its return ([`Stepper::run_to_return`]) then reads the frame and the code by
    ///   walking the page tables in guest RAM instead of with KVM_GET_SREGS and KVM_TRANSLATEs
    ///   (~100 µs of ioctls here, docs/benchmarks.md);
    /// - an AP's first KVM_RUNs after its SIPI ([`APIC_BASE_WATCH`]), so that its switch to
    ///   x2APIC mode reaches KVM through them ([`Self::sync_kvm_apic_base`]).
    fn sync_system_registers(&mut self, vcpu: &mut VcpuFd) {
        let watching = self.apic_base_watch > 0;
        self.apic_base_watch = self.apic_base_watch.saturating_sub(1);
        let readers = self.stepper.active() || self.handler_returns_to.is_some() || watching;
        let want = self.shared.sync_regs && readers;
        if want == self.regs_sync_on {
            return;
        }
        if want {
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        } else {
            vcpu.clear_sync_valid_reg(SyncReg::SystemRegister);
        }
        self.regs_sync_on = want;
    }

    /// Once the interrupt injected last has been delivered (no longer `kvm_queued`: a real exit
    /// since), a stack pointer back at (or above) where it was taken means its handler has
    /// returned, and its return point must not send a later episode to a breakpoint the guest
    /// may never reach again.
    fn forget_returned_handler(&mut self) {
        let returned = match (self.handler_returns_to, self.exit_rsp) {
            (Some(ret), Some(rsp)) => !self.kvm_queued && rsp >= ret.rsp,
            _ => false,
        };
        if returned {
            self.handler_returns_to = None;
        }
    }

    /// Before a write that may be an EOI: the vector it would end (the highest in service).
    fn in_service_before(&self, is_eoi: bool) -> Option<u8> {
        if is_eoi {
            self.interrupts.lapic().isr().highest()
        } else {
            None
        }
    }

    /// After that write: if the vector left ISR, the guest's EOI took it (trace and latency).
    fn eoi_done(&mut self, vector: Option<u8>) {
        if let Some(v) = vector.filter(|&v| !self.interrupts.lapic().isr().contains(v)) {
            self.probe.eoi(v);
        }
    }

    fn sync_cr8_from_exit(&mut self) {
        if let Some((cr8, _)) = self.run.cr8_and_if() {
            self.interrupts.sync_cr8(cr8);
        }
    }

    fn notify_result(&self, result: ApicAccessResult) {
        match result {
            ApicAccessResult::Done => {}
            ApicAccessResult::Eoi(eoi) => self.platform().eoi(eoi.vector),
            // `before_entry` re-arms from `next_timer_deadline` before the next entry.
            ApicAccessResult::TimerChanged => {}
        }
    }

    /// SDM §11.4.3: a globally disabled APIC reads as absent in CPUID.1:EDX[9]. KVM computes
    /// that bit from its IA32_APIC_BASE and answers the guest's RDMSR of 0x1B (not filtered) from
    /// it, so a guest write the model accepted is copied there, host-initiated (the filter does
    /// not apply, no transition checks). KVM still refuses reserved bits, MAXPHYADDR and above
    /// included; the model #GPs every such write first (its `max_phys_addr` is the guest's CPUID
    /// 80000008H), so this cannot fail on a guest's say-so.
    ///
    /// Where KVM copied its system registers out at this return
    /// ([`Self::sync_system_registers`]: stepping, a kept return point, or an AP's first KVM_RUNs
    /// after its SIPI), the value goes into them for the next KVM_RUN to load ([`stage_apic_base`]): this runs right after the exit, before anything
    /// writes the registers, and every register access before that KVM_RUN flushes first. The
    /// guest cannot tell: its next instruction runs after that KVM_RUN loaded the value. Else
    /// KVM_SET_MSRS. Nothing else in KVM reads the copy without an in-kernel LAPIC (the x2APIC
    /// MSRs exit to us, KVM_GET_SREGS and KVM_GET_MSRS come after a flush or a KVM_RUN).
    fn sync_kvm_apic_base(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        let base = self.interrupts.lapic().apic_base();
        if base == self.kvm_apic_base {
            return Ok(());
        }
        self.apic_base_watch = 0;
        if self.shared.sync_regs && stage_apic_base(vcpu, base) {
            super::counters::bump(&self.counters().synced_apic_bases);
        } else {
            write_msr(vcpu, MSR_APIC_BASE, base)?;
        }
        self.kvm_apic_base = base;
        Ok(())
    }

    fn apic_page_offset(&self, addr: u64) -> Option<u64> {
        let base = self.interrupts.lapic().mmio_base()?;
        let offset = addr.checked_sub(base)?;
        (offset < APIC_PAGE_SIZE).then_some(offset)
    }

    /// This vCPU's IPI (an ICR write: a SIPI, a fixed or NMI IPI) woke a vCPU asleep on its
    /// doorbell. The woken thread is runnable, but on a host with fewer free cores than
    /// runnable vCPU threads it can be queued on this thread's core, and this thread goes
    /// back into the guest, often to spin until the woken vCPU answers (a BSP waiting for its
    /// AP to come online, a sender waiting for its PONG), keeping the core until the
    /// scheduler's next tick: 3-5 ms (HZ=250) at 2 vCPUs on 2 cores, docs/benchmarks.md "The
    /// 2-vCPU `boot_wake`". sched_yield gives the core to the queued wakee at once; with
    /// nothing queued it returns at once. KVM's in-kernel APIC has no such hand-over: its
    /// sender goes straight back into the guest.
    fn yield_to_woken(&self, woke: bool) {
        if woke {
            super::counters::bump(&self.counters().wake_yields);
            std::thread::yield_now();
        }
    }

    /// Right before KVM_RUN (`pv_eoi`): lets the guest skip the EOI write of its highest
    /// in-service vector in this run where the model allows it.
    fn arm_pv_eoi(&mut self) {
        if !self.pv_eoi.enabled() {
            return;
        }
        if let Some(vector) = self.interrupts.arm_paravirtual_eoi() {
            if self.pv_eoi.arm(vector, &self.shared.memory) {
                super::counters::bump(&self.counters().pv_eoi_arms);
            }
        }
    }

    /// At a KVM_RUN return, before anything else reads the model: the EOI the guest made by
    /// clearing its PV EOI flag (`pv_eoi`), if it did.
    fn retire_pv_eoi(&mut self) {
        if let Some(vector) = self.pv_eoi.take_guest_eoi(&self.shared.memory) {
            let result = self.interrupts.paravirtual_eoi();
            super::counters::bump(&self.counters().pv_eois);
            self.probe.eoi(vector);
            self.notify_result(result);
        }
    }

    fn handle_msr_read(&mut self, index: u32, data: &mut u64, error: &mut u8) {
        let now = self.shared.clock.now();
        match self.interrupts.msr_read(index, now) {
            Ok(v) => *data = v,
            Err(GuestFault::GeneralProtection(why)) => {
                tracing::debug!(index, why, "RDMSR #GP");
                *error = 1;
            }
        }
    }

    fn handle_msr_write(&mut self, index: u32, value: u64, error: &mut u8) {
        let now = self.shared.clock.now();
        let notifier = self.shared.notifier.clone();
        let eoi = self.in_service_before(index == X2APIC_EOI_MSR);
        let mut woke = false;
        let result =
            self.interrupts
                .msr_write(index, value, now, &mut notifier.batched_noting(&mut woke));
        self.eoi_done(eoi);
        self.yield_to_woken(woke);
        match result {
            Ok(r) => self.notify_result(r),
            Err(GuestFault::GeneralProtection(why)) => {
                tracing::debug!(index, value, why, "WRMSR #GP");
                *error = 1;
            }
        }
    }
}

impl VcpuIrqchip for UserVcpuChip {
    fn before_entry(&mut self, vcpu: &mut VcpuFd) -> Result<EntryDecision, IrqchipError> {
        self.run = RunPtr(vcpu.get_kvm_run() as *const kvm_run);
        self.enable_event_sync(vcpu);
        self.interrupts.begin_guest_entry();
        self.accept_init_sipi(vcpu, true)?;
        self.pv_eoi.push_to_kvm(vcpu)?;
        self.counters().smis_dropped.store(
            self.interrupts.dropped_smis(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.offer_synced_regs(vcpu);
        let now = self.shared.clock.now();
        self.run_timer(now)?;
        let pic_intr = self.platform().pic_intr();
        let block = self.should_block(pic_intr);
        if self.probe.on() {
            self.probe.mp_state(self.interrupts.mp_state().to_kvm());
        }
        if block {
            // No KVM_RUN follows: registers a SIPI staged go in now (a vCPU a SIPI just started
            // does not block, but nothing may stay staged past this point).
            flush_staged(vcpu)?;
            self.stepper.offer_synced(None);
            self.interrupts.end_guest_entry();
            self.prepare_wait_for_init(vcpu)?;
            let reason = match self.interrupts.mp_state() {
                MpState::Halted => BlockReason::Halted,
                MpState::ApResetHold => BlockReason::ApResetHold,
                _ => BlockReason::WaitForSipi,
            };
            let deadline = self.host_timer.wakes_at();
            return Ok(EntryDecision::Block { reason, deadline });
        }
        self.inject(vcpu, pic_intr)?;
        self.stepper.offer_synced(None);
        self.sync_system_registers(vcpu);
        self.after_init = None;
        self.regs_rewritten = false;
        self.flags_from_exit = false;
        vcpu.get_kvm_run().cr8 = self.interrupts.lapic().cr8();
        // Last: the model publishes the class the run may fall to after everything else.
        self.arm_pv_eoi();
        Ok(EntryDecision::Enter)
    }

    fn after_exit(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        // An EINTR return has no `guest_ran` or `handle_exit`, but the guest may have run.
        self.retire_pv_eoi();
        if !std::mem::take(&mut self.cr8_synced) {
            self.sync_cr8_from_exit();
        }
        self.sync_kvm_apic_base(vcpu)?;
        self.pv_eoi.push_to_kvm(vcpu)?;
        self.note_taken(vcpu);
        self.interrupts.end_guest_entry();
        // Every KVM_RUN return, exit or EINTR, copied the events out (`kvm_valid_regs`), and
        // while stepping the registers.
        self.events_synced = self.sync_enabled;
        self.regs_fresh = self.regs_sync_on;
        self.exit_rsp = self.regs_sync_always.then(|| vcpu.sync_regs().regs.rsp);
        self.forget_returned_handler();
        self.end_halt_for_nmi_in_kvm(vcpu)
    }

    fn registers_written(&mut self) {
        self.regs_fresh = false;
        self.exit_rsp = None;
    }

    /// A paused vCPU's registers are read and may be restored with ioctls: an IA32_APIC_BASE
    /// staged at the last exit goes in first, or a restore's registers would be overwritten by
    /// it at the next KVM_RUN.
    fn pause_started(&mut self, vcpu: &mut VcpuFd, _entered: bool) -> Result<(), IrqchipError> {
        Ok(flush_staged(vcpu)?)
    }

    fn handle_exit(&mut self, exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError> {
        // Before the exit reads the model (an ISR read, an EOI write): a no-op after `guest_ran`.
        self.retire_pv_eoi();
        // A real exit: the guest was entered, so whatever KVM held was delivered.
        self.kvm_queued = false;
        self.fault_pending = false;
        self.sync_cr8_from_exit();
        self.cr8_synced = true;
        self.flags_from_exit = true;
        self.exit_insn_done = insn_done_at(exit);
        let notifier = self.shared.notifier.clone();
        match exit {
            ChipExit::MmioRead { addr, data } => {
                if let Some(offset) = self.apic_page_offset(*addr) {
                    let now = self.shared.clock.now();
                    self.interrupts.mmio_read(offset, data, now);
                } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(addr) {
                    self.platform().ioapic_read(*addr - IOAPIC_BASE, data);
                } else {
                    return Ok(ExitHandled::NotMine);
                }
            }
            ChipExit::MmioWrite { addr, data } => {
                if let Some(offset) = self.apic_page_offset(*addr) {
                    let now = self.shared.clock.now();
                    let eoi = self.in_service_before(offset == APIC_EOI_OFFSET);
                    let mut woke = false;
                    let r = self.interrupts.mmio_write(
                        offset,
                        data,
                        now,
                        &mut notifier.batched_noting(&mut woke),
                    );
                    self.eoi_done(eoi);
                    self.yield_to_woken(woke);
                    self.notify_result(r);
                } else if (IOAPIC_BASE..IOAPIC_BASE + IOAPIC_SIZE).contains(addr) {
                    self.platform().ioapic_write(*addr - IOAPIC_BASE, data);
                } else {
                    return Ok(ExitHandled::NotMine);
                }
            }
            ChipExit::PioRead { port, data } if Platform::is_pic_port(*port) => {
                self.platform().pic_read(*port, data);
            }
            ChipExit::PioWrite { port, data } if Platform::is_pic_port(*port) => {
                self.platform().pic_write(*port, data);
            }
            ChipExit::RdMsr {
                index, data, error, ..
            } if is_apic_msr(*index) => {
                self.handle_msr_read(*index, data, error);
                self.fault_pending = **error != 0;
            }
            ChipExit::WrMsr {
                index, data, error, ..
            } if is_apic_msr(*index) => {
                self.handle_msr_write(*index, *data, error);
                self.fault_pending = **error != 0;
            }
            ChipExit::WrMsr {
                index, data, error, ..
            } if *index == MSR_KVM_PV_EOI_EN => {
                if !self.pv_eoi.guest_write(*data, &self.shared.memory) {
                    tracing::debug!(value = *data, "WRMSR MSR_KVM_PV_EOI_EN #GP");
                    **error = 1;
                    self.fault_pending = true;
                }
            }
            ChipExit::RdMsr { index, data, .. } if *index == MSR_GHCB && self.ghcb.is_some() => {
                **data = self.ghcb.map_or(0, |g| g.read());
            }
            ChipExit::WrMsr { index, data, .. } if *index == MSR_GHCB && self.ghcb.is_some() => {
                self.write_ghcb(*data);
            }
            ChipExit::Hlt => {
                self.halted_with_if_clear = !self.run.cr8_and_if().is_some_and(|(_, i)| i);
                self.interrupts.halt();
            }
            // The next `before_entry` injects: KVM now reports ready with IF=1.
            ChipExit::IrqWindowOpen => {}
            // One stepped instruction completed: its flags are fresh, not those of an
            // instruction still in flight.
            ChipExit::SingleStep => self.flags_from_exit = false,
            // An MSR nobody models: `vcpu::unclaimed` answers #GP.
            ChipExit::RdMsr { .. } | ChipExit::WrMsr { .. } => {
                self.fault_pending = true;
                return Ok(ExitHandled::NotMine);
            }
            _ => return Ok(ExitHandled::NotMine),
        }
        Ok(ExitHandled::Handled)
    }

    /// Polls for work or the timer deadline ([`HaltPoll`]), then sleeps on the inbox doorbell
    /// until rung, or until the deadline: the POSIX timer's signal ends the sleep then, and the
    /// futex's own timeout covers a signal that came just before the sleep (`apic_timer`).
    fn block(&mut self, deadline: Option<Instant>) {
        // A deadline the poll spins to needs no signal: the poll sees it pass.
        let suspended = deadline
            .filter(|&d| d <= Instant::now() + HALT_POLL_MAX)
            .and_then(|_| self.host_timer.suspend());
        let outcome = self.halt_poll.poll(self.interrupts.inbox(), deadline);
        if !matches!(outcome, PollOutcome::GaveUp { .. }) {
            super::counters::bump(&self.counters().halt_polls_ok);
            return;
        }
        if let Some(armed) = suspended {
            self.host_timer.resume(armed);
        }
        super::counters::bump(&self.counters().halt_sleeps);
        let start = Instant::now();
        self.interrupts.block_until(deadline);
        self.halt_poll.slept(start.elapsed());
    }

    /// The model's state (`MpStateMachine::get_for_user`'s value), after taking what was posted
    /// and accepting INIT/SIPI, as KVM does before it answers KVM_GET_MP_STATE.
    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError> {
        self.interrupts.drain();
        self.accept_init_sipi(vcpu, false)?;
        Ok(self.interrupts.mp_state().to_kvm())
    }

    /// The model's state, drained (`VcpuInterrupts::save`), with the NMIs KVM queued
    /// (KVM_NMI) joined to the model's (at most two, as `process_nmi` keeps), and KVM's events
    /// as the processor's part. A latched INIT or SIPI stays latched: it is not accepted here.
    fn save_fabric(
        &mut self,
        vcpu: &mut VcpuFd,
        _lapic: irqchip::lapic::LapicConfig,
    ) -> Result<VcpuFabric, IrqchipError> {
        let mut model = self.interrupts.save(self.shared.clock.now());
        let mut events = vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
        let nmis = (u8::from(model.pending.nmi) + u8::from(model.pending.nmi_held))
            .saturating_add(events.nmi.pending)
            .min(2);
        model.pending.nmi = nmis >= 1;
        model.pending.nmi_held = nmis >= 2;
        events.nmi.pending = 0;
        events.smi.pending = 0;
        events.smi.latched_init = 0;
        Ok(VcpuFabric {
            model,
            cpu_events: events,
        })
    }

    /// The model's state onto the VM clock. Where KVM ignored the host's IA32_TSC write (this
    /// host: the guest runs on the host TSC, which kept counting while the VM was stopped), the
    /// model's TSC origin moves by the gap, so that a TSC deadline is compared with the TSC the
    /// guest reads; the APIC timer's counts keep the time they had left.
    fn restore_apic(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
        _saved_tsc: u64,
    ) -> Result<Option<u64>, IrqchipError> {
        let mut model = fabric.model.clone();
        if !self.shared.tsc.writable {
            let saved = model.lapic.timer().clock().tsc_at_zero;
            let now = crate::snapshot::cpu::read_msr(vcpu, crate::snapshot::cpu::MSR_TSC)?;
            model.lapic.shift_guest_tsc(now.wrapping_sub(saved));
        }
        self.interrupts.restore(&model, self.shared.clock.now())?;
        self.host_timer.forget();
        // KVM_SET_SREGS wrote the model's IA32_APIC_BASE into KVM's copy.
        self.kvm_apic_base = model.lapic.apic_base();
        self.after_init = None;
        self.regs_rewritten = true;
        // The restored guest is at another point of its run: a return point of ours is not its.
        self.handler_returns_to = None;
        Ok(None)
    }

    /// KVM gets the processor's events only: the model injects its own NMIs, and KVM's MP state
    /// stays RUNNABLE (the only one it takes without an in-kernel LAPIC).
    fn restore_events(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
    ) -> Result<(), IrqchipError> {
        let mut events = fabric.cpu_events;
        events.nmi.pending = 0;
        events.smi = Default::default();
        events.flags &= !(kvm_bindings::KVM_VCPUEVENT_VALID_SMM
            | kvm_bindings::KVM_VCPUEVENT_VALID_SIPI_VECTOR);
        vcpu.set_vcpu_events(&events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        self.events_synced = false;
        // The MSRs went in before this (`snapshot::restore::apply_vcpu`).
        let pv_eoi = crate::snapshot::cpu::read_msr(vcpu, MSR_KVM_PV_EOI_EN)?;
        self.pv_eoi.restored(pv_eoi);
        if self.interrupts.mp_state() == MpState::Halted {
            let regs = vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
            self.halted_with_if_clear = regs.rflags & (1 << 9) == 0;
        }
        Ok(())
    }

    fn injection_in_flight(&self) -> bool {
        self.in_flight
    }

    fn guest_ran(&mut self) {
        self.in_flight = false;
        self.exit_insn_done = false;
        self.retire_pv_eoi();
    }

    /// The model's local APIC; NMIs the model holds plus those KVM queued (KVM_NMI).
    fn introspect(
        &mut self,
        vcpu: &mut VcpuFd,
    ) -> Result<(crate::api::model::LapicInfo, crate::api::model::PendingInfo), IrqchipError> {
        let lapic =
            crate::api::lapic::model_lapic(self.interrupts.lapic(), self.shared.clock.now());
        let held = u32::from(self.interrupts.pending_nmis());
        Ok((lapic, crate::api::lapic::kvm_pending(vcpu, held)?))
    }
}

/// True if KVM has nothing left to finish of `exit`'s instruction at the next KVM_RUN: an MMIO
/// write of less than 8 bytes that ends before the last byte of its page (KVM's emulator wrote RIP
/// back before the exit, and such an access is one fragment: no second exit for it), a debug exit (the instruction at RIP has not begun) or an
/// interrupt-window exit. An MMIO read, a port or an MSR access is completed at that KVM_RUN,
/// from KVM's registers.
fn insn_done_at(exit: &ChipExit<'_>) -> bool {
    match exit {
        // KVM splits an access into 8-byte fragments and at a page boundary, and exits once for
        // each: an access shorter than 8 bytes that ends before its page's last byte is one.
        ChipExit::MmioWrite { addr, data } => {
            data.len() < 8 && (addr % 4096) + (data.len() as u64) < 4096
        }
        ChipExit::SingleStep | ChipExit::IrqWindowOpen => true,
        _ => false,
    }
}

/// The last KVM_RUN return was KVM_EXIT_INTERNAL_ERROR.
fn internal_error_exit(vcpu: &mut VcpuFd) -> bool {
    vcpu.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which exits leave the vCPU at a boundary where irqvm may hand KVM new registers: a write
    /// KVM makes one fragment of (less than 8 bytes, ending before its page's last byte), a debug
    /// or window exit; not the first fragment of a 16-byte or 8-byte store, nor one that reaches
    /// a page's end, nor a read, port or MSR exit, which KVM completes at the next KVM_RUN.
    #[test]
    fn only_exits_whose_instruction_is_complete_allow_new_registers() {
        let eoi = ChipExit::MmioWrite {
            addr: 0xFEE0_00B0,
            data: &[0; 4],
        };
        assert!(insn_done_at(&eoi));
        for (addr, len) in [(0xFEE0_00B0u64, 8usize), (0xFEE0_0FFC, 4), (0xFEE0_0FFF, 1)] {
            let data = vec![0u8; len];
            let exit = ChipExit::MmioWrite { addr, data: &data };
            assert!(!insn_done_at(&exit), "{addr:#x} {len}");
        }
        assert!(insn_done_at(&ChipExit::SingleStep));
        assert!(insn_done_at(&ChipExit::IrqWindowOpen));
        let mut buf = [0u8; 4];
        let read = ChipExit::MmioRead {
            addr: 0xFEE0_0030,
            data: &mut buf,
        };
        assert!(!insn_done_at(&read));
        assert!(!insn_done_at(&ChipExit::PioWrite {
            port: 0x20,
            data: &[0x20],
        }));
        let mut error = 0u8;
        let wrmsr = ChipExit::WrMsr {
            index: 0x80B,
            reason: 0,
            data: 0,
            error: &mut error,
        };
        assert!(!insn_done_at(&wrmsr));
        assert!(!insn_done_at(&ChipExit::Hlt));
    }

    /// The halt-poll window grows after short sleeps (from 10 µs, doubling, capped at KVM's
    /// 200 µs) and halves after long ones.
    #[test]
    fn halt_poll_window_adapts() {
        let mut poll = HaltPoll::new();
        poll.slept(Duration::from_micros(50));
        assert_eq!(poll.window, HALT_POLL_START);
        for _ in 0..10 {
            poll.slept(Duration::from_micros(50));
        }
        assert_eq!(poll.window, HALT_POLL_MAX);
        poll.slept(Duration::from_millis(5));
        assert_eq!(poll.window, HALT_POLL_MAX / 2);
    }

    /// A poll returns at once when something is posted, and without work or deadline it gives
    /// up (a zero window), so the caller sleeps on the doorbell.
    #[test]
    fn halt_poll_sees_a_post_and_gives_up_without_one() {
        let inbox = irqchip::posting::VcpuInbox::new();
        let mut poll = HaltPoll::new();
        assert!(matches!(
            poll.poll(&inbox, None),
            PollOutcome::GaveUp { .. }
        ));
        let _ = inbox.post_wakeup();
        assert_eq!(poll.poll(&inbox, None), PollOutcome::Work);
    }

    /// A passed timer deadline ends the poll: the vCPU re-enters and polls its APIC timer.
    #[test]
    fn halt_poll_ends_at_the_deadline() {
        let inbox = irqchip::posting::VcpuInbox::new();
        let mut poll = HaltPoll::new();
        assert_eq!(
            poll.poll(&inbox, Some(Instant::now())),
            PollOutcome::Deadline
        );
    }

    /// Two vain polls at the full window switch the open-ended poll off; then only every
    /// eighth halt polls (a probe), and a post the probe catches switches it back on. Vain
    /// polls below the full window (the window still growing) do not count.
    #[test]
    fn halt_poll_switches_off_after_vain_polls_and_probes() {
        let vain = PollOutcome::GaveUp { preempted: false };
        let mut poll = HaltPoll::new();
        poll.window = HALT_POLL_MAX / 2;
        for _ in 0..5 {
            let w = poll.open_window();
            poll.judge(vain, w);
        }
        assert_eq!(poll.off_for, 0, "a growing window is not judged");
        poll.window = HALT_POLL_MAX;
        let w = poll.open_window();
        poll.judge(vain, w);
        assert_eq!(poll.off_for, 0, "one vain poll is not enough");
        let w = poll.open_window();
        poll.judge(vain, w);
        assert_ne!(poll.off_for, 0, "two in a row switch it off");
        let windows: Vec<Duration> = (0..HALT_POLL_PROBE_EVERY)
            .map(|_| poll.open_window())
            .collect();
        let probes = windows.iter().filter(|w| !w.is_zero()).count();
        assert_eq!(
            probes, 1,
            "one probe in {HALT_POLL_PROBE_EVERY}: {windows:?}"
        );
        poll.judge(PollOutcome::Work, Duration::ZERO);
        assert_ne!(
            poll.off_for, 0,
            "work seen without an open window proves nothing"
        );
        poll.judge(PollOutcome::Work, HALT_POLL_MAX);
        assert_eq!(poll.off_for, 0, "a probe that caught a post switches it on");
        assert_eq!(poll.open_window(), HALT_POLL_MAX);
        let mut preempted = HaltPoll::new();
        preempted.window = HALT_POLL_START;
        for _ in 0..HALT_POLL_MISSES {
            preempted.judge(PollOutcome::GaveUp { preempted: true }, HALT_POLL_START);
        }
        assert_ne!(preempted.off_for, 0, "preempted polls count at any window");
    }

    /// The window kick's first delay: halved by an episode a kick ended (not below 20 µs),
    /// doubled by one a guest exit ended while a kick was armed, off beyond 560 µs (then nothing
    /// is armed), and back on after an episode that waited longer than 560 µs.
    #[test]
    fn window_kick_first_delay_adapts() {
        let t0 = Instant::now();
        let mut kick = WindowKick::new();
        kick.episode = Some((t0, 0));
        kick.injected(t0, true);
        assert_eq!(
            kick.first, WINDOW_KICK_MIN,
            "35 µs halved, floored at 20 µs"
        );
        for _ in 0..6 {
            kick.episode = Some((t0, 0));
            kick.due = Some(t0 + Duration::from_secs(1));
            kick.injected(t0, false);
            assert_eq!(kick.due, None, "an injection forgets the armed kick");
        }
        assert!(kick.first > WINDOW_KICK_LAST);
        kick.not_ready(t0, false);
        assert_eq!(kick.due, None, "off: nothing armed");
        assert!(kick.timer.is_none());
        let later = t0 + 2 * WINDOW_KICK_LAST;
        kick.injected(later, false);
        assert_eq!(
            kick.first,
            WINDOW_KICK_LAST / 2,
            "a long wait brings kicks back"
        );
        kick.leftover();
        assert_eq!(
            kick.first, WINDOW_KICK_LAST,
            "a leftover kick counts against kicking"
        );
    }
}
