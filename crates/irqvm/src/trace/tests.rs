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

/// A post's `arg` keeps the message's delivery mode, trigger, destination mode and destination,
/// and KVM's "reached no LAPIC".
#[test]
fn post_arg_packs_the_message() {
    let mut message = InterruptMessage::fixed(0x71, 0x1234);
    message.trigger = irqchip::TriggerMode::Level;
    message.destination_mode = irqchip::DestinationMode::Logical;
    message.delivery_mode = DeliveryMode::LowestPriority;
    let arg = PostArg::of(&message);
    assert_eq!(
        (
            arg.delivery_mode(),
            arg.level(),
            arg.logical(),
            arg.destination()
        ),
        (1, true, true, 0x1234)
    );
    assert!(!arg.reached_none());
    let none = arg.undelivered();
    assert!(none.reached_none());
    assert_eq!(none.delivery_mode(), 1);
    let plain = PostArg::of(&InterruptMessage::fixed(0x30, 2));
    assert_eq!(plain, PostArg(2 << 32));
}

/// The PIC's chain: the INTA of IRQ 10 takes a fresh id, the OCW2 that ends IRQ 10 (on the
/// writing vCPU's thread) gets it; an OCW2 ending an IRQ whose INTA was not recorded, or the
/// same IRQ again, records nothing.
#[test]
fn pic_eoi_takes_the_id_of_its_inta() {
    let t = std::sync::Arc::new(tracer(1, 64));
    t.start().unwrap();
    let t1 = t.clone();
    std::thread::spawn(move || {
        set_thread_vcpu(0);
        let mut probe = VcpuProbe::new(t1.clone(), 0);
        probe.injected_extint(0x3A, Some(10));
        t1.pic_eoi(1 << 10 | 1 << 4);
        t1.pic_eoi(1 << 10);
    })
    .join()
    .unwrap();
    let dump = t.stop().unwrap();
    let steps: Vec<(Kind, u16, u8, u64)> = dump
        .events
        .iter()
        .map(|e| (e.kind, e.vcpu, e.vector, e.arg))
        .collect();
    assert_eq!(
        steps,
        [
            (Kind::PicInta, 0, 0x3A, 10),
            (Kind::Inject, 0, 0x3A, 1),
            (Kind::Eoi, 0, 0x3A, EOI_PIC),
        ]
    );
    let id = dump.events[0].id;
    assert!(id != 0 && dump.events.iter().all(|e| e.id == id));
}

/// A level-triggered IOAPIC post sets remote IRR with its id; the EOI that reaches the IOAPIC
/// (here KVM's EOI exit on vCPU 0) takes that id, once.
#[test]
fn kvm_eoi_takes_the_id_of_the_level_post() {
    let t = std::sync::Arc::new(tracer(1, 64));
    t.start().unwrap();
    let mut message = InterruptMessage::fixed(0x71, 0);
    message.trigger = irqchip::TriggerMode::Level;
    let id = t.post(
        5,
        NO_VCPU.into(),
        0x71,
        Source::Ioapic(Some(11)),
        PostArg::of(&message),
    );
    let probe = VcpuProbe::new(t.clone(), 0);
    probe.kvm_eoi(0x71);
    probe.kvm_eoi(0x71);
    let dump = t.stop().unwrap();
    let steps: Vec<(Kind, u8, u64, u64)> = dump
        .events
        .iter()
        .map(|e| (e.kind, e.vector, e.id, e.arg))
        .collect();
    let level = PostArg::of(&message).0;
    assert_eq!(
        steps,
        [
            (Kind::Post, 0x71, id, level),
            (Kind::RemoteIrr, 0x71, id, 1),
            (Kind::Eoi, 0x71, id, EOI_KVM),
            (Kind::RemoteIrr, 0x71, id, 0),
            (Kind::Eoi, 0x71, 0, EOI_KVM),
            (Kind::RemoteIrr, 0x71, 0, 0),
        ]
    );
}

/// The SVG draws a triangle per kick and per doorbell wake-up in the window, over the lane of
/// the vCPU they reached (the legend has one of each too).
#[test]
fn svg_draws_kicks_and_wakes() {
    let t = std::sync::Arc::new(tracer(2, 64));
    t.start().unwrap();
    let mut dump = t.stop().unwrap();
    dump.events = vec![
        Event::new(1_000, Kind::Entry, 0),
        Event::new(2_000, Kind::Kick, 0),
        Event::new(3_000, Kind::Exit, 0),
        Event::new(4_000, Kind::Block, 1).arg(1),
        Event::new(5_000, Kind::Wake, 1),
        Event::new(6_000, Kind::Unblock, 1),
        Event::new(90_000, Kind::Kick, 1),
    ];
    let trace = report::parse(&chrome::to_json(&dump)).unwrap();
    let kicks: Vec<(u64, &str, u64)> = trace
        .instants
        .iter()
        .map(|i| (i.tid, i.name.as_str(), i.ns))
        .collect();
    assert_eq!(
        kicks,
        [(0, "kick", 2_000), (1, "wake", 5_000), (1, "kick", 90_000)]
    );
    let dir = std::env::temp_dir().join(format!("irqvm-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let count = |window: report::Window| {
        let path = dir.join("t.svg");
        report::svg(&trace, &path, window).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        text.matches("<polygon").count()
    };
    let legend = 2;
    let all = report::span(&trace);
    assert_eq!(count(all), legend + 3);
    let early = report::Window {
        from: 0,
        to: 10_000,
    };
    assert_eq!(count(early), legend + 2, "the late kick is outside");
    let _ = std::fs::remove_dir_all(&dir);
}
