//! The snapshot directory: `memory` (guest RAM, its regions one after the other in address
//! order) and `state.json` ([`SnapshotState`], serde JSON), and the checks a snapshot passes
//! before anything of it is applied.

use std::path::{Path, PathBuf};

use irqchip::snapshot::{ChipSnapshot, SnapshotError as ChipSnapshotError};
use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs};
use serde::{Deserialize, Serialize};

use super::model::{CpuModelMismatch, CpuModelState};
use super::xstate::XsaveArea;
use crate::mode::IrqchipMode;

/// The format version this build writes and reads. 1: the first; 2: each vCPU's XSAVE area
/// (`VcpuCpuState::xsave`) and the CPU model (`SnapshotState::cpu_model`) added. A snapshot of
/// another version is refused ([`SnapshotError::Version`]): a version 1 snapshot lacks state a
/// restore needs (AVX and later registers, the CPUID the guest saw).
pub const FORMAT_VERSION: u32 = 2;
/// The guest RAM file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";

/// Why a snapshot could not be taken, read or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state file {path} is not a valid irqvm snapshot: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot format version {found} is not supported (this irqvm reads version {FORMAT_VERSION}){}",
        if *found < FORMAT_VERSION { ": it is older, without the vCPUs' XSAVE areas and CPU model; take it again with this irqvm" } else { "" })]
    Version { found: u32 },
    #[error("snapshot shape: {0}")]
    Shape(String),
    #[error("memory file {path} has {found} bytes, the snapshot's guest has {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot's interrupt state is refused: {0}")]
    Chip(#[from] ChipSnapshotError),
    #[error("vCPU {vcpu}: {what}")]
    Vcpu { vcpu: usize, what: String },
    #[error("the VM is not in a state to snapshot: {0}")]
    NotReady(String),
    #[error("cannot convert the interrupt state: {0}")]
    Convert(#[from] super::convert::ConvertError),
    #[error("vCPU {vcpu}: the XSAVE area {problem}")]
    Xsave {
        vcpu: usize,
        problem: super::xstate::XsaveProblem,
    },
    #[error(transparent)]
    CpuModel(#[from] CpuModelMismatch),
}

impl SnapshotError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The name a snapshot uses for an irqchip mode.
pub fn mode_name(mode: IrqchipMode) -> &'static str {
    match mode {
        IrqchipMode::User => "user",
        IrqchipMode::Split => "split",
        IrqchipMode::Kernel => "kernel",
    }
}

/// The mode a snapshot names.
pub fn mode_from_name(name: &str) -> Option<IrqchipMode> {
    match name {
        "user" => Some(IrqchipMode::User),
        "split" => Some(IrqchipMode::Split),
        "kernel" => Some(IrqchipMode::Kernel),
        _ => None,
    }
}

/// What a snapshot is of: checked first on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The irqvm that wrote it (`CARGO_PKG_VERSION`), for people; not checked.
    pub irqvm_version: String,
    pub vcpus: u32,
    /// Guest RAM in bytes: the size of the `memory` file.
    pub memory_size: u64,
    /// The irqchip mode the VM ran in: `user`, `split` or `kernel`.
    pub source_mode: String,
}

/// The fields of a snapshot that change with time alone (a snapshot of a restored, never
/// resumed VM differs from its source only in them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeState {
    /// KVM_GET_CLOCK (kvmclock, ns) at the save; restored with KVM_SET_CLOCK.
    pub kvm_clock_ns: u64,
    /// Host wall clock at the save (ns since the Unix epoch), for people.
    pub saved_at_unix_ns: u64,
}

/// The x87/SSE state of KVM_GET_FPU (kvm-bindings has no serde form for it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<Vec<u8>>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<Vec<u8>>,
    pub mxcsr: u32,
}

impl FpuState {
    pub fn from_kvm(fpu: &kvm_fpu) -> Self {
        Self {
            fpr: fpu.fpr.iter().map(|r| r.to_vec()).collect(),
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm.iter().map(|r| r.to_vec()).collect(),
            mxcsr: fpu.mxcsr,
        }
    }

    /// KVM's form; `None` if a register array has the wrong shape.
    pub fn to_kvm(&self) -> Option<kvm_fpu> {
        let mut fpu = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != fpu.fpr.len() || self.xmm.len() != fpu.xmm.len() {
            return None;
        }
        for (dst, src) in fpu.fpr.iter_mut().zip(&self.fpr) {
            *dst = src.as_slice().try_into().ok()?;
        }
        for (dst, src) in fpu.xmm.iter_mut().zip(&self.xmm) {
            *dst = src.as_slice().try_into().ok()?;
        }
        Some(fpu)
    }
}

