//! Versioned snapshots of the whole interrupt chip: every vCPU's local APIC, MP state and pending
//! events, and the VM-wide devices (8259 PIC pair, IOAPIC, GSI routing with its levels).
//!
//! # Taking and restoring one
//!
//! The VM must be paused: no device thread raises a line and no vCPU runs guest code while a
//! snapshot is taken or restored (a post that lands between two vCPUs' saves would be in
//! neither). Then:
//!
//! * save: each vCPU thread calls `VcpuInterrupts::save(now)`, the VMM calls
//!   `PcIrqChip::save_devices()`, and [`ChipSnapshot::new`] ties them (vCPUs in index order);
//! * restore (into a chip built with the same configuration): `PcIrqChip::check_snapshot`
//!   validates everything first, `PcIrqChip::restore_devices` installs the devices, then each
//!   vCPU thread calls `VcpuInterrupts::restore(&snapshot.vcpus[index], now)`. Every check runs
//!   before anything changes, and nothing a malformed snapshot contains can panic: it is refused
//!   with a [`SnapshotError`] (or by the deserializer, for values no type can hold).
//!
//! Nothing is lost or doubled: `save` drains the vCPU's posting inbox into the state it saves
//! (vectors into IRR/TMR, INIT/SIPI into the MP latch, NMI/ExtINT, and SMI with SMM, into
//! `pending`), exactly as the vCPU's next drain would have, and `restore` discards whatever was
//! posted to the inbox before it (that belongs to the state being replaced).
//!
//! # Time
//!
//! The chip's time (`Nanos`) starts anew in a restored VM. A vCPU snapshot is therefore stored
//! on its own timeline, where the save instant is time 0: the local APIC timer's pending expiry
//! and next expiry are the time left at the save (`ApicTimer::remaining`), not absolute times,
//! and the clock's `tsc_at_zero` is the guest TSC at the save. Restoring at `now` moves both
//! onto the new timeline (`LocalApic::rebase_timeline`): a one-shot or periodic count expires
//! after exactly the time it had left (to the fraction of a nanosecond), a pending expiry is still
//! pending, and the guest TSC continues from its saved value (the VMM sets the vCPU's real TSC to
//! `VcpuInterrupts::guest_tsc(now)`), so a TSC deadline keeps its distance too.
//!
//! # Format, version 1 ([`SNAPSHOT_VERSION`])
//!
//! The serde data model of [`ChipSnapshot`]; the tests use JSON (serde_json). Field by field:
//!
//! ```text
//! ChipSnapshot {
//!   version: u32                       // SNAPSHOT_VERSION; any other value is refused
//!   vcpus: [VcpuSnapshot]              // one per vCPU, vcpus[i].index == i
//!   devices: DeviceSnapshot
//! }
//! VcpuSnapshot {
//!   index: usize                       // the vCPU (0 = BSP)
//!   lapic: LocalApic {                 // lapic::LocalApic's serde form: every register
//!     cfg: { index, apic_id, bsp, clock: { apic_bus_hz, tsc_hz, tsc_at_zero }, x2apic_supported,
//!            directed_eoi_supported, cmci_supported (absent = false),
//!            max_phys_addr (absent = 52) }
//!                                      // must match the restoring vCPU, except `clock`, which is
//!                                      // taken from the snapshot (tsc_at_zero = TSC at save)
//!     apic_base, id, tpr, ldr, dfr, svr, esr_pending, esr_latched, icr_low, icr_high: integers
//!     irr, isr, tmr: [u64; 4]          // 256-bit vector sets, bit v = vector v
//!     lvt: [u32; 7]                    // timer, thermal, perf, LINT0, LINT1, error, CMCI
//!                                      // (CMCI masked when the APIC has none)
//!     timer: { clock, mode, dcr, initial_count, tsc_deadline,
//!              countdown: "Stopped" | { Counting: { expiry, expiry_frac } },  // ns after save
//!              pending: null | ns }     // an expiry not yet polled (0 = due at the save)
//!   }
//!   mp: MpStateMachine { bsp, state, init_latched, sipi_latched: null | vector,
//!                        last_sipi_vector }
//!   pending: { nmi, nmi_held (absent = false), smi, extint }
//!                                      // latched for injection, not yet taken (`smi` is
//!                                      // restored only with SMM)
//! }
//! DeviceSnapshot {
//!   pic: DualPic { master, slave }     // each 8259A: role, lines, irr, isr, imr, elcr, init
//!                                      // sequencer, ICW/OCW modes, rotation, read select, poll
//!   ioapic: IoApic { config: { pins, id, version }, extended_destination_id, id, ioregsel,
//!                    pins: [{ entry: u64 (incl. remote IRR), wire_high }] }
//!   routing: GsiRouting { ioapic_pins, gsis: { "<gsi>": {
//!              targets: [{ "Pic": { irq } } | { "IoApic": { pin } } | { "Msi": InterruptMessage }],
//!              asserted: [u32 source id] } } }        // a GSI's level = asserted is not empty
//! }
//! ```
//!
//! Derived state is not stored: the bus topology, the published PPR and PIC acceptance are
//! republished from the restored APIC; the routing table's per-input levels are recomputed.
//!
//! # Checks on restore
//!
//! Version; vCPU count and indexes; each APIC's configuration against the restoring vCPU's
//! (index, APIC ID, BSP, x2APIC, directed-EOI and CMCI support, MAXPHYADDR) and its internal
//! consistency (`LocalApic::validate`: a reachable APIC base without reserved bits, x2APIC mode
//! only with support, one clock in configuration and timer, timer invariants); the MP state's
//! BSP flag; the IOAPIC's configuration (pin count, ID, version, extended destination ID)
//! against the chip's; the routing table's pin count against the IOAPIC's; and the wire levels:
//! every PIC line and IOAPIC wire must be what the routing table's levels drive (PCI pins
//! inverted, see `chip`). The IOAPIC, PIC and routing deserializers add their own checks (entry
//! and pin counts, bounds).
//!
//! # Not in the snapshot
//!
//! The bus's lowest-priority round-robin position (it only decides ties between vCPUs of equal
//! priority): a VMM that wants ties after a restore to go where they would have gone saves
//! `ApicBus::lowest_priority_turn` with its own state and sets it back (irqvm's `user` mode
//! does); otherwise it restarts at 0. Posting-inbox modes (in guest, blocked) are thread state,
//! not chip state: a restored vCPU starts outside guest mode.

