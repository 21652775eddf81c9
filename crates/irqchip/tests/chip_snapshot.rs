//! Snapshots of the whole chip: a busy state survives a JSON round trip into a fresh chip on
//! another timeline with the same observable behaviour; random operation sequences give the
//! same injections whether or not they were interrupted by a snapshot/restore; malformed
//! snapshots are refused (and never panic).
#![cfg(not(feature = "loom"))]

mod support;

use irqchip::chip::PcIrqChipConfig;
use irqchip::mpstate::MpState;
use irqchip::snapshot::{ChipSnapshot, SnapshotError, SNAPSHOT_VERSION};
use irqchip::vcpu::Injection;
use irqchip::Nanos;
use proptest::prelude::*;
use serde_json::Value;
use support::*;

const TIMER_COUNT: u32 = 1_000_000;
const BSP_TIMER_VECTOR: u8 = 0xE0;
const AP_TIMER_VECTOR: u8 = 0xD1;
/// DCR 1011b: divide by 1, so one count per ns at the default 1 GHz bus clock.
const DIVIDE_BY_1: u32 = 0b1011;
const LVT_PERIODIC: u32 = 1 << 17;

fn json_round_trip(snapshot: &ChipSnapshot) -> ChipSnapshot {
    let json = serde_json::to_string(snapshot).expect("serializes");
    serde_json::from_str(&json).expect("deserializes")
}

/// A 3-vCPU machine with something everywhere: IRR and ISR bits, a level IOAPIC entry with
/// remote IRR and its line still high, the PIC with IRQ 1 in service and IRQ 3 requested, the
/// BSP's one-shot timer half-way, the AP's periodic timer running, an NMI pending on vCPU 1,
/// INIT latched and SIPI pending on vCPU 2, and vectors still in vCPU 1's inbox.
fn busy_machine() -> Machine {
    let mut pc = Machine::new(3);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LVT_LINT0, LINT0_EXTINT);
    pc.ipi(0, 1, ICR_INIT);
    pc.ipi(0, 1, ICR_STARTUP | 0x10);
    assert!(pc.run(1).0.start.is_some());
    pc.apic_write(1, APIC_SVR, SVR_ENABLED);
    pc.apic_write(1, APIC_LDR, 0x02 << 24);
    pc.pic_init_like_linux(!((1 << 1) | (1 << 3)), 0xFF);

    // PIC: IRQ 1 taken by the BSP (in service), then IRQ 3 requested behind it.
    pc.pulse_gsi(1, 1);
    assert_eq!(pc.take(0), vec![Taken::ExtInt(0x31)]);
    pc.pulse_gsi(3, 3);
    assert!(!pc.chip.pic_intr(), "IRQ 3 waits behind IRQ 1 in service");

    // IOAPIC: serial (pin 4), level, logical to vCPU 1, taken and not EOIed, line still high.
    pc.ioapic_entry(4, 0x34 | RTE_LOGICAL | RTE_LEVEL, 0x02);
    pc.set_gsi(4, 4, true);
    assert_eq!(pc.take(1), vec![Taken::Vector(0x34)]);

    // BSP: 0x50 in service, 0x60 and 0x45 requested (0x45 below 0x50's class: it waits).
    pc.ipi(1, 0, ICR_FIXED | 0x50);
    assert_eq!(pc.take(0), vec![Taken::Vector(0x50)]);
    pc.ipi(1, 0, ICR_FIXED | 0x45);
    pc.ipi(1, 0, ICR_FIXED | 0x60);
    pc.cpus[0].drain();

    // Timers: the BSP one-shot from t = 1000, the AP periodic.
    pc.now = 1000;
    pc.apic_write(0, APIC_DCR, DIVIDE_BY_1);
    pc.apic_write(0, APIC_LVT_TIMER, u32::from(BSP_TIMER_VECTOR));
    pc.apic_write(0, APIC_INITIAL_COUNT, TIMER_COUNT);
    pc.apic_write(1, APIC_DCR, DIVIDE_BY_1);
    pc.apic_write(1, APIC_LVT_TIMER, LVT_PERIODIC | u32::from(AP_TIMER_VECTOR));
    pc.apic_write(1, APIC_INITIAL_COUNT, 300_000);

    // vCPU 1: an NMI drained and not injected, then vectors left in its inbox.
    pc.ipi(0, 1, ICR_NMI);
    pc.cpus[1].drain();
    pc.ipi(0, 1, ICR_FIXED | 0x70);
    pc.ipi(0, 1, ICR_FIXED | 0x71);
    // vCPU 2: INIT and SIPI posted, not yet accepted.
    pc.ipi(0, 2, ICR_INIT);
    pc.ipi(0, 2, ICR_STARTUP | 0x20);

    // Half-way through the BSP's count (and 3 ns more, not a whole count of anything).
    pc.now = 1000 + u64::from(TIMER_COUNT) / 2 + 3;
    pc
}

