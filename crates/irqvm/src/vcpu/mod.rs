//! One thread per vCPU: the run loop, its state, and how other threads reach it.
//!
//! Each vCPU thread owns its `VcpuFd` and the per-vCPU half of the irqchip backend; other
//! threads reach it only through [`VcpuShared`] (kick, ping, state, statistics) and the
//! VM-wide [`VmControl`] (stop flag and outcome).
//!
//! States ([`VcpuState`]) and transitions, all made by the vCPU thread itself:
//!
//! ```text
//! Created --start--> Running <--> Halted / WaitingForSipi / ApResetHold   (user-mode backends: no KVM_RUN)
//!                      |
//!                      +--> Stopped  (stop requested, guest ended the VM, or an error)
//!   Running / Halted / WaitingForSipi --pause--> Paused --resume--> Running
//! ```
//!
//! A vCPU takes a pause request at the top of its loop, so outside KVM_RUN (the pauser kicks it
//! out); one blocked in a `user`-mode HLT or wait-for-SIPI stays blocked and pauses when it
//! next wakes. While paused it still answers state requests ([`VcpuShared::request_info`]).
//!
//! `Running` means "in or around KVM_RUN". In `kernel` mode a halted vCPU, and an AP waiting for
//! its SIPI, stay `Running` from the VMM's view: KVM blocks them inside KVM_RUN, and a kick
//! brings them out.

pub mod regs;
pub mod report;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use irqchip::mpstate::{kvm_abi, MpState};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::api::model::VcpuInfo;
use crate::backend::{
    BlockReason, ChipExit, EntryDecision, ExitHandled, IrqchipError, VcpuIrqchip,
};
use crate::iobus::IoBus;
use crate::kick::{ImmediateExit, KickTarget};
use report::{emulation_instruction_bytes, GuestState, LastExit};

/// Where a vCPU thread is. See the module documentation for the transitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// Thread not started yet.
    Created = 0,
    /// In or around KVM_RUN.
    Running = 1,
    /// Blocked outside KVM_RUN after HLT (user-mode backends).
    Halted = 2,
    /// Blocked outside KVM_RUN until its SIPI (user-mode backends).
    WaitingForSipi = 3,
    /// Left its loop.
    Stopped = 4,
    /// Held outside KVM_RUN by a pause of the VM.
    Paused = 5,
    /// Blocked outside KVM_RUN in AP Reset Hold until INIT-SIPI (`--protected-state-aps`).
    ApResetHold = 6,
}

impl VcpuState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Created,
            1 => Self::Running,
            2 => Self::Halted,
            3 => Self::WaitingForSipi,
            5 => Self::Paused,
            6 => Self::ApResetHold,
            _ => Self::Stopped,
        }
    }
}

impl VcpuState {
    /// The name the control API uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Halted => "halted",
            Self::WaitingForSipi => "waiting_for_sipi",
            Self::Stopped => "stopped",
            Self::Paused => "paused",
            Self::ApResetHold => "ap_reset_hold",
        }
    }
}

impl From<BlockReason> for VcpuState {
    fn from(r: BlockReason) -> Self {
        match r {
            BlockReason::Halted => Self::Halted,
            BlockReason::WaitForSipi => Self::WaitingForSipi,
            BlockReason::ApResetHold => Self::ApResetHold,
        }
    }
}

/// Counters of one vCPU (relaxed; for reports and tests).
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub kvm_runs: AtomicU64,
    pub eintr_returns: AtomicU64,
    pub pio_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub msr_exits: AtomicU64,
    pub hlt_exits: AtomicU64,
    pub other_exits: AtomicU64,
    pub blocks: AtomicU64,
    /// SYSCALLs from user mode irqvm finished for the host (`emulate::syscall`).
    pub syscalls_completed: AtomicU64,
    /// Hits of the SYSCALL watch's breakpoint (each guest page fault while it is armed).
    pub syscall_watch_hits: AtomicU64,
}

/// A plain copy of [`VcpuStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStatsSnapshot {
    pub kvm_runs: u64,
    pub eintr_returns: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub msr_exits: u64,
    pub hlt_exits: u64,
    pub other_exits: u64,
    pub blocks: u64,
    pub syscalls_completed: u64,
    pub syscall_watch_hits: u64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl VcpuStats {
    pub fn snapshot(&self) -> VcpuStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VcpuStatsSnapshot {
            kvm_runs: get(&self.kvm_runs),
            eintr_returns: get(&self.eintr_returns),
            pio_exits: get(&self.pio_exits),
            mmio_exits: get(&self.mmio_exits),
            msr_exits: get(&self.msr_exits),
            hlt_exits: get(&self.hlt_exits),
            other_exits: get(&self.other_exits),
            blocks: get(&self.blocks),
            syscalls_completed: get(&self.syscalls_completed),
            syscall_watch_hits: get(&self.syscall_watch_hits),
        }
    }
}

