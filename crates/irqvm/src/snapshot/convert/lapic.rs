//! Local APIC: the model's [`LocalApic`] <-> KVM's `kvm_lapic_state` register page, with
//! IA32_APIC_BASE and IA32_TSC_DEADLINE, which KVM keeps outside the page.

use irqchip::lapic::regs::*;
use irqchip::lapic::timer::{ApicTimer, TimerMode};
use irqchip::lapic::{LapicConfig, LapicRegisters, LocalApic, LocalSource, VectorSet};
use kvm_bindings::kvm_lapic_state;

use super::ConvertError;

/// How KVM lays out the APIC ID in the page in x2APIC mode (`kvm_apic_state_fixup`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LapicFormat {
    /// KVM_CAP_X2APIC_API with KVM_X2APIC_API_USE_32BIT_IDS is enabled: in x2APIC mode the
    /// page holds the full 32-bit ID at 0x20 (and KVM_SET_LAPIC refuses any other than the
    /// vCPU's). Without it KVM reports `id << 24` and ignores the field on set.
    pub x2apic_ids: bool,
}

/// One local APIC in KVM's terms: what KVM_GET_LAPIC returns and the two MSRs beside it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KvmLapic {
    /// The 1 KiB register page (KVM_GET_LAPIC / KVM_SET_LAPIC).
    pub page: kvm_lapic_state,
    /// IA32_APIC_BASE (MSR 0x1B).
    pub apic_base: u64,
    /// IA32_TSC_DEADLINE (MSR 0x6E0), in guest TSC ticks; 0 when disarmed and outside
    /// TSC-deadline mode.
    pub tsc_deadline: u64,
}

