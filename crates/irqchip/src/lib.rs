//! # irqchip
//!
//! A pure model of the x86 interrupt fabric of a PC: the local APIC (xAPIC and x2APIC, timer,
//! IPIs), the multiprocessor start-up protocol (INIT/SIPI), lock-free posting of interrupts between
//! threads, the IOAPIC, the dual 8259 PIC and GSI/MSI routing.
//!
//! The crate owns no threads, reads no host clock and has no dependency on KVM: a virtual machine
//! monitor drives it. Register accesses go in, effects come out as values (an ICR write returns the
//! IPI to route, an EOI returns the EOI message for the IOAPIC), and time is passed in by the
//! caller. See `docs/architecture.md` in the repository for the whole design.
#![forbid(unsafe_code)]

pub mod bus;
pub mod chip;
pub mod ioapic;
pub mod lapic;
pub mod mpstate;
pub mod msi;
pub mod pic;
pub mod posting;
pub mod routing;
pub mod snapshot;
pub mod sync;
pub mod topology;
pub mod types;
pub mod vcpu;

pub use types::*;