/// The multiprocessor state for a `KVM_MP_STATE_*` value KVM_GET_MP_STATE can report on x86
/// (`None` for the others, e.g. SIPI_RECEIVED, which KVM no longer reports).
pub fn mp_state_from_kvm(value: u32) -> Option<MpState> {
    match value {
        kvm_abi::RUNNABLE => Some(MpState::Runnable),
        kvm_abi::UNINITIALIZED => Some(MpState::Uninitialized),
        kvm_abi::INIT_RECEIVED => Some(MpState::InitReceived),
        kvm_abi::HALTED => Some(MpState::Halted),
        kvm_abi::AP_RESET_HOLD => Some(MpState::ApResetHold),
        _ => None,
    }
}

/// The control API's name of an MP state (KVM's names, lower case).
pub fn mp_state_name(state: MpState) -> &'static str {
    match state {
        MpState::Runnable => "runnable",
        MpState::Uninitialized => "uninitialized",
        MpState::InitReceived => "init_received",
        MpState::Halted => "halted",
        MpState::ApResetHold => "ap_reset_hold",
    }
}

/// No MP state recorded yet.
const MP_STATE_UNKNOWN: u32 = u32::MAX;

/// The part of a vCPU other threads can see and use.
#[derive(Debug)]
pub struct VcpuShared {
    pub index: usize,
    pub kick: KickTarget,
    pub stats: VcpuStats,
    state: AtomicU8,
    pings_requested: AtomicU64,
    pings_answered: AtomicU64,
    /// The KVM_GET_MP_STATE value the vCPU thread read last (at a ping, and when it stopped).
    mp_state: AtomicU32,
    info_requested: AtomicU64,
    info_answered: AtomicU64,
    /// The state the vCPU thread read at its latest answered info request. The vCPU thread
    /// locks it only to answer a request, never on its fast path.
    info: Mutex<Option<Result<VcpuInfo, String>>>,
    snapshot_requested: AtomicU64,
    snapshot_answered: AtomicU64,
    /// The state the vCPU thread saved at its latest answered snapshot request (paused only).
    snapshot: Mutex<Option<Result<Box<VcpuSaved>, String>>>,
}

/// One vCPU's part of a snapshot: processor state and interrupt state (model format).
#[derive(Clone, Debug)]
pub struct VcpuSaved {
    pub cpu: crate::snapshot::format::VcpuCpuState,
    pub fabric: crate::backend::VcpuFabric,
}

/// What a vCPU thread needs to save its state: the MSRs to read, what KVM can save beyond them
/// (XCRs, the XSAVE area), the model configuration of every vCPU's local APIC (for converting
/// KVM's).
#[derive(Debug)]
pub struct SnapshotContext {
    pub msrs: Vec<u32>,
    pub caps: crate::snapshot::cpu::CpuCaps,
    pub lapics: Vec<irqchip::lapic::LapicConfig>,
}

impl VcpuShared {
    pub fn new(index: usize) -> Self {
        Self {
            index,
            kick: KickTarget::default(),
            stats: VcpuStats::default(),
            state: AtomicU8::new(VcpuState::Created as u8),
            pings_requested: AtomicU64::new(0),
            pings_answered: AtomicU64::new(0),
            mp_state: AtomicU32::new(MP_STATE_UNKNOWN),
            info_requested: AtomicU64::new(0),
            info_answered: AtomicU64::new(0),
            info: Mutex::new(None),
            snapshot_requested: AtomicU64::new(0),
            snapshot_answered: AtomicU64::new(0),
            snapshot: Mutex::new(None),
        }
    }

