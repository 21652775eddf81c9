//! One local APIC (SDM vol. 3 chapter 11), owned by its vCPU thread.
//!
//! The model covers the xAPIC register page (§11.4.1), the x2APIC MSR view (§11.12),
//! IA32_APIC_BASE and its mode transitions (§11.4.4, §11.12.5), IRR/ISR/TMR and the priority
//! rules (§11.8), EOI and EOI-broadcast suppression (§11.8.5), the error status register
//! (§11.5.3), the LVT (§11.5.1), the APIC timer (§11.5.4, in [`timer`]) and KVM's paravirtual
//! EOI ([`LocalApic::paravirtual_eoi_candidate`]).
//!
//! Effects leave as values: an ICR write returns the [`InterruptMessage`] to route, an EOI of a
//! level-triggered vector returns the [`EoiMessage`] for the IOAPICs, a change of ID / logical
//! addressing / mode returns [`LapicEffect::TopologyChanged`] so the VMM republishes
//! [`LocalApic::topology`] to the bus.
//!
//! # Access rules of the xAPIC page (hardware-like, documented choices)
//! - Offsets are relative to the page; offsets at or beyond 4 KiB are not ours (read 0, ignored).
//! - A read of 1 to 4 bytes that stays inside bytes 0-3 of a register's 16-byte slot returns
//!   those bytes of the register; every other read (empty, longer than 4 bytes, or touching
//!   bytes 4-15 of a slot) returns zeros.
//! - Only aligned 32-bit writes (offset multiple of 16, 4 bytes) take effect; other writes are
//!   ignored.
//! - An access of any size to a reserved slot (any slot of the page that is not a register in
//!   the §11.4.1 table; SELF_IPI at 0x3F0 is reserved in xAPIC mode) reads 0, is ignored and sets
//!   ESR bit 7 "illegal register address" (§11.5.3).
//! - Writes to read-only registers are ignored; reads of EOI (write-only) return 0.
//!
//! In x2APIC mode the page is dead (reads 0, writes ignored, no ESR); in xAPIC or disabled mode
//! the x2APIC MSRs raise #GP.

mod icr;
mod parts;
pub mod regs;
pub mod timer;
mod vectors;

#[cfg(test)]
mod tests;

use regs::*;
use serde::{Deserialize, Serialize};
use timer::{ApicTimer, TimerMode};

pub use icr::{decode_icr, IcrError};
pub use parts::LapicRegisters;
pub use vectors::VectorSet;

use crate::types::{
    ApicEvents, ApicId, ClockConfig, DestinationFormat, EoiMessage, GuestFault, InterruptMessage,
    MessageSource, Nanos, TopologyEntry, TriggerMode, VcpuIndex, Vector,
};

/// Static properties of one local APIC, chosen by the VMM when it creates the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicConfig {
    /// The vCPU this APIC belongs to (the index the VMM and the bus use, not the APIC ID).
    pub index: VcpuIndex,
    /// The initial APIC ID (the x2APIC ID; xAPIC mode sees its low 8 bits).
    pub apic_id: ApicId,
    /// True for the bootstrap processor: IA32_APIC_BASE.BSP (bit 8) is set at power-up
    /// (SDM §11.4.4).
    pub bsp: bool,
    /// The clocks the timer counts: APIC bus frequency and guest TSC (for TSC-deadline mode).
    pub clock: ClockConfig,
    /// CPUID.1:ECX.x2APIC[bit 21]: IA32_APIC_BASE.EXTD may be set.
    pub x2apic_supported: bool,
    /// Version bit 24: SVR bit 12 (suppress EOI broadcast) is writable.
    pub directed_eoi_supported: bool,
    /// The CMCI LVT (0x2F0, x2APIC MSR 0x82F) exists: the processor signals corrected
    /// machine-check errors (MCG_CAP.MCG_CMCI_P, SDM vol. 3 §16.5.1), and the version register
    /// counts seven LVTs. Without it the slot is reserved (an xAPIC access sets ESR bit 7, an
    /// x2APIC access raises #GP) and six LVTs are counted, as KVM's LAPIC does for a vCPU
    /// without MCG_CMCI_P. Snapshots written before this field existed read as false.
    #[serde(default)]
    pub cmci_supported: bool,
    /// The processor's MAXPHYADDR as the guest sees it (CPUID 80000008H EAX\[7:0\]): the
    /// IA32_APIC_BASE bits at and above it are reserved (SDM vol. 3 §11.4.4). Taken within
    /// 32..=52. Snapshots written before this field existed read as 52.
    #[serde(default = "default_max_phys_addr")]
    pub max_phys_addr: u8,
}

fn default_max_phys_addr() -> u8 {
    MAX_PHYS_ADDR_LIMIT
}

impl Default for LapicConfig {
    /// vCPU 0 with APIC ID 0, not the BSP, default clocks, no x2APIC, no directed EOI, no CMCI, and
    /// MAXPHYADDR 52 (the architectural maximum: only bits 52-63 of the base are reserved).
    fn default() -> Self {
        Self {
            index: 0,
            apic_id: ApicId::default(),
            bsp: false,
            clock: ClockConfig::default(),
            x2apic_supported: false,
            directed_eoi_supported: false,
            cmci_supported: false,
            max_phys_addr: MAX_PHYS_ADDR_LIMIT,
        }
    }
}

/// What a register access asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LapicEffect {
    /// Nothing for the VMM to do.
    None,
    /// Route this IPI on the bus (ICR write).
    SendIpi(InterruptMessage),
    /// Broadcast this EOI to the IOAPICs (EOI of a level-triggered vector, not suppressed).
    Eoi(EoiMessage),
    /// ID, LDR, DFR, APIC base (mode, enable, address) or SVR enable changed: republish
    /// [`LocalApic::topology`], re-read [`LocalApic::mmio_base`] and
    /// [`LocalApic::next_timer_deadline`] (disabling the APIC also resets its timer).
    TopologyChanged,
    /// The timer was (re)programmed: re-read [`LocalApic::next_timer_deadline`].
    TimerChanged,
}

/// The sources of the local vector table (SDM §11.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LocalSource {
    /// LVT timer (0x320): the APIC timer's expiry (SDM §11.5.4).
    Timer,
    /// LVT thermal sensor (0x330): the thermal monitor's interrupt.
    Thermal,
    /// LVT performance counter (0x340): a performance-counter overflow.
    Performance,
    /// LVT LINT0 (0x350): the LINT0 pin, where a PC wires the 8259's INTR (ExtINT delivery).
    Lint0,
    /// LVT LINT1 (0x360): the LINT1 pin, where a PC wires NMI.
    Lint1,
    /// LVT error (0x370): the APIC signalling an error it recorded in ESR (SDM §11.5.3).
    Error,
    /// LVT CMCI (0x2F0): corrected machine-check error interrupt (SDM vol. 3 §16.5.1).
    Cmci,
}

