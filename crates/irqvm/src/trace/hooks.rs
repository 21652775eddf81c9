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

/// An EOI of `vector` reaches the IOAPIC (remote IRR of its entries clears), joined with the
/// post that set it.
#[inline]
pub fn ioapic_eoi(tracer: &Tracer, vector: u8) {
    if tracer.on() {
        let id = tracer.take_remote_irr(vector);
        let event = Event::new(tracer.now(), Kind::RemoteIrr, usize::MAX)
            .vector(vector)
            .id(id);
        tracer.record(event);
    }
}

/// A guest write of `data` to the IOAPIC's EOI register (version 0x20, a directed EOI; the
/// caller has checked the offset): the EOI of the written vector, its low byte, reaches the
/// IOAPIC, as [`ioapic_eoi`] records it.
#[inline]
pub fn ioapic_eoi_register(tracer: &Tracer, data: &[u8]) {
    if let Some(&vector) = data.first() {
        ioapic_eoi(tracer, vector);
    }
}

/// A device (or the control API) drives GSI `gsi` to `level`: recorded before the change
/// reaches the chip, so it precedes the posts it causes.
#[inline]
pub fn line(tracer: &Tracer, gsi: u32, level: bool) {
    if tracer.on() {
        let event = Event::new(tracer.now(), Kind::Line, usize::MAX)
            .vector(u8::try_from(gsi).unwrap_or(u8::MAX))
            .arg(u64::from(level));
        tracer.record(event);
    }
}

/// A message posted without a target irqvm knows, at `at` ([`stamp`] before it was sent),
/// attributed to the thread's [`posting_for`] source (or `source`); `reached`: whether a local
/// APIC took it. `split` mode: each message handed to KVM's LAPICs with KVM_SIGNAL_MSI (the
/// IOAPIC's, host MSIs), where KVM chooses the target and injects unseen, so the post has no
/// target and no injection. `user` mode: a host MSI that the APIC bus delivered to nobody.
#[inline]
pub fn untargeted_post(
    tracer: &Tracer,
    at: Option<u64>,
    message: &irqchip::InterruptMessage,
    source: Option<Source>,
    reached: bool,
) {
    if let Some(at) = at.filter(|_| tracer.on()) {
        let source = source.unwrap_or_else(super::posting_source);
        let mut arg = super::PostArg::of(message);
        if !reached {
            arg = arg.undelivered();
        }
        tracer.post(at, usize::MAX, message.vector, source, arg);
    }
}

/// An OCW2 (a guest write of `port`, `value`) on the PIC, through `write`, which returns the
/// ISA IRQs the write took out of service; their EOIs are recorded, joined with their INTA.
/// With recording off `plain` does the write.
#[inline]
pub fn pic_write(tracer: &Tracer, write: impl FnOnce() -> u16, plain: impl FnOnce()) {
    if tracer.on() {
        let ended = write();
        if ended != 0 {
            tracer.pic_eoi(ended);
        }
    } else {
        plain();
    }
}
