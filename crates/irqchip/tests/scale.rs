//! The chip at KVM's vCPU limit (1024 here, KVM_CAP_MAX_VCPUS): x2APIC IDs past 255 addressed
//! by IPIs, by extended-destination-ID MSIs and IOAPIC entries, what a source that cannot
//! express such an ID reaches instead, and the memory a vCPU costs.
#![cfg(not(feature = "loom"))]

mod support;

use irqchip::bus::ResolveCost;
use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
use irqchip::lapic::LocalApic;
use irqchip::mpstate::MpStateMachine;
use irqchip::msi::MsiMessage;
use irqchip::posting::VcpuInbox;
use irqchip::topology::ApicIdLayout;
use irqchip::vcpu::{ApicSystemConfigError, VcpuInterrupts};
use irqchip::{DeliveryMode, DestinationFormat, InterruptMessage, MessageSource, TopologyEntry};
use support::*;

const VCPUS: usize = 1024;
const VECTOR: u32 = 0x41;
/// IA32_APIC_BASE with EN and EXTD at the default base (SDM vol. 3 §11.12.1).
const APIC_BASE_X2APIC: u64 = 0xFEE0_0C00;
const MSR_EOI: u32 = 0x80B;
const MSR_SVR: u32 = 0x80F;
const MSR_ICR: u32 = 0x830;
/// ICR shorthand "all excluding self" (bits 19:18 = 11).
const ICR_ALL_BUT_SELF: u64 = 3 << 18;
const ICR_LOGICAL: u64 = 1 << 11;

/// `vcpus` vCPUs (vCPU n has APIC ID n), in x2APIC mode when `x2apic`, the APs started the
/// way firmware does it (a broadcast INIT-SIPI "all excluding self" from the BSP), then every
/// APIC software-enabled.
fn machine(vcpus: usize, x2apic: bool, extended_destination_id: bool) -> Machine {
    let mut pc = Machine::with_config(PcIrqChipConfig {
        extended_destination_id,
        ..PcIrqChipConfig::new(vcpus)
    });
    if x2apic {
        for cpu in &mut pc.cpus {
            cpu.set_apic_base(APIC_BASE_X2APIC, false).unwrap();
        }
    }
    for icr in [ICR_INIT, ICR_STARTUP | 0x9A] {
        if x2apic {
            let low = ICR_ALL_BUT_SELF | u64::from(icr);
            pc.cpus[0]
                .msr_write(MSR_ICR, low, 0, &mut |_, _| {})
                .unwrap();
        } else {
            pc.ipi(0, 0, (ICR_ALL_BUT_SELF as u32) | icr);
        }
    }
    for cpu in 0..vcpus {
        let (outcome, _) = pc.run(cpu);
        assert_eq!(outcome.start.is_some(), cpu != 0, "vCPU {cpu} started");
        if x2apic {
            pc.cpus[cpu]
                .msr_write(MSR_SVR, u64::from(SVR_ENABLED), 0, &mut |_, _| {})
                .unwrap();
        } else {
            pc.apic_write(cpu, APIC_SVR, SVR_ENABLED);
        }
    }
    pc
}

/// Sends an x2APIC IPI (one 64-bit ICR write, SDM vol. 3 §11.12.9) from `from`.
fn x2apic_ipi(pc: &mut Machine, from: usize, destination: u32, low: u64) {
    let icr = u64::from(destination) << 32 | low | u64::from(VECTOR);
    pc.cpus[from]
        .msr_write(MSR_ICR, icr, 0, &mut |_, _| {})
        .unwrap();
}

/// The vCPUs that take `VECTOR` now, in index order; each one EOIs it, so the next round finds
/// it free again.
fn receivers(pc: &mut Machine) -> Vec<usize> {
    (0..pc.cpus.len())
        .filter(|&cpu| {
            let took = pc.take(cpu).contains(&Taken::Vector(VECTOR as u8));
            if took && pc.cpus[cpu].lapic().x2apic() {
                pc.cpus[cpu]
                    .msr_write(MSR_EOI, 0, 0, &mut |_, _| {})
                    .unwrap();
            } else if took {
                pc.apic_write(cpu, APIC_EOI, 0);
            }
            took
        })
        .collect()
}

fn msi(destination: u32) -> MsiMessage {
    MsiMessage {
        address: 0xFEE0_0000
            | u64::from(destination & 0xFF) << 12
            | u64::from(destination >> 8) << 5,
        data: VECTOR,
    }
}

fn signal(pc: &mut Machine, message: MsiMessage) -> usize {
    pc.chip.signal_msi(message, &mut |_, _| {}).unwrap()
}

