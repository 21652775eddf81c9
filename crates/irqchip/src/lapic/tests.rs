//! Unit and property tests of the local APIC register model. Each test names the SDM vol. 3
//! section it checks. Time is a plain `Nanos` value; no host clock is read.

use super::*;
use crate::types::{DeliveryMode, DestinationMode, Shorthand};
use proptest::prelude::*;

const VCPU: VcpuIndex = 1;
const ID: u32 = 3;

fn config() -> LapicConfig {
    LapicConfig {
        index: VCPU,
        apic_id: ApicId(ID),
        bsp: false,
        clock: ClockConfig::default(),
        x2apic_supported: true,
        directed_eoi_supported: true,
        cmci_supported: true,
        max_phys_addr: 52,
    }
}

/// An xAPIC-mode APIC, software-enabled (SVR = 0x1FF), TPR 0.
fn xapic() -> LocalApic {
    let mut apic = LocalApic::new(config());
    write(&mut apic, REG_SVR, 0x1FF);
    apic
}

/// The same APIC switched to x2APIC mode.
fn x2apic() -> LocalApic {
    let mut apic = xapic();
    let base = apic.apic_base() | APIC_BASE_EXTD;
    assert_eq!(
        apic.set_apic_base(base, false),
        Ok(LapicEffect::TopologyChanged)
    );
    apic
}

fn read(apic: &mut LocalApic, offset: u32) -> u32 {
    let mut data = [0xAAu8; 4];
    apic.mmio_read(u64::from(offset), &mut data, 0);
    u32::from_le_bytes(data)
}

fn write(apic: &mut LocalApic, offset: u32, value: u32) -> LapicEffect {
    apic.mmio_write(u64::from(offset), &value.to_le_bytes(), 0)
}

fn msr(reg: u32) -> u32 {
    X2APIC_MSR_BASE + (reg >> 4)
}

/// Reads ESR the way software does: write (latch), then read.
fn latched_esr(apic: &mut LocalApic) -> u32 {
    if apic.x2apic() {
        apic.msr_write(msr(REG_ESR), 0, 0).unwrap();
        apic.msr_read(msr(REG_ESR), 0).unwrap() as u32
    } else {
        write(apic, REG_ESR, 0);
        read(apic, REG_ESR)
    }
}

fn ipi(effect: LapicEffect) -> InterruptMessage {
    match effect {
        LapicEffect::SendIpi(message) => message,
        other => panic!("expected an IPI, got {other:?}"),
    }
}

// ----- Power-on and INIT ---------------------------------------------------------------------

#[test]
fn power_on_state_11_4_7_1() {
    let mut apic = LocalApic::new(config());
    assert_eq!(apic.apic_base(), 0xFEE0_0800);
    assert_eq!(apic.mmio_base(), Some(0xFEE0_0000));
    assert_eq!(read(&mut apic, REG_ID), ID << 24);
    assert_eq!(read(&mut apic, REG_SVR), 0xFF);
    assert!(!apic.sw_enabled());
    assert_eq!(read(&mut apic, REG_DFR), 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, REG_TPR), 0);
    assert_eq!(read(&mut apic, REG_LDR), 0);
    for source in LocalSource::ALL {
        assert_eq!(read(&mut apic, source.offset()), LVT_MASKED, "{source:?}");
    }
    let bsp = LocalApic::new(LapicConfig {
        bsp: true,
        ..config()
    });
    assert_eq!(bsp.apic_base(), 0xFEE0_0900);
}

#[test]
fn version_register_11_4_8() {
    let mut apic = xapic();
    assert_eq!(read(&mut apic, REG_VERSION), 0x0106_0014);
    let mut plain = LocalApic::new(LapicConfig {
        directed_eoi_supported: false,
        cmci_supported: false,
        ..config()
    });
    assert_eq!(read(&mut plain, REG_VERSION), 0x0005_0014);
    // Read-only: writes are ignored.
    write(&mut plain, REG_VERSION, 0);
    assert_eq!(read(&mut plain, REG_VERSION), 0x0005_0014);
    // Six LVTs and directed EOI: what KVM's LAPIC reports for an x2APIC vCPU without
    // MCG_CMCI_P whose IOAPIC is in userspace.
    let mut kvm_like = LocalApic::new(LapicConfig {
        cmci_supported: false,
        ..config()
    });
    assert_eq!(read(&mut kvm_like, REG_VERSION), 0x0105_0014);
}

/// Without CMCI (MCG_CAP.MCG_CMCI_P clear) the slot at 0x2F0 is reserved (SDM vol. 3 §16.5.1,
/// §11.5.3): an xAPIC access reads 0, is ignored and sets ESR bit 7 (illegal register
/// address); the x2APIC MSR 0x82F raises #GP both ways. With CMCI both views reach the LVT.
#[test]
fn cmci_lvt_exists_only_with_cmci_16_5_1() {
    let no_cmci = LapicConfig {
        cmci_supported: false,
        ..config()
    };
    let mut apic = LocalApic::new(no_cmci);
    write(&mut apic, REG_SVR, 0x1FF);
    write(&mut apic, REG_LVT_CMCI, 0x44);
    assert_eq!(read(&mut apic, REG_LVT_CMCI), 0);
    assert_eq!(
        apic.local_interrupt(LocalSource::Cmci),
        ApicEvents::default()
    );
    write(&mut apic, REG_ESR, 0);
    assert_eq!(read(&mut apic, REG_ESR), ESR_ILLEGAL_REGISTER);

    let mut x2 = LocalApic::new(no_cmci);
    let base = x2.apic_base() | APIC_BASE_EXTD;
    x2.set_apic_base(base, false).unwrap();
    let cmci_msr = X2APIC_MSR_BASE + (REG_LVT_CMCI >> 4);
    assert!(x2.msr_read(cmci_msr, 0).is_err());
    assert!(x2.msr_write(cmci_msr, 0x1_0044, 0).is_err());

    let mut with = LocalApic::new(config());
    with.set_apic_base(base, false).unwrap();
    assert_eq!(with.msr_read(cmci_msr, 0), Ok(u64::from(LVT_MASKED)));
    with.msr_write(cmci_msr, 0x1_0044, 0).unwrap();
    assert_eq!(with.msr_read(cmci_msr, 0), Ok(0x1_0044));
}

#[test]
fn init_reset_keeps_id_and_base_11_4_7_3() {
    let mut apic = xapic();
    write(&mut apic, REG_ID, 0x7700_0000);
    write(&mut apic, REG_LDR, 0x0100_0000);
    write(&mut apic, REG_DFR, 0);
    write(&mut apic, REG_TPR, 0x20);
    write(&mut apic, REG_LVT_LINT0, 0x700);
    write(&mut apic, REG_TIMER_INITIAL, 1000);
    apic.accept_vector(0x40, TriggerMode::Level);
    apic.acknowledge_interrupt();
    apic.accept_vector(0x50, TriggerMode::Edge);
    apic.init_reset();
    assert_eq!(read(&mut apic, REG_ID), 0x7700_0000);
    assert_eq!(apic.apic_base(), 0xFEE0_0800);
    assert_eq!(read(&mut apic, REG_LDR), 0);
    assert_eq!(read(&mut apic, REG_DFR), 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, REG_SVR), 0xFF);
    assert_eq!(read(&mut apic, REG_TPR), 0);
    assert_eq!(read(&mut apic, REG_LVT_LINT0), LVT_MASKED);
    assert_eq!(read(&mut apic, REG_TIMER_INITIAL), 0);
    assert!(apic.irr().is_empty() && apic.isr().is_empty() && apic.tmr().is_empty());
    assert_eq!(apic.next_timer_deadline(), None);
}

#[test]
fn init_reset_in_x2apic_mode_keeps_mode_id_and_ldr_11_12_5_1() {
    let mut apic = x2apic();
    let base = apic.apic_base();
    apic.init_reset();
    assert_eq!(apic.apic_base(), base);
    assert!(apic.x2apic());
    assert_eq!(apic.msr_read(msr(REG_ID), 0), Ok(u64::from(ID)));
    assert_eq!(apic.msr_read(msr(REG_LDR), 0), Ok(1 << ID));
    assert_eq!(apic.msr_read(msr(REG_SVR), 0), Ok(0xFF));
}

// ----- xAPIC registers (§11.4.1 table) -------------------------------------------------------

#[test]
fn xapic_id_bits_31_24_writable_11_4_6() {
    let mut apic = xapic();
    assert_eq!(
        write(&mut apic, REG_ID, 0x12FF_FFFF),
        LapicEffect::TopologyChanged
    );
    assert_eq!(read(&mut apic, REG_ID), 0x1200_0000);
    assert_eq!(apic.topology().apic_id, ApicId(0x12));
    assert_eq!(write(&mut apic, REG_ID, 0x1200_0000), LapicEffect::None);
}

#[test]
fn tpr_bits_7_0_writable_11_8_3_1() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0xFFFF_FF5A);
    assert_eq!(read(&mut apic, REG_TPR), 0x5A);
    assert_eq!(apic.tpr(), 0x5A);
}

#[test]
fn cr8_maps_to_tpr_7_4_11_8_6() {
    let mut apic = xapic();
    apic.set_cr8(0x1B);
    assert_eq!(apic.tpr(), 0xB0);
    assert_eq!(apic.cr8(), 0xB);
    write(&mut apic, REG_TPR, 0x7F);
    assert_eq!(apic.cr8(), 0x7);
}

