//! `lapic_regs`: one local APIC alone, every guest-facing entry point with any argument: xAPIC
//! page reads and writes at any offset and size, any MSR (x2APIC range, IA32_APIC_BASE,
//! TSC_DEADLINE, others), APIC base transitions (guest and host), bus acceptance, local
//! interrupts, INTA, CR8, INIT, the timer on a fake clock. Checked after every step: the
//! register invariants of [`super::apic`], the IPI an ICR write produces against the ICR
//! fields, INTA against the SDM's selection rule, and a serde round trip at the end.

use irqchip::lapic::{ApicMode, LapicConfig, LapicEffect, LocalApic, LocalSource};
use irqchip::types::DestinationFormat;
use irqchip::{ApicId, ClockConfig, Nanos, TriggerMode};

use super::apic::{self, apic_base, msr, msr_of, ApicPort, Reading, Step};
use super::input::Input;
use super::prio::{deliverable, Vectors};

const MAX_STEPS: usize = 5000;

struct Harness {
    apic: LocalApic,
    now: Nanos,
    seen: Reading,
}

impl Harness {
    fn settle(&mut self, mut step: Step) {
        let error = self.apic.lvt(LocalSource::Error);
        step.sent(error as u8, false);
        let reading = apic::read(&mut self.apic, self.now);
        step.check(&self.seen, &reading);
        self.seen = reading;
    }

