//! The local APIC timer (SDM vol. 3 §11.5.4): one-shot, periodic and TSC-deadline modes.
//!
//! The timer is pure: it holds no host timer and reads no clock. Every call that depends on time
//! takes the caller's `now`; [`ApicTimer::next_deadline`] tells the caller when to come back, and
//! [`ApicTimer::poll`] reports an expiry once. The owner (the local APIC) turns an expiry into an
//! interrupt according to the LVT timer entry; masking is not this module's business.
//!
//! # Model
//!
//! In one-shot and periodic modes the timer counts down at `apic_bus_hz / divisor` counts per
//! second. A running count is stored as the exact time of its next expiry, a rational number of
//! nanoseconds (`expiry + expiry_frac / den`, see `Rate`); the current count is derived from the
//! time left, rounded up (a count that has started but not finished still reads as not done). A
//! periodic timer advances its expiry by exactly one period in that rational form, so its
//! deadlines stay on the grid `start + k * period` forever (no rounding drift). A deadline that is
//! reached is reported by [`ApicTimer::poll`] at the first nanosecond at or after the exact
//! expiry.
//!
//! Every register write first settles what already happened before `now`: an expiry due at or
//! before `now` that nobody polled yet stays pending (the interrupt happened before the write, as
//! on hardware) and the next `poll` still reports it.

use serde::{Deserialize, Serialize};

use crate::types::{ClockConfig, Nanos};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Minimum period of the periodic mode, in nanoseconds. A guest could otherwise program a period
/// of a few nanoseconds and make the VMM spin delivering timer interrupts. KVM clamps the periodic
/// APIC timer (and the PIT) to its `min_timer_period_us` module parameter, 200 us by default; we
/// use the same value. One-shot and TSC-deadline timers are not clamped: each expiry needs a new
/// guest write, so they cannot storm on their own.
pub const MIN_PERIODIC_PERIOD_NS: u64 = 200_000;

/// Writable bits of the divide configuration register: bits 0, 1 and 3 (SDM vol. 3 §11.5.4,
/// Figure 11-10). Bit 2 and bits 31:4 are reserved and read as 0.
pub const DCR_WRITABLE_MASK: u32 = 0b1011;

/// Timer mode field of the LVT timer register, bits 18:17 (SDM vol. 3 §11.5.1).
pub const LVT_TIMER_MODE_SHIFT: u32 = 17;
/// Mask of the timer mode field.
pub const LVT_TIMER_MODE_MASK: u32 = 0b11 << LVT_TIMER_MODE_SHIFT;

/// The timer mode selected by LVT timer bits 18:17 (SDM vol. 3 §11.5.1, §11.5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimerMode {
    /// 00b: count down once from the initial count.
    OneShot,
    /// 01b: count down and reload from the initial count, forever.
    Periodic,
    /// 10b: fire when the guest TSC reaches IA32_TSC_DEADLINE (SDM vol. 3 §11.5.4.1).
    TscDeadline,
}

impl TimerMode {
    /// Decodes bits 18:17 of an LVT timer value; `None` for the reserved encoding 11b (the
    /// caller decides what a reserved mode means; KVM stores it and counts as in one-shot mode).
    pub fn from_lvt(lvt: u32) -> Option<Self> {
        match (lvt & LVT_TIMER_MODE_MASK) >> LVT_TIMER_MODE_SHIFT {
            0 => Some(Self::OneShot),
            1 => Some(Self::Periodic),
            2 => Some(Self::TscDeadline),
            _ => None,
        }
    }

    /// The mode already shifted into bits 18:17 of the LVT timer register.
    pub fn lvt_bits(self) -> u32 {
        let field = match self {
            Self::OneShot => 0,
            Self::Periodic => 1,
            Self::TscDeadline => 2,
        };
        field << LVT_TIMER_MODE_SHIFT
    }
}

/// The divisor a divide configuration value selects (SDM vol. 3 §11.5.4, Figure 11-10): bits 3,1,0
/// = 000b..110b divide by 2, 4, ..., 128; 111b divides by 1. Other bits are ignored.
pub fn divisor_of(dcr: u32) -> u32 {
    let code = (dcr & 0b11) | ((dcr >> 1) & 0b100);
    if code == 0b111 {
        1
    } else {
        2 << code
    }
}

/// Length of one count as the exact fraction `num / den` nanoseconds. Both are nonzero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rate {
    num: u128,
    den: u128,
}

impl Rate {
    /// Splits `counts` counts into whole nanoseconds and the remainder in units of `1/den` ns.
    /// Saturates for absurd clock rates instead of overflowing (then the expiry is never reached).
    fn span(self, counts: u128) -> (u128, u128) {
        let scaled = counts.saturating_mul(self.num);
        (scaled / self.den, scaled % self.den)
    }
}

/// The counting state of one-shot and periodic modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Countdown {
    /// Not counting: initial count 0, a one-shot that already expired, or TSC-deadline mode. The
    /// current count reads 0.
    Stopped,
    /// Counting down; the next expiry is exactly at `expiry + expiry_frac / den` ns, where `den`
    /// comes from the current [`Rate`] (`expiry_frac < den`).
    Counting { expiry: u128, expiry_frac: u128 },
}

/// One local APIC timer. See the module documentation for the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApicTimer {
    /// The clocks, with zero rates replaced by 1 Hz (see [`ApicTimer::new`]).
    clock: ClockConfig,
    mode: TimerMode,
    /// Divide configuration register as read back (writable bits only).
    dcr: u32,
    initial_count: u32,
    /// IA32_TSC_DEADLINE as read back: 0 when disarmed, after it fired, or in other modes.
    tsc_deadline: u64,
    countdown: Countdown,
    /// An expiry that happened at this time and that `poll` has not reported yet.
    pending: Option<Nanos>,
}