    /// Asks the vCPU thread to save its state (answered only while paused, at a safe point).
    /// Returns the request number to wait for with [`Self::snapshot_answered`]; the caller must
    /// also kick, wake and nudge the vCPU.
    pub fn request_snapshot(&self) -> u64 {
        self.snapshot_requested.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The highest snapshot request number the vCPU thread has answered.
    pub fn snapshot_answered(&self) -> u64 {
        self.snapshot_answered.load(Ordering::SeqCst)
    }

    /// Takes the state saved at the latest answered snapshot request.
    pub fn take_snapshot(&self) -> Option<Result<Box<VcpuSaved>, String>> {
        self.snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn snapshot_pending(&self) -> bool {
        self.snapshot_requested.load(Ordering::Acquire)
            != self.snapshot_answered.load(Ordering::Acquire)
    }

    /// Asks the vCPU thread for its state (answered at the top of its loop, or while paused).
    /// Returns the request number to wait for with [`Self::info_answered`]; the caller must
    /// also kick and wake the vCPU.
    pub fn request_info(&self) -> u64 {
        self.info_requested.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The highest info request number the vCPU thread has answered.
    pub fn info_answered(&self) -> u64 {
        self.info_answered.load(Ordering::SeqCst)
    }

    /// The state read at the latest answered request (`Err` with the reason if a read failed).
    pub fn last_info(&self) -> Option<Result<VcpuInfo, String>> {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn info_pending(&self) -> bool {
        self.info_requested.load(Ordering::Acquire) != self.info_answered.load(Ordering::Acquire)
    }

    pub fn state(&self) -> VcpuState {
        VcpuState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, state: VcpuState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Asks the vCPU thread to show it has passed through its loop (a KVM_RUN return, or a
    /// wake-up from blocking) after this call. Returns the ping number to wait for with
    /// [`Self::pings_answered`]. The caller must also kick (and wake) the vCPU.
    pub fn request_ping(&self) -> u64 {
        self.pings_requested.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The highest ping number the vCPU thread has answered.
    pub fn pings_answered(&self) -> u64 {
        self.pings_answered.load(Ordering::SeqCst)
    }

    fn answer_pings(&self) {
        let requested = self.pings_requested.load(Ordering::SeqCst);
        self.pings_answered.store(requested, Ordering::SeqCst);
    }

    fn ping_pending(&self) -> bool {
        self.pings_requested.load(Ordering::SeqCst) != self.pings_answered.load(Ordering::SeqCst)
    }

    /// The MP state the vCPU thread recorded last: when it answered the latest ping (see
    /// [`crate::vm::RunningVm::mp_state`]) or, once [`VcpuState::Stopped`], when it stopped.
    /// `None` before the first record, or if KVM reported a value x86 does not use.
    pub fn mp_state(&self) -> Option<MpState> {
        mp_state_from_kvm(self.mp_state.load(Ordering::SeqCst))
    }

    fn set_mp_state(&self, value: u32) {
        self.mp_state.store(value, Ordering::SeqCst);
    }
}

/// How the guest ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// isa-debug-exit was written; the VMM exits with this status.
    DebugExit { status: i32 },
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// KVM_EXIT_SYSTEM_EVENT of this type (reset, shutdown, crash).
    SystemEvent { kind: u32 },
    /// The host asked the VM to stop.
    Stopped,
}

impl GuestExit {
    /// The process exit status this outcome maps to.
    pub fn exit_status(&self) -> i32 {
        match self {
            Self::DebugExit { status } => *status,
            Self::Shutdown | Self::SystemEvent { .. } | Self::Stopped => 0,
        }
    }
}

/// Errors that end a vCPU (and with it the VM).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// KVM_EXIT_INTERNAL_ERROR: `data` is what KVM put in `kvm_run.internal.data` (for an
    /// emulation failure with instruction bytes, `instruction` holds them).
    #[error(
        "KVM could not emulate the guest's instruction (internal error, suberror {suberror}) at rip {rip:#x}{}",
        fmt_instruction(instruction.as_deref(), data)
    )]
    Internal {
        suberror: u32,
        rip: u64,
        data: Vec<u64>,
        instruction: Option<Vec<u8>>,
    },
    #[error("VM entry failed (hardware reason {0:#x})")]
    FailEntry(u64),
    /// A KVM exit this VMM never asks for (`kvm_run.exit_reason`, a `KVM_EXIT_*` value).
    #[error("unexpected KVM exit (exit reason {reason})")]
    UnexpectedExit { reason: u32 },
    /// KVM_EXIT_HLT, which only a backend with a userspace LAPIC asks for, with a backend that
    /// does not handle it.
    #[error("HLT exit, but the irqchip backend does not handle HLT")]
    UnhandledHlt,
    #[error(transparent)]
    Irqchip(#[from] IrqchipError),
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
    /// The vCPU thread panicked (an irqvm bug), with the panic's message.
    #[error("the vCPU thread panicked (an irqvm bug): {0}")]
    Panicked(String),
}

/// The message of a panic's payload (`panic!` with a literal gives a `&str`, with arguments a
/// `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

fn fmt_instruction(instruction: Option<&[u8]>, data: &[u64]) -> String {
    match instruction {
        Some(bytes) => {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!(", instruction bytes [{}]", hex.join(" "))
        }
        None if data.is_empty() => String::new(),
        None => format!(", data {data:x?}"),
    }
}

/// How a vCPU failed, as the VM's outcome: which vCPU, its error (shared, so that every
/// thread waiting for the outcome gets it), the last exit it handled and its registers then.
#[derive(Clone, Debug, thiserror::Error)]
#[error("vCPU {vcpu} failed: {error} (last exit: {exit})")]
pub struct VcpuFailure {
    pub vcpu: usize,
    #[source]
    pub error: Arc<VcpuError>,
    /// The exit the vCPU was handling (or handled last) when it failed.
    pub exit: LastExit,
    /// The guest's registers at the failure (boxed: errors stay small); `None` if KVM could
    /// not give them.
    pub state: Option<Box<GuestState>>,
}

impl VcpuFailure {
    /// A failure of `vcpu` with no exit and no register state (for failures outside a vCPU
    /// thread's loop, and tests).
    pub fn new(vcpu: usize, error: VcpuError) -> Self {
        Self {
            vcpu,
            error: Arc::new(error),
            exit: LastExit::None,
            state: None,
        }
    }

    /// The full report: the one-line summary, then the register dump.
    pub fn report(&self) -> String {
        match &self.state {
            Some(state) => format!("{self}\n{state}"),
            None => format!("{self}\n  (registers unavailable)"),
        }
    }
}

/// How a VM ended: the guest's (or host's) way out, or the first vCPU failure.
pub type VmOutcome = Result<GuestExit, VcpuFailure>;

/// The VM-wide run control shared by all vCPU threads and the thread waiting for the VM.
#[derive(Debug, Default)]
pub struct VmControl {
    stop: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    finished: Condvar,
    /// A pause is requested: every vCPU holds at the top of its loop until it clears.
    paused: AtomicBool,
    /// What paused vCPUs sleep on. Only the slow paths take it (pause, resume, stop, a state
    /// request to a paused vCPU), each for a notify, never while waiting for anything else.
    pause_lock: Mutex<()>,
    pause_changed: Condvar,
}

impl VmControl {
    /// True once any vCPU or the host has ended the VM.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Records how the VM ended (the first outcome wins) and raises the stop flag. The caller
    /// then kicks and wakes every vCPU.
    pub fn finish(&self, outcome: VmOutcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.finished.notify_all();
        drop(slot);
        self.nudge_paused();
    }

    /// True while a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Requests a pause (false if one was already requested). The caller then kicks every
    /// vCPU out of KVM_RUN.
    pub fn pause(&self) -> bool {
        !self.paused.swap(true, Ordering::SeqCst)
    }

    /// Ends a pause (false if none was requested) and releases the paused vCPUs.
    pub fn resume(&self) -> bool {
        let was = self.paused.swap(false, Ordering::SeqCst);
        self.nudge_paused();
        was
    }

    /// Wakes paused vCPUs to look at their requests (resume, stop, a state request).
    pub fn nudge_paused(&self) {
        let _guard = self.pause_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_changed.notify_all();
    }

    /// A paused vCPU's sleep: until nudged or `limit` passes (a backstop; every change nudges).
    fn wait_paused(&self, limit: Duration) {
        let guard = self.pause_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.pause_requested() && !self.stop_requested() {
            let _ = self.pause_changed.wait_timeout(guard, limit);
        }
    }

    /// Waits for the outcome until `deadline`; `None` if it passed first.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<VmOutcome> {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = slot.as_ref() {
                return Some(outcome.clone());
            }
            match deadline {
                None => slot = self.finished.wait(slot).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    slot = self
                        .finished
                        .wait_timeout(slot, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// What the loop does after an exit.
enum Step {
    Continue,
    Finish(GuestExit),
    /// KVM_EXIT_INTERNAL_ERROR: the details are read from `kvm_run` once the exit is released.
    InternalError,
    /// An exit no one asked for: its reason is read from `kvm_run`.
    Unexpected,
    /// The guest wrote IA32_LSTAR (denied in the MSR filter on hosts that need the SYSCALL
    /// watch): `emulate::syscall` applies it once the exit is released.
    LstarWrite(u64),
    /// KVM_EXIT_DEBUG (the backend saw it as a step): DR6 from the exit, for the SYSCALL watch.
    Debug {
        dr6: u64,
    },
}

/// Everything a vCPU thread owns.
pub(crate) struct VcpuThread {
    pub(crate) fd: VcpuFd,
    pub(crate) chip: Box<dyn VcpuIrqchip>,
    pub(crate) bus: Arc<IoBus>,
    pub(crate) shared: Arc<VcpuShared>,
    pub(crate) control: Arc<VmControl>,
    /// The last exit handled, for the failure report.
    pub(crate) last_exit: LastExit,
    /// The flight recorder: entries, exits and blocks are recorded while it is on.
    pub(crate) tracer: Arc<crate::trace::Tracer>,
    pub(crate) snapshot: Arc<SnapshotContext>,
    /// Finishes the SYSCALLs this host leaves half done (`emulate::syscall`).
    pub(crate) syscall: crate::emulate::syscall::SyscallWatch,
}

impl VcpuThread {
    /// The thread body: registers for kicks, runs the loop, records a failure as the VM's
    /// outcome. Returns when the VM stops.
    pub(crate) fn run(mut self) {
        let shared = self.shared.clone();
        let run = self.fd.get_kvm_run();
        let field = std::ptr::addr_of_mut!(run.immediate_exit);
        // SAFETY: `field` is in the kvm_run mapping owned by `self.fd`, which lives until the end
        // of this function, after the registration below is dropped.
        let immediate_exit = unsafe { ImmediateExit::new(field) };
        let registration = shared.kick.register(immediate_exit);
        crate::trace::set_thread_vcpu(shared.index);
        let flush_armed = match crate::flush_signal::arm(&self.fd) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    vcpu = shared.index,
                    "pause flushes will enter the guest: {e}"
                );
                false
            }
        };
        let result = self
            .syscall
            .resume(&self.fd)
            .map_err(VcpuError::from)
            .and_then(|()| self.run_loop_or_panic(immediate_exit, flush_armed));
        drop(registration);
        // The final MP state, for the run report, before anyone can see Stopped (not after a
        // panic: the backend may be what panicked).
        if !matches!(result, Err(VcpuError::Panicked(_))) {
            self.record_mp_state();
        }
        shared.set_state(VcpuState::Stopped);
        if let Err(e) = result {
            let failure = VcpuFailure {
                vcpu: shared.index,
                error: Arc::new(e),
                exit: self.last_exit,
                state: GuestState::capture(&self.fd).map(Box::new),
            };
            tracing::error!(vcpu = shared.index, "{failure}");
            self.control.finish(Err(failure));
        }
    }

    /// [`Self::run_loop`], with a panic of this thread turned into a failure of the vCPU. A panic
    /// is a bug of irqvm's (nothing a guest does may cause one), but if a guest finds one, the VM
    /// must stop with the failure report (vCPU, last exit, registers) as for any other vCPU
    /// failure, not run on without this vCPU until nothing answers: before this, a vCPU thread's
    /// panic left `irqvm run` waiting forever (issue 10). The panic hook has already printed the
    /// message and place (`seccomp::install_panic_report`, or Rust's own hook).
    fn run_loop_or_panic(
        &mut self,
        immediate_exit: ImmediateExit,
        flush_armed: bool,
    ) -> Result<(), VcpuError> {
        let run = std::panic::AssertUnwindSafe(|| self.run_loop(immediate_exit, flush_armed));
        std::panic::catch_unwind(run)
            .unwrap_or_else(|payload| Err(VcpuError::Panicked(panic_message(payload.as_ref()))))
    }

    fn run_loop(
        &mut self,
        immediate_exit: ImmediateExit,
        flush_armed: bool,
    ) -> Result<(), VcpuError> {
        let shared = self.shared.clone();
        shared.set_state(VcpuState::Running);
        // A pause seen (and told to the backend); KVM_RUN entered since the last hold (a VM
        // started paused has nothing to settle and must not enter the guest).
        let mut pause_seen = false;
        let mut entered = false;
        loop {
            // Clear, then check every request (see `kick`): a kick that set it before this line
            // has its request seen below; one that sets it after makes KVM_RUN return at once.
            immediate_exit.clear();
            if shared.ping_pending() {
                self.record_mp_state();
            }
            shared.answer_pings();
            if shared.info_pending() {
                self.answer_info();
            }
            if self.control.stop_requested() {
                return Ok(());
            }
            // A pause with an interrupt queued by KVM_INTERRUPT that may not have entered the
            // guest yet (invisible to KVM_GET_VCPU_EVENTS), or a LAPIC timer expiry KVM holds
            // back (backend::kvm_timer): KVM_RUN once more, injecting nothing new, so that a
            // snapshot finds it in the guest's state (the timer's flush without entering the
            // guest, `crate::flush_signal`). The pauser kicks again.
            let settling = self.control.pause_requested();
            if settling && !pause_seen {
                pause_seen = true;
                self.chip.pause_started(&mut self.fd, entered)?;
            }
            if settling && !self.chip.injection_in_flight() {
                self.hold_paused();
                self.chip.registers_written();
                pause_seen = false;
                entered = false;
                self.chip.pause_ended();
                continue;
            }
            if !settling {
                if let EntryDecision::Block { reason, deadline } =
                    self.chip.before_entry(&mut self.fd)?
                {
                    shared.set_state(reason.into());
                    bump(&shared.stats.blocks);
                    crate::trace::hooks::block(&self.tracer, shared.index, Some(reason));
                    self.chip.block(deadline);
                    crate::trace::hooks::block(&self.tracer, shared.index, None);
                    continue;
                }
            }
            shared.set_state(VcpuState::Running);
            bump(&shared.stats.kvm_runs);
            crate::trace::hooks::entry(&self.tracer, shared.index);
            // KVM writes KVM_EXIT_INTR only where its loop returns for a signal, never for
            // `immediate_exit`: the sentinel tells the two EINTRs apart (backend::kvm_timer).
            self.fd.get_kvm_run().exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
            // A flush that needs only KVM's loop runs with the flush signal pending, so the
            // guest is not entered (`crate::flush_signal`).
            let loop_only = flush_armed
                && ((settling && self.chip.flush_without_entry()) || self.chip.run_without_entry());
            if loop_only {
                crate::flush_signal::raise();
            }
            let ran = self.fd.run();
            if loop_only {
                crate::flush_signal::take();
            }
            entered = true;
            let exited = crate::trace::hooks::stamp(&self.tracer);
            let step = match ran {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // `immediate_exit` is cleared at the top of the loop, before the checks.
                    self.last_exit = LastExit::Interrupted;
                    bump(&shared.stats.eintr_returns);
                    if settling {
                        let through_loop =
                            self.fd.get_kvm_run().exit_reason == kvm_bindings::KVM_EXIT_INTR;
                        self.chip.interrupted(&mut self.fd, through_loop)?;
                    }
                    Step::Continue
                }
                Err(e) => return Err(VcpuError::Run(e)),
                Ok(exit) => {
                    self.chip.guest_ran();
                    self.last_exit = last_exit(&exit);
                    handle_exit(exit, self.chip.as_mut(), &self.bus, &shared.stats)?
                }
            };
            crate::trace::hooks::exit(&self.tracer, shared.index, exited, &self.last_exit);
            self.chip.after_exit(&mut self.fd)?;
            match step {
                Step::Continue => {}
                Step::Finish(exit) => {
                    tracing::debug!(vcpu = shared.index, ?exit, "guest ended the VM");
                    self.control.finish(Ok(exit));
                    return Ok(());
                }
                Step::LstarWrite(value) => self.lstar_written(value)?,
                Step::Debug { dr6 } => {
                    if self.syscall_watch(dr6)? {
                        self.chip.registers_written();
                    }
                }
                Step::InternalError
                    if crate::emulate::try_recover(&mut self.fd, self.syscall.memory()) =>
                {
                    self.chip.registers_written();
                }
                Step::InternalError => return Err(self.internal_error()),
                Step::Unexpected => {
                    let reason = self.fd.get_kvm_run().exit_reason;
                    return Err(VcpuError::UnexpectedExit { reason });
                }
            }
        }
    }

    /// The guest's WRMSR of IA32_LSTAR, applied by the SYSCALL watch; a value KVM refuses is
    /// #GP, raised the way KVM completes a failed MSR exit.
    fn lstar_written(&mut self, value: u64) -> Result<(), VcpuError> {
        let accepted = self.syscall.lstar_written(&self.fd, value)?;
        if !accepted {
            if let Some(error) = wrmsr_error(&mut self.fd) {
                *error = 1;
            }
        }
        Ok(())
    }

    /// A debug exit for the SYSCALL watch, and its counters. True if it finished a SYSCALL,
    /// which writes the vCPU's registers.
    fn syscall_watch(&mut self, dr6: u64) -> Result<bool, VcpuError> {
        let completed = self.syscall.completed;
        self.syscall.debug_exit(&mut self.fd, dr6)?;
        let stats = &self.shared.stats;
        stats
            .syscalls_completed
            .store(self.syscall.completed, Ordering::Relaxed);
        stats
            .syscall_watch_hits
            .store(self.syscall.hits, Ordering::Relaxed);
        Ok(self.syscall.completed != completed)
    }

    /// Holds the vCPU outside KVM_RUN while the VM is paused, answering state requests.
    fn hold_paused(&mut self) {
        let shared = self.shared.clone();
        shared.set_state(VcpuState::Paused);
        while self.control.pause_requested() && !self.control.stop_requested() {
            if shared.ping_pending() {
                self.record_mp_state();
                shared.answer_pings();
            }
            if shared.info_pending() {
                self.answer_info();
            }
            if shared.snapshot_pending() {
                self.answer_snapshot();
            }
            self.control.wait_paused(Duration::from_millis(50));
        }
        shared.set_state(VcpuState::Running);
    }

    /// Answers the pending state requests: reads everything (the backend's LAPIC view, the MP
    /// state, RIP), stores it, then publishes the request number it answers.
    fn answer_info(&mut self) {
        let requested = self.shared.info_requested.load(Ordering::SeqCst);
        let info = self.read_info().map_err(|e| e.to_string());
        *self.shared.info.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        self.shared.info_answered.store(requested, Ordering::SeqCst);
    }

    /// Answers the pending snapshot requests (paused): completes the last exit, then saves.
    fn answer_snapshot(&mut self) {
        let requested = self.shared.snapshot_requested.load(Ordering::SeqCst);
        let saved = self.save_state().map(Box::new).map_err(|e| e.to_string());
        *self
            .shared
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(saved);
        self.shared
            .snapshot_answered
            .store(requested, Ordering::SeqCst);
    }

    fn save_state(&mut self) -> Result<VcpuSaved, VcpuError> {
        self.complete_pending_exit()?;
        let ctx = self.snapshot.clone();
        let lapic = ctx
            .lapics
            .get(self.shared.index)
            .copied()
            .ok_or(IrqchipError::NoSuchVcpu(self.shared.index))?;
        // The interrupt state first: KVM_GET_MP_STATE accepts a pending INIT or SIPI, which
        // rewrites the registers read next (KVM's local APIC; the model accepts nothing here).
        let fabric = self.chip.save_fabric(&mut self.fd, lapic)?;
        let mut cpu = crate::snapshot::cpu::capture(&self.fd, &ctx.msrs, ctx.caps)
            .map_err(IrqchipError::from)?;
        // The processor's events without the model's parts (NMI/SMI pending, latched INIT),
        // which the interrupt state holds.
        cpu.events = fabric.cpu_events;
        Ok(VcpuSaved { cpu, fabric })
    }

    /// The safe point: KVM completes an exit's operation (an MMIO or port read's data into the
    /// register, an MSR read's, a string instruction's next step) only at the next KVM_RUN, so
    /// KVM_RUN runs with `immediate_exit` set, which completes it and returns EINTR without
    /// entering the guest (KVM's API documentation). A string instruction may exit again: that
    /// exit is handled and the step repeated.
    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        const MAX_STEPS: usize = 4096;
        for _ in 0..MAX_STEPS {
            self.fd.get_kvm_run().immediate_exit = 1;
            let step = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.get_kvm_run().immediate_exit = 0;
                    return Ok(());
                }
                Err(e) => return Err(VcpuError::Run(e)),
                Ok(exit) => {
                    self.last_exit = last_exit(&exit);
                    handle_exit(exit, self.chip.as_mut(), &self.bus, &self.shared.stats)?
                }
            };
            self.chip.after_exit(&mut self.fd)?;
            match step {
                Step::Continue => {}
                Step::LstarWrite(value) => self.lstar_written(value)?,
                Step::Debug { dr6 } => {
                    if self.syscall_watch(dr6)? {
                        self.chip.registers_written();
                    }
                }
                _ => {
                    let reason = self.fd.get_kvm_run().exit_reason;
                    return Err(VcpuError::UnexpectedExit { reason });
                }
            }
        }
        let reason = self.fd.get_kvm_run().exit_reason;
        Err(VcpuError::UnexpectedExit { reason })
    }

    fn read_info(&mut self) -> Result<VcpuInfo, VcpuError> {
        let mp = self.chip.mp_state(&mut self.fd)?;
        self.shared.set_mp_state(mp);
        let (lapic, pending) = self.chip.introspect(&mut self.fd)?;
        let rip = self
            .fd
            .get_regs()
            .map_err(crate::kvm::KvmError::ioctl("KVM_GET_REGS"))
            .map_err(IrqchipError::from)?
            .rip;
        let mp_state = mp_state_from_kvm(mp);
        Ok(VcpuInfo {
            index: self.shared.index,
            thread: self.shared.state().name().into(),
            mp_state: mp_state.map_or("unknown", mp_state_name).into(),
            halted: mp_state == Some(MpState::Halted),
            rip,
            pending,
            lapic,
        })
    }

    /// Reads the MP state through the backend into [`VcpuShared`]; a failure is logged (the
    /// record then keeps its previous value).
    fn record_mp_state(&mut self) {
        match self.chip.mp_state(&mut self.fd) {
            Ok(value) => self.shared.set_mp_state(value),
            Err(e) => {
                crate::warn_ratelimited!(vcpu = self.shared.index, "cannot read the MP state: {e}")
            }
        }
    }

    fn internal_error(&mut self) -> VcpuError {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..ndata].to_vec();
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        VcpuError::Internal {
            suberror: internal.suberror,
            rip,
            instruction: emulation_instruction_bytes(internal.suberror, &data),
            data,
        }
    }
}