    /// The IPI a write produced must be the ICR the harness wrote.
    fn check_ipi(
        &self,
        effect: LapicEffect,
        low: u32,
        destination: u32,
        format: DestinationFormat,
    ) {
        let fixed_or_lowest = (low >> 8) & 7 <= 1;
        if fixed_or_lowest && low & (1 << 15) != 0 && low & (1 << 14) == 0 {
            assert_eq!(
                effect,
                LapicEffect::None,
                "a fixed or lowest-priority de-assert sends nothing"
            );
        }
        if let LapicEffect::SendIpi(message) = effect {
            assert_eq!(message.vector, low as u8, "IPI vector");
            assert_eq!(
                message.delivery_mode.bits(),
                (low >> 8) & 7,
                "IPI delivery mode"
            );
            assert_eq!(message.destination, destination, "IPI destination");
            assert_eq!(message.format, format, "IPI destination format");
            let level = low & (1 << 15) != 0;
            assert_eq!(message.trigger == TriggerMode::Level, level, "IPI trigger");
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let xapic = self.apic.mode() == ApicMode::XApic;
        let icr_high = self.apic.read32(apic::ICR_HIGH, self.now);
        let effect = self.apic.mmio_write(offset, data, self.now);
        let four = data.len() == 4;
        let value = if four {
            u32::from_le_bytes([data[0], data[1], data[2], data[3]])
        } else {
            0
        };
        let is_eoi = xapic && four && offset == apic::EOI;
        if xapic && four && offset == apic::ICR_LOW {
            self.check_ipi(effect, value, icr_high >> 24, DestinationFormat::Xapic);
        } else {
            assert!(
                !matches!(effect, LapicEffect::SendIpi(_)),
                "IPI from a non-ICR write"
            );
        }
        self.check_eoi(effect, is_eoi);
        self.settle(Step {
            eoi: is_eoi,
            ..Step::default()
        });
    }

    fn msr_write(&mut self, msr: u32, value: u64) {
        let x2 = self.apic.mode() == ApicMode::X2Apic;
        let mut step = Step::default();
        if x2 && msr == msr_of(apic::SELF_IPI) {
            step.sent(value as u8, false);
        }
        let result = self.apic.msr_write(msr, value, self.now);
        if let Ok(effect) = result {
            if x2 && msr == msr_of(apic::ICR_LOW) {
                let (low, high) = (value as u32, (value >> 32) as u32);
                self.check_ipi(effect, low, high, DestinationFormat::X2apic);
            }
            step.eoi = x2 && msr == msr_of(apic::EOI);
            self.check_eoi(effect, step.eoi);
        }
        self.settle(step);
    }

    /// An EOI effect only from an EOI, and only for a level vector (TMR set) without
    /// suppression (SDM vol. 3 §11.8.5).
    fn check_eoi(&self, effect: LapicEffect, is_eoi: bool) {
        let top = self.seen.isr.highest();
        let broadcast = is_eoi
            && !self.seen.isr.is_empty()
            && self.seen.tmr.contains(top)
            && self.seen.svr & (1 << 12) == 0;
        match effect {
            LapicEffect::Eoi(message) => {
                assert!(broadcast, "unexpected EOI broadcast {message:?}");
                assert_eq!(message.vector, top, "EOI broadcast of the wrong vector");
            }
            _ => assert!(!broadcast, "EOI of level vector {top:#x} not broadcast"),
        }
    }

    fn inta(&mut self) {
        let expected = if self.apic.hw_enabled() {
            deliverable(&self.seen.irr, self.seen.ppr)
        } else {
            None
        };
        assert_eq!(self.apic.pending_interrupt(), expected, "pending interrupt");
        let acked = self.apic.acknowledge_interrupt();
        assert_eq!(acked, expected, "INTA");
        self.settle(Step {
            acked,
            ..Step::default()
        });
    }

    fn step(&mut self, input: &mut Input) {
        match input.u8() % 14 {
            0 => {
                let offset = offset(input);
                let len = input.below(17);
                let data = input.bytes(len).to_vec();
                self.mmio_write(offset, &data);
            }
            1 => {
                let (offset, len) = (offset(input), input.below(17));
                let mut data = vec![0xA5; len];
                self.apic.mmio_read(offset, &mut data, self.now);
                self.settle(Step::default());
            }
            2 => {
                let (msr, value) = (msr(input), input.u64());
                self.msr_write(msr, value);
            }
            3 => {
                let msr = msr(input);
                let _ = self.apic.msr_read(msr, self.now);
                self.settle(Step::default());
            }
            4 => {
                let (value, host) = (apic_base(input), input.u8() & 3 == 0);
                let reset = self.apic.set_apic_base(value, host).is_ok();
                self.settle(Step {
                    reset,
                    ..Step::default()
                });
            }
            5 => {
                let (vector, level) = (input.u8(), input.bool());
                let trigger = if level {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                };
                let mut step = Step::default();
                step.sent(vector, level);
                self.apic.accept_vector(vector, trigger);
                self.settle(step);
            }
            6 => self.inta(),
            7 => {
                let source = input.pick(&LocalSource::ALL);
                let mut step = Step::default();
                let vector = self.apic.lvt(source) as u8;
                step.sent(vector, false);
                step.sent(vector, true);
                let _ = self.apic.local_interrupt(source);
                self.settle(step);
            }
            8 => {
                let delta = u64::from(input.u16()) << input.below(40);
                self.now = self.now.saturating_add(delta).min(1 << 53);
                let mut step = Step::default();
                step.sent(self.apic.lvt(LocalSource::Timer) as u8, false);
                self.apic.poll_timer(self.now);
                self.settle(step);
            }
            9 => {
                self.apic.set_cr8(u64::from(input.u8()));
                self.settle(Step::default());
            }
            10 => {
                self.apic.init_reset();
                self.settle(Step {
                    reset: true,
                    ..Step::default()
                });
                assert!(self.seen.irr.is_empty() && self.seen.isr.is_empty(), "INIT");
            }
            11 => {
                let pir = [input.u64(), input.u64(), input.u64(), input.u64()];
                let level = [input.u64(), input.u64(), input.u64(), input.u64()];
                let step = Step {
                    level: Vectors(std::array::from_fn(|i| pir[i] & level[i])),
                    edge: Vectors(std::array::from_fn(|i| pir[i] & !level[i])),
                    ..Step::default()
                };
                self.apic.accept_posted(&pir, &level);
                self.settle(step);
            }
            12 => {
                // A timer program on the view of the current mode.
                let lvt = input.u32() & 0x7_00FF;
                let count = input.u32() >> input.below(32);
                for (offset, value) in [
                    (apic::TIMER_DCR, 0xB),
                    (apic::LVT_TIMER, lvt),
                    (apic::TIMER_INITIAL, count),
                ] {
                    if self.apic.mode() == ApicMode::X2Apic {
                        self.msr_write(msr_of(offset), u64::from(value));
                    } else {
                        self.mmio_write(offset, &value.to_le_bytes());
                    }
                }
            }
            _ => self.round_trip(),
        }
    }

    /// JSON round trip and the snapshot timeline move (to time 0 and back) change nothing.
    fn round_trip(&mut self) {
        let json = serde_json::to_string(&self.apic).expect("serializes");
        let back: LocalApic = serde_json::from_str(&json).expect("deserializes");
        assert!(back == self.apic, "JSON round trip");
        assert_eq!(self.apic.validate(), Ok(()), "a reachable state validates");
        let mut moved = self.apic.clone();
        moved.rebase_timeline(self.now, 0);
        moved.rebase_timeline(0, self.now);
        // An expiry already due fires at the next poll either way: the move may settle it
        // (pending at `now`) where the unmoved timer still holds its past deadline.
        let due = |apic: &LocalApic| apic.timer().next_deadline().map(|d| d.max(self.now));
        assert_eq!(
            due(&moved),
            due(&self.apic),
            "timeline move changed when the timer fires"
        );
    }
}

fn offset(input: &mut Input) -> u64 {
    match input.u8() {
        0..=199 => {
            let slot = u64::from(input.u8() & 0x3F) << 4;
            let within = u64::from(input.u8() % 8);
            slot | if input.bool() { within } else { 0 }
        }
        200..=239 => u64::from(input.u16() & 0x1FFF),
        _ => input.u64(),
    }
}

/// The `lapic_regs` target.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let cfg = LapicConfig {
        index: 0,
        apic_id: ApicId(if flags & 1 == 0 { 0 } else { input.u32() }),
        bsp: flags & 2 == 0,
        clock: ClockConfig {
            apic_bus_hz: [1_000_000_000, 100_000_000, 7][usize::from(flags >> 6) % 3],
            tsc_hz: [1_000_000_000, 2_500_000_000, 3][usize::from(flags >> 4 & 3) % 3],
            tsc_at_zero: 0,
        },
        x2apic_supported: flags & 4 == 0,
        directed_eoi_supported: flags & 8 == 0,
        // Bits 5:4 = 3 select the same TSC rate as 0 (index mod 3), so they can also pick CMCI.
        cmci_supported: flags & 0x30 == 0x30,
        max_phys_addr: irqchip::lapic::regs::MAX_PHYS_ADDR_LIMIT,
    };
    let mut apic = LocalApic::new(cfg);
    let seen = apic::read(&mut apic, 0);
    let mut harness = Harness { apic, now: 0, seen };
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        harness.step(&mut input);
    }
    harness.round_trip();
}
