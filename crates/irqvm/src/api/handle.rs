//! [`VmHandle`]: the parts of a running VM the API thread (and a snapshot) uses. Defined apart
//! from its `Control` implementation (`super::control`), so that the snapshot code, which the
//! implementation calls, can take a handle without importing it back.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Irqchip;
use crate::vcpu::{VcpuShared, VmControl};

/// The parts of a running VM the API thread uses (`RunningVm::handle`).
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) chip: Arc<dyn Irqchip>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) vcpus: Vec<Arc<VcpuShared>>,
    pub(crate) started: Instant,
    /// Whether the API's threads run under `seccomp::Role::Api` (the VM's `VmConfig::seccomp`).
    pub(crate) seccomp: bool,
    pub(crate) tracer: Arc<crate::trace::Tracer>,
    /// The file of the recording `trace.start` began (shared by the handle's clones).
    pub(crate) trace_file: Arc<std::sync::Mutex<Option<(String, std::fs::File)>>>,
    pub(crate) snapshot: Arc<crate::snapshot::source::SnapshotSource>,
    /// The unfiltered thread the API's file work runs on (`super::files`), set by
    /// `ApiServer::start`; unset, the work runs on the calling thread.
    pub(crate) files: Arc<std::sync::OnceLock<super::files::FileWorker>>,
}