#[test]
fn ppr_from_tpr_and_isr_11_8_3_1() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0x35);
    assert_eq!(read(&mut apic, REG_PPR), 0x35);
    apic.accept_vector(0x61, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x61));
    assert_eq!(read(&mut apic, REG_PPR), 0x60);
    write(&mut apic, REG_TPR, 0x6F);
    assert_eq!(read(&mut apic, REG_PPR), 0x6F);
    write(&mut apic, REG_TPR, 0x5F);
    assert_eq!(apic.ppr(), 0x60);
    // Read-only.
    write(&mut apic, REG_PPR, 0);
    assert_eq!(apic.ppr(), 0x60);
}

#[test]
fn apr_11_6_2_4() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0x45);
    assert_eq!(read(&mut apic, REG_APR), 0x45);
    apic.accept_vector(0x80, TriggerMode::Edge);
    assert_eq!(read(&mut apic, REG_APR), 0x80);
    write(&mut apic, REG_APR, 0x12);
    assert_eq!(read(&mut apic, REG_APR), 0x80);
}

/// APR when TPR and the highest requested vector share a priority class (SDM vol. 3 §11.6.2.4,
/// Figure 11-15's formula: `TPR[7:4] >= IRRV[7:4]` and `TPR[7:4] > ISRV[7:4]` give APR = TPR,
/// sub-class included). With `>` in place of `>=` the tie would read 0x40 instead of 0x45. The
/// in-service comparison is strict: an in-service vector of TPR's class gives the class alone.
#[test]
fn apr_when_tpr_and_irr_share_a_class_11_6_2_4() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0x45);
    apic.accept_vector(0x41, TriggerMode::Edge);
    assert_eq!(read(&mut apic, REG_APR), 0x45, "IRRV class == TPR class");
    apic.accept_vector(0x5F, TriggerMode::Edge);
    assert_eq!(read(&mut apic, REG_APR), 0x50, "IRRV class above TPR class");
    assert_eq!(apic.acknowledge_interrupt(), Some(0x5F));
    assert_eq!(read(&mut apic, REG_APR), 0x50, "ISRV class above TPR class");

    let mut apic = xapic();
    apic.accept_vector(0x4A, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x4A));
    write(&mut apic, REG_TPR, 0x45);
    assert_eq!(read(&mut apic, REG_APR), 0x40, "ISRV class == TPR class");
}

#[test]
fn eoi_is_write_only_and_rrd_reads_zero_11_4_1() {
    let mut apic = xapic();
    assert_eq!(read(&mut apic, REG_EOI), 0);
    assert_eq!(read(&mut apic, REG_RRD), 0);
    write(&mut apic, REG_RRD, 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, REG_RRD), 0);
    assert_eq!(
        latched_esr(&mut apic),
        0,
        "EOI/RRD are registers, not reserved"
    );
}

#[test]
fn ldr_and_dfr_masks_11_6_2_2() {
    let mut apic = xapic();
    assert_eq!(
        write(&mut apic, REG_LDR, 0x81FF_FFFF),
        LapicEffect::TopologyChanged
    );
    assert_eq!(read(&mut apic, REG_LDR), 0x8100_0000);
    assert_eq!(apic.topology().ldr, 0x8100_0000);
    assert_eq!(
        write(&mut apic, REG_DFR, 0x0000_0000),
        LapicEffect::TopologyChanged
    );
    assert_eq!(read(&mut apic, REG_DFR), 0x0FFF_FFFF);
    assert!(!apic.topology().dfr_flat);
    assert_eq!(
        write(&mut apic, REG_DFR, 0xF000_0000),
        LapicEffect::TopologyChanged
    );
    assert_eq!(read(&mut apic, REG_DFR), 0xFFFF_FFFF);
    assert!(apic.topology().dfr_flat);
    assert_eq!(write(&mut apic, REG_DFR, 0xFFFF_FFFF), LapicEffect::None);
}

#[test]
fn svr_writable_bits_with_and_without_directed_eoi_11_9() {
    let mut apic = xapic();
    write(&mut apic, REG_SVR, 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, REG_SVR), 0x13FF);
    let mut plain = LocalApic::new(LapicConfig {
        directed_eoi_supported: false,
        cmci_supported: false,
        ..config()
    });
    write(&mut plain, REG_SVR, 0xFFFF_FFFF);
    assert_eq!(read(&mut plain, REG_SVR), 0x03FF);
}

#[test]
fn isr_tmr_irr_registers_are_read_only_256_bit_sets_11_8_4() {
    let mut apic = xapic();
    apic.accept_vector(0x21, TriggerMode::Level);
    apic.accept_vector(0xFE, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0xFE));
    for n in 0..8u32 {
        let irr = read(&mut apic, REG_IRR0 + n * 0x10);
        let isr = read(&mut apic, REG_ISR0 + n * 0x10);
        let tmr = read(&mut apic, REG_TMR0 + n * 0x10);
        assert_eq!(irr, if n == 1 { 1 << 1 } else { 0 }, "IRR{n}");
        assert_eq!(isr, if n == 7 { 1 << 30 } else { 0 }, "ISR{n}");
        assert_eq!(tmr, if n == 1 { 1 << 1 } else { 0 }, "TMR{n}");
        write(&mut apic, REG_IRR0 + n * 0x10, 0xFFFF_FFFF);
        write(&mut apic, REG_ISR0 + n * 0x10, 0);
    }
    assert_eq!(apic.irr().iter().collect::<Vec<_>>(), vec![0x21]);
    assert_eq!(apic.isr().iter().collect::<Vec<_>>(), vec![0xFE]);
}

#[test]
fn lvt_writable_bits_per_entry_11_5_1() {
    let cases = [
        (LocalSource::Timer, 0x0007_00FF),
        (LocalSource::Thermal, 0x0001_07FF),
        (LocalSource::Performance, 0x0001_07FF),
        (LocalSource::Lint0, 0x0001_A7FF),
        (LocalSource::Lint1, 0x0001_A7FF),
        (LocalSource::Error, 0x0001_00FF),
        (LocalSource::Cmci, 0x0001_07FF),
    ];
    for (source, mask) in cases {
        let mut apic = xapic();
        // Timer mode 11b is reserved, so write 10b there.
        let all = if source == LocalSource::Timer {
            0xFFFB_FFFF
        } else {
            0xFFFF_FFFF
        };
        write(&mut apic, source.offset(), all);
        assert_eq!(read(&mut apic, source.offset()), all & mask, "{source:?}");
        write(&mut apic, source.offset(), 0);
        assert_eq!(read(&mut apic, source.offset()), 0, "{source:?}");
    }
}

#[test]
fn icr_registers_masks_and_idle_delivery_status_11_6_1() {
    let mut apic = xapic();
    write(&mut apic, REG_ICR_HIGH, 0xFFFF_FFFF);
    assert_eq!(read(&mut apic, REG_ICR_HIGH), 0xFF00_0000);
    write(&mut apic, REG_ICR_LOW, 0xFFF3_1040);
    // Bit 12 (delivery status) reads 0; the reserved bits 13, 16-17, 20-31 read back, as in KVM.
    assert_eq!(read(&mut apic, REG_ICR_LOW), 0xFFF3_0040);
}

#[test]
fn reserved_offsets_read_zero_and_set_esr_bit_7_11_5_3() {
    for offset in [
        0x000u32, 0x010, 0x040, 0x070, 0x290, 0x2E0, 0x3A0, 0x3D0, 0x3F0, 0x400, 0xFF0,
    ] {
        let mut apic = xapic();
        assert_eq!(read(&mut apic, offset), 0, "{offset:#x}");
        assert_eq!(latched_esr(&mut apic), ESR_ILLEGAL_REGISTER, "{offset:#x}");
        write(&mut apic, offset, 0x1234);
        assert_eq!(latched_esr(&mut apic), ESR_ILLEGAL_REGISTER, "{offset:#x}");
        assert_eq!(latched_esr(&mut apic), 0, "{offset:#x}");
    }
}

#[test]
fn sub_word_and_misaligned_reads_11_4_1() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0xA5);
    write(&mut apic, REG_LDR, 0x8100_0000);
    let mut one = [0xEEu8; 1];
    apic.mmio_read(u64::from(REG_TPR), &mut one, 0);
    assert_eq!(one, [0xA5]);
    let mut two = [0xEEu8; 2];
    apic.mmio_read(u64::from(REG_LDR) + 2, &mut two, 0);
    assert_eq!(two, [0x00, 0x81]);
    let mut three = [0xEEu8; 3];
    apic.mmio_read(u64::from(REG_LDR) + 1, &mut three, 0);
    assert_eq!(three, [0x00, 0x00, 0x81]);
    // Crossing byte 4 of the slot, touching bytes 4-15, or 8 bytes: zeros.
    let mut crossing = [0xEEu8; 2];
    apic.mmio_read(u64::from(REG_LDR) + 3, &mut crossing, 0);
    assert_eq!(crossing, [0, 0]);
    let mut high = [0xEEu8; 4];
    apic.mmio_read(u64::from(REG_TPR) + 4, &mut high, 0);
    assert_eq!(high, [0; 4]);
    let mut eight = [0xEEu8; 8];
    apic.mmio_read(u64::from(REG_TPR), &mut eight, 0);
    assert_eq!(eight, [0; 8]);
    apic.mmio_read(u64::from(REG_TPR), &mut [], 0);
    assert_eq!(latched_esr(&mut apic), 0);
}