/// SDM vol. 3 §11.12.9: 32-bit physical destinations and the 0xFFFF_FFFF broadcast, at 1024.
#[test]
fn x2apic_ipis_reach_every_id_up_to_1023_and_broadcast_reaches_all() {
    let mut pc = machine(VCPUS, true, false);
    for target in [1usize, 255, 256, 300, 1023] {
        x2apic_ipi(&mut pc, 0, target as u32, 0);
        assert_eq!(receivers(&mut pc), vec![target], "ID {target}");
    }
    x2apic_ipi(&mut pc, 5, 0xFFFF_FFFF, 0);
    assert_eq!(receivers(&mut pc), (0..VCPUS).collect::<Vec<_>>());
    x2apic_ipi(&mut pc, 5, 0, ICR_ALL_BUT_SELF);
    let all_but_5: Vec<usize> = (0..VCPUS).filter(|&cpu| cpu != 5).collect();
    assert_eq!(receivers(&mut pc), all_but_5);
}

/// SDM vol. 3 §11.12.10.2: logical x2APIC ID = cluster ID\[19:4\] in bits 31:16, bit ID\[3:0\]
/// in bits 15:0; a logical IPI reaches the members of one cluster.
#[test]
fn x2apic_logical_cluster_of_high_ids() {
    let mut pc = machine(VCPUS, true, false);
    assert_eq!(
        pc.cpus[1000].msr_read(0x80D, 0),
        Ok((1000u64 >> 4) << 16 | 1 << (1000 & 0xF))
    );
    // Cluster 62 = IDs 992-1007; members 8 (ID 1000) and 15 (ID 1007).
    x2apic_ipi(&mut pc, 0, 62 << 16 | 1 << 8 | 1 << 15, ICR_LOGICAL);
    assert_eq!(receivers(&mut pc), vec![1000, 1007]);
}

/// Extended destination ID (KVM_FEATURE_MSI_EXT_DEST_ID): address bits 11:5 are destination
/// bits 14:8, so a device reaches APIC ID 300. Without it the bits are reserved and ignored:
/// the device expresses only the low 8 bits, and reaches APIC ID 44 (300 & 0xFF) instead.
#[test]
fn msi_reaches_id_300_only_with_extended_destination_id() {
    let mut pc = machine(VCPUS, true, true);
    assert_eq!(signal(&mut pc, msi(300)), 1);
    assert_eq!(receivers(&mut pc), vec![300]);
    assert_eq!(signal(&mut pc, msi(1023)), 1);
    assert_eq!(receivers(&mut pc), vec![1023]);

    let mut plain = machine(VCPUS, true, false);
    assert_eq!(signal(&mut plain, msi(300)), 1);
    assert_eq!(receivers(&mut plain), vec![44]);
}

/// KVM's x2APIC broadcast quirk: a device's 0xFF is a broadcast for x2APIC-mode targets too,
/// also with the extended destination ID (0x0FF). APIC ID 255 is therefore unreachable by a
/// device message, but reachable by an x2APIC IPI (where 0xFF is an ordinary ID).
#[test]
fn device_ff_is_broadcast_so_id_255_is_reached_only_by_ipis() {
    let mut pc = machine(VCPUS, true, true);
    assert_eq!(signal(&mut pc, msi(0xFF)), VCPUS);
    assert_eq!(receivers(&mut pc).len(), VCPUS);
    x2apic_ipi(&mut pc, 0, 0xFF, 0);
    assert_eq!(receivers(&mut pc), vec![255]);
}

/// IOAPIC entries carry destination bits 14:8 in bits 55:49 with the extended destination ID
/// (Linux's `virt_destid_8_14`); without it those bits are reserved (stored and read back, as
/// KVM's IOAPIC does, but not routed) and the entry reaches APIC ID 300 & 0xFF.
#[test]
fn ioapic_entry_reaches_id_300_only_with_extended_destination_id() {
    for (extended, expected) in [(true, 300usize), (false, 44)] {
        let mut pc = machine(VCPUS, true, extended);
        // Pin 9, edge, active high, physical, unmasked; high dword: 63:56 = 0x2C, 55:49 = 1.
        pc.ioapic_write(0x11 + 2 * 9, 0x2C << 24 | 1 << 17);
        pc.ioapic_write(0x10 + 2 * 9, VECTOR);
        assert_eq!(pc.ioapic_read(0x11 + 2 * 9), 0x2C << 24 | 1 << 17);
        pc.pulse_gsi(9, 0);
        assert_eq!(receivers(&mut pc), vec![expected], "extended {extended}");
    }
}

/// xAPIC mode cannot address IDs above 254: vCPU 300's xAPIC ID reads 300 & 0xFF = 44, so an
/// xAPIC IPI to 44 reaches both APICs with that ID (as on hardware, where each APIC compares
/// for itself), and vCPU 255's ID is the broadcast. KVM's hotplug rule still lets a 15-bit
/// device destination reach vCPU 300 by its initial ID while it is in xAPIC mode.
#[test]
fn xapic_mode_aliases_ids_above_255_and_hotplug_rule_reaches_them() {
    let mut pc = machine(301, false, true);
    assert_eq!(pc.apic_read(300, APIC_ID), 44 << 24);
    pc.ipi(0, 44, ICR_FIXED | VECTOR);
    assert_eq!(receivers(&mut pc), vec![44, 300]);
    pc.ipi(0, 0xFF, ICR_FIXED | VECTOR);
    assert_eq!(receivers(&mut pc).len(), 301);
    assert_eq!(signal(&mut pc, msi(300)), 1);
    assert_eq!(receivers(&mut pc), vec![300]);
    // Once vCPU 300 is in x2APIC mode its ID is the full 300: 44 no longer reaches it.
    pc.cpus[300].set_apic_base(APIC_BASE_X2APIC, false).unwrap();
    pc.ipi(0, 44, ICR_FIXED | VECTOR);
    assert_eq!(receivers(&mut pc), vec![44]);
}

