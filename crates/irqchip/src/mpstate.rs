//! The multiprocessor state of one vCPU and the INIT / start-up IPI protocol that moves it
//! (SDM vol. 3 §9.4 "Multiple-Processor (MP) Initialization", §8.4 in older editions; §11.6.1,
//! delivery modes INIT and Start-Up).
//!
//! # Model
//!
//! INIT and SIPI are *latched events*, never direct writes to another vCPU's state (seed 000):
//! a sender posts them into the target's inbox from any thread; the target drains the inbox and
//! hands the INIT/SIPI parts to [`MpStateMachine::latch`] in its own thread; then
//! [`MpStateMachine::accept_events`], also in the target's own context, consumes them. A HLT
//! executed by the target at the same moment therefore cannot overwrite a pending INIT: HLT changes
//! the [`MpState`], the INIT stays in the latch until the next accept step.
//!
//! Each vCPU owns one [`MpStateMachine`] and one [`SipiDelivery`] plug (the plug may hold state:
//! [`ProtectedStateSipi`] remembers whether the vCPU has booted once).
//!
//! # States and what ends them
//!
//! | state | runs guest code | left by |
//! |---|---|---|
//! | [`MpState::Runnable`] | yes | HLT ([`MpStateMachine::halt`]), AP Reset Hold ([`MpStateMachine::ap_reset_hold`]), INIT |
//! | [`MpState::Halted`] | no | a deliverable interrupt, NMI or SMI (the caller calls [`MpStateMachine::wake`]), INIT |
//! | [`MpState::Uninitialized`] | no | INIT only (a SIPI is dropped, as in KVM) |
//! | [`MpState::InitReceived`] | no | SIPI (start), INIT (re-reset, stays) — interrupts, NMI and SMI are blocked |
//! | [`MpState::ApResetHold`] | no | INIT only (then SIPI) |
//!
//! See [`MpState::is_woken_by`] for the same rules as code.
//!
//! # Order of INIT and SIPI (KVM `__apic_accept_irq` and `kvm_apic_accept_events`, lapic.c)
//!
//! * Latching an INIT discards a SIPI latched *earlier* and not yet accepted: KVM's INIT delivery
//!   replaces the whole pending-event word by "INIT". On hardware that older SIPI would either
//!   have been ignored or have started the processor just before the INIT put it back into
//!   wait-for-SIPI, so the end state is the same.
//! * A SIPI latched *after* the INIT (a later `latch` call, or the same `ApicEvents` batch, where
//!   the order is taken as INIT first) stays latched. One accept step then processes the INIT
//!   first (reset, AP → wait-for-SIPI) and then the SIPI, which finds the AP in `InitReceived`
//!   and starts it — exactly KVM, which tests the INIT bit and then the SIPI bit of one snapshot
//!   of the pending events. The SDM's 10 ms INIT-to-SIPI delay is the guest's business; a
//!   virtual processor finishes its INIT at once.
//! * A SIPI is honoured only in `InitReceived`; in every other state it is dropped and reported
//!   in [`AcceptOutcome::dropped_sipi`] (SDM §9.4.2: a SIPI to a processor not in wait-for-SIPI is
//!   ignored). Hence INIT-SIPI-SIPI starts an AP exactly once: the second SIPI finds it Runnable.
//! * While INIT is blocked ([`InitBlocking`]: SMM, VMX root operation, GIF=0) the INIT stays
//!   latched, any latched SIPI is dropped and nothing else changes (seed 002).
//!
//! # Example: starting an AP
//!
//! ```
//! use irqchip::mpstate::{
//!     ArchResetState, InitBlocking, MpState, MpStateMachine, ResetKind, SipiAction, StandardSipi,
//! };
//! use irqchip::ApicEvents;
//!
//! let mut ap = MpStateMachine::new(false);
//! assert_eq!(ap.state(), MpState::Uninitialized);
//!
//! // A SIPI before any INIT finds no wait-for-SIPI state: dropped.
//! ap.latch(ApicEvents { sipi: Some(0x9A), ..Default::default() });
//! let outcome = ap.accept_events(InitBlocking::NONE, &mut StandardSipi);
//! assert!(outcome.dropped_sipi && outcome.start.is_none());
//!
//! // INIT while the AP is in SMM stays latched until SMM ends.
//! let in_smm = InitBlocking { smm: true, ..InitBlocking::NONE };
//! ap.latch(ApicEvents { init: true, ..Default::default() });
//! assert!(ap.accept_events(in_smm, &mut StandardSipi).init_blocked);
//! assert_eq!(ap.state(), MpState::Uninitialized);
//!
//! // Then the SIPI of INIT-SIPI: one accept step resets the AP and starts it at page 0x9A.
//! ap.latch(ApicEvents { sipi: Some(0x9A), ..Default::default() });
//! let outcome = ap.accept_events(InitBlocking::NONE, &mut StandardSipi);
//! assert_eq!(outcome.reset, Some(ResetKind::Init { write_registers: true }));
//! let start = outcome.start.unwrap();
//! assert_eq!(start, SipiAction::StartRealMode { cs_selector: 0x9A00, cs_base: 0x9A000, rip: 0 });
//! assert_eq!(ap.state(), MpState::Runnable);
//!
//! // The registers the VMM loads: INIT's state (RDX = the CPUID signature), then the start.
//! let mut regs = outcome.reset.unwrap().arch_state(0x000A_0652).unwrap();
//! regs.apply_start(&start);
//! assert_eq!((regs.cs.base + regs.rip, regs.gprs[2]), (0x9A000, 0x000A_0652));
//!
//! // The second SIPI of INIT-SIPI-SIPI finds the AP running: dropped, it starts only once.
//! ap.latch(ApicEvents { sipi: Some(0x9A), ..Default::default() });
//! assert!(ap.accept_events(InitBlocking::NONE, &mut StandardSipi).dropped_sipi);
//! ```

