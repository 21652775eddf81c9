//! Snapshots of a running VM, in any irqchip mode, restorable into any irqchip mode
//! (docs/architecture.md, "Snapshots").
//!
//! | module | what |
//! |---|---|
//! | [`format`](mod@format) | the directory (`memory`, `state.json`), its types, the checks before restore |
//! | [`cpu`] | one vCPU's processor state: read at a safe point, written in KVM's order |
//! | [`xstate`] | a vCPU's XSAVE area (x87, SSE, AVX, ...): read, written, checked against this host |
//! | [`model`](mod@model) | the CPU model and CPUID tables the guest saw, and the checks a restore makes of them |
//! | [`platform`] | `kernel` mode's in-kernel PICs and IOAPIC as the model's devices |
//! | [`memory`] | guest RAM to the file, and back as a private mapping of it |
//! | [`source`] | what a save needs of a VM beside the control API's handle |
//! | [`take`] | the whole save: pause, every vCPU, the platform, the devices, the files |
//! | [`restore`] | the checks before a restore, and the order state is applied in |
//! | [`convert`] | the one conversion between the model's state and KVM's formats |

pub mod convert;
pub mod cpu;
pub mod format;
pub mod memory;
pub mod model;
pub mod platform;
pub mod restore;
pub mod source;
pub mod take;
pub mod xstate;

pub use format::{load, LoadedSnapshot, SnapshotError, SnapshotState};
