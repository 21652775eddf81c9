//! The JSON shapes of the control API: one shape per object for all three irqchip modes, so a
//! client never needs to know where the interrupt controllers live. A leaf module: plain serde
//! data, filled in by `crate::api::lapic` (local APICs), the backends (platform state) and the
//! vCPU threads.

use serde::{Deserialize, Serialize};

/// The VM as a whole (`GET /api/v1/vm.info`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// `running`, `paused` or `stopped` (the guest or the host ended it).
    pub state: String,
    /// The irqchip mode: `user`, `split` or `kernel`.
    pub irqchip: String,
    pub vcpus: usize,
    /// Milliseconds since the vCPU threads started.
    pub uptime_ms: u64,
    /// Each vCPU thread's state, index = vCPU (see [`VcpuInfo::thread`]).
    pub vcpu_threads: Vec<String>,
}

/// One vCPU (`GET /api/v1/vcpus/N`), read on the vCPU's own thread outside KVM_RUN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub index: usize,
    /// The thread: `created`, `running` (in or around KVM_RUN), `halted` / `waiting_for_sipi`
    /// (blocked outside KVM_RUN: `user` mode), `paused`, `stopped`.
    pub thread: String,
    /// The architectural state as KVM_GET_MP_STATE names it, after accepting a latched INIT or
    /// SIPI: `runnable`, `halted`, `uninitialized` (an AP since power-on, before its first
    /// INIT), `init_received` (wait-for-SIPI after INIT), `ap_reset_hold`, or `unknown`.
    pub mp_state: String,
    /// True when the processor is in the HLT state (its MP state is `halted`).
    pub halted: bool,
    pub rip: u64,
    /// What is latched for the vCPU and not yet taken.
    pub pending: PendingInfo,
    pub lapic: LapicInfo,
}

/// Events latched for a vCPU (KVM_GET_VCPU_EVENTS in `kernel`/`split` mode, the model in `user`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInfo {
    /// NMIs pending (not yet injected).
    pub nmis: u32,
    /// An NMI is being handled (NMIs blocked until its IRET).
    pub nmi_masked: bool,
    /// An INIT latched and not accepted (KVM: `smi.latched_init`, only set while INIT is
    /// blocked; `user` mode accepts INIT before it answers, so false there).
    pub init_latched: bool,
    /// The external interrupt KVM is injecting at the next entry (KVM_GET_VCPU_EVENTS
    /// `interrupt.injected` and `nr`): a vector that already left IRR (and, with KVM's LAPIC,
    /// went to ISR) but that the guest has not taken yet. `None` when nothing is being injected.
    #[serde(default)]
    pub injecting: Option<u8>,
    /// The interrupt shadow KVM reports (`interrupt.shadow`: bit 0 after MOV SS / POP SS, bit 1
    /// after STI, SDM vol. 3 §6.8.3); interrupts are held for one instruction while it is set.
    #[serde(default)]
    pub interrupt_shadow: u8,
}

/// One local APIC, decoded from KVM_GET_LAPIC's register page or from the `irqchip` model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicInfo {
    /// The APIC ID (8 bits in xAPIC mode, 32 in x2APIC mode).
    pub id: u32,
    /// `xapic`, `x2apic` or `disabled` (IA32_APIC_BASE EN/EXTD, SDM vol. 3 §11.4.3, §11.12.1).
    pub mode: String,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// SVR bit 8 (APIC software enable, §11.4.7.2).
    pub software_enabled: bool,
    pub tpr: u8,
    pub ppr: u8,
    pub ldr: u32,
    pub esr: u32,
    /// Pending vectors (IRR), lowest first.
    pub irr: Vec<u8>,
    /// In-service vectors (ISR), lowest first.
    pub isr: Vec<u8>,
    /// Level-triggered vectors (TMR), lowest first.
    pub tmr: Vec<u8>,
    pub lvt: LvtTable,
    pub timer: TimerInfo,
}

/// The local vector table (SDM vol. 3 §11.5.1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvtTable {
    pub timer: LvtEntry,
    pub thermal: LvtEntry,
    pub performance: LvtEntry,
    pub lint0: LvtEntry,
    pub lint1: LvtEntry,
    pub error: LvtEntry,
}

/// One LVT register, raw and decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvtEntry {
    pub raw: u32,
    pub vector: u8,
    /// Bits 10:8: 0 fixed, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT.
    pub delivery_mode: u8,
    /// Bit 16.
    pub masked: bool,
}

impl LvtEntry {
    pub fn decode(raw: u32) -> Self {
        Self {
            raw,
            vector: raw as u8,
            delivery_mode: ((raw >> 8) & 7) as u8,
            masked: raw & (1 << 16) != 0,
        }
    }
}

/// The APIC timer (SDM vol. 3 §11.5.4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerInfo {
    /// `one_shot`, `periodic`, `tsc_deadline` or `reserved` (LVT timer bits 18:17).
    pub mode: String,
    pub initial_count: u32,
    /// The current count register now (counting modes).
    pub current_count: u32,
    /// The divisor the divide configuration selects (1-128).
    pub divisor: u32,
    /// IA32_TSC_DEADLINE (0 = disarmed) in TSC-deadline mode.
    pub tsc_deadline: u64,
}

/// The name of LVT timer bits 18:17.
pub fn timer_mode_name(lvt_timer: u32) -> &'static str {
    match (lvt_timer >> 17) & 3 {
        0 => "one_shot",
        1 => "periodic",
        2 => "tsc_deadline",
        _ => "reserved",
    }
}

