//! [`Vmm`]: the control API of an irqvm started without a VM (`irqvm restore --api-sock PATH`),
//! as Cloud Hypervisor's VMM without a VM: `vm.restore` (and `vm.shutdown`, `vmm.ping`) until a
//! VM is restored, then everything the VM's [`VmHandle`] answers, on the same socket.
//!
//! The restore itself runs on the main thread (it opens files, maps memory, creates KVM's VM
//! and the vCPU threads, none of which the API thread's seccomp filter allows): the API thread
//! hands it the request ([`VmmRequest`]) and waits for the outcome.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::model::{
    Counters, LineRequest, MsiRequest, PlatformInfo, RestoreRequest, SendMigrationRequest,
    SnapshotRequest, TraceStartRequest, TraceStopped, VcpuInfo, VmInfo,
};
use super::router::Control;
use super::{ApiError, VmHandle};
use crate::backend::HostEvent;

/// How long `vm.restore` waits for the main thread (a restore maps the RAM, it does not copy it).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the API thread asks of the main thread.
pub enum VmmRequest {
    /// Restore this snapshot (held paused) and answer on `reply`.
    Restore {
        request: RestoreRequest,
        reply: mpsc::SyncSender<Result<(), ApiError>>,
    },
    /// `vm.shutdown` with no VM: the process ends.
    Shutdown,
}

/// The API of a VMM that may not have its VM yet (clones share it).
#[derive(Clone)]
pub struct Vmm {
    vm: Arc<OnceLock<VmHandle>>,
    main: Arc<Mutex<mpsc::Sender<VmmRequest>>>,
}

impl Vmm {
    /// A VMM without a VM, and the queue its main thread serves.
    pub fn new() -> (Self, mpsc::Receiver<VmmRequest>) {
        let (main, queue) = mpsc::channel();
        let vmm = Self {
            vm: Arc::new(OnceLock::new()),
            main: Arc::new(Mutex::new(main)),
        };
        (vmm, queue)
    }

    /// The VM is restored: from now on every request goes to it.
    pub fn set_vm(&self, handle: VmHandle) {
        let _ = self.vm.set(handle);
    }

    fn vm(&self) -> Result<&VmHandle, ApiError> {
        self.vm.get().ok_or_else(|| {
            ApiError::Conflict("no VM here yet: PUT /api/v1/vm.restore first".into())
        })
    }

    fn ask(&self, request: VmmRequest) -> Result<(), ApiError> {
        self.main
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(request)
            .map_err(|_| ApiError::Conflict("the VMM is shutting down".into()))
    }
}

impl Control for Vmm {
    fn info(&self) -> VmInfo {
        match self.vm.get() {
            Some(vm) => vm.info(),
            None => VmInfo {
                state: "empty".into(),
                irqchip: String::new(),
                vcpus: 0,
                uptime_ms: 0,
                vcpu_threads: Vec::new(),
            },
        }
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.vm()?.pause()
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.vm()?.resume()
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        match self.vm.get() {
            Some(vm) => vm.shutdown(),
            None => self.ask(VmmRequest::Shutdown),
        }
    }
    fn vcpu_count(&self) -> usize {
        self.vm.get().map_or(0, |vm| vm.vcpu_count())
    }
    fn vcpu(&self, index: usize) -> Result<VcpuInfo, ApiError> {
        self.vm()?.vcpu(index)
    }
    fn platform(&self) -> Result<PlatformInfo, ApiError> {
        self.vm()?.platform()
    }
    fn counters(&self) -> Counters {
        self.vm.get().map(|vm| vm.counters()).unwrap_or_default()
    }
    fn line(&self, request: &LineRequest) -> Result<(), ApiError> {
        self.vm()?.line(request)
    }
    fn msi(&self, request: &MsiRequest) -> Result<bool, ApiError> {
        self.vm()?.msi(request)
    }
    fn event(&self, index: usize, event: HostEvent) -> Result<bool, ApiError> {
        self.vm()?.event(index, event)
    }
    fn trace_start(&self, request: &TraceStartRequest) -> Result<(), ApiError> {
        self.vm()?.trace_start(request)
    }
    fn trace_stop(&self) -> Result<TraceStopped, ApiError> {
        self.vm()?.trace_stop()
    }
    fn snapshot(&self, request: &SnapshotRequest) -> Result<(), ApiError> {
        self.vm()?.snapshot(request)
    }
    fn send_migration(&self, request: &SendMigrationRequest) -> Result<String, ApiError> {
        self.vm()?.send_migration(request)
    }

    /// Hands the request to the main thread and waits for the restore (the VM held paused,
    /// as Cloud Hypervisor leaves a restored VM: `vm.resume` runs it).
    fn restore(&self, request: &RestoreRequest) -> Result<(), ApiError> {
        if self.vm.get().is_some() {
            return Err(ApiError::Conflict("a VM was already restored here".into()));
        }
        let (reply, outcome) = mpsc::sync_channel(1);
        self.ask(VmmRequest::Restore {
            request: request.clone(),
            reply,
        })?;
        outcome
            .recv_timeout(RESTORE_TIMEOUT)
            .map_err(|_| ApiError::Unavailable("the restore did not finish in time".into()))?
    }
}
