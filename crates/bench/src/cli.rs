//! The `irqvm-bench` command line.

use std::path::PathBuf;

use irqvm::IrqchipMode;

/// `irqvm-bench` arguments.
#[derive(Debug, clap::Parser)]
#[command(
    name = "irqvm-bench",
    version,
    about = "Benchmark irqvm's interrupt delivery in every irqchip mode and under QEMU (same guests)",
    long_about = "Benchmark irqvm's interrupt delivery in every irqchip mode and under QEMU (same \
                  guests); prints a table of ratios against the fastest peer and writes JSON. \
                  The exit status is 1 if any workload did not complete or did not count what it \
                  sent, 2 on an error of the harness."
)]
pub struct Args {
    /// A short run for CI: fewer iterations, one repeat, 1-2 vCPUs; QEMU is skipped if absent.
    #[arg(long)]
    pub quick: bool,
    /// Repeats of every run (default 3, 1 with --quick).
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
    /// Where the machine-readable results go.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "target/irqvm-bench/results.json"
    )]
    pub json: PathBuf,
    /// Also write DIR/benchmarks.md (its generated section) and the plots in DIR/bench/.
    #[arg(long, value_name = "DIR")]
    pub docs: Option<PathBuf>,
    /// Compare the irqvm modes only.
    #[arg(long)]
    pub no_qemu: bool,
    /// Also time AP bring-up (`boot`) at 64, 255 and 1024 vCPUs: one repeat of each, QEMU/KVM
    /// up to the 288 vCPUs its q35 machine accepts, QEMU/TCG up to 255. 5-20 minutes here.
    #[arg(long)]
    pub large: bool,
    /// Run the AP bring-up workload (`boot`) only, at 1-16 vCPUs and with --large also at the
    /// large counts, all in one invocation (docs: its own generated section and plots).
    #[arg(long)]
    pub boot_only: bool,
    /// Internal: run one benchmark VM in this process (the parent's child).
    #[arg(long, hide = true, value_name = "KERNEL")]
    pub vm_child: Option<PathBuf>,
    #[arg(long, hide = true, default_value_t = 1)]
    pub child_cpus: u32,
    /// Seconds the child's VM may run (the parent's timeout for the run).
    #[arg(long, hide = true, default_value_t = 120)]
    pub child_timeout: u64,
    #[arg(long, hide = true, value_enum, default_value_t = IrqchipMode::Kernel)]
    pub child_irqchip: IrqchipMode,
    #[arg(long, hide = true, default_value = "")]
    pub child_cmdline: String,
    #[arg(long, hide = true)]
    pub child_host_driver: bool,
    /// Internal, for A/B runs: the child's VM with `--exact-irq-boundaries off` (what exact
    /// boundaries cost, docs/benchmarks.md).
    #[arg(long, hide = true)]
    pub child_inexact_boundaries: bool,
    #[arg(long, hide = true, default_value_t = 200)]
    pub child_pulses: u32,
    #[arg(
        long,
        hide = true,
        value_delimiter = ',',
        default_value = "1000,4000,16000"
    )]
    pub child_rates: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }
}