mod reset_state;
#[cfg(test)]
mod tests;

pub use reset_state::*;

use serde::{Deserialize, Serialize};

use crate::types::{ApicEvents, Vector};

/// The `mp_state` values of the KVM ABI (`struct kvm_mp_state`), for
/// [`MpStateMachine::set_from_user`] and [`MpStateMachine::get_for_user`].
pub mod kvm_abi {
    /// The vCPU runs (`KVM_MP_STATE_RUNNABLE`).
    pub const RUNNABLE: u32 = 0;
    /// An AP that has not received INIT (`KVM_MP_STATE_UNINITIALIZED`).
    pub const UNINITIALIZED: u32 = 1;
    /// Wait-for-SIPI (`KVM_MP_STATE_INIT_RECEIVED`).
    pub const INIT_RECEIVED: u32 = 2;
    /// Halted by HLT (`KVM_MP_STATE_HALTED`).
    pub const HALTED: u32 = 3;
    /// Accepted from userspace only; never reported back (seed 000).
    pub const SIPI_RECEIVED: u32 = 4;
    /// A protected-state AP parked by the AP Reset Hold request (`KVM_MP_STATE_AP_RESET_HOLD`).
    pub const AP_RESET_HOLD: u32 = 9;
}

/// The multiprocessor state of a vCPU (KVM's `mp_state`, minus SIPI_RECEIVED, which seed 000
/// made an input-only value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MpState {
    /// Executing guest code.
    Runnable,
    /// An application processor that has not yet received its first INIT. Only INIT moves it.
    Uninitialized,
    /// Wait-for-SIPI: INIT was processed on an AP; the next SIPI starts it (SDM §9.4.2).
    InitReceived,
    /// Executed HLT; waits for an interrupt, NMI, SMI or INIT (SDM vol. 2, HLT).
    Halted,
    /// A protected-state (SEV-ES) AP parked itself with the AP Reset Hold request (GHCB spec,
    /// seed 004); only INIT-SIPI makes it runnable again.
    ApResetHold,
}

