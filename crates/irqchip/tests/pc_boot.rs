//! The whole chip driven as a PC drives it at boot: the 8259 pair programmed as Linux does, the
//! ExtINT "virtual wire" through the BSP's LINT0, APs started with INIT-SIPI-SIPI, then the
//! IOAPIC taking over the timer (ISA IRQ 0 on pin 2) and the serial line (IRQ 4), a PCI level
//! line, and MSIs, each checked at the vCPU that must take it.
#![cfg(not(feature = "loom"))]

mod support;

use irqchip::mpstate::{MpState, SipiAction};
use irqchip::msi::MsiMessage;
use irqchip::posting::VcpuMode;
use irqchip::vcpu::{ApicAccessResult, Injection};
use irqchip::{EoiMessage, Notify};
use support::*;

const TIMER_VECTOR: u8 = 0x30;
const SERIAL_VECTOR: u8 = 0x34;
const PCI_VECTOR: u8 = 0x41;
const SIPI_PAGE: u32 = 0x9A;

/// Brings the BSP's APIC up and starts the AP (APIC ID 1) with INIT-SIPI-SIPI through the
/// BSP's ICR (SDM vol. 3 §9.4.4.1, "Typical BSP Initialization Sequence").
fn boot_two_cpus() -> Machine {
    let mut pc = Machine::new(2);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.ipi(0, 1, ICR_INIT);
    pc.ipi(0, 1, ICR_STARTUP | SIPI_PAGE);
    pc.ipi(0, 1, ICR_STARTUP | SIPI_PAGE);
    let (outcome, taken) = pc.run(1);
    assert!(outcome.reset.is_some(), "INIT accepted");
    assert_eq!(
        outcome.start,
        Some(SipiAction::real_mode(SIPI_PAGE as u8)),
        "the AP starts at the SIPI page"
    );
    assert!(taken.is_empty());
    assert_eq!(pc.cpus[1].mp_state(), MpState::Runnable);
    // The second SIPI was latched with the first and consumed by the same accept step, so the
    // AP is started exactly once and nothing else is latched.
    let (again, _) = pc.run(1);
    assert_eq!(again.start, None);
    pc.apic_write(1, APIC_SVR, SVR_ENABLED);
    // Flat logical IDs as Linux assigns them: bit n for CPU n (SDM vol. 3 §11.6.2.2).
    pc.apic_write(0, APIC_LDR, 0x01 << 24);
    pc.apic_write(1, APIC_LDR, 0x02 << 24);
    pc
}

/// SDM vol. 3 §11.5.1 (LINT0 ExtINT) and 8259A "Interrupt Sequence": with the IOAPIC masked, an
/// ISA line reaches the BSP through the PIC; `next_injection` says ExtINT and the INTA cycle
/// gives the PIC's vector. The AP, whose LINT0 is masked, is neither woken nor offered it.
#[test]
fn extint_virtual_wire_through_bsp_lint0() {
    let mut pc = Machine::new(2);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LVT_LINT0, LINT0_EXTINT);
    assert!(pc.chip.apic_system().accepts_pic_interrupts(0));
    assert!(!pc.chip.apic_system().accepts_pic_interrupts(1));
    pc.pic_init_like_linux(!(1 << 4), 0xFF);
    assert!(!pc.chip.pic_intr());

    // The BSP is asleep (HLT): the rise of INTR must wake it.
    let bsp_inbox = pc.cpus[0].inbox().clone();
    assert!(bsp_inbox.try_block());
    pc.pulse_gsi(4, 7);
    assert!(pc.chip.pic_intr());
    assert_eq!(pc.notes, vec![(0, Notify::Wake)], "only the BSP is woken");
    bsp_inbox.ring_doorbell();
    bsp_inbox.block_until_rung();
    assert_eq!(bsp_inbox.mode(), VcpuMode::OutsideGuest);
    assert!(!pc.cpus[1].inbox().has_pending(), "the AP was not told");

    assert_eq!(
        pc.cpus[0].next_injection(pc.chip.pic_intr()),
        Some(Injection::ExtInt)
    );
    assert_eq!(pc.cpus[1].next_injection(pc.chip.pic_intr()), None);
    assert_eq!(pc.take(0), vec![Taken::ExtInt(TIMER_VECTOR + 4)]);
    assert!(!pc.chip.pic_intr(), "IRQ 4 is in service");
    // The IOAPIC saw the edge on pin 4 but its entry is masked: nothing on the APIC bus.
    assert!(pc.take(1).is_empty());
    assert_eq!(pc.cpus[0].lapic().irr().highest(), None);
    // Non-specific EOI to the master (OCW2 0x20): the in-service bit clears (OCW3 read ISR).
    pc.pic_write(0x20, 0x20);
    pc.pic_write(0x20, 0x0B);
    assert_eq!(pc.pic_read(0x20), 0, "ISR empty after EOI");
}

