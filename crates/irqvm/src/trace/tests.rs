use std::time::Instant;

use super::*;

fn tracer(vcpus: usize, capacity: usize) -> Tracer {
    let t = Tracer::new(vcpus, Instant::now(), "user");
    t.set_capacity(capacity);
    t
}

/// A full ring keeps the newest events, drops the oldest and counts them; the trace file says
/// how many.
#[test]
fn a_full_ring_drops_the_oldest_and_counts_them() {
    let t = tracer(1, 4);
    t.start().unwrap();
    for ns in 1..=10 {
        t.record(Event::new(ns, Kind::Kick, 0));
    }
    let dump = t.stop().unwrap();
    let kept: Vec<u64> = dump.events.iter().map(|e| e.ns).collect();
    assert_eq!(kept, [7, 8, 9, 10]);
    assert_eq!(
        dump.dropped,
        [0, 6],
        "this thread records into the platform ring"
    );
    assert_eq!(dump.dropped_total(), 6);
    let json = chrome::to_json(&dump);
    assert_eq!(json["otherData"]["dropped_events"], 6);
    assert_eq!(report::parse(&json).unwrap().dropped, 6);
}

/// A vCPU thread records into its own ring, other threads into the platform ring; a restart
/// begins empty with zero drops.
#[test]
fn rings_are_per_vcpu_and_restart_empty() {
    let t = std::sync::Arc::new(tracer(2, 2));
    t.start().unwrap();
    let t1 = t.clone();
    std::thread::spawn(move || {
        set_thread_vcpu(1);
        for ns in 0..5 {
            t1.record(Event::new(ns, Kind::Entry, 1));
        }
    })
    .join()
    .unwrap();
    t.record(Event::new(9, Kind::Kick, 0));
    let dump = t.stop().unwrap();
    assert_eq!(dump.dropped, [0, 3, 0]);
    assert_eq!(dump.events.len(), 3);
    assert!(matches!(t.stop(), Err(TraceError::NotOn)));
    t.start().unwrap();
    assert!(matches!(t.start(), Err(TraceError::AlreadyOn)));
    let dump = t.stop().unwrap();
    assert!(dump.events.is_empty());
    assert_eq!(dump.dropped_total(), 0);
}

/// Recording off: hooks record nothing (and the rings are not even allocated).
#[test]
fn nothing_is_recorded_while_off() {
    let t = tracer(1, 8);
    hooks::entry(&t, 0);
    hooks::notified(&t, 0, true);
    assert!(t.rings.get().is_none());
    t.start().unwrap();
    assert!(t.stop().unwrap().events.is_empty());
}

/// The ids: a post's id goes to the injection of that vector on that vCPU, then to its EOI; a
/// second post before the injection takes over (the IRR merges them).
#[test]
fn injection_and_eoi_take_the_post_id() {
    let t = std::sync::Arc::new(tracer(2, 64));
    t.start().unwrap();
    let first = t.post(1, 1, 0x40, Source::Ipi(0), PostArg::mode(0));
    let second = t.post(2, 1, 0x40, Source::Ipi(0), PostArg::mode(0));
    assert_ne!(first, second);
    let mut probe = VcpuProbe::new(t.clone(), 1);
    probe.injected(0x40);
    probe.eoi(0x40);
    let dump = t.stop().unwrap();
    let find = |k: Kind| dump.events.iter().find(|e| e.kind == k).unwrap();
    assert_eq!(find(Kind::Inject).id, second);
    assert_eq!(find(Kind::Eoi).id, second);
    assert_eq!(find(Kind::Inject).vcpu, 1);
    let trace = report::parse(&chrome::to_json(&dump)).unwrap();
    let d = report::deliveries(&trace);
    assert_eq!(d.len(), 2);
    assert!(d[0].inject.is_none(), "the merged post has no injection");
    assert_eq!(d[1].inject.map(|(tid, _)| tid), Some(1));
    assert_eq!(d[1].eoi.map(|(tid, _)| tid), Some(1));
}

/// The report's table: one row per vector and per source with the latencies.
#[test]
fn report_prints_percentiles_per_vector_and_source() {
    let t = std::sync::Arc::new(tracer(1, 64));
    t.start().unwrap();
    t.post(1000, 0, 0x30, Source::Timer, PostArg::mode(0));
    let dump = {
        let mut d = t.stop().unwrap();
        let id = d.events[0].id;
        d.events
            .push(Event::new(4000, Kind::Inject, 0).vector(0x30).id(id));
        d.events
            .push(Event::new(9000, Kind::Eoi, 0).vector(0x30).id(id));
        d
    };
    let text = report::text(&report::parse(&chrome::to_json(&dump)).unwrap());
    let row = text
        .lines()
        .find(|l| l.starts_with("0x30"))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..4], ["0x30", "1", "|", "1"], "{row}");
    assert_eq!(cols[4], "3.0", "p50 post -> inject in µs: {row}");
    assert_eq!(cols[10], "5.0", "p50 inject -> EOI in µs: {row}");
    assert!(text.lines().any(|l| l.starts_with("timer")), "{text}");
}

/// An event is 32 bytes (40 in the ring with its slot's stamp): what the docs' ring sizes assume.
#[test]
fn an_event_is_32_bytes() {
    assert_eq!(std::mem::size_of::<Event>(), 32);
}