/// Something that may end a non-running state. Used by [`MpState::is_woken_by`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WakeEvent {
    /// A maskable interrupt that the vCPU would take now (IF=1 and above PPR).
    Interrupt,
    /// A non-maskable interrupt (NMI delivery mode or LINT1).
    Nmi,
    /// A system-management interrupt.
    Smi,
    /// An INIT (INIT delivery mode, level assert).
    Init,
    /// A start-up IPI; it only wakes a vCPU in wait-for-SIPI.
    Sipi,
}

impl MpState {
    /// Every state, for tables and tests.
    pub const ALL: [MpState; 5] = [
        MpState::Runnable,
        MpState::Uninitialized,
        MpState::InitReceived,
        MpState::Halted,
        MpState::ApResetHold,
    ];

    /// The state after power-up: the BSP runs from the reset vector, APs wait (SDM §9.4.1).
    pub fn initial(bsp: bool) -> Self {
        if bsp {
            Self::Runnable
        } else {
            Self::Uninitialized
        }
    }

    /// True only for `Runnable`: the vCPU thread may enter the guest.
    pub fn runs_guest(self) -> bool {
        self == Self::Runnable
    }

    /// An accepted INIT, from any state: an AP enters wait-for-SIPI, the BSP restarts at the
    /// reset vector without waiting for a SIPI (seed 000; SDM §9.4.2). `bsp`: the vCPU's
    /// IA32_APIC_BASE.BSP flag at the INIT.
    pub fn after_init(self, bsp: bool) -> Self {
        if bsp {
            Self::Runnable
        } else {
            Self::InitReceived
        }
    }

    /// An accepted SIPI: `Some(Runnable)` in wait-for-SIPI, `None` (dropped) in every other state.
    pub fn after_sipi(self) -> Option<Self> {
        (self == Self::InitReceived).then_some(Self::Runnable)
    }

    /// HLT: only a running vCPU can execute it; any other state is unchanged.
    pub fn after_halt(self) -> Self {
        if self == Self::Runnable {
            Self::Halted
        } else {
            self
        }
    }

    /// The AP Reset Hold request of a protected-state guest: only a running vCPU can make it.
    pub fn after_ap_reset_hold(self) -> Self {
        if self == Self::Runnable {
            Self::ApResetHold
        } else {
            self
        }
    }

    /// An interrupt, NMI or SMI became deliverable: only `Halted` resumes (see
    /// [`is_woken_by`](Self::is_woken_by)).
    pub fn after_wake(self) -> Self {
        if self == Self::Halted {
            Self::Runnable
        } else {
            self
        }
    }

    /// Whether `event` ends this state (for the vCPU loop's decision to block). INIT and SIPI
    /// act through [`MpStateMachine::accept_events`]; the others through
    /// [`MpStateMachine::wake`].
    ///
    /// * `Halted`: interrupt, NMI, SMI, INIT (SDM vol. 2 HLT: "an enabled interrupt (including
    ///   NMI and SMI) ... INIT# ... resume execution"). A SIPI is ignored.
    /// * `InitReceived` (wait-for-SIPI): SIPI, and INIT, which re-resets and stays. NMI, SMI
    ///   and interrupts are blocked in wait-for-SIPI (SDM vol. 3 activity states); they stay
    ///   pending wherever the caller keeps them.
    /// * `Uninitialized`: INIT only.
    /// * `ApResetHold`: INIT only. KVM treats the hold like HLT and lets any event end it, and the
    ///   guest, seeing no SIPI in SW_EXITINFO2, issues the hold again; we skip that spurious round
    ///   trip (GHCB spec: the hold ends with INIT-SIPI).
    /// * `Runnable`: nothing to wake; returns true.
    pub fn is_woken_by(self, event: WakeEvent) -> bool {
        use WakeEvent::*;
        match self {
            Self::Runnable => true,
            Self::Halted => !matches!(event, Sipi),
            Self::InitReceived => matches!(event, Init | Sipi),
            Self::Uninitialized | Self::ApResetHold => event == Init,
        }
    }

