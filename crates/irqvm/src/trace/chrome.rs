//! A [`Dump`] as Chrome Trace Event JSON (the JSON object format that Perfetto and
//! chrome://tracing load): process "irqvm" with one track (thread) per vCPU and tracks for the
//! IOAPIC, the PIC, the APIC timers and other devices/the host.
//!
//! * vCPU tracks: `guest` slices from entry to exit (args: the exit reason and its port, address
//!   or MSR), `halted` / `wait_for_sipi` / `ap_reset_hold` slices while blocked, and zero-length
//!   slices `inject` and `eoi`; instants for kicks, doorbell wake-ups, MP-state changes and
//!   INIT/SIPI acceptance.
//! * A post is a zero-length `post` slice on its source's track (the sending vCPU for an IPI,
//!   the IOAPIC, PIC, timer or device track otherwise); a flow (`ph` s/t/f, `id` = the
//!   interrupt's id, binding to the enclosing slice) runs from the device line's assertion that
//!   caused it (if recorded) to it, to its injection and on to its EOI, as far as each step was
//!   seen (`split`: a post handed to KVM has no injection, a level one has KVM's EOI exit).
//! * Device lines: `line N high` / `line N low` slices on the `IRQ lines` track. An IOAPIC post
//!   made by a line change names it (`args.asserted_ts`); a PIC interrupt's post is dated at the
//!   assertion that latched the request (its ISA IRQ's first rise since its last INTA), with its
//!   INTA as a `pic_inta` slice on the PIC track and `args.inta_ts`.
//! * `otherData` (shown as metadata) holds the irqchip mode, the vCPU count and the events the
//!   rings dropped (`dropped_events`, and per ring).
//!
//! Timestamps are microseconds since the VM's start, with nanosecond decimals.

use std::collections::HashMap;
use std::io::Write;

use serde_json::{json, Value};

use super::{Dump, Event, ExitReason, Kind, PostArg, Source, EOI_KVM, EOI_PIC};

/// Track (thread) ids of the platform tracks.
pub const TID_IOAPIC: u64 = 1000;
pub const TID_PIC: u64 = 1001;
pub const TID_TIMERS: u64 = 1002;
pub const TID_DEVICES: u64 = 1003;
pub const TID_LINES: u64 = 1004;
const PID: u64 = 1;

fn ts(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn mp_state_name(value: u64) -> &'static str {
    crate::vcpu::mp_state_from_kvm(value as u32).map_or("unknown", crate::vcpu::mp_state_name)
}

fn block_name(arg: u64) -> &'static str {
    match arg {
        1 => "halted",
        2 => "wait_for_sipi",
        _ => "ap_reset_hold",
    }
}

/// The track a post is drawn on: where it came from.
fn source_track(source: Source) -> u64 {
    match source {
        Source::Ipi(from) => u64::from(from),
        Source::Ioapic(_) => TID_IOAPIC,
        Source::Pic => TID_PIC,
        Source::Timer => TID_TIMERS,
        Source::Msi | Source::Host | Source::Unknown => TID_DEVICES,
    }
}

fn source_args(source: Source, args: &mut serde_json::Map<String, Value>) {
    args.insert("source".into(), source.name().into());
    match source {
        Source::Ipi(from) => {
            args.insert("from".into(), from.into());
        }
        Source::Ioapic(Some(gsi)) => {
            args.insert("gsi".into(), gsi.into());
        }
        _ => {}
    }
}

fn delivery_mode_name(arg: u64) -> &'static str {
    match PostArg(arg).delivery_mode() {
        0 => "fixed",
        1 => "lowest_priority",
        2 => "smi",
        4 => "nmi",
        5 => "init",
        6 => "startup",
        _ => "extint",
    }
}

/// Builds the JSON value of a dump.
pub struct Writer<'a> {
    dump: &'a Dump,
    out: Vec<Value>,
    /// Per vCPU: the open guest slice's start, and the open block (start, reason).
    guest_since: Vec<Option<u64>>,
    blocked_since: Vec<Option<(u64, u64)>>,
    /// Ids with an injection, and with an EOI (a flow ends at the last step it has).
    injected: HashMap<u64, ()>,
    eoied: HashMap<u64, ()>,
    /// Ids whose post (or INTA) is in the dump (a flow starts there or at its line).
    posted: HashMap<u64, ()>,
    /// Source of each post id (for the injection's args).
    sources: HashMap<u64, Source>,
    /// Per GSI: the time of its latest assertion, and the first assertion not yet served by a
    /// PIC INTA (an edge latches the PIC's IRR at the first rise).
    rose: HashMap<u8, u64>,
    pic_request: HashMap<u8, u64>,
}

