//! The per-vCPU half of the `user` backend: one `VcpuInterrupts` driven around KVM_RUN.
//!
//! `before_entry`, in this order (seed 001: publish, then drain, then decide):
//! 1. `begin_guest_entry`: mode InGuest, then drain the inbox. From here a post kicks us, so
//!    nothing posted later can be missed: at worst KVM_RUN returns EINTR at once.
//! 2. `accept_events` (seed 000): INIT -> architectural reset of the registers and the MSRs INIT
//!    clears (`reset`), SIPI -> real-mode start. The APIC's own reset happens inside the model.
//! 3. poll the APIC timer with the VM clock; arm the VM timer thread with the next deadline.
//! 4. block? (halted with nothing deliverable, or an AP waiting for SIPI): `end_guest_entry`
//!    first, then `Block`; `block` sleeps on the inbox doorbell (try_block re-checks ON after
//!    publishing Blocked). The timer thread's wake-up ends a block at the timer deadline.
//! 5. inject: NMI with KVM_NMI; ExtINT and APIC vectors with KVM_INTERRUPT only if KVM said
//!    `ready_for_interrupt_injection` and IF=1 at the last exit (then the PIC / APIC is
//!    acknowledged, right before KVM_INTERRUPT); otherwise `request_interrupt_window`.
//! 6. `kvm_run.cr8` = TPR[7:4] (KVM loads it into CR8 on entry without an in-kernel LAPIC).
//!
//! After an exit, CR8 is read back into the TPR before the exit is handled (an MMIO TPR write in
//! the same exit must win over the older CR8), and the mode goes back to OutsideGuest.

use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

use irqchip::mpstate::ArchResetState;
use irqchip::mpstate::{InitBlocking, MpState, StandardSipi};
use irqchip::vcpu::{ApicAccessResult, Injection, VcpuInterrupts};
use irqchip::{GuestFault, Nanos};

use super::platform::{Platform, IOAPIC_BASE, IOAPIC_SIZE};
use super::reset::{apply_init, apply_sipi, write_msr};
use super::{is_apic_msr, Shared, MSR_APIC_BASE};
use crate::irqchip::{
    BlockReason, ChipExit, EntryDecision, ExitHandled, IrqchipError, VcpuIrqchip,
};
use crate::kvm::{inject_interrupt, KvmError};

/// Size of the xAPIC register page.
const APIC_PAGE_SIZE: u64 = 0x1000;

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
        // SAFETY: non-null means it was set from `VcpuFd::get_kvm_run` of the VcpuFd whose KVM_RUN
        // just returned on this thread; the mapping lives as long as that VcpuFd, which outlives
        // the chip's use in the vCPU loop. KVM writes these fields only inside KVM_RUN.
        let run = unsafe { &*self.0 };
        Some((run.cr8, run.if_flag != 0))
    }
}

pub(crate) struct UserVcpuChip {
    interrupts: VcpuInterrupts,
    shared: std::sync::Arc<Shared>,
    signature: u32,
    run: RunPtr,
    /// CR8 was already read back for the current exit (in `handle_exit`).
    cr8_synced: bool,
    /// The guest executed HLT with IF=0: only NMI, SMI, INIT or SIPI end that halt.
    halted_with_if_clear: bool,
    /// The registers were just rewritten (INIT/SIPI): KVM's ready flag and IF are stale.
    regs_rewritten: bool,
    /// The deadline last given to the timer thread.
    armed: Option<Nanos>,
    /// IA32_APIC_BASE as KVM last saw it. KVM derives CPUID.1:EDX[9] (APIC present) from its own
    /// copy, which the MSR filter keeps it from updating: `after_exit` pushes the model's value.
    kvm_apic_base: u64,
}

impl UserVcpuChip {
    pub(crate) fn new(
        interrupts: VcpuInterrupts,
        shared: std::sync::Arc<Shared>,
        signature: u32,
    ) -> Self {
        let kvm_apic_base = interrupts.lapic().apic_base();
        Self {
            kvm_apic_base,
            interrupts,
            shared,
            signature,
            run: RunPtr(std::ptr::null()),
            cr8_synced: false,
            halted_with_if_clear: false,
            regs_rewritten: false,
            armed: None,
        }
    }

    fn platform(&self) -> &Platform {
        &self.shared.platform
    }

    fn accept_init_sipi(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        let outcome = self
            .interrupts
            .accept_events(InitBlocking::NONE, &mut StandardSipi);
        if outcome.reset.is_some() {
            let state = ArchResetState::after_init(self.signature);
            apply_init(vcpu, &state, &self.shared.init_msrs)?;
            self.halted_with_if_clear = false;
            self.regs_rewritten = true;
        }
        if let Some(start) = outcome.start {
            apply_sipi(vcpu, &start)?;
            self.regs_rewritten = true;
        }
        Ok(())
    }

