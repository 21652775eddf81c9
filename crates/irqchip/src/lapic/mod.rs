//! (work in progress)
pub mod timer;
