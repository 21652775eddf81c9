//! A vCPU's local APIC and pending events in the API's one shape ([`LapicInfo`],
//! [`PendingInfo`]), from KVM (`kernel` and `split` mode: KVM_GET_LAPIC, KVM_GET_MSRS,
//! KVM_GET_VCPU_EVENTS) or from the `irqchip` model (`user` mode). Called on the vCPU's own
//! thread, outside KVM_RUN.

use irqchip::lapic::{LocalApic, LocalSource};
use irqchip::Nanos;
use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::model::{
    apic_mode_name, divisor_of, timer_mode_name, LapicInfo, LvtEntry, LvtTable, PendingInfo,
    TimerInfo,
};
use crate::kvm::KvmError;

const MSR_APIC_BASE: u32 = 0x1B;
const MSR_TSC_DEADLINE: u32 = 0x6E0;

/// Register offsets of the xAPIC page (SDM vol. 3 Table 11-1), as KVM_GET_LAPIC lays them out.
mod reg {
    pub const ID: usize = 0x20;
    pub const TPR: usize = 0x80;
    pub const PPR: usize = 0xA0;
    pub const LDR: usize = 0xD0;
    pub const SVR: usize = 0xF0;
    pub const ISR: usize = 0x100;
    pub const TMR: usize = 0x180;
    pub const IRR: usize = 0x200;
    pub const ESR: usize = 0x280;
    pub const LVT_TIMER: usize = 0x320;
    pub const LVT_THERMAL: usize = 0x330;
    pub const LVT_PERF: usize = 0x340;
    pub const LVT_LINT0: usize = 0x350;
    pub const LVT_LINT1: usize = 0x360;
    pub const LVT_ERROR: usize = 0x370;
    pub const TMICT: usize = 0x380;
    pub const TMCCT: usize = 0x390;
    pub const TDCR: usize = 0x3E0;
}

/// A 32-bit register of a KVM_GET_LAPIC page.
fn page_reg(page: &[u8; 1024], offset: usize) -> u32 {
    u32::from_le_bytes([
        page[offset],
        page[offset + 1],
        page[offset + 2],
        page[offset + 3],
    ])
}

/// The vectors of a 256-bit register (ISR/TMR/IRR: eight 32-bit registers 16 bytes apart).
fn page_vectors(page: &[u8; 1024], base: usize) -> Vec<u8> {
    (0..=255u8)
        .filter(|&v| page_reg(page, base + 0x10 * (v as usize / 32)) & (1 << (v % 32)) != 0)
        .collect()
}

/// Decodes a KVM_GET_LAPIC register page with the IA32_APIC_BASE and IA32_TSC_DEADLINE values.
/// KVM returns the ID in the xAPIC position (bits 31:24) in xAPIC mode. In x2APIC mode
/// (IA32_APIC_BASE.EXTD, bit 10) it is whole where irqvm enabled 32-bit IDs and `id << 24`
/// where it did not (`backend::kernel::KvmApicIds`): without them every ID is below 255, with
/// them below KVM's vCPU ID limit (4096), so an x2APIC-mode value whose bits 23:0 are clear and
/// 31:24 are not is the shifted form.
pub fn decode_kvm_page(page: &[u8; 1024], apic_base: u64, tsc_deadline: u64) -> LapicInfo {
    let r = |o| page_reg(page, o);
    const EXTD: u64 = 1 << 10;
    let raw_id = r(reg::ID);
    let shifted = raw_id & 0x00FF_FFFF == 0;
    let id = if apic_base & EXTD != 0 && !shifted {
        raw_id
    } else {
        raw_id >> 24
    };
    let lvt_timer = r(reg::LVT_TIMER);
    let mode = timer_mode_name(lvt_timer);
    LapicInfo {
        id,
        mode: apic_mode_name(apic_base).into(),
        apic_base,
        software_enabled: r(reg::SVR) & (1 << 8) != 0,
        tpr: r(reg::TPR) as u8,
        ppr: r(reg::PPR) as u8,
        ldr: r(reg::LDR),
        esr: r(reg::ESR),
        irr: page_vectors(page, reg::IRR),
        isr: page_vectors(page, reg::ISR),
        tmr: page_vectors(page, reg::TMR),
        lvt: LvtTable {
            timer: LvtEntry::decode(lvt_timer),
            thermal: LvtEntry::decode(r(reg::LVT_THERMAL)),
            performance: LvtEntry::decode(r(reg::LVT_PERF)),
            lint0: LvtEntry::decode(r(reg::LVT_LINT0)),
            lint1: LvtEntry::decode(r(reg::LVT_LINT1)),
            error: LvtEntry::decode(r(reg::LVT_ERROR)),
        },
        timer: TimerInfo {
            mode: mode.into(),
            initial_count: r(reg::TMICT),
            current_count: r(reg::TMCCT),
            divisor: divisor_of(r(reg::TDCR)),
            tsc_deadline: if mode == "tsc_deadline" {
                tsc_deadline
            } else {
                0
            },
        },
    }
}

/// Reads MSRs by index; a value KVM does not return reads as 0.
fn read_msrs<const N: usize>(vcpu: &VcpuFd, indices: [u32; N]) -> Result<[u64; N], KvmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        what: "KVM_GET_MSRS",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
    let mut out = [0u64; N];
    for (slot, entry) in out.iter_mut().zip(msrs.as_slice().iter()).take(read) {
        *slot = entry.data;
    }
    Ok(out)
}

