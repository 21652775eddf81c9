//! GSI routing: which interrupt controller inputs (8259 PIC lines, IOAPIC pins) and which MSI
//! messages a device's interrupt line reaches, and the level of every shared line.
//!
//! # Numbering: what a GSI is here
//!
//! A GSI ("global system interrupt") is the number a device raises, the index of this table, as in
//! KVM's routing table (`KVM_SET_GSI_ROUTING`, `KVM_IRQ_LINE`). It is neither a PIC line nor an
//! IOAPIC pin; each GSI routes to up to [`MAX_TARGETS_PER_GSI`] [`RouteTarget`]s.
//!
//! [`GsiRouting::pc_default`] builds the PC table, the one QEMU installs on KVM
//! (`kvm_pc_setup_irq_routing`), which is also what the firmware tables the VMM builds must say:
//!
//! * GSI n, n in 0..16, is ISA IRQ n. It reaches PIC line n (master IR0-7, slave IR0-7 as lines
//!   8-15) and IOAPIC pin n: GSI numbering equals IOAPIC pin numbering...
//! * ...with one exception: ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, not pin 0. The ACPI MADT
//!   declares this with an Interrupt Source Override (bus ISA, source 0, global system interrupt 2,
//!   ACPI 6.5 §5.2.12.5) and the MP table with an I/O interrupt entry (MP spec 1.4 §4.3.4). So
//!   table GSI 0 = PIC line 0 + IOAPIC pin 2. (In the ACPI sense, "GSI 2" is the IOAPIC input:
//!   ACPI numbers GSIs by IOAPIC input; the table here numbers them by ISA IRQ.)
//! * GSI 2 has no route. PIC line 2 is the master's cascade input, driven by the slave 8259
//!   inside the dual PIC (8259A datasheet, "cascade mode"), never by a device; IOAPIC pin 2 is
//!   reached through GSI 0; IOAPIC pin 0 has no source (it is where firmware would connect the
//!   8259's INTR output for "virtual wire" mode, which this machine does not wire). KVM's own
//!   default table is the plain identity (GSI 0 -> pin 0, GSI 2 -> PIC 2 + pin 2); QEMU replaces
//!   it with the table above, and so do we.
//! * GSI n, n in 16..pins, is IOAPIC pin n only: PCI INTx lines, which the PIC never sees.
//!
//! # Lines, sources and levels
//!
//! Every GSI is a wire with any number of drivers ("sources", [`SourceId`], chosen by the VMM:
//! one per device function, as KVM's `irq_source_id`). Shared PCI INTx lines are wired-OR (open
//! drain, PCI Local Bus spec 3.0 §2.2.6): the wire is asserted while at least one source asserts
//! it. [`GsiRouting::set_source_level`] records the source's level and forwards only a change of
//! the wire. A wire exists whether or not it is routed: levels survive route changes.
//!
//! Levels are *logical* (true = asserted). [`crate::ioapic::IoApic::set_line`] takes the
//! electrical level before its polarity bit, so the caller must invert the level for pins the
//! firmware declares active-low (the PCI pins 16..pins in the PC table) and drive those pins
//! high while idle; the PIC lines of the PC are active-high edge inputs and take the level as is.
//!
//! A line target (PIC line or IOAPIC pin) can be routed from several GSIs; its level is then the
//! OR of those GSIs' wires (as KVM keeps per-source levels at each chip pin), and it is told only
//! about changes of that OR. An MSI target is a message, not a level: it is sent once on each
//! rising edge of its GSI's wire and never on a falling edge (KVM's `kvm_set_msi` ignores
//! level 0), like an irqfd trigger, and always as an assert (its level bit set, as
//! `kvm_set_msi_irq` sets it).
//!
//! # Changing routes while a wire is asserted
//!
//! Every change of the table takes the same `out` callback as a level change and keeps the line
//! targets consistent with the wires: when a GSI whose wire is asserted gains a line target, that
//! target is raised; when it loses one, that target is lowered (unless another asserted GSI still
//! drives it). Raises are forwarded before lowers, and targets kept across the change see
//! nothing. A newly bound MSI message is not sent: no edge happened, and a device that needs one
//! must pulse. KVM does not do this (a route changed under an asserted line leaves the old pin
//! asserted until the source lowers the GSI, which then reaches only the new pin), which can
//! wedge a level-triggered IOAPIC pin; modelling the wire avoids it.
//!
//! # Bounds
//!
//! GSIs are below [`MAX_GSIS`], a GSI has at most [`MAX_TARGETS_PER_GSI`] distinct targets and at
//! most [`MAX_SOURCES_PER_GSI`] sources asserting it at once. Every violation is a
//! [`RoutingError`] that leaves the table unchanged; nothing panics and all work per call is
//! bounded by these limits.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ioapic::MAX_PINS;
use crate::types::InterruptMessage;

/// GSIs are `0..MAX_GSIS` (the size of KVM's routing table is 4096; 1024 is plenty for a PC).
pub const MAX_GSIS: u32 = 1024;
/// Distinct targets one GSI may reach (a PC needs two: a PIC line and an IOAPIC pin).
pub const MAX_TARGETS_PER_GSI: usize = 4;
/// Sources that may assert one GSI at the same time (a shared INTx line has a handful).
pub const MAX_SOURCES_PER_GSI: usize = 32;
/// Lines of the dual 8259 PIC: master IR0-7 are lines 0-7, slave IR0-7 are lines 8-15.
pub const PIC_LINES: u8 = 16;
/// The ISA IRQs, GSIs 0-15 of the PC table.
pub const ISA_IRQS: u32 = 16;
/// The master PIC's cascade input, driven by the slave PIC, never by a device.
pub const PIC_CASCADE_LINE: u8 = 2;
/// ISA IRQ 0, the PIT's output.
pub const ISA_TIMER_IRQ: u32 = 0;
/// The IOAPIC pin ISA IRQ 0 is wired to (MADT Interrupt Source Override 0 -> 2).
pub const ISA_TIMER_IOAPIC_PIN: usize = 2;

