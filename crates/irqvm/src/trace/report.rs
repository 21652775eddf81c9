//! `irqvm trace report FILE`: reads a trace file back ([`super::chrome`]'s format), joins each
//! post with the line assertion that caused it, its injection and its EOI by interrupt id, and
//! prints latency percentiles per vector and per source; with `--svg` it draws a window of the
//! timeline (plotters, SVG backend), kicks and doorbell wake-ups included.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::chrome::{TID_IOAPIC, TID_LINES};
use super::TraceError;

/// One `X` event of the file.
#[derive(Clone, Debug)]
pub struct Slice {
    pub tid: u64,
    pub name: String,
    pub cat: String,
    pub start_ns: u64,
    pub dur_ns: u64,
    pub args: Value,
}

/// One `i` (instant) event of the file: a kick, a doorbell wake-up, an MP-state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instant {
    pub tid: u64,
    pub name: String,
    pub ns: u64,
}

/// A trace file, as the report needs it.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Track id and name, in display order.
    pub tracks: Vec<(u64, String)>,
    pub slices: Vec<Slice>,
    pub instants: Vec<Instant>,
    /// `otherData.dropped_events`.
    pub dropped: u64,
}

/// A delivery's row in the per-vector table: its vector, or for NMI, INIT and start-up (whose
/// vector field is not a vector) the delivery mode.
fn vector_key(d: &Delivery) -> String {
    match d.delivery.as_str() {
        "fixed" | "lowest_priority" | "extint" | "" => format!("{:#04x}", d.vector),
        other => other.to_string(),
    }
}

/// One interrupt: its post and, where recorded, its injection and EOI (ns since the VM's start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: u64,
    pub vector: u8,
    pub source: String,
    /// The post's delivery mode (`fixed`, `nmi`, `init`, ...).
    pub delivery: String,
    /// The post's target vCPU (`None`: handed to KVM's LAPICs, which chose it unseen).
    pub target: Option<u64>,
    /// When the device line whose assertion caused the post rose (a PIC interrupt's post is
    /// dated there).
    pub asserted: Option<u64>,
    /// The post's track (the sending vCPU for an IPI).
    pub post_tid: u64,
    pub post: u64,
    /// (vCPU, time) of the injection and of the EOI.
    pub inject: Option<(u64, u64)>,
    pub eoi: Option<(u64, u64)>,
}

fn ns(v: &Value) -> u64 {
    (v.as_f64().unwrap_or(0.0) * 1000.0).round().max(0.0) as u64
}

