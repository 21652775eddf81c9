//! Finishing the SYSCALL this host leaves half done.
//!
//! On this host (kvm_pvm) a SYSCALL from CPL 3 in 64-bit mode does most of its work (SDM vol.
//! 2B, SYSCALL): RCX gets the next RIP, R11 the old RFLAGS, RFLAGS is masked with IA32_FMASK
//! and RIP is loaded from IA32_LSTAR, but CS and SS keep their user selectors and the CPL
//! stays 3 (docs/kvm-facts.md, "SYSCALL and SYSRET here"; guests/syscall.c). The fetch at
//! LSTAR, a supervisor page, then takes a page fault in user mode, which KVM delivers to the
//! guest without an exit: Linux kills init at its first system call. A breakpoint at LSTAR
//! never fires (the page fault comes first), but one at the guest's page-fault handler does,
//! since that handler runs at CPL 0, in KVM's emulator, where KVM checks code breakpoints.
//!
//! SYSCALL from compatibility mode (32-bit user code; on an AMD host, RIP = IA32_CSTAR:
//! AMD APM vol. 3, SYSCALL) is done in full by the host, CS, SS and CPL 0 included, without a
//! fault or an exit (measured with guests/syscall.c in all three modes; on an Intel host it
//! raises #UD at the instruction, as the SDM says, also without an exit): CSTAR needs no watch and
//! its writes are not filtered. SYSRETL, the way back, is not right here (CS 33H: the 32-bit code
//! resumes in 64-bit mode) but shows no exit to correct (docs/kvm-facts.md).
//!
//! So irqvm watches the handler of vector 14 with an execute breakpoint (DR3, through
//! [`crate::guest_debug`]). At each hit it reads the exception frame: a user-mode read or
//! fetch fault at RIP = LSTAR with CR2 = LSTAR, whose RFLAGS image is R11 masked with FMASK
//! (the host's half of SYSCALL), is the half-done SYSCALL. irqvm then finishes it as the SDM
//! describes: RIP = LSTAR, RSP = the user RSP from the frame (SYSCALL keeps RSP), RFLAGS = R11
//! AND NOT FMASK, CS = STAR\[47:32\] AND FFFCH (flat 64-bit code, DPL 0), SS = STAR\[47:32\] + 8
//! (flat read/write data, DPL 0), CPL 0. RCX and R11 are as the host left them. What stays
//! visible to the guest: CR2 holds LSTAR, and the 48 bytes of the frame stay on the stack the
//! delivery switched to (below TSS.RSP0), which Linux overwrites at its next kernel entry.
//! Every other hit is an ordinary page fault: the breakpoint cannot be stepped over with
//! RFLAGS.RF here (KVM_SET_REGS of RF still hits again, measured), so irqvm single-steps the
//! handler's first instruction with the breakpoint off and re-arms it at the step's exit (two
//! exits per guest page fault). The handler is entered through an interrupt gate with IF = 0,
//! so no maskable interrupt is delivered at that entry with KVM's TF in its frame (the hazard
//! `crate::backend::step` describes); an NMI arriving exactly there would be.
//!
//! The watch is armed when the guest writes IA32_LSTAR (the MSR filter sends those writes to
//! irqvm, which applies them with KVM_SET_MSRS) and when a vCPU thread starts with LSTAR
//! already set (a restored snapshot); the handler's address is read from the IDT then, and the
//! guest must have loaded its IDT before it writes LSTAR (Linux's `syscall_init` runs after
//! `trap_init`). While it is armed, KVM uses irqvm's debug registers instead of the guest's,
//! so a guest's own hardware breakpoints do not fire (the guest still reads its own DR7). Only
//! on kvm_pvm hosts ([`host_needs_it`]): with VMX or SVM, SYSCALL runs in hardware and no
//! breakpoint is set.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_enable_cap, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};

use crate::guest_debug::{self, Breaks, Want};
use crate::kvm::KvmError;
use crate::memory::GuestRam;

