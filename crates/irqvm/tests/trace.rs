//! The flight recorder on known guests (`user` mode, recording from the first instruction):
//! every fixed IPI of `ipi` and every IOAPIC interrupt of `ioapic` (edge and level) has its post,
//! its injection on the target vCPU and its EOI there, in that order, joined by one id; the
//! level interrupts set remote IRR when posted and clear it at their EOI; nothing is dropped;
//! and the trace file says the same when read back by `irqvm trace report`'s parser. Nothing
//! here asserts a timing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::trace::{chrome, report, Dump, Event, Kind, Source};
use irqvm::vm::Vm;
use irqvm::IrqchipMode;

/// Runs guest `name` on `cpus` vCPUs with the recorder on from the start; returns the dump.
fn traced(name: &str, cpus: u32) -> Dump {
    let _one = common::exclusive();
    let mut cfg = common::guest_config(name, cpus, IrqchipMode::User);
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::Capture(capture.clone());
    let vm = Vm::new(&cfg).expect("VM");
    vm.tracer().start().expect("start");
    let vm = vm.start().expect("start");
    let tracer = vm.tracer().clone();
    let report = vm.wait(Some(Duration::from_secs(120)));
    let dump = tracer.stop().expect("stop");
    let output = capture.text();
    assert!(report.is_ok(), "{report:?}\n{output}");
    assert!(
        output.contains("DONE:") && output.contains(" 0 failed"),
        "{output}"
    );
    dump
}

/// A post, its injection and its EOI.
#[derive(Debug, Default)]
struct Life {
    post: Option<Event>,
    injections: Vec<Event>,
    eois: Vec<Event>,
}

/// Joins every event with an id; asserts the order and vCPU rules for each interrupt of a
/// fixed (or lowest-priority) post and returns the lives by id.
fn lives(dump: &Dump) -> BTreeMap<u64, Life> {
    assert_eq!(dump.dropped_total(), 0, "no event may be dropped");
    let mut by_id: BTreeMap<u64, Life> = BTreeMap::new();
    for e in &dump.events {
        match e.kind {
            Kind::Post if e.arg <= 1 => {
                let life = by_id.entry(e.id).or_default();
                assert!(life.post.is_none(), "two posts with id {}", e.id);
                life.post = Some(*e);
            }
            Kind::Inject if e.arg == 0 => {
                assert_ne!(e.id, 0, "an APIC injection without its post: {e:?}");
                by_id.entry(e.id).or_default().injections.push(*e);
            }
            Kind::Eoi => {
                assert_ne!(e.id, 0, "an EOI without its injection: {e:?}");
                by_id.entry(e.id).or_default().eois.push(*e);
            }
            _ => {}
        }
    }
    for (id, life) in &by_id {
        let post = life
            .post
            .unwrap_or_else(|| panic!("id {id} has no post: {life:?}"));
        let [inject] = life.injections[..] else {
            panic!("id {id} must be injected exactly once: {life:?}");
        };
        let [eoi] = life.eois[..] else {
            panic!("id {id} must be EOIed exactly once: {life:?}");
        };
        assert_eq!(inject.vcpu, post.vcpu, "injected on the target: {life:?}");
        assert_eq!(eoi.vcpu, post.vcpu, "EOIed on the target: {life:?}");
        assert_eq!((inject.vector, eoi.vector), (post.vector, post.vector));
        assert!(
            post.ns <= inject.ns && inject.ns <= eoi.ns,
            "order: {life:?}"
        );
    }
    by_id
}

