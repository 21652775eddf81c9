//! The architectural processor state after power-up, RESET and INIT, as data the VMM loads into
//! the vCPU: SDM vol. 3A §10.1.1, Table 10-1 "IA-32 and Intel 64 Processor States Following
//! Power-up, Reset, or INIT" (§9.1.1 / Table 9-1 in older editions).
//!
//! SDM §10.1: "during an INIT, the internal caches, MSRs, MTRRs, and x87 FPU/MMX/SSE state are
//! left unchanged (although, the TLBs and BTB are invalidated as with a hardware reset)". Values
//! that INIT keeps are `None` in [`ArchResetState::after_init`], and
//! [`ArchResetState::preserved`] lists everything the VMM must leave as it is.
//!
//! The local APIC is not here: INIT resets it through `LocalApic::init_reset`
//! (SDM §11.4.7.3), which also clears TPR and thus CR8.

use serde::{Deserialize, Serialize};

/// CR0.ET (bit 4): set by every reset.
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NW (bit 29), not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD (bit 30), cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0 after power-up and RESET: CD, NW and ET set (Table 10-1).
pub const CR0_RESET_VALUE: u64 = CR0_CD | CR0_NW | CR0_ET;
/// The CR0 bits INIT leaves unchanged (Table 10-1, note 2: "The CD and NW flags are unchanged,
/// bit 4 is set to 1, all other bits are cleared").
pub const CR0_KEPT_BY_INIT: u64 = CR0_CD | CR0_NW;

/// RFLAGS after any reset: only the always-one bit 1 (Table 10-1).
pub const RFLAGS_RESET_VALUE: u64 = 0x2;
/// RIP after any reset; with CS base 0xFFFF_0000 the first fetch is at 0xFFFF_FFF0.
pub const RIP_RESET_VALUE: u64 = 0xFFF0;
/// DR6 after any reset (Table 10-1).
pub const DR6_RESET_VALUE: u64 = 0xFFFF_0FF0;
/// DR7 after any reset (Table 10-1).
pub const DR7_RESET_VALUE: u64 = 0x400;
/// XCR0 after power-up: x87 state only (SDM vol. 1 §13.3). INIT keeps XCR0 (KVM: reset only).
pub const XCR0_RESET_VALUE: u64 = 0x1;
/// IA32_PAT after power-up (SDM vol. 3 "PAT Initialization"); INIT keeps it.
pub const PAT_RESET_VALUE: u64 = 0x0007_0406_0007_0406;
/// SMBASE after power-up (SDM vol. 3 "SMRAM"); INIT does not relocate SMRAM back.
pub const SMBASE_RESET_VALUE: u64 = 0x3_0000;
/// A family-6 signature for EDX when the VMM has no CPUID leaf 1 at hand (KVM uses the same).
pub const DEFAULT_PROCESSOR_SIGNATURE: u32 = 0x600;

/// Access rights in the VMX / KVM layout (type in bits 3:0, S bit 4, DPL bits 6:5, P bit 7).
/// Table 10-1 gives "Present, R/W, Accessed" for every segment: data segments are type 3.
pub const AR_DATA_RW_ACCESSED: u16 = 0x93;
/// CS as a code segment: type 11 (execute/read, accessed), S=1, P=1. The table's "R/W" for CS
/// means readable; a VMM must load a code type for CS.
pub const AR_CODE_RX_ACCESSED: u16 = 0x9B;
/// LDTR: system type 2 (LDT), present. Table 10-1 says "Present, R/W"; VM entry and KVM require
/// a genuine LDT type.
pub const AR_LDT: u16 = 0x82;
/// TR: system type 11 (busy 32-bit TSS), present, as KVM loads it (VM entry requires type 3 or 11).
pub const AR_TSS_BUSY: u16 = 0x8B;