/// The `error` field of the last exit if it was KVM_EXIT_X86_WRMSR: 1 makes KVM raise #GP
/// when it completes the WRMSR at the next KVM_RUN.
fn wrmsr_error(fd: &mut VcpuFd) -> Option<&mut u8> {
    let run = fd.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_X86_WRMSR {
        return None;
    }
    // SAFETY: for KVM_EXIT_X86_WRMSR KVM fills the `msr` member of the exit union; `error`
    // is a plain byte.
    Some(unsafe { &mut run.__bindgen_anon_1.msr.error })
}

/// The report's record of `exit`.
fn last_exit(exit: &VcpuExit<'_>) -> LastExit {
    match exit {
        VcpuExit::IoIn(port, data) => LastExit::Pio {
            port: *port,
            size: data.len(),
            write: false,
        },
        VcpuExit::IoOut(port, data) => LastExit::Pio {
            port: *port,
            size: data.len(),
            write: true,
        },
        VcpuExit::MmioRead(addr, data) => LastExit::Mmio {
            addr: *addr,
            size: data.len(),
            write: false,
        },
        VcpuExit::MmioWrite(addr, data) => LastExit::Mmio {
            addr: *addr,
            size: data.len(),
            write: true,
        },
        VcpuExit::X86Rdmsr(msr) => LastExit::Msr {
            index: msr.index,
            write: false,
        },
        VcpuExit::X86Wrmsr(msr) => LastExit::Msr {
            index: msr.index,
            write: true,
        },
        VcpuExit::Hlt => LastExit::Hlt,
        VcpuExit::IrqWindowOpen => LastExit::IrqWindowOpen,
        VcpuExit::IoapicEoi(vector) => LastExit::IoapicEoi { vector: *vector },
        VcpuExit::Intr | VcpuExit::SetTpr => LastExit::IntrOrTpr,
        VcpuExit::Shutdown => LastExit::Shutdown,
        VcpuExit::SystemEvent(..) => LastExit::SystemEvent,
        VcpuExit::InternalError => LastExit::InternalError,
        VcpuExit::FailEntry(..) => LastExit::FailEntry,
        _ => LastExit::Other,
    }
}

