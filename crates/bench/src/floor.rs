//! The measured floor of `user` mode against `kernel` mode (issue 14): how slow `user` must be,
//! at the least, on this host, given the exits it cannot avoid.
//!
//! Without APIC virtualisation every APIC access of the guest traps to the hypervisor in every
//! mode (`summary::FLOORS`). `kernel` mode emulates it inside KVM; `user` mode must emulate it in
//! userspace, so each such access costs `user` one return from KVM_RUN and one new KVM_RUN more:
//! a userspace round trip. Its price is measured in the same run by the `apic_write` workload
//! (one EOI write, interrupts off): `user`'s median minus `kernel`'s. The `port_read` workload
//! (an exit to userspace in both modes) shows the same round trip from the other side.
//!
//! A workload's floor is `kernel`'s median plus, per sample, the round trips `user` takes on the
//! timed path that `kernel` takes inside KVM, each at that price ([`round_trips`]). A wake-up of
//! a halted vCPU counts as one: `user`'s vCPU thread returns from its futex and enters KVM_RUN
//! again, where `kernel`'s is woken inside KVM_RUN. Where more vCPU threads are busy than the host
//! has CPUs, the accesses of different vCPUs no longer overlap, and the count says how it
//! composes. A `user` median at or below its floor has nothing left that the architecture does
//! not force; above it, the ratio says how much is irqvm's own.

use irqvm::IrqchipMode;

use crate::report::us;
use crate::runner::Peer;
use crate::summary::{Summary, Table, WORKLOADS};

impl Summary<'_> {
    /// The floor table: per workload `kernel`'s median, the round trips, the floor and `user`'s
    /// median against it. Empty unless the run has both modes and `apic_write` in both.
    pub fn floor_table(&self, host_cpus: u32) -> Table {
        let kernel = Peer::Irqvm(IrqchipMode::Kernel);
        let user = Peer::Irqvm(IrqchipMode::User);
        let median = |w: &str, p: Peer| self.cells.get(w)?.get(&p)?.median();
        let price = match (median("apic_write", user), median("apic_write", kernel)) {
            (Some(u), Some(k)) => u - k,
            _ => return (String::new(), Vec::new(), Vec::new()),
        };
        let mut rows = Vec::new();
        for (name, _) in WORKLOADS {
            let (Some(k), Some(u)) = (median(name, kernel), median(name, user)) else {
                continue;
            };
            let Some((trips, which)) = round_trips(name, host_cpus) else {
                continue;
            };
            let floor = k + trips * price;
            rows.push(vec![
                name.to_string(),
                us(k),
                format!("{trips:.0} ({which})"),
                us(floor),
                us(u),
                format!("×{:.2}", u / floor),
            ]);
        }
        let header = [
            "workload",
            "irqvm-kernel",
            "userspace round trips on the timed path",
            "floor of irqvm-user",
            "irqvm-user",
            "user / floor",
        ];
        (
            format!(
                "The measured floor of `user` against `kernel`: median µs; a userspace round trip costs {} µs here (`apic_write`, `user` minus `kernel`); floor = `kernel` + round trips × that",
                us(price)
            ),
            header.iter().map(|h| h.to_string()).collect(),
            rows,
        )
    }
}