impl LocalSource {
    /// Every source, in the order of [`LocalApic::lvt`]'s storage.
    pub const ALL: [LocalSource; 7] = [
        Self::Timer,
        Self::Thermal,
        Self::Performance,
        Self::Lint0,
        Self::Lint1,
        Self::Error,
        Self::Cmci,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The xAPIC offset of its LVT register.
    pub fn offset(self) -> u32 {
        match self {
            Self::Timer => REG_LVT_TIMER,
            Self::Thermal => REG_LVT_THERMAL,
            Self::Performance => REG_LVT_PERF,
            Self::Lint0 => REG_LVT_LINT0,
            Self::Lint1 => REG_LVT_LINT1,
            Self::Error => REG_LVT_ERROR,
            Self::Cmci => REG_LVT_CMCI,
        }
    }

    /// Bits a write may change (delivery status and remote IRR are read-only, SDM §11.5.1).
    fn writable_bits(self) -> u32 {
        match self {
            Self::Timer => LVT_TIMER_WRITABLE,
            Self::Thermal | Self::Performance | Self::Cmci => LVT_MODE_WRITABLE,
            Self::Lint0 | Self::Lint1 => LVT_LINT_WRITABLE,
            Self::Error => LVT_ERROR_WRITABLE,
        }
    }

    /// Bits that are defined (writable or read-only); the rest are reserved, and writing them
    /// non-zero through x2APIC raises #GP (SDM §11.12.1.3).
    fn defined_bits(self) -> u32 {
        let read_only = match self {
            Self::Lint0 | Self::Lint1 => LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
            _ => LVT_DELIVERY_STATUS,
        };
        self.writable_bits() | read_only
    }
}

/// The four states of IA32_APIC_BASE.{EN,EXTD} (SDM §11.12.5, figure "Local x2APIC State
/// Transitions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApicMode {
    /// EN=0, EXTD=0: the APIC is off; its registers do not answer (SDM §11.4.3).
    Disabled,
    /// EN=1, EXTD=0: xAPIC mode, registers in the MMIO page at the APIC base.
    XApic,
    /// EN=1, EXTD=1: x2APIC mode, registers as MSRs 0x800-0x8FF (SDM §11.12.1).
    X2Apic,
    /// EXTD without EN: never reachable.
    Invalid,
}

impl ApicMode {
    /// The mode that IA32_APIC_BASE's EN (bit 11) and EXTD (bit 10) select.
    pub fn of_base(base: u64) -> Self {
        match (base & APIC_BASE_EN != 0, base & APIC_BASE_EXTD != 0) {
            (false, false) => Self::Disabled,
            (true, false) => Self::XApic,
            (true, true) => Self::X2Apic,
            (false, true) => Self::Invalid,
        }
    }
}

/// A register of the §11.4.1 table, decoded from its offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Id,
    Version,
    Tpr,
    Apr,
    Ppr,
    Eoi,
    Rrd,
    Ldr,
    Dfr,
    Svr,
    Isr(usize),
    Tmr(usize),
    Irr(usize),
    Esr,
    Lvt(LocalSource),
    IcrLow,
    IcrHigh,
    InitialCount,
    CurrentCount,
    Dcr,
    SelfIpi,
}

/// How the x2APIC MSR view exposes a register (SDM §11.12.1.2 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum X2Access {
    ReadWrite,
    ReadOnly,
    WriteOnly,
    /// Not in the x2APIC MSR set (APR, RRD, DFR, ICR high): #GP.
    Absent,
}

impl Reg {
    /// Decodes a 16-byte-aligned offset; `None` for reserved slots.
    fn decode(offset: u32) -> Option<Reg> {
        let index = ((offset >> 4) & 7) as usize;
        Some(match offset {
            REG_ID => Self::Id,
            REG_VERSION => Self::Version,
            REG_TPR => Self::Tpr,
            REG_APR => Self::Apr,
            REG_PPR => Self::Ppr,
            REG_EOI => Self::Eoi,
            REG_RRD => Self::Rrd,
            REG_LDR => Self::Ldr,
            REG_DFR => Self::Dfr,
            REG_SVR => Self::Svr,
            0x100..=0x170 => Self::Isr(index),
            0x180..=0x1F0 => Self::Tmr(index),
            0x200..=0x270 => Self::Irr(index),
            REG_ESR => Self::Esr,
            REG_ICR_LOW => Self::IcrLow,
            REG_ICR_HIGH => Self::IcrHigh,
            REG_TIMER_INITIAL => Self::InitialCount,
            REG_TIMER_CURRENT => Self::CurrentCount,
            REG_TIMER_DCR => Self::Dcr,
            REG_SELF_IPI => Self::SelfIpi,
            _ => {
                return LocalSource::ALL
                    .into_iter()
                    .find(|s| s.offset() == offset)
                    .map(Self::Lvt)
            }
        })
    }

    fn decode_xapic(offset: u32) -> Option<Reg> {
        Self::decode(offset).filter(|reg| *reg != Self::SelfIpi)
    }

    fn xapic_readable(self) -> bool {
        self != Self::Eoi
    }

    fn xapic_writable(self) -> bool {
        matches!(
            self,
            Self::Id
                | Self::Tpr
                | Self::Eoi
                | Self::Ldr
                | Self::Dfr
                | Self::Svr
                | Self::Esr
                | Self::Lvt(_)
                | Self::IcrLow
                | Self::IcrHigh
                | Self::InitialCount
                | Self::Dcr
        )
    }

    fn x2apic_access(self) -> X2Access {
        match self {
            Self::Id
            | Self::Version
            | Self::Ppr
            | Self::Ldr
            | Self::Isr(_)
            | Self::Tmr(_)
            | Self::Irr(_)
            | Self::CurrentCount => X2Access::ReadOnly,
            Self::Tpr
            | Self::Svr
            | Self::Esr
            | Self::Lvt(_)
            | Self::IcrLow
            | Self::InitialCount
            | Self::Dcr => X2Access::ReadWrite,
            Self::Eoi | Self::SelfIpi => X2Access::WriteOnly,
            Self::Apr | Self::Rrd | Self::Dfr | Self::IcrHigh => X2Access::Absent,
        }
    }
}

fn gp(reason: &'static str) -> GuestFault {
    GuestFault::GeneralProtection(reason)
}

fn priority_class(vector: u8) -> u8 {
    vector >> 4
}