impl<'a> Writer<'a> {
    pub fn new(dump: &'a Dump) -> Self {
        let mut injected = HashMap::new();
        let mut eoied = HashMap::new();
        let mut posted = HashMap::new();
        for e in dump.events.iter().filter(|e| e.id != 0) {
            let set = match e.kind {
                Kind::Inject => &mut injected,
                Kind::Eoi => &mut eoied,
                Kind::Post | Kind::PicInta => &mut posted,
                _ => continue,
            };
            set.insert(e.id, ());
        }
        Self {
            dump,
            out: Vec::with_capacity(dump.events.len() * 2 + 16),
            guest_since: vec![None; dump.vcpus],
            blocked_since: vec![None; dump.vcpus],
            injected,
            eoied,
            posted,
            sources: HashMap::new(),
            rose: HashMap::new(),
            pic_request: HashMap::new(),
        }
    }

    /// The whole trace file's JSON.
    pub fn build(mut self) -> Value {
        self.metadata();
        for e in &self.dump.events {
            self.event(e);
        }
        let end = self.dump.events.last().map_or(0, |e| e.ns);
        self.close_open_slices(end);
        json!({
            "traceEvents": self.out,
            "displayTimeUnit": "ns",
            "otherData": {
                "generator": "irqvm flight recorder",
                "irqchip": self.dump.mode,
                "vcpus": self.dump.vcpus,
                "dropped_events": self.dump.dropped_total(),
                "dropped_per_ring": self.dump.dropped,
            },
        })
    }

    fn metadata(&mut self) {
        self.out.push(json!({
            "ph": "M", "pid": PID, "tid": 0, "name": "process_name",
            "args": {"name": "irqvm"},
        }));
        let mut tracks: Vec<(u64, String)> = (0..self.dump.vcpus)
            .map(|i| (i as u64, format!("vCPU {i}")))
            .collect();
        tracks.extend([
            (TID_IOAPIC, "IOAPIC".to_string()),
            (TID_PIC, "PIC".to_string()),
            (TID_TIMERS, "APIC timers".to_string()),
            (TID_DEVICES, "MSI / host".to_string()),
            (TID_LINES, "IRQ lines".to_string()),
        ]);
        for (tid, name) in tracks {
            self.out.push(json!({
                "ph": "M", "pid": PID, "tid": tid, "name": "thread_name",
                "args": {"name": name},
            }));
            self.out.push(json!({
                "ph": "M", "pid": PID, "tid": tid, "name": "thread_sort_index",
                "args": {"sort_index": tid},
            }));
        }
    }

    fn slice(&mut self, name: String, cat: &str, tid: u64, start: u64, end: u64, args: Value) {
        self.out.push(json!({
            "ph": "X", "pid": PID, "tid": tid, "name": name, "cat": cat,
            "ts": ts(start), "dur": ts(end.saturating_sub(start)), "args": args,
        }));
    }

    fn instant(&mut self, name: String, tid: u64, at: u64, args: Value) {
        self.out.push(json!({
            "ph": "i", "s": "t", "pid": PID, "tid": tid, "name": name, "cat": "vcpu",
            "ts": ts(at), "args": args,
        }));
    }

    fn flow(&mut self, ph: &str, id: u64, tid: u64, at: u64) {
        self.out.push(json!({
            "ph": ph, "pid": PID, "tid": tid, "name": "interrupt", "cat": "irq",
            "id": id, "ts": ts(at), "bp": "e",
        }));
    }