use serde::{Deserialize, Serialize};

use crate::ioapic::{IoApic, IoApicConfig};
use crate::lapic::{LapicConfig, LocalApic};
use crate::mpstate::MpStateMachine;
use crate::pic::DualPic;
use crate::routing::{GsiRouting, RouteTarget, PIC_CASCADE_LINE, PIC_LINES};
use crate::types::VcpuIndex;

/// The format version this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The complete state of the chip. See the module documentation for the format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChipSnapshot {
    /// The format version, [`SNAPSHOT_VERSION`] when written by this build.
    pub version: u32,
    /// One part per vCPU, in index order.
    pub vcpus: Vec<VcpuSnapshot>,
    /// The PIC, IOAPIC and routing table.
    pub devices: DeviceSnapshot,
}

impl ChipSnapshot {
    /// Ties the per-vCPU parts (in index order) and the device part, with the current version.
    pub fn new(vcpus: Vec<VcpuSnapshot>, devices: DeviceSnapshot) -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            vcpus,
            devices,
        }
    }

    /// Checks the version, the vCPU count and indexes, and each vCPU against its configuration
    /// (`configs[i]` for vCPU i).
    pub fn check_vcpus(&self, configs: &[LapicConfig]) -> Result<(), SnapshotError> {
        if self.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: self.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        if self.vcpus.len() != configs.len() {
            return Err(SnapshotError::VcpuCount {
                expected: configs.len(),
                found: self.vcpus.len(),
            });
        }
        for (index, (vcpu, config)) in self.vcpus.iter().zip(configs).enumerate() {
            vcpu.check(index, config)?;
        }
        Ok(())
    }
}