/// Identifies one driver of a GSI wire. The VMM picks the numbers (one per device function).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SourceId(pub u32);

/// Where a GSI goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RouteTarget {
    /// A line of the dual 8259 PIC, 0..[`PIC_LINES`] (`DualPic::set_irq`).
    Pic {
        /// The ISA IRQ line, 0..[`PIC_LINES`].
        irq: u8,
    },
    /// An IOAPIC input pin (`IoApic::set_line`).
    IoApic {
        /// The pin, 0..the IOAPIC's pin count.
        pin: usize,
    },
    /// A message put on the APIC bus on each rising edge of the wire (a device's MSI).
    Msi(InterruptMessage),
}

impl RouteTarget {
    /// The level-carrying input this target is, `None` for an MSI.
    fn line(&self) -> Option<Line> {
        match *self {
            Self::Pic { irq } => Some(Line::Pic(irq)),
            Self::IoApic { pin } => Some(Line::IoApic(pin)),
            Self::Msi(_) => None,
        }
    }
}

/// A chip input that carries a level: the key of the per-input OR over GSIs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Line {
    Pic(u8),
    IoApic(usize),
}

impl Line {
    fn target(self) -> RouteTarget {
        match self {
            Self::Pic(irq) => RouteTarget::Pic { irq },
            Self::IoApic(pin) => RouteTarget::IoApic { pin },
        }
    }
}

/// Why a routing change or a level change was refused. The table is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// The GSI is past the table ([`MAX_GSIS`]).
    #[error("GSI {0} is outside 0..{MAX_GSIS}")]
    GsiOutOfRange(u32),
    #[error("GSI {gsi}: {count} targets, at most {MAX_TARGETS_PER_GSI} allowed")]
    /// A route lists more than [`MAX_TARGETS_PER_GSI`] targets.
    TooManyTargets {
        /// The GSI being routed.
        gsi: u32,
        /// How many targets the route listed.
        count: usize,
    },
    #[error("GSI {gsi}: the same target is listed twice")]
    /// A route lists the same target twice.
    DuplicateTarget {
        /// The GSI being routed.
        gsi: u32,
    },
    #[error("GSI {gsi}: PIC line {irq} is outside 0..{PIC_LINES}")]
    /// A PIC target names a line past [`PIC_LINES`].
    PicLineOutOfRange {
        /// The GSI being routed.
        gsi: u32,
        /// The line asked for.
        irq: u8,
    },
    #[error("GSI {gsi}: IOAPIC pin {pin} does not exist ({pins} pins)")]
    /// An IOAPIC target names a pin the IOAPIC does not have.
    IoApicPinOutOfRange {
        /// The GSI being routed.
        gsi: u32,
        /// The pin asked for.
        pin: usize,
        /// The IOAPIC's pin count.
        pins: usize,
    },
    #[error("GSI {gsi}: more than {MAX_SOURCES_PER_GSI} sources asserting it at once")]
    /// More than [`MAX_SOURCES_PER_GSI`] sources would assert one GSI's wire at once.
    TooManySources {
        /// The GSI being asserted.
        gsi: u32,
    },
    #[error("routing snapshot has {found} IOAPIC pins, at most {MAX_PINS} allowed")]
    /// A routing snapshot names more IOAPIC pins than an IOAPIC can have ([`MAX_PINS`]).
    IoApicPinCount {
        /// The pin count in the snapshot.
        found: usize,
    },
}

/// One GSI: its targets and the sources currently asserting its wire.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Gsi {
    targets: Vec<RouteTarget>,
    asserted: BTreeSet<SourceId>,
}

impl Gsi {
    fn wire(&self) -> bool {
        !self.asserted.is_empty()
    }

    /// Neither routed nor asserted: nothing to remember.
    fn is_idle(&self) -> bool {
        self.targets.is_empty() && self.asserted.is_empty()
    }

    fn lines(&self) -> impl Iterator<Item = Line> + '_ {
        self.targets.iter().filter_map(RouteTarget::line)
    }
}

/// The GSI routing table with the level of every wire. See the module documentation.
///
/// Serializes the routes and every source's level; deserializing validates the bounds and
/// recomputes the derived per-input levels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GsiRoutingState")]
pub struct GsiRouting {
    ioapic_pins: usize,
    gsis: BTreeMap<u32, Gsi>,
    /// For each line target, how many asserted GSIs route to it (derived, never serialized).
    #[serde(skip)]
    driven: BTreeMap<Line, u32>,
}

/// The serialized form of [`GsiRouting`], checked before it becomes one.
#[derive(Deserialize)]
struct GsiRoutingState {
    ioapic_pins: usize,
    gsis: BTreeMap<u32, Gsi>,
}

impl TryFrom<GsiRoutingState> for GsiRouting {
    type Error = RoutingError;