    fn event(&mut self, e: &Event) {
        let vcpu = usize::from(e.vcpu);
        let tid = u64::from(e.vcpu);
        match e.kind {
            Kind::Post => self.post(e),
            Kind::Inject => self.inject(e),
            Kind::Eoi => self.eoi(e),
            Kind::Entry => {
                if let Some(slot) = self.guest_since.get_mut(vcpu) {
                    *slot = Some(e.ns);
                }
            }
            Kind::Exit => {
                let start = self.guest_since.get_mut(vcpu).and_then(Option::take);
                let args =
                    json!({"exit": ExitReason::name(e.arg), "detail": format!("{:#x}", e.id)});
                self.slice(
                    "guest".into(),
                    "guest",
                    tid,
                    start.unwrap_or(e.ns),
                    e.ns,
                    args,
                );
            }
            Kind::Block => {
                if let Some(slot) = self.blocked_since.get_mut(vcpu) {
                    *slot = Some((e.ns, e.arg));
                }
            }
            Kind::Unblock => {
                if let Some((start, why)) = self.blocked_since.get_mut(vcpu).and_then(Option::take)
                {
                    self.slice(block_name(why).into(), "block", tid, start, e.ns, json!({}));
                }
            }
            Kind::Kick | Kind::Wake => {
                self.instant(e.kind.name().into(), tid, e.ns, json!({}));
            }
            Kind::InitAccept => self.instant("init_accept".into(), tid, e.ns, json!({})),
            Kind::SipiAccept => {
                self.instant("sipi_accept".into(), tid, e.ns, json!({"vector": e.arg}))
            }
            Kind::MpState => self.instant(
                format!("mp_state {}", mp_state_name(e.arg)),
                tid,
                e.ns,
                json!({"mp_state": mp_state_name(e.arg)}),
            ),
            Kind::TimerArm => {
                let args = json!({"vcpu": e.vcpu, "deadline_us": ts(e.arg)});
                let name = if e.arg == 0 {
                    "timer_disarm"
                } else {
                    "timer_arm"
                };
                self.slice(name.into(), "timer", TID_TIMERS, e.ns, e.ns, args);
            }
            Kind::TimerFire => {
                let args = json!({"vcpu": e.vcpu, "vector": e.vector});
                self.slice(
                    format!("timer_fire {:#04x}", e.vector),
                    "timer",
                    TID_TIMERS,
                    e.ns,
                    e.ns,
                    args,
                );
            }
            Kind::RemoteIrr => {
                let (name, set) = if e.arg == 1 {
                    ("remote_irr_set", true)
                } else {
                    ("remote_irr_clear", false)
                };
                let args = json!({"vector": e.vector, "set": set, "id": e.id});
                self.slice(
                    format!("{name} {:#04x}", e.vector),
                    "ioapic",
                    TID_IOAPIC,
                    e.ns,
                    e.ns,
                    args,
                );
            }
            Kind::PicInta => self.pic_inta(e),
            Kind::Line => self.line(e),
        }
    }

    /// The flow's first step, at the line assertion `line` if there is one (on the lines
    /// track), else at the post itself; then the post's own step.
    fn flow_from_post(&mut self, id: u64, line: Option<u64>, track: u64, at: u64) {
        let later = self.injected.contains_key(&id) || self.eoied.contains_key(&id);
        match line {
            Some(rise) => {
                self.flow("s", id, TID_LINES, rise);
                self.flow(if later { "t" } else { "f" }, id, track, at);
            }
            None if later => self.flow("s", id, track, at),
            None => {}
        }
    }

    fn line(&mut self, e: &Event) {
        let gsi = e.vector;
        let high = e.arg != 0;
        if high {
            self.rose.insert(gsi, e.ns);
            self.pic_request.entry(gsi).or_insert(e.ns);
        }
        let name = format!("line {gsi} {}", if high { "high" } else { "low" });
        let args = json!({"gsi": gsi, "level": high});
        self.slice(name, "line", TID_LINES, e.ns, e.ns, args);
    }

    /// The PIC's INTA: the interrupt's post is dated at the assertion that latched its request
    /// (if recorded), the INTA itself is a slice of its own.
    fn pic_inta(&mut self, e: &Event) {
        self.sources.insert(e.id, Source::Pic);
        let irq = u8::try_from(e.arg).ok().filter(|&irq| irq < 16);
        let request = irq.and_then(|irq| self.pic_request.remove(&irq));
        let start = request.unwrap_or(e.ns);
        let mut args = json!({
            "id": e.id, "vector": e.vector, "target": e.vcpu, "source": "pic",
            "delivery": "extint", "inta_ts": ts(e.ns),
        });
        if let Some(irq) = irq {
            args["irq"] = irq.into();
        }
        if let Some(rise) = request {
            args["asserted_ts"] = ts(rise).into();
        }
        let name = format!("post {:#04x}", e.vector);
        self.slice(name, "post", TID_PIC, start, start, args);
        let inta = json!({"id": e.id, "vector": e.vector, "vcpu": e.vcpu});
        let name = format!("pic_inta {:#04x}", e.vector);
        self.slice(name, "pic", TID_PIC, e.ns, e.ns, inta);
        self.flow_from_post(e.id, None, TID_PIC, start);
    }

