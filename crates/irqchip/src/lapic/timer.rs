//! PLACEHOLDER APIC timer (SDM vol. 3 §11.5.4) with the contract API only, so that the local APIC
//! compiles on its own branch. The real implementation comes from the timer branch; drop this file
//! when merging it.

use crate::types::{ClockConfig, Nanos};
use serde::{Deserialize, Serialize};

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// LVT timer bits 18:17.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApicTimer {
    clock: ClockConfig,
    mode: TimerMode,
    dcr: u32,
    initial: u32,
    start: Nanos,
    period: u64,
    deadline: Option<Nanos>,
    tsc_deadline: u64,
}

impl ApicTimer {
    pub fn new(clock: ClockConfig) -> Self {
        Self {
            clock,
            mode: TimerMode::OneShot,
            dcr: 0,
            initial: 0,
            start: 0,
            period: 0,
            deadline: None,
            tsc_deadline: 0,
        }
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.clock);
    }

    pub fn mode(&self) -> TimerMode {
        self.mode
    }

    pub fn set_mode(&mut self, mode: TimerMode, _now: Nanos) {
        if mode != self.mode {
            self.mode = mode;
            self.initial = 0;
            self.deadline = None;
            self.tsc_deadline = 0;
        }
    }

    pub fn write_divide_config(&mut self, dcr: u32, _now: Nanos) {
        self.dcr = dcr & 0xB;
    }

    pub fn divide_config(&self) -> u32 {
        self.dcr
    }

    fn divisor(&self) -> u128 {
        let v = (self.dcr & 3) | ((self.dcr & 8) >> 1);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    fn ticks_to_ns(&self, ticks: u32) -> u64 {
        let hz = u128::from(self.clock.apic_bus_hz.max(1));
        let ns = u128::from(ticks) * self.divisor() * NANOS_PER_SEC / hz;
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    pub fn write_initial_count(&mut self, count: u32, now: Nanos) {
        if self.mode == TimerMode::TscDeadline {
            return;
        }
        self.initial = count;
        self.start = now;
        if count == 0 {
            self.deadline = None;
            return;
        }
        self.period = self.ticks_to_ns(count);
        self.deadline = Some(now.saturating_add(self.period));
    }

    pub fn initial_count(&self) -> u32 {
        self.initial
    }

    pub fn current_count(&self, now: Nanos) -> u32 {
        let Some(deadline) = self.deadline else {
            return 0;
        };
        if self.mode == TimerMode::TscDeadline {
            return 0;
        }
        let remaining = u128::from(deadline.saturating_sub(now));
        let hz = u128::from(self.clock.apic_bus_hz.max(1));
        let ticks = remaining * hz / (NANOS_PER_SEC * self.divisor());
        u32::try_from(ticks).unwrap_or(u32::MAX).min(self.initial)
    }

    pub fn write_tsc_deadline(&mut self, deadline_tsc: u64, now: Nanos) {
        if self.mode != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = deadline_tsc;
        if deadline_tsc == 0 {
            self.deadline = None;
            return;
        }
        let ticks = u128::from(deadline_tsc.saturating_sub(self.clock.tsc_at_zero));
        let ns = ticks * NANOS_PER_SEC / u128::from(self.clock.tsc_hz.max(1));
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        self.deadline = Some(ns.max(now));
    }

    pub fn tsc_deadline(&self) -> u64 {
        if self.mode == TimerMode::TscDeadline && self.deadline.is_some() {
            self.tsc_deadline
        } else {
            0
        }
    }

    pub fn next_deadline(&self) -> Option<Nanos> {
        self.deadline
    }

    pub fn poll(&mut self, now: Nanos) -> bool {
        match self.deadline {
            Some(deadline) if deadline <= now => {
                if self.mode == TimerMode::Periodic {
                    let missed = (now - deadline) / self.period.max(1);
                    let next = deadline
                        .saturating_add(self.period.saturating_mul(missed.saturating_add(1)));
                    self.deadline = Some(next);
                } else {
                    self.deadline = None;
                    self.tsc_deadline = 0;
                }
                true
            }
            _ => false,
        }
    }
}