/// Indices of [`ArchResetState::gprs`], in x86 register encoding order.
pub mod gpr {
    /// RAX (encoding 0): 0 after reset (no BIST result).
    pub const RAX: usize = 0;
    /// RCX (encoding 1).
    pub const RCX: usize = 1;
    /// RDX (encoding 2): holds the processor signature after reset.
    pub const RDX: usize = 2;
    /// RBX (encoding 3).
    pub const RBX: usize = 3;
    /// RSP (encoding 4).
    pub const RSP: usize = 4;
    /// RBP (encoding 5).
    pub const RBP: usize = 5;
    /// RSI (encoding 6).
    pub const RSI: usize = 6;
    /// RDI (encoding 7).
    pub const RDI: usize = 7;
    /// R8 (encoding 8).
    pub const R8: usize = 8;
    /// R9 (encoding 9).
    pub const R9: usize = 9;
    /// R10 (encoding 10).
    pub const R10: usize = 10;
    /// R11 (encoding 11).
    pub const R11: usize = 11;
    /// R12 (encoding 12).
    pub const R12: usize = 12;
    /// R13 (encoding 13).
    pub const R13: usize = 13;
    /// R14 (encoding 14).
    pub const R14: usize = 14;
    /// R15 (encoding 15).
    pub const R15: usize = 15;
}

/// One segment register with its hidden part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentState {
    /// The visible selector.
    pub selector: u16,
    /// Hidden part: the linear base address.
    pub base: u64,
    /// Hidden part: the limit, in bytes (byte granularity).
    pub limit: u32,
    /// Hidden part: the access rights (type, S, DPL, P; the `AR_*` constants), in the 16-bit VMCS
    /// layout (type in bits 3:0, S bit 4, DPL bits 6:5, P bit 7).
    pub access_rights: u16,
}

impl SegmentState {
    /// SS, DS, ES, FS, GS after reset: selector 0, base 0, limit 0xFFFF, data R/W accessed.
    pub const RESET_DATA: Self = Self {
        selector: 0,
        base: 0,
        limit: 0xFFFF,
        access_rights: AR_DATA_RW_ACCESSED,
    };
    /// CS after reset: selector 0xF000, base 0xFFFF_0000, limit 0xFFFF.
    pub const RESET_CODE: Self = Self {
        selector: 0xF000,
        base: 0xFFFF_0000,
        limit: 0xFFFF,
        access_rights: AR_CODE_RX_ACCESSED,
    };
    /// LDTR after reset: null selector, base 0, limit 0xFFFF.
    pub const RESET_LDTR: Self = Self {
        selector: 0,
        base: 0,
        limit: 0xFFFF,
        access_rights: AR_LDT,
    };
    /// TR after reset: null selector, base 0, limit 0xFFFF.
    pub const RESET_TR: Self = Self {
        selector: 0,
        base: 0,
        limit: 0xFFFF,
        access_rights: AR_TSS_BUSY,
    };
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address of the table.
    pub base: u64,
    /// Limit of the table, in bytes minus one.
    pub limit: u16,
}

impl DescriptorTable {
    /// GDTR and IDTR after reset: base 0, limit 0xFFFF (Table 10-1).
    pub const RESET: Self = Self {
        base: 0,
        limit: 0xFFFF,
    };
}

/// x87 / MMX / SSE state after power-up or RESET (Table 10-1, "Pwr up or Reset" column). INIT
/// leaves all of it unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FpuResetState {
    /// Control word 0040H (not FNINIT's 037FH).
    pub fcw: u16,
    /// Status word 0000H.
    pub fsw: u16,
    /// Full tag word 5555H: every register tagged "zero". In the abridged FXSAVE form (KVM's
    /// `kvm_fpu.ftwx`) that is 0xFF, every register valid.
    pub ftw: u16,
    /// Last instruction/data pointers and selectors, opcode: 0.
    pub pointers: u64,
    /// ST0-ST7 = +0.0, MM0-MM7 = 0, XMM/YMM = 0.
    pub registers_zero: bool,
    /// MXCSR 1F80H: all SIMD exceptions masked, round to nearest.
    pub mxcsr: u32,
}

impl FpuResetState {
    /// The "Pwr up or Reset" column of Table 10-1.
    pub const POWER_UP: Self = Self {
        fcw: 0x0040,
        fsw: 0,
        ftw: 0x5555,
        pointers: 0,
        registers_zero: true,
        mxcsr: 0x1F80,
    };
}

/// What triggered a reset: the two columns of Table 10-1 that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResetCause {
    /// Power-up or RESET# (identical in the table, except the "undefined" MSRs).
    PowerUp,
    /// The INIT signal or an INIT IPI.
    Init,
}