    fn post(&mut self, e: &Event) {
        let track = source_track(e.source);
        let arg = PostArg(e.arg);
        let mut args = serde_json::Map::new();
        args.insert("id".into(), e.id.into());
        args.insert("vector".into(), e.vector.into());
        // A message handed to KVM has no target irqvm knows: its destination says where to.
        let target = (e.vcpu != super::NO_VCPU).then_some(e.vcpu);
        args.insert("target".into(), target.map_or("kvm".into(), Value::from));
        args.insert("delivery".into(), delivery_mode_name(e.arg).into());
        let trigger = if arg.level() { "level" } else { "edge" };
        args.insert("trigger".into(), trigger.into());
        args.insert("destination".into(), arg.destination().into());
        if arg.logical() {
            args.insert("logical".into(), true.into());
        }
        if arg.reached_none() {
            args.insert("reached".into(), "none".into());
        }
        source_args(e.source, &mut args);
        // A post from a line change is made while the line's assertion is the latest event
        // of its GSI.
        let line = match e.source {
            Source::Ioapic(Some(gsi)) => self.rose.get(&gsi).copied(),
            _ => None,
        };
        if let Some(rise) = line {
            args.insert("asserted_ts".into(), ts(rise).into());
        }
        self.sources.insert(e.id, e.source);
        let name = match arg.delivery_mode() {
            5 => "init".to_string(),
            6 => format!("sipi {:#04x}", e.vector),
            4 => "nmi".to_string(),
            _ => format!("post {:#04x}", e.vector),
        };
        self.slice(name, "post", track, e.ns, e.ns, Value::Object(args));
        self.flow_from_post(e.id, line, track, e.ns);
    }

    fn inject(&mut self, e: &Event) {
        let tid = u64::from(e.vcpu);
        let kind = match e.arg {
            1 => "extint",
            2 => "nmi",
            _ => "apic",
        };
        let mut args = json!({"id": e.id, "vector": e.vector, "kind": kind});
        if let Some(source) = self.sources.get(&e.id) {
            args["source"] = source.name().into();
        }
        self.slice(
            format!("inject {:#04x}", e.vector),
            "inject",
            tid,
            e.ns,
            e.ns,
            args,
        );
        if e.id != 0 {
            let ph = if self.eoied.contains_key(&e.id) {
                "t"
            } else {
                "f"
            };
            self.flow(ph, e.id, tid, e.ns);
        }
    }

    fn eoi(&mut self, e: &Event) {
        let tid = u64::from(e.vcpu);
        let by = match e.arg {
            EOI_PIC => "pic",
            EOI_KVM => "kvm_ioapic_eoi_exit",
            _ => "lapic",
        };
        let args = json!({"id": e.id, "vector": e.vector, "by": by});
        self.slice(
            format!("eoi {:#04x}", e.vector),
            "eoi",
            tid,
            e.ns,
            e.ns,
            args,
        );
        let started = self.injected.contains_key(&e.id) || self.posted.contains_key(&e.id);
        if e.id != 0 && started {
            self.flow("f", e.id, tid, e.ns);
        }
    }

    /// A recording that stops while a vCPU is in the guest or blocked ends its slice there.
    fn close_open_slices(&mut self, end: u64) {
        for vcpu in 0..self.dump.vcpus {
            if let Some(start) = self.guest_since[vcpu].take() {
                self.slice(
                    "guest".into(),
                    "guest",
                    vcpu as u64,
                    start,
                    end,
                    json!({"exit": "none"}),
                );
            }
            if let Some((start, why)) = self.blocked_since[vcpu].take() {
                self.slice(
                    block_name(why).into(),
                    "block",
                    vcpu as u64,
                    start,
                    end,
                    json!({}),
                );
            }
        }
    }
}

/// The dump's trace file as a JSON value.
pub fn to_json(dump: &Dump) -> Value {
    Writer::new(dump).build()
}

/// Writes the dump's trace file to `out`.
pub fn write(dump: &Dump, out: impl Write) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(out);
    serde_json::to_writer(&mut out, &to_json(dump))?;
    out.flush()
}

/// Writes the dump's trace file to `path`.
pub fn write_file(dump: &Dump, path: &std::path::Path) -> Result<(), super::TraceError> {
    let file = std::fs::File::create(path).map_err(|source| super::TraceError::Write {
        path: path.display().to_string(),
        source,
    })?;
    write(dump, file).map_err(|source| super::TraceError::Write {
        path: path.display().to_string(),
        source,
    })
}