#[test]
fn only_aligned_32_bit_writes_take_effect_11_4_1() {
    let mut apic = xapic();
    apic.mmio_write(u64::from(REG_TPR), &[0x55], 0);
    apic.mmio_write(u64::from(REG_TPR), &[0x55, 0], 0);
    apic.mmio_write(u64::from(REG_TPR), &[0x55, 0, 0, 0, 0, 0, 0, 0], 0);
    apic.mmio_write(u64::from(REG_TPR) + 1, &[0x55, 0, 0, 0], 0);
    apic.mmio_write(u64::from(REG_TPR) + 4, &[0x55, 0, 0, 0], 0);
    assert_eq!(apic.tpr(), 0);
    apic.mmio_write(u64::from(REG_TPR), &[0x55, 0, 0, 0], 0);
    assert_eq!(apic.tpr(), 0x55);
}

#[test]
fn offsets_beyond_the_page_are_not_ours() {
    let mut apic = xapic();
    let mut data = [0xEEu8; 4];
    apic.mmio_read(0x1000 + u64::from(REG_TPR), &mut data, 0);
    assert_eq!(data, [0; 4]);
    apic.mmio_read(u64::MAX, &mut data, 0);
    assert_eq!(
        apic.mmio_write(u64::MAX - 3, &[1, 2, 3, 4], 0),
        LapicEffect::None
    );
    assert_eq!(latched_esr(&mut apic), 0);
}

#[test]
fn xapic_page_dead_in_x2apic_and_disabled_modes_11_12_1() {
    let mut apic = x2apic();
    assert_eq!(apic.mmio_base(), None);
    assert_eq!(read(&mut apic, REG_VERSION), 0);
    write(&mut apic, REG_TPR, 0x40);
    assert_eq!(apic.tpr(), 0);
    read(&mut apic, 0x010);
    assert_eq!(latched_esr(&mut apic), 0, "no ESR from the dead page");
    let mut disabled = xapic();
    disabled.set_apic_base(0xFEE0_0000, false).unwrap();
    assert_eq!(disabled.mmio_base(), None);
    assert_eq!(read(&mut disabled, REG_VERSION), 0);
}

// ----- ESR (§11.5.3) --------------------------------------------------------------------------

#[test]
fn esr_is_write_then_read_11_5_3() {
    let mut apic = xapic();
    apic.accept_vector(3, TriggerMode::Edge);
    // Not visible until a write latches it.
    assert_eq!(read(&mut apic, REG_ESR), 0);
    write(&mut apic, REG_ESR, 0);
    assert_eq!(read(&mut apic, REG_ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
    assert_eq!(read(&mut apic, REG_ESR), ESR_RECEIVE_ILLEGAL_VECTOR);
    // Errors accumulate until the next write; the write also clears the internal state.
    write(&mut apic, REG_ICR_LOW, 0x0000_4005);
    apic.accept_vector(15, TriggerMode::Edge);
    assert_eq!(
        latched_esr(&mut apic),
        ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR
    );
    assert_eq!(latched_esr(&mut apic), 0);
}

#[test]
fn esr_error_fires_error_lvt_only_when_unmasked_11_5_3() {
    let mut apic = xapic();
    apic.accept_vector(1, TriggerMode::Edge);
    assert!(apic.irr().is_empty(), "masked error LVT");
    write(&mut apic, REG_LVT_ERROR, 0xE0);
    apic.accept_vector(1, TriggerMode::Level);
    assert_eq!(apic.irr().iter().collect::<Vec<_>>(), vec![0xE0]);
    assert!(!apic.tmr().contains(0xE0), "error interrupts are edge");
    // An illegal vector in the error LVT only adds "receive illegal vector": no recursion.
    let mut apic = xapic();
    write(&mut apic, REG_LVT_ERROR, 0x05);
    read(&mut apic, 0x010);
    assert!(apic.irr().is_empty());
    assert_eq!(
        latched_esr(&mut apic),
        ESR_ILLEGAL_REGISTER | ESR_RECEIVE_ILLEGAL_VECTOR
    );
}

// ----- Acceptance, priorities, EOI (§11.8) --------------------------------------------------------

#[test]
fn accept_sets_irr_and_tmr_coalesces_11_8_4() {
    let mut apic = xapic();
    apic.accept_vector(0x30, TriggerMode::Level);
    assert!(apic.tmr().contains(0x30));
    apic.accept_vector(0x30, TriggerMode::Edge);
    assert!(!apic.tmr().contains(0x30), "edge acceptance clears TMR");
    assert_eq!(apic.acknowledge_interrupt(), Some(0x30));
    assert_eq!(apic.acknowledge_interrupt(), None, "coalesced into one");
}

#[test]
fn accept_posted_batches_with_level_bits() {
    let mut apic = xapic();
    let mut pir = [0u64; 4];
    let mut level = [0u64; 4];
    pir[0] = 1 << 0x20 | 1 << 3;
    pir[3] = 1 << 63;
    level[3] = 1 << 63;
    apic.accept_posted(&pir, &level);
    assert_eq!(apic.irr().iter().collect::<Vec<_>>(), vec![0x20, 0xFF]);
    assert_eq!(apic.tmr().iter().collect::<Vec<_>>(), vec![0xFF]);
    assert_eq!(latched_esr(&mut apic), ESR_RECEIVE_ILLEGAL_VECTOR);
}

#[test]
fn acceptance_dropped_when_disabled_11_4_7_2() {
    let mut apic = LocalApic::new(config());
    apic.accept_vector(0x40, TriggerMode::Edge);
    assert!(apic.irr().is_empty(), "software disabled");
    apic.set_apic_base(0, false).unwrap();
    write(&mut apic, REG_SVR, 0x1FF);
    apic.accept_vector(0x40, TriggerMode::Edge);
    assert!(apic.irr().is_empty(), "hardware disabled");
    assert_eq!(apic.pending_interrupt(), None);
}

#[test]
fn pending_interrupt_needs_a_higher_class_than_ppr_11_8_3_1() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0x40);
    apic.accept_vector(0x4F, TriggerMode::Edge);
    assert_eq!(apic.pending_interrupt(), None, "same class as TPR");
    assert_eq!(apic.acknowledge_interrupt(), None);
    write(&mut apic, REG_TPR, 0x3F);
    assert_eq!(apic.pending_interrupt(), Some(0x4F));
    assert_eq!(apic.acknowledge_interrupt(), Some(0x4F));
    write(&mut apic, REG_TPR, 0);
    apic.accept_vector(0x41, TriggerMode::Edge);
    assert_eq!(apic.pending_interrupt(), None, "same class as ISR");
    apic.accept_vector(0x50, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x50), "nests");
    write(&mut apic, REG_EOI, 0);
    write(&mut apic, REG_EOI, 0);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x41));
}

#[test]
fn eoi_retires_highest_isr_and_broadcasts_level_only_11_8_5() {
    let mut apic = xapic();
    apic.accept_vector(0x30, TriggerMode::Level);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x30));
    apic.accept_vector(0x90, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x90));
    assert_eq!(write(&mut apic, REG_EOI, 0), LapicEffect::None);
    assert_eq!(apic.isr().iter().collect::<Vec<_>>(), vec![0x30]);
    assert_eq!(
        write(&mut apic, REG_EOI, 0),
        LapicEffect::Eoi(EoiMessage { vector: 0x30 })
    );
    assert_eq!(write(&mut apic, REG_EOI, 0), LapicEffect::None, "empty ISR");
}

/// KVM's PV EOI (Linux Documentation/virt/kvm/x86/msr.rst): the guest may skip the EOI write of
/// the highest in-service vector only when nothing waits in IRR and that vector's EOI is not
/// broadcast; the EOI the VMM then makes is the register write's (§11.8.5).
#[test]
fn paravirtual_eoi_only_for_an_edge_vector_with_nothing_pending() {
    let mut apic = xapic();
    assert_eq!(apic.paravirtual_eoi_candidate(), None, "nothing in service");
    apic.accept_vector(0x30, TriggerMode::Edge);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x30));
    assert_eq!(apic.paravirtual_eoi_candidate(), Some(0x30));
    apic.accept_vector(0x20, TriggerMode::Edge);
    assert_eq!(
        apic.paravirtual_eoi_candidate(),
        None,
        "0x20 waits in IRR: the EOI that unblocks it must exit"
    );
    apic.accept_vector(0x90, TriggerMode::Level);
    assert_eq!(apic.acknowledge_interrupt(), Some(0x90));
    assert_eq!(apic.acknowledge_interrupt(), None, "0x20 is below 0x90");
    apic.irr = VectorSet::default();
    assert_eq!(
        apic.paravirtual_eoi_candidate(),
        None,
        "0x90 is level-triggered: its EOI goes to the IOAPICs"
    );
    assert_eq!(
        apic.paravirtual_eoi(),
        LapicEffect::Eoi(EoiMessage { vector: 0x90 })
    );
    assert_eq!(apic.paravirtual_eoi_candidate(), Some(0x30));
    assert_eq!(apic.paravirtual_eoi(), LapicEffect::None);
    assert!(apic.isr().is_empty());
    assert_eq!(apic.ppr(), 0);
}

