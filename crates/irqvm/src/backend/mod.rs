//! The one interface the VMM uses for interrupt controllers.
//!
//! A backend is chosen per VM ([`IrqchipMode`]) and comes in two halves:
//!
//! * [`Irqchip`], shared by every thread (`Arc<dyn Irqchip>`): device interrupt lines and MSIs
//!   ([`InterruptLines`]), the CPUID features the chip supports, creation of the per-vCPU half,
//!   and waking a blocked vCPU.
//! * [`VcpuIrqchip`], owned by one vCPU thread and called only from it, without locks: the hooks
//!   around `KVM_RUN` where interrupts are injected and interrupt-controller exits handled.
//!
//! The vCPU loop (`crate::vcpu`) drives a backend like this:
//!
//! ```text
//! loop {
//!     stop requested?                              -> leave
//!     chip.before_entry(vcpu)                      -> Enter | Block { reason, deadline }
//!         Block: chip.block(deadline); continue     (thread sleeps, no KVM_RUN)
//!     KVM_RUN
//!     exit: chip.handle_exit(&mut ChipExit)        -> Handled | NotMine (then the I/O bus)
//!     chip.after_exit(vcpu)
//! }
//! ```
//!
//! The three backends sit side by side, each in its own module, and depend on this interface
//! only (the factory that picks one is `crate::vm`'s):
//!
//! * [`kernel`]: KVM's in-kernel PIC, IOAPIC and LAPICs (KVM_CREATE_IRQCHIP). Device lines go to
//!   KVM_IRQ_LINE; KVM runs INIT/SIPI itself (APs sit in KVM_MP_STATE_UNINITIALIZED inside
//!   KVM_RUN until their SIPI) and blocks halted vCPUs inside KVM_RUN, so `before_entry` always
//!   says `Enter` and no exit is the chip's.
//! * [`user`]: every controller in userspace, from the pure `irqchip` crate. Its
//!   `handle_exit` takes xAPIC MMIO at the vCPU's APIC base (relocatable through IA32_APIC_BASE),
//!   x2APIC MSRs 0x800-0x8FF (KVM_CAP_X86_USER_SPACE_MSR, exit reason INVAL), the TSC-deadline
//!   MSR 0x6E0 and writes of IA32_APIC_BASE and MSR_KVM_PV_EOI_EN (MSR filter, reason FILTER; with `--protected-state-aps` also the GHCB
//!   MSR 0xC0010130, whose AP Reset Hold request parks an AP), IOAPIC MMIO at 0xFEC00000, the PIC's
//!   ports, HLT (the vCPU becomes halted: `before_entry` then returns `Block` until an interrupt
//!   is pending) and IRQ-window-open exits. Its `before_entry` drains the vCPU's posting inbox,
//!   applies INIT (architectural reset, through KVM_SET_REGS/SREGS) and SIPI (real mode at the
//!   vector, through `kvm_run`'s synced registers where it can), keeps an AP that has not had its
//!   SIPI out of KVM_RUN (`Block { WaitForSipi }`), syncs CR8 with the TPR, and injects (an
//!   interrupt through `kvm_run`'s synced events, or KVM_INTERRUPT where those are stale; NMIs
//!   with KVM_NMI) only when `ready_for_interrupt_injection` and IF allow it, else sets
//!   `request_interrupt_window` (and, with exact interrupt boundaries, steps towards the
//!   boundary: [`step`]). Its `block` polls the inbox briefly (and up to an imminent APIC timer
//!   deadline), then sleeps on the vCPU's doorbell (`irqchip::wake`'s shared doorbells on a
//!   futex word per 32 vCPUs) until something rings it (a post) or until its APIC timer's
//!   deadline, when the POSIX timer of its own thread signals it; its `wake_vcpu` rings that
//!   doorbell, and posters that get `Notify::Kick` call [`VcpuKicker::kick`] (from
//!   [`ChipContext::kicker`]). Its VM-wide setup (KVM_CAP_X86_USER_SPACE_MSR, the MSR filter)
//!   happens in its constructor.
//! * [`split`]: LAPICs in KVM (KVM_CAP_SPLIT_IRQCHIP), IOAPIC and PIC in userspace (the same
//!   `irqchip::chip::PcIrqChip` as `user`, whose messages go to KVM_SIGNAL_MSI); its
//!   `handle_exit` takes IOAPIC MMIO, the PIC's ports, KVM_EXIT_IOAPIC_EOI and its stepper's
//!   exits, and its `before_entry` injects the PIC's ExtINT (KVM_INTERRUPT or an interrupt window,
//!   with exact interrupt boundaries a step towards the boundary).
//!
//! A backend reaches the vCPU threads only through a [`VcpuKicker`] (force vCPU `i` out of
//! KVM_RUN), never through the vCPU thread module: like OpenVMM's `ApicClient`, the chip gets a
//! narrow handle, not the vCPU objects.

