//! What the loom models share (tests/loom_posting.rs, tests/loom_wake.rs).

/// Runs `model` under loom and prints how many executions it explored. Exhaustive unless a
/// preemption bound is given; LOOM_MAX_PREEMPTIONS overrides `bound` (a large value such as 100
/// makes the bounded models exhaustive again).
pub fn check(bound: Option<usize>, model: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let executions = std::sync::Arc::new(AtomicUsize::new(0));
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = bound;
    }
    let bound = builder.preemption_bound;
    let counter = std::sync::Arc::clone(&executions);
    builder.check(move || {
        counter.fetch_add(1, Relaxed);
        model();
    });
    let explored = executions.load(Relaxed);
    eprintln!("loom explored {explored} executions (preemption bound {bound:?})");
}