    /// The transition table: may an event (not userspace) move a vCPU from `from` to `to`?
    /// Staying put is always allowed. [`MpStateMachine::set_from_user`] is outside this table.
    ///
    /// | from → to | by |
    /// |---|---|
    /// | Runnable → Halted | HLT |
    /// | Runnable → ApResetHold | AP Reset Hold |
    /// | Halted → Runnable | wake |
    /// | InitReceived → Runnable | SIPI |
    /// | any → InitReceived | INIT, BSP flag clear (an AP) |
    /// | any → Runnable | INIT, BSP flag set (the BSP) |
    pub fn transition_allowed(from: Self, to: Self, bsp: bool) -> bool {
        use MpState::*;
        if from == to {
            return true;
        }
        match (from, to) {
            (Runnable, Halted) | (Runnable, ApResetHold) => true,
            (Halted, Runnable) | (InitReceived, Runnable) => true,
            (_, InitReceived) => !bsp,
            (_, Runnable) => bsp,
            _ => false,
        }
    }

    /// The KVM ABI value of this state.
    pub fn to_kvm(self) -> u32 {
        match self {
            Self::Runnable => kvm_abi::RUNNABLE,
            Self::Uninitialized => kvm_abi::UNINITIALIZED,
            Self::InitReceived => kvm_abi::INIT_RECEIVED,
            Self::Halted => kvm_abi::HALTED,
            Self::ApResetHold => kvm_abi::AP_RESET_HOLD,
        }
    }
}

/// The conditions under which a processor holds INIT pending instead of acting on it
/// (seed 002): SMM inhibits INIT (SDM vol. 3, "Entering SMM"), INIT is blocked in VMX root
/// operation (SDM vol. 3, "Restrictions on VMX Operation"), and GIF=0 holds it (AMD APM vol. 2,
/// "Global Interrupt Flag"). Any one blocks INIT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InitBlocking {
    /// The processor is in system-management mode.
    pub smm: bool,
    /// The processor is in VMX root operation.
    pub vmx_root: bool,
    /// The global interrupt flag (AMD SVM) is clear.
    pub gif_clear: bool,
}

impl InitBlocking {
    /// Nothing blocks INIT.
    pub const NONE: Self = Self {
        smm: false,
        vmx_root: false,
        gif_clear: false,
    };

    /// True when any of the three conditions holds, so INIT stays latched.
    pub fn blocks_init(&self) -> bool {
        self.smm || self.vmx_root || self.gif_clear
    }
}

/// What the VMM must do to start a vCPU that accepted a SIPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SipiAction {
    /// Load CS (selector and base; limit and access rights stay as INIT left them) and RIP, then
    /// run: real mode at physical address `vector << 12` (SDM §9.4.3).
    StartRealMode {
        /// CS selector: `vector << 8`.
        cs_selector: u16,
        /// CS base: `vector << 12`.
        cs_base: u64,
        /// RIP: 0.
        rip: u64,
    },
    /// Run the vCPU without touching its registers (protected guest state, seed 004).
    /// `first_boot`: this is the first start, from the state initialised and measured at launch;
    /// otherwise it resumes from the AP Reset Hold and the VMM must tell the guest that a SIPI
    /// ended the hold (KVM: SW_EXITINFO2 = 1 in the GHCB).
    ResumeUntouched {
        /// First start from the launch state (true) or a resume from AP Reset Hold (false).
        first_boot: bool,
    },
}

impl SipiAction {
    /// The architectural start of a SIPI with `vector`: CS = vector << 8, base = vector << 12,
    /// RIP = 0 (SDM §9.4.3 and §11.6.1, Start-Up delivery mode).
    pub fn real_mode(vector: Vector) -> Self {
        Self::StartRealMode {
            cs_selector: u16::from(vector) << 8,
            cs_base: u64::from(vector) << 12,
            rip: 0,
        }
    }
}

/// How a vCPU starts when it accepts a SIPI, and whether INIT may write its registers. One plug
/// per vCPU: implementations may keep per-vCPU state.
pub trait SipiDelivery {
    /// Called once per honoured SIPI (the vCPU was in wait-for-SIPI).
    fn deliver_sipi(&mut self, vector: Vector) -> SipiAction;