/// Memory per vCPU of the model: the per-vCPU structures and the bus's topology tables, at
/// 1024 vCPUs. Printed for the documentation (`--nocapture`), bounded so a regression shows.
#[test]
fn memory_per_vcpu_stays_small() {
    let pc = machine(VCPUS, true, false);
    let bus = pc.chip.bus();
    let table_bytes = bus.topology_heap_bytes() / VCPUS;
    let sizes = [
        ("VcpuInterrupts", std::mem::size_of::<VcpuInterrupts>()),
        ("  LocalApic", std::mem::size_of::<LocalApic>()),
        ("  MpStateMachine", std::mem::size_of::<MpStateMachine>()),
        ("VcpuInbox (shared)", std::mem::size_of::<VcpuInbox>()),
        ("TopologyEntry", std::mem::size_of::<TopologyEntry>()),
        ("bus tables per vCPU", table_bytes),
    ];
    for (name, bytes) in sizes {
        eprintln!("{name:<22} {bytes:>6} bytes");
    }
    let total =
        std::mem::size_of::<VcpuInterrupts>() + std::mem::size_of::<VcpuInbox>() + table_bytes;
    eprintln!("{:<22} {total:>6} bytes", "total per vCPU");
    assert!(total < 4096, "{total} bytes per vCPU");
    assert!(
        table_bytes < 256,
        "{table_bytes} bytes of bus tables per vCPU"
    );
}

/// SDM vol. 3 §9.9.1: a 6-core, 2-thread socket layout leaves gaps in the IDs (cores 6 and 7 of
/// each socket do not exist); every vCPU still gets its own ID, reads it, and is reached by it
/// with the same constant work; an ID in a gap reaches nobody.
#[test]
fn hierarchical_apic_ids_with_gaps_at_1024_vcpus() {
    let layout = ApicIdLayout::Hierarchy {
        threads: 2,
        cores: 6,
        dies: 1,
    };
    let mut config = PcIrqChipConfig::new(VCPUS);
    config.apic.apic_ids = layout;
    assert_eq!(config.apic.check(), Ok(()));
    let (chip, mut cpus) = PcIrqChip::new(config);
    let ids: Vec<u32> = (0..VCPUS).map(|i| layout.apic_id(i).unwrap().0).collect();
    assert_eq!(ids[12], 16, "socket 1 starts at bit 4");
    for (cpu, &id) in cpus.iter_mut().zip(&ids) {
        cpu.set_apic_base(APIC_BASE_X2APIC, false).unwrap();
        assert_eq!(cpu.msr_read(0x802, 0), Ok(u64::from(id)));
    }
    for (index, &id) in ids.iter().enumerate() {
        let m = InterruptMessage {
            format: DestinationFormat::X2apic,
            source: MessageSource::Vcpu(0),
            ..InterruptMessage::fixed(VECTOR as u8, id)
        };
        let (got, cost) = chip.bus().resolve_with_cost(&InterruptMessage {
            delivery_mode: DeliveryMode::Init,
            ..m
        });
        assert_eq!(got, vec![index]);
        assert_eq!(
            cost,
            ResolveCost {
                lookups: 2,
                visited: 1
            }
        );
    }
    let gap = InterruptMessage {
        format: DestinationFormat::X2apic,
        delivery_mode: DeliveryMode::Init,
        ..InterruptMessage::fixed(0, 12)
    };
    assert!(chip.bus().resolve(&gap).is_empty());
}

#[test]
fn config_check_rejects_ids_past_254_without_x2apic_and_overflows() {
    let mut config = PcIrqChipConfig::new(255).apic;
    assert_eq!(config.check(), Ok(()));
    config.x2apic = false;
    // 255 vCPUs have IDs 0-254: xAPIC can address them all.
    assert_eq!(config.check(), Ok(()));
    config.vcpus = 256;
    assert_eq!(
        config.check(),
        Err(ApicSystemConfigError::NeedsX2apic(0xFF))
    );
    config.x2apic = true;
    // 2^31 + 1 threads take 32 bits: the second socket's first thread needs ID bit 32.
    config.vcpus = (1 << 31) + 2;
    config.apic_ids = ApicIdLayout::Hierarchy {
        threads: (1 << 31) + 1,
        cores: 1,
        dies: 1,
    };
    assert_eq!(
        config.check(),
        Err(ApicSystemConfigError::ApicIdOverflow {
            index: (1 << 31) + 1
        })
    );
}
