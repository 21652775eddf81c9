//! Per-vCPU counters of the `user` backend for the control API's `vm.counters`: relaxed
//! increments by the vCPU's own thread on paths that already make a syscall or an ioctl
//! (injection, NMI, halt), so they add no measurable cost.

use std::sync::atomic::{AtomicU64, Ordering};

/// What one vCPU's half of the backend did.
#[derive(Debug)]
pub struct VcpuCounters {
    /// Injections (KVM_INTERRUPT or synced events), by vector (APIC vectors and PIC ExtINT vectors alike).
    injected: [AtomicU64; 256],
    /// Of the injections, those made through `kvm_run`'s synced events (no KVM_INTERRUPT).
    pub synced_injections: AtomicU64,
    /// SIPIs whose CS and RIP went in through `kvm_run`'s synced registers, without
    /// KVM_SET_SREGS and KVM_SET_REGS (`reset::stage_sipi`).
    pub synced_sipis: AtomicU64,
    /// Guest changes of IA32_APIC_BASE that went into KVM's copy through `kvm_run`'s synced
    /// system registers, without KVM_SET_MSRS (`reset::stage_apic_base`).
    pub synced_apic_bases: AtomicU64,
    /// KVM_NMI injections.
    pub nmis_injected: AtomicU64,
    /// SMIs from this vCPU's own LVT (LINT0/LINT1 in delivery mode SMI) dropped: `user` mode
    /// offers no SMM (the model's `ApicSystemConfig::smm`). SMI messages (ICR, IOAPIC, MSI)
    /// are refused by the bus instead (`irqchip.smis_refused`).
    pub smis_dropped: AtomicU64,
    /// HLT exits that ended the halt at once because KVM still held an NMI irqvm had handed it
    /// (`percpu::end_halt_for_nmi_in_kvm`).
    pub halts_for_kvm_nmi: AtomicU64,
    /// Halts that ended while polling, with no sleep.
    pub halt_polls_ok: AtomicU64,
    /// Halts that polled in vain and slept on the doorbell.
    pub halt_sleeps: AtomicU64,
    /// Instructions single-stepped towards an interrupt boundary (`backend::step`).
    pub single_steps: AtomicU64,
    /// Handlers of injected interrupts run to their return with an execute breakpoint instead
    /// of being stepped (`backend::step`, `Stepper::run_to_return`).
    pub return_runs: AtomicU64,
    /// IF-clear stretches run to where they can end with execute breakpoints instead of being
    /// stepped (`backend::stretch`).
    pub stretch_runs: AtomicU64,
    /// Injections at a handler's return breakpoint that kept it armed for the new handler
    /// (`Stepper::end_for_injection`).
    pub kept_breakpoints: AtomicU64,
    /// Handlers whose way out (register restores, IRETQ) irqvm ran itself to inject a waiting
    /// interrupt at their return, with no run of the guest to a breakpoint (`backend::epilogue`,
    /// `Stepper::finish_return`).
    pub finished_returns: AtomicU64,
    /// Stepping episodes that gave up (budget spent, or the guest's own TF, DR7 breakpoints).
    pub step_fallbacks: AtomicU64,
    /// sched_yields after an IPI of this vCPU woke a sleeping vCPU (`percpu`, `yield_to_woken`).
    pub wake_yields: AtomicU64,
    /// Runs entered with the guest's PV EOI flag set (`pv_eoi`).
    pub pv_eoi_arms: AtomicU64,
    /// EOIs the guest made by clearing that flag, without an exit.
    pub pv_eois: AtomicU64,
}

impl Default for VcpuCounters {
    fn default() -> Self {
        Self {
            injected: std::array::from_fn(|_| AtomicU64::new(0)),
            synced_injections: AtomicU64::new(0),
            synced_sipis: AtomicU64::new(0),
            synced_apic_bases: AtomicU64::new(0),
            nmis_injected: AtomicU64::new(0),
            smis_dropped: AtomicU64::new(0),
            halt_polls_ok: AtomicU64::new(0),
            halt_sleeps: AtomicU64::new(0),
            halts_for_kvm_nmi: AtomicU64::new(0),
            single_steps: AtomicU64::new(0),
            step_fallbacks: AtomicU64::new(0),
            return_runs: AtomicU64::new(0),
            stretch_runs: AtomicU64::new(0),
            kept_breakpoints: AtomicU64::new(0),
            finished_returns: AtomicU64::new(0),
            wake_yields: AtomicU64::new(0),
            pv_eoi_arms: AtomicU64::new(0),
            pv_eois: AtomicU64::new(0),
        }
    }
}

/// One relaxed increment.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl VcpuCounters {
    pub fn injected(&self, vector: u8) {
        bump(&self.injected[usize::from(vector)]);
    }

    /// Every counter by name; vectors only where non-zero (`injected_vector_0x30`).
    pub fn visit(&self, out: &mut dyn FnMut(&str, u64)) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out("nmis_injected", get(&self.nmis_injected));
        out("smis_dropped", get(&self.smis_dropped));
        out("synced_injections", get(&self.synced_injections));
        out("synced_sipis", get(&self.synced_sipis));
        out("synced_apic_bases", get(&self.synced_apic_bases));
        out("halt_polls_ok", get(&self.halt_polls_ok));
        out("halt_sleeps", get(&self.halt_sleeps));
        out("halts_for_kvm_nmi", get(&self.halts_for_kvm_nmi));
        out("single_steps", get(&self.single_steps));
        out("step_fallbacks", get(&self.step_fallbacks));
        out("return_runs", get(&self.return_runs));
        out("stretch_runs", get(&self.stretch_runs));
        out("kept_breakpoints", get(&self.kept_breakpoints));
        out("finished_returns", get(&self.finished_returns));
        out("wake_yields", get(&self.wake_yields));
        out("pv_eoi_arms", get(&self.pv_eoi_arms));
        out("pv_eois", get(&self.pv_eois));
        let mut total = 0;
        for (vector, count) in self.injected.iter().enumerate() {
            let n = get(count);
            if n > 0 {
                out(&format!("injected_vector_{vector:#04x}"), n);
                total += n;
            }
        }
        out("interrupts_injected", total);
    }
}