/// One local APIC. See the module documentation for the access rules.
///
/// It is plain data: the vCPU's thread forwards the guest's accesses to it with the current
/// time, and acts on the [`LapicEffect`] each write returns. Time never passes on its own: the
/// caller polls the timer at [`LocalApic::next_timer_deadline`].
///
/// ```
/// use irqchip::lapic::regs::{REG_ICR_HIGH, REG_ICR_LOW, REG_LVT_TIMER, REG_PPR, REG_SVR};
/// use irqchip::lapic::regs::{REG_TIMER_CURRENT, REG_TIMER_DCR, REG_TIMER_INITIAL, REG_TPR};
/// use irqchip::lapic::{LapicConfig, LapicEffect, LocalApic};
/// use irqchip::{ApicId, DeliveryMode, Shorthand};
///
/// // The default clock counts the APIC bus at 1 GHz: one timer tick per nanosecond.
/// let config = LapicConfig { apic_id: ApicId(0), bsp: true, ..Default::default() };
/// let mut apic = LocalApic::new(config);
/// let write = |apic: &mut LocalApic, offset: u32, value: u32, now: u64| {
///     apic.mmio_write(u64::from(offset), &value.to_le_bytes(), now)
/// };
/// let read = |apic: &mut LocalApic, offset: u32, now: u64| {
///     let mut data = [0; 4];
///     apic.mmio_read(u64::from(offset), &mut data, now);
///     u32::from_le_bytes(data)
/// };
///
/// // Software-enable the APIC (SVR bit 8), then raise the task priority: PPR follows TPR.
/// write(&mut apic, REG_SVR, 0x1FF, 0);
/// write(&mut apic, REG_TPR, 0x20, 0);
/// assert_eq!(read(&mut apic, REG_PPR, 0), 0x20);
///
/// // One-shot timer, vector 0xEC, divide by 1 (DCR 1011b), 1000 ticks from t = 0 ns.
/// write(&mut apic, REG_LVT_TIMER, 0xEC, 0);
/// write(&mut apic, REG_TIMER_DCR, 0b1011, 0);
/// assert_eq!(write(&mut apic, REG_TIMER_INITIAL, 1000, 0), LapicEffect::TimerChanged);
/// assert_eq!(apic.next_timer_deadline(), Some(1000));
/// assert_eq!(read(&mut apic, REG_TIMER_CURRENT, 400), 600);
/// apic.poll_timer(1000); // the VMM's timer fired: the expiry sets the vector in IRR
/// assert_eq!(apic.pending_interrupt(), Some(0xEC));
/// assert_eq!(apic.acknowledge_interrupt(), Some(0xEC));
/// assert!(apic.isr().contains(0xEC));
///
/// // An ICR write does not deliver anything itself: it returns the IPI for the VMM to route.
/// write(&mut apic, REG_ICR_HIGH, 1 << 24, 1000); // destination APIC ID 1
/// let LapicEffect::SendIpi(ipi) = write(&mut apic, REG_ICR_LOW, 0x4041, 1000) else {
///     panic!("an ICR write sends an IPI");
/// };
/// assert_eq!((ipi.vector, ipi.delivery_mode, ipi.destination), (0x41, DeliveryMode::Fixed, 1));
/// assert_eq!(ipi.shorthand, Shorthand::None);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalApic {
    cfg: LapicConfig,
    apic_base: u64,
    /// Current APIC ID: 8 bits (writable) in xAPIC mode, the 32-bit x2APIC ID in x2APIC mode.
    id: u32,
    tpr: u8,
    /// xAPIC LDR as read (bits 31:24). In x2APIC mode the LDR is derived from the ID instead.
    ldr: u32,
    dfr: u32,
    svr: u32,
    irr: VectorSet,
    isr: VectorSet,
    tmr: VectorSet,
    /// Errors detected since the last ESR write (SDM §11.5.3).
    esr_pending: u32,
    /// What ESR reads: the errors latched by the last ESR write.
    esr_latched: u32,
    lvt: [u32; 7],
    icr_low: u32,
    /// xAPIC: bits 31:24 hold the destination; x2APIC: the 32-bit destination.
    icr_high: u32,
    timer: ApicTimer,
}

impl LocalApic {
    /// Power-on state (SDM §11.4.7.1): xAPIC mode enabled at 0xFEE00000, BSP bit from the
    /// config, ID = the initial APIC ID's low 8 bits, all LVTs masked, SVR 0xFF (software
    /// disabled), DFR all ones, everything else zero.
    pub fn new(cfg: LapicConfig) -> Self {
        let bsp = if cfg.bsp { APIC_BASE_BSP } else { 0 };
        Self {
            cfg,
            apic_base: APIC_BASE_DEFAULT_ADDR | APIC_BASE_EN | bsp,
            id: cfg.apic_id.0 & 0xFF,
            tpr: 0,
            ldr: 0,
            dfr: DFR_FLAT,
            svr: SVR_POWER_ON,
            irr: VectorSet::new(),
            isr: VectorSet::new(),
            tmr: VectorSet::new(),
            esr_pending: 0,
            esr_latched: 0,
            lvt: [LVT_MASKED; 7],
            icr_low: 0,
            icr_high: 0,
            timer: ApicTimer::new(cfg.clock),
        }
    }

    /// The static configuration this APIC was created with.
    pub fn config(&self) -> &LapicConfig {
        &self.cfg
    }

    /// What INIT does to the APIC (SDM §11.4.7.3): the power-up state except that the APIC ID
    /// (and with it the arbitration ID) and IA32_APIC_BASE (an MSR, so the mode and enable bits)
    /// are kept. In x2APIC mode the LDR, derived from the kept ID, is therefore kept too
    /// (§11.12.5.1 "x2APIC INIT"); in xAPIC mode LDR returns to 0 and DFR to all ones. IRR, ISR,
    /// TMR, ESR, ICR, LVTs (masked), SVR (0xFF) and the timer are reset. The caller should
    /// republish [`LocalApic::topology`] afterwards.
    pub fn init_reset(&mut self) {
        let (id, apic_base) = (self.id, self.apic_base);
        *self = Self::new(self.cfg);
        self.id = id;
        self.apic_base = apic_base;
    }

    // ----- IA32_APIC_BASE -------------------------------------------------------------------

    /// The current value of IA32_APIC_BASE (base address, EN, EXTD, BSP; SDM §11.4.4).
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// IA32_APIC_BASE.BSP as it is now (the guest may have written it): what decides whether
    /// INIT restarts this processor or parks it in wait-for-SIPI
    /// ([`crate::mpstate::MpStateMachine::accept_events_with_bsp_flag`]).
    pub fn bsp_flag(&self) -> bool {
        self.apic_base & APIC_BASE_BSP != 0
    }

    /// The mode IA32_APIC_BASE selects (disabled, xAPIC or x2APIC).
    pub fn mode(&self) -> ApicMode {
        ApicMode::of_base(self.apic_base)
    }

