//! Invariants of one local APIC, checked from what the guest can read.
//!
//! [`read`] takes TPR, PPR, APR, ISR, TMR and IRR through the guest interface of the APIC's
//! current mode (xAPIC page, x2APIC MSRs; the model's accessors only when the APIC is globally
//! disabled and has no guest view), checks them against the model's accessors and checks PPR and
//! APR against the SDM formulas. [`Step::check`] then compares two readings around one step.

use irqchip::lapic::{ApicMode, LocalApic};
use irqchip::vcpu::VcpuInterrupts;
use irqchip::Nanos;

use super::input::Input;
use super::prio::{sdm_apr, sdm_ppr, Vectors};

/// Guest access to one APIC, for the model's two owners of a `LocalApic`.
pub trait ApicPort {
    fn apic(&self) -> &LocalApic;
    fn read32(&mut self, offset: u64, now: Nanos) -> u32;
    fn rdmsr(&mut self, msr: u32, now: Nanos) -> Option<u64>;
}

impl ApicPort for LocalApic {
    fn apic(&self) -> &LocalApic {
        self
    }
    fn read32(&mut self, offset: u64, now: Nanos) -> u32 {
        let mut data = [0u8; 4];
        self.mmio_read(offset, &mut data, now);
        u32::from_le_bytes(data)
    }
    fn rdmsr(&mut self, msr: u32, now: Nanos) -> Option<u64> {
        self.msr_read(msr, now).ok()
    }
}

impl ApicPort for VcpuInterrupts {
    fn apic(&self) -> &LocalApic {
        self.lapic()
    }
    fn read32(&mut self, offset: u64, now: Nanos) -> u32 {
        let mut data = [0u8; 4];
        self.mmio_read(offset, &mut data, now);
        u32::from_le_bytes(data)
    }
    fn rdmsr(&mut self, msr: u32, now: Nanos) -> Option<u64> {
        self.msr_read(msr, now).ok()
    }
}

pub const TPR: u64 = 0x80;
pub const APR: u64 = 0x90;
pub const PPR: u64 = 0xA0;
pub const EOI: u64 = 0xB0;
pub const SVR: u64 = 0xF0;
pub const ISR0: u64 = 0x100;
pub const TMR0: u64 = 0x180;
pub const IRR0: u64 = 0x200;
pub const ICR_LOW: u64 = 0x300;
pub const ICR_HIGH: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const LVT_ERROR: u64 = 0x370;
pub const TIMER_INITIAL: u64 = 0x380;
pub const TIMER_DCR: u64 = 0x3E0;
pub const SELF_IPI: u64 = 0x3F0;
pub const MSR_APIC_BASE: u32 = 0x1B;
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;

/// The x2APIC MSR of an xAPIC offset (SDM vol. 3 §11.12.1.2).
pub fn msr_of(offset: u64) -> u32 {
    0x800 + (offset >> 4) as u32
}

/// What the guest reads, checked against the model's accessors and the SDM formulas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub tpr: u8,
    pub ppr: u8,
    pub irr: Vectors,
    pub isr: Vectors,
    pub tmr: Vectors,
    pub svr: u32,
}

fn bank(port: &mut dyn ApicPort, base: u64, now: Nanos, x2: bool) -> Vectors {
    Vectors::from_registers(std::array::from_fn(|n| {
        let offset = base + 0x10 * n as u64;
        if x2 {
            // Truncation: the ISR/TMR/IRR MSRs are 32-bit registers.
            port.rdmsr(msr_of(offset), now)
                .expect("ISR/TMR/IRR MSR reads") as u32
        } else {
            port.read32(offset, now)
        }
    }))
}

fn accessor_bank(set: irqchip::lapic::VectorSet) -> Vectors {
    Vectors(set.words())
}

