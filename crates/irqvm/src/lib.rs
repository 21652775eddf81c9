//! irqvm: a virtual machine monitor on Linux KVM that runs SMP x86 guests, built so that the
//! whole interrupt architecture can live in userspace.
//!
//! | module | what |
//! |---|---|
//! | [`acpi`] | ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) for booting Linux |
//! | [`kvm`] | opening KVM, creating the VM, ioctls kvm-ioctls lacks |
//! | [`memory`] | guest RAM (vm-memory) and its KVM memory slots |
//! | [`loader`] | multiboot v1, Linux (bzImage, PVH vmlinux), ELF32/ELF64 and raw kernels, boot information |
//! | [`cpuid`] | the CPUID table each vCPU sees |
//! | [`devices`] | serial, isa-debug-exit, fw_cfg, pc-testdev interrupt lines |
//! | [`irqchip`] | the interface to interrupt-controller backends, and the `kernel` backend |
//! | [`userchip`] | the `user` irqchip backend: every interrupt controller in userspace |
//! | [`vcpu`] | the vCPU threads, their run loop and the kick |
//! | [`vm`] | building and running a VM |
//! | [`cli`] | the `irqvm` command line |
//! | [`bench`] | `irqvm bench`: the benchmark suite |

pub mod acpi;
pub mod bench;
pub mod cli;
pub mod cpuid;
pub mod devices;
pub mod irqchip;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod userchip;
pub mod vcpu;
pub mod vm;

/// Directory holding the guest test kernels built by build.rs (`NAME.elf`).
pub const GUESTS_DIR: &str = env!("IRQVM_GUESTS_DIR");
