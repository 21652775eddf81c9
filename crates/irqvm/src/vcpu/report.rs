//! What a failed vCPU was doing: the exit it was handling and its register state, captured on
//! its own thread when it fails, so the VM's outcome explains itself (docs/architecture.md,
//! "When the guest misbehaves").

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// The last KVM exit a vCPU handled (a small `Copy` record, updated on every exit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LastExit {
    /// No exit yet (the failure came before the first KVM_RUN returned, or from KVM_RUN).
    #[default]
    None,
    /// KVM_RUN returned EINTR/EAGAIN (a kick).
    Interrupted,
    Pio {
        port: u16,
        size: usize,
        write: bool,
    },
    Mmio {
        addr: u64,
        size: usize,
        write: bool,
    },
    Msr {
        index: u32,
        write: bool,
    },
    Hlt,
    IrqWindowOpen,
    IoapicEoi {
        vector: u8,
    },
    /// KVM_EXIT_INTR or KVM_EXIT_TPR_ACCESS.
    IntrOrTpr,
    Shutdown,
    SystemEvent,
    InternalError,
    FailEntry,
    /// Any other `KVM_EXIT_*`.
    Other,
}

impl fmt::Display for LastExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = |write: bool| if write { "write" } else { "read" };
        match *self {
            Self::None => write!(f, "none yet"),
            Self::Interrupted => write!(f, "KVM_RUN interrupted (kick)"),
            Self::Pio { port, size, write } => {
                write!(f, "port {} {port:#x} ({size} bytes)", dir(write))
            }
            Self::Mmio { addr, size, write } => {
                write!(f, "MMIO {} {addr:#x} ({size} bytes)", dir(write))
            }
            Self::Msr { index, write } => {
                write!(f, "{} {index:#x}", if write { "WRMSR" } else { "RDMSR" })
            }
            Self::Hlt => write!(f, "HLT"),
            Self::IrqWindowOpen => write!(f, "interrupt window open"),
            Self::IoapicEoi { vector } => write!(f, "IOAPIC EOI of vector {vector:#x}"),
            Self::IntrOrTpr => write!(f, "KVM_EXIT_INTR / TPR access"),
            Self::Shutdown => write!(f, "shutdown (triple fault)"),
            Self::SystemEvent => write!(f, "system event"),
            Self::InternalError => write!(f, "KVM internal error"),
            Self::FailEntry => write!(f, "VM entry failure"),
            Self::Other => write!(f, "another KVM exit"),
        }
    }
}

/// A segment register as the report shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentState {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// L: a 64-bit code segment.
    pub long: bool,
    /// D/B: 32-bit default operand size.
    pub db: bool,
    pub dpl: u8,
}

impl From<&kvm_segment> for SegmentState {
    fn from(s: &kvm_segment) -> Self {
        Self {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            long: s.l != 0,
            db: s.db != 0,
            dpl: s.dpl,
        }
    }
}

impl fmt::Display for SegmentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x} base {:#x} limit {:#x} dpl {} {}",
            self.selector,
            self.base,
            self.limit,
            self.dpl,
            match (self.long, self.db) {
                (true, _) => "64-bit",
                (false, true) => "32-bit",
                (false, false) => "16-bit",
            }
        )
    }
}

/// The guest's registers when its vCPU failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    pub rip: u64,
    pub rflags: u64,
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8-R15, in that order.
    pub gprs: [u64; 16],
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub cs: SegmentState,
    pub ss: SegmentState,
}

const GPR_NAMES: [&str; 16] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];

impl GuestState {
    /// The state from KVM's register structures.
    pub fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        let r = regs;
        Self {
            rip: r.rip,
            rflags: r.rflags,
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            cr8: sregs.cr8,
            efer: sregs.efer,
            cs: (&sregs.cs).into(),
            ss: (&sregs.ss).into(),
        }
    }

    /// Reads the registers of `fd` (on its own thread); `None` if KVM refuses, which the report
    /// then says.
    pub fn capture(fd: &VcpuFd) -> Option<Self> {
        let regs = fd.get_regs().ok()?;
        let sregs = fd.get_sregs().ok()?;
        Some(Self::from_kvm(&regs, &sregs))
    }
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  rip {:#018x} rflags {:#x}", self.rip, self.rflags)?;
        for (row, names) in GPR_NAMES.chunks(4).enumerate() {
            write!(f, " ")?;
            for (i, name) in names.iter().enumerate() {
                write!(f, " {name:>3} {:#018x}", self.gprs[row * 4 + i])?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.cr8, self.efer
        )?;
        writeln!(f, "  cs {}", self.cs)?;
        write!(f, "  ss {}", self.ss)
    }
}

/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES (linux/kvm.h, `kvm_run.emulation_failure`):
/// `data[0]` is the flags word; then 16 bytes (`data[1]` and `data[2]`, little-endian): the
/// instruction's length (one byte) and up to 15 instruction bytes.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
/// KVM_INTERNAL_ERROR_EMULATION.
pub const SUBERROR_EMULATION: u32 = 1;

/// The instruction bytes an emulation failure carries, if KVM supplied them.
pub fn emulation_instruction_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != SUBERROR_EMULATION || data.len() < 3 {
        return None;
    }
    if data[0] & EMULATION_FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]);
    raw.get(1..1 + len).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_bytes_come_from_the_flagged_data_words() {
        // Length 3, bytes 0F 0F CC, the rest NOP filler; then the exit info words.
        let data = [1, 0x9090_9090_CC0F_0F03, 0x9090_9090_9090_9090, 7];
        assert_eq!(
            emulation_instruction_bytes(SUBERROR_EMULATION, &data),
            Some(vec![0x0F, 0x0F, 0xCC])
        );
        // All 15 bytes.
        let full = emulation_instruction_bytes(1, &[1, 0x0F, 0]).unwrap();
        assert_eq!(full.len(), 15);
        // No flag, another suberror, or too few words: no bytes.
        assert_eq!(emulation_instruction_bytes(1, &[0, 0x0F, 0]), None);
        assert_eq!(emulation_instruction_bytes(2, &data), None);
        assert_eq!(emulation_instruction_bytes(1, &[1, 3]), None);
        // A length beyond the 15 bytes there is room for is refused, not read past.
        assert_eq!(emulation_instruction_bytes(1, &[1, 16, 0]), None);
    }

    #[test]
    fn the_register_dump_names_every_register() {
        let regs = kvm_regs {
            rip: 0x1234,
            rax: 0xAA,
            r15: 0xFF,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        let text = GuestState::from_kvm(&regs, &sregs).to_string();
        for needle in [
            "rip 0x0000000000001234",
            "rax 0x00000000000000aa",
            "r15 0x00000000000000ff",
            "cr0 0x80000011",
            "efer 0x500",
            "cs 0000",
            "ss 0000",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }
}
