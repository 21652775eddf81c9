//! The LAPIC timer expiry that KVM holds back (`kernel` and `split` mode), and how a pause
//! accounts for it so a snapshot neither loses nor doubles it.
//!
//! When KVM's timer for a local APIC expires while its vCPU is outside KVM_RUN, KVM counts it
//! in `lapic_timer.pending` and sets the vector in IRR only at its next pass through the
//! `vcpu_run` loop (`kvm_inject_pending_timer_irqs`). KVM_GET_LAPIC does not show that count:
//! the page reads TMCCT 0 (one-shot) with nothing in IRR, exactly like a timer whose interrupt
//! was delivered and handled long ago, and a KVM_RUN with `immediate_exit` returns before the
//! loop. A snapshot taken then would lose the interrupt (docs/kvm-facts.md).
//!
//! So a pause works in two steps:
//! 1. **Flush.** Before the vCPU holds, it enters KVM_RUN once more until a return that went
//!    through the loop: KVM_RUN returning EINTR with `exit_reason` = KVM_EXIT_INTR, which KVM
//!    writes only where the loop hands a signal back to userspace, after the timer injection.
//!    (`immediate_exit`'s EINTR writes no exit reason, hence the sentinel written before.) The
//!    timer is then read: whatever expired before is in IRR now. That KVM_RUN starts with the
//!    flush signal pending (`crate::flush_signal`, `VcpuIrqchip::flush_without_entry`), so the
//!    guest is not entered: flushes that entered it lost interrupts here (docs/kvm-facts.md).
//! 2. **Account.** The save reads the timer again. An expiry between the two readings (the VM
//!    held, the guest not running) is the one KVM holds back: the save adds the timer's vector
//!    to IRR, as KVM's injection would have (SDM §11.5.4: the timer's interrupt is a fixed,
//!    edge-triggered local interrupt, not sent while the LVT is masked).
//!
//! A one-shot timer that reads expired right after the flush may have expired between the loop
//! and the reading: one more flush settles it (it cannot expire twice without the guest). The
//! TSC-deadline mode needs neither: KVM clears IA32_TSC_DEADLINE only when it injects, so the
//! saved deadline still lies in the past and fires again on restore.

use std::time::Instant;

use irqchip::lapic::regs::{
    LVT_MASKED, LVT_VECTOR_MASK, REG_IRR0, REG_LVT_TIMER, REG_TIMER_CURRENT, REG_TIMER_DCR,
    REG_TIMER_INITIAL,
};
use irqchip::lapic::timer::{divisor_of, TimerMode};
use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::IrqchipError;
use crate::kvm::KvmError;
use crate::snapshot::convert::{page_reg, set_page_reg};

/// KVM_RUN returns without the flush this many times in a row (a kick's `immediate_exit`
/// racing the entry each time) before the pause goes on without it, with a warning: a pause
/// must not wait forever on a host KVM that never reports KVM_EXIT_INTR.
const MAX_MISSED_FLUSHES: u32 = 64;

/// The timer as one KVM_GET_LAPIC showed it, and when.
#[derive(Clone, Copy, Debug)]
struct TimerReading {
    mode: Option<TimerMode>,
    lvt: u32,
    initial: u32,
    current: u32,
    divisor: u32,
    at: Instant,
}

impl TimerReading {
    fn from_page(page: &kvm_lapic_state, at: Instant) -> Self {
        let lvt = page_reg(page, REG_LVT_TIMER);
        Self {
            mode: TimerMode::from_lvt(lvt),
            lvt,
            initial: page_reg(page, REG_TIMER_INITIAL),
            current: page_reg(page, REG_TIMER_CURRENT),
            divisor: divisor_of(page_reg(page, REG_TIMER_DCR)),
            at,
        }
    }

    /// A one-shot count that has run out (TMICT set, TMCCT 0).
    fn one_shot_expired(&self) -> bool {
        self.mode == Some(TimerMode::OneShot) && self.initial != 0 && self.current == 0
    }

    /// Nanoseconds until the count reaches 0 (KVM's APIC bus: 1 ns a tick before the divider).
    fn ns_to_expiry(&self) -> u128 {
        u128::from(self.current) * u128::from(self.divisor)
    }

    /// True if the timer expired between `self` (after the flush) and `later` (the save).
    fn expired_before(&self, later: &TimerReading) -> bool {
        let same_programming = self.mode == later.mode && self.initial == later.initial;
        if !same_programming || self.current == 0 {
            return false;
        }
        match self.mode {
            Some(TimerMode::OneShot) => later.current == 0,
            Some(TimerMode::Periodic) => {
                let waited = later.at.saturating_duration_since(self.at).as_nanos();
                later.current > self.current || waited >= self.ns_to_expiry()
            }
            _ => false,
        }
    }
}

