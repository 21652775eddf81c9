//! The KVM system and VM handles, and the few vCPU ioctls kvm-ioctls 0.25 does not wrap.
//!
//! Everything that talks to `/dev/kvm` directly lives here; the rest of the VMM uses the typed
//! wrappers of kvm-ioctls.

use std::io;

use kvm_bindings::{kvm_interrupt, KVMIO};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

/// Where the KVM device node lives.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Guest-physical address of the three pages KVM needs for its real-mode TSS on Intel hosts,
/// just below the 4 GiB boundary and above the IOAPIC/LAPIC windows.
const TSS_ADDRESS: usize = 0xFFFB_D000;

/// Errors opening KVM and setting up a VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "{KVM_DEVICE} does not exist: KVM is not available on this host (load kvm or kvm_pvm)"
    )]
    Missing,
    #[error("permission denied opening {KVM_DEVICE}: run as root or join the group owning it")]
    Permission,
    #[error("cannot open {KVM_DEVICE}: {0}")]
    Open(#[source] io::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM lacks a capability irqvm needs: {0}")]
    MissingCap(&'static str),
    /// A variable-length KVM argument (an MSR list, a routing table) could not be built: more
    /// entries than kvm-bindings' wrapper allows.
    #[error("cannot build the KVM argument {what}: {entries} entries is too many")]
    TooManyEntries {
        /// Which argument.
        what: &'static str,
        /// How many entries were asked for.
        entries: usize,
    },
    #[error("KVM ioctl {what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl KvmError {
    /// Wraps a failed ioctl with the name of the operation.
    pub fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { what, source }
    }
}

/// Opens `/dev/kvm`, naming the usual failures (missing module, permissions) in the error.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(io::Error::from_raw_os_error(e.errno())),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    require_cap(&kvm, Cap::UserMemory, "KVM_CAP_USER_MEMORY")?;
    // The kick (see `crate::kick`) relies on kvm_run.immediate_exit.
    require_cap(&kvm, Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT")?;
    Ok(kvm)
}

/// Fails with [`KvmError::MissingCap`] unless `kvm` reports `cap`.
pub fn require_cap(kvm: &Kvm, cap: Cap, name: &'static str) -> Result<(), KvmError> {
    if kvm.check_extension(cap) {
        Ok(())
    } else {
        Err(KvmError::MissingCap(name))
    }
}

/// Creates a VM and does the x86 setup every VM needs regardless of the irqchip mode.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
    Ok(vm)
}

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);

/// Queues `vector` for injection at the next KVM_RUN (KVM_INTERRUPT).
///
/// Only valid without an in-kernel LAPIC (user mode) or for ExtINT with a split irqchip. KVM
/// delivers the vector even if the guest has IF=0: the caller must have checked
/// `kvm_run.ready_for_interrupt_injection` and RFLAGS.IF first (see `docs/kvm-facts.md`).
pub fn inject_interrupt(vcpu: &VcpuFd, vector: u8) -> Result<(), KvmError> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `vcpu` is an open vCPU fd, KVM_INTERRUPT reads exactly one `kvm_interrupt` from the
    // pointer, which is valid for the duration of the call; the return value is checked.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) };
    if ret == 0 {
        Ok(())
    } else {
        Err(KvmError::Ioctl {
            what: "KVM_INTERRUPT",
            source: kvm_ioctls::Error::last(),
        })
    }
}

/// The argument of KVM_SET_SIGNAL_MASK: `struct kvm_signal_mask` followed by the kernel's 8-byte
/// sigset (the kernel rejects any other length).
#[repr(C)]
struct KernelSignalMask {
    len: u32,
    sigset: [u8; 8],
}

/// Sets the signal mask the vCPU thread has while inside KVM_RUN (KVM_SET_SIGNAL_MASK): the
/// signals in `blocked` stay blocked in guest mode, all others can interrupt KVM_RUN.
/// `None` removes the mask (the thread's own mask then applies inside KVM_RUN too).
pub fn set_signal_mask(vcpu: &VcpuFd, blocked: Option<&libc::sigset_t>) -> Result<(), KvmError> {
    let ret = match blocked {
        Some(set) => {
            let mut mask = KernelSignalMask {
                len: 8,
                sigset: [0; 8],
            };
            // The kernel sigset is the first 64 bits of glibc's 1024-bit sigset_t, in the same
            // layout (bit n-1 for signal n).
            for signal in 1..=64 {
                // SAFETY: `set` is a valid, initialised sigset_t and `signal` is in range.
                if unsafe { libc::sigismember(set, signal) } == 1 {
                    let bit = (signal - 1) as usize;
                    mask.sigset[bit / 8] |= 1 << (bit % 8);
                }
            }
            // SAFETY: `vcpu` is an open vCPU fd; KVM_SET_SIGNAL_MASK reads a kvm_signal_mask
            // header plus `len` (8) bytes, all inside `mask`, which outlives the call.
            unsafe { ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &mask) }
        }
        None => {
            // SAFETY: a null argument is how KVM_SET_SIGNAL_MASK is told to drop the mask; the
            // kernel does not dereference it.
            unsafe {
                vmm_sys_util::ioctl::ioctl_with_ptr(
                    vcpu,
                    KVM_SET_SIGNAL_MASK(),
                    std::ptr::null::<KernelSignalMask>(),
                )
            }
        }
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(KvmError::Ioctl {
            what: "KVM_SET_SIGNAL_MASK",
            source: kvm_ioctls::Error::last(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // _IOW(KVMIO, 0x86, struct kvm_interrupt) and _IOW(KVMIO, 0x8b, struct kvm_signal_mask)
        // from include/uapi/linux/kvm.h.
        assert_eq!(KVM_INTERRUPT(), 0x4004_ae86);
        assert_eq!(KVM_SET_SIGNAL_MASK(), 0x4004_ae8b);
    }
}