use std::sync::Arc;
use std::time::Instant;

use irqchip::msi::{MsiError, MsiMessage};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::api::model::{LapicInfo, PendingInfo, PlatformInfo};
use crate::kvm::KvmError;

mod eoi_probe;
pub mod epilogue;
pub mod kernel;
mod kvm_timer;
pub mod split;
pub mod step;
pub mod stretch;
pub mod user;

/// Number of ISA / IOAPIC input lines a device can drive (GSIs 0-23).
pub const IRQ_LINES: u32 = 24;

pub use crate::mode::IrqchipMode;

/// Errors from an interrupt-controller backend.
#[derive(Debug, thiserror::Error)]
pub enum IrqchipError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// `user` mode: the kernel refused a vCPU thread the POSIX timer that runs its APIC timer
    /// (timer_create: RLIMIT_SIGPENDING or memory).
    #[error(
        "user irqchip: vCPU {vcpu}: cannot create the POSIX timer of its APIC timer: {source}"
    )]
    ApicTimer {
        vcpu: usize,
        #[source]
        source: std::io::Error,
    },
    /// `create_vcpu_chip` was called twice for one vCPU (or for an index the chip was not built
    /// for).
    #[error("irqchip: vCPU {0} created twice, or not one of this VM's")]
    VcpuCreatedTwice(usize),
    /// `user` mode applies INIT itself: only the state after INIT can be loaded (KVM_CREATE_VCPU
    /// did the power-up, and there is no RESET).
    #[error("user irqchip: only the state after INIT can be applied, not a power-up state")]
    NotInitState,
    /// `user` mode's INIT could not clear an MSR INIT clears (the guest set it).
    #[error("user irqchip: INIT cannot clear {name} ({index:#x}): {source}")]
    InitMsr {
        name: &'static str,
        index: u32,
        #[source]
        source: KvmError,
    },
    /// A host request named a vCPU the VM does not have.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    #[error("interrupt line {0} does not exist (lines are 0-{max})", max = IRQ_LINES - 1)]
    NoSuchLine(u32),
    /// `--protected-state-aps` asked of a mode whose INIT and SIPI are KVM's: KVM writes an AP's
    /// registers at INIT and SIPI, and without SEV-ES nothing tells it not to.
    #[error(
        "--protected-state-aps needs the user irqchip: in {0:?} mode KVM's local APICs run INIT \
         and SIPI and write the AP's registers (this host has no SEV-ES)"
    )]
    ProtectedStateUnsupported(IrqchipMode),
    /// A message-signalled interrupt that is not one (address outside 0xFEExxxxx, a reserved
    /// delivery mode): hardware drops such a write, so nothing reaches the guest.
    #[error("malformed MSI (address {address:#x}, data {data:#x}): {reason}")]
    InvalidMsi {
        address: u64,
        data: u32,
        reason: MsiError,
    },
    /// A snapshot's interrupt state was refused by the model's checks.
    #[error("snapshot: {0}")]
    Snapshot(#[from] irqchip::snapshot::SnapshotError),
    /// A snapshot's interrupt state has no form in KVM's (or KVM's none in the model's).
    #[error("snapshot conversion: {0}")]
    Convert(#[from] crate::snapshot::convert::ConvertError),
}

/// One vCPU's interrupt state in the `irqchip` model's format, whatever the mode (snapshots;
/// docs/architecture.md, "Snapshots").
#[derive(Clone, Debug)]
pub struct VcpuFabric {
    /// Local APIC (timer as time left), MP state with latched INIT/SIPI, pending NMI/SMI.
    pub model: irqchip::snapshot::VcpuSnapshot,
    /// KVM_GET_VCPU_EVENTS with the model's parts cleared (what stays with the processor).
    pub cpu_events: kvm_bindings::kvm_vcpu_events,
}

/// The VM-wide interrupt state in the model's format.
#[derive(Clone, Debug)]
pub struct PlatformFabric {
    /// PICs, IOAPIC, routing with every line's level.
    pub devices: irqchip::snapshot::DeviceSnapshot,
    /// The APIC bus's lowest-priority round-robin position.
    pub lowest_priority_turn: u32,
}

/// What became of a well-formed MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiDelivery {
    /// At least one local APIC accepted the message.
    Delivered,
    /// No local APIC took it (no APIC with that destination, or every target disabled): as on
    /// hardware, the message is lost.
    NoTarget,
}

