//! Register map, bit fields and writable masks of the local APIC (SDM vol. 3 §11.4.1 table
//! "Local APIC Register Address Map", §11.5, §11.6, §11.9, §11.12.1.2 table "Local APIC
//! Register Address Map Supported by x2APIC").

/// Size of the xAPIC register page (SDM §11.4.1: the 4 KiB at IA32_APIC_BASE).
pub const PAGE_SIZE: u64 = 0x1000;

// xAPIC MMIO offsets. The x2APIC MSR of a register is `X2APIC_MSR_BASE + (offset >> 4)`.
/// Local APIC ID (SDM §11.4.6): xAPIC bits 31:24 (writable), x2APIC the full 32 bits (read-only).
pub const REG_ID: u32 = 0x020;
/// Version (SDM §11.4.8): version, max LVT entry, directed-EOI support; read-only.
pub const REG_VERSION: u32 = 0x030;
/// Task priority (SDM §11.8.3.1).
pub const REG_TPR: u32 = 0x080;
/// Arbitration priority (SDM §11.6.2.4), read-only; absent in x2APIC mode.
pub const REG_APR: u32 = 0x090;
/// Processor priority (SDM §11.8.3.1), read-only.
pub const REG_PPR: u32 = 0x0A0;
/// EOI (SDM §11.8.5), write-only: ends the highest in-service vector.
pub const REG_EOI: u32 = 0x0B0;
/// Remote read (SDM §11.4.1), read-only and unused: reads 0; absent in x2APIC mode.
pub const REG_RRD: u32 = 0x0C0;
/// Logical destination (SDM §11.6.2.2); read-only in x2APIC mode.
pub const REG_LDR: u32 = 0x0D0;
/// Destination format (SDM §11.6.2.2): flat or cluster model; absent in x2APIC mode.
pub const REG_DFR: u32 = 0x0E0;
/// Spurious-interrupt vector (SDM §11.9): spurious vector, software enable, focus, EOI
/// broadcast suppression.
pub const REG_SVR: u32 = 0x0F0;
/// In-service register, first of eight 32-bit registers at 0x10 intervals (SDM §11.8.4).
pub const REG_ISR0: u32 = 0x100;
/// Trigger-mode register, first of eight (SDM §11.8.4).
pub const REG_TMR0: u32 = 0x180;
/// Interrupt request register, first of eight (SDM §11.8.4).
pub const REG_IRR0: u32 = 0x200;
/// Error status (SDM §11.5.3): a write latches the errors seen since the last latch.
pub const REG_ESR: u32 = 0x280;
/// LVT corrected machine-check interrupt (SDM §11.5.1).
pub const REG_LVT_CMCI: u32 = 0x2F0;
/// Interrupt command, low half (SDM §11.6.1): a write sends the IPI. In x2APIC mode the whole
/// 64-bit ICR is this register's MSR.
pub const REG_ICR_LOW: u32 = 0x300;
/// Interrupt command, high half: the xAPIC destination in bits 31:24; absent in x2APIC mode.
pub const REG_ICR_HIGH: u32 = 0x310;
/// LVT timer (SDM §11.5.1): vector, mask, timer mode.
pub const REG_LVT_TIMER: u32 = 0x320;
/// LVT thermal sensor.
pub const REG_LVT_THERMAL: u32 = 0x330;
/// LVT performance-monitoring counters.
pub const REG_LVT_PERF: u32 = 0x340;
/// LVT LINT0.
pub const REG_LVT_LINT0: u32 = 0x350;
/// LVT LINT1.
pub const REG_LVT_LINT1: u32 = 0x360;
/// LVT error.
pub const REG_LVT_ERROR: u32 = 0x370;
/// Timer initial count (SDM §11.5.4).
pub const REG_TIMER_INITIAL: u32 = 0x380;
/// Timer current count (SDM §11.5.4), read-only.
pub const REG_TIMER_CURRENT: u32 = 0x390;
/// Timer divide configuration (SDM §11.5.4).
pub const REG_TIMER_DCR: u32 = 0x3E0;
/// x2APIC only (SDM §11.12.11); reserved in the xAPIC page.
pub const REG_SELF_IPI: u32 = 0x3F0;

// MSRs.
/// IA32_APIC_BASE (SDM §11.4.4): base address, EN, EXTD, BSP.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE (SDM §11.5.4.1): the timer's deadline in TSC-deadline mode.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC register MSR (SDM §11.12.1.2): MSR `0x800 + (offset >> 4)`.
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// Last MSR of the x2APIC range.
pub const X2APIC_MSR_LAST: u32 = 0x8FF;
/// The 64-bit x2APIC ICR (SDM §11.12.9).
pub const MSR_X2APIC_ICR: u32 = X2APIC_MSR_BASE + (REG_ICR_LOW >> 4);

