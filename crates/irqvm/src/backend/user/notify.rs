//! What a poster does with the [`Notify`] the posting protocol returns (seed 001): `Kick` forces
//! the target out of KVM_RUN (real-time signal + `immediate_exit`, see `crate::kick`), `Wake`
//! rings the doorbell the blocked target sleeps on.
//!
//! The doorbells are `irqchip::wake`'s shared ones on a futex word per 32 vCPUs (issue 14): the
//! notify callback a delivery gets from [`Notifier::batched`] latches each ring as the bus
//! posts and wakes every sleeper it rang with one futex call per group when the delivery is
//! done, so that an IPI to several halted vCPUs is not left half-delivered while the sender's
//! thread loses its core to the first vCPU it woke. Kicks go out at once, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use irqchip::wake::{SharedDoorbells, WakeBatch};
use irqchip::{Notify, VcpuIndex};

use super::futex::Futex;
use crate::backend::VcpuKicker;

/// The doorbells of a VM's vCPUs.
pub type Doorbells = SharedDoorbells<Futex>;

/// Kick targets and inboxes of every vCPU of a VM.
pub struct Notifier {
    kicker: Arc<dyn VcpuKicker>,
    /// The doorbells of the bus's inboxes (each inbox holds a `SharedBell` into them).
    bells: Arc<Doorbells>,
    /// Per target: posts that asked for a kick, for a doorbell wake-up (relaxed counts for the
    /// control API; each sits beside a signal or a futex wake, which cost far more).
    kicks: Vec<AtomicU64>,
    wakes: Vec<AtomicU64>,
    tracer: Arc<crate::trace::Tracer>,
}

impl Notifier {
    pub fn new(
        kicker: Arc<dyn VcpuKicker>,
        bells: Arc<Doorbells>,
        tracer: Arc<crate::trace::Tracer>,
    ) -> Self {
        let counts = || (0..kicker.vcpus()).map(|_| AtomicU64::new(0)).collect();
        Self {
            kicks: counts(),
            wakes: counts(),
            kicker,
            bells,
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

    /// The futex calls of the doorbells (VM-wide: one wake may serve several vCPUs).
    pub fn visit_doorbells(&self, out: &mut dyn FnMut(&str, u64)) {
        self.bells.wake_word().visit(out);
    }

    /// Acts on the result of a post to vCPU `target` (a delivery of one post).
    pub fn notify(&self, target: VcpuIndex, how: Notify) {
        self.notify_into(&mut self.bells.batch(), target, how);
    }

    /// The notify callback for one delivery that may post to several vCPUs (an IPI, an MSI,
    /// an IOAPIC pin): kicks at once; rings at once too, but the futex wakes of the rings that
    /// found their vCPU asleep go out together when the callback is dropped, one per group of
    /// 32 vCPUs (`irqchip::wake`). Drop it as soon as the delivery returns.
    pub fn batched(&self) -> impl FnMut(VcpuIndex, Notify) + '_ {
        let mut batch = self.bells.batch();
        move |target, how| {
            self.notify_into(&mut batch, target, how);
        }
    }

    /// [`Self::batched`] for a delivery made on a vCPU's own thread (its ICR write): also
    /// sets `woke` when a ring found its vCPU asleep, so that the sender can hand its host CPU
    /// to the vCPU it woke once the wakes are out (`percpu`, `yield_to_woken`).
    pub fn batched_noting<'a>(&'a self, woke: &'a mut bool) -> impl FnMut(VcpuIndex, Notify) + 'a {
        let mut batch = self.bells.batch();
        move |target, how| *woke |= self.notify_into(&mut batch, target, how)
    }

    /// True when a ring found `target` asleep (its futex wake goes out with `batch`'s).
    fn notify_into(
        &self,
        batch: &mut WakeBatch<'_, Futex>,
        target: VcpuIndex,
        how: Notify,
    ) -> bool {
        match how {
            Notify::None => false,
            Notify::Kick => {
                Self::count(&self.kicks, target);
                crate::trace::hooks::notified(&self.tracer, target, true);
                self.kicker.kick(target);
                false
            }
            Notify::Wake => {
                Self::count(&self.wakes, target);
                crate::trace::hooks::notified(&self.tracer, target, false);
                batch.ring(target)
            }
        }
    }

    /// Rings vCPU `target`'s doorbell (latched: a ring before it sleeps makes the sleep return).
    pub fn ring(&self, target: VcpuIndex) {
        self.bells.ring(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::user::futex::tests::asleep_in_the_kernel;

    /// Counts kicks instead of signalling threads.
    struct Kicks(AtomicU64);

    impl VcpuKicker for Kicks {
        fn vcpus(&self) -> usize {
            3
        }
        fn kick(&self, _: usize) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `batched_noting` reports a ring that found its vCPU asleep (and wakes it), and nothing
    /// for a vCPU that is awake or is kicked: only the first makes the sender yield.
    #[test]
    fn batched_noting_reports_only_rings_that_found_a_sleeper() {
        let bells = Arc::new(Doorbells::new(3, Futex::default()));
        let tracer = Arc::new(crate::trace::Tracer::new(
            3,
            std::time::Instant::now(),
            "user",
        ));
        let kicker = Arc::new(Kicks(AtomicU64::new(0)));
        let notifier = Notifier::new(kicker.clone(), bells.clone(), tracer);
        let deliver = |posts: &[(VcpuIndex, Notify)]| {
            let mut woke = false;
            let mut notify = notifier.batched_noting(&mut woke);
            for &(target, how) in posts {
                notify(target, how);
            }
            drop(notify);
            woke
        };
        assert!(!deliver(&[(0, Notify::Kick), (1, Notify::None)]));
        assert!(
            !deliver(&[(1, Notify::Wake)]),
            "vCPU 1 is awake: its ring is latched"
        );
        let sleeper = asleep_in_the_kernel(&bells, 2..3);
        assert!(deliver(&[(0, Notify::Kick), (2, Notify::Wake)]));
        sleeper.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(kicker.0.load(Ordering::Relaxed), 2);
    }
}
