//! The synchronisation primitives used by the cross-thread parts of the chip (`posting`,
//! `wake`).
//! Under `--features loom` they are loom's, so the same code is model-checked.

#[cfg(feature = "loom")]
pub use loom::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(feature = "loom")]
pub use loom::sync::Arc;

#[cfg(not(feature = "loom"))]
pub use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
#[cfg(not(feature = "loom"))]
pub use std::sync::Arc;