    /// True when IA32_APIC_BASE.EN (bit 11) is set: the APIC is globally enabled (SDM §11.4.3).
    pub fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_EN != 0
    }

    /// True in x2APIC mode (EN and EXTD set): registers are MSRs, the ID is 32 bits.
    pub fn x2apic(&self) -> bool {
        self.mode() == ApicMode::X2Apic
    }

    /// True when SVR bit 8 is set: the APIC is software-enabled (SDM §11.4.7.2). While it is
    /// clear every LVT is masked and no fixed interrupt is accepted.
    pub fn sw_enabled(&self) -> bool {
        self.svr & SVR_APIC_ENABLED != 0
    }

    /// Writes IA32_APIC_BASE (SDM §11.4.4, §11.12.5). Reserved bits (0-7, 9, MAXPHYADDR-63;
    /// EXTD when x2APIC is not supported) and EN=0/EXTD=1 always fault, host-initiated or not
    /// (KVM refuses them from userspace too), and change nothing. A guest write may only make the
    /// legal transitions disabled->xAPIC, xAPIC->x2APIC, xAPIC->disabled, x2APIC->disabled;
    /// `host_initiated` (the VMM restoring state) may also go x2APIC->xAPIC or disabled->x2APIC.
    /// The BSP flag (bit 8) is an ordinary R/W bit (SDM vol. 4 table 2-2, IA32_APIC_BASE "BSP
    /// flag (R/W)"; KVM's `kvm_apic_set_base` stores it from the guest too): a guest write sets or
    /// clears it, and INIT then follows it ([`Self::bsp_flag`]), as in KVM.
    pub fn set_apic_base(
        &mut self,
        value: u64,
        host_initiated: bool,
    ) -> Result<LapicEffect, GuestFault> {
        if value == self.apic_base {
            return Ok(LapicEffect::None);
        }
        let mut reserved = apic_base_reserved(self.cfg.max_phys_addr);
        if !self.cfg.x2apic_supported {
            reserved |= APIC_BASE_EXTD;
        }
        if value & reserved != 0 {
            return Err(gp("IA32_APIC_BASE: reserved bit set"));
        }
        let (old, new) = (self.mode(), ApicMode::of_base(value));
        if new == ApicMode::Invalid {
            return Err(gp("IA32_APIC_BASE: EXTD without EN"));
        }
        if !host_initiated && !Self::legal_transition(old, new) {
            return Err(gp("IA32_APIC_BASE: illegal mode transition"));
        }
        self.apic_base = value;
        self.apply_mode_change(old, new);
        Ok(LapicEffect::TopologyChanged)
    }

    /// SDM §11.12.5, figure "Local x2APIC State Transitions with IA32_APIC_BASE".
    fn legal_transition(old: ApicMode, new: ApicMode) -> bool {
        use ApicMode::*;
        old == new
            || matches!(
                (old, new),
                (Disabled, XApic) | (XApic, X2Apic) | (XApic, Disabled) | (X2Apic, Disabled)
            )
    }

    /// The registers a change of IA32_APIC_BASE's EN/EXTD rewrites; every other register,
    /// IRR, ISR and the timer's count included, is kept, as KVM keeps them
    /// (`kvm_lapic_set_base` rewrites only the ID). The SDM leaves the choice open: clearing
    /// EN means "prior initialization to the APIC may be lost" (§11.4.3), and across x2APIC
    /// mode transitions the other registers are "not preserved" (§11.12.5.1), i.e. undefined.
    /// While globally disabled the APIC accepts and delivers nothing, and its timer stops
    /// firing ([`Self::pending_interrupt`], [`Self::next_timer_deadline`]); what was pending
    /// is delivered once it is enabled again, as KVM does (measured in `kernel` mode).
    fn apply_mode_change(&mut self, old: ApicMode, new: ApicMode) {
        match new {
            // §11.12.5.1: entering x2APIC mode loads the 32-bit x2APIC ID; LDR is derived
            // from it (`Self::ldr`), and KVM's LDR register then holds that derived value,
            // whose xAPIC logical ID (bits 31:24) is 0 for IDs below 4096.
            ApicMode::X2Apic if old != ApicMode::X2Apic => {
                self.id = self.cfg.apic_id.0;
                self.ldr = 0;
            }
            // Enabled in xAPIC mode again (from disabled, or host-initiated from x2APIC): the
            // 8-bit xAPIC ID is the initial one, whatever the guest wrote before
            // (`kvm_apic_set_xapic_id`).
            ApicMode::XApic if old != ApicMode::XApic => {
                self.id = self.cfg.apic_id.0 & 0xFF;
                if old == ApicMode::X2Apic {
                    self.ldr = 0;
                }
            }
            _ => {}
        }
    }

    /// Where the xAPIC page is mapped, when it is live (enabled and not in x2APIC mode).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.apic_base & APIC_BASE_ADDR_MASK)
    }

    // ----- xAPIC page ----------------------------------------------------------------------

    /// A read of the xAPIC page at `offset` (relative to the base); see the module docs.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: Nanos) {
        data.fill(0);
        if self.mmio_base().is_none() || offset >= PAGE_SIZE {
            return;
        }
        let Some(reg) = self.xapic_reg_or_error(offset) else {
            return;
        };
        let within = (offset & 0xF) as usize;
        if data.is_empty() || within + data.len() > 4 || !reg.xapic_readable() {
            return;
        }
        let bytes = self.read_register(reg, now).to_le_bytes();
        data.copy_from_slice(&bytes[within..within + data.len()]);
    }

    /// A write to the xAPIC page at `offset`; only aligned 32-bit writes take effect.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: Nanos) -> LapicEffect {
        if self.mmio_base().is_none() || offset >= PAGE_SIZE {
            return LapicEffect::None;
        }
        let Some(reg) = self.xapic_reg_or_error(offset) else {
            return LapicEffect::None;
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return LapicEffect::None;
        };
        if offset & 0xF != 0 || !reg.xapic_writable() {
            return LapicEffect::None;
        }
        self.write_register(reg, u32::from_le_bytes(bytes), now)
    }

    /// Decodes the slot of an in-page offset; a reserved slot sets ESR bit 7 (§11.5.3).
    fn xapic_reg_or_error(&mut self, offset: u64) -> Option<Reg> {
        // offset < PAGE_SIZE, so it fits in u32.
        let slot = (offset & !0xF) as u32;
        let reg = self.present_reg(Reg::decode_xapic(slot));
        if reg.is_none() {
            self.raise_error(ESR_ILLEGAL_REGISTER);
        }
        reg
    }

    // ----- MSRs ----------------------------------------------------------------------------

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_read(&mut self, msr: u32, now: Nanos) -> Result<u64, GuestFault> {
        match msr {
            MSR_APIC_BASE => Ok(self.apic_base),
            MSR_TSC_DEADLINE => Ok(if self.hw_enabled() {
                self.timer.tsc_deadline()
            } else {
                0
            }),
            X2APIC_MSR_BASE..=X2APIC_MSR_LAST => self.x2apic_read(msr, now),
            _ => Err(gp("not a local APIC MSR")),
        }
    }

    /// WRMSR of IA32_APIC_BASE (as a guest write), IA32_TSC_DEADLINE or an x2APIC register.
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now: Nanos,
    ) -> Result<LapicEffect, GuestFault> {
        match msr {
            MSR_APIC_BASE => self.set_apic_base(value, false),
            MSR_TSC_DEADLINE => Ok(self.write_tsc_deadline(value, now)),
            X2APIC_MSR_BASE..=X2APIC_MSR_LAST => self.x2apic_write(msr, value, now),
            _ => Err(gp("not a local APIC MSR")),
        }
    }

    /// IA32_TSC_DEADLINE writes reach the timer only in TSC-deadline mode (§11.5.4.1);
    /// otherwise they are ignored, as KVM does.
    fn write_tsc_deadline(&mut self, value: u64, now: Nanos) -> LapicEffect {
        if !self.hw_enabled() || self.lvt_timer_mode() != Some(TimerMode::TscDeadline) {
            return LapicEffect::None;
        }
        self.timer.write_tsc_deadline(value, now);
        LapicEffect::TimerChanged
    }

    fn x2apic_reg(&self, msr: u32) -> Result<Reg, GuestFault> {
        if !self.x2apic() {
            return Err(gp("x2APIC MSR access outside x2APIC mode"));
        }
        let offset = msr.wrapping_sub(X2APIC_MSR_BASE) << 4;
        self.present_reg(Reg::decode(offset))
            .ok_or(gp("reserved x2APIC MSR"))
    }

    fn x2apic_read(&mut self, msr: u32, now: Nanos) -> Result<u64, GuestFault> {
        let reg = self.x2apic_reg(msr)?;
        match reg.x2apic_access() {
            X2Access::Absent => Err(gp("register absent in x2APIC mode")),
            X2Access::WriteOnly => Err(gp("read of a write-only x2APIC register")),
            _ if reg == Reg::IcrLow => Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
            _ => Ok(u64::from(self.read_register(reg, now))),
        }
    }

    fn x2apic_write(
        &mut self,
        msr: u32,
        value: u64,
        now: Nanos,
    ) -> Result<LapicEffect, GuestFault> {
        let reg = self.x2apic_reg(msr)?;
        match reg.x2apic_access() {
            X2Access::Absent => return Err(gp("register absent in x2APIC mode")),
            X2Access::ReadOnly => return Err(gp("write to a read-only x2APIC register")),
            _ => {}
        }
        if reg == Reg::IcrLow {
            return self.write_x2apic_icr(value);
        }
        // §11.12.1.3: bits 63:32 of every register but ICR, and the reserved bits of each
        // register, must be written as zero.
        let value = u32::try_from(value).map_err(|_| gp("x2APIC MSR bits 63:32 set"))?;
        if value & !self.x2apic_defined_bits(reg) != 0 {
            return Err(gp("x2APIC register reserved bit set"));
        }
        Ok(self.write_register(reg, value, now))
    }

    /// Bits a WRMSR may set (SDM §11.12.1.2 table; EOI and ESR must be written with 0).
    fn x2apic_defined_bits(&self, reg: Reg) -> u32 {
        match reg {
            Reg::Tpr => TPR_MASK,
            Reg::Svr => self.svr_writable_bits(),
            Reg::Lvt(source) => source.defined_bits(),
            Reg::InitialCount => u32::MAX,
            Reg::Dcr => DCR_MASK,
            // Truncation is exact: the mask is 0xFF.
            Reg::SelfIpi => SELF_IPI_VECTOR_MASK as u32,
            _ => 0,
        }
    }

    fn write_x2apic_icr(&mut self, value: u64) -> Result<LapicEffect, GuestFault> {
        if value & ICR_X2APIC_RESERVED != 0 {
            return Err(gp("x2APIC ICR reserved bit set"));
        }
        // Truncations split the 64-bit ICR into its halves.
        let (low, destination) = (value as u32, (value >> 32) as u32);
        Ok(self.write_icr(low, destination, DestinationFormat::X2apic))
    }

    // ----- Register semantics shared by both views ---------------------------------------------

    fn read_register(&self, reg: Reg, now: Nanos) -> u32 {
        match reg {
            Reg::Id if self.x2apic() => self.id,
            Reg::Id => self.id << ID_XAPIC_SHIFT,
            Reg::Version => self.version(),
            Reg::Tpr => u32::from(self.tpr),
            Reg::Apr => u32::from(self.apr()),
            Reg::Ppr => u32::from(self.ppr()),
            Reg::Ldr => self.ldr(),
            Reg::Dfr => self.dfr,
            Reg::Svr => self.svr,
            Reg::Isr(n) => self.isr.register(n),
            Reg::Tmr(n) => self.tmr.register(n),
            Reg::Irr(n) => self.irr.register(n),
            Reg::Esr => self.esr_latched,
            Reg::Lvt(source) => self.lvt[source.index()],
            Reg::IcrLow => self.icr_low,
            Reg::IcrHigh => self.icr_high,
            Reg::InitialCount => self.timer.initial_count(),
            Reg::CurrentCount => self.timer.current_count(now),
            Reg::Dcr => self.timer.divide_config(),
            // Remote read is not supported (RRD reads 0); write-only registers read 0.
            Reg::Rrd | Reg::Eoi | Reg::SelfIpi => 0,
        }
    }

    /// Applies a write that the view has already validated (x2APIC reserved bits) or filtered
    /// (xAPIC writability); masks keep read-only and reserved bits.
    fn write_register(&mut self, reg: Reg, value: u32, now: Nanos) -> LapicEffect {
        match reg {
            Reg::Id => self.write_xapic_id(value),
            // Truncation keeps TPR bits 7:0.
            Reg::Tpr => self.set_tpr((value & TPR_MASK) as u8),
            Reg::Eoi => self.eoi(),
            Reg::Ldr => self.write_xapic_ldr(value),
            Reg::Dfr => self.write_dfr(value),
            Reg::Svr => self.write_svr(value),
            Reg::Esr => self.latch_esr(),
            Reg::Lvt(source) => self.write_lvt(source, value, now),
            Reg::IcrLow => self.write_icr(
                value,
                self.icr_high >> ICR_HIGH_XAPIC_SHIFT,
                DestinationFormat::Xapic,
            ),
            Reg::IcrHigh => {
                self.icr_high = value & ICR_HIGH_XAPIC_MASK;
                LapicEffect::None
            }
            Reg::InitialCount => {
                self.timer.write_initial_count(value, now);
                LapicEffect::TimerChanged
            }
            Reg::Dcr => {
                self.timer.write_divide_config(value & DCR_MASK, now);
                LapicEffect::TimerChanged
            }
            Reg::SelfIpi => {
                // §11.12.11: a fixed, edge-triggered IPI to this APIC, applied locally.
                // Truncation keeps the vector field.
                self.accept_vector(value as u8, TriggerMode::Edge);
                LapicEffect::None
            }
            Reg::Version
            | Reg::Apr
            | Reg::Ppr
            | Reg::Rrd
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::CurrentCount => LapicEffect::None,
        }
    }

    fn version(&self) -> u32 {
        let directed = if self.cfg.directed_eoi_supported {
            VERSION_DIRECTED_EOI
        } else {
            0
        };
        let max_lvt = if self.cfg.cmci_supported {
            VERSION_MAX_LVT_CMCI
        } else {
            VERSION_MAX_LVT
        };
        VERSION_NUMBER | (max_lvt << VERSION_MAX_LVT_SHIFT) | directed
    }

    /// The register at an offset, as this APIC has it: the CMCI LVT's slot is reserved on an
    /// APIC without CMCI.
    fn present_reg(&self, reg: Option<Reg>) -> Option<Reg> {
        reg.filter(|reg| self.cfg.cmci_supported || *reg != Reg::Lvt(LocalSource::Cmci))
    }

    fn write_xapic_id(&mut self, value: u32) -> LapicEffect {
        self.topology_update(|apic| apic.id = (value & ID_XAPIC_MASK) >> ID_XAPIC_SHIFT)
    }

    fn write_xapic_ldr(&mut self, value: u32) -> LapicEffect {
        self.topology_update(|apic| apic.ldr = value & LDR_XAPIC_MASK)
    }

    fn write_dfr(&mut self, value: u32) -> LapicEffect {
        self.topology_update(|apic| apic.dfr = (value & DFR_MODEL_MASK) | DFR_RESERVED_ONES)
    }

    /// Runs `change` and reports `TopologyChanged` if the bus-visible entry changed.
    fn topology_update(&mut self, change: impl FnOnce(&mut Self)) -> LapicEffect {
        let before = self.topology();
        change(self);
        if self.topology() == before {
            LapicEffect::None
        } else {
            LapicEffect::TopologyChanged
        }
    }

    /// The LDR as read (§11.6.2.2, §11.12.10.2): in x2APIC mode, cluster = ID\[19:4\] in bits
    /// 31:16 and bit `ID[3:0]` set in bits 15:0 (the shift drops ID bits 31:20).
    pub fn ldr(&self) -> u32 {
        if self.x2apic() {
            ((self.id >> 4) << 16) | (1 << (self.id & 0xF))
        } else {
            self.ldr
        }
    }

    fn svr_writable_bits(&self) -> u32 {
        if self.cfg.directed_eoi_supported {
            SVR_BASE_MASK | SVR_SUPPRESS_EOI_BROADCAST
        } else {
            SVR_BASE_MASK
        }
    }

    /// SVR (§11.9): clearing the software-enable bit masks every LVT (§11.4.7.2); they stay
    /// masked (writes cannot unmask) until software re-enables the APIC.
    fn write_svr(&mut self, value: u32) -> LapicEffect {
        let bits = self.svr_writable_bits();
        self.topology_update(|apic| {
            apic.svr = value & bits;
            if !apic.sw_enabled() {
                apic.lvt.iter_mut().for_each(|lvt| *lvt |= LVT_MASKED);
            }
        })
    }

    /// ESR write (§11.5.3): latch the errors detected so far into the readable register and
    /// start accumulating afresh.
    fn latch_esr(&mut self) -> LapicEffect {
        self.esr_latched = self.esr_pending;
        self.esr_pending = 0;
        LapicEffect::None
    }

    /// ESR as the guest would read it now (the latched value).
    pub fn esr(&self) -> u32 {
        self.esr_latched
    }

    /// Records an error and signals it through the error LVT if unmasked (§11.5.3). An illegal
    /// vector in the error LVT itself only adds "receive illegal vector" (no recursion).
    fn raise_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LocalSource::Error.index()];
        if lvt & LVT_MASKED != 0 || !self.hw_enabled() || !self.sw_enabled() {
            return;
        }
        // Truncation keeps the vector field.
        let vector = (lvt & LVT_VECTOR_MASK) as u8;
        if vector < FIRST_LEGAL_VECTOR {
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
        } else {
            self.irr.insert(vector);
            self.tmr.remove(vector);
        }
    }

    fn write_lvt(&mut self, source: LocalSource, value: u32, now: Nanos) -> LapicEffect {
        let slot = source.index();
        let mut value = value & source.writable_bits();
        if !self.sw_enabled() {
            value |= LVT_MASKED;
        }
        self.lvt[slot] = value;
        if source != LocalSource::Timer {
            return LapicEffect::None;
        }
        // Timer mode 11b is reserved (SDM §11.5.1). KVM stores it as written, so it reads back
        // as 11b, and its timer then counts like a one-shot (neither periodic reload nor
        // TSC-deadline; `apic_update_lvtt` disarms only when TSC-deadline mode is entered or
        // left). The model does the same: the field keeps 11b, the timer runs one-shot.
        let mode = Self::timer_mode_of(value).unwrap_or(TimerMode::OneShot);
        if mode == self.timer.mode() {
            return LapicEffect::None;
        }
        self.timer.set_mode(mode, now);
        LapicEffect::TimerChanged
    }

    fn timer_mode_of(lvt: u32) -> Option<TimerMode> {
        match (lvt & LVT_TIMER_MODE_MASK) >> LVT_TIMER_MODE_SHIFT {
            0 => Some(TimerMode::OneShot),
            1 => Some(TimerMode::Periodic),
            2 => Some(TimerMode::TscDeadline),
            _ => None,
        }
    }

    fn lvt_timer_mode(&self) -> Option<TimerMode> {
        Self::timer_mode_of(self.lvt[LocalSource::Timer.index()])
    }

    /// The raw LVT register of `source`.
    pub fn lvt(&self, source: LocalSource) -> u32 {
        self.lvt[source.index()]
    }

    // ----- ICR -----------------------------------------------------------------------------

    /// Stores and sends an ICR write (§11.6.1). Every write is stored, as KVM stores it (all
    /// bits but delivery status, reserved ones included; in x2APIC mode the reserved bits #GP
    /// before this). A reserved delivery mode (011b, and ExtINT, 111b) and a fixed or
    /// lowest-priority de-assert ([`IcrError::LevelDeassert`]) send nothing and record no error
    /// (KVM sends or accepts nothing either); an illegal vector sets ESR "send illegal vector"
    /// and sends nothing.
    fn write_icr(&mut self, low: u32, destination: u32, format: DestinationFormat) -> LapicEffect {
        let source = MessageSource::Vcpu(self.cfg.index);
        let result = decode_icr(low, destination, format, source);
        self.icr_low = low & ICR_LOW_MASK;
        if format == DestinationFormat::X2apic {
            self.icr_high = destination;
        }
        match result {
            Ok(message) => LapicEffect::SendIpi(message),
            Err(IcrError::ReservedDeliveryMode | IcrError::LevelDeassert) => LapicEffect::None,
            Err(IcrError::IllegalVector) => {
                self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                LapicEffect::None
            }
        }
    }

    // ----- Interrupt acceptance and priorities (§11.8) -----------------------------------------

    /// Accepts a fixed or lowest-priority vector from the bus: IRR is set, and TMR is set for
    /// level-triggered and cleared for edge-triggered vectors (§11.8.4). A vector already pending
    /// in IRR coalesces with it. Dropped when the APIC is globally or software disabled; a vector
    /// below 16 is refused with ESR "receive illegal vector" (§11.5.3).
    pub fn accept_vector(&mut self, vector: Vector, trigger: TriggerMode) {
        if !self.hw_enabled() || !self.sw_enabled() {
            return;
        }
        if vector < FIRST_LEGAL_VECTOR {
            self.raise_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        self.irr.insert(vector);
        self.tmr.set(vector, trigger == TriggerMode::Level);
    }

    /// Batch form of [`accept_vector`](Self::accept_vector): every bit of `pir` is a vector,
    /// level-triggered when the same bit of `level` is set.
    pub fn accept_posted(&mut self, pir: &[u64; 4], level: &[u64; 4]) {
        let posted = VectorSet::from_words(*pir);
        let levels = VectorSet::from_words(*level);
        for vector in posted.iter() {
            let trigger = if levels.contains(vector) {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            };
            self.accept_vector(vector, trigger);
        }
    }

    /// The highest pending vector if its priority class beats the PPR's class (§11.8.3.1).
    pub fn pending_interrupt(&self) -> Option<Vector> {
        if !self.hw_enabled() {
            return None;
        }
        self.irr
            .highest()
            .filter(|v| priority_class(*v) > priority_class(self.ppr()))
    }

    /// INTA: moves the deliverable vector from IRR to ISR and returns it; `None` when nothing
    /// is deliverable (the VMM then injects nothing rather than the spurious vector).
    pub fn acknowledge_interrupt(&mut self) -> Option<Vector> {
        let vector = self.pending_interrupt()?;
        self.irr.remove(vector);
        self.isr.insert(vector);
        Some(vector)
    }

    /// EOI (§11.8.5): retires the highest in-service vector; a level-triggered one is
    /// broadcast to the IOAPICs unless SVR bit 12 suppresses the broadcast.
    fn eoi(&mut self) -> LapicEffect {
        let Some(vector) = self.isr.highest() else {
            return LapicEffect::None;
        };
        self.isr.remove(vector);
        let suppressed = self.svr & SVR_SUPPRESS_EOI_BROADCAST != 0;
        if self.tmr.contains(vector) && !suppressed {
            LapicEffect::Eoi(EoiMessage { vector })
        } else {
            LapicEffect::None
        }
    }

    /// The vector a paravirtual EOI would retire in the run about to begin, if the VMM may let
    /// the guest skip its EOI write (KVM's PV EOI: Linux Documentation/virt/kvm/x86/msr.rst,
    /// MSR_KVM_PV_EOI_EN; the guest clears a flag in its memory instead, and the VMM retires the
    /// vector at its next exit). That is the highest in-service vector, when:
    /// - nothing waits in IRR: an EOI that makes a pending vector deliverable must exit, so that
    ///   the VMM can inject that vector at the boundary where it becomes deliverable;
    /// - its EOI is not broadcast (TMR clear): a level-triggered vector's EOI must reach the
    ///   IOAPICs at once, whose remote IRR holds the line until then (§11.8.5).
    ///
    /// KVM allows the same (`apic_sync_pv_eoi_to_guest`: no IRR bit, an in-service vector the
    /// IOAPIC does not need the EOI of); it only re-evaluates less often.
    pub fn paravirtual_eoi_candidate(&self) -> Option<Vector> {
        if !self.hw_enabled() || !self.irr.is_empty() {
            return None;
        }
        let vector = self.isr.highest()?;
        (!self.tmr.contains(vector)).then_some(vector)
    }

    /// The EOI a guest made by clearing its paravirtual EOI flag: what the EOI register write
    /// it skipped would have done (§11.8.5).
    pub fn paravirtual_eoi(&mut self) -> LapicEffect {
        self.eoi()
    }

    /// The task-priority register: the priority class (bits 7:4) below which fixed interrupts wait
    /// in IRR (SDM §11.8.3.1).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    fn set_tpr(&mut self, tpr: u8) -> LapicEffect {
        self.tpr = tpr;
        LapicEffect::None
    }

    /// PPR (§11.8.3.1): TPR if its class is at least the highest in-service class, else that
    /// class with sub-class 0.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if priority_class(self.tpr) >= priority_class(isrv) {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// APR (§11.6.2.4): TPR if its class beats both the in-service class and is at least the
    /// highest requested class, else the highest of the three classes.
    pub fn apr(&self) -> u8 {
        let tpr = priority_class(self.tpr);
        let isr = priority_class(self.isr.highest().unwrap_or(0));
        let irr = priority_class(self.irr.highest().unwrap_or(0));
        if tpr >= irr && tpr > isr {
            self.tpr
        } else {
            tpr.max(isr).max(irr) << 4
        }
    }

    /// CR8 reads TPR\[7:4\] (§11.8.6).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// A CR8 write sets `TPR[7:4]` = `CR8[3:0]` and `TPR[3:0]` = 0 (§11.8.6).
    pub fn set_cr8(&mut self, cr8: u64) {
        // Truncation keeps CR8[3:0].
        self.tpr = ((cr8 & 0xF) as u8) << 4;
    }

    /// The interrupt request register: vectors accepted but not yet delivered (SDM §11.8.4).
    pub fn irr(&self) -> VectorSet {
        self.irr
    }

    /// The in-service register: vectors delivered to the CPU and awaiting their EOI (SDM §11.8.4).
    pub fn isr(&self) -> VectorSet {
        self.isr
    }

    /// The trigger-mode register: the vectors accepted level-triggered, whose EOI is broadcast to
    /// the IOAPICs (SDM §11.8.4, §11.8.5).
    pub fn tmr(&self) -> VectorSet {
        self.tmr
    }

    // ----- Topology and local interrupts ---------------------------------------------------

    /// What the bus needs to address this APIC.
    pub fn topology(&self) -> TopologyEntry {
        TopologyEntry {
            apic_id: ApicId(self.id),
            initial_id: self.cfg.apic_id,
            x2apic: self.x2apic(),
            hw_enabled: self.hw_enabled(),
            sw_enabled: self.sw_enabled(),
            ldr: self.ldr(),
            dfr_flat: self.dfr & DFR_MODEL_MASK == DFR_MODEL_MASK,
        }
    }

    /// Whether the 8259's INTR reaches this processor: LINT0 unmasked in ExtINT mode, or the
    /// APIC globally disabled (LINT0 is then the processor's INTR pin, §11.4.3).
    pub fn accepts_pic_interrupts(&self) -> bool {
        let lint0 = self.lvt[LocalSource::Lint0.index()];
        !self.hw_enabled()
            || (lint0 & LVT_MASKED == 0
                && (lint0 & LVT_DELIVERY_MODE_MASK) >> LVT_DELIVERY_MODE_SHIFT
                    == crate::types::DeliveryMode::ExtInt.bits())
    }

    /// A local interrupt source fired (§11.5.1). Fixed delivery sets IRR (illegal vectors set
    /// ESR "receive illegal vector") and returns no event; NMI, SMI, INIT and ExtINT are returned
    /// for the caller to latch; a masked entry or an encoding that is reserved for LVTs
    /// (lowest priority, start-up, 011b) does nothing. With the APIC globally disabled, LINT0
    /// and LINT1 are the processor's INTR and NMI pins (§11.4.3). Timer and error entries are
    /// always fixed; only LINT0 may be level-triggered (LINT1 is edge-only, §11.5.1).
    pub fn local_interrupt(&mut self, source: LocalSource) -> ApicEvents {
        use crate::types::DeliveryMode;
        let mut events = ApicEvents::default();
        if !self.hw_enabled() {
            match source {
                LocalSource::Lint0 => events.extint = true,
                LocalSource::Lint1 => events.nmi = true,
                _ => {}
            }
            return events;
        }
        let lvt = self.lvt[source.index()];
        if lvt & LVT_MASKED != 0 {
            return events;
        }
        let mode = match source {
            LocalSource::Timer | LocalSource::Error => Some(DeliveryMode::Fixed),
            _ => DeliveryMode::from_bits(lvt >> LVT_DELIVERY_MODE_SHIFT),
        };
        match mode {
            Some(DeliveryMode::Fixed) => {
                let level = source == LocalSource::Lint0 && lvt & LVT_TRIGGER_LEVEL != 0;
                let trigger = if level {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                };
                // Truncation keeps the vector field.
                self.accept_vector((lvt & LVT_VECTOR_MASK) as u8, trigger);
            }
            Some(DeliveryMode::Nmi) => events.nmi = true,
            Some(DeliveryMode::Smi) => events.smi = true,
            Some(DeliveryMode::Init) => events.init = true,
            Some(DeliveryMode::ExtInt) => events.extint = true,
            Some(DeliveryMode::LowestPriority | DeliveryMode::StartUp) | None => {}
        }
        events
    }

    // ----- Timer ---------------------------------------------------------------------------

    /// When [`poll_timer`](Self::poll_timer) should next be called.
    pub fn next_timer_deadline(&self) -> Option<Nanos> {
        if self.hw_enabled() {
            self.timer.next_deadline()
        } else {
            None
        }
    }

    /// Timer expiry at or before `now`: the timer LVT's vector goes to IRR if the entry is
    /// unmasked; an expiry while masked is lost (§11.5.4).
    pub fn poll_timer(&mut self, now: Nanos) {
        if self.hw_enabled() && self.timer.poll(now) {
            self.local_interrupt(LocalSource::Timer);
        }
    }

    /// The timer, read-only (for snapshots and tests).
    pub fn timer(&self) -> &ApicTimer {
        &self.timer
    }

    // ----- Snapshots -----------------------------------------------------------------------

    /// Moves the APIC from the timeline it was saved on to the one it is restored into: the
    /// timer keeps the time left to every pending or future expiry ([`ApicTimer::rebase`]), and
    /// the guest TSC origin moves so that the guest TSC at `restored_at` equals the guest TSC at
    /// `saved_at` (a TSC deadline keeps its distance too). If the new timeline is so far ahead
    /// that the origin would go below 0, it saturates at 0 (the guest TSC then jumps forward).
    pub fn rebase_timeline(&mut self, saved_at: Nanos, restored_at: Nanos) {
        let tsc = self.timer.guest_tsc(saved_at);
        self.timer.rebase(saved_at, restored_at);
        let origin = self.timer.clock().tsc_at_zero;
        let ticks_to_restore = self.timer.guest_tsc(restored_at).wrapping_sub(origin);
        let anchor = tsc.saturating_sub(ticks_to_restore);
        self.timer.set_tsc_at_zero(anchor);
        self.cfg.clock.tsc_at_zero = anchor;
    }

    /// Moves the guest TSC's origin by `ticks` (wrapping) and nothing else: countdowns keep
    /// their expiry, a TSC deadline its guest-TSC value. A VMM restoring a snapshot on a host
    /// whose guest TSC could not be set back to the saved value (it kept running) uses it so that
    /// the model's TSC is the one the guest reads.
    pub fn shift_guest_tsc(&mut self, ticks: u64) {
        let origin = self.timer.clock().tsc_at_zero.wrapping_add(ticks);
        self.timer.set_tsc_at_zero(origin);
        self.cfg.clock.tsc_at_zero = origin;
    }

    /// Checks a deserialized APIC (a snapshot may be malformed) before it is used: IA32_APIC_BASE
    /// must be in a reachable mode, the clock the same in the configuration and the timer, and the
    /// timer consistent ([`ApicTimer::validate`]).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.mode() == ApicMode::Invalid {
            return Err("local APIC: IA32_APIC_BASE has EXTD without EN");
        }
        if self.apic_base & apic_base_reserved(self.cfg.max_phys_addr) != 0 {
            return Err("local APIC: IA32_APIC_BASE reserved bits set");
        }
        if self.x2apic() && !self.cfg.x2apic_supported {
            return Err("local APIC: x2APIC mode without x2APIC support");
        }
        // The clock is stored twice (configuration and timer) and moved together by
        // `rebase_timeline`; a snapshot where they differ was not written by this crate.
        if self.timer.clock() != self.cfg.clock {
            return Err("local APIC: the timer's clock differs from the configuration's");
        }
        self.timer.validate()
    }
}
