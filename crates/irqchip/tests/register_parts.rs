//! The register-level views and constructors that irqvm's KVM conversion uses: rebuilding any
//! reachable state from its registers gives the same state, and hostile register values are
//! refused or scrubbed, never a panic.

use irqchip::ioapic::{IoApic, IoApicConfig, RedirectionEntry, IOREGSEL_OFFSET, IOWIN_OFFSET};
use irqchip::lapic::regs::X2APIC_MSR_BASE;
use irqchip::lapic::timer::{ApicTimer, TimerMode};
use irqchip::lapic::{LapicConfig, LapicRegisters, LocalApic, VectorSet};
use irqchip::mpstate::{MpState, MpStateMachine};
use irqchip::pic::DualPic;
use irqchip::{ApicId, ClockConfig};
use proptest::prelude::*;

fn config() -> LapicConfig {
    LapicConfig {
        apic_id: ApicId(2),
        x2apic_supported: true,
        directed_eoi_supported: true,
        cmci_supported: true,
        ..Default::default()
    }
}

proptest! {
    /// Any state the guest can reach (arbitrary page and MSR accesses, timer polls) is rebuilt
    /// exactly by `from_registers(registers(), timer())`.
    #[test]
    fn lapic_rebuilt_from_its_registers(
        ops in proptest::collection::vec((any::<u16>(), any::<u64>(), any::<bool>()), 1..64)
    ) {
        let mut apic = LocalApic::new(config());
        for (offset, value, x2) in ops {
            let now = u64::from(offset) * 1000;
            if x2 {
                let msr = X2APIC_MSR_BASE + u32::from(offset & 0xFF);
                let _ = apic.msr_write(msr, value, now);
                let _ = apic.set_apic_base(value, false);
            } else {
                // Truncation keeps the register's dword.
                apic.mmio_write(u64::from(offset & 0xFF0), &(value as u32).to_le_bytes(), now);
            }
            apic.poll_timer(now);
            let _ = apic.acknowledge_interrupt();
        }
        let rebuilt = LocalApic::from_registers(*apic.config(), &apic.registers(), apic.timer().clone());
        prop_assert_eq!(rebuilt, Ok(apic));
    }

    /// Hostile register values: refused or scrubbed into a valid APIC, never a panic.
    #[test]
    fn lapic_from_hostile_registers(
        base in any::<u64>(), scalars in any::<(u32, u8, u32, u32, u32, u32, u32)>(),
        lvt in any::<[u32; 7]>(), icr in any::<(u32, u32)>(),
        timer in any::<(u32, u32, u32, u64)>(), vectors in any::<[[u64; 4]; 3]>(),
    ) {
        let (id, tpr, ldr, dfr, svr, esr, esr_pending) = scalars;
        let regs = LapicRegisters {
            apic_base: base, id, tpr, ldr, dfr, svr,
            irr: VectorSet::from_words(vectors[0]),
            isr: VectorSet::from_words(vectors[1]),
            tmr: VectorSet::from_words(vectors[2]),
            esr, esr_pending, lvt, icr_low: icr.0, icr_high: icr.1,
        };
        let mode = TimerMode::from_lvt(lvt[0]).unwrap_or(TimerMode::OneShot);
        let (dcr, initial, current, deadline) = timer;
        let timer = ApicTimer::from_counts(ClockConfig::default(), mode, dcr, initial, current, deadline, 0);
        prop_assert!(timer.validate().is_ok());
        prop_assert!(timer.current_count(0) <= timer.initial_count());
        if let Ok(apic) = LocalApic::from_registers(config(), &regs, timer) {
            prop_assert!(apic.validate().is_ok());
            let again = LocalApic::from_registers(config(), &apic.registers(), apic.timer().clone());
            prop_assert_eq!(again, Ok(apic));
        }
    }

    /// The PIC pair after arbitrary port traffic is rebuilt exactly from its registers.
    #[test]
    fn pic_rebuilt_from_its_registers(
        writes in proptest::collection::vec((prop::sample::select(vec![0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]), any::<u8>(), 0u8..16, any::<bool>()), 0..60),
    ) {
        let mut pic = DualPic::new();
        for (port, value, irq, level) in writes {
            pic.port_write(port, value);
            pic.set_irq(irq, level);
            if value & 1 == 0 {
                pic.acknowledge();
            }
        }
        let rebuilt = DualPic::from_registers(&pic.master().registers(), &pic.slave().registers());
        prop_assert_eq!(rebuilt, pic);
    }

    /// The IOAPIC after arbitrary MMIO writes and line changes is rebuilt exactly from its parts.
    #[test]
    fn ioapic_rebuilt_from_its_parts(
        ops in proptest::collection::vec((any::<u8>(), any::<u32>(), 0usize..24, any::<bool>()), 0..60),
    ) {
        let mut ioapic = IoApic::new(IoApicConfig::default());
        for (index, value, pin, level) in ops {
            ioapic.mmio_write(IOREGSEL_OFFSET.into(), &u32::from(index).to_le_bytes(), &mut |_| 1);
            ioapic.mmio_write(IOWIN_OFFSET.into(), &value.to_le_bytes(), &mut |_| 1);
            ioapic.set_line(pin, level, &mut |_| 1);
        }
        let pins: Vec<(RedirectionEntry, bool)> = (0..ioapic.pins())
            .map(|pin| (ioapic.entry(pin).unwrap(), ioapic.line(pin).unwrap()))
            .collect();
        let rebuilt = IoApic::from_parts(ioapic.config(), false, ioapic.id(), ioapic.ioregsel(), &pins);
        prop_assert_eq!(rebuilt, Ok(ioapic));
    }
}

#[test]
fn ioapic_parts_of_the_wrong_shape_are_refused() {
    let pins = vec![(RedirectionEntry(0x1_0000), false); 23];
    assert!(IoApic::from_parts(IoApicConfig::default(), false, 0, 0, &pins).is_err());
}

#[test]
fn mp_state_machine_from_parts_keeps_the_latch() {
    let mp = MpStateMachine::from_parts(false, MpState::InitReceived, true, Some(0x9A), 0x9A);
    assert_eq!(mp.state(), MpState::InitReceived);
    assert_eq!(mp.last_sipi_vector(), 0x9A);
    let latched = mp.pending_events();
    assert!(latched.init);
    assert_eq!(latched.sipi, Some(0x9A));
}