#[test]
fn eoi_broadcast_suppression_needs_directed_eoi_11_8_5() {
    let mut apic = xapic();
    write(&mut apic, REG_SVR, 0x11FF);
    apic.accept_vector(0x30, TriggerMode::Level);
    apic.acknowledge_interrupt();
    assert_eq!(write(&mut apic, REG_EOI, 0), LapicEffect::None);
    assert!(apic.isr().is_empty());
    let mut plain = LocalApic::new(LapicConfig {
        directed_eoi_supported: false,
        cmci_supported: false,
        ..config()
    });
    write(&mut plain, REG_SVR, 0x11FF);
    plain.accept_vector(0x30, TriggerMode::Level);
    plain.acknowledge_interrupt();
    assert_eq!(
        write(&mut plain, REG_EOI, 0),
        LapicEffect::Eoi(EoiMessage { vector: 0x30 })
    );
}

// ----- SVR software enable (§11.4.7.2, §11.9) -------------------------------------------------

#[test]
fn software_disable_masks_lvts_until_reenabled_11_4_7_2() {
    let mut apic = xapic();
    write(&mut apic, REG_LVT_LINT0, 0x700);
    write(&mut apic, REG_LVT_TIMER, 0x40);
    apic.accept_vector(0x40, TriggerMode::Edge);
    assert_eq!(
        write(&mut apic, REG_SVR, 0xFF),
        LapicEffect::TopologyChanged
    );
    assert!(!apic.topology().sw_enabled);
    for source in LocalSource::ALL {
        assert_ne!(
            read(&mut apic, source.offset()) & LVT_MASKED,
            0,
            "{source:?}"
        );
    }
    write(&mut apic, REG_LVT_LINT0, 0x700);
    assert_eq!(read(&mut apic, REG_LVT_LINT0), 0x1_0700, "cannot unmask");
    apic.accept_vector(0x50, TriggerMode::Edge);
    assert_eq!(
        apic.irr().iter().collect::<Vec<_>>(),
        vec![0x40],
        "pending kept, new fixed vectors refused"
    );
    assert_eq!(
        write(&mut apic, REG_SVR, 0x1FF),
        LapicEffect::TopologyChanged
    );
    assert_eq!(read(&mut apic, REG_LVT_LINT0), 0x1_0700, "still masked");
    write(&mut apic, REG_LVT_LINT0, 0x700);
    assert_eq!(read(&mut apic, REG_LVT_LINT0), 0x700);
}

// ----- ICR (§11.6.1, §11.12.9) ----------------------------------------------------------------

#[test]
fn xapic_icr_decodes_every_delivery_mode_11_6_1() {
    let cases = [
        (0x0000_4031u32, DeliveryMode::Fixed, 0x31),
        (0x0000_4131, DeliveryMode::LowestPriority, 0x31),
        (0x0000_4200, DeliveryMode::Smi, 0),
        (0x0000_4400, DeliveryMode::Nmi, 0),
        (0x0000_4500, DeliveryMode::Init, 0),
        (0x0000_4608, DeliveryMode::StartUp, 0x08),
    ];
    for (low, mode, vector) in cases {
        let mut apic = xapic();
        write(&mut apic, REG_ICR_HIGH, 0x0500_0000);
        let message = ipi(write(&mut apic, REG_ICR_LOW, low));
        assert_eq!(message.delivery_mode, mode);
        assert_eq!(message.vector, vector);
        assert_eq!(message.destination, 5);
        assert_eq!(message.format, DestinationFormat::Xapic);
        assert_eq!(message.source, MessageSource::Vcpu(VCPU));
        assert_eq!(message.destination_mode, DestinationMode::Physical);
        assert_eq!(message.trigger, TriggerMode::Edge);
        assert!(message.level_assert);
        assert_eq!(message.shorthand, Shorthand::None);
        assert_eq!(latched_esr(&mut apic), 0);
    }
}

#[test]
fn icr_init_level_deassert_is_sent_as_such_11_6_1() {
    let mut apic = xapic();
    let message = ipi(write(&mut apic, REG_ICR_LOW, 0x0008_8500));
    assert!(message.is_init_deassert());
    assert_eq!(message.shorthand, Shorthand::AllIncludingSelf);
}

/// Delivery modes 011b and 111b (ExtINT) are reserved in the ICR (SDM §11.6.1): nothing is
/// sent and no error recorded, but the write is stored and reads back, as in KVM's in-kernel
/// LAPIC (`kvm_lapic_reg_write` stores every ICR write; the `lapic_regs` guest checks it).
#[test]
fn icr_reserved_delivery_modes_are_stored_but_send_nothing_11_6_1() {
    for low in [0x0000_4340u32, 0x0000_4740] {
        let mut apic = xapic();
        write(&mut apic, REG_ICR_LOW, 0x40);
        write(&mut apic, REG_ICR_HIGH, 0x5500_0000);
        assert_eq!(write(&mut apic, REG_ICR_LOW, low), LapicEffect::None);
        assert_eq!(read(&mut apic, REG_ICR_LOW), low, "write stored");
        assert_eq!(latched_esr(&mut apic), 0);
        let mut x2 = x2apic();
        let value = 0x55_0000_0000 | u64::from(low);
        assert_eq!(
            x2.msr_write(MSR_X2APIC_ICR, value, 0),
            Ok(LapicEffect::None)
        );
        assert_eq!(x2.msr_read(MSR_X2APIC_ICR, 0), Ok(value));
    }
}

/// A fixed or lowest-priority IPI with level trigger and the level bit clear (the form of an
/// INIT level de-assert) reaches nobody in KVM (`__apic_accept_irq`), so the model sends nothing
/// and records no error; the write is stored. Asserted, the same IPI is sent level-triggered
/// (its target sets TMR), and INIT keeps its de-assert form (the bus ignores it).
#[test]
fn icr_fixed_and_lowest_level_deassert_send_nothing_11_6_1() {
    for low in [0x0000_8041u32, 0x0000_8141] {
        let mut apic = xapic();
        assert_eq!(write(&mut apic, REG_ICR_LOW, low), LapicEffect::None);
        assert_eq!(read(&mut apic, REG_ICR_LOW), low, "write stored");
        assert_eq!(latched_esr(&mut apic), 0);
        let mut x2 = x2apic();
        assert_eq!(
            x2.msr_write(MSR_X2APIC_ICR, u64::from(low), 0),
            Ok(LapicEffect::None)
        );
        let asserted = ipi(write(&mut apic, REG_ICR_LOW, low | 0x4000));
        assert_eq!(asserted.trigger, TriggerMode::Level);
        assert!(asserted.level_assert);
    }
    let mut apic = xapic();
    assert!(ipi(write(&mut apic, REG_ICR_LOW, 0x0000_8500)).is_init_deassert());
}

/// KVM stores every xAPIC ICR bit but delivery status (12), the reserved bits 13, 17:16 and
/// 31:20 included; the SDM leaves their read value open (§11.6.1), so the model reads them back
/// too. The fields that matter decode as before. In x2APIC mode they #GP (§11.12.9, as KVM).
#[test]
fn icr_reserved_bits_read_back_in_xapic_mode_11_6_1() {
    let mut apic = xapic();
    let message = ipi(write(&mut apic, REG_ICR_LOW, 0xFFF3_3031));
    assert_eq!(read(&mut apic, REG_ICR_LOW), 0xFFF3_2031, "all but bit 12");
    assert_eq!(message.vector, 0x31);
    assert_eq!(message.delivery_mode, DeliveryMode::Fixed);
    assert_eq!(message.shorthand, Shorthand::None);
    let mut x2 = x2apic();
    assert!(x2.msr_write(MSR_X2APIC_ICR, 0x2031, 0).is_err());
}

#[test]
fn icr_illegal_vector_sets_send_illegal_and_sends_nothing_11_5_3() {
    for low in [0x0000_400Fu32, 0x0000_4100] {
        let mut apic = xapic();
        assert_eq!(write(&mut apic, REG_ICR_LOW, low), LapicEffect::None);
        assert_eq!(latched_esr(&mut apic), ESR_SEND_ILLEGAL_VECTOR);
        let mut x2 = x2apic();
        assert_eq!(
            x2.msr_write(MSR_X2APIC_ICR, u64::from(low), 0),
            Ok(LapicEffect::None)
        );
        assert_eq!(latched_esr(&mut x2), ESR_SEND_ILLEGAL_VECTOR);
    }
    // NMI / INIT / SIPI carry no vector to check.
    let mut apic = xapic();
    ipi(write(&mut apic, REG_ICR_LOW, 0x0000_4605));
    assert_eq!(latched_esr(&mut apic), 0);
}

#[test]
fn icr_shorthand_destination_mode_and_trigger_11_6_1() {
    let shorthands = [
        Shorthand::None,
        Shorthand::SelfOnly,
        Shorthand::AllIncludingSelf,
        Shorthand::AllExcludingSelf,
    ];
    for (bits, shorthand) in shorthands.into_iter().enumerate() {
        let mut apic = xapic();
        let low = 0x40 | (bits as u32) << 18;
        assert_eq!(ipi(write(&mut apic, REG_ICR_LOW, low)).shorthand, shorthand);
    }
    let mut apic = xapic();
    write(&mut apic, REG_ICR_HIGH, 0xF000_0000);
    let message = ipi(write(&mut apic, REG_ICR_LOW, 0x0000_C840));
    assert_eq!(message.destination_mode, DestinationMode::Logical);
    assert_eq!(message.trigger, TriggerMode::Level);
    assert_eq!(message.destination, 0xF0);
}