/// Reads the priority state and checks PPR and APR. Panics (the fuzzer's crash) on a violation.
pub fn read(port: &mut dyn ApicPort, now: Nanos) -> Reading {
    let mode = port.apic().mode();
    let reading = match mode {
        ApicMode::XApic | ApicMode::X2Apic => {
            let x2 = mode == ApicMode::X2Apic;
            let reg = |port: &mut dyn ApicPort, offset: u64| -> u32 {
                if x2 {
                    // Truncation: these x2APIC registers are 32-bit.
                    port.rdmsr(msr_of(offset), now)
                        .expect("x2APIC register read") as u32
                } else {
                    port.read32(offset, now)
                }
            };
            let (tpr, ppr, svr) = (reg(port, TPR), reg(port, PPR), reg(port, SVR));
            assert_eq!(tpr >> 8, 0, "TPR reserved bits read back");
            assert_eq!(ppr >> 8, 0, "PPR reserved bits read back");
            Reading {
                tpr: tpr as u8,
                ppr: ppr as u8,
                irr: bank(port, IRR0, now, x2),
                isr: bank(port, ISR0, now, x2),
                tmr: bank(port, TMR0, now, x2),
                svr,
            }
        }
        ApicMode::Disabled | ApicMode::Invalid => {
            let apic = port.apic();
            Reading {
                tpr: apic.tpr(),
                ppr: apic.ppr(),
                irr: accessor_bank(apic.irr()),
                isr: accessor_bank(apic.isr()),
                tmr: accessor_bank(apic.tmr()),
                svr: 0,
            }
        }
    };
    let apic = port.apic();
    assert_eq!(
        reading.irr,
        accessor_bank(apic.irr()),
        "IRR register vs model"
    );
    assert_eq!(
        reading.isr,
        accessor_bank(apic.isr()),
        "ISR register vs model"
    );
    assert_eq!(
        reading.tmr,
        accessor_bank(apic.tmr()),
        "TMR register vs model"
    );
    assert_eq!(reading.tpr, apic.tpr(), "TPR register vs model");
    let ppr = sdm_ppr(reading.tpr, reading.isr.highest());
    assert_eq!(reading.ppr, ppr, "PPR != SDM formula: {reading:?}");
    let apr = sdm_apr(reading.tpr, reading.isr.highest(), reading.irr.highest());
    assert_eq!(apic.apr(), apr, "APR != SDM formula: {reading:?}");
    if mode == ApicMode::XApic {
        assert_eq!(
            port.read32(APR, now),
            u32::from(apr),
            "APR register != SDM formula: {reading:?}"
        );
    }
    reading
}

/// What may have happened to one APIC between two readings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Step {
    /// Vectors sent (edge / level triggered) that may have reached this APIC since its inbox
    /// was last drained and checked.
    pub edge: Vectors,
    pub level: Vectors,
    /// The vector the step acknowledged (INTA: IRR -> ISR).
    pub acked: Option<u8>,
    /// The step was an EOI of this APIC.
    pub eoi: bool,
    /// The step reset the APIC (INIT, restore): no transition rule applies. (A global disable
    /// keeps the registers, as KVM does, and is checked like any other step.)
    pub reset: bool,
}

impl Step {
    pub fn sent(&mut self, vector: u8, level: bool) {
        if level {
            self.level.insert(vector);
        } else {
            self.edge.insert(vector);
        }
    }

    /// IRR/ISR/TMR consistency between `before` and `after` (SDM vol. 3 §11.8.4-5):
    /// a vector appears in IRR only if it was sent, with TMR set for a level and cleared for an
    /// edge send; it leaves IRR only by INTA, into ISR; ISR gains only the INTA's vector and
    /// loses only, by EOI, its highest vector. Nothing accepted is lost, nothing is doubled.
    pub fn check(&self, before: &Reading, after: &Reading) {
        if self.reset {
            return;
        }
        let sent = self.edge.union(&self.level);
        let new_irr = after.irr.minus(&before.irr);
        assert!(
            new_irr.minus(&sent).is_empty(),
            "IRR gained {:?} without a send (sent {sent:?})",
            new_irr.minus(&sent)
        );
        for v in new_irr.iter() {
            if !self.edge.contains(v) {
                assert!(
                    after.tmr.contains(v),
                    "level vector {v:#x} accepted, TMR clear"
                );
            }
            if !self.level.contains(v) {
                assert!(
                    !after.tmr.contains(v),
                    "edge vector {v:#x} accepted, TMR set"
                );
            }
        }
        let mut acked = Vectors::default();
        if let Some(v) = self.acked {
            acked.insert(v);
        }
        if let Some(v) = self.acked {
            assert!(
                !after.irr.contains(v) || sent.contains(v),
                "INTA of {v:#x} left it in IRR: it would be delivered twice"
            );
        }
        let lost = before.irr.minus(&after.irr);
        assert!(
            lost.minus(&acked).is_empty(),
            "IRR lost {lost:?} (acknowledged {:?})",
            self.acked
        );
        let new_isr = after.isr.minus(&before.isr);
        assert_eq!(
            new_isr, acked,
            "ISR gained {new_isr:?} (acked {:?})",
            self.acked
        );
        let retired = before.isr.minus(&after.isr);
        let mut expected = Vectors::default();
        if self.eoi && !before.isr.is_empty() {
            expected.insert(before.isr.highest());
        }
        assert_eq!(
            retired, expected,
            "ISR lost {retired:?} (EOI: {})",
            self.eoi
        );
    }
}

/// An MSR for a guest access: mostly the x2APIC range, sometimes IA32_APIC_BASE, the TSC
/// deadline or any index.
pub fn msr(input: &mut Input) -> u32 {
    match input.u8() {
        0..=199 => 0x800 + u32::from(input.u8() & 0x3F),
        200..=219 => 0x800 + u32::from(input.u8()),
        220..=229 => MSR_APIC_BASE,
        230..=239 => MSR_TSC_DEADLINE,
        _ => input.u32(),
    }
}

/// An IA32_APIC_BASE value: mostly the default base with EN/EXTD/BSP bits, sometimes any value.
pub fn apic_base(input: &mut Input) -> u64 {
    match input.u8() {
        0..=199 => 0xFEE0_0000 | u64::from(input.u8() & 0xD) << 8,
        _ => input.u64(),
    }
}