fn read_error(path: &Path, reason: impl std::fmt::Display) -> TraceError {
    TraceError::Read {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a trace file.
pub fn load(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read(path).map_err(|e| read_error(path, e))?;
    let value: Value = serde_json::from_slice(&text).map_err(|e| read_error(path, e))?;
    parse(&value).map_err(|e| read_error(path, e))
}

/// Reads a trace file's JSON.
pub fn parse(value: &Value) -> Result<Trace, String> {
    let events = value
        .get("traceEvents")
        .and_then(Value::as_array)
        .ok_or("no traceEvents array")?;
    let mut trace = Trace {
        dropped: value
            .pointer("/otherData/dropped_events")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        ..Trace::default()
    };
    for e in events {
        let tid = e.get("tid").and_then(Value::as_u64).unwrap_or(0);
        let name = e.get("name").and_then(Value::as_str).unwrap_or_default();
        match e.get("ph").and_then(Value::as_str) {
            Some("M") if name == "thread_name" => {
                let track = e.pointer("/args/name").and_then(Value::as_str);
                trace
                    .tracks
                    .push((tid, track.unwrap_or_default().to_string()));
            }
            Some("i") => trace.instants.push(Instant {
                tid,
                name: name.to_string(),
                ns: ns(e.get("ts").unwrap_or(&Value::Null)),
            }),
            Some("X") => trace.slices.push(Slice {
                tid,
                name: name.to_string(),
                cat: e
                    .get("cat")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                start_ns: ns(e.get("ts").unwrap_or(&Value::Null)),
                dur_ns: ns(e.get("dur").unwrap_or(&Value::Null)),
                args: e.get("args").cloned().unwrap_or(Value::Null),
            }),
            _ => {}
        }
    }
    trace.tracks.sort();
    Ok(trace)
}

fn arg_u64(s: &Slice, key: &str) -> Option<u64> {
    s.args.get(key).and_then(Value::as_u64)
}

/// Every interrupt with an id, in post order, joined with its injection and EOI.
pub fn deliveries(trace: &Trace) -> Vec<Delivery> {
    let mut by_id: BTreeMap<u64, Delivery> = BTreeMap::new();
    for s in trace.slices.iter().filter(|s| s.cat == "post") {
        let Some(id) = arg_u64(s, "id").filter(|&id| id != 0) else {
            continue;
        };
        let source = s
            .args
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("device");
        by_id.insert(
            id,
            Delivery {
                id,
                vector: arg_u64(s, "vector").unwrap_or(0) as u8,
                source: source.to_string(),
                delivery: s
                    .args
                    .get("delivery")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                target: arg_u64(s, "target"),
                asserted: s.args.get("asserted_ts").map(ns),
                post_tid: s.tid,
                post: s.start_ns,
                inject: None,
                eoi: None,
            },
        );
    }
    for s in &trace.slices {
        let Some(d) = arg_u64(s, "id").and_then(|id| by_id.get_mut(&id)) else {
            continue;
        };
        match s.cat.as_str() {
            "inject" if d.inject.is_none() => d.inject = Some((s.tid, s.start_ns)),
            "eoi" if d.eoi.is_none() => d.eoi = Some((s.tid, s.start_ns)),
            _ => {}
        }
    }
    let mut all: Vec<Delivery> = by_id.into_values().collect();
    all.sort_by_key(|d| (d.post, d.id));
    all
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Latency figures of one group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    pub key: String,
    pub posts: usize,
    pub post_to_inject: Vec<u64>,
    pub inject_to_eoi: Vec<u64>,
    /// Post to EOI, also where the injection was not seen (`split`: KVM's EOI exits).
    pub post_to_eoi: Vec<u64>,
}

fn rows(all: &[Delivery], key: impl Fn(&Delivery) -> String) -> Vec<Row> {
    let mut groups: BTreeMap<String, Row> = BTreeMap::new();
    for d in all {
        let k = key(d);
        let row = groups.entry(k.clone()).or_insert_with(|| Row {
            key: k,
            ..Row::default()
        });
        row.posts += 1;
        if let Some((_, e)) = d.eoi {
            row.post_to_eoi.push(e.saturating_sub(d.post));
        }
        if let Some((_, i)) = d.inject {
            row.post_to_inject.push(i.saturating_sub(d.post));
            if let Some((_, e)) = d.eoi {
                row.inject_to_eoi.push(e.saturating_sub(i));
            }
        }
    }
    let mut rows: Vec<Row> = groups.into_values().collect();
    for r in &mut rows {
        r.post_to_inject.sort_unstable();
        r.inject_to_eoi.sort_unstable();
        r.post_to_eoi.sort_unstable();
    }
    rows
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn stats(v: &[u64]) -> String {
    if v.is_empty() {
        return format!("{:>6} {:>8} {:>8} {:>8} {:>8}", 0, "-", "-", "-", "-");
    }
    format!(
        "{:>6} {:>8} {:>8} {:>8} {:>8}",
        v.len(),
        us(quantile(v, 0.5)),
        us(quantile(v, 0.9)),
        us(quantile(v, 0.99)),
        us(*v.last().unwrap_or(&0))
    )
}

fn table(out: &mut String, title: &str, rows: &[Row]) {
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "{:<10} {:>6} | {:>6} {:>8} {:>8} {:>8} {:>8} | {:>6} {:>8} {:>8} {:>8} {:>8} | {:>6} {:>8} {:>8} {:>8} {:>8}",
        "", "posts", "inj", "p50", "p90", "p99", "max", "eoi", "p50", "p90", "p99", "max",
        "eoi", "p50", "p90", "p99", "max"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<10} {:>6} | {} | {} | {}",
            r.key,
            r.posts,
            stats(&r.post_to_inject),
            stats(&r.inject_to_eoi),
            stats(&r.post_to_eoi)
        );
    }
}

