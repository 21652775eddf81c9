//! The irqchip mode of a VM: which interrupt controllers run where. Its own module, below
//! everything that names a mode (the backends, the CPU model, the seccomp roles, the snapshot
//! format), so that none of them has to import the backends for it.

/// The interrupt-controller implementations. Only modes that work are listed: the CLI offers
/// exactly these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IrqchipMode {
    /// KVM's in-kernel PIC, IOAPIC and local APICs.
    Kernel,
    /// Every interrupt controller in userspace, from the `irqchip` crate (module `backend::user`).
    /// irqvm's default, in the CLI and in [`crate::vm::VmConfig::new`].
    #[default]
    User,
    /// Local APICs in KVM, IOAPIC and PIC in userspace (module `backend::split`).
    Split,
}
