//! The one-line calls the vCPU loop and the backends make. Each starts with [`Tracer::on`]: with
//! recording off it is one relaxed load and an untaken branch.

use super::{Event, ExitReason, Kind, Source, Tracer};
use crate::backend::BlockReason;
use crate::vcpu::report::LastExit;

/// The time now if recording (for an event whose details come later).
#[inline]
pub fn stamp(tracer: &Tracer) -> Option<u64> {
    tracer.on().then(|| tracer.now())
}

/// vCPU `index` enters the guest.
#[inline]
pub fn entry(tracer: &Tracer, index: usize) {
    if tracer.on() {
        tracer.record(Event::new(tracer.now(), Kind::Entry, index));
    }
}

/// vCPU `index` left the guest at `at` ([`stamp`] right after KVM_RUN returned) for `exit`.
#[inline]
pub fn exit(tracer: &Tracer, index: usize, at: Option<u64>, exit: &LastExit) {
    if let Some(at) = at.filter(|_| tracer.on()) {
        let (reason, detail) = ExitReason::of(exit);
        let event = Event::new(at, Kind::Exit, index)
            .arg(reason as u64)
            .id(detail);
        tracer.record(event);
    }
}

/// vCPU `index` blocks for `reason`, or (`None`) returns from its block.
#[inline]
pub fn block(tracer: &Tracer, index: usize, reason: Option<BlockReason>) {
    if tracer.on() {
        let event = match reason {
            None => Event::new(tracer.now(), Kind::Unblock, index),
            Some(r) => Event::new(tracer.now(), Kind::Block, index).arg(match r {
                BlockReason::Halted => 1,
                BlockReason::WaitForSipi => 2,
                BlockReason::ApResetHold => 3,
            }),
        };
        tracer.record(event);
    }
}

/// A poster's kick (`kick`) or doorbell ring of `target`.
#[inline]
pub fn notified(tracer: &Tracer, target: usize, kick: bool) {
    if tracer.on() {
        tracer.notified(target, kick);
    }
}

/// Runs `f` (a device line change, an MSI, an EOI reaching the IOAPIC) with its posts
/// attributed to `source`.
#[inline]
pub fn posting_for<R>(tracer: &Tracer, source: Source, f: impl FnOnce() -> R) -> R {
    if tracer.on() {
        super::posting_for(source, f)
    } else {
        f()
    }
}

/// An EOI of `vector` reaches the IOAPIC (remote IRR of its entries clears).
#[inline]
pub fn ioapic_eoi(tracer: &Tracer, vector: u8) {
    if tracer.on() {
        let event = Event::new(tracer.now(), Kind::RemoteIrr, usize::MAX)
            .vector(vector)
            .arg(0);
        tracer.record(event);
    }
}
