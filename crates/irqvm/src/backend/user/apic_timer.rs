//! A vCPU's APIC timer on the host: a POSIX timer of the vCPU's own thread
//! ([`crate::kick::KickTimer`]), armed for the model's next deadline, as KVM arms an hrtimer per
//! vCPU for its in-kernel LAPIC.
//!
//! At the deadline the kernel sends the kick signal to the vCPU thread alone. In KVM_RUN, the
//! run returns EINTR and the entry that follows polls the model's timer (the vector goes into
//! IRR); asleep on the doorbell, the futex wait ends with EINTR
//! (`irqchip::wake::SleepEnd::Interrupted`) and the thread re-evaluates. A halted vCPU also
//! sleeps no later than the deadline ([`HostTimer::wakes_at`], the futex's timeout), which
//! covers a signal that lands between the vCPU's last look at its state and its futex call:
//! the handler then only sets `immediate_exit`, but the futex's deadline has already passed and
//! the wait returns at once. So no expiry is lost, and no other thread takes part: per expiry
//! one `timer_settime` when the deadline is set and no futex call, where a timer thread cost
//! the notify of its condvar, its own wake-up and wait, and the wake of the halted vCPU
//! (docs/benchmarks.md §21).
//!
//! The deadline is VM time; the POSIX timer counts on CLOCK_MONOTONIC, from which a VM clock on
//! the host TSC parts by parts per million. A signal that comes before VM time reaches the
//! deadline finds the model's timer not yet due; the model still names the same deadline, the
//! armed instant has passed, so [`HostTimer::follow`] arms again for the rest.

use std::time::Instant;

use irqchip::Nanos;

use crate::kick::KickTimer;

/// What [`HostTimer::follow`] does with the POSIX timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// It is armed for the model's deadline and has not fired: nothing.
    Keep,
    /// Arm it for this deadline of the model: a new one, or the same one again after a signal
    /// that came before VM time reached it.
    Arm(Nanos),
    /// The model has no deadline any more and the timer has not fired yet: disarm it.
    Disarm,
    /// No deadline, and the timer fired (or never was armed): nothing.
    Idle,
}

/// The decision, given the armed deadline and its host instant, the model's next deadline and
/// the host time now.
fn plan(armed: Option<(Nanos, Instant)>, next: Option<Nanos>, now: Instant) -> Plan {
    match (armed, next) {
        (Some((deadline, at)), Some(next)) if deadline == next && now < at => Plan::Keep,
        (_, Some(next)) => Plan::Arm(next),
        (Some((_, at)), None) if now < at => Plan::Disarm,
        (_, None) => Plan::Idle,
    }
}

/// The POSIX timer that fires one vCPU's APIC timer, created on the vCPU's thread at its first
/// arming (it signals the thread that creates it).
#[derive(Debug, Default)]
pub(super) struct HostTimer {
    timer: Option<KickTimer>,
    /// The deadline the timer is armed for, in VM time, and its host instant; `None` when
    /// disarmed.
    armed: Option<(Nanos, Instant)>,
}

impl HostTimer {
    /// The deadline the timer was last armed for (it may have fired since).
    pub(super) fn armed(&self) -> Option<Nanos> {
        self.armed.map(|(deadline, _)| deadline)
    }

    /// When a halted vCPU must be awake for its timer: the armed deadline's host instant.
    pub(super) fn wakes_at(&self) -> Option<Instant> {
        self.armed.map(|(_, at)| at)
    }

    /// Keeps the timer on `next`, the model's next deadline after its poll at this entry;
    /// `at` gives a deadline's host instant. Fails only where the kernel refuses the calling
    /// thread a POSIX timer (RLIMIT_SIGPENDING, memory).
    pub(super) fn follow(
        &mut self,
        next: Option<Nanos>,
        at: impl FnOnce(Nanos) -> Instant,
    ) -> std::io::Result<()> {
        let now = Instant::now();
        match plan(self.armed, next, now) {
            Plan::Keep => {}
            Plan::Arm(deadline) => {
                let at = at(deadline);
                self.timer()?.arm(at.saturating_duration_since(now));
                self.armed = Some((deadline, at));
            }
            Plan::Disarm => {
                if let Some(timer) = &self.timer {
                    timer.disarm();
                }
                self.armed = None;
            }
            Plan::Idle => self.armed = None,
        }
        Ok(())
    }

    /// Disarms the timer for a halt poll that spins until its deadline itself (the signal
    /// would only interrupt the spin, ~11 µs on the kvm_pvm host, docs/benchmarks.md §21).
    /// Returns what was armed, for [`Self::resume`] if the poll gives up before the deadline;
    /// `None` (nothing done) when nothing is armed or it already fired.
    pub(super) fn suspend(&mut self) -> Option<(Nanos, Instant)> {
        let armed = self.armed.filter(|&(_, at)| Instant::now() < at)?;
        self.timer.as_ref()?.disarm();
        self.armed = None;
        Some(armed)
    }

    /// Arms again what [`Self::suspend`] disarmed, for a sleep that must end at its deadline.
    pub(super) fn resume(&mut self, (deadline, at): (Nanos, Instant)) {
        if let Some(timer) = &self.timer {
            timer.arm(at.saturating_duration_since(Instant::now()));
            self.armed = Some((deadline, at));
        }
    }

