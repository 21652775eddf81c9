//! The listening side: `tiny_http` on a Unix socket, one `api` thread that reads each request
//! (body capped at [`MAX_BODY`]), routes it and writes the answer. `tiny_http` was chosen as the
//! lightest well-kept synchronous HTTP/1.1 server that listens on a Unix socket: Firecracker's
//! `micro_http` is not published on crates.io (the crate of that name there is an unrelated
//! async server), and hyper would bring an async runtime for a handful of requests a second.
//!
//! Least privilege (docs/security.md): the socket is bound on the caller's thread, then the `api`
//! thread installs its seccomp filter (`Role::Api`) before it hands the listener to `tiny_http`,
//! so `tiny_http`'s accept thread and its connection workers, which that call starts, inherit the
//! filter (a filter passes to every thread the filtered thread creates).

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use tiny_http::{Header, Response, Server};

use super::router::{self, Control};
use super::VmHandle;
use crate::seccomp::{self, SeccompError, ThreadFilter};

/// Largest request body read; the rest is refused.
pub const MAX_BODY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0} exists and is not a socket: not replacing it")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    Stale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
    #[error("cannot start the API thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the API thread's seccomp filter: {0}")]
    Seccomp(#[source] SeccompError),
}

/// A running API server; dropping it stops the thread and removes the socket.
pub struct ApiServer {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Removes a socket a previous run left behind (never another kind of file).
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServerError::Stale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(ServerError::NotASocket(path.to_path_buf())),
    }
}

impl ApiServer {
    /// Listens on `path` and serves `control` on a thread named `api`, under the API's seccomp
    /// filter when the VM has seccomp on (`VmHandle::api_filter`).
    pub fn start(path: &Path, control: VmHandle) -> Result<Self, ServerError> {
        let filter = control.api_filter().map_err(ServerError::Seccomp)?;
        if control.files.get().is_none() {
            // Started here, before the API thread's filter: see `super::files`.
            let worker = super::files::FileWorker::start().map_err(ServerError::Spawn)?;
            let _ = control.files.set(worker);
        }
        Self::start_with(path, control, filter)
    }

    /// [`ApiServer::start`] for any [`Control`], under `filter` (`None`: unfiltered).
    pub fn start_with<C: Control + Send + Sync + 'static>(
        path: &Path,
        control: C,
        filter: Option<ThreadFilter>,
    ) -> Result<Self, ServerError> {
        remove_stale(path)?;
        let listen_error = |reason: String| ServerError::Listen {
            path: path.to_path_buf(),
            reason,
        };
        let listener = UnixListener::bind(path).map_err(|e| listen_error(e.to_string()))?;
        let (tx, rx) = mpsc::sync_channel(1);
        let thread = seccomp::spawn("api".into(), filter, move || {
            // Filtered from here: `from_listener` starts tiny_http's accept thread.
            match Server::from_listener(listener, None) {
                Ok(server) => {
                    let server = Arc::new(server);
                    let _ = tx.send(Ok(server.clone()));
                    serve(&server, &control);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            match e {
                SeccompError::Spawn { source, .. } => ServerError::Spawn(source),
                other => ServerError::Seccomp(other),
            }
        })?;
        let server = match rx.recv() {
            Ok(Ok(server)) => server,
            outcome => {
                let _ = thread.join();
                let _ = std::fs::remove_file(path);
                let reason = match outcome {
                    Ok(Err(reason)) => reason,
                    _ => "the API thread ended before it listened".into(),
                };
                return Err(listen_error(reason));
            }
        };
        Ok(Self {
            server,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiServer {
    /// Runs on the thread that owns the server (unfiltered, or `main` under `Role::Main`): the
    /// last `Arc<Server>` goes here, after the `api` thread ended, so `tiny_http`'s wake-up
    /// connection to its own socket is made from this thread, not from a filtered API thread.
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(server: &Server, control: &dyn Control) {
    for mut request in server.incoming_requests() {
        let mut body = Vec::new();
        let read = request
            .as_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body);
        let reply = match read {
            Err(e) => too_bad(400, &format!("cannot read the body: {e}")),
            Ok(_) if body.len() as u64 > MAX_BODY => {
                too_bad(413, &format!("the body exceeds {MAX_BODY} bytes"))
            }
            Ok(_) => router::route(request.method().as_str(), request.url(), &body, control),
        };
        let mut response = Response::from_string(reply.body).with_status_code(reply.status);
        if reply.status != 204 {
            if let Ok(header) = Header::from_bytes("Content-Type", "application/json") {
                response = response.with_header(header);
            }
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!("API client went away: {e}");
        }
    }
}

fn too_bad(status: u16, message: &str) -> router::Reply {
    router::Reply {
        status,
        body: serde_json::json!({ "error": message }).to_string(),
    }
}