// Version register (SDM §11.4.8): version 0x14 (integrated APIC), max LVT entry (the number of
// LVTs minus one: 5 for timer, thermal, performance, LINT0, LINT1 and error, 6 with CMCI), bit 24
// "directed EOI (EOI-broadcast suppression) supported".
/// The APIC version, bits 7:0 of the version register.
pub const VERSION_NUMBER: u32 = 0x14;
/// The maximum LVT entry index, bits 23:16 of the version register, of an APIC without the
/// CMCI LVT (six LVTs). KVM's LAPIC reports this unless the VMM gave the vCPU MCG_CAP.MCG_CMCI_P.
pub const VERSION_MAX_LVT: u32 = 5;
/// The maximum LVT entry index of an APIC with the CMCI LVT (seven LVTs, SDM §16.5.1).
pub const VERSION_MAX_LVT_CMCI: u32 = 6;
/// Shift of the maximum LVT entry field.
pub const VERSION_MAX_LVT_SHIFT: u32 = 16;
/// Version bit 24: directed EOI (suppress EOI broadcast, SVR bit 12) is supported.
pub const VERSION_DIRECTED_EOI: u32 = 1 << 24;

// IA32_APIC_BASE (SDM §11.4.4, §11.12.1).
/// BSP flag, bit 8: this processor is the bootstrap processor (R/W, SDM vol. 4 table 2-2).
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// EXTD, bit 10: x2APIC mode (with EN).
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// EN, bit 11: the APIC is globally enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;
/// Base address bits 12..52 (52 is the architectural maximum MAXPHYADDR); the bits at and above
/// the processor's own MAXPHYADDR are reserved too ([`apic_base_reserved`]).
pub const APIC_BASE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// Bits 0-7, 9 and 52-63 are reserved whatever the MAXPHYADDR.
pub const APIC_BASE_RESERVED: u64 =
    !(APIC_BASE_ADDR_MASK | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_EN);
/// The architectural maximum of MAXPHYADDR (SDM vol. 3 §4.1.4): address bits 0-51.
pub const MAX_PHYS_ADDR_LIMIT: u8 = 52;
/// The least MAXPHYADDR the model accepts: the reset base FEE00000H needs address bit 31.
pub const MAX_PHYS_ADDR_MIN: u8 = 32;

/// The reserved bits of IA32_APIC_BASE for a processor whose MAXPHYADDR is `max_phys_addr`
/// (SDM vol. 3 §11.4.4, Figure 11-5: the base field is bits 12 to MAXPHYADDR - 1, and bits
/// MAXPHYADDR to 63 are reserved). Values outside 32..=52 are taken as the nearer bound.
pub fn apic_base_reserved(max_phys_addr: u8) -> u64 {
    let bits = max_phys_addr.clamp(MAX_PHYS_ADDR_MIN, MAX_PHYS_ADDR_LIMIT);
    APIC_BASE_RESERVED | (u64::MAX << bits)
}

/// The power-up APIC base, 0xFEE00000 (SDM §11.4.1).
pub const APIC_BASE_DEFAULT_ADDR: u64 = 0xFEE0_0000;

// Writable bits (SDM §11.4.6 ID, §11.8.3.1 TPR, §11.6.2.2 LDR/DFR, §11.9 SVR).
/// Shift of the xAPIC ID field (bits 31:24).
pub const ID_XAPIC_SHIFT: u32 = 24;
/// The xAPIC ID field.
pub const ID_XAPIC_MASK: u32 = 0xFF00_0000;
/// TPR bits: class in 7:4, sub-class in 3:0.
pub const TPR_MASK: u32 = 0xFF;
/// The xAPIC LDR field: the logical ID in bits 31:24.
pub const LDR_XAPIC_MASK: u32 = 0xFF00_0000;
/// DFR model bits 31:28: 1111B flat, 0000B cluster.
pub const DFR_MODEL_MASK: u32 = 0xF000_0000;
/// DFR bits 27:0 are reserved and read as ones.
pub const DFR_RESERVED_ONES: u32 = 0x0FFF_FFFF;
/// DFR power-up value: flat model, reserved bits all ones.
pub const DFR_FLAT: u32 = 0xFFFF_FFFF;
/// SVR bits 7:0: the spurious-interrupt vector.
pub const SVR_VECTOR_MASK: u32 = 0xFF;
/// SVR bit 8: APIC software enable.
pub const SVR_APIC_ENABLED: u32 = 1 << 8;
/// SVR bit 9: focus processor checking disabled.
pub const SVR_FOCUS_DISABLED: u32 = 1 << 9;
/// SVR bit 12: suppress EOI broadcast (directed EOI), when the version register offers it.
pub const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
/// SVR bits always writable; bit 12 only when directed EOI is supported.
pub const SVR_BASE_MASK: u32 = SVR_VECTOR_MASK | SVR_APIC_ENABLED | SVR_FOCUS_DISABLED;
/// SVR power-up value: vector 0xFF, APIC software-disabled.
pub const SVR_POWER_ON: u32 = 0xFF;

