//! What a poster does with the [`Notify`] the posting protocol returns (seed 001): `Kick` forces
//! the target out of KVM_RUN (real-time signal + `immediate_exit`, see `crate::kick`), `Wake`
//! rings the doorbell the blocked target sleeps on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use irqchip::vcpu::VmBus;
use irqchip::{Notify, VcpuIndex};

use crate::backend::VcpuKicker;

/// Kick targets and inboxes of every vCPU of a VM.
pub struct Notifier {
    kicker: Arc<dyn VcpuKicker>,
    bus: Arc<VmBus>,
    /// Per target: posts that asked for a kick, for a doorbell wake-up (relaxed counts for the
    /// control API; each sits beside a signal or a futex wake, which cost far more).
    kicks: Vec<AtomicU64>,
    wakes: Vec<AtomicU64>,
    tracer: Arc<crate::trace::Tracer>,
}

impl Notifier {
    pub fn new(
        kicker: Arc<dyn VcpuKicker>,
        bus: Arc<VmBus>,
        tracer: Arc<crate::trace::Tracer>,
    ) -> Self {
        let counts = || (0..kicker.vcpus()).map(|_| AtomicU64::new(0)).collect();
        Self {
            kicks: counts(),
            wakes: counts(),
            kicker,
            bus,
            tracer,
        }
    }

    /// The notification counts per vCPU.
    pub fn visit(&self, out: &mut dyn FnMut(usize, &str, u64)) {
        for (i, (k, w)) in self.kicks.iter().zip(&self.wakes).enumerate() {
            out(i, "post_kicks", k.load(Ordering::Relaxed));
            out(i, "post_wakes", w.load(Ordering::Relaxed));
        }
    }

    fn count(counts: &[AtomicU64], target: VcpuIndex) {
        if let Some(c) = counts.get(target) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Acts on the result of a post to vCPU `target`.
    pub fn notify(&self, target: VcpuIndex, how: Notify) {
        match how {
            Notify::None => {}
            Notify::Kick => {
                Self::count(&self.kicks, target);
                crate::trace::hooks::notified(&self.tracer, target, true);
                self.kicker.kick(target);
            }
            Notify::Wake => {
                Self::count(&self.wakes, target);
                crate::trace::hooks::notified(&self.tracer, target, false);
                self.ring(target);
            }
        }
    }

    /// Rings vCPU `target`'s doorbell (latched: a ring before it sleeps makes the sleep return).
    pub fn ring(&self, target: VcpuIndex) {
        if let Some(inbox) = self.bus.sink(target) {
            inbox.ring_doorbell();
        }
    }

    /// Asks vCPU `target` to re-evaluate its local state (its APIC timer expired).
    pub fn wake(&self, target: VcpuIndex) {
        if let Some(inbox) = self.bus.sink(target) {
            let how = inbox.post_wakeup();
            self.notify(target, how);
        }
    }
}