/// 8259A: a masked input is remembered in IRR and requested when unmasked (OCW1); the unmask
/// is a PIC port write, which must wake the ExtINT vCPU too.
#[test]
fn extint_unmask_by_port_write_wakes_the_bsp() {
    let mut pc = Machine::new(2);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LVT_LINT0, LINT0_EXTINT);
    pc.pic_init_like_linux(0xFF, 0xFF);
    pc.pulse_gsi(1, 1);
    assert!(!pc.chip.pic_intr(), "IRQ 1 is masked");
    assert!(pc.notes.is_empty());
    pc.pic_write(0x21, !(1 << 1));
    assert!(pc.chip.pic_intr());
    assert!(
        pc.cpus[0].inbox().has_pending(),
        "the BSP got a wake-up post"
    );
    assert_eq!(pc.take(0), vec![Taken::ExtInt(TIMER_VECTOR + 1)]);
}

/// The slave PIC: IRQ 12 reaches the BSP through the cascade with the slave's vector.
#[test]
fn extint_slave_line_through_the_cascade() {
    let mut pc = Machine::new(1);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LVT_LINT0, LINT0_EXTINT);
    pc.pic_init_like_linux(!(1 << 2), !(1 << 4));
    pc.pulse_gsi(12, 3);
    assert_eq!(pc.take(0), vec![Taken::ExtInt(0x38 + 4)]);
}

/// The boot scenario: IOAPIC mode (PIC masked, LINT0 masked), the timer on pin 2 and the serial
/// line on pin 4, physical and logical destinations, edge and level (82093AA §3.2.4).
#[test]
fn ioapic_timer_and_serial_reach_each_cpu() {
    let mut pc = boot_two_cpus();
    pc.pic_init_like_linux(0xFF, 0xFF);

    // GSI 0 (the PIT) is IOAPIC pin 2 (MADT interrupt source override); physical to CPU 0.
    pc.ioapic_entry(2, u32::from(TIMER_VECTOR), 0);
    pc.pulse_gsi(0, 0);
    assert_eq!(pc.take(0), vec![Taken::Vector(TIMER_VECTOR)]);
    assert!(pc.take(1).is_empty());
    assert_eq!(
        pc.apic_write(0, APIC_EOI, 0),
        ApicAccessResult::Done,
        "edge: no EOI message"
    );

    // Physical to CPU 1.
    pc.ioapic_entry(2, u32::from(TIMER_VECTOR), 1);
    pc.pulse_gsi(0, 0);
    assert!(pc.take(0).is_empty());
    assert_eq!(pc.take(1), vec![Taken::Vector(TIMER_VECTOR)]);
    pc.apic_write(1, APIC_EOI, 0);

    // Logical, both CPUs (flat MDA 0x03): each takes it exactly once.
    pc.ioapic_entry(2, u32::from(TIMER_VECTOR) | RTE_LOGICAL, 0x03);
    pc.pulse_gsi(0, 0);
    assert_eq!(pc.take(0), vec![Taken::Vector(TIMER_VECTOR)]);
    assert_eq!(pc.take(1), vec![Taken::Vector(TIMER_VECTOR)]);
    pc.apic_write(0, APIC_EOI, 0);
    pc.apic_write(1, APIC_EOI, 0);

    // Serial (IRQ 4), level-triggered, logical to CPU 1 only.
    pc.ioapic_entry(4, u32::from(SERIAL_VECTOR) | RTE_LOGICAL | RTE_LEVEL, 0x02);
    pc.set_gsi(4, 4, true);
    assert!(pc.take(0).is_empty());
    assert_eq!(pc.take(1), vec![Taken::Vector(SERIAL_VECTOR)]);
    assert_ne!(pc.ioapic_entry_low(4) & RTE_REMOTE_IRR, 0, "remote IRR set");
    assert!(
        pc.cpus[1].lapic().tmr().contains(SERIAL_VECTOR),
        "TMR marks it level"
    );
    // No re-delivery before the EOI, however long the line stays high.
    assert!(pc.take(1).is_empty());

    // EOI while the line is still high: the EOI reaches the IOAPIC, which re-delivers.
    let eoi = pc.apic_write(1, APIC_EOI, 0);
    assert_eq!(
        eoi,
        ApicAccessResult::Eoi(EoiMessage {
            vector: SERIAL_VECTOR
        })
    );
    assert_eq!(pc.take(1), vec![Taken::Vector(SERIAL_VECTOR)]);
    assert_ne!(pc.ioapic_entry_low(4) & RTE_REMOTE_IRR, 0);

    // The device is serviced and drops the line; the EOI then clears remote IRR for good.
    pc.set_gsi(4, 4, false);
    pc.apic_write(1, APIC_EOI, 0);
    assert_eq!(
        pc.ioapic_entry_low(4) & RTE_REMOTE_IRR,
        0,
        "remote IRR clear"
    );
    assert!(pc.take(1).is_empty());
    assert!(pc.take(0).is_empty());
    assert_eq!(pc.cpus[1].lapic().isr().highest(), None);
}