    /// Polls the APIC timer and keeps the timer thread's deadline in step.
    fn run_timer(&mut self, now: Nanos) {
        self.interrupts.poll_timer(now);
        let next = self.interrupts.next_timer_deadline();
        if next != self.armed {
            self.armed = next;
            let index = self.interrupts.index();
            let clock = self.shared.clock;
            self.shared
                .timers
                .arm(index, next.map(|n| clock.to_instant(n)));
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
        let can_inject = {
            let run = vcpu.get_kvm_run();
            run.request_interrupt_window = 0;
            !self.regs_rewritten && run.ready_for_interrupt_injection != 0 && run.if_flag != 0
        };
        let mut next = self.interrupts.next_injection(pic_intr);
        if next == Some(Injection::Nmi) {
            self.interrupts.take_nmi();
            vcpu.nmi().map_err(KvmError::ioctl("KVM_NMI"))?;
            next = self.interrupts.next_injection(pic_intr);
            if next.is_some() {
                // KVM takes the NMI first; the interrupt after the next exit.
                vcpu.get_kvm_run().request_interrupt_window = 1;
                return Ok(());
            }
        }
        let Some(next) = next else {
            return Ok(());
        };
        if !can_inject {
            vcpu.get_kvm_run().request_interrupt_window = 1;
            return Ok(());
        }
        let vector = match next {
            Injection::Nmi => return Ok(()),
            Injection::ExtInt => {
                self.interrupts.take_extint();
                self.platform().pic_acknowledge()
            }
            Injection::Vector(_) => match self.interrupts.acknowledge_interrupt() {
                Some(v) => v,
                None => return Ok(()),
            },
        };
        inject_interrupt(vcpu, vector)?;
        Ok(())
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
    /// that bit from its IA32_APIC_BASE, so a guest write the model accepted is copied there
    /// (KVM_SET_MSRS is host-initiated: the filter does not apply, no transition checks).
    fn sync_kvm_apic_base(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        let base = self.interrupts.lapic().apic_base();
        if base != self.kvm_apic_base {
            write_msr(vcpu, MSR_APIC_BASE, base)?;
            self.kvm_apic_base = base;
        }
        Ok(())
    }

    fn apic_page_offset(&self, addr: u64) -> Option<u64> {
        let base = self.interrupts.lapic().mmio_base()?;
        let offset = addr.checked_sub(base)?;
        (offset < APIC_PAGE_SIZE).then_some(offset)
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
        let result = self
            .interrupts
            .msr_write(index, value, now, &mut |t, how| notifier.notify(t, how));
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
        self.interrupts.begin_guest_entry();
        self.accept_init_sipi(vcpu)?;
        let now = self.shared.clock.now();
        self.run_timer(now);
        let pic_intr = self.platform().pic_intr();
        if self.should_block(pic_intr) {
            self.interrupts.end_guest_entry();
            let reason = match self.interrupts.mp_state() {
                MpState::Halted => BlockReason::Halted,
                _ => BlockReason::WaitForSipi,
            };
            let deadline = self.armed.map(|n| self.shared.clock.to_instant(n));
            return Ok(EntryDecision::Block { reason, deadline });
        }
        self.inject(vcpu, pic_intr)?;
        self.regs_rewritten = false;
        vcpu.get_kvm_run().cr8 = self.interrupts.lapic().cr8();
        Ok(EntryDecision::Enter)
    }

    fn after_exit(&mut self, vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        if !std::mem::take(&mut self.cr8_synced) {
            self.sync_cr8_from_exit();
        }
        self.sync_kvm_apic_base(vcpu)?;
        self.interrupts.end_guest_entry();
        Ok(())
    }

    fn handle_exit(&mut self, exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError> {
        self.sync_cr8_from_exit();
        self.cr8_synced = true;
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
                    let r = self
                        .interrupts
                        .mmio_write(offset, data, now, &mut |t, how| notifier.notify(t, how));
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
            } if is_apic_msr(*index) => self.handle_msr_read(*index, data, error),
            ChipExit::WrMsr {
                index, data, error, ..
            } if is_apic_msr(*index) => self.handle_msr_write(*index, *data, error),
            ChipExit::Hlt => {
                self.halted_with_if_clear = !self.run.cr8_and_if().is_some_and(|(_, i)| i);
                self.interrupts.halt();
            }
            // The next `before_entry` injects: KVM now reports ready with IF=1.
            ChipExit::IrqWindowOpen => {}
            _ => return Ok(ExitHandled::NotMine),
        }
        Ok(ExitHandled::Handled)
    }

    /// Sleeps on the inbox doorbell. The deadline needs no timeout here: the VM timer thread
    /// posts a wake-up when it passes, which rings this doorbell.
    fn block(&mut self, _deadline: Option<Instant>) {
        self.interrupts.block();
    }

    /// The model's state (`MpStateMachine::get_for_user`'s value), after taking what was posted
    /// and accepting INIT/SIPI, as KVM does before it answers KVM_GET_MP_STATE.
    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError> {
        self.interrupts.drain();
        self.accept_init_sipi(vcpu)?;
        Ok(self.interrupts.mp_state().to_kvm())
    }
}