#[test]
fn x2apic_icr_is_one_64_bit_msr_11_12_9() {
    let mut apic = x2apic();
    let value = 0x1234_5678_0000_0940u64;
    let message = ipi(apic.msr_write(MSR_X2APIC_ICR, value, 0).unwrap());
    assert_eq!(message.destination, 0x1234_5678);
    assert_eq!(message.format, DestinationFormat::X2apic);
    assert_eq!(message.destination_mode, DestinationMode::Logical);
    assert_eq!(message.delivery_mode, DeliveryMode::LowestPriority);
    assert_eq!(message.source, MessageSource::Vcpu(VCPU));
    assert_eq!(apic.msr_read(MSR_X2APIC_ICR, 0), Ok(value));
    // Delivery status (bit 12) is ignored on write and reads 0.
    ipi(apic.msr_write(MSR_X2APIC_ICR, value | 1 << 12, 0).unwrap());
    assert_eq!(apic.msr_read(MSR_X2APIC_ICR, 0), Ok(value));
    for bit in [13, 16, 17, 20, 31] {
        assert!(
            apic.msr_write(MSR_X2APIC_ICR, value | 1 << bit, 0).is_err(),
            "bit {bit}"
        );
    }
    // ICR high is not an x2APIC MSR.
    assert!(apic.msr_read(msr(REG_ICR_HIGH), 0).is_err());
    assert!(apic.msr_write(msr(REG_ICR_HIGH), 0, 0).is_err());
}

// ----- x2APIC MSR view (§11.12) ---------------------------------------------------------------

#[test]
fn x2apic_msrs_fault_outside_x2apic_mode_11_12_1() {
    let mut apic = xapic();
    assert!(apic.msr_read(msr(REG_VERSION), 0).is_err());
    assert!(apic.msr_write(msr(REG_TPR), 0, 0).is_err());
    let mut disabled = LocalApic::new(config());
    disabled.set_apic_base(0, false).unwrap();
    assert!(disabled.msr_read(msr(REG_VERSION), 0).is_err());
}

#[test]
fn x2apic_id_is_32_bit_read_only_11_12_5_1() {
    let mut apic = LocalApic::new(LapicConfig {
        apic_id: ApicId(0x1_2345),
        ..config()
    });
    assert_eq!(read(&mut apic, REG_ID), 0x4500_0000, "xAPIC sees 8 bits");
    apic.set_apic_base(0xFEE0_0C00, false).unwrap();
    assert_eq!(apic.msr_read(msr(REG_ID), 0), Ok(0x1_2345));
    assert!(apic.msr_write(msr(REG_ID), 0, 0).is_err());
    assert_eq!(apic.topology().apic_id, ApicId(0x1_2345));
    assert!(apic.topology().x2apic);
}

#[test]
fn x2apic_ldr_derived_from_id_11_12_10_2() {
    for (id, ldr) in [
        (0u32, 0x0000_0001u32),
        (0x12, 0x0001_0004),
        (0x3F, 0x0003_8000),
        (0x1_2345, 0x1234_0020),
        // Cluster = ID[19:4] only: ID bits 31:20 do not reach the LDR (SDM vol. 3 §11.12.10.2).
        (0x0123_4567, 0x3456_0080),
    ] {
        let mut apic = LocalApic::new(LapicConfig {
            apic_id: ApicId(id),
            ..config()
        });
        apic.set_apic_base(0xFEE0_0C00, false).unwrap();
        assert_eq!(
            apic.msr_read(msr(REG_LDR), 0),
            Ok(u64::from(ldr)),
            "id {id:#x}"
        );
        assert_eq!(apic.topology().ldr, ldr);
        assert!(apic.msr_write(msr(REG_LDR), u64::from(ldr), 0).is_err());
    }
}

#[test]
fn x2apic_registers_absent_or_reserved_fault_11_12_1_2() {
    let mut apic = x2apic();
    for reg in [
        REG_APR,
        REG_RRD,
        REG_DFR,
        REG_ICR_HIGH,
        0x000,
        0x010,
        0x040,
        0x3A0,
        0x400,
        0xFF0,
    ] {
        assert!(apic.msr_read(msr(reg), 0).is_err(), "read {reg:#x}");
        assert!(apic.msr_write(msr(reg), 0, 0).is_err(), "write {reg:#x}");
    }
    for other in [0x10u32, 0x1A, 0x6DF, 0x7FF, 0x900, u32::MAX] {
        assert!(apic.msr_read(other, 0).is_err(), "{other:#x}");
        assert!(apic.msr_write(other, 0, 0).is_err(), "{other:#x}");
    }
}

#[test]
fn x2apic_write_only_reads_and_read_only_writes_fault_11_12_1_2() {
    let mut apic = x2apic();
    assert!(apic.msr_read(msr(REG_EOI), 0).is_err());
    assert!(apic.msr_read(msr(REG_SELF_IPI), 0).is_err());
    for reg in [
        REG_ID,
        REG_VERSION,
        REG_PPR,
        REG_LDR,
        REG_ISR0,
        REG_TMR0 + 0x70,
        REG_IRR0 + 0x30,
        REG_TIMER_CURRENT,
    ] {
        assert!(apic.msr_read(msr(reg), 0).is_ok(), "read {reg:#x}");
        assert!(apic.msr_write(msr(reg), 0, 0).is_err(), "write {reg:#x}");
    }
}

#[test]
fn x2apic_eoi_and_esr_must_be_written_with_zero_11_12_1_2() {
    let mut apic = x2apic();
    apic.accept_vector(0x30, TriggerMode::Level);
    apic.acknowledge_interrupt();
    assert!(apic.msr_write(msr(REG_EOI), 1, 0).is_err());
    assert_eq!(apic.isr().iter().collect::<Vec<_>>(), vec![0x30]);
    assert_eq!(
        apic.msr_write(msr(REG_EOI), 0, 0),
        Ok(LapicEffect::Eoi(EoiMessage { vector: 0x30 }))
    );
    assert!(apic.msr_write(msr(REG_ESR), 1, 0).is_err());
    assert_eq!(apic.msr_write(msr(REG_ESR), 0, 0), Ok(LapicEffect::None));
}

#[test]
fn x2apic_reserved_bits_fault_11_12_1_3() {
    let mut apic = x2apic();
    let faults = [
        (REG_TPR, 0x100u64),
        (REG_TPR, 1 << 32),
        (REG_SVR, 0x400),
        (REG_LVT_TIMER, 1 << 19),
        (REG_LVT_TIMER, 0x700),
        (REG_LVT_ERROR, 0x400),
        (REG_LVT_LINT0, 1 << 17),
        (REG_TIMER_DCR, 0x4),
        (REG_TIMER_INITIAL, 1 << 32),
        (REG_SELF_IPI, 0x100),
    ];
    for (reg, value) in faults {
        assert!(
            apic.msr_write(msr(reg), value, 0).is_err(),
            "{reg:#x} {value:#x}"
        );
    }
    // Read-only LVT bits (delivery status, remote IRR) written back are not reserved.
    assert!(apic.msr_write(msr(REG_LVT_LINT0), 0x1_5700, 0).is_ok());
    assert_eq!(apic.msr_read(msr(REG_LVT_LINT0), 0), Ok(0x1_0700));
    assert!(apic.msr_write(msr(REG_SVR), 0x13FF, 0).is_ok());
    assert!(apic.msr_write(msr(REG_TPR), 0xFF, 0).is_ok());
    assert!(apic.msr_write(msr(REG_TIMER_DCR), 0xB, 0).is_ok());
    assert_eq!(apic.msr_read(msr(REG_TIMER_DCR), 0), Ok(0xB));
}

#[test]
fn x2apic_self_ipi_applies_locally_11_12_11() {
    let mut apic = x2apic();
    assert_eq!(
        apic.msr_write(msr(REG_SELF_IPI), 0x77, 0),
        Ok(LapicEffect::None)
    );
    assert_eq!(apic.pending_interrupt(), Some(0x77));
    assert!(!apic.tmr().contains(0x77));
    apic.msr_write(msr(REG_SELF_IPI), 0x07, 0).unwrap();
    assert_eq!(latched_esr(&mut apic), ESR_RECEIVE_ILLEGAL_VECTOR);
}

#[test]
fn x2apic_mode_keeps_registers_from_xapic_11_12_5_1() {
    let mut apic = xapic();
    write(&mut apic, REG_TPR, 0x20);
    write(&mut apic, REG_LVT_LINT1, 0x400);
    apic.accept_vector(0x55, TriggerMode::Edge);
    apic.set_apic_base(0xFEE0_0C00, false).unwrap();
    assert_eq!(apic.msr_read(msr(REG_TPR), 0), Ok(0x20));
    assert_eq!(apic.msr_read(msr(REG_LVT_LINT1), 0), Ok(0x400));
    assert_eq!(apic.msr_read(msr(REG_IRR0 + 0x20), 0), Ok(1 << 0x15));
    assert_eq!(apic.msr_read(msr(REG_VERSION), 0), Ok(0x0106_0014));
}

// ----- IA32_APIC_BASE (§11.4.4, §11.12.5) -------------------------------------------------------

#[test]
fn apic_base_legal_transitions_11_12_5() {
    let mut apic = xapic();
    // xAPIC -> x2APIC -> disabled -> xAPIC -> disabled.
    for base in [0xFEE0_0C00u64, 0xFEE0_0000, 0xFEE0_0800, 0xFEE0_0000] {
        assert_eq!(
            apic.msr_write(MSR_APIC_BASE, base, 0),
            Ok(LapicEffect::TopologyChanged),
            "{base:#x}"
        );
        assert_eq!(apic.msr_read(MSR_APIC_BASE, 0), Ok(base));
    }
    assert_eq!(apic.mode(), ApicMode::Disabled);
    assert_eq!(
        apic.set_apic_base(0xFEE0_0000, false),
        Ok(LapicEffect::None)
    );
}

