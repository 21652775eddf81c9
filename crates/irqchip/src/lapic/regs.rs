//! Register map, bit fields and writable masks of the local APIC (SDM vol. 3 §11.4.1 table
//! "Local APIC Register Address Map", §11.5, §11.6, §11.9, §11.12.1.2 table "Local APIC Register
//! Address Map Supported by x2APIC").

/// Size of the xAPIC register page (SDM §11.4.1: the 4 KiB at IA32_APIC_BASE).
pub const PAGE_SIZE: u64 = 0x1000;

// xAPIC MMIO offsets. The x2APIC MSR of a register is `X2APIC_MSR_BASE + (offset >> 4)`.
pub const REG_ID: u32 = 0x020;
pub const REG_VERSION: u32 = 0x030;
pub const REG_TPR: u32 = 0x080;
pub const REG_APR: u32 = 0x090;
pub const REG_PPR: u32 = 0x0A0;
pub const REG_EOI: u32 = 0x0B0;
pub const REG_RRD: u32 = 0x0C0;
pub const REG_LDR: u32 = 0x0D0;
pub const REG_DFR: u32 = 0x0E0;
pub const REG_SVR: u32 = 0x0F0;
pub const REG_ISR0: u32 = 0x100;
pub const REG_TMR0: u32 = 0x180;
pub const REG_IRR0: u32 = 0x200;
pub const REG_ESR: u32 = 0x280;
pub const REG_LVT_CMCI: u32 = 0x2F0;
pub const REG_ICR_LOW: u32 = 0x300;
pub const REG_ICR_HIGH: u32 = 0x310;
pub const REG_LVT_TIMER: u32 = 0x320;
pub const REG_LVT_THERMAL: u32 = 0x330;
pub const REG_LVT_PERF: u32 = 0x340;
pub const REG_LVT_LINT0: u32 = 0x350;
pub const REG_LVT_LINT1: u32 = 0x360;
pub const REG_LVT_ERROR: u32 = 0x370;
pub const REG_TIMER_INITIAL: u32 = 0x380;
pub const REG_TIMER_CURRENT: u32 = 0x390;
pub const REG_TIMER_DCR: u32 = 0x3E0;
/// x2APIC only (SDM §11.12.11); reserved in the xAPIC page.
pub const REG_SELF_IPI: u32 = 0x3F0;

// MSRs.
pub const MSR_APIC_BASE: u32 = 0x1B;
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
pub const X2APIC_MSR_BASE: u32 = 0x800;
pub const X2APIC_MSR_LAST: u32 = 0x8FF;
/// The 64-bit x2APIC ICR (SDM §11.12.9).
pub const MSR_X2APIC_ICR: u32 = X2APIC_MSR_BASE + (REG_ICR_LOW >> 4);

// Version register (SDM §11.4.8): version 0x14 (integrated APIC), max LVT entry 6 (seven LVTs
// including CMCI), bit 24 "directed EOI (EOI-broadcast suppression) supported".
pub const VERSION_NUMBER: u32 = 0x14;
pub const VERSION_MAX_LVT: u32 = 6;
pub const VERSION_MAX_LVT_SHIFT: u32 = 16;
pub const VERSION_DIRECTED_EOI: u32 = 1 << 24;

// IA32_APIC_BASE (SDM §11.4.4, §11.12.1).
pub const APIC_BASE_BSP: u64 = 1 << 8;
pub const APIC_BASE_EXTD: u64 = 1 << 10;
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
pub const APIC_BASE_DEFAULT_ADDR: u64 = 0xFEE0_0000;

