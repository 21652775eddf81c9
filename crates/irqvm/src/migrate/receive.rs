//! The target side (`irqvm restore --incoming PATH`): listen on a Unix socket, take one
//! source, fill an anonymous guest RAM from its page records and read its state, which passes
//! the snapshot's checks (`SnapshotState::check_shape`, then `Vm::restore_with_memory`'s) before
//! anything of it is applied. The caller builds the VM, starts it and then answers the source
//! ([`Answer`]), so the source ends only once the guest runs here.

use std::io::BufReader;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::wire::{self, Record};
use super::MigrateError;
use crate::memory::{self, GuestRam};
use crate::snapshot::{SnapshotError, SnapshotState};

/// How long the target waits for the source to send the next bytes once it has connected.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A VM received whole, not yet applied.
pub struct Received {
    pub state: SnapshotState,
    pub memory: GuestRam,
    /// Pages received (a page sent twice counts twice).
    pub pages: u64,
    /// From the connection to the state read.
    pub elapsed: Duration,
    pub answer: Answer,
}

/// The target's answer to the source, given once.
pub struct Answer {
    stream: UnixStream,
}

impl Answer {
    /// The VM runs here: the source may end. `report` is JSON for the source's report.
    pub fn running(mut self, report: &serde_json::Value) -> Result<(), MigrateError> {
        Ok(wire::write_answer(
            &mut self.stream,
            Ok(&report.to_string()),
        )?)
    }

    /// The VM was refused here (nothing of it ran): the source resumes it.
    pub fn refuse(mut self, why: &str) {
        if let Err(e) = wire::write_answer(&mut self.stream, Err(why)) {
            tracing::warn!("cannot tell the migration source why its VM was refused: {e}");
        }
    }
}

/// Listens on `path`, replacing a socket a previous run left there (never another file).
pub fn listen(path: &Path) -> Result<UnixListener, MigrateError> {
    let socket_error = |source| MigrateError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(socket_error(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket: not replacing it",
            )));
        }
        std::fs::remove_file(path).map_err(socket_error)?;
    }
    UnixListener::bind(path).map_err(socket_error)
}

/// Accepts one source on `listener` and reads its VM. On an error the source is told why
/// (if it can still hear it) and the socket is left for the caller to remove.
pub fn receive(listener: &UnixListener) -> Result<Received, MigrateError> {
    let (stream, _) = listener.accept()?;
    let start = Instant::now();
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let answer = Answer {
        stream: stream.try_clone()?,
    };
    match read_vm(&stream) {
        Ok((state, memory, pages)) => Ok(Received {
            state,
            memory,
            pages,
            elapsed: start.elapsed(),
            answer,
        }),
        Err(e) => {
            answer.refuse(&e.to_string());
            Err(e)
        }
    }
}

fn read_vm(stream: &UnixStream) -> Result<(SnapshotState, GuestRam, u64), MigrateError> {
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let size = wire::read_hello(&mut r)?;
    let memory = memory::create_guest_memory(size)?;
    let mut buf = wire::buffer();
    let mut pages = 0;
    loop {
        match wire::read_record(&mut r, &memory, &mut buf)? {
            Record::Pages(n) => pages += n,
            Record::Abort(why) => {
                return Err(MigrateError::Protocol(format!("the source gave up: {why}")))
            }
            Record::State(text) => {
                let state = parse_state(&text, size)?;
                return Ok((state, memory, pages));
            }
        }
    }
}

/// The state text as a snapshot's `state.json` is read: syntax, version, shape, and its RAM
/// size against the hello's.
fn parse_state(text: &[u8], size: u64) -> Result<SnapshotState, MigrateError> {
    let state: SnapshotState = serde_json::from_slice(text).map_err(|e| {
        MigrateError::Snapshot(SnapshotError::Corrupt {
            path: "the migration stream".into(),
            reason: e.to_string(),
        })
    })?;
    state.check_shape()?;
    if state.header.memory_size != size {
        return Err(MigrateError::Protocol(format!(
            "the state's guest has {} bytes of RAM, the stream announced {size}",
            state.header.memory_size
        )));
    }
    Ok(state)
}
