//! From (method, path, body) to (status, JSON body): pure, over [`Control`], so it is tested
//! (and fuzzed) without a VM. Every answer is JSON, or empty with 204; every failure is
//! `{"error": "..."}` with a 4xx/5xx status.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::model::{
    Counters, ErrorBody, LineRequest, MsiRequest, PlatformInfo, RestoreRequest,
    SendMigrationRequest, SipiRequest, SnapshotRequest, TraceStartRequest, TraceStopped, VcpuInfo,
    VmInfo,
};
use super::ApiError;
use crate::backend::HostEvent;

/// The prefix of every path (Cloud Hypervisor's).
pub const PREFIX: &str = "/api/v1/";

/// What the router needs of a VM.
pub trait Control {
    fn info(&self) -> VmInfo;
    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    fn shutdown(&self) -> Result<(), ApiError>;
    fn vcpu_count(&self) -> usize;
    /// vCPU `index`'s state, read on its thread (`index` < `vcpu_count()`).
    fn vcpu(&self, index: usize) -> Result<VcpuInfo, ApiError>;
    fn platform(&self) -> Result<PlatformInfo, ApiError>;
    fn counters(&self) -> Counters;
    fn line(&self, request: &LineRequest) -> Result<(), ApiError>;
    /// Returns whether a local APIC took the message.
    fn msi(&self, request: &MsiRequest) -> Result<bool, ApiError>;
    /// Raises `event` at vCPU `index` (`index` < `vcpu_count()`); whether its LAPIC took it.
    fn event(&self, index: usize, event: HostEvent) -> Result<bool, ApiError>;
    /// Starts the flight recorder; the trace file is `request.path` (created now).
    fn trace_start(&self, request: &TraceStartRequest) -> Result<(), ApiError>;
    /// Stops the recording that `trace_start` began and writes its file.
    fn trace_stop(&self) -> Result<TraceStopped, ApiError>;
    /// Snapshots the VM into the request's directory, leaving it paused.
    fn snapshot(&self, request: &SnapshotRequest) -> Result<(), ApiError> {
        let _ = request;
        Err(ApiError::Conflict("this VM cannot be snapshotted".into()))
    }
    /// Migrates the VM to the irqvm listening at the request's `unix:` URL; the report is
    /// `vm.send-migration`'s answer (JSON).
    fn send_migration(&self, request: &SendMigrationRequest) -> Result<String, ApiError> {
        let _ = request;
        Err(ApiError::Conflict("this VM cannot be migrated".into()))
    }
    /// Restores a snapshot into this VMM, which must have no VM yet; the VM is left paused.
    fn restore(&self, request: &RestoreRequest) -> Result<(), ApiError> {
        let _ = request;
        Err(ApiError::Conflict(
            "a VM already runs here: vm.restore needs an irqvm started without one \
             (irqvm restore --api-sock PATH)"
                .into(),
        ))
    }
}

/// An answer: status and body (empty for 204).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self { status: 200, body },
            Err(e) => Self::error(&ApiError::Internal(format!(
                "cannot encode the answer: {e}"
            ))),
        }
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: String::new(),
        }
    }

    fn error(error: &ApiError) -> Self {
        let body = ErrorBody {
            error: error.to_string(),
        };
        Self {
            status: error.status(),
            // A struct of one string always encodes.
            body: serde_json::to_string(&body).unwrap_or_else(|_| String::from("{}")),
        }
    }
}

/// Answers one request.
pub fn route(method: &str, url: &str, body: &[u8], ctl: &dyn Control) -> Reply {
    match dispatch(method, url, body, ctl) {
        Ok(reply) => reply,
        Err(e) => Reply::error(&e),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("bad JSON body: {e}")))
}

fn done(result: Result<(), ApiError>) -> Result<Reply, ApiError> {
    result.map(|()| Reply::no_content())
}