/// NMI, SMI and ExtINT requests a vCPU took from its inbox and has not injected yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingEvents {
    /// An NMI waits to be injected.
    pub nmi: bool,
    /// A second NMI waits behind it (KVM keeps up to two pending, `process_nmi`). Snapshots
    /// written before this field existed read as false.
    #[serde(default)]
    pub nmi_held: bool,
    /// An SMI waits for injection.
    pub smi: bool,
    /// An ExtINT waits: the vector comes from the PIC's acknowledge at injection.
    pub extint: bool,
}

/// One vCPU's interrupt state, on the snapshot's timeline (the save instant is time 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// The vCPU this part was saved from.
    pub index: VcpuIndex,
    /// The local APIC: every register, the timer on the snapshot's timeline.
    pub lapic: LocalApic,
    /// MP state, latched INIT and SIPI (with its vector), last SIPI vector.
    pub mp: MpStateMachine,
    /// Events taken from the inbox but not injected yet.
    pub pending: PendingEvents,
}

impl VcpuSnapshot {
    /// Checks that this snapshot fits vCPU `index` whose local APIC is configured as `config`.
    pub fn check(&self, index: VcpuIndex, config: &LapicConfig) -> Result<(), SnapshotError> {
        if self.index != index {
            return Err(SnapshotError::VcpuIndex {
                expected: index,
                found: self.index,
            });
        }
        let saved = self.lapic.config();
        let mismatch = if saved.index != config.index {
            Some("index")
        } else if saved.apic_id != config.apic_id {
            Some("APIC ID")
        } else if saved.bsp != config.bsp {
            Some("BSP")
        } else if saved.x2apic_supported != config.x2apic_supported {
            Some("x2APIC support")
        } else if saved.directed_eoi_supported != config.directed_eoi_supported {
            Some("directed EOI support")
        } else if saved.cmci_supported != config.cmci_supported {
            Some("CMCI support")
        } else if saved.max_phys_addr != config.max_phys_addr {
            Some("MAXPHYADDR")
        } else {
            None
        };
        if let Some(field) = mismatch {
            return Err(SnapshotError::LapicConfig { vcpu: index, field });
        }
        self.lapic
            .validate()
            .map_err(|reason| SnapshotError::LapicState {
                vcpu: index,
                reason,
            })?;
        if self.mp.is_bsp() != config.bsp {
            return Err(SnapshotError::MpBsp {
                vcpu: index,
                found: self.mp.is_bsp(),
            });
        }
        Ok(())
    }
}

/// The VM-wide devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// The two 8259As and their input levels.
    pub pic: DualPic,
    /// The IOAPIC: ID, IOREGSEL, redirection entries and wire levels.
    pub ioapic: IoApic,
    /// Routes and every source's level.
    pub routing: GsiRouting,
}

impl DeviceSnapshot {
    /// Checks the devices against the chip's IOAPIC configuration and against each other:
    /// pin counts, and every PIC line and IOAPIC wire at the level the routing table drives
    /// (`wire(pin, asserted)` gives an IOAPIC pin's electrical level for a logical one).
    pub fn check(
        &self,
        ioapic: IoApicConfig,
        extended_destination_id: bool,
        wire: fn(usize, bool) -> bool,
    ) -> Result<(), SnapshotError> {
        if self.ioapic.config() != ioapic {
            return Err(SnapshotError::IoApicConfig {
                expected: ioapic,
                found: self.ioapic.config(),
            });
        }
        if self.ioapic.extended_destination_id() != extended_destination_id {
            return Err(SnapshotError::IoApicExtendedDestination);
        }
        if self.routing.ioapic_pins() != self.ioapic.pins() {
            return Err(SnapshotError::RoutingPins {
                expected: self.ioapic.pins(),
                found: self.routing.ioapic_pins(),
            });
        }
        // IRQ 2 is the cascade input: the PIC ignores it whatever the table says.
        for irq in (0..PIC_LINES).filter(|irq| *irq != PIC_CASCADE_LINE) {
            if self.routing.target_level(RouteTarget::Pic { irq }) != self.pic.line(irq) {
                return Err(SnapshotError::PicLineLevel { irq });
            }
        }
        for pin in 0..self.ioapic.pins() {
            let asserted = self.routing.target_level(RouteTarget::IoApic { pin });
            if self.ioapic.line(pin) != Some(wire(pin, asserted)) {
                return Err(SnapshotError::IoApicLineLevel { pin });
            }
        }
        Ok(())
    }
}