// ESR bits (SDM §11.5.3).
/// Send checksum error (P6 and Pentium only; never set here).
pub const ESR_SEND_CHECKSUM: u32 = 1 << 0;
/// Receive checksum error (P6 and Pentium only; never set here).
pub const ESR_RECEIVE_CHECKSUM: u32 = 1 << 1;
/// Send accept error: no APIC accepted the message (P6 and Pentium only).
pub const ESR_SEND_ACCEPT: u32 = 1 << 2;
/// Receive accept error (P6 and Pentium only).
pub const ESR_RECEIVE_ACCEPT: u32 = 1 << 3;
/// Redirectable IPI: lowest-priority IPI on an APIC that does not support it.
pub const ESR_REDIRECTABLE_IPI: u32 = 1 << 4;
/// Send illegal vector: an IPI with a vector below 16 was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// Receive illegal vector: an interrupt with a vector below 16 was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// Illegal register address: an access to a reserved register offset.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

// ICR (SDM §11.6.1, §11.12.9).
/// ICR bits 7:0: the vector.
pub const ICR_VECTOR_MASK: u32 = 0xFF;
/// Shift of the ICR delivery mode field (bits 10:8).
pub const ICR_DELIVERY_MODE_SHIFT: u32 = 8;
/// ICR bit 11: logical destination mode.
pub const ICR_DEST_LOGICAL: u32 = 1 << 11;
/// ICR bit 12: delivery status (send pending); always 0 here.
pub const ICR_DELIVERY_STATUS: u32 = 1 << 12;
/// ICR bit 14: level, assert (1) or de-assert (0).
pub const ICR_LEVEL_ASSERT: u32 = 1 << 14;
/// ICR bit 15: level-triggered.
pub const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
/// Shift of the destination shorthand field (bits 19:18).
pub const ICR_SHORTHAND_SHIFT: u32 = 18;
/// Bits of ICR low that a write stores: all but delivery status (12), which always reads 0
/// (idle: delivery is instantaneous here). The reserved bits 13, 17:16 and 31:20 read back as
/// written, as KVM's in-kernel LAPIC stores them (the SDM leaves their read value open); the
/// x2APIC view refuses them with #GP ([`ICR_X2APIC_RESERVED`]).
pub const ICR_LOW_MASK: u32 = !ICR_DELIVERY_STATUS;
/// The xAPIC destination field of ICR high, bits 31:24.
pub const ICR_HIGH_XAPIC_MASK: u32 = 0xFF00_0000;
/// Shift of the xAPIC destination field.
pub const ICR_HIGH_XAPIC_SHIFT: u32 = 24;
/// x2APIC ICR must-be-zero bits: 13, 17:16, 31:20 (bit 12, delivery status, is ignored).
pub const ICR_X2APIC_RESERVED: u64 = 0xFFF3_2000;

// LVT fields (SDM §11.5.1, figure "Local Vector Table").
/// LVT bits 7:0: the vector.
pub const LVT_VECTOR_MASK: u32 = 0xFF;
/// LVT delivery mode, bits 10:8 (timer and error have none: always fixed).
pub const LVT_DELIVERY_MODE_MASK: u32 = 0x700;
/// Shift of the LVT delivery mode field.
pub const LVT_DELIVERY_MODE_SHIFT: u32 = 8;
/// LVT bit 12: delivery status, read-only.
pub const LVT_DELIVERY_STATUS: u32 = 1 << 12;
/// LVT bit 13: input pin polarity, active low (LINT0/1 only).
pub const LVT_POLARITY_LOW: u32 = 1 << 13;
/// LVT bit 14: remote IRR of a level-triggered LINT input, read-only.
pub const LVT_REMOTE_IRR: u32 = 1 << 14;
/// LVT bit 15: level-triggered (LINT0/1 only).
pub const LVT_TRIGGER_LEVEL: u32 = 1 << 15;
/// LVT bit 16: masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// Shift of the LVT timer mode field (bits 18:17).
pub const LVT_TIMER_MODE_SHIFT: u32 = 17;
/// The LVT timer mode field: one-shot, periodic or TSC-deadline.
pub const LVT_TIMER_MODE_MASK: u32 = 3 << LVT_TIMER_MODE_SHIFT;

/// Writable bits per LVT (read-only delivery status / remote IRR excluded).
pub const LVT_TIMER_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_MASKED | LVT_TIMER_MODE_MASK;
/// Writable bits of LVT thermal, performance counter and CMCI: vector, delivery mode, mask.
pub const LVT_MODE_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_DELIVERY_MODE_MASK | LVT_MASKED;
/// Writable bits of LVT LINT0/LINT1: also polarity and trigger mode.
pub const LVT_LINT_WRITABLE: u32 = LVT_MODE_WRITABLE | LVT_POLARITY_LOW | LVT_TRIGGER_LEVEL;
/// Writable bits of LVT error: vector and mask.
pub const LVT_ERROR_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_MASKED;

// Timer divide configuration: bits 0, 1 and 3 (SDM §11.5.4).
/// Writable bits of the divide configuration register.
pub const DCR_MASK: u32 = 0xB;

/// Self-IPI: only the vector is defined (SDM §11.12.11).
pub const SELF_IPI_VECTOR_MASK: u64 = 0xFF;

/// The first vector that fixed and lowest-priority delivery may use (SDM §11.5.2).
pub const FIRST_LEGAL_VECTOR: u8 = 16;