/// One MSR as KVM_GET_MSRS read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// One vCPU's processor state, in KVM's formats (the same in every irqchip mode). The
/// interrupt controller's part (local APIC, MP state, pending NMI/SMI) is in the chip snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuCpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// KVM_GET_XCRS where KVM has KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// KVM_GET_XSAVE(2) where KVM has KVM_CAP_XSAVE: x87, SSE and every extended component
    /// (AVX's upper YMM halves, ...). Restored instead of `fpu` when present.
    pub xsave: Option<XsaveArea>,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that reads back, IA32_TSC included; not the local
    /// APIC's (IA32_APIC_BASE, IA32_TSC_DEADLINE, x2APIC), which the chip snapshot holds.
    pub msrs: Vec<MsrValue>,
    pub debugregs: kvm_debugregs,
    /// KVM_GET_VCPU_EVENTS with the model's parts cleared (NMI and SMI pending, latched INIT:
    /// those are in the chip snapshot): exception, injected interrupt/NMI, NMI mask, shadow.
    pub events: kvm_vcpu_events,
}

/// The 16550A's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// The port devices' state (pc-testdev's line levels are in the chip snapshot's routing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegs,
    /// fw_cfg: the selected key (None: an architecture key or none) and the read offset.
    pub fw_cfg_selected: Option<u16>,
    pub fw_cfg_offset: u64,
    /// CMOS RAM (128 bytes) and the selected index.
    pub cmos_ram: Vec<u8>,
    pub cmos_index: u8,
    /// i8042: configuration byte, output buffer (byte, from aux), command awaiting data.
    pub i8042_ctr: u8,
    pub i8042_output: Vec<(u8, bool)>,
    pub i8042_pending: Option<u8>,
}

/// Everything but the RAM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub header: Header,
    pub time: TimeState,
    /// Index = vCPU.
    pub vcpus: Vec<VcpuCpuState>,
    /// The interrupt fabric in the `irqchip` model's format, whatever the source mode.
    pub chip: ChipSnapshot,
    /// The APIC bus's lowest-priority round-robin position (`user` mode's; 0 from KVM, which
    /// keeps none that can be read).
    pub lowest_priority_turn: u32,
    pub devices: DeviceState,
    /// The CPU model and CPUID tables the guest saw (restored with them).
    pub cpu_model: CpuModelState,
}

impl SnapshotState {
    /// The checks that need no VM: version, the header against the parts, the source mode.
    pub fn check_shape(&self) -> Result<IrqchipMode, SnapshotError> {
        let h = &self.header;
        if h.format_version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: h.format_version,
            });
        }
        let mode = mode_from_name(&h.source_mode).ok_or_else(|| {
            SnapshotError::Shape(format!("unknown source mode {:?}", h.source_mode))
        })?;
        let n = h.vcpus as usize;
        if n == 0 || h.vcpus > crate::cpumodel::MAX_VCPUS {
            return Err(SnapshotError::Shape(format!(
                "{} vCPUs is out of range",
                h.vcpus
            )));
        }
        if self.vcpus.len() != n {
            return Err(SnapshotError::Shape(format!(
                "the header says {n} vCPUs, the processor state has {}",
                self.vcpus.len()
            )));
        }
        if self.chip.vcpus.len() != n {
            return Err(SnapshotError::Shape(format!(
                "the header says {n} vCPUs, the interrupt state has {}",
                self.chip.vcpus.len()
            )));
        }
        crate::memory::ram_ranges(h.memory_size)
            .map_err(|e| SnapshotError::Shape(format!("memory size: {e}")))?;
        if self.devices.cmos_ram.len() != 128 {
            return Err(SnapshotError::Shape(format!(
                "CMOS RAM has {} bytes, not 128",
                self.devices.cmos_ram.len()
            )));
        }
        for (vcpu, cpu) in self.vcpus.iter().enumerate() {
            if cpu.fpu.to_kvm().is_none() {
                return Err(SnapshotError::Vcpu {
                    vcpu,
                    what: "malformed FPU registers".into(),
                });
            }
            if let Some(area) = &cpu.xsave {
                area.check_shape()
                    .map_err(|problem| SnapshotError::Xsave { vcpu, problem })?;
            }
        }
        self.cpu_model.check_shape(n)?;
        Ok(mode)
    }
}

/// A snapshot directory read and checked: the state, and the memory file opened.
pub struct LoadedSnapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    pub source_mode: IrqchipMode,
    pub memory: std::fs::File,
}

/// Reads `dir`'s state file and opens its memory file, refusing a snapshot that is truncated,
/// corrupted, of another format version or of an inconsistent shape (vCPU counts, memory size
/// against the memory file's). Nothing is applied anywhere.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(SnapshotError::io(&state_path))?;
    // The version first, so that another version is named as such rather than as corrupt.
    if let Ok(probe) = serde_json::from_slice::<VersionProbe>(&text) {
        if probe.header.format_version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: probe.header.format_version,
            });
        }
    }
    let state: SnapshotState =
        serde_json::from_slice(&text).map_err(|e| SnapshotError::Corrupt {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
    let source_mode = state.check_shape()?;
    let memory_path = dir.join(MEMORY_FILE);
    let memory = std::fs::File::open(&memory_path).map_err(SnapshotError::io(&memory_path))?;
    let found = memory
        .metadata()
        .map_err(SnapshotError::io(&memory_path))?
        .len();
    if found != state.header.memory_size {
        return Err(SnapshotError::MemorySize {
            path: memory_path,
            expected: state.header.memory_size,
            found,
        });
    }
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        state,
        source_mode,
        memory,
    })
}

