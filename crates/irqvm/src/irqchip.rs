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
//!     exit: chip.handle_exit(&mut ChipExit)        -> Handled | NotMine (then devices)
//!     chip.after_exit(vcpu)
//! }
//! ```
//!
//! Three backends are planned; `kernel` and `user` exist:
//!
//! * `kernel`: KVM's in-kernel PIC, IOAPIC and LAPICs (KVM_CREATE_IRQCHIP). Device lines go to
//!   KVM_IRQ_LINE; KVM runs INIT/SIPI itself (APs sit in KVM_MP_STATE_UNINITIALIZED inside
//!   KVM_RUN until their SIPI) and blocks halted vCPUs inside KVM_RUN, so `before_entry` always
//!   says `Enter` and no exit is the chip's.
//! * `user` ([`crate::userchip`]): every controller in userspace, from the pure `irqchip` crate. Its
//!   `handle_exit` takes xAPIC MMIO at the vCPU's APIC base (relocatable through IA32_APIC_BASE),
//!   x2APIC MSRs 0x800-0x8FF (KVM_CAP_X86_USER_SPACE_MSR, exit reason INVAL), the TSC-deadline
//!   MSR 0x6E0 (MSR filter deny range, reason FILTER), IOAPIC MMIO at 0xFEC00000, HLT (the vCPU
//!   becomes halted: `before_entry` then returns `Block` until an interrupt is pending) and
//!   IRQ-window-open exits. Its `before_entry` drains the vCPU's posting inbox, applies INIT
//!   (architectural reset) and SIPI (real mode at the vector) through KVM_SET_REGS/SREGS, keeps
//!   an AP that has not had its SIPI out of KVM_RUN (`Block { WaitForSipi }`), syncs CR8 with the
//!   TPR, and injects with KVM_INTERRUPT / KVM_NMI only when `ready_for_interrupt_injection` and
//!   IF allow it, else sets `request_interrupt_window`. Its `block` waits on the inbox's doorbell
//!   (a condvar latch from `irqchip::posting`) with the APIC timer deadline as the timeout; its
//!   `wake_vcpu` rings that doorbell, and posters that get `Notify::Kick` call the vCPU's
//!   [`crate::vcpu::kick::KickTarget`] (from [`ChipContext::vcpus`]). Its VM-wide setup
//!   (KVM_CAP_X86_USER_SPACE_MSR, the MSR filter) happens in its constructor.
//! * `split` ([`split`]): LAPICs in KVM (KVM_CAP_SPLIT_IRQCHIP), IOAPIC and PIC in userspace; its
//!   `handle_exit` takes IOAPIC MMIO, the PIC's ports and KVM_EXIT_IOAPIC_EOI, and its
//!   `before_entry` injects the PIC's ExtINT (KVM_INTERRUPT or an interrupt window).

use std::sync::Arc;
use std::time::Instant;

use irqchip::msi::{MsiError, MsiMessage};
use kvm_bindings::{kvm_mp_state, kvm_msi, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::kvm::KvmError;
use crate::vcpu::VcpuShared;

pub mod split;

/// Number of ISA / IOAPIC input lines a device can drive (GSIs 0-23).
pub const IRQ_LINES: u32 = 24;

/// The interrupt-controller implementations. Only modes that work are listed: the CLI offers
/// exactly these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IrqchipMode {
    /// KVM's in-kernel PIC, IOAPIC and local APICs.
    #[default]
    Kernel,
    /// Every interrupt controller in userspace (the `irqchip` crate); see [`crate::userchip`].
    User,
    /// Local APICs in KVM, IOAPIC and PIC in userspace; see [`split`].
    Split,
}

/// Errors from an interrupt-controller backend.
#[derive(Debug, thiserror::Error)]
pub enum IrqchipError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("user irqchip: {0}")]
    User(String),
    #[error("interrupt line {0} does not exist (lines are 0-{max})", max = IRQ_LINES - 1)]
    NoSuchLine(u32),
    /// A message-signalled interrupt that is not one (address outside 0xFEExxxxx, a reserved
    /// delivery mode): hardware drops such a write, so nothing reaches the guest.
    #[error("malformed MSI (address {address:#x}, data {data:#x}): {reason}")]
    InvalidMsi {
        address: u64,
        data: u32,
        reason: MsiError,
    },
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

/// KVM_SIGNAL_MSI of a validated message (`kernel` and `split` mode). KVM returns the number of
/// LAPICs that accepted it: > 0 delivered, 0 no target or blocked.
pub(crate) fn kvm_signal_msi(vm: &VmFd, msi: MsiMessage) -> Result<MsiDelivery, IrqchipError> {
    let request = kvm_msi {
        address_lo: msi.address as u32,
        address_hi: (msi.address >> 32) as u32,
        data: msi.data,
        ..Default::default()
    };
    match vm.signal_msi(request) {
        Ok(0) => Ok(MsiDelivery::NoTarget),
        Ok(_) => Ok(MsiDelivery::Delivered),
        Err(e) => Err(KvmError::ioctl("KVM_SIGNAL_MSI")(e).into()),
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

/// CPUID features whose presence depends on the interrupt controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChipFeatures {
    /// x2APIC mode can be enabled (CPUID.1:ECX bit 21).
    pub x2apic: bool,
    /// The LAPIC timer supports TSC-deadline mode (CPUID.1:ECX bit 24).
    pub tsc_deadline: bool,
}

/// Why a vCPU stays out of KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// The vCPU executed HLT and has no deliverable interrupt.
    Halted,
    /// An AP after power-on or INIT, waiting for its start-up IPI.
    WaitForSipi,
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

    /// The APIC features CPUID may advertise with this backend.
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
}