    /// The model was restored: its deadlines are another run's, even one equal to the armed
    /// value. The next [`Self::follow`] arms afresh (a setting left from before fires at most one
    /// kick, which finds nothing due).
    pub(super) fn forget(&mut self) {
        self.armed = None;
    }

    fn timer(&mut self) -> std::io::Result<&KickTimer> {
        let timer = match self.timer.take() {
            Some(timer) => timer,
            None => KickTimer::for_current_thread()?,
        };
        Ok(self.timer.insert(timer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kick::{install_kick_handler, ImmediateExit, KickTarget};
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::time::Duration;

    #[test]
    fn the_plan_for_each_case() {
        let now = Instant::now();
        let later = now + Duration::from_micros(50);
        let earlier = now - Duration::from_micros(1);
        let cases = [
            // (armed, next, plan, why)
            (None, None, Plan::Idle, "nothing armed, nothing to arm"),
            (None, Some(5), Plan::Arm(5), "a first deadline"),
            (
                Some((5, later)),
                Some(5),
                Plan::Keep,
                "armed for it, not fired",
            ),
            (
                Some((5, later)),
                Some(9),
                Plan::Arm(9),
                "the guest moved its deadline",
            ),
            (
                Some((5, earlier)),
                Some(5),
                Plan::Arm(5),
                "fired before VM time reached it: arm again for the rest",
            ),
            (
                Some((5, earlier)),
                Some(9),
                Plan::Arm(9),
                "fired; the next period",
            ),
            (
                Some((5, later)),
                None,
                Plan::Disarm,
                "cancelled before it fired",
            ),
            (Some((5, earlier)), None, Plan::Idle, "fired and taken"),
        ];
        for (armed, next, expected, why) in cases {
            assert_eq!(plan(armed, next, now), expected, "{why}");
        }
    }

    /// Runs `test` on this thread with the kick handler installed and the thread's
    /// `immediate_exit` registered as the byte `test` is given (1 once kicked).
    fn with_kick_byte(test: impl FnOnce(&AtomicU8)) {
        install_kick_handler().unwrap();
        let byte = AtomicU8::new(0);
        let target = KickTarget::default();
        // SAFETY: `byte` outlives the registration, which is dropped first.
        let registration = target.register(unsafe { ImmediateExit::new(byte.as_ptr()) });
        test(&byte);
        drop(registration);
    }

    /// Waits (10 s at most) for the kick; true if it came, and not before `at`.
    fn kicked_at_or_after(byte: &AtomicU8, at: Instant) -> bool {
        let start = Instant::now();
        while byte.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(Instant::now() >= at, "kicked before its instant");
        byte.load(Ordering::SeqCst) == 1
    }

    /// The POSIX timer is armed for the host instant of the deadline and fires there: the
    /// kick signal's handler sets the thread's registered `immediate_exit` byte.
    #[test]
    fn an_armed_deadline_kicks_the_thread_at_its_instant() {
        with_kick_byte(|byte| {
            let mut timer = HostTimer::default();
            let at = Instant::now() + Duration::from_millis(20);
            timer.follow(Some(1_000), |_| at).unwrap();
            assert_eq!(timer.armed(), Some(1_000));
            assert_eq!(timer.wakes_at(), Some(at));
            timer.follow(Some(1_000), |_| unreachable!("kept")).unwrap();
            assert!(kicked_at_or_after(byte, at), "never kicked");
            timer.follow(None, |_| unreachable!()).unwrap();
            assert_eq!(timer.armed(), None);
        });
    }

    /// A poll that spins to the deadline suspends the timer (no kick comes, nothing armed);
    /// resumed for a sleep, it kicks at the same instant. Suspending a fired timer does nothing.
    #[test]
    fn a_suspended_timer_is_silent_and_a_resumed_one_kicks_at_its_instant() {
        with_kick_byte(|byte| {
            let mut timer = HostTimer::default();
            let at = Instant::now() + Duration::from_millis(30);
            timer.follow(Some(3), |_| at).unwrap();
            assert_eq!(timer.suspend(), Some((3, at)));
            assert_eq!(timer.armed(), None);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(byte.load(Ordering::SeqCst), 0, "a suspended timer kicked");
            let at = Instant::now() + Duration::from_millis(10);
            timer.resume((3, at));
            assert_eq!(timer.wakes_at(), Some(at));
            assert!(
                kicked_at_or_after(byte, at),
                "the resumed timer never kicked"
            );
            assert_eq!(timer.suspend(), None, "nothing to suspend once fired");
        });
    }

    /// A deadline cancelled before it fires is disarmed: no kick comes.
    #[test]
    fn a_cancelled_deadline_does_not_kick() {
        with_kick_byte(|byte| {
            let mut timer = HostTimer::default();
            timer
                .follow(Some(7), |_| Instant::now() + Duration::from_millis(10))
                .unwrap();
            timer.follow(None, |_| unreachable!()).unwrap();
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(byte.load(Ordering::SeqCst), 0, "a disarmed timer kicked");
        });
    }
}