/// What the guest and the VMM can observe of a machine now, without changing it.
fn observe(pc: &mut Machine) -> Vec<String> {
    let mut seen = Vec::new();
    for cpu in 0..pc.cpus.len() {
        seen.push(format!("{cpu} regs {:x?}", pc.apic_registers(cpu)));
        let vcpu = &pc.cpus[cpu];
        seen.push(format!(
            "{cpu} mp {:?} remaining {:?} next {:?} smi {}",
            vcpu.mp_state(),
            vcpu.lapic().timer().remaining(pc.now),
            vcpu.next_injection(false),
            vcpu.smi_pending()
        ));
    }
    seen.push(format!("pic intr {}", pc.chip.pic_intr()));
    for pin in 0..24 {
        seen.push(format!("pin {pin} {:x}", pc.ioapic_entry_low(pin)));
    }
    seen
}

/// Runs every vCPU, EOIing what it took (LAPIC, and the PIC for ExtINT), `rounds` times with
/// `step` ns between rounds; returns what each took.
fn drive(pc: &mut Machine, rounds: usize, step: Nanos) -> Vec<(usize, Taken)> {
    let mut log = Vec::new();
    for _ in 0..rounds {
        for cpu in 0..pc.cpus.len() {
            for taken in pc.take(cpu) {
                log.push((cpu, taken));
                match taken {
                    Taken::Vector(_) => {
                        pc.apic_write(cpu, APIC_EOI, 0);
                    }
                    Taken::ExtInt(_) => pc.pic_write(0x20, 0x20),
                    Taken::Nmi => {}
                }
            }
        }
        pc.now += step;
    }
    log
}

/// The busy state restored into a fresh chip on another timeline (t = 77 there) looks the same
/// and behaves the same: registers, timers' time left, MP states, IOAPIC entries with remote
/// IRR, and the sequence of everything taken afterwards, timer expiries included.
#[test]
fn busy_state_round_trips_to_an_identical_machine() {
    let mut original = busy_machine();
    let snapshot = original.snapshot();
    let restored_at = 77;
    let json = json_round_trip(&snapshot);
    assert_eq!(json, snapshot);
    let mut restored = Machine::new(3);
    restored.restore(&json, restored_at).expect("restores");

    // The snapshot holds the time left, not absolute times.
    let bsp_timer = &snapshot.vcpus[0].lapic;
    assert_eq!(
        bsp_timer.timer().remaining(0),
        Some(u64::from(TIMER_COUNT) / 2 - 3)
    );
    // The inbox was drained into the state: vectors in IRR, INIT/SIPI in the latch.
    assert!(snapshot.vcpus[1].lapic.irr().contains(0x70));
    assert!(snapshot.vcpus[1].pending.nmi);
    assert!(snapshot.vcpus[2].mp.has_pending_init_or_sipi());
    assert!(!original.cpus[1].inbox().has_pending());

    assert_eq!(observe(&mut original), observe(&mut restored));
    assert_eq!(
        original.cpus[0].next_injection(false),
        Some(Injection::Vector(0x60))
    );
    assert_eq!(
        original.cpus[0].guest_tsc(original.now),
        restored.cpus[0].guest_tsc(restored.now),
        "the guest TSC continues from its saved value"
    );

    // Same future: vCPU 2 starts, the NMI and the inbox vectors are taken, the level line is
    // re-delivered after its EOI, the PIC's IRQ 3 follows IRQ 1's EOI, the timers fire.
    // The handlers in progress finish: EOI of IRQ 1 to the PIC, of 0x50 on the BSP, of the
    // level vector 0x34 on vCPU 1 (its line is still high).
    let step = 40_000;
    let finish_and_drive = |pc: &mut Machine| {
        pc.pic_write(0x20, 0x20);
        pc.apic_write(0, APIC_EOI, 0);
        pc.apic_write(1, APIC_EOI, 0);
        drive(pc, 30, step)
    };
    let ahead = finish_and_drive(&mut original);
    let again = finish_and_drive(&mut restored);
    assert_eq!(ahead, again);
    assert!(ahead.contains(&(1, Taken::Nmi)));
    assert!(ahead.contains(&(0, Taken::Vector(BSP_TIMER_VECTOR))));
    assert!(ahead.contains(&(1, Taken::Vector(AP_TIMER_VECTOR))));
    assert!(ahead.contains(&(0, Taken::ExtInt(0x33))));
    assert!(ahead.contains(&(1, Taken::Vector(0x34))), "re-delivered");
    assert_eq!(restored.cpus[2].mp_state(), MpState::Runnable);
    assert_eq!(observe(&mut original), observe(&mut restored));
}

