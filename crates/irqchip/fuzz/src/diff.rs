//! Where two chip snapshots differ, for crash reports of the snapshot checks.

use irqchip::snapshot::ChipSnapshot;

/// Where two snapshots first differ, as JSON with some context (the full dumps are too long to
/// read in a crash report).
pub fn first_difference(a: &ChipSnapshot, b: &ChipSnapshot) -> String {
    let (a, b) = (
        serde_json::to_string(a).unwrap_or_default(),
        serde_json::to_string(b).unwrap_or_default(),
    );
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let from = at.saturating_sub(300);
    let context = |s: &str| {
        s.get(from..(at + 100).min(s.len()))
            .unwrap_or("")
            .to_string()
    };
    format!("at byte {at}:\n  {}\n  {}", context(&a), context(&b))
}