#[derive(Deserialize)]
struct VersionProbe {
    header: VersionOnly,
}

#[derive(Deserialize)]
struct VersionOnly {
    format_version: u32,
}

/// Writes the state file atomically (a temporary file renamed over it).
pub fn write_state(dir: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let text = serde_json::to_vec(state).map_err(|e| SnapshotError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode: {e}"),
    })?;
    std::fs::write(&tmp, text).map_err(SnapshotError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(SnapshotError::io(&path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::chip::{PcIrqChip, PcIrqChipConfig};

    /// A valid state of `n` vCPUs (also for other modules' tests).
    fn state(n: usize) -> SnapshotState {
        let (chip, mut parts) = PcIrqChip::new(PcIrqChipConfig::new(n));
        let parts = parts.iter_mut().map(|v| v.save(0)).collect();
        let regs = kvm_regs {
            rip: 0x1234_5678,
            ..Default::default()
        };
        let cpu = VcpuCpuState {
            regs,
            sregs: kvm_sregs::default(),
            fpu: FpuState::from_kvm(&kvm_fpu {
                fcw: 0x37F,
                ..Default::default()
            }),
            xcrs: None,
            xsave: Some(XsaveArea(vec![0; 4096])),
            msrs: vec![MsrValue {
                index: 0x10,
                data: 99,
            }],
            debugregs: kvm_debugregs::default(),
            events: kvm_vcpu_events::default(),
        };
        SnapshotState {
            header: Header {
                format_version: FORMAT_VERSION,
                irqvm_version: "test".into(),
                vcpus: n as u32,
                memory_size: 16 << 20,
                source_mode: "split".into(),
            },
            time: TimeState {
                kvm_clock_ns: 1,
                saved_at_unix_ns: 2,
            },
            vcpus: vec![cpu; n],
            chip: ChipSnapshot::new(parts, chip.save_devices()),
            lowest_priority_turn: 3,
            devices: DeviceState {
                serial: SerialRegs {
                    baud_divisor_low: 1,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xB0,
                    scratch: 0,
                    in_buffer: vec![b'x'],
                },
                fw_cfg_selected: Some(5),
                fw_cfg_offset: 1,
                cmos_ram: vec![0; 128],
                cmos_index: 0x0B,
                i8042_ctr: 0x47,
                i8042_output: vec![(0xFA, false)],
                i8042_pending: None,
            },
            cpu_model: CpuModelState {
                topology: crate::cpumodel::Topology::flat(n as u32),
                x2apic: true,
                tsc_deadline: true,
                ext_dest_id: true,
                kvmclock: true,
                pv_eoi: true,
                cpuid: vec![Vec::new(); n],
            },
        }
    }

    /// The JSON form round-trips exactly (KVM's structs as their bytes, the model's in its
    /// serde form) and passes the shape checks, naming the source mode.
    #[test]
    fn state_round_trips_through_json() {
        let s = state(2);
        let text = serde_json::to_string(&s).unwrap();
        let back: SnapshotState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.check_shape().unwrap(), IrqchipMode::Split);
        assert_eq!(back.vcpus[1].fpu.to_kvm().unwrap().fcw, 0x37F);
    }

    /// Each inconsistency is refused by name.
    #[test]
    fn shape_checks_name_the_problem() {
        type Break = fn(&mut SnapshotState);
        let cases: [(&str, Break); 9] = [
            ("version", |s| s.header.format_version = 3),
            ("older", |s| s.header.format_version = 1),
            ("source mode", |s| s.header.source_mode = "qemu".into()),
            ("3 vCPUs", |s| s.header.vcpus = 3),
            ("interrupt state has 1", |s| {
                s.chip.vcpus.pop();
            }),
            ("CMOS RAM", |s| s.devices.cmos_ram.push(0)),
            ("FPU", |s| s.vcpus[0].fpu.xmm.pop().map(drop).unwrap_or(())),
            ("XSAVE area has 100 bytes", |s| {
                s.vcpus[1].xsave = Some(XsaveArea(vec![0; 100]))
            }),
            ("CPU model has 1 CPUID tables", |s| {
                s.cpu_model.cpuid.pop();
            }),
        ];
        for (what, break_it) in cases {
            let mut s = state(2);
            break_it(&mut s);
            let err = s.check_shape().unwrap_err().to_string();
            let named = match what {
                "version" => err.contains("format version 3") && !err.contains("older"),
                "older" => err.contains("format version 1") && err.contains("it is older"),
                "source mode" => err.contains("unknown source mode"),
                "3 vCPUs" => err.contains("header says 3 vCPUs"),
                other => err.contains(other),
            };
            assert!(named, "{what}: {err}");
        }
    }
}