/// Restoring discards what was posted to the restoring vCPU before the restore.
#[test]
fn restore_discards_stale_inbox_content() {
    let mut original = busy_machine();
    let snapshot = original.snapshot();
    let mut restored = Machine::new(3);
    restored.apic_write(0, APIC_SVR, SVR_ENABLED);
    restored.ipi(0, 0, ICR_FIXED | 0x99);
    restored.restore(&snapshot, original.now).expect("restores");
    restored.cpus[0].drain();
    assert!(!restored.cpus[0].lapic().irr().contains(0x99));
}

// ---- malformed snapshots ----

fn to_value(snapshot: &ChipSnapshot) -> Value {
    serde_json::to_value(snapshot).expect("serializes")
}

fn restore_value(value: Value) -> Result<Result<(), SnapshotError>, serde_json::Error> {
    let snapshot: ChipSnapshot = serde_json::from_value(value)?;
    let mut fresh = Machine::new(3);
    Ok(fresh.restore(&snapshot, 5))
}

#[test]
fn snapshot_of_another_version_is_refused() {
    let mut value = to_value(&busy_machine().snapshot());
    value["version"] = (SNAPSHOT_VERSION + 1).into();
    assert_eq!(
        restore_value(value).unwrap(),
        Err(SnapshotError::Version {
            found: SNAPSHOT_VERSION + 1,
            supported: SNAPSHOT_VERSION
        })
    );
}

#[test]
fn snapshot_with_another_vcpu_count_is_refused() {
    let snapshot = busy_machine().snapshot();
    let mut two = Machine::new(2);
    assert_eq!(
        two.restore(&snapshot, 0),
        Err(SnapshotError::VcpuCount {
            expected: 2,
            found: 3
        })
    );
    let mut short = snapshot.clone();
    short.vcpus.pop();
    let mut fresh = Machine::new(3);
    assert!(matches!(
        fresh.restore(&short, 0),
        Err(SnapshotError::VcpuCount { .. })
    ));
}

#[test]
fn vcpu_parts_out_of_order_are_refused() {
    let mut snapshot = busy_machine().snapshot();
    snapshot.vcpus.swap(1, 2);
    let mut fresh = Machine::new(3);
    assert_eq!(
        fresh.restore(&snapshot, 0),
        Err(SnapshotError::VcpuIndex {
            expected: 1,
            found: 2
        })
    );
    // A vCPU handed another vCPU's part refuses it on its own too.
    let part = busy_machine().snapshot().vcpus[1].clone();
    assert!(fresh.cpus[2].restore(&part, 0).is_err());
}

