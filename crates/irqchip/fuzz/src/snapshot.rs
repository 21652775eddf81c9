//! `snapshot_restore`: a snapshot from arbitrary bytes (JSON, the format the crate's tests and
//! the VMM use). Whatever parses is checked against a chip built to match it; a snapshot the
//! chip accepts must restore, save back to itself, and then survive a fixed workout (every vCPU
//! runs, EOIs, time passes, timers fire, devices EOI, another snapshot round trip) with every
//! invariant of `chip_sequence` holding. Nothing may panic on the way.

use irqchip::chip::PcIrqChipConfig;
use irqchip::snapshot::ChipSnapshot;

use super::chip::Sim;
use super::diff::first_difference;
use super::input::Input;

/// The chip a snapshot could come from (its vCPU count and device configuration).
fn matching_config(snapshot: &ChipSnapshot) -> Option<PcIrqChipConfig> {
    let first = snapshot.vcpus.first()?.lapic.config();
    if snapshot.vcpus.len() > 8 {
        return None;
    }
    let mut config = PcIrqChipConfig::new(snapshot.vcpus.len());
    config.apic.x2apic = first.x2apic_supported;
    config.apic.directed_eoi = first.directed_eoi_supported;
    config.apic.clock = first.clock;
    config.ioapic = snapshot.devices.ioapic.config();
    config.extended_destination_id = snapshot.devices.ioapic.extended_destination_id();
    Some(config)
}

/// Fixed operations of `chip_sequence`, in `Sim::step`'s encoding (a CPU byte, an operation
/// byte, its arguments): for each vCPU run, EOI, run; time passes; everyone runs; a pulse of
/// GSI 4 from source 1; a snapshot round trip 16 ns long; everyone runs; time passes; runs.
/// `workout_makes_its_snapshot_round_trip` (tests/fuzz_corpus.rs) checks that it decodes so.
pub const WORKOUT: &[u8] = &[
    0, 7, 7, 1, 6, 0, 7, 7, 1, 7, 7, 2, 7, 7, 3, 7, 7, 1, 6, 2, 6, 3, 6, 0, 8, 0xFF, 0xFF, 20, 0,
    7, 7, 1, 7, 7, 2, 7, 7, 3, 7, 7, // runs
    0, 9, 0, 4, 1, 0, 0, 0, 0,
    0, // pulse: GSI 4 (selector 0, then 4), source 1, level 0, pulse
    0, 19, 0x10, 0, 0, // snapshot round trip: 0x0010 << 0 ns
    0, 7, 7, 1, 7, 7, 2, 7, 7, 3, 7, 7, 0, 8, 0xFF, 0xFF, 39, 0, 7, 7, 1, 7, 7,
];

/// The `snapshot_restore` target.
pub fn run(data: &[u8]) {
    let Ok(snapshot) = serde_json::from_slice::<ChipSnapshot>(data) else {
        return;
    };
    let Some(config) = matching_config(&snapshot) else {
        return;
    };
    let mut sim = Sim::new(config);
    if sim.restore_foreign(&snapshot).is_err() {
        return;
    }
    let saved = sim.save_at_now();
    assert!(
        saved == snapshot,
        "restore -> save changed an accepted snapshot {}",
        first_difference(&snapshot, &saved)
    );
    work_out(&mut sim);
}

/// Runs [`WORKOUT`] on `sim`.
pub fn work_out(sim: &mut Sim) {
    let mut workout = Input::new(WORKOUT);
    while !workout.is_empty() {
        sim.step(&mut workout);
    }
}