    fn try_from(state: GsiRoutingState) -> Result<Self, Self::Error> {
        if state.ioapic_pins > MAX_PINS {
            return Err(RoutingError::IoApicPinCount {
                found: state.ioapic_pins,
            });
        }
        let mut table = Self::new(state.ioapic_pins);
        for (gsi, entry) in state.gsis {
            table.validate_targets(gsi, &entry.targets)?;
            if entry.asserted.len() > MAX_SOURCES_PER_GSI {
                return Err(RoutingError::TooManySources { gsi });
            }
            if entry.wire() {
                for line in entry.lines() {
                    *table.driven.entry(line).or_default() += 1;
                }
            }
            if !entry.is_idle() {
                table.gsis.insert(gsi, entry);
            }
        }
        Ok(table)
    }
}

impl GsiRouting {
    /// An empty table for a machine whose IOAPIC has `ioapic_pins` pins (0 = no IOAPIC; more
    /// than [`MAX_PINS`] is clamped).
    pub fn new(ioapic_pins: usize) -> Self {
        Self {
            ioapic_pins: ioapic_pins.min(MAX_PINS),
            gsis: BTreeMap::new(),
            driven: BTreeMap::new(),
        }
    }

    /// The PC table (see the module documentation): ISA IRQs 0-15 to PIC line n and IOAPIC pin n,
    /// IRQ 0 to IOAPIC pin 2, GSI 2 unrouted, GSIs 16..pins to the IOAPIC only. Pins that do not
    /// exist are left out. Every wire starts low.
    pub fn pc_default(ioapic_pins: usize) -> Self {
        let mut table = Self::new(ioapic_pins);
        for irq in (0..ISA_IRQS).filter(|irq| *irq != u32::from(PIC_CASCADE_LINE)) {
            let mut targets = vec![RouteTarget::Pic { irq: irq as u8 }];
            let pin = if irq == ISA_TIMER_IRQ {
                ISA_TIMER_IOAPIC_PIN
            } else {
                irq as usize
            };
            if pin < table.ioapic_pins {
                targets.push(RouteTarget::IoApic { pin });
            }
            table.insert_routes(irq, targets);
        }
        for pin in ISA_IRQS as usize..table.ioapic_pins {
            table.insert_routes(pin as u32, vec![RouteTarget::IoApic { pin }]);
        }
        table
    }

    /// Number of IOAPIC pins targets may name.
    pub fn ioapic_pins(&self) -> usize {
        self.ioapic_pins
    }

    /// The targets of `gsi` (empty when unrouted or out of range).
    pub fn targets(&self, gsi: u32) -> &[RouteTarget] {
        self.gsis.get(&gsi).map_or(&[], |entry| &entry.targets)
    }

    /// Every routed GSI with its targets, in GSI order (e.g. to build KVM routing entries).
    pub fn routes(&self) -> impl Iterator<Item = (u32, &[RouteTarget])> {
        self.gsis
            .iter()
            .filter(|(_, entry)| !entry.targets.is_empty())
            .map(|(gsi, entry)| (*gsi, entry.targets.as_slice()))
    }

    /// Whether the wire of `gsi` is asserted (some source asserts it).
    pub fn wire_level(&self, gsi: u32) -> bool {
        self.gsis.get(&gsi).is_some_and(Gsi::wire)
    }

    /// Whether `source` currently asserts `gsi`.
    pub fn source_level(&self, gsi: u32, source: SourceId) -> bool {
        self.gsis
            .get(&gsi)
            .is_some_and(|entry| entry.asserted.contains(&source))
    }

    /// The level last forwarded to a PIC line or IOAPIC pin: the OR of the wires of the GSIs
    /// routed to it. Always false for an MSI target.
    pub fn target_level(&self, target: RouteTarget) -> bool {
        target
            .line()
            .is_some_and(|line| self.driven.get(&line).is_some_and(|count| *count > 0))
    }

    // ---- Routes ----

    /// Replaces the targets of `gsi` (an empty list unroutes it). If the wire is asserted, new
    /// line targets are raised and dropped ones lowered through `out` (see "Changing routes
    /// while a wire is asserted"); new MSI targets send nothing.
    pub fn set_route(
        &mut self,
        gsi: u32,
        targets: &[RouteTarget],
        out: &mut dyn FnMut(RouteTarget, bool),
    ) -> Result<(), RoutingError> {
        check_gsi(gsi)?;
        self.validate_targets(gsi, targets)?;
        let entry = self.gsis.entry(gsi).or_default();
        let old = std::mem::replace(&mut entry.targets, targets.to_vec());
        if entry.wire() {
            let new_lines: Vec<Line> = entry.lines().collect();
            // Raise first so a target both lines share never sees a spurious low.
            for line in new_lines {
                self.drive(line, true, out);
            }
            for line in old.iter().filter_map(RouteTarget::line) {
                self.drive(line, false, out);
            }
        }
        self.forget_if_idle(gsi);
        Ok(())
    }

    /// Routes `gsi` to the single MSI `msg`, replacing its targets, as KVM's routing table does
    /// for a device's MSI vector. Sent on each later rising edge of the wire.
    pub fn bind_msi(
        &mut self,
        gsi: u32,
        msg: InterruptMessage,
        out: &mut dyn FnMut(RouteTarget, bool),
    ) -> Result<(), RoutingError> {
        self.set_route(gsi, &[RouteTarget::Msi(msg)], out)
    }

    /// Unroutes `gsi` (lowering its line targets if its wire is asserted). The sources' levels
    /// are kept: the wire still exists. Out-of-range or unrouted GSIs are ignored.
    pub fn remove(&mut self, gsi: u32, out: &mut dyn FnMut(RouteTarget, bool)) {
        if self.gsis.contains_key(&gsi) {
            // An empty route is always valid for a GSI already in the table.
            let _ = self.set_route(gsi, &[], out);
        }
    }

