//! What a poster does with the [`Notify`] the posting protocol returns (seed 001): `Kick` forces
//! the target out of KVM_RUN (real-time signal + `immediate_exit`, see `crate::kick`), `Wake`
//! rings the doorbell the blocked target sleeps on.

use std::sync::Arc;

use irqchip::vcpu::VmBus;
use irqchip::{Notify, VcpuIndex};

use crate::backend::VcpuKicker;

/// Kick targets and inboxes of every vCPU of a VM.
pub struct Notifier {
    kicker: Arc<dyn VcpuKicker>,
    bus: Arc<VmBus>,
}

impl Notifier {
    pub fn new(kicker: Arc<dyn VcpuKicker>, bus: Arc<VmBus>) -> Self {
        Self { kicker, bus }
    }

    /// Acts on the result of a post to vCPU `target`.
    pub fn notify(&self, target: VcpuIndex, how: Notify) {
        match how {
            Notify::None => {}
            Notify::Kick => self.kicker.kick(target),
            Notify::Wake => self.ring(target),
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