/// Where the pause stands for one vCPU.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Not paused.
    Running,
    /// Paused; the flush has not happened yet (`expired_once`: the reading after the first
    /// flush showed an expired one-shot, so one more flush settles it).
    Flushing { expired_once: bool, missed: u32 },
    /// Paused and flushed: the timer as read after the flush (None if the flush was given up).
    Flushed(Option<TimerReading>),
}

/// One vCPU's bookkeeping of KVM's held-back timer expiry across a pause.
#[derive(Debug)]
pub(crate) struct HeldTimer {
    phase: Phase,
}

impl Default for HeldTimer {
    fn default() -> Self {
        Self {
            phase: Phase::Running,
        }
    }
}

impl HeldTimer {
    /// A pause began: the vCPU must flush before it holds if it `entered` KVM_RUN since it
    /// last held. If it did not (a VM started paused), KVM ran no loop that could hold an
    /// expiry back since the last flush or the restore, and the guest must not run: the timer
    /// is read as it is.
    pub(crate) fn pause_started(
        &mut self,
        vcpu: &VcpuFd,
        entered: bool,
    ) -> Result<(), IrqchipError> {
        self.phase = if entered {
            Phase::Flushing {
                expired_once: false,
                missed: 0,
            }
        } else {
            Phase::Flushed(Some(TimerReading::from_page(
                &read_page(vcpu)?,
                Instant::now(),
            )))
        };
        Ok(())
    }

    /// The pause ended: the guest runs again and KVM injects on its own.
    pub(crate) fn pause_ended(&mut self) {
        self.phase = Phase::Running;
    }

    /// True while the vCPU still has to pass through KVM's `vcpu_run` loop.
    pub(crate) fn needs_flush(&self) -> bool {
        matches!(self.phase, Phase::Flushing { .. })
    }

    /// KVM_RUN returned EINTR: `through_loop` if KVM wrote KVM_EXIT_INTR (the flush happened).
    pub(crate) fn interrupted(
        &mut self,
        vcpu: &VcpuFd,
        through_loop: bool,
    ) -> Result<(), IrqchipError> {
        let Phase::Flushing {
            expired_once,
            missed,
        } = self.phase
        else {
            return Ok(());
        };
        if !through_loop {
            self.missed_flush(expired_once, missed);
            return Ok(());
        }
        let reading = TimerReading::from_page(&read_page(vcpu)?, Instant::now());
        self.phase = if reading.one_shot_expired() && !expired_once {
            Phase::Flushing {
                expired_once: true,
                missed,
            }
        } else {
            Phase::Flushed(Some(reading))
        };
        Ok(())
    }

    fn missed_flush(&mut self, expired_once: bool, missed: u32) {
        if missed + 1 < MAX_MISSED_FLUSHES {
            self.phase = Phase::Flushing {
                expired_once,
                missed: missed + 1,
            };
            return;
        }
        tracing::warn!(
            "KVM_RUN never returned through its loop during a pause: a LAPIC timer expiry \
             KVM holds back may be missing from a snapshot"
        );
        self.phase = Phase::Flushed(None);
    }

    /// At the save, with the page KVM_GET_LAPIC just returned: adds the timer's vector to IRR if
    /// the timer expired after the flush (held back by KVM, which would inject it at the next
    /// KVM_RUN) and its LVT is unmasked. Returns the vector added.
    pub(crate) fn account(&self, page: &mut kvm_lapic_state) -> Option<u8> {
        let Phase::Flushed(Some(flushed)) = self.phase else {
            return None;
        };
        let now = TimerReading::from_page(page, Instant::now());
        if !flushed.expired_before(&now) || now.lvt & LVT_MASKED != 0 {
            return None;
        }
        let vector = (now.lvt & LVT_VECTOR_MASK) as u8;
        // Vectors 0-15 are illegal for a fixed interrupt (SDM §11.5.2): KVM's delivery sets
        // an ESR bit instead, which the guest has not seen; leave it.
        if vector < 16 {
            return None;
        }
        set_irr(page, vector);
        Some(vector)
    }
}

fn read_page(vcpu: &VcpuFd) -> Result<kvm_lapic_state, IrqchipError> {
    Ok(vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?)
}

