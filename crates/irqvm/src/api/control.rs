//! [`Control`] over a running VM: what the API thread may touch (atomics, kicks, the chip's
//! `&self` methods) and nothing a vCPU owns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::model::{
    Counters, LineRequest, MsiRequest, PlatformInfo, SendMigrationRequest, SnapshotRequest,
    TraceStartRequest, TraceStopped, VcpuInfo, VmInfo,
};
use super::router::Control;
use super::ApiError;
use crate::backend::{HostEvent, IrqchipError, IrqchipMode, MsiDelivery};
use crate::seccomp::{Role, SeccompError, ThreadFilter};
use crate::vcpu::{GuestExit, VcpuState};

/// How long the API waits for a vCPU to answer a state request or to pause.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

pub use super::handle::VmHandle;

/// The API's (and the trace file's) name of an irqchip mode.
pub fn mode_name(mode: IrqchipMode) -> &'static str {
    match mode {
        IrqchipMode::User => "user",
        IrqchipMode::Split => "split",
        IrqchipMode::Kernel => "kernel",
    }
}

fn chip_error(e: IrqchipError) -> ApiError {
    match e {
        IrqchipError::NoSuchLine(_) | IrqchipError::InvalidMsi { .. } => {
            ApiError::BadRequest(e.to_string())
        }
        IrqchipError::NoSuchVcpu(_) => ApiError::NotFound(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

impl VmHandle {
    /// Runs `job` on the `api-files` thread (`super::files`) if `ApiServer::start` started one,
    /// else here.
    fn on_files_thread<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        match self.files.get() {
            Some(worker) => worker
                .run(job)
                .ok_or_else(|| ApiError::Internal("the api-files thread is gone".into())),
            None => Ok(job()),
        }
    }

    /// The filter of the API's threads for this VM (`None` when the VM runs without seccomp).
    pub fn api_filter(&self) -> Result<Option<ThreadFilter>, SeccompError> {
        self.seccomp
            .then(|| ThreadFilter::new(Role::Api(self.chip.mode())))
            .transpose()
    }

    fn stopped(&self) -> bool {
        self.control.stop_requested()
    }

    fn require_running(&self) -> Result<(), ApiError> {
        if self.stopped() {
            return Err(ApiError::Conflict("the VM has stopped".into()));
        }
        Ok(())
    }

    /// Kicks vCPU `index` out of KVM_RUN and, with `wake`, out of a `user`-mode block.
    fn kick(&self, index: usize, wake: bool) {
        self.vcpus[index].kick.kick();
        if wake {
            self.chip.wake_vcpu(index);
        }
    }

    /// Polls `done` every millisecond until it holds or [`ANSWER_TIMEOUT`] passes.
    fn wait_for(&self, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while !done() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Outside KVM_RUN and held there: paused, or blocked in a `user`-mode HLT / wait-for-SIPI
    /// (which pauses when it next wakes, before any guest entry).
    fn held(state: VcpuState) -> bool {
        !matches!(state, VcpuState::Running)
    }
}

impl Control for VmHandle {
    fn info(&self) -> VmInfo {
        let state = if self.stopped() {
            "stopped"
        } else if self.control.pause_requested() {
            "paused"
        } else {
            "running"
        };
        VmInfo {
            state: state.into(),
            irqchip: mode_name(self.chip.mode()).into(),
            vcpus: self.vcpus.len(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpu_threads: self.vcpus.iter().map(|v| v.state().name().into()).collect(),
        }
    }

    /// Requests the pause, kicks every vCPU out of KVM_RUN (a blocked one is not woken: it
    /// stays blocked), and waits until none is in or around KVM_RUN, kicking again the ones
    /// still there (a vCPU whose LAPIC is KVM's enters once more to flush a held-back timer
    /// expiry, `backend::kvm_timer`, and one halted inside KVM leaves only when kicked).
    fn pause(&self) -> Result<(), ApiError> {
        self.require_running()?;
        if !self.control.pause() {
            return Err(ApiError::Conflict("the VM is already paused".into()));
        }
        let all_held = || {
            let mut held = true;
            for (index, vcpu) in self.vcpus.iter().enumerate() {
                if !Self::held(vcpu.state()) {
                    held = false;
                    self.kick(index, false);
                }
            }
            held
        };
        if !self.wait_for(all_held) {
            self.control.resume();
            return Err(ApiError::Unavailable(
                "a vCPU did not leave KVM_RUN in time; the VM keeps running".into(),
            ));
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.require_running()?;
        if !self.control.resume() {
            return Err(ApiError::Conflict("the VM is not paused".into()));
        }
        Ok(())
    }

    /// Cloud Hypervisor's `vm.shutdown`: the VM ends as a host stop does (exit status 0).
    fn shutdown(&self) -> Result<(), ApiError> {
        self.require_running()?;
        self.control.finish(Ok(GuestExit::Stopped));
        for index in 0..self.vcpus.len() {
            self.kick(index, true);
        }
        Ok(())
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Asks the vCPU's thread (kicked out of KVM_RUN, woken from a block, nudged if paused) and
    /// polls for its answer.
    fn vcpu(&self, index: usize) -> Result<VcpuInfo, ApiError> {
        let shared = self
            .vcpus
            .get(index)
            .ok_or_else(|| ApiError::NotFound(format!("vCPU {index} does not exist")))?;
        let n = shared.request_info();
        self.kick(index, true);
        self.control.nudge_paused();
        let answered = || shared.info_answered() >= n || shared.state() == VcpuState::Stopped;
        if !self.wait_for(answered) {
            return Err(ApiError::Unavailable(format!(
                "vCPU {index} did not answer in time"
            )));
        }
        if shared.info_answered() < n {
            return Err(ApiError::Conflict(format!("vCPU {index} has stopped")));
        }
        match shared.last_info() {
            Some(Ok(info)) => Ok(info),
            Some(Err(e)) => Err(ApiError::Internal(format!("vCPU {index}: {e}"))),
            None => Err(ApiError::Internal(format!("vCPU {index}: no answer"))),
        }
    }

    fn platform(&self) -> Result<PlatformInfo, ApiError> {
        self.chip.platform_info().map_err(chip_error)
    }

    fn counters(&self) -> Counters {
        let mut all = Counters::new();
        for v in &self.vcpus {
            let s = v.stats.snapshot();
            let map: BTreeMap<String, u64> = [
                ("kvm_runs", s.kvm_runs),
                ("eintr_returns", s.eintr_returns),
                ("pio_exits", s.pio_exits),
                ("mmio_exits", s.mmio_exits),
                ("msr_exits", s.msr_exits),
                ("hlt_exits", s.hlt_exits),
                ("other_exits", s.other_exits),
                ("blocks", s.blocks),
                ("syscalls_completed", s.syscalls_completed),
                ("syscall_watch_hits", s.syscall_watch_hits),
                ("kicks", v.kick.kicks_sent()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            all.insert(format!("vcpu{}", v.index), map);
        }
        self.chip.counters(&mut |vcpu, name, value| {
            let group = vcpu.map_or_else(|| "irqchip".to_string(), |i| format!("vcpu{i}"));
            all.entry(group)
                .or_default()
                .insert(name.to_string(), value);
        });
        all
    }

    fn line(&self, request: &LineRequest) -> Result<(), ApiError> {
        let gsi = request.gsi;
        match request.action.as_str() {
            "assert" => self.chip.set_line(gsi, true),
            "deassert" => self.chip.set_line(gsi, false),
            "pulse" => self.chip.pulse_line(gsi),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "action {other:?} is not one of assert, deassert, pulse"
                )))
            }
        }
        .map_err(chip_error)
    }

    fn msi(&self, request: &MsiRequest) -> Result<bool, ApiError> {
        let delivery = self
            .chip
            .signal_msi(request.address, request.data)
            .map_err(chip_error)?;
        Ok(delivery == MsiDelivery::Delivered)
    }

    /// Cloud Hypervisor's `vm.snapshot`: `destination_url` must be `file://` and an absolute
    /// directory (created if missing). The VM is paused first if it runs, and stays paused.
    fn snapshot(&self, request: &SnapshotRequest) -> Result<(), ApiError> {
        let dir = snapshot_dir(&request.destination_url)?;
        self.require_running()?;
        let handle = self.clone();
        let target = dir.clone();
        let taken = self.on_files_thread(move || crate::snapshot::take::take(&handle, &target))?;
        let times = taken.map_err(|e| match e {
            crate::snapshot::SnapshotError::Io { .. } => ApiError::BadRequest(e.to_string()),
            crate::snapshot::SnapshotError::NotReady(_) => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })?;
        tracing::info!(dir = %dir.display(), ?times, "snapshot taken");
        Ok(())
    }

    /// Cloud Hypervisor's `vm.send-migration` to `unix:/PATH` (docs/operations.md, "Live
    /// migration"), on the `api-files` thread: the rounds run there while the guest runs, and
    /// the answer is the report. On success the VM has ended here.
    fn send_migration(&self, request: &SendMigrationRequest) -> Result<String, ApiError> {
        let socket = migration_socket(&request.destination_url)?;
        self.require_running()?;
        let handle = self.clone();
        let final_pages = request
            .final_pages
            .unwrap_or(crate::migrate::send::FINAL_PAGES);
        let sent = self
            .on_files_thread(move || crate::migrate::send::send(&handle, &socket, final_pages))?;
        let report =
            sent.map_err(|e| match e {
                crate::migrate::MigrateError::Socket { .. } => ApiError::BadRequest(e.to_string()),
                crate::migrate::MigrateError::NotReady(_)
                | crate::migrate::MigrateError::Snapshot(
                    crate::snapshot::SnapshotError::NotReady(_),
                ) => ApiError::Conflict(e.to_string()),
                other => ApiError::Internal(other.to_string()),
            })?;
        tracing::info!(?report, "VM migrated");
        serde_json::to_string(&report)
            .map_err(|e| ApiError::Internal(format!("cannot encode the report: {e}")))
    }

    fn event(&self, index: usize, event: HostEvent) -> Result<bool, ApiError> {
        if index >= self.vcpus.len() {
            return Err(ApiError::NotFound(format!("vCPU {index} does not exist")));
        }
        let delivery = self.chip.send_event(index, event).map_err(chip_error)?;
        Ok(delivery == MsiDelivery::Delivered)
    }

    /// Creates the file (so a bad path fails here, with 400), then starts the recorder (409 if
    /// it is on already, from `--trace` or an earlier start).
    fn trace_start(&self, request: &TraceStartRequest) -> Result<(), ApiError> {
        self.require_running()?;
        let mut slot = self
            .trace_file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slot.is_some() || self.tracer.on() {
            return Err(ApiError::Conflict(
                "a trace is already being recorded".into(),
            ));
        }
        let path = request.path.clone();
        let created = self.on_files_thread(move || std::fs::File::create(path))?;
        let file = created.map_err(|e| {
            ApiError::BadRequest(format!(
                "cannot create the trace file {}: {e}",
                request.path
            ))
        })?;
        self.tracer
            .start()
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        *slot = Some((request.path.clone(), file));
        Ok(())
    }

    /// Stops the recording `trace.start` began and writes the file (on this thread).
    fn trace_stop(&self) -> Result<TraceStopped, ApiError> {
        let mut slot = self
            .trace_file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((path, file)) = slot.take() else {
            return Err(ApiError::Conflict(
                "no trace started through the API is being recorded".into(),
            ));
        };
        let dump = self
            .tracer
            .stop()
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        crate::trace::chrome::write(&dump, file)
            .map_err(|e| ApiError::Internal(format!("cannot write {path}: {e}")))?;
        Ok(TraceStopped {
            path,
            events: dump.events.len() as u64,
            dropped_events: dump.dropped_total(),
        })
    }
}

/// The directory of a `file://` URL: an absolute path, no host, no query.
pub fn snapshot_dir(url: &str) -> Result<std::path::PathBuf, ApiError> {
    file_url_dir("destination_url", url)
}

/// The directory of the `file://` URL in the body's `field`.
pub fn file_url_dir(field: &str, url: &str) -> Result<std::path::PathBuf, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("{field} {url:?}: {why}"));
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| bad("only file:// URLs are supported"))?;
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute (file:///DIR)"));
    }
    if path.contains(['?', '#']) || path.split('/').any(|part| part == "..") {
        return Err(bad("no query, fragment or '..' allowed"));
    }
    Ok(std::path::PathBuf::from(path))
}

/// The socket of a `unix:` URL (Cloud Hypervisor's `unix:/PATH`): an absolute path.
pub fn migration_socket(url: &str) -> Result<std::path::PathBuf, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("destination_url {url:?}: {why}"));
    let path = url
        .strip_prefix("unix:")
        .ok_or_else(|| bad("only unix: URLs are supported (unix:/PATH)"))?;
    if !path.starts_with('/') || path.contains('\0') {
        return Err(bad("the socket path must be absolute (unix:/PATH)"));
    }
    Ok(std::path::PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_urls_must_be_absolute_unix_urls() {
        assert_eq!(
            migration_socket("unix:/tmp/m.sock").unwrap(),
            std::path::PathBuf::from("/tmp/m.sock")
        );
        for bad in ["/tmp/m.sock", "unix:m.sock", "tcp:host:1", "unix:/a\0b", ""] {
            let err = migration_socket(bad).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{bad}: {err}");
        }
    }

    /// Only `file://` with an absolute path, no query, fragment or `..` (Cloud Hypervisor's
    /// `destination_url` names a local directory).
    #[test]
    fn snapshot_urls_must_be_absolute_file_urls() {
        assert_eq!(
            snapshot_dir("file:///var/tmp/snap").unwrap(),
            std::path::PathBuf::from("/var/tmp/snap")
        );
        for bad in [
            "/var/tmp/snap",
            "http://host/snap",
            "file://relative",
            "file:///a/../b",
            "file:///a?x",
            "file:///a#b",
            "",
        ] {
            let err = snapshot_dir(bad).unwrap_err();
            assert!(matches!(err, ApiError::BadRequest(_)), "{bad}: {err}");
        }
    }
}