#[test]
fn apic_base_illegal_transitions_fault_11_12_5() {
    let mut apic = x2apic();
    assert!(
        apic.set_apic_base(0xFEE0_0800, false).is_err(),
        "x2APIC -> xAPIC"
    );
    assert!(apic.x2apic());
    let mut apic = xapic();
    apic.set_apic_base(0xFEE0_0000, false).unwrap();
    assert!(
        apic.set_apic_base(0xFEE0_0C00, false).is_err(),
        "disabled -> x2APIC"
    );
    assert!(
        apic.set_apic_base(0xFEE0_0400, false).is_err(),
        "EXTD without EN"
    );
    let mut apic = xapic();
    assert!(
        apic.set_apic_base(0xFEE0_0400, false).is_err(),
        "EXTD without EN"
    );
    for reserved in [1u64 << 0, 1 << 7, 1 << 9, 1 << 52, 1 << 63] {
        assert!(apic.set_apic_base(0xFEE0_0800 | reserved, false).is_err());
        assert!(apic.set_apic_base(0xFEE0_0800 | reserved, true).is_err());
    }
    let mut no_x2 = LocalApic::new(LapicConfig {
        x2apic_supported: false,
        ..config()
    });
    assert!(no_x2.set_apic_base(0xFEE0_0C00, false).is_err());
    assert!(no_x2.set_apic_base(0xFEE0_0C00, true).is_err());
    assert_eq!(no_x2.apic_base(), 0xFEE0_0800);
}

/// SDM §11.4.4 (Figure 11-5): the base field ends at MAXPHYADDR - 1; a write that sets a bit at
/// or above MAXPHYADDR faults, from the guest and from the host alike (KVM refuses such a value
/// from userspace), and leaves the APIC exactly as it was. The bit just below is a base bit.
#[test]
fn apic_base_bits_at_or_above_maxphyaddr_fault_11_4_4() {
    let mut apic = LocalApic::new(LapicConfig {
        max_phys_addr: 39,
        ..config()
    });
    let before = apic.clone();
    for bit in [39u32, 40, 47, 51, 52, 63] {
        let value = 0xFEE0_0800 | (1u64 << bit);
        assert!(apic.set_apic_base(value, false).is_err(), "bit {bit}");
        assert!(apic.set_apic_base(value, true).is_err(), "bit {bit}");
        assert!(
            apic.msr_write(MSR_APIC_BASE, value, 0).is_err(),
            "bit {bit}"
        );
        assert_eq!(apic, before, "bit {bit}: nothing changed");
    }
    assert_eq!(
        apic.set_apic_base(0xFEE0_0800 | (1 << 38), false),
        Ok(LapicEffect::TopologyChanged)
    );
    assert_eq!(apic.mmio_base(), Some(0x40_FEE0_0000));
    assert_eq!(apic.validate(), Ok(()));
    // The default (and the architectural maximum) reserves only bits 52-63.
    let mut wide = xapic();
    assert_eq!(wide.config().max_phys_addr, 52);
    wide.set_apic_base(0xFEE0_0800 | (1 << 51), false).unwrap();
    assert_eq!(LapicConfig::default().max_phys_addr, 52);
}

/// A nonsensical MAXPHYADDR is taken within 32..=52: the reset base FEE00000H stays legal and
/// bits 52-63 stay reserved.
#[test]
fn apic_base_reserved_mask_clamps_maxphyaddr() {
    assert_eq!(apic_base_reserved(0), apic_base_reserved(32));
    assert_eq!(apic_base_reserved(0) & 0xFEE0_0000, 0);
    assert_eq!(apic_base_reserved(200), APIC_BASE_RESERVED);
    assert_eq!(apic_base_reserved(36) & (1 << 36), 1 << 36);
    assert_eq!(apic_base_reserved(36) & (1 << 35), 0);
    assert_eq!(
        apic_base_reserved(52) & 0x1FF,
        0xFF,
        "bits 0-7 reserved, BSP not"
    );
}

#[test]
fn apic_base_host_initiated_bypasses_transition_checks() {
    let mut apic = x2apic();
    assert_eq!(
        apic.set_apic_base(0xFEE0_0800, true),
        Ok(LapicEffect::TopologyChanged)
    );
    assert_eq!(apic.mode(), ApicMode::XApic);
    assert_eq!(read(&mut apic, REG_ID), ID << 24);
    apic.set_apic_base(0xFEE0_0000, true).unwrap();
    apic.set_apic_base(0xFEE0_0C00, true).unwrap();
    assert_eq!(apic.msr_read(msr(REG_ID), 0), Ok(u64::from(ID)));
    assert!(
        apic.set_apic_base(0xFEE0_0400, true).is_err(),
        "invalid state"
    );
}

/// SDM vol. 4 table 2-2 lists IA32_APIC_BASE bit 8 as "BSP flag (R/W)", and KVM's
/// `kvm_apic_set_base` stores a guest's write of it: the bit is the guest's to set or clear
/// (the `lapic_regs` guest checks it in every mode).
#[test]
fn apic_base_bsp_bit_is_writable_sdm_vol4_table_2_2() {
    let mut ap = xapic();
    ap.set_apic_base(0xFEE0_0900, false).unwrap();
    assert_eq!(ap.apic_base(), 0xFEE0_0900);
    ap.set_apic_base(0xFEE0_0800, false).unwrap();
    assert_eq!(ap.apic_base(), 0xFEE0_0800);
    let mut bsp = LocalApic::new(LapicConfig {
        bsp: true,
        ..config()
    });
    bsp.msr_write(MSR_APIC_BASE, 0xFEE0_0800, 0).unwrap();
    assert_eq!(bsp.apic_base(), 0xFEE0_0800);
    assert_eq!(bsp.mode(), ApicMode::XApic, "the mode is untouched");
    assert!(bsp.config().bsp, "the configuration keeps the BSP");
}

#[test]
fn apic_base_relocation_moves_the_page_11_4_4() {
    let mut apic = xapic();
    assert_eq!(
        apic.set_apic_base(0x0000_0001_2345_6800, false),
        Ok(LapicEffect::TopologyChanged)
    );
    assert_eq!(apic.mmio_base(), Some(0x1_2345_6000));
}

/// A global disable keeps every register but the ID, as KVM does (`kvm_lapic_set_base`; SDM
/// §11.4.3 allows it: prior initialization "may be lost"). While disabled nothing is delivered
/// and the timer does not fire; on the enable the xAPIC ID is the initial one, the pending
/// vector is deliverable again and a count that ran out meanwhile fires.
#[test]
fn global_disable_keeps_registers_but_the_id_11_4_3() {
    let mut apic = xapic();
    write(&mut apic, REG_ID, 0x0900_0000);
    write(&mut apic, REG_LDR, 0x2000_0000);
    write(&mut apic, REG_LVT_LINT0, 0x700);
    write(&mut apic, REG_TPR, 0x30);
    write(&mut apic, REG_LVT_TIMER, 0x51);
    write(&mut apic, REG_TIMER_DCR, 0xB);
    write_at(&mut apic, REG_TIMER_INITIAL, 100, 0);
    apic.accept_vector(0x40, TriggerMode::Edge);
    apic.set_apic_base(0xFEE0_0000, false).unwrap();
    assert!(apic.accepts_pic_interrupts(), "disabled: LINT0 is INTR");
    assert_eq!(
        apic.pending_interrupt(),
        None,
        "disabled: nothing delivered"
    );
    assert_eq!(
        apic.next_timer_deadline(),
        None,
        "disabled: the timer is idle"
    );
    apic.poll_timer(1_000);
    assert!(!apic.irr().contains(0x51), "no expiry while disabled");
    apic.set_apic_base(0xFEE0_0800, false).unwrap();
    assert_eq!(read(&mut apic, REG_ID), ID << 24, "the initial ID");
    assert_eq!(read(&mut apic, REG_LDR), 0x2000_0000);
    assert_eq!(read(&mut apic, REG_LVT_LINT0), 0x700);
    assert_eq!(read(&mut apic, REG_SVR), 0x1FF);
    assert_eq!(apic.tpr(), 0x30);
    assert_eq!(read(&mut apic, REG_TIMER_INITIAL), 100);
    assert!(apic.next_timer_deadline().is_some_and(|d| d <= 1_000));
    apic.poll_timer(1_000);
    assert!(apic.irr().contains(0x40) && apic.irr().contains(0x51));
    assert_eq!(apic.pending_interrupt(), Some(0x51));
}

/// Leaving x2APIC mode through the disabled state keeps the registers too (SDM §11.12.5.1:
/// they are "not preserved", undefined; KVM keeps them); the xAPIC ID is the initial one and
/// the xAPIC LDR is the x2APIC one's bits 31:24 (0 here), the logical ID KVM's bus then sees.
#[test]
fn x2apic_to_disabled_to_xapic_keeps_registers_11_12_5_1() {
    let mut apic = xapic();
    write(&mut apic, REG_LDR, 0x2000_0000);
    apic.set_apic_base(0xFEE0_0C00, false).unwrap();
    apic.msr_write(msr(REG_TPR), 0x20, 0).unwrap();
    apic.msr_write(msr(REG_LVT_LINT0), 0x700, 0).unwrap();
    apic.accept_vector(0x40, TriggerMode::Edge);
    apic.set_apic_base(0xFEE0_0000, false).unwrap();
    apic.set_apic_base(0xFEE0_0800, false).unwrap();
    assert_eq!(read(&mut apic, REG_ID), ID << 24);
    assert_eq!(read(&mut apic, REG_LDR), 0);
    assert_eq!(apic.tpr(), 0x20);
    assert_eq!(read(&mut apic, REG_LVT_LINT0), 0x700);
    assert_eq!(apic.pending_interrupt(), Some(0x40));
}