#[test]
fn snapshot_of_another_machine_shape_is_refused() {
    let snapshot = busy_machine().snapshot();
    let mut no_x2apic = PcIrqChipConfig::new(3);
    no_x2apic.apic.x2apic = false;
    assert_eq!(
        Machine::with_config(no_x2apic).restore(&snapshot, 0),
        Err(SnapshotError::LapicConfig {
            vcpu: 0,
            field: "x2APIC support"
        })
    );
    let mut more_pins = PcIrqChipConfig::new(3);
    more_pins.ioapic.pins = 48;
    assert!(matches!(
        Machine::with_config(more_pins).restore(&snapshot, 0),
        Err(SnapshotError::IoApicConfig { .. })
    ));
}

#[test]
fn inconsistent_levels_are_refused() {
    let mut value = to_value(&busy_machine().snapshot());
    // GSI 4 is asserted by source 4 (serial line high): forget it, the IOAPIC wire stays high.
    value["devices"]["routing"]["gsis"]["4"]["asserted"] = Value::Array(vec![]);
    assert_eq!(
        restore_value(value).unwrap(),
        Err(SnapshotError::PicLineLevel { irq: 4 })
    );
}

#[test]
fn invalid_lapic_and_mp_states_are_refused() {
    let good = to_value(&busy_machine().snapshot());
    let mut zero_clock = good.clone();
    zero_clock["vcpus"][0]["lapic"]["timer"]["clock"]["apic_bus_hz"] = 0.into();
    assert!(matches!(
        restore_value(zero_clock).unwrap(),
        Err(SnapshotError::LapicState { vcpu: 0, .. })
    ));
    let mut extd_without_en = good.clone();
    extd_without_en["vcpus"][1]["lapic"]["apic_base"] = (0xFEE0_0000u64 | 1 << 10).into();
    assert!(matches!(
        restore_value(extd_without_en).unwrap(),
        Err(SnapshotError::LapicState { vcpu: 1, .. })
    ));
    let mut fraction = good.clone();
    fraction["vcpus"][0]["lapic"]["timer"]["countdown"]["Counting"]["expiry_frac"] =
        u64::MAX.into();
    assert!(matches!(
        restore_value(fraction).unwrap(),
        Err(SnapshotError::LapicState { vcpu: 0, .. })
    ));
    let mut bsp_flag = good.clone();
    bsp_flag["vcpus"][2]["mp"]["bsp"] = true.into();
    assert_eq!(
        restore_value(bsp_flag).unwrap(),
        Err(SnapshotError::MpBsp {
            vcpu: 2,
            found: true
        })
    );
    let mut short_pins = good.clone();
    short_pins["devices"]["ioapic"]["pins"]
        .as_array_mut()
        .unwrap()
        .pop();
    assert!(restore_value(short_pins).is_err(), "the IOAPIC refuses it");
    assert!(serde_json::from_str::<ChipSnapshot>("{\"version\": 1}").is_err());
}

/// Every number and flag of a valid snapshot replaced by a random value: the snapshot is
/// refused or restores to a machine that runs; nothing panics.
fn leaves(value: &Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let mut p = path.clone();
                p.push(key.clone());
                leaves(child, p, out);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                let mut p = path.clone();
                p.push(index.to_string());
                leaves(child, p, out);
            }
        }
        Value::Number(_) | Value::Bool(_) => out.push(path),
        _ => {}
    }
}

fn leaf_mut<'a>(value: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(value, |v, key| match v {
        Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
        other => &mut other[key.as_str()],
    })
}

proptest! {
    #[test]
    fn mutated_snapshots_never_panic(pick in any::<prop::sample::Index>(), raw in any::<u64>(), small in any::<bool>()) {
        let mut pc = busy_machine();
        let good = to_value(&pc.snapshot());
        let mut paths = Vec::new();
        leaves(&good, Vec::new(), &mut paths);
        let path = pick.get(&paths);
        let mut value = good.clone();
        let leaf = leaf_mut(&mut value, path);
        *leaf = match leaf {
            Value::Bool(b) => Value::Bool(!*b),
            _ if small => Value::from(raw % 300),
            _ => Value::from(raw),
        };
        if let Ok(Ok(())) = restore_value(value.clone()) {
            let snapshot: ChipSnapshot = serde_json::from_value(value).unwrap();
            let mut restored = Machine::new(3);
            restored.restore(&snapshot, 5).unwrap();
            let _ = observe(&mut restored);
            let _ = drive(&mut restored, 5, 300_000);
        }
    }
}

