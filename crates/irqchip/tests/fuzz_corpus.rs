//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets' bodies,
//! so that every `cargo test` checks the fuzzers' invariants without a fuzzer (docs/fuzzing.md).
//! The bodies are the fuzz crate's own source, compiled here as a module.
#![cfg(not(feature = "loom"))]

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

fn replay(name: &str, body: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| body(&data));
        assert!(outcome.is_ok(), "{name}: {} fails", file.display());
    }
    files.len()
}

/// Every target has a corpus, and every input of it passes its invariants.
#[test]
fn every_target_passes_its_corpus() {
    for (name, body) in harness::TARGETS {
        let inputs = replay(name, *body);
        assert!(inputs >= 5, "{name}: only {inputs} corpus inputs");
    }
}

/// The harness's own reference formulas, on the SDM's examples: they are what the targets
/// compare the model with, so they must be right.
#[test]
fn reference_priority_formulas() {
    use harness::prio::{deliverable, sdm_apr, sdm_ppr, Vectors};
    // PPR: TPR wins when its class is at least the in-service class, else ISRV[7:4]:0.
    assert_eq!(sdm_ppr(0x35, 0x31), 0x35);
    assert_eq!(sdm_ppr(0x25, 0x41), 0x40);
    assert_eq!(sdm_ppr(0x00, 0x00), 0x00);
    // APR: TPR when it beats the in-service class and covers the requests, else the highest
    // class of the three with sub-class 0.
    assert_eq!(sdm_apr(0x55, 0x41, 0x52), 0x55);
    assert_eq!(sdm_apr(0x55, 0x51, 0x00), 0x50);
    assert_eq!(sdm_apr(0x30, 0x41, 0x00), 0x40);
    assert_eq!(sdm_apr(0x30, 0x00, 0x61), 0x60);
    let mut irr = Vectors::default();
    irr.insert(0x45);
    irr.insert(0x33);
    assert_eq!(irr.highest(), 0x45);
    assert_eq!(deliverable(&irr, 0x40), None, "same class as PPR is held");
    assert_eq!(deliverable(&irr, 0x3F), Some(0x45));
    let regs = [0, 0, 1 << 5, 0, 0, 0, 0, 1 << 31];
    let set = Vectors::from_registers(regs);
    assert_eq!(set.iter().collect::<Vec<_>>(), vec![0x45, 0xFF]);
}

/// `snapshot_restore`'s fixed workout decodes as its comment says: on 1 to 4 vCPUs it makes
/// exactly one snapshot round trip (an encoding change once turned that step into a GSI's
/// source ID and the round trip silently went away).
#[test]
fn workout_makes_its_snapshot_round_trip() {
    for vcpus in 1..=4 {
        let mut sim = harness::chip::Sim::new(irqchip::chip::PcIrqChipConfig::new(vcpus));
        harness::snapshot::work_out(&mut sim);
        assert_eq!(sim.stats.snapshots, 1, "{vcpus} vCPUs");
    }
}