/// IA32_STAR, IA32_LSTAR, IA32_FMASK (SDM vol. 4, Table 2-2).
pub const MSR_STAR: u32 = 0xC000_0081;
pub const MSR_LSTAR: u32 = 0xC000_0082;
pub const MSR_FMASK: u32 = 0xC000_0084;

/// The page-fault vector and its error-code bits (SDM vol. 3 §6.15, "Interrupt 14").
const PF_VECTOR: u64 = 14;
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_FIXED: u64 = 1 << 1;
/// DR6.B3: breakpoint 3 was hit (SDM vol. 3 §18.2.3).
const DR6_B3: u64 = 1 << 3;
const EFER_LMA: u64 = 1 << 10;

/// True on a host whose KVM leaves SYSCALL from user mode half done: kvm_pvm, found by its
/// module in sysfs. Read once (before the vCPU threads' seccomp filters apply).
pub fn host_needs_it() -> bool {
    static NEEDED: OnceLock<bool> = OnceLock::new();
    *NEEDED.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// The MSR writes the filter must send to irqvm on such a host (none elsewhere).
pub fn watched_msr_writes() -> &'static [u32] {
    if host_needs_it() {
        &[MSR_LSTAR]
    } else {
        &[]
    }
}

/// `kernel` and `split` mode (which have no MSR filter of their own): KVM_CAP_X86_USER_SPACE_MSR
/// with reason FILTER and a filter denying [`watched_msr_writes`], so that those writes exit to
/// irqvm. Nothing on a host that does not need the watch. (`user` mode's filter lists them.)
pub fn enable_msr_exits(kvm: &Kvm, vm: &VmFd) -> Result<(), KvmError> {
    let watched = watched_msr_writes();
    if watched.is_empty() {
        return Ok(());
    }
    if !kvm.check_extension(Cap::X86UserSpaceMsr) || !kvm.check_extension(Cap::X86MsrFilter) {
        return Err(KvmError::MissingCap(
            "KVM_CAP_X86_USER_SPACE_MSR and KVM_CAP_X86_MSR_FILTER (for the SYSCALL watch)",
        ));
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)
        .map_err(KvmError::ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A 0 bit denies.
    let deny = [0u8];
    let ranges: Vec<MsrFilterRange<'_>> = watched
        .iter()
        .map(|&base| MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(KvmError::ioctl("KVM_X86_SET_MSR_FILTER"))
}

/// One vCPU's watch.
pub struct SyscallWatch {
    memory: GuestRam,
    enabled: bool,
    /// The page-fault handler the breakpoint is on, while armed.
    handler: Option<u64>,
    /// The breakpoint is off for one step over the handler's first instruction.
    stepping_past: bool,
    /// SYSCALLs irqvm finished.
    pub completed: u64,
    /// Breakpoint hits (every guest page fault while armed).
    pub hits: u64,
}

/// Where the page fault came from, as its frame (SDM vol. 3 §6.14.2) says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
}

/// The three MSRs SYSCALL reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SyscallMsrs {
    star: u64,
    lstar: u64,
    fmask: u64,
}

impl SyscallWatch {
    pub fn new(memory: GuestRam, enabled: bool) -> Self {
        Self {
            memory,
            enabled,
            handler: None,
            stepping_past: false,
            completed: 0,
            hits: 0,
        }
    }

    /// The guest's WRMSR of IA32_LSTAR, which the MSR filter denied to KVM: irqvm writes it
    /// (host-initiated, so the filter does not apply) and arms the watch. Returns false if
    /// KVM refuses the value (not canonical), which is #GP for the guest (SDM vol. 4,
    /// IA32_LSTAR).
    pub fn lstar_written(&mut self, vcpu: &VcpuFd, value: u64) -> Result<bool, KvmError> {
        let msrs = msr_list(&[(MSR_LSTAR, value)])?;
        let written = vcpu
            .set_msrs(&msrs)
            .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
        if written != 1 {
            return Ok(false);
        }
        self.arm(vcpu)?;
        Ok(true)
    }

    /// A vCPU thread starts: arms the watch if LSTAR is already set (a restored guest).
    pub fn resume(&mut self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        if self.enabled && read_msrs(vcpu)?.lstar != 0 {
            self.arm(vcpu)?;
        }
        Ok(())
    }