/// The report's text: per vector, then per source, the number of posts, then post-to-injection,
/// injection-to-EOI and post-to-EOI latency (count, p50, p90, p99, max in µs). A PIC
/// interrupt's post is the line assertion that requested it.
pub fn text(trace: &Trace) -> String {
    let all = deliveries(trace);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} interrupts, {} dropped events; latencies in µs (post -> inject | inject -> EOI | post -> EOI)",
        all.len(),
        trace.dropped
    );
    table(&mut out, "\nper vector", &rows(&all, vector_key));
    table(&mut out, "\nper source", &rows(&all, |d| d.source.clone()));
    out
}

/// The SVG's time window, in ns since the VM's start.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub from: u64,
    pub to: u64,
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Row of track `tid` in the picture (vCPUs first, then the platform tracks).
fn row_of(tracks: &[(u64, String)], tid: u64) -> Option<f64> {
    tracks.iter().position(|(t, _)| *t == tid).map(|i| i as f64)
}

/// Teal: a device line's assertion.
const LINE_COLOR: RGBColor = RGBColor(0, 140, 140);
/// Grey: a doorbell wake-up.
const WAKE_COLOR: RGBColor = RGBColor(150, 150, 150);

/// Draws the window: a lane per track, guest time as bars (blocked time lighter), line
/// assertions, posts, injections and EOIs as marks, a line from each interrupt's assertion or
/// post to its injection and on to its EOI, and kicks and wake-ups as triangles over the lane of
/// the vCPU they reached.
pub fn svg(trace: &Trace, path: &Path, window: Window) -> PlotResult {
    let tracks: Vec<(u64, String)> = trace
        .tracks
        .iter()
        .filter(|(tid, _)| {
            trace.slices.iter().any(|s| s.tid == *tid)
                || trace.instants.iter().any(|i| i.tid == *tid)
        })
        .cloned()
        .collect();
    let lanes = tracks.len().max(1) as f64;
    let (from, to) = (window.from, window.to.max(window.from + 1));
    let x = |ns: u64| (ns.clamp(from, to) - from) as f64 / 1000.0;
    let width = x(to);
    let root = SVGBackend::new(path, (1200, 120 + 50 * tracks.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "interrupts from {:.1} µs to {:.1} µs",
                from as f64 / 1e3,
                to as f64 / 1e3
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .margin_top(40)
        .x_label_area_size(40)
        .y_label_area_size(110)
        .build_cartesian_2d(0f64..width, -0.5f64..lanes - 0.5)?;
    let names = tracks.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(tracks.len().max(1))
        .y_label_formatter(&move |y: &f64| {
            let i = y.round();
            if (y - i).abs() > 0.01 || i < 0.0 {
                return String::new();
            }
            names
                .get(i as usize)
                .map(|(_, n)| n.clone())
                .unwrap_or_default()
        })
        .x_desc(format!("µs after {:.1} µs", from as f64 / 1e3))
        .draw()?;
    let visible = |s: &Slice| s.start_ns + s.dur_ns >= from && s.start_ns <= to;
    for s in trace.slices.iter().filter(|s| visible(s)) {
        let Some(row) = row_of(&tracks, s.tid) else {
            continue;
        };
        let style = match s.cat.as_str() {
            "guest" => RGBColor(120, 170, 230).filled(),
            "block" => RGBColor(220, 220, 220).filled(),
            _ => continue,
        };
        let (a, b) = (x(s.start_ns), x(s.start_ns + s.dur_ns));
        chart.draw_series(std::iter::once(Rectangle::new(
            [(a, row - 0.3), (b, row + 0.3)],
            style,
        )))?;
    }
    remote_irr_bars(&mut chart, trace, &tracks, &x, (from, to))?;
    let all = deliveries(trace);
    let in_window =
        |d: &&Delivery| d.post <= to && d.eoi.or(d.inject).map_or(d.post, |(_, t)| t) >= from;
    // In service: a thin bar under the vCPU's lane from injection to EOI.
    for d in all.iter().filter(in_window) {
        if let (Some((tid, i)), Some((_, e))) = (d.inject, d.eoi) {
            if let Some(row) = row_of(&tracks, tid) {
                let style = RGBColor(250, 160, 40).filled();
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(x(i), row - 0.42), (x(e), row - 0.34)],
                    style,
                )))?;
            }
        }
    }
    line_marks(&mut chart, trace, &tracks, &x, (from, to))?;
    for d in all.iter().filter(in_window) {
        // The PIC's post is dated at its line's assertion: one mark on the PIC lane says both.
        let line = d.asserted.filter(|&t| t != d.post).map(|t| (TID_LINES, t));
        let steps = [
            (line, LINE_COLOR),
            (Some((d.post_tid, d.post)), RED),
            (d.inject, GREEN),
            (d.eoi, MAGENTA),
        ];
        let points: Vec<((f64, f64), RGBColor)> = steps
            .into_iter()
            .filter_map(|(step, color)| {
                let (tid, t) = step?;
                Some(((x(t), row_of(&tracks, tid)?), color))
            })
            .collect();
        chart.draw_series(std::iter::once(PathElement::new(
            points.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            BLACK.mix(0.5),
        )))?;
        for (p, color) in points {
            chart.draw_series(std::iter::once(Circle::new(p, 3, color.filled())))?;
        }
    }
    notifications(&mut chart, trace, &tracks, &x, (from, to))?;
    for s in trace
        .slices
        .iter()
        .filter(|s| s.cat == "ioapic" && visible(s))
    {
        if let Some(row) = row_of(&tracks, s.tid) {
            let color = if s.name.starts_with("remote_irr_set") {
                RED
            } else {
                BLUE
            };
            let p = x(s.start_ns);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(p, row - 0.35), (p, row + 0.35)],
                color.stroke_width(2),
            )))?;
        }
    }
    legend(&root)?;
    root.present()?;
    Ok(())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// On the IOAPIC lane, a bar per vector from remote IRR set to its clearing by the EOI.