/// Architectural state INIT leaves unchanged (Table 10-1, INIT column "Unchanged"; SDM §10.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PreservedState {
    /// CR0.CD and CR0.NW (note 2 of the table); [`ArchResetState::cr0_from`] applies it.
    Cr0CacheControl,
    /// ST0-ST7, x87 control/status/tag words, FPU pointers and selectors.
    X87,
    /// MM0-MM7.
    Mmx,
    /// XMM0-XMM15, the upper halves of YMM/ZMM, MXCSR.
    SseAvx,
    /// XCR0 and IA32_XSS (KVM resets them on power-up only).
    ExtendedControlRegisters,
    /// The time-stamp counter.
    Tsc,
    /// Performance counters and event selects.
    PerformanceCounters,
    /// Fixed and variable MTRRs and IA32_MTRR_DEF_TYPE.
    Mtrrs,
    /// IA32_PAT.
    Pat,
    /// SMBASE (SMRAM location).
    Smbase,
    /// Machine-check banks and control.
    MachineCheck,
    /// IA32_APIC_BASE (APIC enable state and base). The APIC's registers are reset by
    /// `LocalApic::init_reset`.
    ApicBase,
    /// "All other MSRs" except IA32_EFER, which INIT clears.
    OtherMsrs,
    /// Data and code caches (TLBs and BTB are invalidated).
    Caches,
}

/// Everything INIT leaves alone, in table order.
pub const PRESERVED_BY_INIT: &[PreservedState] = &[
    PreservedState::Cr0CacheControl,
    PreservedState::X87,
    PreservedState::Mmx,
    PreservedState::SseAvx,
    PreservedState::ExtendedControlRegisters,
    PreservedState::Tsc,
    PreservedState::PerformanceCounters,
    PreservedState::Mtrrs,
    PreservedState::Pat,
    PreservedState::Smbase,
    PreservedState::MachineCheck,
    PreservedState::ApicBase,
    PreservedState::OtherMsrs,
    PreservedState::Caches,
];

/// The register state a reset loads (Table 10-1), for the VMM to map to its vCPU structures
/// (KVM: `kvm_regs`, `kvm_sregs`, `kvm_debugregs`, `kvm_fpu`, `kvm_xcrs`, MSRs). `None` means
/// "unchanged": leave what the vCPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ArchResetState {
    /// Which reset this is: power-up/RESET or INIT.
    pub cause: ResetCause,
    /// RIP: 0000FFF0H, so with the CS base the first fetch is at FFFFFFF0H.
    pub rip: u64,
    /// RFLAGS: 00000002H (only the always-one bit 1).
    pub rflags: u64,
    /// RAX..R15 in encoding order (see [`gpr`]). All zero (RAX = 0: BIST passed or not run)
    /// except RDX = the processor signature, `000n06xxH` (CPUID.1:EAX).
    pub gprs: [u64; 16],
    /// CR0 = `(old & cr0_kept) | (cr0 & !cr0_kept)`; see [`cr0_from`](Self::cr0_from).
    pub cr0: u64,
    /// CR0 bits INIT keeps from the old value (CD and NW, Table 10-1 note); 0 for power-up.
    pub cr0_kept: u64,
    /// CR2: 0.
    pub cr2: u64,
    /// CR3: 0.
    pub cr3: u64,
    /// CR4: 0.
    pub cr4: u64,
    /// IA32_EFER = 0 after power-up and INIT alike: the processor leaves long mode (KVM's
    /// `kvm_vcpu_reset` writes 0 in both cases).
    pub efer: u64,
    /// CS: selector F000H, base FFFF0000H, limit FFFFH ([`SegmentState::RESET_CODE`]).
    pub cs: SegmentState,
    /// DS: [`SegmentState::RESET_DATA`].
    pub ds: SegmentState,
    /// ES: [`SegmentState::RESET_DATA`].
    pub es: SegmentState,
    /// FS: [`SegmentState::RESET_DATA`].
    pub fs: SegmentState,
    /// GS: [`SegmentState::RESET_DATA`].
    pub gs: SegmentState,
    /// SS: [`SegmentState::RESET_DATA`].
    pub ss: SegmentState,
    /// LDTR: [`SegmentState::RESET_LDTR`].
    pub ldtr: SegmentState,
    /// TR: [`SegmentState::RESET_TR`].
    pub tr: SegmentState,
    /// GDTR: base 0, limit FFFFH.
    pub gdtr: DescriptorTable,
    /// IDTR: base 0, limit FFFFH.
    pub idtr: DescriptorTable,
    /// DR0-DR3 = 0.
    pub dr0_3: [u64; 4],
    /// DR6: FFFF0FF0H.
    pub dr6: u64,
    /// DR7: 00000400H.
    pub dr7: u64,
    /// XCR0: 1 (x87 only) after power-up; `None` (unchanged) after INIT.
    pub xcr0: Option<u64>,
    /// IA32_PAT: 0007040600070406H after power-up; `None` after INIT.
    pub pat: Option<u64>,
    /// Time-stamp counter: 0 after power-up; `None` after INIT.
    pub tsc: Option<u64>,
    /// SMBASE: 30000H after power-up; `None` after INIT.
    pub smbase: Option<u64>,
    /// IA32_MTRR_DEF_TYPE: 0 (MTRRs disabled) after power-up.
    pub mtrr_def_type: Option<u64>,
    /// x87/SSE state after power-up; `None` after INIT, which leaves it unchanged.
    pub fpu: Option<FpuResetState>,
}

