//! Per-vector delivery latency histograms, in fixed log2 buckets of relaxed atomic counters, for
//! `GET /api/v1/vm.counters`: post to injection and injection to EOI (`user` mode), and post to
//! EOI of level-triggered IOAPIC vectors (`split` mode, where KVM's EOI exit is the one step
//! after the post that irqvm sees).
//!
//! The post time of each (target vCPU, vector) is kept in a slot the poster writes before its
//! post lands and the target's injection takes; a second post of a vector before its injection
//! (which the IRR merges with the first) moves the slot to the later post. The injection time
//! is kept by the vCPU itself ([`super::VcpuProbe`]) until the EOI of that vector.

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets: bucket `k` counts latencies in `[2^k, 2^(k+1))` ns (bucket 0 also holds 0 ns); the
/// last one holds everything from 2^(BUCKETS-1) ns (about 1.1 s) up.
pub const BUCKETS: usize = 31;

/// The bucket of a latency of `ns` nanoseconds.
pub fn bucket(ns: u64) -> usize {
    let log = (u64::BITS - ns.leading_zeros()).saturating_sub(1) as usize;
    log.min(BUCKETS - 1)
}

/// The upper bound (exclusive) of bucket `k`, in ns, as the counters name it.
pub fn bucket_bound(k: usize) -> u64 {
    1u64 << (k + 1)
}

/// One histogram per vector.
struct PerVector(Box<[[AtomicU64; BUCKETS]; 256]>);

impl PerVector {
    fn new() -> Self {
        Self(Box::new(std::array::from_fn(|_| {
            std::array::from_fn(|_| AtomicU64::new(0))
        })))
    }

    fn add(&self, vector: u8, ns: u64) {
        self.0[usize::from(vector)][bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    fn visit(&self, what: &str, out: &mut dyn FnMut(&str, u64)) {
        for (vector, buckets) in self.0.iter().enumerate() {
            for (k, count) in buckets.iter().enumerate() {
                let n = count.load(Ordering::Relaxed);
                if n > 0 {
                    let bound = bucket_bound(k);
                    out(&format!("{what}_vector_{vector:#04x}_lt_{bound}ns"), n);
                }
            }
        }
    }

    fn counts(&self, vector: u8) -> [u64; BUCKETS] {
        std::array::from_fn(|k| self.0[usize::from(vector)][k].load(Ordering::Relaxed))
    }
}

/// The histograms of one VM.
pub struct Latency {
    /// Per target vCPU and vector: post time + 1 (0 = none pending).
    posted_at: std::sync::OnceLock<Box<[[AtomicU64; 256]]>>,
    post_to_inject: PerVector,
    inject_to_eoi: PerVector,
    /// Per vector: the post time + 1 of the level-triggered IOAPIC message whose EOI is awaited
    /// (remote IRR holds the next one back until then).
    level_posted_at: Box<[AtomicU64; 256]>,
    post_to_eoi: PerVector,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Self {
            posted_at: std::sync::OnceLock::new(),
            post_to_inject: PerVector::new(),
            inject_to_eoi: PerVector::new(),
            level_posted_at: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            post_to_eoi: PerVector::new(),
        }
    }

    /// Sizes the post-time slots for `vcpus` vCPUs (once; later calls do nothing). Before it,
    /// posts are not timed.
    pub fn init(&self, vcpus: usize) {
        self.posted_at.get_or_init(|| {
            (0..vcpus)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect()
        });
    }

    /// `vector` is being posted to `target` at `ns`.
    pub fn posted(&self, target: usize, vector: u8, ns: u64) {
        if let Some(slot) = self.posted_at.get().and_then(|s| s.get(target)) {
            slot[usize::from(vector)].store(ns.saturating_add(1), Ordering::Release);
        }
    }

    /// `vcpu` injects `vector` at `ns`: adds post-to-injection if the post was timed.
    pub fn injected(&self, vcpu: usize, vector: u8, ns: u64) {
        let Some(slot) = self.posted_at.get().and_then(|s| s.get(vcpu)) else {
            return;
        };
        let posted = slot[usize::from(vector)].swap(0, Ordering::Acquire);
        if posted != 0 {
            self.post_to_inject
                .add(vector, ns.saturating_sub(posted - 1));
        }
    }

    /// `vector` was EOIed `ns` after its injection.
    pub fn eoi(&self, vector: u8, ns: u64) {
        self.inject_to_eoi.add(vector, ns);
    }

    /// A level-triggered IOAPIC message with `vector` was sent at `ns` (`split`).
    pub fn level_posted(&self, vector: u8, ns: u64) {
        self.level_posted_at[usize::from(vector)].store(ns.saturating_add(1), Ordering::Release);
    }

    /// KVM reported the EOI of level-triggered `vector` at `ns`: adds post-to-EOI if its post
    /// was timed (once per post).
    pub fn level_eoi(&self, vector: u8, ns: u64) {
        let posted = self.level_posted_at[usize::from(vector)].swap(0, Ordering::Acquire);
        if posted != 0 {
            self.post_to_eoi.add(vector, ns.saturating_sub(posted - 1));
        }
    }

    /// Every non-empty bucket as a counter: `post_to_inject_vector_0x30_lt_4096ns` counts the
    /// deliveries of vector 0x30 that took less than 4096 ns (and at least half that).
    pub fn visit(&self, out: &mut dyn FnMut(&str, u64)) {
        self.post_to_inject.visit("post_to_inject", out);
        self.inject_to_eoi.visit("inject_to_eoi", out);
        self.post_to_eoi.visit("post_to_eoi", out);
    }

    /// The buckets of one vector (post to injection, injection to EOI), for tests.
    pub fn counts(&self, vector: u8) -> ([u64; BUCKETS], [u64; BUCKETS]) {
        (
            self.post_to_inject.counts(vector),
            self.inject_to_eoi.counts(vector),
        )
    }

    /// The post-to-EOI buckets of one level-triggered vector, for tests.
    pub fn level_counts(&self, vector: u8) -> [u64; BUCKETS] {
        self.post_to_eoi.counts(vector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(1024), 10);
        assert_eq!(bucket(2047), 10);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_bound(10), 2048);
    }