impl ApicTimer {
    /// A timer in its power-on state. A careless caller's rate of 0 Hz (bus or TSC) is treated as
    /// 1 Hz, so no conversion ever divides by zero.
    pub fn new(clock: ClockConfig) -> Self {
        Self {
            clock: sanitize(clock),
            mode: TimerMode::OneShot,
            dcr: 0,
            initial_count: 0,
            tsc_deadline: 0,
            countdown: Countdown::Stopped,
            pending: None,
        }
    }

    /// Power-on / INIT state (SDM vol. 3 §11.4.7.3, §11.5.4): counts 0, DCR 0 (divide by 2),
    /// one-shot mode, disarmed, nothing pending. The clock configuration is kept.
    pub fn reset(&mut self) {
        *self = Self::new(self.clock);
    }

    /// The clocks this timer counts (bus clock before the divider, guest TSC).
    pub fn clock(&self) -> ClockConfig {
        self.clock
    }

    /// Changes the clocks (for instance when a snapshot is restored on a host with another TSC
    /// offset). A running count keeps its current value and continues at the new bus rate from
    /// `now`, as for a DCR write; a TSC deadline keeps its guest-TSC value.
    pub fn set_clock(&mut self, clock: ClockConfig, now: Nanos) {
        self.settle(now);
        let count = self.current_count(now);
        self.clock = sanitize(clock);
        self.countdown = self.start_countdown(count, now);
    }

    /// The mode selected by the LVT timer register: one-shot, periodic or TSC-deadline.
    pub fn mode(&self) -> TimerMode {
        self.mode
    }

    /// The LVT timer mode field was written; writing the same mode changes nothing. As KVM does
    /// (`apic_update_lvtt`), only a switch into or out of TSC-deadline mode disarms the timer:
    /// the initial count and the TSC deadline become 0 and the count stops (SDM vol. 3 §11.5.4.1:
    /// "a write to the LVT Timer Register that changes the timer mode disarms the local APIC
    /// timer", said of TSC-deadline mode). A switch between one-shot and periodic leaves the
    /// initial count and the running count alone: the count goes on from where it is, a periodic
    /// count reloads from the initial count when it reaches 0, a one-shot count stops there, and
    /// a one-shot count that already reached 0 stays stopped. An expiry already due at `now`
    /// stays pending.
    pub fn set_mode(&mut self, mode: TimerMode, now: Nanos) {
        if mode == self.mode {
            return;
        }
        self.settle(now);
        let tsc_deadline_involved =
            mode == TimerMode::TscDeadline || self.mode == TimerMode::TscDeadline;
        if tsc_deadline_involved {
            self.mode = mode;
            self.initial_count = 0;
            self.tsc_deadline = 0;
            self.countdown = Countdown::Stopped;
            return;
        }
        self.switch_counting_mode(mode, now);
    }

    /// One-shot <-> periodic with the count running or stopped. The exact expiry is kept unless
    /// the count rate changes with the mode (a periodic period shorter than
    /// [`MIN_PERIODIC_PERIOD_NS`] counts slower, see `rate`); then the count restarts from the
    /// value it has at `now` at the new rate, as for a DCR write.
    fn switch_counting_mode(&mut self, mode: TimerMode, now: Nanos) {
        let old_rate = self.rate();
        let count = self.current_count(now);
        self.mode = mode;
        if self.countdown != Countdown::Stopped && self.rate() != old_rate {
            self.countdown = self.start_countdown(count, now);
        }
    }

    /// DCR write (SDM vol. 3 §11.5.4). Only bits 0, 1 and 3 are kept. A running count keeps the
    /// value it has at `now` and counts on from it at the new rate from `now` (the count in
    /// progress restarts, as in KVM, which rescales the time left to the new divisor); later
    /// periods use the new rate.
    pub fn write_divide_config(&mut self, dcr: u32, now: Nanos) {
        self.settle(now);
        let count = self.current_count(now);
        self.dcr = dcr & DCR_WRITABLE_MASK;
        self.countdown = self.start_countdown(count, now);
    }

    /// The divide configuration register as written, bits 0, 1 and 3 only (SDM vol. 3 §11.5.4).
    pub fn divide_config(&self) -> u32 {
        self.dcr
    }

    /// The divisor the DCR selects (1, 2, 4, ..., 128).
    pub fn divisor(&self) -> u32 {
        divisor_of(self.dcr)
    }

    /// Initial-count write (SDM vol. 3 §11.5.4): (re)starts counting down from `count`; 0 stops
    /// the timer. Ignored in TSC-deadline mode (SDM vol. 3 §11.5.4.1).
    pub fn write_initial_count(&mut self, count: u32, now: Nanos) {
        if self.mode == TimerMode::TscDeadline {
            return;
        }
        self.settle(now);
        self.initial_count = count;
        self.countdown = self.start_countdown(count, now);
    }

    /// The initial-count register: the count the timer last (re)started from.
    pub fn initial_count(&self) -> u32 {
        self.initial_count
    }

    /// Current-count register at `now` (SDM vol. 3 §11.5.4): counts left, rounded up; 0 once a
    /// one-shot count is done, when stopped, and in TSC-deadline mode. In periodic mode the count
    /// reloads as it reaches 0, so it reads the initial count at that instant. Never exceeds the
    /// initial count.
    pub fn current_count(&self, now: Nanos) -> u32 {
        let Countdown::Counting {
            expiry,
            expiry_frac,
        } = self.countdown
        else {
            return 0;
        };
        let rate = self.rate();
        let now = u128::from(now);
        let count = if now < expiry || (now == expiry && expiry_frac > 0) {
            // Time left, in units of 1/den ns, then in counts rounded up.
            let left = (expiry - now)
                .saturating_mul(rate.den)
                .saturating_add(expiry_frac);
            left.div_ceil(rate.num)
        } else if self.mode == TimerMode::Periodic && self.initial_count > 0 {
            // Expired and not polled yet: the count has reloaded (perhaps several times).
            let behind = (now - expiry).saturating_mul(rate.den) - expiry_frac;
            let period = u128::from(self.initial_count);
            period - (behind / rate.num) % period
        } else {
            0
        };
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        count.min(self.initial_count)
    }