/// Checks that `address`/`data` form an interrupt message the guest's APICs can take (SDM vol. 3
/// §11.11: address 0xFEExxxxx, bits 63:32 zero, no reserved delivery mode). KVM does not check
/// (it reads the fields of any address and logs reserved delivery modes), so every backend
/// validates here first, and all three refuse the same messages.
pub fn validate_msi(address: u64, data: u32) -> Result<MsiMessage, IrqchipError> {
    let msi = MsiMessage { address, data };
    match msi.decode() {
        Ok(_) => Ok(msi),
        Err(reason) => Err(IrqchipError::InvalidMsi {
            address,
            data,
            reason,
        }),
    }
}

/// Device interrupt lines (ISA IRQs / IOAPIC pins) and message-signalled interrupts. Devices
/// (and host threads, through `RunningVm`) hold an `Arc<dyn InterruptLines>` and call it from
/// any thread.
pub trait InterruptLines: Send + Sync {
    /// Drives `line` (0-23) to `level` (true = asserted). Edge-triggered inputs see a rising
    /// edge when the line goes from low to high.
    fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError>;

    /// A rising then falling edge: how an edge-triggered ISA device signals an interrupt.
    fn pulse_line(&self, line: u32) -> Result<(), IrqchipError> {
        self.set_line(line, true)?;
        self.set_line(line, false)
    }

    /// A message-signalled interrupt: the 32-bit `data` written to `address` (SDM vol. 3
    /// §11.11), as a PCI device's MSI/MSI-X or a host thread sends it. A malformed message
    /// (address outside 0xFEE00000-0xFEEFFFFF, reserved delivery mode) is refused with
    /// [`IrqchipError::InvalidMsi`] and reaches no vCPU. `user` mode decodes it and posts it on
    /// its APIC bus (kicking or waking the target); `split` and `kernel` hand it to KVM's LAPICs
    /// with KVM_SIGNAL_MSI.
    fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError>;
}

/// An event the host raises at one vCPU (the control API's injection), as a local APIC would
/// receive it from the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostEvent {
    Nmi,
    Init,
    /// Start-up IPI with this vector (the AP starts at vector << 12).
    Sipi(u8),
}

impl HostEvent {
    /// The delivery mode (SDM vol. 3 §11.6.1: 100b NMI, 101b INIT, 110b start-up).
    pub fn delivery_mode(self) -> u32 {
        match self {
            Self::Nmi => 4,
            Self::Init => 5,
            Self::Sipi(_) => 6,
        }
    }

    /// The message's vector field (only start-up uses it).
    pub fn vector(self) -> u8 {
        match self {
            Self::Sipi(v) => v,
            Self::Nmi | Self::Init => 0,
        }
    }
}

/// CPUID features whose presence depends on the interrupt controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChipFeatures {
    /// x2APIC mode can be enabled (CPUID.1:ECX bit 21).
    pub x2apic: bool,
    /// The LAPIC timer supports TSC-deadline mode (CPUID.1:ECX bit 24).
    pub tsc_deadline: bool,
}