    /// A post then its injection lands in one bucket; an injection without a post adds nothing;
    /// the EOI's latency goes to the other histogram.
    #[test]
    fn post_injection_and_eoi_are_counted_once() {
        let l = Latency::new();
        l.init(2);
        l.posted(1, 0x30, 1000);
        l.injected(1, 0x30, 1000 + 3000);
        l.injected(1, 0x30, 9000);
        l.injected(0, 0x30, 9000);
        l.eoi(0x30, 500);
        let (p2i, i2e) = l.counts(0x30);
        assert_eq!(p2i[bucket(3000)], 1);
        assert_eq!(p2i.iter().sum::<u64>(), 1);
        assert_eq!(i2e[bucket(500)], 1);
        let mut names = Vec::new();
        l.visit(&mut |name, n| names.push((name.to_string(), n)));
        assert_eq!(
            names,
            [
                ("post_to_inject_vector_0x30_lt_4096ns".to_string(), 1),
                ("inject_to_eoi_vector_0x30_lt_512ns".to_string(), 1)
            ]
        );
    }

    /// `split`: a level post's EOI counts once; an EOI with no timed post adds nothing.
    #[test]
    fn level_post_to_eoi_is_counted_once() {
        let l = Latency::new();
        l.level_posted(0x71, 1000);
        l.level_eoi(0x71, 1000 + 5000);
        l.level_eoi(0x71, 9000);
        let counts = l.level_counts(0x71);
        assert_eq!(counts[bucket(5000)], 1);
        assert_eq!(counts.iter().sum::<u64>(), 1);
        let mut names = Vec::new();
        l.visit(&mut |name, n| names.push((name.to_string(), n)));
        assert_eq!(
            names,
            [("post_to_eoi_vector_0x71_lt_8192ns".to_string(), 1)]
        );
    }
}