/// Dispatches one exit. Every exit a device or the irqchip may answer becomes a [`ChipExit`]
/// and takes one path: the irqchip backend first, then, if it is not the chip's, the bus
/// ([`unclaimed`]). The others end the VM or are only counted.
fn handle_exit(
    exit: VcpuExit<'_>,
    chip: &mut dyn VcpuIrqchip,
    bus: &IoBus,
    stats: &VcpuStats,
) -> Result<Step, VcpuError> {
    #[cfg(test)]
    if let VcpuExit::IoOut(port, _) = &exit {
        tests::panic_if_armed(*port);
    }
    let (counter, mut exit) = match exit {
        VcpuExit::X86Wrmsr(msr) if msr.index == crate::emulate::syscall::MSR_LSTAR => {
            bump(&stats.msr_exits);
            // Done unless the SYSCALL watch finds the value refused (`lstar_written`).
            *msr.error = 0;
            return Ok(Step::LstarWrite(msr.data));
        }
        VcpuExit::Debug(debug) => {
            bump(&stats.other_exits);
            let dr6 = debug.dr6;
            chip.handle_exit(&mut ChipExit::SingleStep)?;
            return Ok(Step::Debug { dr6 });
        }
        VcpuExit::IoIn(port, data) => (&stats.pio_exits, ChipExit::PioRead { port, data }),
        VcpuExit::IoOut(port, data) => (&stats.pio_exits, ChipExit::PioWrite { port, data }),
        VcpuExit::MmioRead(addr, data) => (&stats.mmio_exits, ChipExit::MmioRead { addr, data }),
        VcpuExit::MmioWrite(addr, data) => (&stats.mmio_exits, ChipExit::MmioWrite { addr, data }),
        VcpuExit::X86Rdmsr(msr) => (
            &stats.msr_exits,
            ChipExit::RdMsr {
                index: msr.index,
                reason: msr.reason.bits(),
                data: msr.data,
                error: msr.error,
            },
        ),
        VcpuExit::X86Wrmsr(msr) => (
            &stats.msr_exits,
            ChipExit::WrMsr {
                index: msr.index,
                reason: msr.reason.bits(),
                data: msr.data,
                error: msr.error,
            },
        ),
        VcpuExit::Hlt => (&stats.hlt_exits, ChipExit::Hlt),
        VcpuExit::IrqWindowOpen => (&stats.other_exits, ChipExit::IrqWindowOpen),
        VcpuExit::IoapicEoi(vector) => (&stats.other_exits, ChipExit::IoapicEoi { vector }),
        // The guest lowered CR8 without an in-kernel LAPIC: `after_exit` syncs the TPR.
        VcpuExit::Intr | VcpuExit::SetTpr => {
            bump(&stats.other_exits);
            return Ok(Step::Continue);
        }
        VcpuExit::Shutdown => return Ok(Step::Finish(GuestExit::Shutdown)),
        VcpuExit::SystemEvent(kind, _) => return Ok(Step::Finish(GuestExit::SystemEvent { kind })),
        VcpuExit::InternalError => return Ok(Step::InternalError),
        VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry(reason)),
        other => {
            tracing::debug!(?other, "unexpected KVM exit");
            return Ok(Step::Unexpected);
        }
    };
    bump(counter);
    if chip.handle_exit(&mut exit)? == ExitHandled::NotMine {
        unclaimed(exit, bus)?;
    }
    Ok(Step::Continue)
}

