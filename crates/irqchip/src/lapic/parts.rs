//! The local APIC's registers as plain data, for converting to and from other implementations'
//! state formats (KVM's `kvm_lapic_state` page in irqvm). Register values are those the
//! architecture defines (SDM vol. 3 §11.4.1 table "Local APIC Register Address Map"); the timer
//! is an [`ApicTimer`] on the caller's timeline.

use super::regs::*;
use super::timer::{ApicTimer, TimerMode};
use super::{LapicConfig, LocalApic, LocalSource, VectorSet};

/// Every architectural register of one local APIC except the timer's (see
/// [`LocalApic::registers`] and [`LocalApic::from_registers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LapicRegisters {
    /// IA32_APIC_BASE (base address, EN, EXTD, BSP).
    pub apic_base: u64,
    /// The APIC ID as a number (not shifted): 8 bits in xAPIC mode, 32 in x2APIC mode.
    pub id: u32,
    /// TPR, bits 7:0.
    pub tpr: u8,
    /// LDR as the xAPIC page holds it (bits 31:24). Ignored in x2APIC mode, where the LDR is
    /// derived from the ID ([`LocalApic::ldr`] reads it).
    pub ldr: u32,
    /// DFR (model in bits 31:28, the rest reads as ones).
    pub dfr: u32,
    /// SVR (vector, software enable, focus, EOI-broadcast suppression).
    pub svr: u32,
    /// Interrupt request register.
    pub irr: VectorSet,
    /// In-service register.
    pub isr: VectorSet,
    /// Trigger-mode register.
    pub tmr: VectorSet,
    /// ESR as the guest reads it (the errors latched by the last ESR write).
    pub esr: u32,
    /// Errors detected since the last ESR write, not yet visible (SDM §11.5.3). Other
    /// implementations have no such accumulator: 0 when converting from them.
    pub esr_pending: u32,
    /// LVT registers in [`LocalSource::ALL`] order.
    pub lvt: [u32; 7],
    /// ICR bits 31:0.
    pub icr_low: u32,
    /// ICR bits 63:32: xAPIC destination in bits 31:24, x2APIC the 32-bit destination.
    pub icr_high: u32,
}

impl LocalApic {
    /// The registers (the timer's are in [`LocalApic::timer`]). The ID is the plain number.
    pub fn registers(&self) -> LapicRegisters {
        LapicRegisters {
            apic_base: self.apic_base,
            id: self.id,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            irr: self.irr,
            isr: self.isr,
            tmr: self.tmr,
            esr: self.esr_latched,
            esr_pending: self.esr_pending,
            lvt: self.lvt,
            icr_low: self.icr_low,
            icr_high: self.icr_high,
        }
    }

    /// The version register as read (SDM §11.4.8): version 0x14, max LVT entry, and bit 24 when
    /// directed EOI is supported.
    pub fn version_register(&self) -> u32 {
        self.version()
    }

    /// An APIC built from register values, as if a guest (and the host, for the APIC base) had
    /// written them: bits no write can set are dropped (reserved bits of every register but ICR,
    /// LVT delivery status and remote IRR; a reserved timer mode 11b is kept and counts
    /// one-shot), the xAPIC ID keeps 8 bits, in x2APIC mode the ID is the configured one (it is
    /// read-only), and an APIC without CMCI keeps its CMCI LVT masked. Refused: a `timer` whose
    /// mode is not the LVT timer's, and, as [`LocalApic::validate`] refuses a snapshot, an
    /// unreachable IA32_APIC_BASE, x2APIC without support, a timer whose clock is not `cfg`'s or
    /// that is invalid.
    pub fn from_registers(
        cfg: LapicConfig,
        regs: &LapicRegisters,
        timer: ApicTimer,
    ) -> Result<Self, &'static str> {
        let mut apic = Self::new(cfg);
        apic.apic_base = regs.apic_base;
        apic.id = if apic.x2apic() {
            cfg.apic_id.0
        } else {
            regs.id & 0xFF
        };
        apic.tpr = regs.tpr;
        apic.ldr = regs.ldr & LDR_XAPIC_MASK;
        apic.dfr = (regs.dfr & DFR_MODEL_MASK) | DFR_RESERVED_ONES;
        apic.svr = regs.svr & apic.svr_writable_bits();
        apic.irr = regs.irr;
        apic.isr = regs.isr;
        apic.tmr = regs.tmr;
        apic.esr_latched = regs.esr & ESR_DEFINED;
        apic.esr_pending = regs.esr_pending & ESR_DEFINED;
        for source in LocalSource::ALL {
            apic.lvt[source.index()] = regs.lvt[source.index()] & source.writable_bits();
        }
        if !cfg.cmci_supported {
            // No write can reach an absent LVT: it keeps its reset value.
            apic.lvt[LocalSource::Cmci.index()] = LVT_MASKED;
        }
        // The reserved timer mode 11b is kept and counts one-shot, as after a guest write.
        let mode =
            TimerMode::from_lvt(apic.lvt[LocalSource::Timer.index()]).unwrap_or(TimerMode::OneShot);
        apic.icr_low = regs.icr_low & ICR_LOW_MASK;
        apic.icr_high = if apic.x2apic() {
            regs.icr_high
        } else {
            regs.icr_high & ICR_HIGH_XAPIC_MASK
        };
        if timer.mode() != mode {
            return Err("local APIC: the timer's mode is not the LVT timer's");
        }
        apic.timer = timer;
        apic.validate()?;
        Ok(apic)
    }
}

/// Every ESR bit the SDM defines (bits 0-7, §11.5.3).
const ESR_DEFINED: u32 = 0xFF;