    // ---- Levels ----

    /// Sets the level `source` drives on `gsi`. When the wire (the OR of all sources) changes,
    /// calls `out(target, level)` for each PIC / IOAPIC target whose level changes, and, on a
    /// rising edge, `out(Msi(msg), true)` for each MSI target. An unrouted GSI keeps its level.
    pub fn set_source_level(
        &mut self,
        gsi: u32,
        source: SourceId,
        level: bool,
        out: &mut dyn FnMut(RouteTarget, bool),
    ) -> Result<(), RoutingError> {
        check_gsi(gsi)?;
        let entry = self.gsis.entry(gsi).or_default();
        let was_high = entry.wire();
        if level {
            if !entry.asserted.contains(&source) && entry.asserted.len() >= MAX_SOURCES_PER_GSI {
                return Err(RoutingError::TooManySources { gsi });
            }
            entry.asserted.insert(source);
        } else {
            entry.asserted.remove(&source);
        }
        let is_high = entry.wire();
        if was_high != is_high {
            let targets = entry.targets.clone();
            self.forward_wire_change(&targets, is_high, out);
        }
        self.forget_if_idle(gsi);
        Ok(())
    }

    /// An edge-triggered device's interrupt: `source` raises then lowers `gsi`. On an idle wire
    /// that is one rising and one falling forward per line target and one message per MSI
    /// target; on a wire another source holds asserted it is nothing (the edge is lost, as on a
    /// real shared wire). A source that was asserting the wire ends up not asserting it.
    pub fn pulse(
        &mut self,
        gsi: u32,
        source: SourceId,
        out: &mut dyn FnMut(RouteTarget, bool),
    ) -> Result<(), RoutingError> {
        self.set_source_level(gsi, source, true, out)?;
        self.set_source_level(gsi, source, false, out)
    }

    // ---- Internals ----

    /// Checks a target list against the bounds, before anything changes.
    fn validate_targets(&self, gsi: u32, targets: &[RouteTarget]) -> Result<(), RoutingError> {
        check_gsi(gsi)?;
        if targets.len() > MAX_TARGETS_PER_GSI {
            return Err(RoutingError::TooManyTargets {
                gsi,
                count: targets.len(),
            });
        }
        for (index, target) in targets.iter().enumerate() {
            match *target {
                RouteTarget::Pic { irq } if irq >= PIC_LINES => {
                    return Err(RoutingError::PicLineOutOfRange { gsi, irq });
                }
                RouteTarget::IoApic { pin } if pin >= self.ioapic_pins => {
                    return Err(RoutingError::IoApicPinOutOfRange {
                        gsi,
                        pin,
                        pins: self.ioapic_pins,
                    });
                }
                _ => {}
            }
            if targets[..index].contains(target) {
                return Err(RoutingError::DuplicateTarget { gsi });
            }
        }
        Ok(())
    }

    /// Installs already valid routes on a low wire (construction only).
    fn insert_routes(&mut self, gsi: u32, targets: Vec<RouteTarget>) {
        self.gsis.insert(
            gsi,
            Gsi {
                targets,
                asserted: BTreeSet::new(),
            },
        );
    }

    /// A GSI wire changed to `high`: update its line targets, send its MSIs on a rising edge.
    fn forward_wire_change(
        &mut self,
        targets: &[RouteTarget],
        high: bool,
        out: &mut dyn FnMut(RouteTarget, bool),
    ) {
        for target in targets {
            if let Some(line) = target.line() {
                self.drive(line, high, out);
            } else if let (RouteTarget::Msi(msg), true) = (*target, high) {
                out(RouteTarget::Msi(msg.asserting()), true);
            }
        }
    }

