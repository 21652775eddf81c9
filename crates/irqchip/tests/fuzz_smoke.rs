//! The fuzz smoke of every `cargo test` (and so of CI, docs/fuzzing.md "CI smoke"): each fuzz
//! target's body (`fuzz/src/lib.rs`, the code libFuzzer runs) gets a few seconds of inputs
//! mutated from its committed corpus, libFuzzer-style (bit flips, byte edits, inserts, erases,
//! copies, interesting values, splices with another corpus input), from a fixed seed. Not
//! coverage-guided (that is `fuzz/ci-smoke.sh`), but built with the tests, so it costs no build.
//!
//! A failing input is written to the system's temporary directory and named in the panic; put it
//! into `fuzz/corpus/<target>/` and `tests/fuzz_corpus.rs` replays it from then on.
//! `IRQCHIP_FUZZ_SMOKE_SECS` sets the seconds per target (default 2), `IRQCHIP_FUZZ_SMOKE_SEED`
//! the seed.
#![cfg(not(feature = "loom"))]

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// libFuzzer's `-max_len` in `fuzz/ci-smoke.sh`.
const MAX_LEN: usize = 8192;
const DEFAULT_SECS: u64 = 2;
const DEFAULT_SEED: u64 = 0x1ec0_5eed;

/// splitmix64: a small, seedable generator, so that a run replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values that sit on boundaries: libFuzzer's "interesting" bytes.
const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, 0x10, 0x40];

/// One libFuzzer-style mutation of `data` (`other` is another corpus input, for splices).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    if data.is_empty() {
        data.push(rng.next() as u8);
        return;
    }
    let at = rng.below(data.len());
    match rng.below(7) {
        0 => data[at] ^= 1 << rng.below(8),
        1 => data[at] = rng.next() as u8,
        2 => data[at] = INTERESTING[rng.below(INTERESTING.len())],
        3 if data.len() < MAX_LEN => data.insert(at, rng.next() as u8),
        4 if data.len() > 1 => {
            let mut end = (at + 1 + rng.below(8)).min(data.len());
            if end - at == data.len() {
                end -= 1; // keep one byte
            }
            data.drain(at..end);
        }
        5 => {
            // Copy a chunk of the input over another place in it.
            let len = 1 + rng.below(16.min(data.len()));
            let from = rng.below(data.len() + 1 - len);
            let to = rng.below(data.len() + 1 - len);
            data.copy_within(from..from + len, to);
        }
        _ if !other.is_empty() => {
            // Splice: this input's head, the other's tail.
            let cut = rng.below(other.len());
            data.truncate(at);
            data.extend_from_slice(&other[cut..]);
            data.truncate(MAX_LEN);
        }
        _ => data[at] = data[at].wrapping_add(1),
    }
}

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read(f).expect("corpus file"))
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// Writes a failing input where the panic message says, and returns that path.
fn keep(name: &str, input: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join("irqchip-fuzz-smoke");
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{name}-{hash:016x}"));
    std::fs::write(&path, input).expect("write the failing input");
    path
}

/// Runs `body` on mutants of `seeds` for `budget`; returns how many inputs ran.
fn smoke(
    name: &str,
    body: harness::Target,
    seeds: &[Vec<u8>],
    rng: &mut Rng,
    budget: Duration,
) -> u64 {
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget {
        let mut input = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        for _ in 0..1 + rng.below(8) {
            mutate(rng, &mut input, other);
        }
        if std::panic::catch_unwind(|| body(&input)).is_err() {
            let path = keep(name, &input);
            panic!(
                "{name}: a mutated input breaks an invariant (run {runs}); input kept at {}: copy it \
                 into crates/irqchip/fuzz/corpus/{name}/ and `cargo test -p irqchip --test fuzz_corpus` \
                 replays it",
                path.display()
            );
        }
        runs += 1;
    }
    runs
}

/// Every target survives its budget of mutated inputs.
#[test]
fn every_target_survives_mutated_corpus_inputs() {
    let secs = env_u64("IRQCHIP_FUZZ_SMOKE_SECS", DEFAULT_SECS);
    let seed = env_u64("IRQCHIP_FUZZ_SMOKE_SEED", DEFAULT_SEED);
    let mut rng = Rng(seed);
    for (name, body) in harness::TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "{name}: empty corpus");
        let runs = smoke(name, *body, &seeds, &mut rng, Duration::from_secs(secs));
        eprintln!("fuzz smoke: {name}: {runs} mutated inputs in {secs} s (seed {seed:#x})");
        assert!(runs > 0, "{name}: no input ran in {secs} s");
    }
}

/// The mutator keeps within libFuzzer's length limit and changes its input.
#[test]
fn mutations_stay_within_the_length_limit() {
    let mut rng = Rng(1);
    let mut data = vec![0u8; MAX_LEN];
    let other = vec![0xAAu8; MAX_LEN];
    for _ in 0..10_000 {
        mutate(&mut rng, &mut data, &other);
        assert!(!data.is_empty() && data.len() <= MAX_LEN, "{}", data.len());
    }
    assert!(data.iter().any(|&b| b != 0), "nothing changed");
    let mut empty = Vec::new();
    mutate(&mut rng, &mut empty, &[]);
    assert_eq!(empty.len(), 1);
}