// ---- random operation sequences with a snapshot in the middle ----

/// One thing that happens to a 2-vCPU PC.
#[derive(Clone, Debug)]
enum Op {
    SetGsi { gsi: u32, source: u32, level: bool },
    PulseGsi { gsi: u32, source: u32 },
    Msi { cpu: u32, vector: u8 },
    Ipi { from: usize, to: u32, vector: u8 },
    Nmi { from: usize, to: u32 },
    InitSipi { to: u32 },
    EnableApic { cpu: usize },
    Tpr { cpu: usize, tpr: u8 },
    Run { cpu: usize },
    Eoi { cpu: usize },
    PicEoi,
    Halt { cpu: usize },
    Advance { ns: u64 },
}

/// GSIs the setup wires: 0 (timer, pin 2), 1 (PIC ExtINT + IOAPIC edge), 3 (PIC only),
/// 4 (level, logical), 16 (PCI level active-low, both CPUs).
const GSIS: [u32; 5] = [0, 1, 3, 4, 16];

fn op() -> impl Strategy<Value = Op> {
    let cpu = 0..2usize;
    let gsi = prop::sample::select(&GSIS[..]);
    prop_oneof![
        1 => (gsi.clone(), 0..3u32, any::<bool>())
            .prop_map(|(gsi, source, level)| Op::SetGsi { gsi, source, level }),
        1 => (gsi, 0..3u32).prop_map(|(gsi, source)| Op::PulseGsi { gsi, source }),
        1 => (0..2u32, 0x50..0x58u8).prop_map(|(cpu, vector)| Op::Msi { cpu, vector }),
        1 => (cpu.clone(), 0..2u32, 0x60..0x68u8)
            .prop_map(|(from, to, vector)| Op::Ipi { from, to, vector }),
        1 => (cpu.clone(), 0..2u32).prop_map(|(from, to)| Op::Nmi { from, to }),
        1 => Just(Op::InitSipi { to: 1 }),
        1 => cpu.clone().prop_map(|cpu| Op::EnableApic { cpu }),
        1 => (cpu.clone(), prop::sample::select(vec![0u8, 0x40, 0x55, 0x70]))
            .prop_map(|(cpu, tpr)| Op::Tpr { cpu, tpr }),
        3 => cpu.clone().prop_map(|cpu| Op::Run { cpu }),
        2 => cpu.clone().prop_map(|cpu| Op::Eoi { cpu }),
        1 => Just(Op::PicEoi),
        1 => cpu.prop_map(|cpu| Op::Halt { cpu }),
        1 => (0..120_000u64).prop_map(|ns| Op::Advance { ns }),
    ]
}

/// The machine every sequence starts from: both CPUs up, the PIC in virtual-wire mode on the
/// BSP for IRQ 1 and 3, IOAPIC entries for GSIs 0, 1, 4 and 16, both LAPIC timers running.
fn wired_machine() -> Machine {
    let mut pc = Machine::new(2);
    pc.apic_write(0, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LVT_LINT0, LINT0_EXTINT);
    pc.ipi(0, 1, ICR_INIT);
    pc.ipi(0, 1, ICR_STARTUP | 0x10);
    pc.run(1);
    pc.apic_write(1, APIC_SVR, SVR_ENABLED);
    pc.apic_write(0, APIC_LDR, 0x01 << 24);
    pc.apic_write(1, APIC_LDR, 0x02 << 24);
    pc.pic_init_like_linux(!((1 << 1) | (1 << 3)), 0xFF);
    pc.ioapic_entry(2, 0x30, 0);
    pc.ioapic_entry(1, 0x31, 1);
    pc.ioapic_entry(4, 0x34 | RTE_LOGICAL | RTE_LEVEL, 0x02);
    pc.ioapic_entry(16, 0x41 | RTE_LOGICAL | RTE_LEVEL | RTE_ACTIVE_LOW, 0x03);
    pc.apic_write(0, APIC_DCR, DIVIDE_BY_1);
    pc.apic_write(
        0,
        APIC_LVT_TIMER,
        LVT_PERIODIC | u32::from(BSP_TIMER_VECTOR),
    );
    pc.apic_write(0, APIC_INITIAL_COUNT, 250_000);
    pc.apic_write(1, APIC_DCR, 0);
    pc.apic_write(1, APIC_LVT_TIMER, u32::from(AP_TIMER_VECTOR));
    pc.apic_write(1, APIC_INITIAL_COUNT, 70_001);
    pc.notes.clear();
    pc
}