/// KVM_GET_MP_STATE of a vCPU whose LAPIC is KVM's (`kernel` and `split` mode).
pub(crate) fn kvm_mp_state(vcpu: &VcpuFd) -> Result<u32, IrqchipError> {
    let state = vcpu
        .get_mp_state()
        .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?;
    Ok(state.mp_state)
}

/// What a backend gets when it is created, before any vCPU exists.
pub struct ChipContext<'a> {
    pub kvm: &'a Kvm,
    pub vm: Arc<VmFd>,
    /// The vCPUs-to-be, index = vCPU index (0 = BSP): their kick targets, states and stats.
    /// A userspace backend kicks a vCPU through `vcpus[i].kick` when posting returns
    /// `Notify::Kick`.
    pub vcpus: Vec<Arc<VcpuShared>>,
    /// Time zero of the VM: the backend converts `Instant`s to `irqchip::Nanos` from here.
    pub epoch: Instant,
}

/// Creates the backend for `mode` on a VM that has no vCPUs yet.
pub fn create_irqchip(
    mode: IrqchipMode,
    ctx: ChipContext<'_>,
) -> Result<Arc<dyn Irqchip>, IrqchipError> {
    match mode {
        IrqchipMode::Kernel => Ok(Arc::new(KernelIrqchip::new(ctx.kvm, ctx.vm)?)),
        IrqchipMode::User => Ok(Arc::new(crate::userchip::UserIrqchip::new(ctx)?)),
        IrqchipMode::Split => Ok(Arc::new(split::SplitIrqchip::new(ctx)?)),
    }
}

/// `kernel` mode: KVM's own PIC, IOAPIC and LAPICs.
pub struct KernelIrqchip {
    vm: Arc<VmFd>,
    features: ChipFeatures,
}

impl KernelIrqchip {
    /// KVM_CREATE_IRQCHIP (before any vCPU exists). No PIT: timers come from the LAPIC in every
    /// mode.
    pub fn new(kvm: &Kvm, vm: Arc<VmFd>) -> Result<Self, IrqchipError> {
        crate::kvm::require_cap(kvm, Cap::Irqchip, "KVM_CAP_IRQCHIP")?;
        vm.create_irq_chip()
            .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let features = ChipFeatures {
            x2apic: true,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        Ok(Self { vm, features })
    }
}

impl InterruptLines for KernelIrqchip {
    /// KVM_IRQ_LINE: KVM's default routing sends line n to PIC input n and IOAPIC pin n (line 0
    /// to IOAPIC pin 2, as on a PC).
    fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError> {
        if line >= IRQ_LINES {
            return Err(IrqchipError::NoSuchLine(line));
        }
        self.vm
            .set_irq_line(line, level)
            .map_err(KvmError::ioctl("KVM_IRQ_LINE"))?;
        Ok(())
    }

    /// KVM_SIGNAL_MSI to KVM's LAPICs (validated first).
    fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError> {
        kvm_signal_msi(&self.vm, validate_msi(address, data)?)
    }
}

/// Where KVM runs INIT/SIPI (`kernel` and `split` modes): the BSP (vCPU 0) RUNNABLE and every AP
/// UNINITIALIZED, set explicitly so the start state does not depend on KVM's default. An
/// UNINITIALIZED AP blocks inside KVM_RUN until KVM's LAPIC takes INIT and SIPI.
pub(crate) fn set_initial_kvm_mp_state(index: usize, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
    let mp_state = if index == 0 {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
    Ok(())
}

impl Irqchip for KernelIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::Kernel
    }

    fn features(&self) -> ChipFeatures {
        self.features
    }

    /// KVM runs INIT/SIPI: see `set_initial_kvm_mp_state`.
    fn create_vcpu_chip(
        &self,
        index: usize,
        vcpu: &VcpuFd,
    ) -> Result<Box<dyn VcpuIrqchip>, IrqchipError> {
        set_initial_kvm_mp_state(index, vcpu)?;
        Ok(Box::new(KernelVcpuChip))
    }

    /// Nothing to do: a kernel-mode vCPU blocks inside KVM_RUN, which the kick interrupts.
    fn wake_vcpu(&self, _index: usize) {}
}

/// The per-vCPU half of `kernel` mode: KVM does everything.
struct KernelVcpuChip;

impl VcpuIrqchip for KernelVcpuChip {
    fn before_entry(&mut self, _vcpu: &mut VcpuFd) -> Result<EntryDecision, IrqchipError> {
        Ok(EntryDecision::Enter)
    }

    fn after_exit(&mut self, _vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        Ok(())
    }

    fn handle_exit(&mut self, _exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError> {
        Ok(ExitHandled::NotMine)
    }

    /// Never called: `before_entry` always says `Enter`.
    fn block(&mut self, _deadline: Option<Instant>) {}

    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError> {
        kvm_mp_state(vcpu)
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