/// PCI INTx on GSI 16 (pin 16): active-low and level-triggered. Unmasking the idle pin delivers
/// nothing (the chip drives PCI wires idle-high); an asserted line is delivered once per EOI.
#[test]
fn pci_level_line_is_active_low_and_redelivered_after_eoi() {
    let mut pc = boot_two_cpus();
    pc.ioapic_entry(16, u32::from(PCI_VECTOR) | RTE_LEVEL | RTE_ACTIVE_LOW, 0);
    assert!(pc.take(0).is_empty(), "idle PCI line is not asserted");
    pc.set_gsi(16, 9, true);
    assert_eq!(pc.take(0), vec![Taken::Vector(PCI_VECTOR)]);
    pc.apic_write(0, APIC_EOI, 0);
    assert_eq!(pc.take(0), vec![Taken::Vector(PCI_VECTOR)], "re-delivered");
    pc.set_gsi(16, 9, false);
    pc.apic_write(0, APIC_EOI, 0);
    assert!(pc.take(0).is_empty());
    assert!(pc.take(1).is_empty());
}

/// SDM vol. 3 §11.11: a device MSI reaches the addressed CPU; a non-MSI address is refused.
#[test]
fn msi_reaches_the_addressed_cpu() {
    let mut pc = boot_two_cpus();
    let msi = MsiMessage {
        address: 0xFEE0_0000 | (1 << 12),
        data: 0x51,
    };
    let notes = &mut pc.notes;
    assert_eq!(
        pc.chip.signal_msi(msi, &mut |i, how| notes.push((i, how))),
        Ok(1)
    );
    assert_eq!(pc.take(1), vec![Taken::Vector(0x51)]);
    assert!(pc.take(0).is_empty());
    let bad = MsiMessage {
        address: 0xFED0_0000,
        data: 0x51,
    };
    assert!(pc.chip.signal_msi(bad, &mut |_, _| {}).is_err());
}

/// An AP that has not been started takes nothing (SDM vol. 3 §9.4.2: wait-for-SIPI blocks
/// NMI); the INIT that starts it clears the NMI with the rest of its state, and an NMI IPI to
/// the running AP is taken once.
#[test]
fn nmi_ipi_waits_for_the_ap_to_run() {
    let mut pc = Machine::new(2);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.ipi(0, 1, ICR_NMI);
    assert!(pc.take(1).is_empty(), "an uninitialized AP takes nothing");
    pc.ipi(0, 1, ICR_INIT);
    pc.ipi(0, 1, ICR_STARTUP | SIPI_PAGE);
    let (outcome, taken) = pc.run(1);
    assert!(outcome.start.is_some());
    // INIT clears a pending NMI with the rest of the processor state.
    assert!(taken.is_empty());
    pc.ipi(0, 1, ICR_NMI);
    assert_eq!(pc.take(1), vec![Taken::Nmi]);
}