/// The 32-bit register at `offset` of a KVM page (little-endian, as KVM stores it).
pub fn page_reg(page: &kvm_lapic_state, offset: u32) -> u32 {
    let at = offset as usize;
    // `c_char` to byte: a reinterpretation of the same bits.
    let bytes: [u8; 4] = std::array::from_fn(|i| page.regs[at + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Stores `value` into the 32-bit register at `offset` of a KVM page.
pub fn set_page_reg(page: &mut kvm_lapic_state, offset: u32, value: u32) {
    let at = offset as usize;
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        // Byte to `c_char`: a reinterpretation of the same bits.
        page.regs[at + i] = byte as std::os::raw::c_char;
    }
}

fn vector_set_to_page(page: &mut kvm_lapic_state, base: u32, set: VectorSet) {
    for n in 0..8 {
        set_page_reg(page, base + 0x10 * n, set.register(n as usize));
    }
}

fn vector_set_from_page(page: &kvm_lapic_state, base: u32) -> VectorSet {
    let reg = |n: u32| u64::from(page_reg(page, base + 0x10 * n));
    VectorSet::from_words(std::array::from_fn(|w| {
        let w = w as u32;
        reg(2 * w) | reg(2 * w + 1) << 32
    }))
}

/// TMICT for KVM. A one-shot count that already expired is written as 0: KVM_SET_LAPIC takes
/// TMCCT 0 with a nonzero TMICT as "due now" (`set_target_expiration`) and would fire the timer
/// a second time; with TMICT 0 it stays stopped, at the cost of the guest reading TMICT 0
/// instead of the spent count.
fn kvm_initial_count(timer: &ApicTimer) -> u32 {
    if timer.mode() == TimerMode::OneShot && timer.current_count(0) == 0 {
        0
    } else {
        timer.initial_count()
    }
}

/// The model's APIC (on the snapshot's timeline: the save instant is time 0) in KVM's terms.
///
/// An expiry the timer reached but nobody polled yet is folded first, as the next poll would
/// have: its vector goes to IRR if the timer LVT is unmasked. Then TMCCT holds the count left
/// at the save, rounded up to whole counts (KVM_SET_LAPIC restarts the count from it; a spent
/// one-shot count has TMICT 0 too, see `kvm_initial_count`), and the
/// page holds what KVM_GET_LAPIC would report: PPR computed, APR 0 (KVM does not keep it), the
/// LDR derived from the ID in x2APIC mode, and in x2APIC mode the ICR destination at 0x310 and
/// also in the high dword of the 64-bit ICR at 0x300. The ESR errors detected since the last
/// ESR write (not yet readable) are lost: KVM has no such accumulator.
pub fn lapic_to_kvm(apic: &LocalApic, format: LapicFormat) -> KvmLapic {
    let mut apic = apic.clone();
    apic.poll_timer(0);
    let regs = apic.registers();
    let mut page = kvm_lapic_state::default();
    let id = match (apic.x2apic(), format.x2apic_ids) {
        (true, true) => regs.id,
        _ => regs.id << ID_XAPIC_SHIFT,
    };
    set_page_reg(&mut page, REG_ID, id);
    set_page_reg(&mut page, REG_VERSION, apic.version_register());
    set_page_reg(&mut page, REG_TPR, u32::from(regs.tpr));
    set_page_reg(&mut page, REG_PPR, u32::from(apic.ppr()));
    set_page_reg(&mut page, REG_LDR, apic.ldr());
    set_page_reg(&mut page, REG_DFR, regs.dfr);
    set_page_reg(&mut page, REG_SVR, regs.svr);
    vector_set_to_page(&mut page, REG_ISR0, regs.isr);
    vector_set_to_page(&mut page, REG_TMR0, regs.tmr);
    vector_set_to_page(&mut page, REG_IRR0, regs.irr);
    set_page_reg(&mut page, REG_ESR, regs.esr);
    for source in LocalSource::ALL {
        set_page_reg(&mut page, source.offset(), apic.lvt(source));
    }
    set_page_reg(&mut page, REG_ICR_LOW, regs.icr_low);
    set_page_reg(&mut page, REG_ICR_HIGH, regs.icr_high);
    if apic.x2apic() {
        set_page_reg(&mut page, REG_ICR_LOW + 4, regs.icr_high);
    }
    let timer = apic.timer();
    set_page_reg(&mut page, REG_TIMER_INITIAL, kvm_initial_count(timer));
    set_page_reg(&mut page, REG_TIMER_CURRENT, timer.current_count(0));
    set_page_reg(&mut page, REG_TIMER_DCR, timer.divide_config());
    let tsc_deadline = if apic.hw_enabled() {
        timer.tsc_deadline()
    } else {
        0
    };
    KvmLapic {
        page,
        apic_base: regs.apic_base,
        tsc_deadline,
    }
}

/// KVM's APIC state as the model's, on the snapshot's timeline (time 0 = the instant KVM's
/// state was read). `cfg` is the vCPU's configuration, its clock's `tsc_at_zero` the guest TSC
/// at that instant (a TSC deadline at or before it fires at the first poll).
///
/// Read as KVM_SET_LAPIC reads the page: version, PPR and APR are ignored (derived), TMCCT is
/// the count left (capped at TMICT; 0 in periodic mode is a full period, as KVM restarts it;
/// 0 in one-shot mode is an expired count, which the model does not fire again where KVM
/// would), and in x2APIC mode the ID is the vCPU's (with 32-bit IDs the page must hold exactly
/// it, as KVM requires) and the LDR derived. Bits no write can set are dropped (see
/// [`LocalApic::from_registers`]), as is the reserved timer mode 11b (one-shot).
pub fn lapic_from_kvm(
    cfg: LapicConfig,
    state: &KvmLapic,
    format: LapicFormat,
) -> Result<LocalApic, ConvertError> {
    let page = &state.page;
    let x2apic =
        irqchip::lapic::ApicMode::of_base(state.apic_base) == irqchip::lapic::ApicMode::X2Apic;
    let raw_id = page_reg(page, REG_ID);
    if x2apic && format.x2apic_ids && raw_id != cfg.apic_id.0 {
        return Err(ConvertError::X2apicId {
            expected: cfg.apic_id.0,
            found: raw_id,
        });
    }
    let icr_high = page_reg(page, REG_ICR_HIGH);
    let regs = LapicRegisters {
        apic_base: state.apic_base,
        id: raw_id >> ID_XAPIC_SHIFT,
        // Truncation keeps TPR bits 7:0.
        tpr: (page_reg(page, REG_TPR) & TPR_MASK) as u8,
        ldr: page_reg(page, REG_LDR),
        dfr: page_reg(page, REG_DFR),
        svr: page_reg(page, REG_SVR),
        irr: vector_set_from_page(page, REG_IRR0),
        isr: vector_set_from_page(page, REG_ISR0),
        tmr: vector_set_from_page(page, REG_TMR0),
        esr: page_reg(page, REG_ESR),
        esr_pending: 0,
        lvt: LocalSource::ALL.map(|source| page_reg(page, source.offset())),
        icr_low: page_reg(page, REG_ICR_LOW),
        icr_high,
    };
    let lvt_timer = regs.lvt[0];
    let mode = TimerMode::from_lvt(lvt_timer).unwrap_or(TimerMode::OneShot);
    let initial = page_reg(page, REG_TIMER_INITIAL);
    let mut current = page_reg(page, REG_TIMER_CURRENT);
    if mode == TimerMode::Periodic && current == 0 {
        current = initial;
    }
    let timer = ApicTimer::from_counts(
        cfg.clock,
        mode,
        page_reg(page, REG_TIMER_DCR),
        initial,
        current,
        state.tsc_deadline,
        0,
    );
    LocalApic::from_registers(cfg, &regs, timer).map_err(ConvertError::Lapic)
}