    /// Puts the breakpoint on the handler of vector 14 in the guest's IDT, if the guest is in
    /// long mode with that gate present; else takes it off.
    fn arm(&mut self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        if !self.enabled {
            return Ok(());
        }
        let sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        self.handler = self.page_fault_handler(vcpu, &sregs);
        self.stepping_past = false;
        let want = self
            .handler
            .map_or(Want::Nothing, |at| Want::Break(Breaks::one(at)));
        guest_debug::set_watch(vcpu, want).map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))?;
        tracing::debug!(handler = ?self.handler, "SYSCALL watch");
        Ok(())
    }

    /// The offset of IDT gate 14 (16 bytes in long mode, SDM vol. 3 §6.14.1), if present and
    /// an interrupt or trap gate.
    fn page_fault_handler(&self, vcpu: &VcpuFd, sregs: &kvm_sregs) -> Option<u64> {
        if sregs.efer & EFER_LMA == 0 || u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
            return None;
        }
        let mut gate = [0u8; 16];
        let at = sregs.idt.base.wrapping_add(PF_VECTOR * 16);
        if self.read_linear(vcpu, at, &mut gate) != gate.len() {
            return None;
        }
        let word = |i: usize| u64::from(u16::from_le_bytes([gate[i], gate[i + 1]]));
        let present = gate[5] & 0x80 != 0;
        let gate_type = gate[5] & 0x0F;
        let high = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
        (present && (gate_type == 0xE || gate_type == 0xF))
            .then(|| word(0) | (word(6) << 16) | (high << 32))
    }

    /// A KVM_EXIT_DEBUG (`dr6` from the exit). Ends a step past the breakpoint, or handles a
    /// hit of it; exits of the Stepper's are left alone.
    pub fn debug_exit(&mut self, vcpu: &mut VcpuFd, dr6: u64) -> Result<(), KvmError> {
        let Some(handler) = self.handler else {
            return Ok(());
        };
        if self.stepping_past {
            self.stepping_past = false;
            return guest_debug::set_watch(vcpu, Want::Break(Breaks::one(handler)))
                .map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"));
        }
        if dr6 & DR6_B3 == 0 {
            return Ok(());
        }
        self.hits += 1;
        let regs = vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        let msrs = read_msrs(vcpu)?;
        match self.frame(vcpu, regs.rsp) {
            Some(frame) if half_done_syscall(&frame, &regs, &sregs, &msrs) => {
                finish(vcpu, &frame, regs, sregs, &msrs)?;
                self.completed += 1;
                Ok(())
            }
            frame => {
                if let Some(frame) = frame.filter(|f| f.rip == msrs.lstar && f.cs & 3 == 3) {
                    // Never expected from Linux; a guest's own jump to LSTAR at CPL 3 also
                    // lands here, hence the rate limit.
                    crate::warn_ratelimited!(
                        ?frame,
                        r11 = format_args!("{:#x}", regs.r11),
                        rcx = format_args!("{:#x}", regs.rcx),
                        cr2 = format_args!("{:#x}", sregs.cr2),
                        fmask = format_args!("{:#x}", msrs.fmask),
                        dr6 = format_args!("{dr6:#x}"),
                        "a user-mode fault at LSTAR that is not a half-done SYSCALL"
                    );
                }
                // An ordinary page fault: one step over the handler's first instruction with
                // the breakpoint off (RF does not get past it here).
                self.stepping_past = true;
                guest_debug::set_watch(vcpu, Want::Step)
                    .map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))
            }
        }
    }

    /// The page-fault frame at `rsp`: error code, RIP, CS, RFLAGS, RSP (SS is not needed).
    fn frame(&self, vcpu: &VcpuFd, rsp: u64) -> Option<Frame> {
        let mut raw = [0u8; 40];
        if self.read_linear(vcpu, rsp, &mut raw) != raw.len() {
            return None;
        }
        let slot = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Some(Frame {
            error: slot(0),
            rip: slot(1),
            cs: slot(2),
            rflags: slot(3),
            rsp: slot(4),
        })
    }

    /// The guest's RAM, which the watch reads frames from.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Reads guest-linear memory ([`crate::memory::read_linear`]).
    fn read_linear(&self, vcpu: &VcpuFd, linear: u64, out: &mut [u8]) -> usize {
        crate::memory::read_linear(&self.memory, vcpu, linear, out)
    }
}