/// The trace file, read back as `irqvm trace report` reads it, joins the same interrupts.
fn file_agrees(dump: &Dump, lives: &BTreeMap<u64, Life>) {
    let json = chrome::to_json(dump);
    let text = serde_json::to_string(&json).unwrap();
    let trace = report::parse(&serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(trace.dropped, 0);
    let read: BTreeMap<u64, report::Delivery> = report::deliveries(&trace)
        .into_iter()
        .filter(|d| lives.contains_key(&d.id))
        .map(|d| (d.id, d))
        .collect();
    assert_eq!(read.len(), lives.len());
    for (id, d) in &read {
        let life = &lives[id];
        let post = life.post.unwrap();
        assert_eq!(d.target, u64::from(post.vcpu));
        assert_eq!(d.vector, post.vector);
        let (inject_tid, _) = d.inject.expect("injection in the file");
        let (eoi_tid, _) = d.eoi.expect("EOI in the file");
        assert_eq!((inject_tid, eoi_tid), (d.target, d.target), "{d:?}");
    }
    let table = report::text(&trace);
    assert!(
        table.contains("per vector") && table.contains("per source"),
        "{table}"
    );
    // Every flow has a start and an end: Perfetto draws each as post -> injection -> EOI.
    let flows: Vec<&serde_json::Value> = json["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "irq")
        .collect();
    for id in lives.keys() {
        let phases: Vec<&str> = flows
            .iter()
            .filter(|e| e["id"] == *id)
            .map(|e| e["ph"].as_str().unwrap())
            .collect();
        assert_eq!(phases, ["s", "t", "f"], "flow of id {id}");
    }
}

#[test]
fn ipi_guest_every_ipi_is_posted_injected_and_eoied_on_its_target() {
    let dump = traced("ipi", 2);
    let lives = lives(&dump);
    let ipis = lives
        .values()
        .filter(|l| matches!(l.post.unwrap().source, Source::Ipi(_)))
        .count();
    assert!(
        ipis >= 20,
        "the ipi guest sends dozens of fixed IPIs, got {ipis}"
    );
    // Both vCPUs sent and received.
    for vcpu in 0..2u16 {
        assert!(lives.values().any(|l| l.post.unwrap().vcpu == vcpu));
        assert!(lives
            .values()
            .any(|l| l.post.unwrap().source == Source::Ipi(vcpu)));
    }
    // INIT and SIPI reached the AP and were accepted there.
    let on_ap = |k: Kind| dump.events.iter().any(|e| e.kind == k && e.vcpu == 1);
    assert!(on_ap(Kind::InitAccept) && on_ap(Kind::SipiAccept));
    // Entries and exits alternate on each vCPU.
    for vcpu in 0..2u16 {
        let mut inside = false;
        for e in dump.events.iter().filter(|e| e.vcpu == vcpu) {
            match e.kind {
                Kind::Entry => {
                    assert!(!inside, "two entries without an exit");
                    inside = true;
                }
                Kind::Exit => {
                    assert!(inside, "an exit without an entry");
                    inside = false;
                }
                _ => {}
            }
        }
    }
    file_agrees(&dump, &lives);
}

#[test]
fn ioapic_guest_level_interrupts_hold_remote_irr_across_their_eoi() {
    let dump = traced("ioapic", 2);
    let lives = lives(&dump);
    const V_LEVEL: u8 = 0x71;
    let level: Vec<&Life> = lives
        .values()
        .filter(|l| l.post.unwrap().vector == V_LEVEL)
        .collect();
    assert!(
        level.len() >= 3,
        "the guest takes the level line several times"
    );
    for life in &level {
        let post = life.post.unwrap();
        assert!(matches!(post.source, Source::Ioapic(_)), "{post:?}");
        let remote_irr = |set: u64| {
            dump.events
                .iter()
                .filter(|e| e.kind == Kind::RemoteIrr && e.vector == V_LEVEL && e.arg == set)
                .map(|e| e.ns)
                .collect::<Vec<_>>()
        };
        assert!(
            remote_irr(1).contains(&post.ns),
            "remote IRR set by the post"
        );
        let eoi = life.eois[0].ns;
        assert!(
            remote_irr(0).iter().any(|&t| t >= eoi),
            "remote IRR cleared after the EOI"
        );
    }
    // The edge line came from the IOAPIC too, with its GSI.
    assert!(lives
        .values()
        .any(|l| l.post.unwrap().source == Source::Ioapic(Some(10))));
    file_agrees(&dump, &lives);
}