    /// Whether INIT may reset the vCPU's registers (false when the guest state is encrypted).
    fn registers_writable(&self) -> bool {
        true
    }
}

/// The architectural SIPI: start in real mode at `vector << 12`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StandardSipi;

impl SipiDelivery for StandardSipi {
    fn deliver_sipi(&mut self, vector: Vector) -> SipiAction {
        SipiAction::real_mode(vector)
    }
}

/// SEV-ES style start-up (seed 004): the hypervisor never writes the registers. The first SIPI
/// runs the vCPU from its launch state; later ones resume it from the AP Reset Hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProtectedStateSipi {
    received_first_sipi: bool,
}

impl ProtectedStateSipi {
    /// A vCPU that has not been started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the vCPU has been started by a SIPI.
    pub fn has_booted(&self) -> bool {
        self.received_first_sipi
    }
}

impl SipiDelivery for ProtectedStateSipi {
    fn deliver_sipi(&mut self, _vector: Vector) -> SipiAction {
        let first_boot = !self.received_first_sipi;
        self.received_first_sipi = true;
        SipiAction::ResumeUntouched { first_boot }
    }

    fn registers_writable(&self) -> bool {
        false
    }
}

/// A reset the caller must apply to the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResetKind {
    /// INIT: always apply `LocalApic::init_reset` (SDM §11.4.7.3). When `write_registers`, also
    /// load [`ArchResetState::after_init`] into the vCPU; when false (protected guest state) leave
    /// the registers alone.
    Init {
        /// Load [`ArchResetState::after_init`]; false when the guest state is protected.
        write_registers: bool,
    },
}

impl ResetKind {
    /// The register state to load, or `None` when the registers must not be written.
    pub fn arch_state(self, processor_signature: u32) -> Option<ArchResetState> {
        match self {
            Self::Init { write_registers } => {
                write_registers.then(|| ArchResetState::after_init(processor_signature))
            }
        }
    }
}

/// What one [`MpStateMachine::accept_events`] step did. Apply `reset` before `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AcceptOutcome {
    /// An INIT was accepted: reset the vCPU.
    pub reset: Option<ResetKind>,
    /// A SIPI was accepted: start the vCPU this way.
    pub start: Option<SipiAction>,
    /// A latched SIPI was discarded (not in wait-for-SIPI, or INIT blocked).
    pub dropped_sipi: bool,
    /// An INIT is latched but blocked; it will be accepted at a step without blocking.
    pub init_blocked: bool,
}

/// A rejected [`MpStateMachine::set_from_user`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MpStateError {
    #[error("mp_state {0} is unknown or not supported")]
    /// The value is not a KVM `mp_state` this model accepts from userspace.
    Unsupported(u32),
    #[error("INIT_RECEIVED and SIPI_RECEIVED cannot be set while INIT is blocked")]
    /// INIT_RECEIVED or SIPI_RECEIVED was set while INIT is blocked ([`InitBlocking`]).
    InitBlocked,
}

/// The MP state of one vCPU and its INIT/SIPI latch. Owned by the vCPU's thread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MpStateMachine {
    bsp: bool,
    state: MpState,
    init_latched: bool,
    sipi_latched: Option<Vector>,
    /// The vector of the last SIPI latched, kept after it is consumed: KVM_SET_MP_STATE with
    /// SIPI_RECEIVED re-latches it (KVM keeps `apic->sipi_vector` the same way).
    last_sipi_vector: Vector,
}

impl MpStateMachine {
    /// Power-up state: the BSP is Runnable, an AP Uninitialized, nothing latched.
    pub fn new(bsp: bool) -> Self {
        Self {
            bsp,
            state: MpState::initial(bsp),
            init_latched: false,
            sipi_latched: None,
            last_sipi_vector: 0,
        }
    }

    /// A state machine with the given state and latch, for converting another implementation's
    /// MP state (KVM_GET_MP_STATE and the latched INIT of KVM_GET_VCPU_EVENTS). No transition
    /// rule is checked, as KVM_SET_MP_STATE checks none.
    pub fn from_parts(
        bsp: bool,
        state: MpState,
        init_latched: bool,
        sipi_latched: Option<Vector>,
        last_sipi_vector: Vector,
    ) -> Self {
        Self {
            bsp,
            state,
            init_latched,
            sipi_latched,
            last_sipi_vector,
        }
    }

