//! Live migration of a running VM to another irqvm process on this machine, over a Unix socket
//! (docs/architecture.md, "Live migration"): pre-copy of guest RAM with KVM's dirty page log
//! while the guest runs, then a pause, the snapshot's state and the last dirty pages, and the
//! target resumes. The state is the snapshot's ([`crate::snapshot::SnapshotState`], read by
//! [`crate::snapshot::take::capture`] and applied by [`crate::vm::Vm::restore_with_memory`]),
//! so a migration crosses irqchip modes exactly as a snapshot does.
//!
//! | module | what |
//! |---|---|
//! | [`wire`] | the stream: hello, page records, the state, the target's answer |
//! | [`send`] | the source: rounds, stop-and-copy, the outcome (`vm.send-migration`) |
//! | [`receive`] | the target: RAM and state from the stream (`irqvm restore --incoming`) |

pub mod receive;
pub mod send;
pub mod wire;

use crate::memory::MemoryError;
use crate::snapshot::SnapshotError;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("migration stream: {0}")]
    Protocol(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("guest RAM: {0}")]
    Memory(#[from] MemoryError),
    #[error("the target refused the VM (the source resumes): {0}")]
    Refused(String),
    #[error("the VM is not in a state to migrate: {0}")]
    NotReady(String),
    #[error(
        "the target's answer was lost after the whole VM was sent ({0}); the source stays \
         paused: the target may be running it"
    )]
    AnswerLost(String),
}