fn dispatch(method: &str, url: &str, body: &[u8], ctl: &dyn Control) -> Result<Reply, ApiError> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let Some(name) = path.strip_prefix(PREFIX) else {
        return Err(ApiError::NotFound(format!("no such path: {path}")));
    };
    let wrong_method = || ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: path.to_string(),
    };
    if let Some(rest) = name.strip_prefix("vcpus") {
        return vcpus(method, rest, body, ctl).map_err(|e| match e {
            Route::Missing => ApiError::NotFound(format!("no such path: {path}")),
            Route::WrongMethod => wrong_method(),
            Route::Failed(e) => e,
        });
    }
    let (get, put) = (method == "GET", method == "PUT");
    match name {
        "vmm.ping" if get => Ok(Reply::json(&serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
        }))),
        "vm.info" if get => Ok(Reply::json(&ctl.info())),
        "vm.counters" if get => Ok(Reply::json(&ctl.counters())),
        "platform" if get => ctl.platform().map(|p| Reply::json(&p)),
        "vm.pause" if put => done(ctl.pause()),
        "vm.resume" if put => done(ctl.resume()),
        "vm.shutdown" if put => done(ctl.shutdown()),
        "vm.snapshot" if put => done(ctl.snapshot(&parse::<SnapshotRequest>(body)?)),
        "vm.send-migration" if put => ctl
            .send_migration(&parse::<SendMigrationRequest>(body)?)
            .map(|report| Reply {
                status: 200,
                body: report,
            }),
        "vm.restore" if put => done(ctl.restore(&parse::<RestoreRequest>(body)?)),
        "irq.line" if put => done(ctl.line(&parse(body)?)),
        "irq.msi" if put => ctl
            .msi(&parse(body)?)
            .map(|delivered| Reply::json(&serde_json::json!({ "delivered": delivered }))),
        "trace.start" if put => done(ctl.trace_start(&parse(body)?)),
        "trace.stop" if put => ctl.trace_stop().map(|t| Reply::json(&t)),
        "vmm.ping" | "vm.info" | "vm.counters" | "platform" | "vm.pause" | "vm.resume"
        | "vm.shutdown" | "vm.snapshot" | "vm.send-migration" | "vm.restore" | "irq.line"
        | "irq.msi" | "trace.start" | "trace.stop" => Err(wrong_method()),
        _ => Err(ApiError::NotFound(format!("no such path: {path}"))),
    }
}

/// Why a `vcpus` path did not route.
enum Route {
    Missing,
    WrongMethod,
    Failed(ApiError),
}

impl From<ApiError> for Route {
    fn from(e: ApiError) -> Self {
        Self::Failed(e)
    }
}

/// `vcpus`, `vcpus/N`, `vcpus/N/{nmi,init,sipi}` (`rest` is what follows "vcpus").
fn vcpus(method: &str, rest: &str, body: &[u8], ctl: &dyn Control) -> Result<Reply, Route> {
    if rest.is_empty() {
        if method != "GET" {
            return Err(Route::WrongMethod);
        }
        let all: Result<Vec<VcpuInfo>, ApiError> =
            (0..ctl.vcpu_count()).map(|i| ctl.vcpu(i)).collect();
        return Ok(Reply::json(&all?));
    }
    let rest = rest.strip_prefix('/').ok_or(Route::Missing)?;
    let (index, action) = rest.split_once('/').unwrap_or((rest, ""));
    // Only plain decimal: "+1" and "01" are not vCPU numbers.
    let canonical = !index.is_empty()
        && index.bytes().all(|b| b.is_ascii_digit())
        && (index == "0" || !index.starts_with('0'));
    if !canonical {
        return Err(Route::Missing);
    }
    let Ok(index) = index.parse::<usize>() else {
        return Err(Route::Failed(ApiError::NotFound(format!(
            "vCPU {index} does not exist"
        ))));
    };
    let known = matches!(action, "" | "nmi" | "init" | "sipi");
    if !known {
        return Err(Route::Missing);
    }
    let want = if action.is_empty() { "GET" } else { "PUT" };
    if method != want {
        return Err(Route::WrongMethod);
    }
    if index >= ctl.vcpu_count() {
        return Err(Route::Failed(ApiError::NotFound(format!(
            "vCPU {index} does not exist (the VM has {})",
            ctl.vcpu_count()
        ))));
    }
    let event = match action {
        "" => return Ok(Reply::json(&ctl.vcpu(index)?)),
        "nmi" => HostEvent::Nmi,
        "init" => HostEvent::Init,
        _ => HostEvent::Sipi(parse::<SipiRequest>(body)?.vector),
    };
    let delivered = ctl.event(index, event)?;
    Ok(Reply::json(&serde_json::json!({ "delivered": delivered })))
}

#[cfg(test)]
mod tests;