impl From<&crate::cpumodel::CpuModel> for ChipFeatures {
    fn from(cpu: &crate::cpumodel::CpuModel) -> Self {
        Self {
            x2apic: cpu.x2apic,
            tsc_deadline: cpu.tsc_deadline,
        }
    }
}

/// Why a vCPU stays out of KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The vCPU executed HLT and has no deliverable interrupt.
    Halted,
    /// An AP after power-on or INIT, waiting for its start-up IPI.
    WaitForSipi,
    /// A protected-state AP parked by its AP Reset Hold request (seed 004), until INIT-SIPI.
    ApResetHold,
}

/// What the vCPU loop does next, decided by [`VcpuIrqchip::before_entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryDecision {
    /// Run the guest (KVM_RUN).
    Enter,
    /// Do not enter: call [`VcpuIrqchip::block`] with this deadline (the next timer expiry, if
    /// any), then ask again.
    Block {
        reason: BlockReason,
        deadline: Option<Instant>,
    },
}

/// The KVM exits a backend may claim. Read exits carry the buffer the answer goes into.
#[derive(Debug)]
pub enum ChipExit<'a> {
    /// A guest `in` (the PIC's ports in `user` mode).
    PioRead {
        port: u16,
        data: &'a mut [u8],
    },
    /// A guest `out`.
    PioWrite {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// RDMSR that exited to userspace (`reason` is KVM_MSR_EXIT_REASON_*). Set `*error = 1` to
    /// make the guest take #GP.
    RdMsr {
        index: u32,
        reason: u32,
        data: &'a mut u64,
        error: &'a mut u8,
    },
    /// WRMSR that exited to userspace. Set `*error = 1` to make the guest take #GP.
    WrMsr {
        index: u32,
        reason: u32,
        data: u64,
        error: &'a mut u8,
    },
    /// HLT (only without an in-kernel LAPIC).
    Hlt,
    /// KVM_EXIT_IRQ_WINDOW_OPEN after `request_interrupt_window`.
    IrqWindowOpen,
    /// KVM_EXIT_DEBUG: one instruction ran while the backend single-steps the guest towards an
    /// interrupt boundary ([`step`]); `kvm_run`'s flags are fresh.
    SingleStep,
    /// KVM_EXIT_IOAPIC_EOI (split mode): the guest's EOI of a level-triggered vector.
    IoapicEoi {
        vector: u8,
    },
}

/// Whether a backend took an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitHandled {
    /// Handled (read data filled in where there is any).
    Handled,
    /// Not the chip's: the VMM's devices (or its default) handle it.
    NotMine,
}

/// The VM-wide half of an interrupt-controller backend. See the module documentation.
pub trait Irqchip: InterruptLines {
    fn mode(&self) -> IrqchipMode;

    /// The APIC features CPUID advertises with this backend: those of the VM's
    /// [`crate::cpumodel::CpuModel`], which was checked against the mode before the backend was
    /// created.
    fn features(&self) -> ChipFeatures;

    /// Called right after KVM_CREATE_VCPU for vCPU `index` (0 = BSP), before its registers are
    /// set: per-vCPU KVM setup (MP state, LAPIC state, MSR exits), returning the half that moves
    /// to the vCPU's thread.
    fn create_vcpu_chip(
        &self,
        index: usize,
        vcpu: &VcpuFd,
    ) -> Result<Box<dyn VcpuIrqchip>, IrqchipError>;

    /// Makes [`VcpuIrqchip::block`] of vCPU `index` return (the VMM calls it after setting the
    /// stop flag; the backend's own posters use it for interrupts to halted vCPUs). Must latch:
    /// a wake that comes before `block` is called makes that `block` return at once.
    fn wake_vcpu(&self, index: usize);

    /// The PICs, the IOAPIC and the GSI routing now (the control API).
    fn platform_info(&self) -> Result<PlatformInfo, IrqchipError>;

    /// Raises `event` at vCPU `index` from the host (the control API), as the APIC bus would
    /// deliver it to that vCPU's local APIC; says whether the LAPIC took it.
    fn send_event(&self, index: usize, event: HostEvent) -> Result<MsiDelivery, IrqchipError>;