impl ArchResetState {
    /// Power-up or RESET# ("Power up" / "Reset" columns). MSRs the table calls undefined are the
    /// VMM's choice.
    pub fn power_up(processor_signature: u32) -> Self {
        Self {
            cause: ResetCause::PowerUp,
            cr0_kept: 0,
            xcr0: Some(XCR0_RESET_VALUE),
            pat: Some(PAT_RESET_VALUE),
            tsc: Some(0),
            smbase: Some(SMBASE_RESET_VALUE),
            mtrr_def_type: Some(0),
            fpu: Some(FpuResetState::POWER_UP),
            ..Self::common(processor_signature)
        }
    }

    /// INIT ("INIT" column): the same registers, but CR0.CD/NW, FPU/SSE state, MSRs, MTRRs, PAT,
    /// TSC and SMBASE stay as they are.
    pub fn after_init(processor_signature: u32) -> Self {
        Self {
            cause: ResetCause::Init,
            cr0_kept: CR0_KEPT_BY_INIT,
            xcr0: None,
            pat: None,
            tsc: None,
            smbase: None,
            mtrr_def_type: None,
            fpu: None,
            ..Self::common(processor_signature)
        }
    }

    /// The rows identical in all three columns.
    fn common(processor_signature: u32) -> Self {
        let mut gprs = [0u64; 16];
        gprs[gpr::RDX] = u64::from(processor_signature);
        Self {
            cause: ResetCause::PowerUp,
            rip: RIP_RESET_VALUE,
            rflags: RFLAGS_RESET_VALUE,
            gprs,
            cr0: CR0_RESET_VALUE,
            cr0_kept: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: SegmentState::RESET_CODE,
            ds: SegmentState::RESET_DATA,
            es: SegmentState::RESET_DATA,
            fs: SegmentState::RESET_DATA,
            gs: SegmentState::RESET_DATA,
            ss: SegmentState::RESET_DATA,
            ldtr: SegmentState::RESET_LDTR,
            tr: SegmentState::RESET_TR,
            gdtr: DescriptorTable::RESET,
            idtr: DescriptorTable::RESET,
            dr0_3: [0; 4],
            dr6: DR6_RESET_VALUE,
            dr7: DR7_RESET_VALUE,
            xcr0: None,
            pat: None,
            tsc: None,
            smbase: None,
            mtrr_def_type: None,
            fpu: None,
        }
    }

    /// The new CR0 given the vCPU's current one (only INIT looks at it).
    pub fn cr0_from(&self, old_cr0: u64) -> u64 {
        (old_cr0 & self.cr0_kept) | (self.cr0 & !self.cr0_kept)
    }

    /// What the VMM must leave untouched for this cause.
    pub fn preserved(&self) -> &'static [PreservedState] {
        match self.cause {
            ResetCause::PowerUp => &[],
            ResetCause::Init => PRESERVED_BY_INIT,
        }
    }

    /// Applies a SIPI start to the state INIT loaded: CS selector and base and RIP change; CS
    /// limit and access rights stay (SDM §9.4.3; KVM `kvm_vcpu_deliver_sipi_vector`). A
    /// `ResumeUntouched` start changes nothing.
    pub fn apply_start(&mut self, start: &super::SipiAction) {
        if let super::SipiAction::StartRealMode {
            cs_selector,
            cs_base,
            rip,
        } = *start
        {
            self.cs.selector = cs_selector;
            self.cs.base = cs_base;
            self.rip = rip;
        }
    }
}