/// Why a snapshot was refused. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot was written in another format version.
    #[error("snapshot version {found} is not supported (this build reads version {supported})")]
    Version {
        /// The snapshot's version.
        found: u32,
        /// [`SNAPSHOT_VERSION`].
        supported: u32,
    },
    /// The snapshot has another number of vCPUs than the chip.
    #[error("snapshot has {found} vCPUs, the chip has {expected}")]
    VcpuCount {
        /// The chip's vCPU count.
        expected: usize,
        /// The snapshot's vCPU count.
        found: usize,
    },
    /// A vCPU's part was given to another vCPU.
    #[error("the snapshot of vCPU {found} was given to vCPU {expected}")]
    VcpuIndex {
        /// The vCPU restoring it.
        expected: VcpuIndex,
        /// The vCPU the part was saved from.
        found: VcpuIndex,
    },
    /// The saved local APIC was created with another configuration (index, APIC ID, BSP flag,
    /// x2APIC, directed-EOI or CMCI support, MAXPHYADDR).
    #[error("vCPU {vcpu}: the saved local APIC has another {field} than this vCPU's")]
    LapicConfig {
        /// The vCPU.
        vcpu: VcpuIndex,
        /// The configuration field that differs.
        field: &'static str,
    },
    /// The saved local APIC's registers are inconsistent ([`LocalApic::validate`]).
    #[error("vCPU {vcpu}: invalid local APIC state: {reason}")]
    LapicState {
        /// The vCPU.
        vcpu: VcpuIndex,
        /// What is inconsistent.
        reason: &'static str,
    },
    /// The MP state machine's BSP flag is not the vCPU's.
    #[error("vCPU {vcpu}: the MP state's BSP flag ({found}) contradicts the vCPU's role")]
    MpBsp {
        /// The vCPU.
        vcpu: VcpuIndex,
        /// The saved flag.
        found: bool,
    },
    /// The saved IOAPIC has another pin count, ID or version than the chip's.
    #[error("IOAPIC configuration {found:?} differs from the chip's {expected:?}")]
    IoApicConfig {
        /// The chip's configuration.
        expected: IoApicConfig,
        /// The snapshot's.
        found: IoApicConfig,
    },
    /// The saved IOAPIC's extended destination ID setting is not the chip's.
    #[error("IOAPIC extended destination ID setting differs from the chip's")]
    IoApicExtendedDestination,
    /// The routing table knows another number of IOAPIC pins than the IOAPIC has.
    #[error("routing table has {found} IOAPIC pins, the IOAPIC has {expected}")]
    RoutingPins {
        /// The IOAPIC's pin count.
        expected: usize,
        /// The routing table's.
        found: usize,
    },
    /// A PIC line's level is not the OR of the sources the routing table holds for it.
    #[error("PIC line {irq}: its level disagrees with the routing table's")]
    PicLineLevel {
        /// The ISA line.
        irq: u8,
    },
    /// An IOAPIC pin's wire level is not what the routing table's sources make it.
    #[error("IOAPIC pin {pin}: its wire level disagrees with the routing table's")]
    IoApicLineLevel {
        /// The pin.
        pin: usize,
    },
}