    /// The backend's own counters (relaxed loads) by name: `out(None, ..)` for the VM-wide
    /// ones, `out(Some(i), ..)` for vCPU `i`'s.
    fn counters(&self, out: &mut dyn FnMut(Option<usize>, &str, u64)) {
        let _ = out;
    }

    /// The PICs, IOAPIC and routing in the model's format, with the VM paused (snapshots).
    fn save_platform(&self) -> Result<PlatformFabric, IrqchipError>;

    /// Installs a (checked) platform state, before any vCPU runs and after every vCPU's local
    /// APIC is restored (KVM_SET_IRQCHIP re-delivers asserted level pins).
    fn restore_platform(&self, platform: &PlatformFabric) -> Result<(), IrqchipError>;
}

/// The per-vCPU half of a backend, owned by (and only called from) that vCPU's thread.
pub trait VcpuIrqchip: Send {
    /// Before every KVM_RUN: apply pending INIT/SIPI, inject what can be injected (or request an
    /// interrupt window), sync CR8; say whether to enter or block.
    fn before_entry(&mut self, vcpu: &mut VcpuFd) -> Result<EntryDecision, IrqchipError>;

    /// After every KVM_RUN return, including EINTR returns: read back what the guest changed
    /// (CR8/TPR, whether an injected interrupt was taken).
    fn after_exit(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError>;

    /// Offers an exit to the chip.
    fn handle_exit(&mut self, exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError>;

    /// Sleeps until the vCPU may have become runnable, `deadline` passes or
    /// [`Irqchip::wake_vcpu`] is called. Spurious returns are allowed; busy-waiting is not.
    fn block(&mut self, deadline: Option<Instant>);

    /// The vCPU's multiprocessor state as KVM_GET_MP_STATE reports it (a `KVM_MP_STATE_*`
    /// value), after accepting a pending INIT or SIPI as KVM does before it answers: KVM's own
    /// in `kernel` and `split` mode, the `irqchip` model's in `user` mode (where KVM's is always
    /// RUNNABLE). Called on the vCPU's thread, outside KVM_RUN, for reports and snapshots.
    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError>;

    /// The vCPU's local APIC and pending events for the control API, on the vCPU's thread
    /// outside KVM_RUN. The default reads KVM's LAPIC (`kernel` and `split` mode).
    fn introspect(&mut self, vcpu: &mut VcpuFd) -> Result<(LapicInfo, PendingInfo), IrqchipError> {
        let lapic = crate::api::lapic::kvm_lapic(vcpu)?;
        let pending = crate::api::lapic::kvm_pending(vcpu, 0)?;
        Ok((lapic, pending))
    }

    /// The vCPU's interrupt state in the model's format (snapshots), on its thread, paused, with
    /// no exit half-handled. `lapic` is the model configuration of this vCPU's local APIC
    /// (clock: KVM's APIC bus and TSC rate; `tsc_at_zero` is filled in here).
    fn save_fabric(
        &mut self,
        vcpu: &mut VcpuFd,
        lapic: irqchip::lapic::LapicConfig,
    ) -> Result<VcpuFabric, IrqchipError>;

    /// Restores the local APIC and the model's state (after the registers, before the MSRs).
    /// `saved_tsc` is the guest TSC at the save. Returns the IA32_TSC_DEADLINE to write after
    /// IA32_TSC when the local APIC is KVM's.
    fn restore_apic(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
        saved_tsc: u64,
    ) -> Result<Option<u64>, IrqchipError>;

    /// Restores the events and the MP state, last.
    fn restore_events(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
    ) -> Result<(), IrqchipError>;

    /// True while a paused vCPU must enter KVM_RUN once more before it holds: an interrupt
    /// queued with KVM_INTERRUPT may not have entered the guest yet (KVM_GET_VCPU_EVENTS
    /// cannot see it), or KVM may hold back a LAPIC timer expiry (`kvm_timer`).
    fn injection_in_flight(&self) -> bool {
        false
    }

    /// True if the paused vCPU's next KVM_RUN has only to pass through KVM's `vcpu_run` loop
    /// (the held timer's flush, `kvm_timer`), so the vCPU thread runs it with the flush signal
    /// pending and the guest is not entered (`crate::flush_signal`). False while an injection
    /// of irqvm's own must still enter the guest.
    fn flush_without_entry(&self) -> bool {
        false
    }

    /// True if the next KVM_RUN must pass through KVM's `vcpu_run` loop without entering the
    /// guest (run with the flush signal pending, `crate::flush_signal`), outside a pause too:
    /// `split` mode's EOI probe (`eoi_probe`).
    fn run_without_entry(&self) -> bool {
        false
    }

    /// KVM_RUN returned with an exit: the guest ran, so a queued interrupt went in.
    fn guest_ran(&mut self) {}

    /// The vCPU loop wrote the vCPU's registers after the last KVM_RUN return (the SYSCALL
    /// watch, an internal error's recovery, a pause): a copy of them KVM made at that return
    /// (KVM_SYNC_X86_REGS) is stale.
    fn registers_written(&mut self) {}

    /// A pause began (before the vCPU settles and holds); `entered`: KVM_RUN ran since the
    /// vCPU last held (or started), so there may be something to settle.
    fn pause_started(&mut self, _vcpu: &mut VcpuFd, _entered: bool) -> Result<(), IrqchipError> {
        Ok(())
    }

    /// The pause ended; the vCPU goes back to the guest.
    fn pause_ended(&mut self) {}

    /// KVM_RUN returned EINTR while paused; `through_loop` if KVM wrote KVM_EXIT_INTR, so
    /// its `vcpu_run` loop ran (and injected any timer expiry it held back).
    fn interrupted(&mut self, _vcpu: &mut VcpuFd, _through_loop: bool) -> Result<(), IrqchipError> {
        Ok(())
    }
}

/// `kernel` and `split` mode: a host event as an MSI to KVM's LAPICs, physical destination =
/// the vCPU's initial APIC ID (`cpu.apic_id(index)`, its index without a `--topology`), in
/// KVM's 32-bit form (`address_hi[31:8]` holds bits 31:8; they are 0, and KVM needs them, only
/// where 32-bit IDs are on, `kernel::KvmApicIds`). KVM_SIGNAL_MSI hands every delivery mode to the
/// same `__apic_accept_irq` an ICR write reaches, so NMI, INIT and start-up all arrive as
/// IPIs would (a start-up MSI is reserved for devices, SDM §11.11.2, which is why this path
/// skips [`validate_msi`]).
pub(crate) fn kvm_send_event(
    vm: &VmFd,
    cpu: &crate::cpumodel::CpuModel,
    index: usize,
    event: HostEvent,
) -> Result<MsiDelivery, IrqchipError> {
    if index >= cpu.cpus as usize {
        return Err(IrqchipError::NoSuchVcpu(index));
    }
    let id = u64::from(cpu.apic_id(index));
    let msi = MsiMessage {
        address: (id & !0xFF) << 32 | 0xFEE0_0000 | (id & 0xFF) << 12,
        data: event.delivery_mode() << 8 | u32::from(event.vector()),
    };
    let delivery = kernel::kvm_signal_msi(vm, msi)?;
    tracing::debug!(index, ?event, ?delivery, "host event sent to KVM's LAPICs");
    Ok(delivery)
}

/// How a backend forces vCPU `index` out of KVM_RUN (seed 001's kick: a signal plus
/// `kvm_run.immediate_exit`, see `crate::kick`). The only handle on the vCPU threads a backend
/// gets; the VMM implements it over its vCPU threads.
pub trait VcpuKicker: Send + Sync {
    /// Number of vCPUs (indices `0..vcpus()`).
    fn vcpus(&self) -> usize;

    /// Kicks vCPU `index` out of KVM_RUN (lock-free; a no-op for an index out of range or a
    /// vCPU whose thread is not in its loop).
    fn kick(&self, index: usize);
}

/// What a backend gets when it is created, before any vCPU exists.
pub struct ChipContext<'a> {
    pub kvm: &'a Kvm,
    pub vm: Arc<VmFd>,
    /// The vCPUs-to-be (index = vCPU index, 0 = BSP), as far as a backend may touch them: a
    /// userspace backend kicks vCPU `i` through it when posting returns `Notify::Kick`.
    pub kicker: Arc<dyn VcpuKicker>,
    /// Time zero of the VM: the backend converts `Instant`s to `irqchip::Nanos` from here.
    pub epoch: Instant,
    /// Whether threads the backend starts run under their seccomp filter (`crate::seccomp`).
    pub seccomp: bool,
    /// `--protected-state-aps` (seed 004, `user` mode only; the factory refuses it for the others).
    pub protected_state_aps: Option<ProtectedStateAps>,
    /// The CPU model: APIC IDs, x2APIC offered, extended destination ID honoured.
    pub cpu: crate::cpumodel::CpuModel,
    /// The VM's flight recorder and latency histograms (`crate::trace`), for the hooks of a
    /// backend that sees interrupts (`user`: all of them; `split`: device lines, the messages it
    /// hands to KVM, the PIC's and KVM's EOI exits).
    pub tracer: Arc<crate::trace::Tracer>,
    /// Guest RAM: the single-stepping backends read the instruction at RIP from it ([`step`]).
    pub memory: crate::memory::GuestRam,
    /// Single-step to exact interrupt boundaries (`VmConfig::exact_irq_boundaries`, [`step`]).
    pub exact_irq_boundaries: bool,
}

/// `--protected-state-aps`: seed 004's protected-state AP boot, emulated in `user` mode for
/// testing (this host has no SEV-ES; nothing is protected). After launch irqvm treats each AP's
/// register state as inaccessible: INIT and SIPI write no register of an AP; the first SIPI runs
/// the AP from its launch state, later ones end an AP Reset Hold, which the AP requests through
/// the GHCB MSR (0xC0010130, GHCBInfo 0x006) and which irqvm answers in that MSR (0x007 with
/// GHCBData 1). See `backend::user` and docs/irqchip-modes.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtectedStateAps {
    /// The APs' launch state (written before the VM starts, the last time irqvm writes an AP's
    /// registers): real mode at `launch_page << 12`, CS = `launch_page << 8`, IP = 0 — where a SIPI
    /// with this vector would start it (SDM vol. 3 §9.4.3).
    pub launch_page: u8,
}

