//! The control API: `irqvm run --api-sock PATH` (and `irqvm restore --api-sock PATH`) serves
//! HTTP/1.1 with JSON bodies on a Unix socket
//! (`curl --unix-socket PATH http://localhost/api/v1/vm.info`). Paths, verbs and bodies follow
//! Cloud Hypervisor's where it has the operation (`vm.info`, `vm.pause`, `vm.resume`,
//! `vm.shutdown`, `vm.snapshot`, `vm.restore`, `vm.send-migration`, `vm.counters`, `vmm.ping`);
//! irqvm's own (vCPU and platform state, injection, the flight recorder)
//! sit under the same `/api/v1/` prefix. The reference with examples is docs/operations.md.
//!
//! Layout: [`model`] (the JSON shapes, one per object for all three irqchip modes), [`lapic`]
//! and [`platform`] (filling them from KVM or the `irqchip` model), [`router`] (a pure function
//! from method, path and body to status and body, over the [`router::Control`] trait, which is
//! what the fuzz test drives), [`handle`] (the parts of a running VM the API and a snapshot
//! use), [`control`] (that trait over a running VM), [`vmm`] (the API of an irqvm started
//! without a VM, for `vm.restore`), [`server`] (the listening thread, on `tiny_http`) and
//! [`files`] (the unfiltered thread for the API's file work).
//!
//! The API thread never blocks a vCPU thread: it reaches vCPUs through atomics, kicks and the
//! doorbell; a vCPU answers a state request on its own thread at the top of its loop (or while
//! paused) and the API thread polls for the answer without holding anything the vCPU takes.

pub mod control;
pub mod files;
pub mod handle;
pub mod lapic;
pub mod model;
pub mod platform;
pub mod router;
pub mod server;
pub mod vmm;

pub use handle::VmHandle;
pub use server::{ApiServer, ServerError};

/// Why a request failed; each maps to one HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed body, bad field value, a request the chip refused as invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such path, or no such vCPU (404).
    #[error("{0}")]
    NotFound(String),
    /// The path exists with another method (405).
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The VM is not in a state for this (pause while paused, resume while running, a request
    /// to a stopped VM) (409).
    #[error("{0}")]
    Conflict(String),
    /// A vCPU did not answer in time (503).
    #[error("{0}")]
    Unavailable(String),
    /// KVM failed a request the API checked (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Conflict(_) => 409,
            Self::Unavailable(_) => 503,
            Self::Internal(_) => 500,
        }
    }
}