// Writable bits (SDM §11.4.6 ID, §11.8.3.1 TPR, §11.6.2.2 LDR/DFR, §11.9 SVR).
pub const ID_XAPIC_SHIFT: u32 = 24;
pub const ID_XAPIC_MASK: u32 = 0xFF00_0000;
pub const TPR_MASK: u32 = 0xFF;
pub const LDR_XAPIC_MASK: u32 = 0xFF00_0000;
pub const DFR_MODEL_MASK: u32 = 0xF000_0000;
/// DFR bits 27:0 are reserved and read as ones.
pub const DFR_RESERVED_ONES: u32 = 0x0FFF_FFFF;
pub const DFR_FLAT: u32 = 0xFFFF_FFFF;
pub const SVR_VECTOR_MASK: u32 = 0xFF;
pub const SVR_APIC_ENABLED: u32 = 1 << 8;
pub const SVR_FOCUS_DISABLED: u32 = 1 << 9;
pub const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
/// SVR bits always writable; bit 12 only when directed EOI is supported.
pub const SVR_BASE_MASK: u32 = SVR_VECTOR_MASK | SVR_APIC_ENABLED | SVR_FOCUS_DISABLED;
pub const SVR_POWER_ON: u32 = 0xFF;

// ESR bits (SDM §11.5.3).
pub const ESR_SEND_CHECKSUM: u32 = 1 << 0;
pub const ESR_RECEIVE_CHECKSUM: u32 = 1 << 1;
pub const ESR_SEND_ACCEPT: u32 = 1 << 2;
pub const ESR_RECEIVE_ACCEPT: u32 = 1 << 3;
pub const ESR_REDIRECTABLE_IPI: u32 = 1 << 4;
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

// ICR (SDM §11.6.1, §11.12.9).
pub const ICR_VECTOR_MASK: u32 = 0xFF;
pub const ICR_DELIVERY_MODE_SHIFT: u32 = 8;
pub const ICR_DEST_LOGICAL: u32 = 1 << 11;
pub const ICR_DELIVERY_STATUS: u32 = 1 << 12;
pub const ICR_LEVEL_ASSERT: u32 = 1 << 14;
pub const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
pub const ICR_SHORTHAND_SHIFT: u32 = 18;
/// Bits of ICR low that hold state: vector, delivery mode, destination mode, level, trigger,
/// shorthand. Delivery status (12) always reads 0 (idle): delivery is instantaneous here.
pub const ICR_LOW_MASK: u32 = 0x000C_CFFF;
pub const ICR_HIGH_XAPIC_MASK: u32 = 0xFF00_0000;
pub const ICR_HIGH_XAPIC_SHIFT: u32 = 24;
/// x2APIC ICR must-be-zero bits: 13, 17:16, 31:20 (bit 12, delivery status, is ignored).
pub const ICR_X2APIC_RESERVED: u64 = 0xFFF3_2000;

// LVT fields (SDM §11.5.1, figure "Local Vector Table").
pub const LVT_VECTOR_MASK: u32 = 0xFF;
pub const LVT_DELIVERY_MODE_MASK: u32 = 0x700;
pub const LVT_DELIVERY_MODE_SHIFT: u32 = 8;
pub const LVT_DELIVERY_STATUS: u32 = 1 << 12;
pub const LVT_POLARITY_LOW: u32 = 1 << 13;
pub const LVT_REMOTE_IRR: u32 = 1 << 14;
pub const LVT_TRIGGER_LEVEL: u32 = 1 << 15;
pub const LVT_MASKED: u32 = 1 << 16;
pub const LVT_TIMER_MODE_SHIFT: u32 = 17;
pub const LVT_TIMER_MODE_MASK: u32 = 3 << LVT_TIMER_MODE_SHIFT;

/// Writable bits per LVT (read-only delivery status / remote IRR excluded).
pub const LVT_TIMER_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_MASKED | LVT_TIMER_MODE_MASK;
pub const LVT_MODE_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_DELIVERY_MODE_MASK | LVT_MASKED;
pub const LVT_LINT_WRITABLE: u32 = LVT_MODE_WRITABLE | LVT_POLARITY_LOW | LVT_TRIGGER_LEVEL;
pub const LVT_ERROR_WRITABLE: u32 = LVT_VECTOR_MASK | LVT_MASKED;

// Timer divide configuration: bits 0, 1 and 3 (SDM §11.5.4).
pub const DCR_MASK: u32 = 0xB;

/// Self-IPI: only the vector is defined (SDM §11.12.11).
pub const SELF_IPI_VECTOR_MASK: u64 = 0xFF;

/// The first vector that fixed and lowest-priority delivery may use (SDM §11.5.2).
pub const FIRST_LEGAL_VECTOR: u8 = 16;