/// The userspace round trips `user` mode takes per sample of `workload` on its timed path that
/// `kernel` mode takes inside KVM, on a host with `host_cpus` CPUs, with which they are. `None`
/// for a workload without such a count.
pub fn round_trips(workload: &str, host_cpus: u32) -> Option<(f64, String)> {
    let fixed = |n: f64, what: &str| Some((n, what.to_string()));
    match workload {
        "selfipi" => fixed(4.0, "ICR2, ICR, ICR busy read, EOI"),
        "selfipi_tpr" => fixed(6.0, "TPR, ICR2, ICR, ICR read, TPR, EOI"),
        "irq_guest" | "irq_level" => fixed(
            0.0,
            "none: the port write exits to userspace in both modes, the handler stamps before its EOI",
        ),
        "timer_oneshot" => fixed(2.0, "the TMICT write (the count starts at it), the wake-up"),
        "timer_deadline" | "timer_sleep" => {
            fixed(1.0, "the wake-up (the deadline is absolute)")
        }
        "timer_spin" => fixed(1.0, "the kick out of the running guest"),
        "timer_deadline_expired" => fixed(1.0, "the WRMSR (the timer fires at it)"),
        "ipi_halted" => fixed(8.0, "per side: ICR2, ICR, the target's wake-up, its EOI"),
        "ipi_spin" => fixed(8.0, "per side: ICR2, ICR, the target's kick, its EOI"),
        "ipi_halted_pveoi" => fixed(
            6.0,
            "per side: ICR2, ICR, the target's wake-up (its EOI clears a flag in memory)",
        ),
        "irq_host" | "irq_host_msi" => fixed(
            1.0,
            "the previous handler's EOI (the host pulses when it sees the count, before that EOI; the handler's way out to its IRETQ then runs in irqvm)",
        ),
        "apic_read" | "apic_write" => fixed(1.0, "the access"),
        "port_read" => fixed(0.0, "none: userspace's in both modes"),
        _ => multi_vcpu(workload, host_cpus),
    }
}

/// The storms and broadcasts, whose vCPUs share the host's CPUs.
fn multi_vcpu(workload: &str, host_cpus: u32) -> Option<(f64, String)> {
    let cores = host_cpus.max(1);
    if let Some(n) = vcpus(workload, "ipi_storm_") {
        if n <= cores {
            return Some((
                3.0,
                "ICR2, ICR, CPU 0's wake-up or kick (its EOI overlaps the next send)".into(),
            ));
        }
        // CPU 0 takes every interrupt: its EOI and its wake-up or kick are CPU time that its
        // thread, one of n busy threads, gets `cores / n` of the host for.
        let share = f64::from(n) / f64::from(cores);
        return Some((
            2.0 * share,
            format!("CPU 0's EOI and wake-up or kick, ×{share:.0}: its thread gets 1/{share:.0} of a host CPU"),
        ));
    }
    let n = vcpus(workload, "ipi_broadcast_")?;
    // The APs run `cores` at a time: every wave but the last also takes its EOI and HLT before
    // its host CPU is free for the next wave's wake-up.
    let waves = (n - 1).div_ceil(cores);
    let trips = 2 + 3 * (waves - 1) + 1;
    Some((
        f64::from(trips),
        format!(
            "ICR2, ICR; the APs' wake-ups in {waves} wave{} on {cores} host CPUs, each wave but the last also its EOI and HLT",
            if waves == 1 { "" } else { "s" }
        ),
    ))
}

/// The vCPU count in a workload name such as `ipi_storm_16`.
fn vcpus(workload: &str, prefix: &str) -> Option<u32> {
    workload
        .strip_prefix(prefix)?
        .parse()
        .ok()
        .filter(|n| *n >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_paths_count_their_accesses() {
        assert_eq!(round_trips("ipi_halted", 2).map(|r| r.0), Some(8.0));
        assert_eq!(round_trips("irq_guest", 2).map(|r| r.0), Some(0.0));
        assert_eq!(round_trips("nonsense", 2), None);
    }

    #[test]
    fn storms_beyond_the_host_cpus_scale_with_cpu_0s_share() {
        assert_eq!(round_trips("ipi_storm_2", 2).map(|r| r.0), Some(3.0));
        assert_eq!(round_trips("ipi_storm_16", 2).map(|r| r.0), Some(16.0));
        assert_eq!(round_trips("ipi_storm_16", 16).map(|r| r.0), Some(3.0));
    }

    #[test]
    fn broadcasts_wake_their_aps_in_waves() {
        // 1 AP: ICR2, ICR, its wake-up.
        assert_eq!(round_trips("ipi_broadcast_2", 2).map(|r| r.0), Some(3.0));
        // 15 APs on 2 CPUs: 8 waves.
        assert_eq!(round_trips("ipi_broadcast_16", 2).map(|r| r.0), Some(24.0));
        assert_eq!(round_trips("ipi_broadcast_4", 4).map(|r| r.0), Some(3.0));
    }
}