    /// IA32_TSC_DEADLINE write (SDM vol. 3 §11.5.4.1): arms the timer for the guest TSC value
    /// `deadline_tsc`, or disarms it with 0. A deadline at or before the current TSC fires at the
    /// next poll. Ignored unless in TSC-deadline mode.
    pub fn write_tsc_deadline(&mut self, deadline_tsc: u64, now: Nanos) {
        if self.mode != TimerMode::TscDeadline {
            return;
        }
        self.settle(now);
        self.tsc_deadline = deadline_tsc;
    }

    /// IA32_TSC_DEADLINE as read: 0 when disarmed, in other modes, and once `poll` (or a later
    /// write) has observed the expiry.
    pub fn tsc_deadline(&self) -> u64 {
        self.tsc_deadline
    }

    /// The guest TSC at `now`: `tsc_at_zero + now * tsc_hz / 1e9`, truncated to 64 bits as the
    /// hardware counter wraps. (Deadline comparisons use the unwrapped value.)
    pub fn guest_tsc(&self, now: Nanos) -> u64 {
        self.unwrapped_tsc(now) as u64
    }

    /// The earliest time at which [`poll`](Self::poll) will return true, if any: a pending expiry
    /// (at or before the last time the timer was settled), else the armed deadline. `None` when
    /// disarmed or when the deadline lies beyond `u64::MAX` ns.
    pub fn next_deadline(&self) -> Option<Nanos> {
        match (self.pending, self.armed_deadline()) {
            (Some(p), Some(a)) => Some(p.min(a)),
            (p, a) => p.or(a),
        }
    }

    /// Time left until [`next_deadline`](Self::next_deadline), 0 if it is already due.
    pub fn remaining(&self, now: Nanos) -> Option<Nanos> {
        self.next_deadline().map(|d| d.saturating_sub(now))
    }

    /// Reports an expiry at or before `now`, once. A one-shot count stops (current count 0), a
    /// TSC deadline clears to 0, and a periodic count reloads: all periods missed up to `now`
    /// coalesce into this one report and the next deadline stays on the original period grid.
    pub fn poll(&mut self, now: Nanos) -> bool {
        self.settle(now);
        match self.pending {
            Some(at) if at <= now => {
                self.pending = None;
                true
            }
            _ => false,
        }
    }

    /// Moves the timer from the timeline of a snapshot to the timeline it is restored into: the
    /// state at `saved_at` becomes the state at `restored_at`, every pending or future expiry
    /// keeping its distance (exactly, to the fraction of a nanosecond). A snapshot thus keeps
    /// the time left, not absolute times. The TSC deadline is in guest-TSC units and is not
    /// shifted: keep the guest TSC continuous through its origin instead
    /// ([`set_tsc_at_zero`](Self::set_tsc_at_zero), as `LocalApic::rebase_timeline` does).
    pub fn rebase(&mut self, saved_at: Nanos, restored_at: Nanos) {
        self.settle(saved_at);
        if let Some(at) = self.pending {
            let ago = saved_at.saturating_sub(at);
            self.pending = Some(restored_at.saturating_sub(ago));
        }
        if let Countdown::Counting { expiry, .. } = &mut self.countdown {
            // After settling, the expiry lies after `saved_at`, so this cannot underflow.
            let ahead = expiry.saturating_sub(u128::from(saved_at));
            *expiry = ahead.saturating_add(u128::from(restored_at));
        }
    }

    /// Moves the origin of the guest TSC (`ClockConfig::tsc_at_zero`) and nothing else: a TSC
    /// deadline keeps its guest-TSC value, and countdowns keep their exact expiry (unlike
    /// [`set_clock`](Self::set_clock), which restarts them from the rounded current count).
    /// Snapshot restore uses it to keep the guest TSC continuous across a [`rebase`](Self::rebase).
    pub fn set_tsc_at_zero(&mut self, tsc_at_zero: u64) {
        self.clock.tsc_at_zero = tsc_at_zero;
    }

    /// A timer rebuilt from register values at `now`, for converting another implementation's
    /// state (KVM's `kvm_lapic_state` page with its TMCCT, and IA32_TSC_DEADLINE): mode, DCR
    /// (reserved bits dropped), initial count, and `current_count` counts left before the next
    /// expiry (capped at the initial count; 0 means stopped, as a one-shot that already fired).
    /// The deadline is kept only in TSC-deadline mode (it reads 0 in the others), and there no
    /// count runs. Nothing is pending: a deadline at or before the guest TSC at `now` fires at
    /// the next poll.
    pub fn from_counts(
        clock: ClockConfig,
        mode: TimerMode,
        dcr: u32,
        initial_count: u32,
        current_count: u32,
        tsc_deadline: u64,
        now: Nanos,
    ) -> Self {
        let mut timer = Self::new(clock);
        timer.mode = mode;
        timer.dcr = dcr & DCR_WRITABLE_MASK;
        if mode == TimerMode::TscDeadline {
            timer.tsc_deadline = tsc_deadline;
            return timer;
        }
        timer.initial_count = initial_count;
        timer.countdown = timer.start_countdown(current_count.min(initial_count), now);
        timer
    }