/// Sets `vector`'s bit in the page's IRR (eight 32-bit registers, 16 bytes apart).
fn set_irr(page: &mut kvm_lapic_state, vector: u8) {
    let offset = REG_IRR0 + 0x10 * u32::from(vector / 32);
    let value = page_reg(page, offset) | 1 << (vector % 32);
    set_page_reg(page, offset, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn page(lvt: u32, initial: u32, current: u32) -> kvm_lapic_state {
        let mut page = kvm_lapic_state::default();
        set_page_reg(&mut page, REG_LVT_TIMER, lvt);
        set_page_reg(&mut page, REG_TIMER_INITIAL, initial);
        set_page_reg(&mut page, REG_TIMER_CURRENT, current);
        set_page_reg(&mut page, REG_TIMER_DCR, 0b1011); // divide by 1
        page
    }

    fn flushed(reading: TimerReading) -> HeldTimer {
        HeldTimer {
            phase: Phase::Flushed(Some(reading)),
        }
    }

    fn irr_has(page: &kvm_lapic_state, vector: u8) -> bool {
        page_reg(page, REG_IRR0 + 0x10 * u32::from(vector / 32)) & 1 << (vector % 32) != 0
    }

    const ONE_SHOT: u32 = 0x40;
    const PERIODIC: u32 = 0x40 | 1 << 17;

    #[test]
    fn a_one_shot_expiring_while_held_goes_to_irr() {
        let at = Instant::now();
        let held = flushed(TimerReading::from_page(&page(ONE_SHOT, 1000, 400), at));
        let mut later = page(ONE_SHOT, 1000, 0);
        assert_eq!(held.account(&mut later), Some(0x40));
        assert!(irr_has(&later, 0x40));
    }

    #[test]
    fn a_one_shot_expired_before_the_flush_is_not_doubled() {
        let at = Instant::now();
        let held = flushed(TimerReading::from_page(&page(ONE_SHOT, 1000, 0), at));
        let mut later = page(ONE_SHOT, 1000, 0);
        assert_eq!(held.account(&mut later), None);
        assert!(!irr_has(&later, 0x40));
    }

    #[test]
    fn a_one_shot_still_counting_adds_nothing() {
        let at = Instant::now();
        let held = flushed(TimerReading::from_page(&page(ONE_SHOT, 1000, 900), at));
        let mut later = page(ONE_SHOT, 1000, 500);
        assert_eq!(held.account(&mut later), None);
    }

    #[test]
    fn a_masked_timer_adds_nothing() {
        let at = Instant::now();
        let held = flushed(TimerReading::from_page(
            &page(ONE_SHOT | LVT_MASKED, 1000, 400),
            at,
        ));
        let mut later = page(ONE_SHOT | LVT_MASKED, 1000, 0);
        assert_eq!(held.account(&mut later), None);
    }

    #[test]
    fn a_periodic_reload_or_a_long_hold_counts_as_an_expiry() {
        let at = Instant::now();
        let reading = TimerReading::from_page(&page(PERIODIC, 1_000_000, 300_000), at);
        let held = flushed(reading);
        let mut reloaded = page(PERIODIC, 1_000_000, 900_000);
        assert_eq!(held.account(&mut reloaded), Some(0x40));
        let long_after = TimerReading {
            at: at + Duration::from_millis(5),
            current: 100_000,
            ..reading
        };
        assert!(reading.expired_before(&long_after));
        let soon_after = TimerReading {
            at: at + Duration::from_micros(10),
            current: 290_000,
            ..reading
        };
        assert!(!reading.expired_before(&soon_after));
    }

    #[test]
    fn a_reprogrammed_timer_is_not_compared() {
        let at = Instant::now();
        let held = flushed(TimerReading::from_page(&page(ONE_SHOT, 1000, 400), at));
        let mut later = page(PERIODIC, 1000, 0);
        assert_eq!(held.account(&mut later), None);
    }

    #[test]
    fn nothing_is_accounted_outside_a_flushed_pause() {
        let mut later = page(ONE_SHOT, 1000, 0);
        assert_eq!(HeldTimer::default().account(&mut later), None);
        let mut held = HeldTimer {
            phase: Phase::Flushing {
                expired_once: false,
                missed: 0,
            },
        };
        assert!(held.needs_flush());
        assert_eq!(held.account(&mut later), None);
        held.pause_ended();
        assert!(!held.needs_flush());
    }

    #[test]
    fn missed_flushes_give_up_after_a_bound() {
        let mut held = HeldTimer {
            phase: Phase::Flushing {
                expired_once: false,
                missed: 0,
            },
        };
        for _ in 0..MAX_MISSED_FLUSHES - 1 {
            held.missed_flush(
                false,
                match held.phase {
                    Phase::Flushing { missed, .. } => missed,
                    _ => unreachable!(),
                },
            );
            assert!(held.needs_flush());
        }
        let Phase::Flushing { missed, .. } = held.phase else {
            unreachable!()
        };
        held.missed_flush(false, missed);
        assert!(!held.needs_flush());
    }
}
