//! # irqchip
//!
//! A pure model of the x86 interrupt fabric of a PC: the local APIC (xAPIC and x2APIC, timer,
//! IPIs), the multiprocessor start-up protocol (INIT/SIPI), lock-free posting of interrupts between
//! threads, the IOAPIC, the dual 8259 PIC and GSI/MSI routing.
//!
//! The crate owns no threads, reads no host clock and has no dependency on KVM: a virtual machine
//! monitor drives it. Register accesses go in, effects come out as values (an ICR write returns the
//! IPI to route, an EOI returns the EOI message for the IOAPIC), and time is passed in by the
//! caller. KVM's paravirtual EOI is modelled too: the VMM keeps the guest's flag in guest memory
//! and asks [`vcpu::VcpuInterrupts::arm_paravirtual_eoi`] before each entry whether it may set it.
//! See `docs/architecture.md` in the repository for the whole design. Where these docs cite
//! "seed NNN", they mean one of the five upstream Linux KVM commits whose behaviour the crate
//! reproduces; `docs/architecture.md` ("Seeds") names each by its title.
//!
//! # Embedding it
//!
//! [`chip::PcIrqChip`] is the whole PC: it owns the 8259 pair, the IOAPIC and the GSI routing,
//! and hands out one [`vcpu::VcpuInterrupts`] per vCPU for that vCPU's thread to own. Every call
//! that can post an interrupt takes a `notify` callback, through which the chip asks the VMM to
//! kick a vCPU out of guest mode or wake a halted one ([`Notify`]); the chip never blocks or
//! signals anything itself. Here a PCI device raises its level-triggered line (GSI 16) while
//! vCPU 0 runs the guest; the vCPU takes the vector, and its EOI reaches the IOAPIC:
//!
//! ```
//! # #[cfg(feature = "loom")] loom::model(example);
//! # #[cfg(not(feature = "loom"))] example();
//! # fn example() {
//! use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
//! use irqchip::routing::SourceId;
//! use irqchip::vcpu::{ApicAccessResult, Injection};
//! use irqchip::{EoiMessage, Notify};
//!
//! let (chip, mut vcpus) = PcIrqChip::new(PcIrqChipConfig::new(2));
//! let mut kicks = Vec::new();
//! let now = 0; // the VMM's clock, in ns; only the APIC timer reads it
//!
//! // The guest on vCPU 0 software-enables its local APIC (SVR at offset 0xF0 of the xAPIC page)
//! // and programs IOAPIC pin 16 through IOREGSEL (0x00) and IOWIN (0x10): vector 0x41, fixed,
//! // physical destination APIC ID 0, level-triggered, active low (82093AA §3.2.4).
//! vcpus[0].mmio_write(0xF0, &0x1FFu32.to_le_bytes(), now, &mut |_, _| {});
//! let mut ioapic_write = |index: u32, value: u32| {
//!     chip.ioapic_mmio_write(0x00, &index.to_le_bytes(), &mut |_, _| {});
//!     chip.ioapic_mmio_write(0x10, &value.to_le_bytes(), &mut |_, _| {});
//! };
//! ioapic_write(0x10 + 2 * 16 + 1, 0 << 24); // destination, high dword
//! ioapic_write(0x10 + 2 * 16, 0x41 | 1 << 13 | 1 << 15); // low dword, unmasked
//!
//! // vCPU 0's thread is about to enter KVM_RUN: it publishes "in guest" and drains its inbox.
//! vcpus[0].begin_guest_entry();
//!
//! // A device thread asserts GSI 16. The vCPU is in guest mode, so the chip asks for a kick.
//! chip.set_gsi(16, SourceId(1), true, &mut |vcpu, how| kicks.push((vcpu, how)))
//!     .unwrap();
//! assert_eq!(kicks, [(0, Notify::Kick)]);
//!
//! // The kicked vCPU leaves the guest, re-enters, and injects what its APIC has.
//! vcpus[0].end_guest_entry();
//! vcpus[0].begin_guest_entry();
//! assert_eq!(vcpus[0].next_injection(chip.pic_intr()), Some(Injection::Vector(0x41)));
//! assert_eq!(vcpus[0].acknowledge_interrupt(), Some(0x41)); // IRR -> ISR
//! assert!(chip.save_devices().ioapic.entry(16).unwrap().remote_irr());
//!
//! // The handler quiets the device, then writes EOI (0xB0). The vector was level-triggered,
//! // so the EOI goes to the IOAPIC, which clears the pin's remote IRR (bit 14).
//! chip.set_gsi(16, SourceId(1), false, &mut |_, _| {}).unwrap();
//! let eoi = vcpus[0].mmio_write(0xB0, &0u32.to_le_bytes(), now, &mut |_, _| {});
//! assert_eq!(eoi, ApicAccessResult::Eoi(EoiMessage { vector: 0x41 }));
//! if let ApicAccessResult::Eoi(message) = eoi {
//!     chip.eoi(message, &mut |vcpu, how| kicks.push((vcpu, how)));
//! }
//! let pin = chip.save_devices().ioapic.entry(16).unwrap();
//! assert!(!pin.remote_irr());
//! assert!(vcpus[0].lapic().isr().is_empty());
//! assert_eq!(vcpus[0].next_injection(chip.pic_intr()), None);
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

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
pub mod wake;

pub use types::*;