// ----- LVT and local interrupts (§11.5.1) ------------------------------------------------------

#[test]
fn local_interrupt_by_delivery_mode_11_5_1() {
    let mut apic = xapic();
    write(&mut apic, REG_LVT_LINT0, 0x0000_8035); // fixed, level
    assert!(apic.local_interrupt(LocalSource::Lint0).is_empty());
    assert!(apic.irr().contains(0x35) && apic.tmr().contains(0x35));
    write(&mut apic, REG_LVT_LINT1, 0x0000_8036); // level ignored on LINT1
    apic.local_interrupt(LocalSource::Lint1);
    assert!(apic.irr().contains(0x36) && !apic.tmr().contains(0x36));
    let events = [
        (
            0x200u32,
            ApicEvents {
                smi: true,
                ..Default::default()
            },
        ),
        (
            0x400,
            ApicEvents {
                nmi: true,
                ..Default::default()
            },
        ),
        (
            0x500,
            ApicEvents {
                init: true,
                ..Default::default()
            },
        ),
        (
            0x700,
            ApicEvents {
                extint: true,
                ..Default::default()
            },
        ),
        (0x100, ApicEvents::default()),
        (0x300, ApicEvents::default()),
        (0x600, ApicEvents::default()),
    ];
    for (mode, expected) in events {
        for source in [
            LocalSource::Thermal,
            LocalSource::Performance,
            LocalSource::Cmci,
        ] {
            let mut apic = xapic();
            write(&mut apic, source.offset(), mode | 0x44);
            assert_eq!(
                apic.local_interrupt(source),
                expected,
                "{source:?} {mode:#x}"
            );
            assert!(apic.irr().is_empty());
        }
    }
}

#[test]
fn masked_lvt_delivers_nothing_and_illegal_vector_is_refused_11_5_1() {
    let mut apic = xapic();
    write(&mut apic, REG_LVT_THERMAL, 0x1_0400);
    assert!(apic.local_interrupt(LocalSource::Thermal).is_empty());
    write(&mut apic, REG_LVT_PERF, 0x0000_0008);
    apic.local_interrupt(LocalSource::Performance);
    assert!(apic.irr().is_empty());
    assert_eq!(latched_esr(&mut apic), ESR_RECEIVE_ILLEGAL_VECTOR);
}

#[test]
fn lint_pins_become_intr_and_nmi_when_globally_disabled_11_4_3() {
    let mut apic = xapic();
    apic.set_apic_base(0xFEE0_0000, false).unwrap();
    assert!(apic.local_interrupt(LocalSource::Lint0).extint);
    assert!(apic.local_interrupt(LocalSource::Lint1).nmi);
    assert!(apic.local_interrupt(LocalSource::Timer).is_empty());
}

#[test]
fn accepts_pic_interrupts_via_lint0_extint() {
    let mut apic = xapic();
    assert!(!apic.accepts_pic_interrupts(), "masked at power-on");
    write(&mut apic, REG_LVT_LINT0, 0x700);
    assert!(apic.accepts_pic_interrupts());
    write(&mut apic, REG_LVT_LINT0, 0x400);
    assert!(!apic.accepts_pic_interrupts(), "NMI mode");
    write(&mut apic, REG_LVT_LINT0, 0x1_0700);
    assert!(!apic.accepts_pic_interrupts(), "masked");
}

// ----- Timer integration (§11.5.4) -----------------------------------------------------------

#[test]
fn lvt_timer_mode_field_drives_the_timer_11_5_4() {
    let mut apic = xapic();
    assert_eq!(apic.timer().mode(), TimerMode::OneShot);
    assert_eq!(
        write(&mut apic, REG_LVT_TIMER, 0x2_0040),
        LapicEffect::TimerChanged
    );
    assert_eq!(apic.timer().mode(), TimerMode::Periodic);
    assert_eq!(write(&mut apic, REG_LVT_TIMER, 0x2_0041), LapicEffect::None);
    assert_eq!(
        write(&mut apic, REG_LVT_TIMER, 0x4_0040),
        LapicEffect::TimerChanged
    );
    assert_eq!(apic.timer().mode(), TimerMode::TscDeadline);
    // Mode 11b is reserved (§11.5.1); KVM stores it and counts one-shot: leaving TSC-deadline
    // mode for it is a mode change, and it reads back as written.
    assert_eq!(
        write(&mut apic, REG_LVT_TIMER, 0x6_0050),
        LapicEffect::TimerChanged
    );
    assert_eq!(read(&mut apic, REG_LVT_TIMER), 0x6_0050);
    assert_eq!(apic.timer().mode(), TimerMode::OneShot);
}

/// A one-shot count keeps running through a switch to the reserved mode 11b and does not reload
/// when it runs out (KVM: `apic_update_lvtt` keeps the count unless TSC-deadline mode is entered
/// or left; mode 11b is not periodic). The TSC-deadline MSR ignores writes and reads 0.
#[test]
fn lvt_timer_mode_11b_counts_one_shot_like_kvm() {
    let mut apic = xapic();
    write(&mut apic, REG_TIMER_DCR, 0xB);
    write(&mut apic, REG_LVT_TIMER, 0x2_00E0);
    // 1 ms: above the 200 us periodic floor, so the count rate is the bus clock's.
    write_at(&mut apic, REG_TIMER_INITIAL, 1_000_000, 0);
    assert_eq!(
        write_at(&mut apic, REG_LVT_TIMER, 0x6_00E0, 100),
        LapicEffect::TimerChanged
    );
    assert_eq!(read_at(&mut apic, REG_TIMER_CURRENT, 400_000), 600_000);
    assert_eq!(read_at(&mut apic, REG_TIMER_INITIAL, 400_000), 1_000_000);
    assert_eq!(
        apic.msr_write(MSR_TSC_DEADLINE, 5000, 400_000),
        Ok(LapicEffect::None)
    );
    assert_eq!(apic.msr_read(MSR_TSC_DEADLINE, 400_000), Ok(0));
    apic.poll_timer(1_000_000);
    assert_eq!(apic.pending_interrupt(), Some(0xE0));
    assert_eq!(
        read_at(&mut apic, REG_TIMER_CURRENT, 1_500_000),
        0,
        "no reload"
    );
    assert_eq!(apic.next_timer_deadline(), None);
}

#[test]
fn timer_count_registers_go_to_the_timer_11_5_4() {
    let mut apic = xapic();
    assert_eq!(
        write(&mut apic, REG_TIMER_DCR, 0xFFFF_FFFF),
        LapicEffect::TimerChanged
    );
    assert_eq!(read(&mut apic, REG_TIMER_DCR), 0xB, "divide by 1");
    apic.mmio_write(u64::from(REG_TIMER_INITIAL), &1000u32.to_le_bytes(), 5_000);
    assert_eq!(read(&mut apic, REG_TIMER_INITIAL), 1000);
    let mut count = [0u8; 4];
    apic.mmio_read(u64::from(REG_TIMER_CURRENT), &mut count, 5_100);
    assert_eq!(
        u32::from_le_bytes(count),
        900,
        "1 GHz bus clock, divide by 1"
    );
    assert_eq!(apic.next_timer_deadline(), Some(6_000));
    // Current count is read-only.
    write(&mut apic, REG_TIMER_CURRENT, 5);
    assert_eq!(read(&mut apic, REG_TIMER_INITIAL), 1000);
}

fn write_at(apic: &mut LocalApic, offset: u32, value: u32, now: Nanos) -> LapicEffect {
    apic.mmio_write(u64::from(offset), &value.to_le_bytes(), now)
}

fn read_at(apic: &mut LocalApic, offset: u32, now: Nanos) -> u32 {
    let mut data = [0u8; 4];
    apic.mmio_read(u64::from(offset), &mut data, now);
    u32::from_le_bytes(data)
}

/// LVT timer mode changes as KVM's `apic_update_lvtt` makes them: one-shot <-> periodic keeps
/// TMICT and the running TMCCT; into or out of TSC-deadline mode stops the timer and clears
/// TMICT.
#[test]
fn lvt_timer_mode_switch_keeps_the_count_unless_tsc_deadline_is_involved() {
    let mut apic = xapic();
    write(&mut apic, REG_TIMER_DCR, 0xB);
    write(&mut apic, REG_LVT_TIMER, 0xE0);
    write_at(&mut apic, REG_TIMER_INITIAL, 1_000_000, 0);
    assert_eq!(
        write_at(&mut apic, REG_LVT_TIMER, 0x2_00E0, 300_000),
        LapicEffect::TimerChanged
    );
    assert_eq!(read_at(&mut apic, REG_TIMER_INITIAL, 300_000), 1_000_000);
    assert_eq!(read_at(&mut apic, REG_TIMER_CURRENT, 300_000), 700_000);
    apic.poll_timer(1_000_000);
    assert_eq!(apic.acknowledge_interrupt(), Some(0xE0));
    assert_eq!(read_at(&mut apic, REG_TIMER_CURRENT, 1_100_000), 900_000);
    write_at(&mut apic, REG_LVT_TIMER, 0xE0, 1_100_000);
    assert_eq!(read_at(&mut apic, REG_TIMER_CURRENT, 1_200_000), 800_000);
    assert_eq!(apic.next_timer_deadline(), Some(2_000_000));
    write_at(&mut apic, REG_LVT_TIMER, 0x4_00E0, 1_500_000);
    assert_eq!(read_at(&mut apic, REG_TIMER_INITIAL, 1_500_000), 0);
    assert_eq!(read_at(&mut apic, REG_TIMER_CURRENT, 1_500_000), 0);
    assert_eq!(apic.next_timer_deadline(), None);
}