    /// Checks the invariants every operation relies on, for a timer that was deserialized
    /// rather than built by [`new`](Self::new) (a snapshot may be malformed): nonzero clock rates
    /// (conversions divide by them), DCR within its writable bits, no countdown in TSC-deadline
    /// mode or with a zero initial count, and a countdown fraction below the denominator of the
    /// current rate.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.clock.apic_bus_hz == 0 || self.clock.tsc_hz == 0 {
            return Err("APIC timer: zero clock rate");
        }
        if self.dcr & !DCR_WRITABLE_MASK != 0 {
            return Err("APIC timer: reserved DCR bits set");
        }
        if let Countdown::Counting { expiry_frac, .. } = self.countdown {
            if self.mode == TimerMode::TscDeadline || self.initial_count == 0 {
                return Err("APIC timer: countdown without an initial count");
            }
            if expiry_frac >= self.rate().den {
                return Err("APIC timer: countdown fraction out of range");
            }
        }
        Ok(())
    }

    /// Length of one count in the current configuration. In periodic mode a period shorter than
    /// [`MIN_PERIODIC_PERIOD_NS`] is stretched to it by slowing the count down, so the current
    /// count still runs from the initial count to 0 over one (clamped) period.
    fn rate(&self) -> Rate {
        let bus_hz = u128::from(self.clock.apic_bus_hz);
        let natural = Rate {
            num: u128::from(self.divisor()) * NANOS_PER_SEC,
            den: bus_hz,
        };
        let count = u128::from(self.initial_count);
        let min_period = u128::from(MIN_PERIODIC_PERIOD_NS);
        // period = count * num / den < min_period, compared without dividing.
        let too_short = count * natural.num < min_period * bus_hz;
        if self.mode == TimerMode::Periodic && count > 0 && too_short {
            Rate {
                num: min_period,
                den: count,
            }
        } else {
            natural
        }
    }

    /// A countdown that starts at `now` with `count` counts to go (stopped if 0 or not counting).
    fn start_countdown(&self, count: u32, now: Nanos) -> Countdown {
        if count == 0 || self.mode == TimerMode::TscDeadline {
            return Countdown::Stopped;
        }
        let (whole, frac) = self.rate().span(u128::from(count));
        Countdown::Counting {
            expiry: u128::from(now).saturating_add(whole),
            expiry_frac: frac,
        }
    }

    /// The deadline of the armed timer (not counting a pending expiry), in whole nanoseconds.
    fn armed_deadline(&self) -> Option<Nanos> {
        match self.mode {
            TimerMode::TscDeadline => self.tsc_deadline_nanos(),
            TimerMode::OneShot | TimerMode::Periodic => match self.countdown {
                Countdown::Stopped => None,
                Countdown::Counting {
                    expiry,
                    expiry_frac,
                } => {
                    let first_ns = expiry.saturating_add(u128::from(expiry_frac > 0));
                    Nanos::try_from(first_ns).ok()
                }
            },
        }
    }

    /// First nanosecond at which the guest TSC (unwrapped) reaches the deadline: the least `t`
    /// with `tsc_at_zero + floor(t * tsc_hz / 1e9) >= deadline`.
    fn tsc_deadline_nanos(&self) -> Option<Nanos> {
        if self.tsc_deadline == 0 {
            return None;
        }
        let Some(ticks) = self.tsc_deadline.checked_sub(self.clock.tsc_at_zero) else {
            return Some(0);
        };
        let ns = (u128::from(ticks) * NANOS_PER_SEC).div_ceil(u128::from(self.clock.tsc_hz));
        Nanos::try_from(ns).ok()
    }

    fn unwrapped_tsc(&self, now: Nanos) -> u128 {
        let ticks = u128::from(now) * u128::from(self.clock.tsc_hz) / NANOS_PER_SEC;
        u128::from(self.clock.tsc_at_zero) + ticks
    }

    /// Applies an expiry due at or before `now`: it becomes pending (unless one already is; missed
    /// expiries coalesce), a one-shot count stops, a TSC deadline clears, a periodic count moves
    /// to its first grid point after `now`.
    fn settle(&mut self, now: Nanos) {
        let Some(due) = self.armed_deadline() else {
            return;
        };
        if due > now {
            return;
        }
        self.pending = Some(self.pending.map_or(due, |p| p.min(due)));
        match self.mode {
            TimerMode::TscDeadline => self.tsc_deadline = 0,
            TimerMode::OneShot => self.countdown = Countdown::Stopped,
            TimerMode::Periodic => self.skip_periods_through(now),
        }
    }

    /// Advances a periodic expiry by the smallest whole number of periods that puts it after
    /// `now`, in exact rational arithmetic so the grid never drifts.
    fn skip_periods_through(&mut self, now: Nanos) {
        let rate = self.rate();
        let Countdown::Counting {
            expiry,
            expiry_frac,
        } = &mut self.countdown
        else {
            return;
        };
        // How far the exact expiry lies at or before `now`, in units of 1/den ns.
        let behind = u128::from(now)
            .saturating_sub(*expiry)
            .saturating_mul(rate.den)
            .saturating_sub(*expiry_frac);
        let period = u128::from(self.initial_count)
            .max(1)
            .saturating_mul(rate.num);
        let periods = behind / period + 1;
        let advance = periods.saturating_mul(period).saturating_add(*expiry_frac);
        *expiry = expiry.saturating_add(advance / rate.den);
        *expiry_frac = advance % rate.den;
    }
}