/// The divisor a divide configuration register selects (bits 3, 1:0; SDM vol. 3 §11.5.4).
pub fn divisor_of(dcr: u32) -> u32 {
    let code = ((dcr & 8) >> 1) | (dcr & 3);
    if code == 7 {
        1
    } else {
        2 << code
    }
}

/// The name of an IA32_APIC_BASE value's mode (EN bit 11, EXTD bit 10).
pub fn apic_mode_name(apic_base: u64) -> &'static str {
    match (apic_base >> 10) & 3 {
        0b10 => "xapic",
        0b11 => "x2apic",
        0b00 => "disabled",
        _ => "invalid",
    }
}

/// The VM-wide interrupt controllers (`GET /api/v1/platform`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformInfo {
    pub ioapic: IoApicInfo,
    /// The master (`pics[0]`, IRQs 0-7) and the slave (`pics[1]`, IRQs 8-15) 8259A.
    pub pics: Vec<PicInfo>,
    /// GSI → the inputs it drives.
    pub gsi_routing: Vec<GsiRoute>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicInfo {
    pub id: u8,
    pub pins: Vec<IoApicPin>,
}

/// One redirection entry (82093AA §3.2.4) and the pin's input level.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicPin {
    pub pin: u32,
    pub raw: u64,
    pub vector: u8,
    pub delivery_mode: u8,
    pub logical_destination: bool,
    pub destination: u32,
    pub active_low: bool,
    pub level_triggered: bool,
    pub masked: bool,
    pub remote_irr: bool,
    /// The input asserted (logical level, after polarity).
    pub asserted: bool,
}

impl IoApicPin {
    /// Decodes a redirection entry; `asserted` is the caller's.
    pub fn decode(pin: u32, raw: u64, asserted: bool) -> Self {
        Self {
            pin,
            raw,
            vector: raw as u8,
            delivery_mode: ((raw >> 8) & 7) as u8,
            logical_destination: raw & (1 << 11) != 0,
            destination: (raw >> 56) as u32,
            active_low: raw & (1 << 13) != 0,
            level_triggered: raw & (1 << 15) != 0,
            masked: raw & (1 << 16) != 0,
            remote_irr: raw & (1 << 14) != 0,
            asserted,
        }
    }
}

/// One 8259A.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicInfo {
    pub irr: u8,
    pub isr: u8,
    pub imr: u8,
    /// Edge/level control (PIIX ELCR): a set bit makes that input level-triggered.
    pub elcr: u8,
    /// ICW2: the vector of input 0.
    pub vector_base: u8,
}

/// Where one GSI goes: `pic:N`, `ioapic:N`, `msi`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GsiRoute {
    pub gsi: u32,
    pub targets: Vec<String>,
}

/// Counters of the VM (`GET /api/v1/vm.counters`), as Cloud Hypervisor keys them: a map of
/// device (here: `vcpuN` and `irqchip`) to counter name to value.
pub type Counters = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

/// `PUT /api/v1/trace.start`: record interrupts into the flight recorder; the trace file goes
/// to `path` (created now, written at `trace.stop`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceStartRequest {
    pub path: String,
}

/// The answer of `PUT /api/v1/trace.stop`: where the trace went, how many events it holds and
/// how many the full rings dropped (the oldest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStopped {
    pub path: String,
    pub events: u64,
    pub dropped_events: u64,
}

/// `PUT /api/v1/irq.line`: drive a GSI (`action`: `assert`, `deassert` or `pulse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineRequest {
    pub gsi: u32,
    pub action: String,
}

/// `PUT /api/v1/irq.msi`: `data` written to `address` (SDM vol. 3 §11.11).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsiRequest {
    pub address: u64,
    pub data: u32,
}

/// `PUT /api/v1/vcpus/N/nmi` takes no body; `.../init` neither; `.../sipi` takes this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipiRequest {
    pub vector: u8,
}

/// `PUT /api/v1/vm.snapshot`: Cloud Hypervisor's body (`file:///DIR`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub destination_url: String,
}

/// `PUT /api/v1/vm.send-migration`: Cloud Hypervisor's body, `unix:/PATH` (the socket an
/// `irqvm restore --incoming /PATH` listens on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    pub destination_url: String,
    /// irqvm's: stop and copy once a round finds at most this many dirty pages (default
    /// `migrate::send::FINAL_PAGES`, 256; 0 copies rounds until one finds none, or
    /// `migrate::send::MAX_ROUNDS` have run).
    #[serde(default)]
    pub final_pages: Option<u64>,
}

/// `PUT /api/v1/vm.restore` to an irqvm started without a VM (`irqvm restore --api-sock PATH`):
/// Cloud Hypervisor's body (`file:///DIR`), and the irqchip mode to restore into (default: the
/// snapshot's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub source_url: String,
    #[serde(default)]
    pub irqchip: Option<String>,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divide_configuration_decodes_as_the_sdm_table() {
        // SDM vol. 3 Figure 11-10: 0000b = 2, 0011b = 16, 1000b = 32, 1011b = 1.
        assert_eq!(divisor_of(0b0000), 2);
        assert_eq!(divisor_of(0b0011), 16);
        assert_eq!(divisor_of(0b1000), 32);
        assert_eq!(divisor_of(0b1010), 128);
        assert_eq!(divisor_of(0b1011), 1);
    }

    #[test]
    fn apic_modes_and_timer_modes_are_named() {
        assert_eq!(apic_mode_name(0xFEE0_0900), "xapic");
        assert_eq!(apic_mode_name(0xFEE0_0D00), "x2apic");
        assert_eq!(apic_mode_name(0xFEE0_0000), "disabled");
        assert_eq!(timer_mode_name(0x2_0000), "periodic");
        assert_eq!(timer_mode_name(0x4_0000), "tsc_deadline");
    }
}