    /// One more (or one fewer) asserted GSI drives `line`; forward when its OR changes.
    fn drive(&mut self, line: Line, high: bool, out: &mut dyn FnMut(RouteTarget, bool)) {
        let count = self.driven.entry(line).or_default();
        let was_high = *count > 0;
        *count = if high {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        let is_high = *count > 0;
        if *count == 0 {
            self.driven.remove(&line);
        }
        if was_high != is_high {
            out(line.target(), is_high);
        }
    }

    fn forget_if_idle(&mut self, gsi: u32) {
        if self.gsis.get(&gsi).is_some_and(Gsi::is_idle) {
            self.gsis.remove(&gsi);
        }
    }
}

fn check_gsi(gsi: u32) -> Result<(), RoutingError> {
    if gsi < MAX_GSIS {
        Ok(())
    } else {
        Err(RoutingError::GsiOutOfRange(gsi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Forwards = Vec<(RouteTarget, bool)>;

    const A: SourceId = SourceId(1);
    const B: SourceId = SourceId(2);

    fn pic(irq: u8) -> RouteTarget {
        RouteTarget::Pic { irq }
    }

    fn ioapic(pin: usize) -> RouteTarget {
        RouteTarget::IoApic { pin }
    }

    fn msi(vector: u8) -> RouteTarget {
        RouteTarget::Msi(InterruptMessage::fixed(vector, 0))
    }

    fn set(table: &mut GsiRouting, gsi: u32, source: SourceId, level: bool) -> Forwards {
        let mut got = Vec::new();
        table
            .set_source_level(gsi, source, level, &mut |t, l| got.push((t, l)))
            .unwrap();
        got
    }

    fn pulse(table: &mut GsiRouting, gsi: u32, source: SourceId) -> Forwards {
        let mut got = Vec::new();
        table
            .pulse(gsi, source, &mut |t, l| got.push((t, l)))
            .unwrap();
        got
    }

    fn route(table: &mut GsiRouting, gsi: u32, targets: &[RouteTarget]) -> Forwards {
        let mut got = Vec::new();
        table
            .set_route(gsi, targets, &mut |t, l| got.push((t, l)))
            .unwrap();
        got
    }

    fn no_forward(_: RouteTarget, _: bool) {
        panic!("nothing may be forwarded here");
    }

    // ---- The PC table ----

    /// ISA IRQs 1, 3-15 reach PIC line n and IOAPIC pin n (GSI = IOAPIC pin numbering).
    #[test]
    fn pc_default_isa_irqs_reach_pic_line_and_same_ioapic_pin() {
        let table = GsiRouting::pc_default(24);
        for irq in (1..16u8).filter(|irq| *irq != 2) {
            assert_eq!(
                table.targets(u32::from(irq)),
                &[pic(irq), ioapic(usize::from(irq))],
                "ISA IRQ {irq}"
            );
        }
    }

    /// MADT Interrupt Source Override (ACPI §5.2.12.5): ISA IRQ 0 is IOAPIC input 2.
    #[test]
    fn pc_default_irq0_reaches_pic_line_0_and_ioapic_pin_2() {
        let table = GsiRouting::pc_default(24);
        assert_eq!(table.targets(0), &[pic(0), ioapic(2)]);
        let mut t = table.clone();
        assert_eq!(
            set(&mut t, 0, A, true),
            vec![(pic(0), true), (ioapic(2), true)]
        );
    }

    /// GSI 2 is the 8259 cascade (8259A "cascade mode"): no device route at all, and no GSI
    /// reaches IOAPIC pin 0.
    #[test]
    fn pc_default_gsi2_and_ioapic_pin0_are_unrouted() {
        let table = GsiRouting::pc_default(24);
        assert!(table.targets(2).is_empty());
        let reaches_pin0 = table
            .routes()
            .any(|(_, targets)| targets.contains(&ioapic(0)));
        assert!(!reaches_pin0);
    }

    /// PCI INTx GSIs 16..pins go to the IOAPIC only; nothing past the last pin.
    #[test]
    fn pc_default_high_gsis_reach_ioapic_only() {
        let table = GsiRouting::pc_default(24);
        for gsi in 16..24u32 {
            assert_eq!(table.targets(gsi), &[ioapic(gsi as usize)]);
        }
        assert!(table.targets(24).is_empty());
        assert_eq!(table.routes().count(), 15 + 8);
    }

    /// Pins that do not exist are left out; a pin count past the IOAPIC's limit is clamped.
    #[test]
    fn pc_default_follows_the_pin_count() {
        let none = GsiRouting::pc_default(0);
        assert_eq!(none.targets(0), &[pic(0)]);
        assert_eq!(none.targets(15), &[pic(15)]);
        assert_eq!(none.routes().count(), 15);
        let few = GsiRouting::pc_default(8);
        assert_eq!(few.targets(0), &[pic(0), ioapic(2)]);
        assert_eq!(few.targets(9), &[pic(9)]);
        let many = GsiRouting::pc_default(usize::MAX);
        assert_eq!(many.ioapic_pins(), MAX_PINS);
        assert_eq!(many.targets(MAX_PINS as u32 - 1), &[ioapic(MAX_PINS - 1)]);
        assert!(many.targets(MAX_PINS as u32).is_empty());
    }

    // ---- Shared lines (PCI wired-OR) ----

    /// PCI 3.0 §2.2.6: INTx is wired-OR; lowering one of two asserting sources keeps the wire
    /// asserted, and only wire changes are forwarded.
    #[test]
    fn shared_line_is_the_or_of_its_sources() {
        let mut t = GsiRouting::pc_default(24);
        assert_eq!(set(&mut t, 16, A, true), vec![(ioapic(16), true)]);
        assert!(set(&mut t, 16, B, true).is_empty());
        assert!(set(&mut t, 16, A, false).is_empty());
        assert!(t.wire_level(16));
        assert!(t.source_level(16, B) && !t.source_level(16, A));
        assert_eq!(set(&mut t, 16, B, false), vec![(ioapic(16), false)]);
        assert!(!t.wire_level(16));
    }

    /// Repeating a level, or lowering a source that never asserted, changes nothing.
    #[test]
    fn repeated_levels_forward_nothing() {
        let mut t = GsiRouting::pc_default(24);
        assert!(set(&mut t, 5, A, false).is_empty());
        assert_eq!(set(&mut t, 5, A, true).len(), 2);
        assert!(set(&mut t, 5, A, true).is_empty());
        assert!(set(&mut t, 5, B, false).is_empty());
        assert!(t.wire_level(5));
    }

    /// Two GSIs routed to one pin: the pin sees the OR of both wires (KVM keeps per-source
    /// levels at the chip pin for the same reason).
    #[test]
    fn pin_shared_by_two_gsis_sees_the_or_of_their_wires() {
        let mut t = GsiRouting::new(24);
        route(&mut t, 100, &[ioapic(20)]);
        route(&mut t, 101, &[ioapic(20), pic(11)]);
        assert_eq!(set(&mut t, 100, A, true), vec![(ioapic(20), true)]);
        assert_eq!(set(&mut t, 101, B, true), vec![(pic(11), true)]);
        assert!(set(&mut t, 100, A, false).is_empty());
        assert!(t.target_level(ioapic(20)));
        assert_eq!(
            set(&mut t, 101, B, false),
            vec![(ioapic(20), false), (pic(11), false)]
        );
        assert!(!t.target_level(ioapic(20)));
    }

    // ---- Edges and MSIs ----

    /// An ISA edge device's pulse is one rising and one falling forward per chip.
    #[test]
    fn pulse_forwards_exactly_one_rise_and_one_fall() {
        let mut t = GsiRouting::pc_default(24);
        assert_eq!(
            pulse(&mut t, 4, A),
            vec![
                (pic(4), true),
                (ioapic(4), true),
                (pic(4), false),
                (ioapic(4), false)
            ]
        );
        assert!(!t.wire_level(4));
    }

    /// A pulse on a wire another source holds asserted is no edge at all.
    #[test]
    fn pulse_on_a_wire_held_high_forwards_nothing() {
        let mut t = GsiRouting::pc_default(24);
        set(&mut t, 4, A, true);
        assert!(pulse(&mut t, 4, B).is_empty());
        assert!(t.wire_level(4));
    }

    /// An MSI is a message, sent once per rising edge, never on a falling edge or while the
    /// wire stays asserted.
    #[test]
    fn msi_fires_once_per_rising_edge() {
        let mut t = GsiRouting::new(24);
        route(&mut t, 40, &[]);
        assert!(route(&mut t, 40, &[msi(0x41)]).is_empty());
        assert_eq!(set(&mut t, 40, A, true), vec![(msi(0x41), true)]);
        assert!(set(&mut t, 40, B, true).is_empty());
        assert!(set(&mut t, 40, A, false).is_empty());
        assert!(set(&mut t, 40, B, false).is_empty());
        assert_eq!(pulse(&mut t, 40, A), vec![(msi(0x41), true)]);
        assert!(!t.target_level(msi(0x41)));
    }

    /// Every MSI asserts (KVM's `kvm_set_msi_irq` sets the level to 1): a level-triggered message
    /// stored with its level bit clear (by an embedder, or a snapshot from before the bus took
    /// such a message as a de-assert nobody accepts) is sent asserting.
    #[test]
    fn msi_target_sends_an_assert_whatever_its_level_bit() {
        let mut t = GsiRouting::new(24);
        let deassert = InterruptMessage {
            trigger: crate::types::TriggerMode::Level,
            level_assert: false,
            ..InterruptMessage::fixed(0x52, 1)
        };
        let sent = InterruptMessage {
            level_assert: true,
            ..deassert
        };
        assert!(route(&mut t, 41, &[RouteTarget::Msi(deassert)]).is_empty());
        assert_eq!(pulse(&mut t, 41, A), vec![(RouteTarget::Msi(sent), true)]);
    }

    /// bind_msi makes the message the GSI's only target (as a KVM MSI route is).
    #[test]
    fn bind_msi_replaces_the_targets() {
        let mut t = GsiRouting::pc_default(24);
        t.bind_msi(17, InterruptMessage::fixed(0x51, 1), &mut no_forward)
            .unwrap();
        assert_eq!(
            t.targets(17),
            &[RouteTarget::Msi(InterruptMessage::fixed(0x51, 1))]
        );
        assert_eq!(
            pulse(&mut t, 17, A),
            vec![(RouteTarget::Msi(InterruptMessage::fixed(0x51, 1)), true)]
        );
    }

    /// A GSI may mix chip lines and a message.
    #[test]
    fn mixed_targets_get_levels_and_the_message() {
        let mut t = GsiRouting::new(24);
        route(&mut t, 3, &[pic(3), msi(0x60), ioapic(3)]);
        assert_eq!(
            set(&mut t, 3, A, true),
            vec![(pic(3), true), (msi(0x60), true), (ioapic(3), true)]
        );
        assert_eq!(
            set(&mut t, 3, A, false),
            vec![(pic(3), false), (ioapic(3), false)]
        );
    }

    // ---- Bounds ----

    #[test]
    fn out_of_range_gsi_is_an_error() {
        let mut t = GsiRouting::pc_default(24);
        let before = t.clone();
        assert_eq!(
            t.set_source_level(MAX_GSIS, A, true, &mut no_forward),
            Err(RoutingError::GsiOutOfRange(MAX_GSIS))
        );
        assert_eq!(
            t.set_route(u32::MAX, &[pic(1)], &mut no_forward),
            Err(RoutingError::GsiOutOfRange(u32::MAX))
        );
        assert_eq!(
            t.pulse(MAX_GSIS, A, &mut no_forward),
            Err(RoutingError::GsiOutOfRange(MAX_GSIS))
        );
        t.remove(u32::MAX, &mut no_forward);
        assert_eq!(t, before);
        assert!(!t.wire_level(u32::MAX));
        assert!(t.targets(u32::MAX).is_empty());
    }

    #[test]
    fn invalid_target_lists_are_errors_and_change_nothing() {
        let mut t = GsiRouting::pc_default(24);
        let before = t.clone();
        let five = [pic(1), pic(3), ioapic(1), ioapic(3), msi(0x40)];
        assert_eq!(
            t.set_route(1, &five, &mut no_forward),
            Err(RoutingError::TooManyTargets { gsi: 1, count: 5 })
        );
        assert_eq!(
            t.set_route(1, &[pic(16)], &mut no_forward),
            Err(RoutingError::PicLineOutOfRange { gsi: 1, irq: 16 })
        );
        assert_eq!(
            t.set_route(1, &[ioapic(24)], &mut no_forward),
            Err(RoutingError::IoApicPinOutOfRange {
                gsi: 1,
                pin: 24,
                pins: 24
            })
        );
        assert_eq!(
            t.set_route(1, &[pic(1), ioapic(1), pic(1)], &mut no_forward),
            Err(RoutingError::DuplicateTarget { gsi: 1 })
        );
        assert_eq!(t, before);
        // Four distinct targets are fine.
        t.set_route(1, &five[..4], &mut no_forward).unwrap();
    }

    #[test]
    fn too_many_asserting_sources_is_an_error() {
        let mut t = GsiRouting::pc_default(24);
        for source in 0..MAX_SOURCES_PER_GSI as u32 {
            set(&mut t, 20, SourceId(source), true);
        }
        let before = t.clone();
        assert_eq!(
            t.set_source_level(20, SourceId(1000), true, &mut no_forward),
            Err(RoutingError::TooManySources { gsi: 20 })
        );
        assert_eq!(t, before);
        // Re-asserting a source already counted, and lowering, still work.
        assert!(set(&mut t, 20, SourceId(0), true).is_empty());
        assert!(set(&mut t, 20, SourceId(0), false).is_empty());
        assert!(set(&mut t, 20, SourceId(1000), true).is_empty());
    }

    // ---- Route changes while asserted ----

    /// Rebinding an asserted GSI: new line targets see the current (high) level, dropped ones
    /// are lowered, kept ones see nothing, a new MSI is not sent; later changes reach only the
    /// new targets.
    #[test]
    fn rebinding_an_asserted_gsi_moves_the_level() {
        let mut t = GsiRouting::pc_default(24);
        set(&mut t, 5, A, true);
        assert_eq!(
            route(&mut t, 5, &[ioapic(5), ioapic(21), msi(0x70)]),
            vec![(ioapic(21), true), (pic(5), false)]
        );
        assert!(t.target_level(ioapic(5)) && t.target_level(ioapic(21)));
        assert!(!t.target_level(pic(5)));
        assert_eq!(
            set(&mut t, 5, A, false),
            vec![(ioapic(5), false), (ioapic(21), false)]
        );
        assert_eq!(
            set(&mut t, 5, A, true),
            vec![(ioapic(5), true), (ioapic(21), true), (msi(0x70), true)]
        );
    }

    /// Rebinding a low GSI forwards nothing.
    #[test]
    fn rebinding_an_idle_gsi_forwards_nothing() {
        let mut t = GsiRouting::pc_default(24);
        assert!(route(&mut t, 5, &[ioapic(21)]).is_empty());
    }

    /// A dropped target another asserted GSI still drives stays high.
    #[test]
    fn rebinding_keeps_a_pin_another_gsi_drives() {
        let mut t = GsiRouting::new(24);
        route(&mut t, 30, &[ioapic(22)]);
        route(&mut t, 31, &[ioapic(22)]);
        set(&mut t, 30, A, true);
        set(&mut t, 31, A, true);
        assert!(route(&mut t, 30, &[]).is_empty());
        assert!(t.target_level(ioapic(22)));
    }

    /// remove() lowers the line targets of an asserted GSI but keeps the wire's level, so
    /// routing it again raises the new targets.
    #[test]
    fn remove_lowers_targets_and_keeps_the_wire() {
        let mut t = GsiRouting::pc_default(24);
        set(&mut t, 18, A, true);
        let mut got = Vec::new();
        t.remove(18, &mut |tg, l| got.push((tg, l)));
        assert_eq!(got, vec![(ioapic(18), false)]);
        assert!(t.targets(18).is_empty());
        assert!(t.wire_level(18));
        assert_eq!(route(&mut t, 18, &[ioapic(18)]), vec![(ioapic(18), true)]);
        // Removing an idle, unrouted GSI is a no-op.
        set(&mut t, 18, A, false);
        t.remove(18, &mut no_forward);
        t.remove(18, &mut no_forward);
        assert_eq!(t.routes().count(), 15 + 8 - 1);
    }

    /// A level on an unrouted GSI is remembered and nothing is forwarded.
    #[test]
    fn unrouted_wire_keeps_its_level() {
        let mut t = GsiRouting::new(24);
        assert!(set(&mut t, 500, A, true).is_empty());
        assert!(t.wire_level(500));
        assert_eq!(route(&mut t, 500, &[pic(7)]), vec![(pic(7), true)]);
    }

    // ---- Snapshot ----

    #[test]
    fn serde_round_trip_keeps_routes_and_levels() {
        let mut t = GsiRouting::pc_default(24);
        route(&mut t, 40, &[msi(0x44), ioapic(20)]);
        set(&mut t, 20, A, true);
        set(&mut t, 40, B, true);
        set(&mut t, 7, B, true);
        let json = serde_json::to_string(&t).unwrap();
        let mut back: GsiRouting = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // The derived per-pin OR came back too: pin 20 is driven by GSIs 20 and 40.
        assert!(set(&mut back, 20, A, false).is_empty());
        assert_eq!(set(&mut back, 40, B, false), vec![(ioapic(20), false)]);
    }

    #[test]
    fn deserialize_rejects_out_of_bounds_snapshots() {
        let t = GsiRouting::pc_default(24);
        let good = serde_json::to_value(&t).unwrap();

        let mut bad = good.clone();
        bad["ioapic_pins"] = serde_json::json!(MAX_PINS + 1);
        assert!(serde_json::from_value::<GsiRouting>(bad).is_err());

        let mut bad = good.clone();
        bad["gsis"]["5000"] = good["gsis"]["1"].clone();
        assert!(serde_json::from_value::<GsiRouting>(bad).is_err());

        let mut bad = good.clone();
        bad["gsis"]["1"]["targets"] = serde_json::to_value([pic(1), pic(1)]).unwrap();
        assert!(serde_json::from_value::<GsiRouting>(bad).is_err());

        let mut bad = good.clone();
        bad["gsis"]["1"]["asserted"] =
            serde_json::to_value((0..=MAX_SOURCES_PER_GSI as u32).collect::<Vec<_>>()).unwrap();
        assert!(serde_json::from_value::<GsiRouting>(bad).is_err());

        let mut bad = good;
        bad["gsis"]["1"]["targets"] = serde_json::to_value([ioapic(24)]).unwrap();
        assert!(serde_json::from_value::<GsiRouting>(bad).is_err());
    }

    // ---- Property ----

    const PROP_GSIS: u32 = 3;
    const PROP_SOURCES: u32 = 4;

    /// The target universe of the property test: three chip lines and one MSI per GSI (at most
    /// [`MAX_TARGETS_PER_GSI`] at once).
    fn prop_lines() -> [RouteTarget; 3] {
        [pic(0), pic(9), ioapic(1)]
    }

    fn prop_msi(gsi: u32) -> RouteTarget {
        msi(0x40 + gsi as u8)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Level(u32, u32, bool),
        Pulse(u32, u32),
        Route(u32, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..PROP_GSIS, 0..PROP_SOURCES, any::<bool>()).prop_map(|(g, s, l)| Op::Level(g, s, l)),
            1 => (0..PROP_GSIS, 0..PROP_SOURCES).prop_map(|(g, s)| Op::Pulse(g, s)),
            1 => (0..PROP_GSIS, 0..16u8).prop_map(|(g, m)| Op::Route(g, m)),
        ]
    }

    /// Targets selected by the low four bits of `mask`: the three lines, then the GSI's MSI.
    fn prop_targets(gsi: u32, mask: u8) -> Vec<RouteTarget> {
        let mut targets: Vec<RouteTarget> = prop_lines()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, t)| t)
            .collect();
        if mask & 0x8 != 0 {
            targets.push(prop_msi(gsi));
        }
        targets
    }

    proptest! {
        /// Wired-OR (PCI 3.0 §2.2.6) and edge-to-message semantics under any sequence of source
        /// levels, pulses and re-routes: every line forward is a change; after each step every
        /// line's last forwarded level is the OR of the wires of the GSIs routed to it, each wire
        /// the OR of its sources; an MSI is sent exactly once per rising edge of its GSI's wire.
        #[test]
        fn forwards_track_the_or_of_sources(
            initial in proptest::collection::vec(0..16u8, PROP_GSIS as usize),
            ops in proptest::collection::vec(op(), 1..100),
        ) {
            let mut t = GsiRouting::new(2);
            let mut routes: Vec<Vec<RouteTarget>> = Vec::new();
            for (gsi, mask) in initial.iter().enumerate() {
                let targets = prop_targets(gsi as u32, *mask);
                prop_assert!(route(&mut t, gsi as u32, &targets).is_empty());
                routes.push(targets);
            }
            let mut sources = vec![BTreeSet::new(); PROP_GSIS as usize];
            let mut last = BTreeMap::new(); // line target index -> last forwarded level
            for op in ops {
                let g = match op { Op::Level(g, ..) | Op::Pulse(g, _) | Op::Route(g, _) => g as usize };
                let was_high = !sources[g].is_empty();
                let (got, rising_edges) = match op {
                    Op::Level(_, s, l) => {
                        if l { sources[g].insert(s); } else { sources[g].remove(&s); }
                        let rising = !was_high && !sources[g].is_empty();
                        (set(&mut t, g as u32, SourceId(s), l), usize::from(rising))
                    }
                    Op::Pulse(_, s) => {
                        sources[g].remove(&s);
                        let rising = !was_high;
                        (pulse(&mut t, g as u32, SourceId(s)), usize::from(rising))
                    }
                    Op::Route(_, mask) => {
                        routes[g] = prop_targets(g as u32, mask);
                        (route(&mut t, g as u32, &routes[g]), 0)
                    }
                };
                let msi_expected = if routes[g].contains(&prop_msi(g as u32)) { rising_edges } else { 0 };
                let mut msis = 0;
                for (target, level) in got {
                    if let Some(i) = prop_lines().iter().position(|l| *l == target) {
                        let before = last.insert(i, level).unwrap_or(false);
                        prop_assert_ne!(before, level, "a forward that is not a change: {:?}", target);
                    } else {
                        prop_assert_eq!(target, prop_msi(g as u32), "only the touched GSI's MSI is sent");
                        prop_assert!(level);
                        msis += 1;
                    }
                }
                prop_assert_eq!(msis, msi_expected);
                for (i, line) in prop_lines().into_iter().enumerate() {
                    let expected = (0..PROP_GSIS as usize)
                        .any(|gsi| routes[gsi].contains(&line) && !sources[gsi].is_empty());
                    prop_assert_eq!(last.get(&i).copied().unwrap_or(false), expected, "{:?}", line);
                    prop_assert_eq!(t.target_level(line), expected);
                }
                for (gsi, set) in sources.iter().enumerate() {
                    prop_assert_eq!(t.wire_level(gsi as u32), !set.is_empty());
                }
            }
        }
    }
}
