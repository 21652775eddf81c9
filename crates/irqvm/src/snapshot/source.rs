//! What a snapshot needs of a VM beyond the control API's handle (`crate::api::VmHandle`
//! holds one): its own module, so the handle and the snapshot code need not import each other.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use crate::devices::Devices;
use crate::memory::GuestRam;
use crate::mode::IrqchipMode;

/// What a snapshot needs of a VM beyond the control API's handle.
pub struct SnapshotSource {
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) memory: GuestRam,
    pub(crate) devices: Arc<Devices>,
    pub(crate) mode: IrqchipMode,
    /// The CPU model and CPUID tables the guest was given.
    pub(crate) cpu_model: Arc<super::model::CpuModelState>,
}