    /// The vector of the last SIPI latched, kept after it was consumed (KVM's `sipi_vector`).
    pub fn last_sipi_vector(&self) -> Vector {
        self.last_sipi_vector
    }

    /// The current MP state.
    pub fn state(&self) -> MpState {
        self.state
    }

    /// True for the bootstrap processor as configured at power-up. (INIT restarts a vCPU
    /// instead of parking it in wait-for-SIPI by its IA32_APIC_BASE.BSP flag at the time: see
    /// [`accept_events_with_bsp_flag`](Self::accept_events_with_bsp_flag).)
    pub fn is_bsp(&self) -> bool {
        self.bsp
    }

    /// The INIT/SIPI still latched (other fields are always clear).
    pub fn pending_events(&self) -> ApicEvents {
        ApicEvents {
            init: self.init_latched,
            sipi: self.sipi_latched,
            ..ApicEvents::default()
        }
    }

    /// Takes the INIT and SIPI of drained events into the latch; NMI, SMI and ExtINT are the
    /// caller's. An INIT discards an older pending SIPI; a SIPI replaces an older pending vector.
    /// In one batch, INIT counts as the earlier of the two (see the module documentation).
    pub fn latch(&mut self, events: ApicEvents) {
        if events.init {
            self.init_latched = true;
            self.sipi_latched = None;
        }
        if let Some(vector) = events.sipi {
            self.sipi_latched = Some(vector);
            self.last_sipi_vector = vector;
        }
    }

    /// True while an INIT or SIPI is latched. A vCPU with one must not block before running
    /// [`accept_events`](Self::accept_events), whatever its state (seed 000: no INIT is lost to
    /// HLT).
    pub fn has_pending_init_or_sipi(&self) -> bool {
        self.init_latched || self.sipi_latched.is_some()
    }

    /// True when [`accept_events`](Self::accept_events) would act now: a SIPI is latched, or an
    /// INIT is latched and not blocked. The vCPU loop may block (in a non-running state, with no
    /// wake event) only when this is false: an INIT held by SMM must not make it spin.
    pub fn needs_accept(&self, blocking: InitBlocking) -> bool {
        self.sipi_latched.is_some() || (self.init_latched && !blocking.blocks_init())
    }

    /// Consumes latched INIT/SIPI in the vCPU's own context (KVM `kvm_apic_accept_events`), with
    /// the configured BSP restarting on INIT: what
    /// [`accept_events_with_bsp_flag`](Self::accept_events_with_bsp_flag) does when the flag
    /// is the power-up one.
    pub fn accept_events(
        &mut self,
        blocking: InitBlocking,
        sipi: &mut dyn SipiDelivery,
    ) -> AcceptOutcome {
        self.accept_events_with_bsp_flag(blocking, self.bsp, sipi)
    }