impl Default for ProtectedStateAps {
    /// Launch page 0x08 (0x8000), where the guest test kernels put their AP trampoline.
    fn default() -> Self {
        Self { launch_page: 0x08 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDM vol. 3 §11.11.1: only 0xFEExxxxx (bits 63:32 zero) is an interrupt address.
    #[test]
    fn validate_msi_refuses_addresses_outside_the_interrupt_window() {
        for address in [0, 0xFED0_0000, 0xFEF0_0000, 0x1_FEE0_0000, u64::MAX] {
            assert!(
                matches!(
                    validate_msi(address, 0x41),
                    Err(IrqchipError::InvalidMsi {
                        reason: MsiError::NotInterruptAddress(_),
                        ..
                    })
                ),
                "{address:#x}"
            );
        }
        assert!(validate_msi(0xFEEF_FFFF, 0x41).is_ok());
    }

    /// SDM vol. 3 §11.11.2: delivery modes 011 and 110 (no start-up by MSI) are reserved.
    #[test]
    fn validate_msi_refuses_reserved_delivery_modes() {
        for mode in [3u32, 6] {
            let err = validate_msi(0xFEE0_0000, mode << 8 | 0x41).unwrap_err();
            assert!(
                matches!(
                    err,
                    IrqchipError::InvalidMsi {
                        reason: MsiError::ReservedDeliveryMode(m),
                        ..
                    } if m == mode
                ),
                "{err}"
            );
        }
        for mode in [0u32, 1, 2, 4, 5, 7] {
            assert!(
                validate_msi(0xFEE0_0000, mode << 8 | 0x41).is_ok(),
                "{mode}"
            );
        }
    }
}