/// Applies `op`; returns what it made observable (injections taken, EOI messages).
fn apply(pc: &mut Machine, op: &Op) -> Vec<String> {
    let mut seen = Vec::new();
    match *op {
        Op::SetGsi { gsi, source, level } => pc.set_gsi(gsi, source, level),
        Op::PulseGsi { gsi, source } => pc.pulse_gsi(gsi, source),
        Op::Msi { cpu, vector } => {
            let msi = irqchip::msi::MsiMessage {
                address: 0xFEE0_0000 | u64::from(cpu) << 12,
                data: u32::from(vector),
            };
            let reached = pc.chip.signal_msi(msi, &mut |_, _| {});
            seen.push(format!("msi {reached:?}"));
        }
        Op::Ipi { from, to, vector } => pc.ipi(from, to, ICR_FIXED | u32::from(vector)),
        Op::Nmi { from, to } => pc.ipi(from, to, ICR_NMI),
        Op::InitSipi { to } => {
            pc.ipi(0, to, ICR_INIT);
            pc.ipi(0, to, ICR_STARTUP | 0x10);
        }
        Op::EnableApic { cpu } => {
            pc.apic_write(cpu, APIC_SVR, SVR_ENABLED);
        }
        Op::Tpr { cpu, tpr } => {
            pc.apic_write(cpu, APIC_TPR, u32::from(tpr));
        }
        Op::Run { cpu } => {
            let (outcome, taken) = pc.run(cpu);
            seen.push(format!("run {cpu} {outcome:?} {taken:?}"));
        }
        Op::Eoi { cpu } => {
            let result = pc.apic_write(cpu, APIC_EOI, 0);
            seen.push(format!("eoi {cpu} {result:?}"));
        }
        Op::PicEoi => pc.pic_write(0x20, 0x20),
        Op::Halt { cpu } => pc.cpus[cpu].halt(),
        Op::Advance { ns } => pc.now += ns,
    }
    seen
}

proptest! {
    /// Nothing lost, nothing duplicated: the operations after a snapshot give the same
    /// injections (and EOIs, MSI reach, INIT/SIPI outcomes) on the original machine and on a
    /// fresh machine restored from the snapshot on another timeline; at the end both machines
    /// save to the same snapshot.
    #[test]
    fn snapshot_anywhere_changes_nothing(
        ops in prop::collection::vec(op(), 1..120),
        cut in any::<prop::sample::Index>(),
        timeline in 0..=100u64,
    ) {
        let mut original = wired_machine();
        let cut = cut.index(ops.len() + 1);
        for op in &ops[..cut] {
            apply(&mut original, op);
        }
        let snapshot = json_round_trip(&original.snapshot());
        // The restored VM's clock is somewhere at or before the original's (a fresh VMM).
        let restored_at = original.now * timeline / 100;
        let mut restored = Machine::new(2);
        restored.restore(&snapshot, restored_at).expect("restores");
        let shift = original.now - restored_at;
        prop_assert_eq!(observe_pair(&mut original, &mut restored), true);
        let mut log_original = Vec::new();
        let mut log_restored = Vec::new();
        for op in &ops[cut..] {
            log_original.extend(apply(&mut original, op));
            log_restored.extend(apply(&mut restored, op));
            prop_assert_eq!(original.now - restored.now, shift);
        }
        prop_assert_eq!(&log_original, &log_restored);
        let end_original = original.snapshot();
        let end_restored = restored.snapshot();
        prop_assert_eq!(end_original, end_restored);
    }
}

fn observe_pair(a: &mut Machine, b: &mut Machine) -> bool {
    observe(a) == observe(b)
}