/// The page fault is the host's half of a SYSCALL: a user-mode read or fetch fault at RIP =
/// CR2 = LSTAR, in 64-bit mode with SYSCALL enabled, whose RFLAGS image is R11 masked with
/// FMASK (the flags SYSCALL leaves; the fault's delivery adds RF). A user program that jumps
/// to LSTAR itself faults with RFLAGS unmasked (IF set: Linux's FMASK clears it); one that
/// contrives the match anyway gets what its own SYSCALL would give it. TF is left out of the
/// comparison: a SYSCALL that irqvm's stepper (`crate::backend::step`) runs has KVM's TF in
/// the frame even when FMASK clears TF, as Linux's does (measured: frame RFLAGS 0x10146 for R11
/// 0x246 and FMASK 0x47700, guests/syscall_smp.c in `user` mode; 0x10102 for R11 0x206 in a
/// Linux boot); the stepper's `FirstStep` repair of such a frame comes only at the step's exit,
/// after this breakpoint's. The stepper no longer steps into user mode at all, so this is the
/// second line of defence. IF still tells a user jump to LSTAR from a SYSCALL.
fn half_done_syscall(
    frame: &Frame,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    msrs: &SyscallMsrs,
) -> bool {
    const EFER_SCE: u64 = 1;
    let ignored = RFLAGS_RF | RFLAGS_TF;
    let masked = (regs.r11 & !msrs.fmask & !ignored) | RFLAGS_FIXED;
    sregs.efer & EFER_SCE != 0
        && msrs.lstar != 0
        && frame.rip == msrs.lstar
        && sregs.cr2 == msrs.lstar
        && frame.cs & 3 == 3
        && frame.error & PF_USER != 0
        && frame.error & PF_WRITE == 0
        && frame.rflags & !ignored == masked
}

/// Completes SYSCALL (SDM vol. 2B, SYSCALL, 64-bit mode): CS and SS from STAR[47:32], CPL
/// 0, RIP = LSTAR, RSP the user's, RFLAGS = R11 AND NOT FMASK.
fn finish(
    vcpu: &mut VcpuFd,
    frame: &Frame,
    mut regs: kvm_regs,
    mut sregs: kvm_sregs,
    msrs: &SyscallMsrs,
) -> Result<(), KvmError> {
    let selector = ((msrs.star >> 32) & 0xFFFF) as u16;
    sregs.cs = kernel_segment(selector & 0xFFFC, CODE_EXECUTE_READ_ACCESSED, true);
    sregs.ss = kernel_segment(selector.wrapping_add(8), DATA_READ_WRITE_ACCESSED, false);
    regs.rip = msrs.lstar;
    regs.rsp = frame.rsp;
    regs.rflags = (regs.r11 & !msrs.fmask & !RFLAGS_RF) | RFLAGS_FIXED;
    vcpu.set_sregs(&sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    // The exit's interrupt flags describe the handler's entry, not LSTAR: a backend that
    // injects with KVM_INTERRUPT must look again (it requests a window instead).
    let run = vcpu.get_kvm_run();
    run.ready_for_interrupt_injection = 0;
    run.if_flag = u8::from(regs.rflags & RFLAGS_IF != 0);
    tracing::trace!(rip = regs.rip, rcx = regs.rcx, "SYSCALL finished");
    Ok(())
}

/// Segment types (SDM vol. 3 §3.4.5.1): execute/read code and read/write data, accessed.
const CODE_EXECUTE_READ_ACCESSED: u8 = 0xB;
const DATA_READ_WRITE_ACCESSED: u8 = 0x3;

/// The flat DPL-0 segment SYSCALL loads (SDM vol. 2B, SYSCALL): for CS L = 1, D = 0, for SS
/// B = 1.
fn kernel_segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    crate::vcpu::regs::flat_segment(selector, type_, code)
}

