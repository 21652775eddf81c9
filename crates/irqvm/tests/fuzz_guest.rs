//! The hostile-guest fuzzer (guests/fuzz.c) on a short budget of seeds in every irqchip mode, on
//! 2 and 4 vCPUs (seed 1 on 1, 2 and 4 vCPUs runs with the other guests, in guests_*.rs). Each
//! run is under `irqvm::fuzzguest`'s watchdog: the VMM must not fail, hang or spin, the guest's
//! heartbeat CPU must get through every operation, and the guest must end the VM itself.
//! `irqvm fuzz-guest --seconds N` runs the same for longer.

#[macro_use]
mod common;

use std::time::Duration;

use irqvm::fuzzguest::{run_once, FuzzRun};
use irqvm::IrqchipMode;

/// The seeds CI runs (besides seed 1), and their operations per vCPU.
const SEEDS: [u64; 2] = [2, 3];
const OPS: u32 = 400;
/// The wall-clock bound of one run.
const TIMEOUT: Duration = Duration::from_secs(30);

fn fuzz(mode: IrqchipMode) {
    let _one = common::exclusive();
    for seed in SEEDS {
        for cpus in [2, 4] {
            let run = FuzzRun {
                seed,
                mode,
                cpus,
                ops: OPS,
            };
            if let Err((failure, output)) = run_once(&run, TIMEOUT) {
                panic!(
                    "seed {seed}, {mode:?}, {cpus} vCPU(s): {failure}\n{output}\nreplay: {}",
                    run.replay_command()
                );
            }
        }
    }
}

#[test]
fn fuzz_seeds_in_user_mode() {
    fuzz(IrqchipMode::User);
}

#[test]
fn fuzz_seeds_in_split_mode() {
    fuzz(IrqchipMode::Split);
}

#[test]
fn fuzz_seeds_in_kernel_mode() {
    fuzz(IrqchipMode::Kernel);
}