fn remote_irr_bars(
    chart: &mut Chart<'_, '_>,
    trace: &Trace,
    tracks: &[(u64, String)],
    x: &dyn Fn(u64) -> f64,
    (from, to): (u64, u64),
) -> PlotResult {
    let Some(row) = row_of(tracks, TID_IOAPIC) else {
        return Ok(());
    };
    let mut held: BTreeMap<u64, u64> = BTreeMap::new();
    let mut bars = Vec::new();
    for s in trace.slices.iter().filter(|s| s.cat == "ioapic") {
        let vector = arg_u64(s, "vector").unwrap_or(0);
        if s.args.get("set").and_then(Value::as_bool) == Some(true) {
            held.entry(vector).or_insert(s.start_ns);
        } else if let Some(start) = held.remove(&vector) {
            bars.push((start, s.start_ns));
        }
    }
    bars.extend(held.into_values().map(|start| (start, to)));
    for (a, b) in bars.into_iter().filter(|&(a, b)| b >= from && a <= to) {
        let style = RGBColor(240, 150, 150).filled();
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x(a), row - 0.2), (x(b), row + 0.2)],
            style,
        )))?;
    }
    Ok(())
}

/// On the lines lane, a tick per line change: teal when asserted, grey when deasserted.
fn line_marks(
    chart: &mut Chart<'_, '_>,
    trace: &Trace,
    tracks: &[(u64, String)],
    x: &dyn Fn(u64) -> f64,
    (from, to): (u64, u64),
) -> PlotResult {
    let Some(row) = row_of(tracks, TID_LINES) else {
        return Ok(());
    };
    let changes = trace.slices.iter().filter(|s| s.cat == "line");
    for s in changes.filter(|s| (from..=to).contains(&s.start_ns)) {
        let high = s.args.get("level").and_then(Value::as_bool) == Some(true);
        let color = if high { LINE_COLOR } else { WAKE_COLOR };
        let p = x(s.start_ns);
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(p, row - 0.3), (p, row + 0.3)],
            color.stroke_width(2),
        )))?;
    }
    Ok(())
}

