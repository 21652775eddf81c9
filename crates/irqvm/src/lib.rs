//! irqvm: a virtual machine monitor on Linux KVM.
pub mod kvm;
pub mod loader;
pub mod memory;