#[test]
fn timer_expiry_sets_irr_only_when_unmasked_11_5_4() {
    let mut apic = xapic();
    write(&mut apic, REG_TIMER_INITIAL, 100);
    apic.poll_timer(99);
    apic.poll_timer(200);
    assert!(apic.irr().is_empty(), "masked: expiry lost");
    write(&mut apic, REG_LVT_TIMER, 0xEC);
    apic.mmio_write(u64::from(REG_TIMER_INITIAL), &100u32.to_le_bytes(), 300);
    apic.poll_timer(350);
    assert!(apic.irr().is_empty(), "not expired yet");
    apic.poll_timer(500);
    assert_eq!(apic.acknowledge_interrupt(), Some(0xEC));
    assert!(!apic.tmr().contains(0xEC));
}

#[test]
fn tsc_deadline_msr_routed_only_in_tsc_deadline_mode_11_5_4_1() {
    let mut apic = xapic();
    assert_eq!(
        apic.msr_write(MSR_TSC_DEADLINE, 5_000, 0),
        Ok(LapicEffect::None)
    );
    assert_eq!(apic.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    assert_eq!(apic.next_timer_deadline(), None);
    write(&mut apic, REG_LVT_TIMER, 0x4_00D0);
    assert_eq!(
        apic.msr_write(MSR_TSC_DEADLINE, 5_000, 0),
        Ok(LapicEffect::TimerChanged)
    );
    assert_eq!(apic.msr_read(MSR_TSC_DEADLINE, 0), Ok(5_000));
    assert_eq!(
        apic.next_timer_deadline(),
        Some(5_000),
        "TSC at 1 GHz from 0"
    );
    // Initial count is ignored in TSC-deadline mode.
    write(&mut apic, REG_TIMER_INITIAL, 77);
    assert_eq!(read(&mut apic, REG_TIMER_INITIAL), 0);
    apic.poll_timer(5_000);
    assert_eq!(apic.pending_interrupt(), Some(0xD0));
    // Also reachable in x2APIC mode.
    let mut x2 = x2apic();
    x2.msr_write(msr(REG_LVT_TIMER), 0x4_00D0, 0).unwrap();
    x2.msr_write(MSR_TSC_DEADLINE, 9, 0).unwrap();
    assert_eq!(x2.msr_read(MSR_TSC_DEADLINE, 0), Ok(9));
}

// ----- Hostile input ---------------------------------------------------------------------------

proptest! {
    /// No offset, size or value makes the xAPIC page or the MSR view panic.
    #[test]
    fn arbitrary_accesses_never_panic(
        ops in proptest::collection::vec((any::<u16>(), 0usize..9, any::<u64>(), any::<bool>()), 1..64)
    ) {
        let mut apic = xapic();
        for (offset, len, value, x2) in ops {
            let offset = u64::from(offset);
            if x2 {
                let m = X2APIC_MSR_BASE + u32::from((offset & 0xFF) as u8);
                let _ = apic.msr_write(m, value, offset);
                let _ = apic.msr_read(m, offset);
                let _ = apic.set_apic_base(value, false);
            } else {
                let bytes = value.to_le_bytes();
                apic.mmio_write(offset, &bytes[..len], offset);
                let mut data = vec![0u8; len];
                apic.mmio_read(offset, &mut data, offset);
            }
            apic.poll_timer(offset);
            let _ = apic.acknowledge_interrupt();
        }
    }
}

// ----- Delivery properties (§11.8) -------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Accept(Vector, bool),
    Ack,
    Eoi,
    Tpr(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (16u8..=255, any::<bool>()).prop_map(|(v, level)| Op::Accept(v, level)),
        3 => Just(Op::Ack),
        2 => Just(Op::Eoi),
        1 => any::<u8>().prop_map(Op::Tpr),
    ]
}

/// Tracks what the APIC must deliver. Rule: an accepted vector is one delivery, unless the same
/// vector is still pending in IRR, in which case it coalesces with it (no new delivery).
struct Ledger {
    pending: VectorSet,
    accepted: [u32; 256],
    acknowledged: [u32; 256],
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            pending: VectorSet::new(),
            accepted: [0; 256],
            acknowledged: [0; 256],
        }
    }
}

impl Ledger {
    fn accept(&mut self, vector: Vector) {
        if self.pending.insert(vector) {
            self.accepted[usize::from(vector)] += 1;
        }
    }

    /// Checks one acknowledge against the model: the returned vector is the highest pending
    /// one, and its class beats the PPR class that held before the acknowledge; `None` only
    /// when nothing pending beats PPR.
    fn acknowledge(&mut self, got: Option<Vector>, ppr_before: u8) -> Result<(), TestCaseError> {
        match got {
            Some(vector) => {
                prop_assert_eq!(Some(vector), self.pending.highest(), "priority order");
                prop_assert!(
                    vector >> 4 > ppr_before >> 4,
                    "class {:#x} <= PPR {:#x}",
                    vector,
                    ppr_before
                );
                self.pending.remove(vector);
                self.acknowledged[usize::from(vector)] += 1;
            }
            None => {
                let blocked = self
                    .pending
                    .highest()
                    .is_none_or(|v| v >> 4 <= ppr_before >> 4);
                prop_assert!(blocked, "a deliverable vector was not acknowledged");
            }
        }
        Ok(())
    }
}

fn run_ops(apic: &mut LocalApic, ledger: &mut Ledger, ops: &[Op]) -> Result<(), TestCaseError> {
    for op in ops {
        match op {
            Op::Accept(vector, level) => {
                let trigger = if *level {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                };
                apic.accept_vector(*vector, trigger);
                ledger.accept(*vector);
            }
            Op::Ack => {
                let ppr = apic.ppr();
                let got = apic.acknowledge_interrupt();
                ledger.acknowledge(got, ppr)?;
            }
            Op::Eoi => {
                write(apic, REG_EOI, 0);
            }
            Op::Tpr(tpr) => {
                write(apic, REG_TPR, u32::from(*tpr));
            }
        }
        prop_assert_eq!(apic.irr(), ledger.pending);
    }
    Ok(())
}

/// Lowers TPR and alternates acknowledges and EOIs until nothing is pending or in service.
fn drain(apic: &mut LocalApic, ledger: &mut Ledger) -> Result<(), TestCaseError> {
    write(apic, REG_TPR, 0);
    for _ in 0..1024 {
        let ppr = apic.ppr();
        match apic.acknowledge_interrupt() {
            Some(vector) => ledger.acknowledge(Some(vector), ppr)?,
            None if !apic.isr().is_empty() => {
                write(apic, REG_EOI, 0);
            }
            None => break,
        }
    }
    prop_assert!(apic.irr().is_empty() && apic.isr().is_empty());
    Ok(())
}

proptest! {
    /// Every accepted vector is acknowledged exactly once (coalescing rule in `Ledger`), in
    /// priority order, and never at or below the PPR class (§11.8.3.1, §11.8.4).
    #[test]
    fn accepted_vectors_are_acknowledged_once_in_priority_order(
        ops in proptest::collection::vec(op(), 0..200)
    ) {
        let mut apic = xapic();
        let mut ledger = Ledger::default();
        run_ops(&mut apic, &mut ledger, &ops)?;
        drain(&mut apic, &mut ledger)?;
        prop_assert_eq!(ledger.accepted.to_vec(), ledger.acknowledged.to_vec());
    }

    /// The same properties hold across a CR8 write (§11.8.6) in the middle of the stream.
    #[test]
    fn cr8_writes_keep_the_delivery_properties(
        ops in proptest::collection::vec(op(), 0..100), cr8 in 0u64..16
    ) {
        let mut apic = xapic();
        let mut ledger = Ledger::default();
        run_ops(&mut apic, &mut ledger, &ops)?;
        apic.set_cr8(cr8);
        let ppr = apic.ppr();
        let got = apic.acknowledge_interrupt();
        ledger.acknowledge(got, ppr)?;
        drain(&mut apic, &mut ledger)?;
        prop_assert_eq!(ledger.accepted.to_vec(), ledger.acknowledged.to_vec());
    }
}

/// Found by the `snapshot_restore` fuzz target: a deserialized APIC whose two copies of the clock
/// (configuration and timer) disagree was accepted, and the restore silently kept one of them.
#[test]
fn validate_refuses_disagreeing_clock_copies() {
    let apic = xapic();
    assert_eq!(apic.validate(), Ok(()));
    let mut json = serde_json::to_value(&apic).unwrap();
    json["cfg"]["clock"]["tsc_at_zero"] = serde_json::json!(5);
    let tampered: LocalApic = serde_json::from_value(json).unwrap();
    assert!(tampered.validate().is_err());
}