/// An exit the irqchip did not take: port and MMIO accesses go to the bus (which reads all ones
/// and drops writes where no device is); an MSR nobody models is #GP.
fn unclaimed(exit: ChipExit<'_>, bus: &IoBus) -> Result<(), VcpuError> {
    match exit {
        ChipExit::PioRead { port, data } => bus.pio_read(port, data),
        ChipExit::PioWrite { port, data } => bus.pio_write(port, data),
        ChipExit::MmioRead { addr, data } => bus.mmio_read(addr, data),
        ChipExit::MmioWrite { addr, data } => bus.mmio_write(addr, data),
        ChipExit::RdMsr { index, error, .. } => {
            tracing::debug!(index, "RDMSR of an MSR nobody handles: #GP");
            *error = 1;
        }
        ChipExit::WrMsr { index, error, .. } => {
            tracing::debug!(index, "WRMSR of an MSR nobody handles: #GP");
            *error = 1;
        }
        ChipExit::Hlt => return Err(VcpuError::UnhandledHlt),
        // Asked for only by a backend, which handles them: nothing to do.
        ChipExit::IrqWindowOpen | ChipExit::IoapicEoi { .. } | ChipExit::SingleStep => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{CpuMode, RawImage};
    use crate::vm::{Vm, VmConfig, VmError};

    /// A port whose `out` makes the vCPU thread panic, once: a stand-in for a bug of irqvm's
    /// that a guest reaches.
    static PANIC_AT_PORT: Mutex<Option<u16>> = Mutex::new(None);

    pub(super) fn panic_if_armed(port: u16) {
        let mut armed = PANIC_AT_PORT.lock().unwrap_or_else(|p| p.into_inner());
        if *armed == Some(port) {
            *armed = None;
            drop(armed);
            panic!("injected at port {port:#x}");
        }
    }

    /// A panic on a vCPU thread stops the VM with that vCPU's failure report (the panic's
    /// message, the registers) within the run's bound; it used to leave the VM running without
    /// the vCPU, and `irqvm run` waiting forever (issue 10).
    #[test]
    fn a_vcpu_thread_panic_stops_the_vm_with_a_failure_report() {
        // 32-bit flat code: `mov al, 1; out 0x99, al`, then `hlt; jmp back to hlt`.
        let code = [0xB0, 0x01, 0xE6, 0x99, 0xF4, 0xEB, 0xFD];
        let mut cfg = VmConfig::new(code.to_vec(), "panic-at-port");
        cfg.raw = Some(RawImage {
            load_addr: 0x10_0000,
            entry: 0x10_0000,
            mode: CpuMode::Protected32,
        });
        cfg.cpus = 2;
        cfg.irqchip = crate::IrqchipMode::User;
        *PANIC_AT_PORT.lock().unwrap() = Some(0x99);
        let result = Vm::new(&cfg).unwrap().run(Some(Duration::from_secs(20)));
        assert_eq!(*PANIC_AT_PORT.lock().unwrap(), None, "the out never ran");
        let Err(VmError::Vcpu(failure)) = result else {
            panic!("expected a vCPU failure, got {result:?}");
        };
        assert_eq!(failure.vcpu, 0);
        assert!(matches!(*failure.error, VcpuError::Panicked(_)));
        let report = failure.report();
        assert!(report.contains("injected at port 0x99"), "{report}");
        assert!(failure.state.is_some(), "registers captured: {report}");
    }
}
