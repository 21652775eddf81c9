//! irqvm: a virtual machine monitor on Linux KVM that runs SMP x86 guests, built so that the
//! whole interrupt architecture can live in userspace.
//!
//! | module | what |
//! |---|---|
//! | [`acpi`] | ACPI tables (RSDP, XSDT and RSDT, FADT, MADT, DSDT) for booting Linux |
//! | [`kvm`] | opening KVM, creating the VM, ioctls kvm-ioctls lacks |
//! | [`memory`] | guest RAM (vm-memory) and its KVM memory slots |
//! | [`loader`] | multiboot v1, Linux (bzImage, PVH vmlinux), ELF32/ELF64 and raw kernels, boot information |
//! | [`cpuid`] | the CPUID table each vCPU sees |
//! | [`cpumodel`] | vCPU count, `--topology` (APIC IDs) and `--cpu-features`, checked per mode |
//! | [`iobus`] | the port-I/O and MMIO bus exits reach devices through (rust-vmm `vm-device`) |
//! | [`devices`] | serial, isa-debug-exit, fw_cfg, pc-testdev interrupt lines, on the bus |
//! | [`cmos`], [`i8042`] | the CMOS RTC and the keyboard controller Linux expects on a PC |
//! | [`mode`] | [`IrqchipMode`]: which interrupt controllers run where |
//! | [`backend`] | the interrupt-controller interface and its three backends, `kernel`, `split`, `user` |
//! | [`kick`] | forcing a vCPU thread out of KVM_RUN, race-free |
//! | [`flush_signal`] | a KVM_RUN that passes KVM's loop without entering the guest |
//! | [`kvm_stats`] | `--kvm-stats`: KVM's binary statistics of the VM fd and the vCPU fds, as `name=value` lines |
//! | [`vcpu`] | the vCPU threads and their run loop |
//! | [`snapshot`] | snapshots; the conversion between the model's state and KVM's |
//! | [`migrate`] | live migration to another irqvm over a Unix socket (dirty-log pre-copy, the snapshot state) |
//! | [`emulate`] | finishing instructions this host's KVM emulator gives up on (`int3`, `int n`, `fwait`), and the SYSCALL watch |
//! | [`guest_debug`] | the one caller of KVM_SET_GUEST_DEBUG (the stepper and the SYSCALL watch) |
//! | [`vm`] | building and running a VM (and choosing the backend) |
//! | [`seccomp`] | the per-thread seccomp filters (least privilege) |
//! | [`api`] | the control API over a Unix socket (`--api-sock`) |
//! | [`trace`] | the interrupt flight recorder (`--trace`, Chrome Trace Event JSON) and latency histograms |
//! | [`ratelimit`] | rate-limited warnings for what a guest can trigger at will |
//! | [`fuzzguest`] | `irqvm fuzz-guest`: the hostile-guest fuzzer, seed after seed, under a watchdog |
//! | [`cli`] | the `irqvm` command line |

pub mod acpi;
pub mod api;
pub mod backend;
pub mod cli;
pub mod cmos;
pub mod cpuid;
pub mod cpumodel;
pub mod devices;
pub mod diffguest;
pub mod emulate;
pub mod flush_signal;
pub mod fuzzguest;
pub mod guest_debug;
pub mod i8042;
pub mod iobus;
pub mod kick;
pub mod kvm;
pub mod kvm_stats;
pub mod loader;
pub mod memory;
pub mod migrate;
pub mod mode;
pub mod ratelimit;
pub mod seccomp;
pub mod snapshot;
pub mod trace;
pub mod vcpu;
pub mod vm;

pub use mode::IrqchipMode;

/// Directory holding the guest test kernels built by build.rs (`NAME.elf`).
pub const GUESTS_DIR: &str = env!("IRQVM_GUESTS_DIR");