fn msr_list(entries: &[(u32, u64)]) -> Result<Msrs, KvmError> {
    let entries: Vec<kvm_msr_entry> = entries
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyEntries {
        what: "SYSCALL MSRs",
        entries: entries.len(),
    })
}

fn read_msrs(vcpu: &VcpuFd) -> Result<SyscallMsrs, KvmError> {
    let mut msrs = msr_list(&[(MSR_STAR, 0), (MSR_LSTAR, 0), (MSR_FMASK, 0)])?;
    vcpu.get_msrs(&mut msrs)
        .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
    let value = |index: u32| {
        msrs.as_slice()
            .iter()
            .find(|e| e.index == index)
            .map_or(0, |e| e.data)
    };
    Ok(SyscallMsrs {
        star: value(MSR_STAR),
        lstar: value(MSR_LSTAR),
        fmask: value(MSR_FMASK),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSTAR: u64 = 0xffff_ffff_81c0_0080;
    const MSRS: SyscallMsrs = SyscallMsrs {
        star: 0x0023_0010_0000_0000,
        lstar: LSTAR,
        fmask: 0x47700,
    };

    fn after_half_syscall() -> (Frame, kvm_regs, kvm_sregs) {
        let user_flags = 0x246;
        let regs = kvm_regs {
            r11: user_flags,
            rcx: 0x49_6419,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            efer: 0xD01,
            cr2: LSTAR,
            ..Default::default()
        };
        let frame = Frame {
            error: 0x15,
            rip: LSTAR,
            cs: 0x33,
            rflags: (user_flags & !MSRS.fmask) | RFLAGS_RF,
            rsp: 0x7ffd_0000,
        };
        (frame, regs, sregs)
    }

    #[test]
    fn the_hosts_half_syscall_is_recognised() {
        let (frame, regs, sregs) = after_half_syscall();
        assert!(half_done_syscall(&frame, &regs, &sregs, &MSRS));
    }

    /// A SYSCALL the stepper ran: KVM's TF in the frame although Linux's FMASK clears TF.
    #[test]
    fn a_stepped_half_syscall_is_recognised() {
        let (frame, regs, sregs) = after_half_syscall();
        let stepped = Frame {
            rflags: frame.rflags | RFLAGS_TF,
            ..frame
        };
        assert!(half_done_syscall(&stepped, &regs, &sregs, &MSRS));
    }

    #[test]
    fn ordinary_faults_are_not() {
        let (frame, regs, sregs) = after_half_syscall();
        let kernel = Frame { cs: 0x10, ..frame };
        assert!(!half_done_syscall(&kernel, &regs, &sregs, &MSRS));
        let elsewhere = Frame {
            rip: 0x40_1000,
            ..frame
        };
        assert!(!half_done_syscall(&elsewhere, &regs, &sregs, &MSRS));
        let write = Frame {
            error: 0x17,
            ..frame
        };
        assert!(!half_done_syscall(&write, &regs, &sregs, &MSRS));
        // A user jump to LSTAR: its flags are not masked (IF set).
        let jump = Frame {
            rflags: 0x246 | RFLAGS_RF,
            ..frame
        };
        assert!(!half_done_syscall(&jump, &regs, &sregs, &MSRS));
        let no_sce = kvm_sregs {
            efer: 0xD00,
            ..sregs
        };
        assert!(!half_done_syscall(&frame, &regs, &no_sce, &MSRS));
    }

    #[test]
    fn kernel_segments_are_flat_dpl0() {
        let cs = kernel_segment(0x10, CODE_EXECUTE_READ_ACCESSED, true);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.dpl, cs.type_),
            (0x10, 1, 0, 0, 0xB)
        );
        let ss = kernel_segment(0x18, DATA_READ_WRITE_ACCESSED, false);
        assert_eq!(
            (ss.selector, ss.l, ss.db, ss.dpl, ss.type_),
            (0x18, 0, 1, 0, 0x3)
        );
    }
}
