//! Writes seeds for the `snapshot_restore` target: the JSON snapshot of the machine each of the
//! largest `chip_sequence` corpus inputs leaves behind.
//!   cargo run --example snapshot_seeds -- COUNT
use std::path::Path;

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(root.join("chip_sequence"))
        .expect("chip_sequence corpus")
        .map(|entry| std::fs::read(entry.expect("entry").path()).expect("input"))
        .collect();
    inputs.sort_by_key(|data| std::cmp::Reverse(data.len()));
    let out = root.join("snapshot_restore");
    std::fs::create_dir_all(&out).expect("output directory");
    for (n, data) in inputs.iter().take(count).enumerate() {
        let snapshot = irqchip_fuzz::chip::final_snapshot(data);
        let json = serde_json::to_vec(&snapshot).expect("serializes");
        std::fs::write(out.join(format!("seed-{n:03}.json")), json).expect("write");
    }
}