/// Kicks (black) and doorbell wake-ups (grey) as triangles over the lane of the vCPU they
/// reached: when a poster (another vCPU, a device, the PIC's INTR) forced it out of KVM_RUN or
/// woke it from its block.
fn notifications(
    chart: &mut Chart<'_, '_>,
    trace: &Trace,
    tracks: &[(u64, String)],
    x: &dyn Fn(u64) -> f64,
    (from, to): (u64, u64),
) -> PlotResult {
    for i in trace
        .instants
        .iter()
        .filter(|i| (from..=to).contains(&i.ns))
    {
        let color = match i.name.as_str() {
            "kick" => BLACK,
            "wake" => WAKE_COLOR,
            _ => continue,
        };
        if let Some(row) = row_of(tracks, i.tid) {
            let mark = TriangleMarker::new((x(i.ns), row + 0.4), 5, color.filled());
            chart.draw_series(std::iter::once(mark))?;
        }
    }
    Ok(())
}

fn legend(root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> PlotResult {
    let items: [(&str, RGBColor); 11] = [
        ("line asserted", LINE_COLOR),
        ("post", RED),
        ("injection", GREEN),
        ("EOI", MAGENTA),
        ("kick", BLACK),
        ("wake", WAKE_COLOR),
        ("in the guest", RGBColor(120, 170, 230)),
        ("halted", RGBColor(220, 220, 220)),
        ("in service (ISR)", RGBColor(250, 160, 40)),
        ("remote IRR held", RGBColor(240, 150, 150)),
        ("remote IRR cleared", BLUE),
    ];
    let mut x = 130;
    for (i, (label, color)) in items.iter().enumerate() {
        match i {
            0..=3 => root.draw(&Circle::new((x, 16), 4, color.filled()))?,
            4 | 5 => root.draw(&TriangleMarker::new((x, 16), 5, color.filled()))?,
            10 => root.draw(&PathElement::new(
                vec![(x, 10), (x, 22)],
                color.stroke_width(2),
            ))?,
            _ => root.draw(&Rectangle::new([(x - 5, 11), (x + 5, 21)], color.filled()))?,
        }
        root.draw(&Text::new(*label, (x + 8, 10), ("sans-serif", 13)))?;
        x += 24 + 7 * label.len() as i32;
    }
    Ok(())
}

/// The window around the first delivery of `vector` posted at or after `after` that has its
/// injection and EOI: from before its post to after its EOI by half its life plus 20 µs.
pub fn focus(trace: &Trace, vector: u8, after: u64) -> Option<Window> {
    let d = deliveries(trace)
        .into_iter()
        .find(|d| d.vector == vector && d.post >= after && d.eoi.is_some())?;
    let end = d.eoi.map_or(d.post, |(_, t)| t);
    let pad = (end - d.post) / 2 + 20_000;
    Some(Window {
        from: d.post.saturating_sub(pad),
        to: end + pad,
    })
}

/// The whole trace's time span (ns): its slices and instants.
pub fn span(trace: &Trace) -> Window {
    let starts = trace.slices.iter().map(|s| s.start_ns);
    let instants = trace.instants.iter().map(|i| i.ns);
    let from = starts.chain(instants.clone()).min().unwrap_or(0);
    let ends = trace.slices.iter().map(|s| s.start_ns + s.dur_ns);
    let to = ends.chain(instants).max().unwrap_or(from + 1);
    Window { from, to }
}
