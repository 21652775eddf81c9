//! The flight recorder on known guests (recording from the first instruction): in `user` mode
//! every fixed IPI of `ipi` and every IOAPIC interrupt of `ioapic` (edge and level) has its post,
//! its injection on the target vCPU and its EOI there, in that order, joined by one id; the
//! level interrupts set remote IRR when posted and clear it at their EOI; in `user` and `split`
//! mode each PIC interrupt of `pic` runs from its line's assertion through the INTA and the
//! ExtINT injection to the OCW2 that ends it; in `split` mode each IOAPIC message is a post to
//! KVM joined with its line and, for a level one, with KVM's EOI exit; nothing is dropped; and
//! the trace file says the same when read back by `irqvm trace report`'s parser. Nothing here
//! asserts a timing.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::trace::{chrome, report, Dump, Event, Kind, PostArg, Source, EOI_KVM, EOI_LAPIC};
use irqvm::trace::{EOI_PIC, NO_VCPU};
use irqvm::vm::Vm;
use irqvm::IrqchipMode;

/// Runs guest `name` on `cpus` vCPUs in `user` mode with the recorder on from the start;
/// returns the dump.
fn traced(name: &str, cpus: u32) -> Dump {
    traced_in(name, cpus, IrqchipMode::User)
}

/// [`traced`] in `mode`; the guest's output must be what guests/expect lists for the mode.
fn traced_in(name: &str, cpus: u32, mode: IrqchipMode) -> Dump {
    traced_with_counters(name, cpus, mode).0
}

/// [`traced_in`], with the irqchip's counters at the end (`vm.counters`' `irqchip` part).
fn traced_with_counters(name: &str, cpus: u32, mode: IrqchipMode) -> (Dump, BTreeMap<String, u64>) {
    let _one = common::exclusive();
    let mut cfg = common::guest_config(name, cpus, mode);
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::Capture(capture.clone());
    let vm = Vm::new(&cfg).expect("VM");
    vm.tracer().start().expect("start");
    let vm = vm.start().expect("start");
    let tracer = vm.tracer().clone();
    let chip = vm.irqchip().clone();
    let report = vm.wait(Some(Duration::from_secs(120)));
    let dump = tracer.stop().expect("stop");
    let output = capture.text();
    assert!(report.is_ok(), "{report:?}\n{output}");
    if let Err(problems) = common::expect::Expectations::load(name).verify(mode, cpus, &output) {
        panic!("{name} in {mode:?}: {problems}\n{output}");
    }
    assert_eq!(dump.dropped_total(), 0, "no event may be dropped");
    let mut counters = BTreeMap::new();
    chip.counters(&mut |vcpu, name, value| {
        if vcpu.is_none() {
            counters.insert(name.to_string(), value);
        }
    });
    (dump, counters)
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
            Kind::Post if PostArg(e.arg).delivery_mode() <= 1 => {
                let life = by_id.entry(e.id).or_default();
                assert!(life.post.is_none(), "two posts with id {}", e.id);
                life.post = Some(*e);
            }
            Kind::Inject if e.arg == 0 => {
                assert_ne!(e.id, 0, "an APIC injection without its post: {e:?}");
                by_id.entry(e.id).or_default().injections.push(*e);
            }
            Kind::Eoi if e.arg == EOI_LAPIC => {
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
        assert_eq!(d.target, Some(u64::from(post.vcpu)));
        assert_eq!(d.vector, post.vector);
        let (inject_tid, _) = d.inject.expect("injection in the file");
        let (eoi_tid, _) = d.eoi.expect("EOI in the file");
        assert_eq!(Some(inject_tid), d.target, "{d:?}");
        assert_eq!(Some(eoi_tid), d.target, "{d:?}");
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
    // A post made by a line change starts its flow at the line's assertion.
    for (id, life) in lives {
        let phases: Vec<&str> = flows
            .iter()
            .filter(|e| e["id"] == *id)
            .map(|e| e["ph"].as_str().unwrap())
            .collect();
        let from_line = matches!(life.post.unwrap().source, Source::Ioapic(Some(_)));
        assert_eq!(read[id].asserted.is_some(), from_line, "{:?}", read[id]);
        let want: &[&str] = if from_line {
            &["s", "t", "t", "f"]
        } else {
            &["s", "t", "f"]
        };
        assert_eq!(phases, want, "flow of id {id}");
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
                .filter(|e| e.kind == Kind::RemoteIrr && e.arg == set && e.id == post.id)
                .map(|e| (e.ns, e.vector))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            remote_irr(1),
            [(post.ns, V_LEVEL)],
            "remote IRR set by the post"
        );
        let [(cleared, V_LEVEL)] = remote_irr(0)[..] else {
            panic!("remote IRR of {post:?} cleared once: {:?}", remote_irr(0));
        };
        assert!(
            cleared >= life.eois[0].ns,
            "remote IRR cleared after the EOI"
        );
    }
    // The edge line came from the IOAPIC too, with its GSI.
    assert!(lives
        .values()
        .any(|l| l.post.unwrap().source == Source::Ioapic(Some(10))));
    file_agrees(&dump, &lives);
}