    /// Consumes latched INIT/SIPI in the vCPU's own context (KVM `kvm_apic_accept_events`).
    ///
    /// 1. INIT blocked: keep INIT latched, drop any SIPI, change nothing else (seed 002).
    /// 2. INIT latched: reset (the caller applies [`AcceptOutcome::reset`]); a vCPU whose
    ///    IA32_APIC_BASE.BSP flag is set now (`bsp_flag`) → Runnable at the reset vector, any
    ///    other → InitReceived (seed 000). The flag as the guest left it, not the power-up
    ///    role: software may write it (SDM vol. 4 table 2-2, "BSP flag (R/W)"), INIT keeps it,
    ///    and KVM decides by it (`kvm_vcpu_is_bsp`), so CPU 0 with its flag cleared waits for a
    ///    SIPI like an AP (measured in `kernel` and `split` mode, guest `init_again`).
    /// 3. SIPI latched: honoured only in InitReceived — `sipi` decides how the vCPU starts and
    ///    it becomes Runnable — otherwise dropped.
    pub fn accept_events_with_bsp_flag(
        &mut self,
        blocking: InitBlocking,
        bsp_flag: bool,
        sipi: &mut dyn SipiDelivery,
    ) -> AcceptOutcome {
        let mut outcome = AcceptOutcome::default();
        if blocking.blocks_init() {
            // A CPU with INIT blocked cannot be in wait-for-SIPI, so a SIPI now is meaningless.
            outcome.dropped_sipi = self.sipi_latched.take().is_some();
            outcome.init_blocked = self.init_latched;
            return outcome;
        }
        if std::mem::take(&mut self.init_latched) {
            outcome.reset = Some(ResetKind::Init {
                write_registers: sipi.registers_writable(),
            });
            self.enter(self.state.after_init(bsp_flag), bsp_flag);
        }
        if let Some(vector) = self.sipi_latched.take() {
            match self.state.after_sipi() {
                Some(next) => {
                    outcome.start = Some(sipi.deliver_sipi(vector));
                    self.enter(next, bsp_flag);
                }
                None => outcome.dropped_sipi = true,
            }
        }
        outcome
    }

    /// The vCPU executed HLT (or the VMM emulates one). Runnable → Halted; ignored otherwise.
    /// The latch is untouched: a latched INIT is accepted at the next step.
    pub fn halt(&mut self) {
        self.enter(self.state.after_halt(), self.bsp);
    }

    /// The guest requested AP Reset Hold (seed 004). Runnable → ApResetHold; ignored otherwise.
    pub fn ap_reset_hold(&mut self) {
        self.enter(self.state.after_ap_reset_hold(), self.bsp);
    }

    /// An interrupt, NMI or SMI became deliverable. Halted → Runnable; every other state ignores
    /// it (see [`MpState::is_woken_by`]).
    pub fn wake(&mut self) {
        self.enter(self.state.after_wake(), self.bsp);
    }

    /// KVM_SET_MP_STATE semantics (x86.c `kvm_arch_vcpu_ioctl_set_mpstate`), for restore and for
    /// VMMs that drive the state themselves:
    /// * RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, AP_RESET_HOLD set that state as is
    ///   (outside the transition table; the latch is kept);
    /// * SIPI_RECEIVED becomes InitReceived plus a latched SIPI with the last SIPI vector seen
    ///   (seed 000); the next accept step starts the vCPU;
    /// * INIT_RECEIVED and SIPI_RECEIVED are refused while INIT is blocked;
    /// * any other value is refused.
    pub fn set_from_user(
        &mut self,
        mp_state: u32,
        blocking: InitBlocking,
    ) -> Result<(), MpStateError> {
        let (state, latch_sipi) = match mp_state {
            kvm_abi::RUNNABLE => (MpState::Runnable, false),
            kvm_abi::UNINITIALIZED => (MpState::Uninitialized, false),
            kvm_abi::INIT_RECEIVED => (MpState::InitReceived, false),
            kvm_abi::HALTED => (MpState::Halted, false),
            kvm_abi::SIPI_RECEIVED => (MpState::InitReceived, true),
            kvm_abi::AP_RESET_HOLD => (MpState::ApResetHold, false),
            other => return Err(MpStateError::Unsupported(other)),
        };
        if state == MpState::InitReceived && blocking.blocks_init() {
            return Err(MpStateError::InitBlocked);
        }
        self.state = state;
        if latch_sipi {
            self.sipi_latched = Some(self.last_sipi_vector);
        }
        Ok(())
    }

    /// KVM_GET_MP_STATE: the state's ABI value. KVM accepts events before answering; a VMM
    /// wanting the same calls [`accept_events`](Self::accept_events) first.
    pub fn get_for_user(&self) -> u32 {
        self.state.to_kvm()
    }

    /// Moves to `next`; `bsp` is the BSP flag the transition was decided by.
    fn enter(&mut self, next: MpState, bsp: bool) {
        debug_assert!(
            MpState::transition_allowed(self.state, next, bsp),
            "illegal MP state transition {:?} -> {next:?}",
            self.state
        );
        self.state = next;
    }
}