/// `kernel` and `split` mode: KVM's local APIC of this vCPU.
pub fn kvm_lapic(vcpu: &VcpuFd) -> Result<LapicInfo, KvmError> {
    let state: kvm_lapic_state = vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
    let mut page = [0u8; 1024];
    for (byte, reg) in page.iter_mut().zip(state.regs.iter()) {
        *byte = *reg as u8;
    }
    let [apic_base, tsc_deadline] = read_msrs(vcpu, [MSR_APIC_BASE, MSR_TSC_DEADLINE])?;
    Ok(decode_kvm_page(&page, apic_base, tsc_deadline))
}

/// KVM_GET_VCPU_EVENTS: pending and in-service NMI, latched INIT, the interrupt being injected
/// and the interrupt shadow. `extra_nmis` are NMIs the caller's own model holds (`user` mode) on
/// top of KVM's.
pub fn kvm_pending(vcpu: &VcpuFd, extra_nmis: u32) -> Result<PendingInfo, KvmError> {
    let events = vcpu
        .get_vcpu_events()
        .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    Ok(PendingInfo {
        nmis: u32::from(events.nmi.pending) + extra_nmis,
        nmi_masked: events.nmi.masked != 0,
        init_latched: events.flags & kvm_bindings::KVM_VCPUEVENT_VALID_SMM != 0
            && events.smi.latched_init != 0,
        injecting: (events.interrupt.injected != 0).then_some(events.interrupt.nr),
        interrupt_shadow: events.interrupt.shadow,
    })
}

/// `user` mode: the model's local APIC at `now`.
pub fn model_lapic(apic: &LocalApic, now: Nanos) -> LapicInfo {
    let timer = apic.timer();
    let lvt_timer = apic.lvt(LocalSource::Timer);
    let mode = timer_mode_name(lvt_timer);
    LapicInfo {
        id: apic.topology().apic_id.0,
        mode: apic_mode_name(apic.apic_base()).into(),
        apic_base: apic.apic_base(),
        software_enabled: apic.sw_enabled(),
        tpr: apic.tpr(),
        ppr: apic.ppr(),
        ldr: apic.ldr(),
        esr: apic.esr(),
        irr: apic.irr().iter().collect(),
        isr: apic.isr().iter().collect(),
        tmr: apic.tmr().iter().collect(),
        lvt: LvtTable {
            timer: LvtEntry::decode(lvt_timer),
            thermal: LvtEntry::decode(apic.lvt(LocalSource::Thermal)),
            performance: LvtEntry::decode(apic.lvt(LocalSource::Performance)),
            lint0: LvtEntry::decode(apic.lvt(LocalSource::Lint0)),
            lint1: LvtEntry::decode(apic.lvt(LocalSource::Lint1)),
            error: LvtEntry::decode(apic.lvt(LocalSource::Error)),
        },
        timer: TimerInfo {
            mode: mode.into(),
            initial_count: timer.initial_count(),
            current_count: timer.current_count(now),
            divisor: timer.divisor(),
            tsc_deadline: timer.tsc_deadline(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(page: &mut [u8; 1024], offset: usize, value: u32) {
        page[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn a_kvm_page_decodes_register_by_register() {
        let mut page = [0u8; 1024];
        put(&mut page, reg::ID, 3 << 24);
        put(&mut page, reg::SVR, 0x1FF);
        put(&mut page, reg::TPR, 0x20);
        put(&mut page, reg::IRR + 0x10, 1 << 1); // vector 33
        put(&mut page, reg::ISR + 0x70, 1 << 31); // vector 255
        put(&mut page, reg::LVT_TIMER, 0x2_00EC); // periodic, vector 0xEC
        put(&mut page, reg::LVT_LINT0, 0x1_0700); // masked ExtINT
        put(&mut page, reg::TMICT, 1000);
        put(&mut page, reg::TMCCT, 400);
        put(&mut page, reg::TDCR, 0xB);
        let info = decode_kvm_page(&page, 0xFEE0_0900, 77);
        assert_eq!(info.id, 3);
        assert_eq!(info.mode, "xapic");
        assert!(info.software_enabled);
        assert_eq!(info.tpr, 0x20);
        assert_eq!(info.irr, vec![33]);
        assert_eq!(info.isr, vec![255]);
        assert!(info.tmr.is_empty());
        assert_eq!(info.lvt.timer.vector, 0xEC);
        assert!(info.lvt.lint0.masked);
        assert_eq!(info.lvt.lint0.delivery_mode, 7);
        assert_eq!(info.timer.mode, "periodic");
        assert_eq!(
            (info.timer.initial_count, info.timer.current_count),
            (1000, 400)
        );
        assert_eq!(info.timer.divisor, 1);
        // The deadline MSR means nothing outside TSC-deadline mode.
        assert_eq!(info.timer.tsc_deadline, 0);
    }

    /// In x2APIC mode KVM reports the ID whole with 32-bit IDs and shifted without: both read
    /// as the same ID, and ID 0 is 0 either way.
    #[test]
    fn a_kvm_page_in_x2apic_mode_decodes_either_id_layout() {
        let x2apic_base = 0xFEE0_0D00;
        for (raw, id) in [
            (5, 5),
            (5 << 24, 5),
            (0x123, 0x123),
            (0xFE << 24, 0xFE),
            (0, 0),
        ] {
            let mut page = [0u8; 1024];
            put(&mut page, reg::ID, raw);
            let info = decode_kvm_page(&page, x2apic_base, 0);
            assert_eq!(
                (info.mode.as_str(), info.id),
                ("x2apic", id),
                "raw {raw:#x}"
            );
        }
    }
}
