//! `split` mode: a level-triggered IOAPIC interrupt's EOI that KVM holds while the vCPU halts.
//!
//! With the LAPIC in KVM, the guest's EOI of a level-triggered IOAPIC vector reaches irqvm's
//! IOAPIC as KVM_EXIT_IOAPIC_EOI, which KVM raises as a request (KVM_REQ_IOAPIC_EOI_EXIT)
//! processed at its next guest entry. On a VMX or SVM host the EOI write is itself an exit, so
//! that entry comes before the guest runs on. On this host (kvm_pvm) ring-0 guest code runs in
//! the host's emulator, which can carry on past the EOI in the same batch: a handler that EOIs
//! and returns to `sti; hlt` halts the vCPU with the request still pending, and a halted vCPU
//! processes no request, so the EOI never comes out, remote IRR stays set and the pin is dead
//! (docs/kvm-unit-tests.md: kvm-unit-tests' `ioapic` "retriggered level interrupts without
//! masking" hung in `split` mode; an `out` between the EOI and the `hlt` made it pass).
//!
//! The probe: while level-triggered messages are outstanding (signalled to KVM, their EOI not
//! yet seen), each vCPU thread arms a kick timer of its own. When it fires and the vCPU is
//! halted, the thread makes it runnable and runs one KVM_RUN that passes KVM's loop without
//! entering the guest (`crate::flush_signal`): KVM processes its pending requests there, so a
//! held EOI comes out as KVM_EXIT_IOAPIC_EOI, and the vCPU is then halted again
//! (KVM_SET_MP_STATE), as it was, unless an interrupt arrived for it in the meantime: the guest
//! sees its HLT end only for an interrupt. A probe that
//! finds nothing doubles the timer's delay (up to [`MAX_DELAY`]), so a guest that never EOIs
//! costs little.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::IrqchipError;
use crate::kick::KickTimer;
use crate::kvm::KvmError;

/// The first probe's delay after a level-triggered message went out.
const FIRST_DELAY: Duration = Duration::from_millis(1);
/// The longest delay between probes while an EOI stays outstanding.
const MAX_DELAY: Duration = Duration::from_millis(128);

/// Level-triggered messages signalled to KVM whose EOI exit has not been seen (VM-wide). An
/// estimate: a message that several LAPICs accept is counted once and EOIed by each; the count
/// stops at 0. It only decides when vCPUs probe, never what a probe does.
#[derive(Debug, Default)]
pub struct OutstandingEois(AtomicU64);

impl OutstandingEois {
    /// A level-triggered message reached KVM's LAPICs.
    pub fn signalled(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// An EOI exit was handled.
    pub fn eoi_seen(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    pub fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// One vCPU's probe (lives on its thread: the timer kicks the thread that created it).
#[derive(Debug, Default)]
pub struct EoiProbe {
    timer: Option<KickTimer>,
    /// The armed timer's delay and when it was armed; `None` when disarmed.
    armed: Option<(Duration, Instant)>,
    /// The vCPU was halted and made runnable for one loop-only KVM_RUN: halt it again after.
    rehalt: bool,
}

impl EoiProbe {
    /// Before KVM_RUN: arms the timer while EOIs are outstanding, disarms it otherwise.
    pub fn before_entry(&mut self, outstanding: &OutstandingEois) {
        if !outstanding.any() {
            if self.armed.take().is_some() {
                if let Some(timer) = &self.timer {
                    timer.disarm();
                }
            }
            return;
        }
        if self.armed.is_some() || self.rehalt {
            return;
        }
        if self.timer.is_none() {
            match KickTimer::for_current_thread() {
                Ok(timer) => self.timer = Some(timer),
                Err(e) => {
                    crate::warn_ratelimited!("no kick timer for the EOI probe: {e}");
                    return;
                }
            }
        }
        self.arm(FIRST_DELAY);
    }

    fn arm(&mut self, delay: Duration) {
        if let Some(timer) = &self.timer {
            timer.arm(delay);
            self.armed = Some((delay, Instant::now()));
        }
    }

    /// After every KVM_RUN return: ends a probe run (the vCPU halted again), or starts one if
    /// the timer fired and the vCPU is halted. True if the next KVM_RUN must not enter the guest.
    pub fn after_exit(
        &mut self,
        vcpu: &VcpuFd,
        outstanding: &OutstandingEois,
    ) -> Result<bool, IrqchipError> {
        if self.rehalt {
            self.rehalt = false;
            rehalt_unless_woken(vcpu)?;
            return Ok(false);
        }
        // Due once the timer's delay has passed (its kick is what ended a halted KVM_RUN).
        let Some((delay, at)) = self.armed else {
            return Ok(false);
        };
        if at.elapsed() < delay || !outstanding.any() || !crate::flush_signal::armed() {
            return Ok(false);
        }
        // Rearmed with a longer delay: an EOI that stays outstanding is probed less often.
        self.arm((delay * 2).min(MAX_DELAY));
        let state = vcpu
            .get_mp_state()
            .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?;
        if state.mp_state != KVM_MP_STATE_HALTED {
            // A running vCPU passes KVM's loop at its next KVM_RUN anyway.
            return Ok(false);
        }
        set_mp_state(vcpu, KVM_MP_STATE_RUNNABLE)?;
        self.rehalt = true;
        Ok(true)
    }

    /// The probe run is in progress (its KVM_RUN must not enter the guest).
    pub fn probing(&self) -> bool {
        self.rehalt
    }
}

/// After the probe's run: halted again, as the guest left it, unless KVM began an injection in
/// that run (an interrupt that arrived meanwhile, kept as in flight because the guest was not
/// entered). A halted vCPU would not look at an injection in flight, and that interrupt is what
/// ends the HLT anyway, so the vCPU stays runnable and takes it at its next entry.
fn rehalt_unless_woken(vcpu: &VcpuFd) -> Result<(), IrqchipError> {
    let events = vcpu
        .get_vcpu_events()
        .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    let woken = events.interrupt.injected != 0
        || events.nmi.injected != 0
        || events.exception.injected != 0;
    if woken {
        return Ok(());
    }
    set_mp_state(vcpu, KVM_MP_STATE_HALTED)
}

fn set_mp_state(vcpu: &VcpuFd, mp_state: u32) -> Result<(), IrqchipError> {
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
    Ok(())
}