/// Replaces zero clock rates by 1 Hz so that no conversion divides by zero.
fn sanitize(clock: ClockConfig) -> ClockConfig {
    ClockConfig {
        apic_bus_hz: clock.apic_bus_hz.max(1),
        tsc_hz: clock.tsc_hz.max(1),
        tsc_at_zero: clock.tsc_at_zero,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GHZ: u64 = 1_000_000_000;

    fn clock(bus_hz: u64, tsc_hz: u64, tsc_at_zero: u64) -> ClockConfig {
        ClockConfig {
            apic_bus_hz: bus_hz,
            tsc_hz,
            tsc_at_zero,
        }
    }

    /// A 1 GHz bus timer in `mode` with DCR `dcr`, counting `count` from `start`.
    fn counting(mode: TimerMode, dcr: u32, count: u32, start: Nanos) -> ApicTimer {
        let mut t = ApicTimer::new(ClockConfig::default());
        t.set_mode(mode, 0);
        t.write_divide_config(dcr, 0);
        t.write_initial_count(count, start);
        t
    }

    /// DCR encodings for divide by 2, 4, ..., 128, 1 (SDM vol. 3 §11.5.4, Figure 11-10).
    const DIVIDES: [(u32, u32); 8] = [
        (0b0000, 2),
        (0b0001, 4),
        (0b0010, 8),
        (0b0011, 16),
        (0b1000, 32),
        (0b1001, 64),
        (0b1010, 128),
        (0b1011, 1),
    ];

    #[test]
    fn sdm_11_5_4_every_divide_value_sets_the_count_rate() {
        for (dcr, divide) in DIVIDES {
            // Bit 2 and bits 31:4 are reserved: they change nothing and read back as 0.
            for noise in [0, 0b0100, 0xFFFF_FFF0, 0xFFFF_FFF4] {
                let t = counting(TimerMode::OneShot, dcr | noise, 1000, 0);
                assert_eq!(t.divisor(), divide);
                assert_eq!(t.divide_config(), dcr);
                assert_eq!(t.next_deadline(), Some(1000 * u64::from(divide)));
                assert_eq!(t.current_count(u64::from(divide)), 999);
                assert_eq!(t.current_count(u64::from(divide) - 1), 1000);
            }
        }
    }

    #[test]
    fn sdm_11_5_4_one_shot_counts_down_and_reads_zero_after() {
        // Divide by 2 at 1 GHz: one count every 2 ns, started at 1000 with 100 counts.
        let t = counting(TimerMode::OneShot, 0, 100, 1000);
        assert_eq!(t.initial_count(), 100);
        let readings = [
            (1000, 100),
            (1001, 100),
            (1002, 99),
            (1100, 50),
            (1199, 1),
            (1200, 0),
            (9999, 0),
        ];
        for (now, count) in readings {
            assert_eq!(t.current_count(now), count, "at {now}");
        }
        assert_eq!(t.next_deadline(), Some(1200));
    }

    #[test]
    fn sdm_11_5_4_one_shot_fires_once_exactly_at_zero() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 1000);
        assert!(!t.poll(1000));
        assert!(!t.poll(1199));
        assert_eq!(t.remaining(1199), Some(1));
        assert!(t.poll(1200));
        assert!(!t.poll(1200));
        assert!(!t.poll(1_000_000));
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.current_count(1300), 0);
        assert_eq!(
            t.initial_count(),
            100,
            "the initial count register keeps its value"
        );
    }

    #[test]
    fn sdm_11_5_4_one_shot_late_poll_reports_once() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        assert_eq!(t.current_count(500), 0, "expired but not yet polled");
        assert!(t.poll(500));
        assert!(!t.poll(600));
    }

    #[test]
    fn sdm_11_5_4_writing_zero_stops_and_rewriting_restarts() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.write_initial_count(0, 50);
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.current_count(60), 0);
        assert!(!t.poll(1000));
        // Rewriting restarts from the full count, also while counting.
        t.write_initial_count(100, 1000);
        t.write_initial_count(100, 1100);
        assert_eq!(t.current_count(1100), 100);
        assert_eq!(t.next_deadline(), Some(1300));
        assert!(t.poll(1300));
        // After expiry, a new write arms it again.
        t.write_initial_count(10, 2000);
        assert_eq!(t.next_deadline(), Some(2020));
    }

    #[test]
    fn sdm_11_5_4_periodic_reloads_from_initial_count() {
        // 1 ms period: 1_000_000 counts at divide by 1.
        let mut t = counting(TimerMode::Periodic, 0b1011, 1_000_000, 0);
        assert_eq!(t.next_deadline(), Some(1_000_000));
        assert_eq!(t.current_count(999_999), 1);
        assert_eq!(
            t.current_count(1_000_000),
            1_000_000,
            "reloaded at the instant of 0"
        );
        assert_eq!(t.current_count(1_000_001), 999_999);
        assert!(t.poll(1_000_000));
        assert_eq!(t.next_deadline(), Some(2_000_000));
        assert!(!t.poll(1_999_999));
        assert!(t.poll(2_000_000));
        assert_eq!(t.current_count(2_250_000), 750_000);
    }

    #[test]
    fn sdm_11_5_4_periodic_missed_periods_coalesce_on_the_grid() {
        let mut t = counting(TimerMode::Periodic, 0b1011, 1_000_000, 0);
        assert_eq!(
            t.current_count(3_500_000),
            500_000,
            "counting goes on unpolled"
        );
        assert!(t.poll(3_500_000), "3 missed periods report once");
        assert!(!t.poll(3_500_000));
        assert_eq!(
            t.next_deadline(),
            Some(4_000_000),
            "next deadline on the grid"
        );
        assert!(!t.poll(3_999_999));
        assert!(t.poll(4_000_000));
    }

    #[test]
    fn sdm_11_5_4_periodic_has_no_drift() {
        // 3 GHz bus, divide by 2: 2/3 ns per count, period of 1_000_000 counts = 666_666.67 ns.
        let mut t = ApicTimer::new(clock(3 * GHZ, GHZ, 0));
        t.set_mode(TimerMode::Periodic, 0);
        t.write_initial_count(1_000_000, 0);
        for k in 1..=10_000u64 {
            let exact_ceil = (k * 2_000_000).div_ceil(3);
            assert_eq!(t.next_deadline(), Some(exact_ceil), "period {k}");
            assert!(!t.poll(exact_ceil - 1));
            assert!(t.poll(exact_ceil));
        }
    }

    #[test]
    fn sdm_11_5_4_periodic_period_is_clamped_to_200_us() {
        // 10 counts at divide by 1 and 1 GHz would be a 10 ns period.
        let mut t = counting(TimerMode::Periodic, 0b1011, 10, 0);
        assert_eq!(t.next_deadline(), Some(MIN_PERIODIC_PERIOD_NS));
        // The count still runs from 10 to 0 over the stretched period.
        assert_eq!(t.current_count(0), 10);
        assert_eq!(t.current_count(100_000), 5);
        assert_eq!(t.current_count(199_999), 1);
        assert!(t.poll(200_000));
        assert_eq!(t.next_deadline(), Some(400_000));
        // A one-shot timer is not clamped.
        let one_shot = counting(TimerMode::OneShot, 0b1011, 10, 0);
        assert_eq!(one_shot.next_deadline(), Some(10));
        // A period just at the limit is left alone.
        let at_limit = counting(TimerMode::Periodic, 0b1011, 200_000, 0);
        assert_eq!(at_limit.next_deadline(), Some(200_000));
        assert_eq!(at_limit.current_count(1), 199_999);
    }

    #[test]
    fn sdm_11_5_4_dcr_change_mid_count_keeps_the_count_and_changes_the_rate() {
        // Divide by 2: 100 counts from 0; at 50 ns 75 counts are left.
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        assert_eq!(t.current_count(50), 75);
        t.write_divide_config(0b0010, 50); // divide by 8
        assert_eq!(t.current_count(50), 75);
        assert_eq!(t.current_count(58), 74);
        assert_eq!(t.next_deadline(), Some(50 + 75 * 8));
        // A partly elapsed count restarts: at 51 (half a count in) 75 are left, each 8 ns long.
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.write_divide_config(0b0010, 51);
        assert_eq!(t.next_deadline(), Some(51 + 75 * 8));

        // Periodic: the rest of this period and all later ones run at the new rate.
        let mut p = counting(TimerMode::Periodic, 0, 1_000_000, 0); // 2 ms period
        p.write_divide_config(0b1011, 1_000_000); // divide by 1 with 500_000 counts left
        assert_eq!(p.current_count(1_000_000), 500_000);
        assert_eq!(p.next_deadline(), Some(1_500_000));
        assert!(p.poll(1_500_000));
        assert_eq!(p.next_deadline(), Some(2_500_000));
    }

    #[test]
    fn sdm_11_5_4_dcr_write_after_an_unpolled_expiry_keeps_it_pending() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.write_divide_config(0b0001, 500);
        assert_eq!(t.next_deadline(), Some(200));
        assert!(t.poll(500));
        assert_eq!(t.next_deadline(), None);
    }

    fn tsc_timer(tsc_hz: u64, tsc_at_zero: u64) -> ApicTimer {
        let mut t = ApicTimer::new(clock(GHZ, tsc_hz, tsc_at_zero));
        t.set_mode(TimerMode::TscDeadline, 0);
        t
    }

    #[test]
    fn sdm_11_5_4_1_tsc_deadline_in_the_future_fires_when_reached() {
        // TSC = 1000 + 2 * t: 3001 is reached at t = 1000.5, so first at t = 1001.
        let mut t = tsc_timer(2 * GHZ, 1000);
        assert_eq!(t.guest_tsc(1001), 3002);
        t.write_tsc_deadline(3001, 10);
        assert_eq!(t.tsc_deadline(), 3001);
        assert_eq!(t.next_deadline(), Some(1001));
        assert!(!t.poll(1000));
        assert_eq!(t.tsc_deadline(), 3001);
        assert!(t.poll(1001));
        assert_eq!(t.tsc_deadline(), 0, "firing clears the MSR");
        assert!(!t.poll(2000));
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn sdm_11_5_4_1_tsc_deadline_in_the_past_fires_at_once() {
        let mut t = tsc_timer(2 * GHZ, 1000);
        t.write_tsc_deadline(11_000, 5000); // TSC at 5000 is exactly 11_000
        assert!(t.poll(5000));
        t.write_tsc_deadline(1, 6000); // before tsc_at_zero
        assert_eq!(t.next_deadline(), Some(0));
        assert!(t.poll(6000));
        assert_eq!(t.tsc_deadline(), 0);
    }

    #[test]
    fn sdm_11_5_4_1_tsc_deadline_zero_disarms() {
        let mut t = tsc_timer(GHZ, 0);
        t.write_tsc_deadline(1000, 0);
        t.write_tsc_deadline(0, 10);
        assert_eq!(t.next_deadline(), None);
        assert!(!t.poll(u64::MAX));
    }

    #[test]
    fn sdm_11_5_4_1_tsc_deadline_huge_values_do_not_overflow() {
        let mut t = tsc_timer(GHZ, 0);
        t.write_tsc_deadline(u64::MAX, 0);
        assert_eq!(t.next_deadline(), Some(u64::MAX));
        assert!(!t.poll(u64::MAX - 1));
        assert!(t.poll(u64::MAX));
        // At 1 Hz the deadline lies beyond the end of time: never fires.
        let mut slow = tsc_timer(1, 0);
        slow.write_tsc_deadline(u64::MAX, 0);
        assert_eq!(slow.next_deadline(), None);
        assert!(!slow.poll(u64::MAX));
        // A fast TSC with a huge offset.
        let mut fast = tsc_timer(u64::MAX, u64::MAX - 1);
        fast.write_tsc_deadline(u64::MAX, 0);
        assert_eq!(fast.next_deadline(), Some(1));
        assert_eq!(fast.guest_tsc(0), u64::MAX - 1);
    }

    #[test]
    fn sdm_11_5_4_1_tsc_mode_ignores_initial_count_and_reads_zero() {
        let mut t = tsc_timer(GHZ, 0);
        t.write_initial_count(1000, 0);
        assert_eq!(t.initial_count(), 0);
        assert_eq!(t.current_count(10), 0);
        assert_eq!(t.next_deadline(), None);
        // And the deadline MSR is ignored outside TSC-deadline mode.
        let mut o = counting(TimerMode::OneShot, 0, 0, 0);
        o.write_tsc_deadline(1000, 0);
        assert_eq!(o.tsc_deadline(), 0);
        assert_eq!(o.next_deadline(), None);
    }

    #[test]
    fn sdm_11_5_4_1_switch_into_or_out_of_tsc_deadline_disarms() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.set_mode(TimerMode::OneShot, 10);
        assert_eq!(t.next_deadline(), Some(200), "same mode: nothing changes");
        t.set_mode(TimerMode::TscDeadline, 10);
        assert_eq!(t.initial_count(), 0);
        assert_eq!(t.current_count(10), 0);
        assert_eq!(t.next_deadline(), None);
        assert!(!t.poll(1000));

        let mut p = counting(TimerMode::Periodic, 0, 100, 0);
        p.set_mode(TimerMode::TscDeadline, 10);
        assert_eq!((p.initial_count(), p.next_deadline()), (0, None));

        let mut d = tsc_timer(GHZ, 0);
        d.write_tsc_deadline(500, 0);
        d.set_mode(TimerMode::OneShot, 10);
        assert_eq!(d.tsc_deadline(), 0);
        assert_eq!((d.initial_count(), d.current_count(10)), (0, 0));
        assert_eq!(d.next_deadline(), None);
        d.set_mode(TimerMode::TscDeadline, 20);
        assert_eq!(d.tsc_deadline(), 0, "the old deadline does not come back");
        assert!(!d.poll(1000));
    }

    /// KVM `apic_update_lvtt`: one-shot -> periodic leaves the initial count and the running
    /// count alone; the count goes on from where it was and reloads from the initial count at 0.
    #[test]
    fn one_shot_to_periodic_keeps_counting_and_then_reloads() {
        // Divide by 1 at 1 GHz: 1_000_000 counts = 1 ms, started at 0.
        let mut t = counting(TimerMode::OneShot, 0b1011, 1_000_000, 0);
        t.set_mode(TimerMode::Periodic, 400_000);
        assert_eq!(t.mode(), TimerMode::Periodic);
        assert_eq!(t.initial_count(), 1_000_000, "TMICT reads back unchanged");
        assert_eq!(t.current_count(400_000), 600_000, "the count goes on");
        assert_eq!(t.current_count(900_000), 100_000);
        assert_eq!(t.next_deadline(), Some(1_000_000), "same expiry");
        assert!(t.poll(1_000_000));
        assert_eq!(t.current_count(1_250_000), 750_000, "reloaded from TMICT");
        assert_eq!(t.next_deadline(), Some(2_000_000));
        assert!(t.poll(2_000_000));
    }

    /// Periodic -> one-shot: the count in progress finishes, fires once, and stops at 0.
    #[test]
    fn periodic_to_one_shot_finishes_the_count_in_progress_once() {
        let mut t = counting(TimerMode::Periodic, 0b1011, 1_000_000, 0);
        assert!(t.poll(1_000_000));
        t.set_mode(TimerMode::OneShot, 1_300_000);
        assert_eq!(t.initial_count(), 1_000_000);
        assert_eq!(t.current_count(1_300_000), 700_000);
        assert_eq!(t.next_deadline(), Some(2_000_000));
        assert!(t.poll(2_000_000));
        assert_eq!(t.current_count(2_000_001), 0, "no reload in one-shot mode");
        assert_eq!(t.next_deadline(), None);
        assert!(!t.poll(10_000_000));
        assert_eq!(t.initial_count(), 1_000_000);
    }

    /// A one-shot count that already reached 0 stays at 0 after a switch to periodic (KVM's
    /// timer is no longer running, so nothing reloads it); a new initial count starts it.
    #[test]
    fn expired_one_shot_switched_to_periodic_stays_at_zero() {
        let mut t = counting(TimerMode::OneShot, 0b1011, 1000, 0);
        assert!(t.poll(1000));
        t.set_mode(TimerMode::Periodic, 5000);
        assert_eq!(t.initial_count(), 1000);
        assert_eq!(t.current_count(5000), 0);
        assert_eq!(t.next_deadline(), None);
        assert!(!t.poll(1_000_000));
        // Expired but not yet polled when the mode changes: the expiry is reported, then 0.
        let mut u = counting(TimerMode::OneShot, 0b1011, 1000, 0);
        u.set_mode(TimerMode::Periodic, 1500);
        assert!(u.poll(1500));
        assert_eq!(u.current_count(1600), 0);
        assert!(!u.poll(1_000_000));
        u.write_initial_count(1000, 2_000_000);
        assert_eq!(
            u.next_deadline(),
            Some(2_200_000),
            "periodic, clamped to 200 us"
        );
    }

    /// When the period is below the 200 us floor, periodic mode counts slower: the switch keeps
    /// the current count and continues it at the new rate (in both directions).
    #[test]
    fn switch_across_the_periodic_floor_keeps_the_current_count() {
        // 10 counts at divide by 1: 10 ns one-shot, 200 us (20 us a count) periodic.
        let mut t = counting(TimerMode::OneShot, 0b1011, 10, 0);
        t.set_mode(TimerMode::Periodic, 4);
        assert_eq!(t.current_count(4), 6);
        assert_eq!(t.next_deadline(), Some(4 + 6 * 20_000));
        assert!(t.poll(120_004));
        assert_eq!(t.next_deadline(), Some(320_004));
        t.set_mode(TimerMode::OneShot, 220_004);
        assert_eq!(t.current_count(220_004), 5);
        assert_eq!(t.next_deadline(), Some(220_009), "back to 1 ns a count");
        assert!(t.poll(220_009));
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn sdm_11_5_4_1_mode_change_after_an_unpolled_expiry_keeps_it() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.set_mode(TimerMode::TscDeadline, 300);
        assert!(
            t.poll(300),
            "the expiry at 200 happened before the mode change"
        );
        assert!(!t.poll(400));
    }

    #[test]
    fn sdm_11_4_7_3_reset_restores_power_on_state() {
        let mut t = counting(TimerMode::Periodic, 0b1011, 1_000_000, 0);
        t.reset();
        assert_eq!(t, ApicTimer::new(ClockConfig::default()));
        assert_eq!(t.mode(), TimerMode::OneShot);
        assert_eq!(t.divisor(), 2);
        assert_eq!((t.initial_count(), t.tsc_deadline()), (0, 0));
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn sdm_11_5_1_lvt_mode_field() {
        for mode in [
            TimerMode::OneShot,
            TimerMode::Periodic,
            TimerMode::TscDeadline,
        ] {
            assert_eq!(TimerMode::from_lvt(mode.lvt_bits() | 0x1_00FF), Some(mode));
        }
        assert_eq!(TimerMode::from_lvt(0b11 << 17), None);
    }

    #[test]
    fn zero_hz_is_treated_as_one_hz() {
        let mut t = ApicTimer::new(clock(0, 0, 0));
        assert_eq!(t.clock(), clock(1, 1, 0));
        t.write_divide_config(0b1011, 0);
        t.write_initial_count(3, 0);
        assert_eq!(t.next_deadline(), Some(3 * GHZ));
        assert_eq!(t.current_count(GHZ), 2);
        // The longest count at 1 Hz (2^32 - 1 counts, divide by 128) ends after u64::MAX ns.
        t.write_divide_config(0b1010, 0);
        t.write_initial_count(u32::MAX, 0);
        assert_eq!(t.next_deadline(), None);
        // u64::MAX ns is 144_115_188.07... counts of 128 s; the count in progress reads as left.
        assert_eq!(t.current_count(u64::MAX), u32::MAX - 144_115_188);
    }

    #[test]
    fn snapshot_rebase_round_trip_keeps_the_time_left() {
        // 2/3 ns per count so the exact expiry carries a fraction of a nanosecond.
        let mut t = ApicTimer::new(clock(3 * GHZ, GHZ, 0));
        t.set_mode(TimerMode::Periodic, 0);
        t.write_initial_count(1_000_000, 5_000_000);
        let original = t.clone();
        let saved_at = 5_500_000; // first expiry at 5_666_666.67
        let mut moved = t.clone();
        moved.rebase(saved_at, 0);
        let json = serde_json::to_string(&moved).unwrap();
        let mut restored: ApicTimer = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, moved);
        assert_eq!(restored.remaining(0), Some(166_667));
        assert_eq!(restored.remaining(0), t.remaining(saved_at));
        for dt in [0, 1, 166_666, 166_667, 500_000, 2_000_000] {
            assert_eq!(restored.current_count(dt), t.current_count(saved_at + dt));
        }
        for _ in 0..1000 {
            let d = t.next_deadline().unwrap();
            assert_eq!(restored.next_deadline(), Some(d - saved_at));
            assert!(t.poll(d));
            assert!(restored.poll(d - saved_at));
        }
        // Moving back to the first timeline gives the very same state.
        moved.rebase(0, saved_at);
        assert_eq!(moved, original);
    }

    #[test]
    fn snapshot_rebase_keeps_a_pending_expiry() {
        let mut t = counting(TimerMode::OneShot, 0, 100, 0);
        t.rebase(1000, 10);
        assert_eq!(t.next_deadline(), Some(0));
        assert!(t.poll(10));
        assert!(!t.poll(20));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Mode(u8),
        Dcr(u32),
        Initial(u32),
        Deadline(u64),
        Poll,
        Rebase(u64),
        Clock(u64, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::Mode),
            any::<u32>().prop_map(Op::Dcr),
            prop_oneof![0u32..2000, any::<u32>()].prop_map(Op::Initial),
            prop_oneof![0u64..100_000, any::<u64>()].prop_map(Op::Deadline),
            Just(Op::Poll),
            Just(Op::Poll),
            Just(Op::Poll),
            prop_oneof![0u64..1000, any::<u64>()].prop_map(Op::Rebase),
            (hz(), hz(), any::<u64>()).prop_map(|(b, t, z)| Op::Clock(b, t, z)),
        ]
    }

    fn hz() -> impl Strategy<Value = u64> {
        prop_oneof![Just(GHZ), Just(0), Just(u64::MAX), 1u64..10_000_000_000]
    }

    fn time_step() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..500, 0u64..5_000_000, any::<u64>()]
    }

    proptest! {
        /// SDM vol. 3 §11.5.4: `poll(t)` is true exactly when the deadline announced before it
        /// is due; the current count never exceeds the initial count; nothing panics or
        /// overflows for any register value, clock or time.
        #[test]
        fn poll_matches_next_deadline(
            bus in hz(),
            tsc in hz(),
            steps in prop::collection::vec((op(), time_step()), 1..60),
        ) {
            let mut t = ApicTimer::new(clock(bus, tsc, 0));
            let mut now: Nanos = 0;
            for (op, dt) in steps {
                now = now.saturating_add(dt);
                let before = t.next_deadline();
                match op {
                    Op::Mode(m) => {
                        let mode = [TimerMode::OneShot, TimerMode::Periodic, TimerMode::TscDeadline];
                        t.set_mode(mode[usize::from(m)], now);
                    }
                    Op::Dcr(v) => t.write_divide_config(v, now),
                    Op::Initial(v) => t.write_initial_count(v, now),
                    Op::Deadline(v) => t.write_tsc_deadline(v, now),
                    Op::Poll => {
                        let due = matches!(before, Some(d) if d <= now);
                        prop_assert_eq!(t.poll(now), due);
                        prop_assert!(t.next_deadline().is_none_or(|d| d > now));
                    }
                    Op::Rebase(to) => {
                        // A new timeline starting at `to`; time stays monotonic within it.
                        t.rebase(now, to);
                        now = to;
                    }
                    Op::Clock(b, h, z) => t.set_clock(clock(b, h, z), now),
                }
                prop_assert!(t.current_count(now) <= t.initial_count());
                prop_assert!(t.current_count(now.saturating_add(dt)) <= t.initial_count());
                if t.mode() == TimerMode::TscDeadline {
                    prop_assert_eq!(t.current_count(now), 0);
                } else if let Some(d) = t.next_deadline().filter(|&d| d > now) {
                    // The count and the deadline agree: counting until just before it.
                    prop_assert!(t.current_count(now) >= 1);
                    prop_assert!(t.current_count(d - 1) >= 1);
                    if t.mode() == TimerMode::OneShot {
                        prop_assert_eq!(t.current_count(d), 0);
                    }
                }
                let _ = t.remaining(now);
            }
        }
    }
}