/// The line changes of GSI `gsi` as (time, asserted).
fn line_changes(dump: &Dump, gsi: u8) -> Vec<(u64, bool)> {
    dump.events
        .iter()
        .filter(|e| e.kind == Kind::Line && e.vector == gsi)
        .map(|e| (e.ns, e.arg == 1))
        .collect()
}

/// The events with interrupt id `id`, as (kind, vCPU, vector, arg), in time order. An exit's
/// `id` field is its detail (a port, an address, an MSR), not an interrupt id, and a line
/// change's is the line's: neither belongs to a chain.
fn steps_of(dump: &Dump, id: u64) -> Vec<(Kind, u16, u8, u64)> {
    dump.events
        .iter()
        .filter(|e| e.id == id && !matches!(e.kind, Kind::Line | Kind::Exit))
        .map(|e| (e.kind, e.vcpu, e.vector, e.arg))
        .collect()
}

/// The flow phases of `id` in the file, in time order.
fn flow_phases(json: &serde_json::Value, id: u64) -> Vec<(String, u64)> {
    let mut flows: Vec<(f64, String, u64)> = json["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "irq" && e["id"] == id)
        .map(|e| {
            let ph = e["ph"].as_str().unwrap().to_string();
            (e["ts"].as_f64().unwrap(), ph, e["tid"].as_u64().unwrap())
        })
        .collect();
    flows.sort_by(|a, b| a.0.total_cmp(&b.0));
    flows.into_iter().map(|(_, ph, tid)| (ph, tid)).collect()
}

/// guests/pic.c: IRQ 10 (the slave's IR2, vector 0x3A) through LINT0 in ExtINT mode. The line
/// rises four times (latched while the IMR masks it, unmasked later; a second edge; a third for
/// the special-mask check, kept in service across a new ICW1-ICW4; a fourth while LINT0 is
/// masked); the first three are acknowledged and ended with an OCW2, the fourth never reaches
/// the CPU. Each of the three is one
/// chain: the assertion that latched it, the INTA for IRQ 10, the ExtINT injection and the PIC
/// EOI, on vCPU 0, with one id.
fn pic_chain(mode: IrqchipMode) {
    const VECTOR: u8 = 0x3A;
    let dump = traced_in("pic", 1, mode);
    let lines = line_changes(&dump, 10);
    let levels: Vec<bool> = lines.iter().map(|&(_, high)| high).collect();
    assert_eq!(
        levels,
        [true, false, true, false, true, false, true, false],
        "{lines:?}"
    );
    let intas: Vec<&Event> = dump
        .events
        .iter()
        .filter(|e| e.kind == Kind::PicInta)
        .collect();
    assert_eq!(intas.len(), 3, "three PIC interrupts: {intas:?}");
    let pic_eois = dump
        .events
        .iter()
        .filter(|e| e.kind == Kind::Eoi && e.arg == EOI_PIC)
        .count();
    assert_eq!(pic_eois, 3, "one OCW2 EOI per PIC interrupt");
    for inta in &intas {
        assert_eq!(
            steps_of(&dump, inta.id),
            [
                (Kind::PicInta, 0, VECTOR, 10),
                (Kind::Inject, 0, VECTOR, 1),
                (Kind::Eoi, 0, VECTOR, EOI_PIC),
            ],
            "the chain of id {}",
            inta.id
        );
    }
    // The file: each PIC post is dated at the rise that latched it (the first while masked,
    // then the second edge), and its flow runs post -> injection -> EOI.
    let json = chrome::to_json(&dump);
    let trace = report::parse(&json).unwrap();
    let pic: Vec<report::Delivery> = report::deliveries(&trace)
        .into_iter()
        .filter(|d| d.source == "pic")
        .collect();
    let rises = [lines[0].0, lines[2].0, lines[4].0];
    assert_eq!(pic.len(), 3);
    for (d, rise) in pic.iter().zip(rises) {
        let us = |ns: u64| ns / 1000;
        assert_eq!((d.vector, d.target), (VECTOR, Some(0)), "{d:?}");
        assert_eq!(d.asserted.map(us), Some(us(rise)), "{d:?}");
        assert_eq!(us(d.post), us(rise), "{d:?}");
        let (inject_tid, inject) = d.inject.expect("injected");
        let (eoi_tid, eoi) = d.eoi.expect("ended");
        assert_eq!((inject_tid, eoi_tid), (0, 0));
        assert!(d.post <= inject && inject <= eoi, "{d:?}");
        let phases = flow_phases(&json, d.id);
        let tids: Vec<u64> = phases.iter().map(|(_, tid)| *tid).collect();
        assert_eq!(tids, [chrome::TID_PIC, 0, 0], "{phases:?}");
    }
    let table = report::text(&trace);
    let row = table
        .lines()
        .find(|l| l.starts_with("0x3a"))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // posts | injections ... | EOIs after injection ... | post -> EOI ...
    assert_eq!(
        (cols[1], cols[3], cols[9], cols[15]),
        ("3", "3", "3", "3"),
        "{row}"
    );
}

#[test]
fn pic_guest_each_interrupt_runs_from_its_line_to_its_ocw2_in_user_mode() {
    pic_chain(IrqchipMode::User);
}

#[test]
fn pic_guest_each_interrupt_runs_from_its_line_to_its_ocw2_in_split_mode() {
    pic_chain(IrqchipMode::Split);
}

/// guests/ioapic.c on 1 vCPU in `split` mode: the userspace IOAPIC's messages go to KVM's LAPIC.
/// Each is a post without a target (KVM_SIGNAL_MSI; KVM reached a LAPIC each time), with no
/// injection (KVM's, unseen). Each post from a line change follows that line's assertion. Per
/// level vector, posts and KVM's EOI exits alternate with one id each (remote IRR holds the
/// next message back until the EOI), and the EOI clears the remote IRR its post set; the edge
/// vector has no EOI (KVM's LAPIC retires it without an exit).
#[test]
fn ioapic_guest_in_split_mode_joins_lines_messages_and_kvm_eoi_exits() {
    const V_EDGE: u8 = 0x70;
    // The entry first aimed at an APIC ID no CPU has, then at CPU 0 (guests/ioapic.c).
    const V_UNACCEPTED: u8 = 0x74;
    const ABSENT_APIC_ID: u32 = 0x55;
    // Level, with the EOI broadcast suppressed and a directed EOI (guests/ioapic.c).
    const V_DIRECTED: u8 = 0x78;
    let (dump, counters) = traced_with_counters("ioapic", 1, IrqchipMode::Split);
    let posts: Vec<&Event> = dump
        .events
        .iter()
        .filter(|e| e.kind == Kind::Post)
        .collect();
    assert!(
        posts.iter().any(|p| p.vector == V_EDGE),
        "the edge vector: {posts:?}"
    );
    assert!(
        !dump.events.iter().any(|e| e.kind == Kind::Inject),
        "KVM injects unseen"
    );
    for post in &posts {
        let arg = PostArg(post.arg);
        assert_eq!(post.vcpu, NO_VCPU, "{post:?}");
        assert!(matches!(post.source, Source::Ioapic(_)), "{post:?}");
        assert_eq!(arg.delivery_mode(), 0, "{post:?}");
        if post.vector == V_UNACCEPTED && arg.destination() == ABSENT_APIC_ID {
            // Aimed at no CPU: KVM's LAPICs took none, and remote IRR stays clear.
            assert!(arg.reached_none(), "{post:?}");
            assert_eq!(
                steps_of(&dump, post.id),
                [(Kind::Post, NO_VCPU, post.vector, post.arg)]
            );
            continue;
        }
        assert!(!arg.reached_none(), "KVM's LAPIC took {post:?}");
        assert_eq!(arg.destination(), 0, "{post:?}");
        if let Source::Ioapic(Some(gsi)) = post.source {
            let last = line_changes(&dump, gsi)
                .into_iter()
                .rfind(|&(ns, _)| ns <= post.ns);
            assert!(
                matches!(last, Some((_, true))),
                "{post:?} follows its line's rise"
            );
        }
        if !arg.level() {
            assert_eq!(
                steps_of(&dump, post.id),
                [(Kind::Post, NO_VCPU, post.vector, post.arg)]
            );
        }
    }
    let mut level_vectors: Vec<u8> = posts
        .iter()
        .filter(|p| PostArg(p.arg).level() && !PostArg(p.arg).reached_none())
        .map(|p| p.vector)
        .collect();
    level_vectors.dedup();
    level_vectors.sort_unstable();
    level_vectors.dedup();
    // V_LEVEL, V_MASKED, V_RETRIGGER, V_UNACCEPTED, V_TMR, V_RECONF, V_PULSE and V_DIRECTED
    // (guests/ioapic.c).
    assert_eq!(
        level_vectors,
        [0x71, 0x72, 0x73, V_UNACCEPTED, 0x75, 0x76, 0x77, V_DIRECTED]
    );
    // The guest suppressed the EOI broadcast for V_DIRECTED: KVM sends no EOI exit, and each
    // post's remote IRR is cleared by the guest's write of the IOAPIC's EOI register.
    let directed: Vec<&&Event> = posts.iter().filter(|p| p.vector == V_DIRECTED).collect();
    assert_eq!(directed.len(), 2, "{directed:?}");
    for post in directed {
        assert_eq!(
            steps_of(&dump, post.id),
            [
                (Kind::Post, NO_VCPU, V_DIRECTED, post.arg),
                (Kind::RemoteIrr, NO_VCPU, V_DIRECTED, 1),
                (Kind::RemoteIrr, NO_VCPU, V_DIRECTED, 0),
            ]
        );
    }
    let mut eoied = 0;
    for vector in level_vectors.into_iter().filter(|&v| v != V_DIRECTED) {
        let chain: Vec<&Event> = dump
            .events
            .iter()
            .filter(|e| e.vector == vector && matches!(e.kind, Kind::Post | Kind::Eoi))
            .filter(|e| !PostArg(e.arg).reached_none() || e.kind != Kind::Post)
            .collect();
        for pair in chain.chunks(2) {
            let post = pair[0];
            assert_eq!(post.kind, Kind::Post, "{chain:?}");
            let Some(eoi) = pair.get(1) else { continue };
            assert_eq!(
                (eoi.kind, eoi.vcpu, eoi.id, eoi.arg),
                (Kind::Eoi, 0, post.id, EOI_KVM),
                "{chain:?}"
            );
            eoied += 1;
            assert_eq!(
                steps_of(&dump, post.id),
                [
                    (Kind::Post, NO_VCPU, vector, post.arg),
                    (Kind::RemoteIrr, NO_VCPU, vector, 1),
                    (Kind::Eoi, 0, vector, EOI_KVM),
                    (Kind::RemoteIrr, NO_VCPU, vector, 0),
                ]
            );
        }
    }
    assert!(eoied >= 3, "the level lines were EOIed several times");
    // The always-on histogram counts the same EOIs (post to KVM's EOI exit).
    let histogram: u64 = counters
        .iter()
        .filter(|(name, _)| name.starts_with("post_to_eoi_vector_"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(histogram, eoied, "{counters:?}");
    // The file: targets unknown, the post -> EOI latency counted, flows from the line.
    let json = chrome::to_json(&dump);
    let trace = report::parse(&json).unwrap();
    let all = report::deliveries(&trace);
    assert_eq!(all.len(), posts.len());
    for d in &all {
        assert_eq!((d.target, d.inject), (None, None), "{d:?}");
        let from_line = d.asserted.is_some();
        let phases: Vec<String> = flow_phases(&json, d.id)
            .into_iter()
            .map(|(ph, _)| ph)
            .collect();
        let want: &[&str] = match (from_line, d.eoi.is_some()) {
            (true, true) => &["s", "t", "f"],
            (true, false) | (false, true) => &["s", "f"],
            (false, false) => &[],
        };
        assert_eq!(phases, want, "{d:?}");
    }
    let table = report::text(&trace);
    let row = table
        .lines()
        .find(|l| l.starts_with("0x71"))
        .unwrap_or_else(|| panic!("{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let level_eois = all.iter().filter(|d| d.vector == 0x71 && d.eoi.is_some());
    assert_eq!(cols[15], level_eois.count().to_string(), "{row}");
}
