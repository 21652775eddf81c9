//! Single-stepping the guest to the instruction boundary where a waiting interrupt becomes
//! deliverable, for the backends that inject with KVM_INTERRUPT (`user`: every interrupt,
//! `split`: the PIC's ExtINT).
//!
//! Without an in-kernel LAPIC, KVM reports that the guest can take an interrupt only at an exit:
//! `ready_for_interrupt_injection` and `if_flag` in `kvm_run`, or KVM_EXIT_IRQ_WINDOW_OPEN. On
//! this host a guest that runs on without exiting leaves KVM only about once a millisecond
//! (docs/kvm-facts.md), so an interrupt waiting for `sti`, the end of an STI / MOV SS shadow
//! (SDM vol. 3 §6.8.3), an IRET out of a handler, or a CR8 write that lowers the TPR (CR8 writes
//! do not exit here) would be taken many instructions late. While an interrupt waits for one of
//! these, the backend steps the guest one instruction per KVM_RUN (KVM_SET_GUEST_DEBUG with
//! KVM_GUESTDBG_SINGLESTEP: each step returns as KVM_EXIT_DEBUG with fresh flags) and turns
//! stepping off right before it injects at the first boundary that takes the interrupt. The
//! interrupt frame then holds that boundary's RIP and the guest's own RFLAGS.
//!
//! Nothing of it may show to the guest (measured here, docs/kvm-facts.md "Single-stepping"):
//! KVM keeps TF out of what the guest reads (PUSHF, interrupt frames) and DR6 untouched, but
//! while stepping it also hides the guest's *own* TF: an instruction that sets TF while stepped
//! would lose the guest's single-step traps. So a stepping episode never starts while the guest
//! has TF set or a breakpoint enabled in DR7, and each step first decodes the instruction at RIP
//! ([`tf_source`]): one that may load TF (POPF, IRET, SYSRET, with the TF bit of the image it
//! loads set) or write DR7 ends the episode before it runs, and the backend falls back to its
//! interrupt-window kicks. Each episode has a budget of [`STEP_BUDGET`] steps (a guest can keep
//! IF=0 for millions of instructions; stepping them all would slow it a hundredfold), after which
//! the fallback takes over too.
//!
//! On by default in `user` and `split` (`VmConfig::exact_irq_boundaries`, `irqvm run
//! --exact-irq-boundaries=off` turns it off; `kernel` mode has nothing to step). An earlier
//! default-on try lost interrupts in the `user`-mode guest suite on 2-4 vCPUs and never finished
//! `bench_lat`'s timer workloads; two host behaviours were the causes, and the first two rules
//! below answer them. The hostile `fuzz` guest on 4 vCPUs then still took a single-step #DB of
//! ours in about one run in six (seeds 3, 14: `exception 1`, DR6.BS, TF in the frame's RFLAGS).
//! A per-exit log of RIP, RFLAGS, the stepping state and KVM's synced events showed each time an
//! NMI that KVM held (`nmi.pending` 1: the second of two KVM_NMIs) delivered at the entry where
//! stepping was armed, the step landing in the NMI stub; the NMI handler's IRETQ then loaded
//! KVM's TF. The events check below now counts an NMI KVM holds, and a frame pushed by the first
//! stepped instruction is cleaned after the fact (`FirstStep`), which also covers that
//! instruction faulting by itself.
//!
//! - **HLT is never stepped** ([`exits_itself`]). A step over HLT returns as a step exit with RIP
//!   past it, but the halt stays pending inside KVM: the next KVM_RUN delivers the interrupt
//!   injected at that step exit, runs one instruction of its handler and only then exits as
//!   KVM_EXIT_HLT. The backend then saw a halt with IF=0 inside the handler and never woke the
//!   vCPU again (`storm`, `latency`, `msi`: a vCPU halted at the second instruction of an
//!   interrupt stub). Run unstepped, HLT exits as KVM_EXIT_HLT with RIP past it: the boundary.
//!   Nor is the STI of `sti; hlt`: its shadow makes that HLT's exit the first boundary anyway.
//! - **No stepping begins at an entry where KVM delivers an event.** KVM_SET_GUEST_DEBUG puts
//!   TF into the guest's RFLAGS while RIP is still where stepping was armed (KVM's
//!   `__kvm_set_rflags` adds it while RIP is `singlestep_rip`), so an event delivered at that
//!   entry gets TF in its frame and the handler's IRET hands the guest a #DB of ours. Measured:
//!   an interrupt queued before a KVM_RUN that returned without entering (a kick), and the #GP
//!   KVM raises when it completes an MSR exit that userspace failed (`fuzz`: `exception 1` one
//!   instruction after a faulting RDMSR). So stepping is off before irqvm queues an interrupt or
//!   NMI, never armed while one may sit in KVM, and off for an entry where an MSR exit's #GP is
//!   due (the backends track both), nor while KVM_GET_VCPU_EVENTS shows an exception, interrupt or
//!   NMI injection pending or an NMI held ([`event_due`]: a soft interrupt irqvm emulated, the
//!   second of two NMIs). What is left, the first stepped instruction faulting by itself (a #UD,
//!   a page fault at the RIP where stepping was armed) or an event KVM does not report, is
//!   repaired: after that instruction, a 64-bit frame above RSP with its RIP, CS, RSP and SS and
//!   TF set gets TF cleared before the handler can IRET with it (`FirstStep`; guest
//!   `irq_boundary`, a `ud2` right after the ICR write that starts an episode).
//!
//! **User mode is never stepped.** On this host CPL-3 code runs natively: a stepped SYSRETQ or
//! IRETQ into user mode gives no step exit there (the user code runs on to its next exit), user
//! code runs with IF = 1 whatever its RFLAGS image said (docs/kvm-facts.md, "User mode's IF
//! here"), and a frame the host pushes from user mode while stepping stays armed carries KVM's
//! TF. Measured in a `user`-mode Linux boot: a SYSCALL made while stepping was armed faulted
//! at LSTAR with RFLAGS image 0x10102 (TF, RF), which the SYSCALL watch
//! (`crate::emulate::syscall`) did not take for a half-done SYSCALL, and Linux killed init
//! with "segfault at \<LSTAR\> ... error 15". So an episode ends, and the backend falls back to
//! its window kicks, when the vCPU is at CPL 3 or the instruction at RIP can enter it
//! (SYSRET, SYSEXIT, an IRET whose CS image has RPL 3: [`user_entry`]); the interrupt is then
//! taken at the next exit, in user mode, where IF is 1.
//!
//! An IRETQ is not stepped either: a step over an IRETQ that returns from an interrupt KVM
//! injected runs one more instruction before it exits (docs/kvm-facts.md), which would take an
//! interrupt waiting for that IRETQ one instruction late. The backend arms an execute breakpoint
//! at the return address instead (KVM_GUESTDBG_USE_HW_BP, [`iretq`]), which stops the guest
//! right there; the `irq_boundary` guest fails if it were late. (An earlier try of the
//! breakpoint seemed to lose an IPI in a 4-vCPU storm: that was the HLT stall above.)
//!
//! **IF-clear code is run, not stepped, up to where IF may be set.** While IF is clear, a waiting
//! interrupt can only become deliverable at an instruction that sets IF, so in CPL-0 64-bit code
//! the stepper decodes forward from RIP ([`super::stretch`]) and arms execute breakpoints (DR0-DR2)
//! on the first instructions, on every path, that may set IF or that the scan cannot follow
//! (returns, indirect branches, software interrupts, control and debug register writes); the guest
//! runs to whichever it reaches first, one exit for the whole stretch, and is stepped or scanned
//! again there. Every path ending at a HLT needs no breakpoint at all. The `irq_boundary` guest
//! runs a called function's loop of ~500 instructions with IF clear before a POPF that sets it:
//! stepped, the episode's budget ran out and the interrupt came late; run, it is taken right after
//! the POPF. Where IF is set (a shadow, a TPR that holds the vector) every instruction is stepped.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::guest_debug::{self, Breaks, Want};
use crate::kvm::KvmError;
use crate::memory::GuestRam;

use super::epilogue;
use super::stretch::{self, CodePages, Stretch};
use super::IrqchipError;

/// Steps one episode may take before the backend falls back to its window kicks: about a
/// millisecond of stepping here (~11 µs a step), what KVM's own next exit would cost, and far
/// more than the tens of instructions from an EOI to the handler's IRET.
pub const STEP_BUDGET: u32 = 96;

/// The budget of an episode that steps towards the IRET ending an NMI handler, for an NMI that
/// became pending while that handler runs ([`Stepper::step_nmi`]). A handler may do far more
/// after the NMI arrives than an interrupt handler between its EOI and its IRET (kvm-unit-tests'
/// eventinj formats and prints a line, ~1,000 instructions), and a second NMI during an NMI
/// handler is rare: up to ~50-70 ms of stepping here, once per such NMI, before the fallback
/// (KVM delivers the NMI at its next exit after the IRET).
pub const NMI_STEP_BUDGET: u32 = 4096;

/// How far below the interrupted RSP the handler's stack pointer may be for
/// [`Stepper::run_to_return`] to take the vCPU for inside that handler: its frame and what the
/// handler pushed, on the same stack.
const HANDLER_STACK: u64 = 64 * 1024;

/// Where an interrupt irqvm injected returns to: the RSP the interrupted code had, and the RIP
/// its frame holds if irqvm knew it at the injection (a stepped boundary: the registers were
/// synced and the instruction at RIP had completed), which its handler's IRETQ restores (SDM
/// vol. 2, IRET; vol. 3 §6.14.3). Without the RIP (an injection at an exit whose instruction
/// KVM completes at the next entry: an MMIO, port or MSR access, or a HLT), the frame on the
/// stack says it ([`frame_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReturnPoint {
    pub rip: Option<u64>,
    pub rsp: u64,
}

/// Where a 64-bit interrupt frame pushed on the same stack at stack pointer `rsp` begins: the
/// processor aligns RSP down to 16 bytes, then pushes SS, RSP, RFLAGS, CS and RIP, 8 bytes each
/// (SDM vol. 3 §6.14.2), so the RIP slot is 40 bytes below the aligned value. An IST or a
/// privilege change puts the frame on another stack, which [`frame_return_rip`] then rejects.
pub fn frame_at(rsp: u64) -> u64 {
    (rsp & !0xF).wrapping_sub(40)
}

/// The return RIP of the frame in `slots` (RIP, CS, RFLAGS, RSP, SS, as [`frame_at`] finds
/// them) if it is still the frame of an interrupt taken at `rsp` in code segment `cs`: its RSP
/// slot holds `rsp`, its CS slot `cs`, and its RFLAGS image has IF set (the interrupt was
/// accepted with IF = 1) and TF clear (a breakpoint at the return would not be the boundary).
pub fn frame_return_rip(slots: &[u64; 5], rsp: u64, cs: u16) -> Option<u64> {
    let [rip, frame_cs, rflags, frame_rsp, _ss] = *slots;
    let intact = frame_rsp == rsp
        && frame_cs & 0xFFFF == u64::from(cs)
        && rflags & RFLAGS_IF != 0
        && rflags & RFLAGS_TF == 0;
    intact.then_some(rip)
}

/// RFLAGS.IF (SDM vol. 1 §3.4.3.3).
const RFLAGS_IF: u64 = 1 << 9;

/// EFER.LMA: IA-32e mode active (SDM vol. 3 §2.2.1).
const EFER_LMA: u64 = 1 << 10;

/// 64-bit code: CS.L in IA-32e mode (SDM vol. 3 §3.4.5).
fn in_64bit_code(sregs: &kvm_sregs) -> bool {
    sregs.cs.l != 0 && sregs.efer & EFER_LMA != 0
}

/// CPL-0 64-bit code, where a RIP is a linear address (CS base 0) a breakpoint can name.
fn in_kernel_64bit_code(sregs: &kvm_sregs) -> bool {
    in_64bit_code(sregs) && sregs.cs.selector & 3 == 0
}

/// RFLAGS.TF (SDM vol. 1 §3.4.3.3).
const RFLAGS_TF: u64 = 1 << 8;
/// Runs to a return in a row that may re-use a kept breakpoint without reading the guest's DR7
/// again ([`Stepper::guest_breakpoints`]).
const UNREAD_DR7_RUNS: u32 = 3;

/// DR7 L0-L3 / G0-G3: a breakpoint of the guest's own is enabled (SDM vol. 3 §18.2.4).
const DR7_ENABLES: u64 = 0xFF;
/// The longest x86 instruction (SDM vol. 2 §2.3.11).
const MAX_INSN: usize = 15;
const PAGE: u64 = 4096;

/// Where the instruction about to run takes a new TF from, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TfSource {
    /// A flags image on the stack, this many bytes above the stack pointer (POPF: 0; IRET: two
    /// slots up, after the return address and CS).
    Stack { offset: u64 },
    /// SYSRET loads RFLAGS from R11.
    R11,
    /// Not decodable as harmless (a DR7 write, ICEBP): never step it.
    Refuse,
}

/// The code-segment state decoding needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeMode {
    /// 64-bit code (CS.L with EFER.LMA).
    pub long: bool,
    /// Default operand size 32 (CS.D) outside 64-bit code.
    pub default32: bool,
}

/// Decodes the prefixes and opcode of `code` (the bytes at RIP) far enough to say whether the
/// instruction can load TF (SDM vol. 2: POPF, IRET, SYSRET) or enable a breakpoint (MOV to DR7).
/// `None`: it cannot change either.
pub fn tf_source(code: &[u8], mode: CodeMode) -> Option<TfSource> {
    let mut opsize16 = false;
    let mut rex_w = false;
    for (i, &b) in code.iter().enumerate().take(MAX_INSN) {
        match b {
            0x66 => {
                opsize16 = true;
                rex_w = false;
            }
            // A legacy prefix after REX cancels the REX (SDM vol. 2 §2.2.1).
            0xF0 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65 | 0x67 => rex_w = false,
            0x40..=0x4F if mode.long => rex_w = b & 0x08 != 0,
            _ => return opcode(&code[i..], mode, opsize16, rex_w),
        }
    }
    None
}

fn opcode(code: &[u8], mode: CodeMode, opsize16: bool, rex_w: bool) -> Option<TfSource> {
    // Operand size in bytes (SDM vol. 2 §2.2.1.2, Table 3-4): 64-bit code defaults to 32 (64
    // with REX.W; POPF defaults to 64), other code to CS.D's size, 0x66 toggles.
    let legacy = if mode.default32 != opsize16 { 4 } else { 2 };
    match *code.first()? {
        // POPF/POPFD/POPFQ: the image at [SP].
        0x9D => Some(TfSource::Stack { offset: 0 }),
        // IRET/IRETD/IRETQ: IP, CS, then FLAGS, each one operand wide.
        0xCF => {
            let slot = match (mode.long, rex_w, opsize16) {
                (true, true, _) => 8,
                (true, false, true) => 2,
                (true, false, false) => 4,
                (false, _, _) => legacy,
            };
            Some(TfSource::Stack { offset: 2 * slot })
        }
        // ICEBP / INT1: a #DB of the guest's own.
        0xF1 => Some(TfSource::Refuse),
        0x0F => match *code.get(1)? {
            0x07 if mode.long => Some(TfSource::R11),
            // MOV DRn, reg: refuse a DR7 write (ModRM.reg = 7).
            0x23 => code
                .get(2)
                .filter(|modrm| (*modrm >> 3) & 7 == 7)
                .map(|_| TfSource::Refuse),
            _ => None,
        },
        _ => None,
    }
}

/// What KVM is asked to stop the guest at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Armed {
    Off,
    /// KVM_GUESTDBG_SINGLESTEP: after the next instruction.
    Step,
    /// KVM_GUESTDBG_USE_HW_BP: execute breakpoints at these linear addresses (DR0-DR2, DR7
    /// Ln with R/Wn = LENn = 0: SDM vol. 3 §18.2.4, set by `crate::guest_debug`), which stop
    /// the guest before such an instruction.
    Break(Breaks),
}

/// What to do with the instruction at RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Step it.
    Step,
    /// An IRETQ: stop at the instruction it returns to ([`iretq`]).
    Break(u64),
    /// IF is clear and stays clear up to these instructions: run to whichever comes first
    /// ([`stretch`]).
    Run(Breaks),
    /// Run it unstepped: it exits by itself ([`exits_itself`]).
    Unstepped,
    /// Never step it: it may load TF or enable a breakpoint, or the guest debugs itself.
    Refuse,
    /// Not at this entry: KVM holds an event it delivers at the next entry, whose frame would
    /// get KVM's TF if stepping began now.
    NotNow,
    /// The guest is at CPL 3, or the instruction at RIP takes it there ([`user_entry`]): not
    /// stepped ([`Stepper`]'s module documentation, "User mode is never stepped").
    UserMode,
}

/// How an instruction may take the guest to CPL 3 ([`user_entry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserEntry {
    /// SYSRET (64-bit code) and SYSEXIT return to CPL 3 by definition (SDM vol. 2B).
    Always,
    /// IRET: if the CS image this many bytes above the stack pointer has RPL 3.
    IfFrameCsAt { offset: u64 },
}

/// Decodes the instruction at RIP (`code`) far enough to say whether it can enter CPL 3
/// (SDM vol. 2: SYSRET 0F 07 in 64-bit code, SYSEXIT 0F 35, IRET CF with its operand size).
pub fn user_entry(code: &[u8], mode: CodeMode) -> Option<UserEntry> {
    let at = code
        .iter()
        .take(MAX_INSN)
        .position(|&b| !is_prefix(b, mode))?;
    match (code[at], code.get(at + 1)) {
        (0x0F, Some(0x07)) if mode.long => Some(UserEntry::Always),
        (0x0F, Some(0x35)) => Some(UserEntry::Always),
        // IRET pops IP, CS, FLAGS, one operand each: CS is one slot up, half the FLAGS offset.
        (0xCF, _) => match tf_source(code, mode) {
            Some(TfSource::Stack { offset }) => Some(UserEntry::IfFrameCsAt { offset: offset / 2 }),
            _ => None,
        },
        _ => None,
    }
}

/// What [`Stepper::step`] arranged for the next KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    /// One instruction, then a step exit with fresh flags.
    Stepping,
    /// Stepping off: the instruction at RIP exits by itself (HLT) with fresh flags, so no kick
    /// is needed; the episode goes on after that exit.
    ExitsItself,
    /// Stepping off for the rest of the episode (refused, or the budget spent): the caller falls
    /// back to its window kicks.
    Fallback,
}

/// True if the instruction at RIP is HLT (SDM vol. 2: F4, prefixes ignored), which this host
/// does not step: a step over HLT returns as a step exit with RIP past it, but the halt stays
/// pending inside KVM, and the next KVM_RUN delivers what was injected, runs one instruction of
/// the handler and only then exits as KVM_EXIT_HLT (docs/kvm-facts.md, "Single-stepping"). The
/// VMM would then see a halt with IF=0 inside the handler and never wake it. Unstepped, HLT
/// exits as KVM_EXIT_HLT with RIP past it, the exact boundary of an interrupt it waits for.
///
/// Also true for STI immediately followed by HLT (FB F4, the idle idiom of Linux's
/// `native_safe_halt` and of the test guests): STI's shadow holds interrupts until the HLT
/// after it has run (SDM vol. 2, STI), so the first boundary where the waiting interrupt can be
/// taken is that HLT's exit either way, and running the pair unstepped saves the step over STI.
pub fn exits_itself(code: &[u8], mode: CodeMode) -> bool {
    let Some((first, rest)) = first_opcode(code, mode) else {
        return false;
    };
    match first {
        0xF4 => true,
        0xFB => first_opcode(rest, mode).is_some_and(|(next, _)| next == 0xF4),
        _ => false,
    }
}

/// The first opcode byte of `code` past its prefixes, and the bytes after it.
fn first_opcode(code: &[u8], mode: CodeMode) -> Option<(u8, &[u8])> {
    let code = &code[..code.len().min(MAX_INSN)];
    let at = code.iter().position(|&b| !is_prefix(b, mode))?;
    Some((code[at], &code[at + 1..]))
}

/// True if the instruction at RIP is IRETQ in 64-bit code (REX.W CF, SDM vol. 2 IRET), which
/// this host does not step exactly: a step over an IRETQ that returns from an interrupt KVM
/// delivered runs one more instruction before it exits (docs/kvm-facts.md, "Single-stepping"),
/// so the backend stops at its return address with an execute breakpoint instead.
pub fn iretq(code: &[u8], mode: CodeMode) -> bool {
    if !mode.long {
        return false;
    }
    let mut rex_w = false;
    for &b in code.iter().take(MAX_INSN) {
        match b {
            0x40..=0x4F => rex_w = b & 0x08 != 0,
            // A legacy prefix after REX cancels it (SDM vol. 2 §2.2.1).
            _ if is_prefix(b, mode) => rex_w = false,
            0xCF => return rex_w,
            _ => return false,
        }
    }
    false
}

/// A legacy prefix, or REX in 64-bit code (SDM vol. 2 §2.1.1, §2.2.1).
fn is_prefix(b: u8, mode: CodeMode) -> bool {
    matches!(
        b,
        0x66 | 0xF0 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65 | 0x67
    ) || (mode.long && (0x40..=0x4F).contains(&b))
}

/// The registers and system registers KVM copied into `kvm_run` at the last KVM_RUN return
/// (KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS), offered by a backend that knows nothing has written
/// them since ([`Stepper::offer_synced`]). They stand for a KVM_GET_REGS and a KVM_GET_SREGS,
/// two ioctls of each step's three (the third reads the instruction: KVM_TRANSLATE).
#[derive(Clone, Copy)]
pub struct SyncedRegs {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// One vCPU's stepping state.
pub struct Stepper {
    memory: GuestRam,
    /// `VmConfig::exact_irq_boundaries`: without it [`Self::step`] never steps.
    enabled: bool,
    /// What KVM stops the guest at now.
    armed: Armed,
    /// Guest debugging is on in KVM (the guest's TF and DR7 were clear when it began).
    on: bool,
    /// Steps left in this episode.
    left: u32,
    /// Where single-stepping was last armed, until the instruction there has run ([`FirstStep`]).
    first: Option<FirstStep>,
    /// The return RIP [`Self::run_to_return`] armed its breakpoint at, until the vCPU is there.
    returning: Option<u64>,
    /// The registers of this entry, if the backend offered them ([`SyncedRegs`]).
    synced: Option<SyncedRegs>,
    /// KVM's events as of the last KVM_RUN return, if the backend offered them
    /// ([`Self::offer_events`]): they stand for a KVM_GET_VCPU_EVENTS.
    events: Option<kvm_vcpu_events>,
    /// Steps taken, for the counters.
    pub steps: u64,
    /// Handlers run to their return with a breakpoint ([`Self::run_to_return`]), for the
    /// counters.
    pub return_runs: u64,
    /// IF-clear stretches run to where they can end with breakpoints (`stretch_plan`),
    /// for the counters.
    pub stretch_runs: u64,
    /// Injections at a return breakpoint that kept it armed for the new handler
    /// ([`Self::end_for_injection`]), for the counters.
    pub kept_breakpoints: u64,
    /// Episodes that ended without reaching the boundary (budget spent, or the guest's own
    /// single-stepping or breakpoints): the backend fell back to its window kicks.
    pub fallbacks: u64,
    /// Runs to a return begun on a kept breakpoint without reading the guest's DR7 since it
    /// was last read ([`Self::guest_breakpoints`]).
    unread_dr7_runs: u32,
    /// Handlers whose way out irqvm ran itself ([`Self::finish_return`]), for the counters.
    pub finished_returns: u64,
}

impl Stepper {
    pub fn new(memory: GuestRam, enabled: bool) -> Self {
        Self {
            memory,
            enabled,
            armed: Armed::Off,
            on: false,
            kept_breakpoints: 0,
            left: STEP_BUDGET,
            first: None,
            returning: None,
            synced: None,
            events: None,
            steps: 0,
            return_runs: 0,
            stretch_runs: 0,
            fallbacks: 0,
            unread_dr7_runs: 0,
            finished_returns: 0,
        }
    }

    /// `VmConfig::exact_irq_boundaries`.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True while KVM steps this vCPU.
    pub fn active(&self) -> bool {
        self.on
    }

    /// The registers as of the last KVM_RUN return, for this entry only (`None`: read them with
    /// ioctls). The caller vouches that no ioctl wrote them since that return.
    pub fn offer_synced(&mut self, synced: Option<SyncedRegs>) {
        self.synced = synced;
        self.events = None;
    }

    /// KVM's events as of the last KVM_RUN return (`kvm_run`'s synced copy), for the stepper's
    /// next call only; [`Self::offer_synced`] withdraws them. The caller vouches that nothing
    /// changed KVM's events since that return.
    pub fn offer_events(&mut self, events: Option<kvm_vcpu_events>) {
        self.events = events;
    }

    /// The vCPU's registers: the offered copy, else KVM_GET_REGS.
    pub fn regs(&self, vcpu: &VcpuFd) -> Result<kvm_regs, IrqchipError> {
        match &self.synced {
            Some(s) => Ok(s.regs),
            None => Ok(vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?),
        }
    }

    /// The vCPU's system registers: the offered copy, else KVM_GET_SREGS.
    fn sregs(&self, vcpu: &VcpuFd) -> Result<kvm_sregs, IrqchipError> {
        match &self.synced {
            Some(s) => Ok(s.sregs),
            None => Ok(vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?),
        }
    }

    /// An interrupt waits for the guest: makes the next KVM_RUN run exactly one instruction, if
    /// that is safe and the budget allows ([`StepOutcome::Stepping`]), or run unstepped to the
    /// exit the instruction at RIP makes by itself ([`StepOutcome::ExitsItself`]: HLT).
    /// [`StepOutcome::Fallback`]: the caller falls back (and stepping is off).
    pub fn step(&mut self, vcpu: &VcpuFd) -> Result<StepOutcome, IrqchipError> {
        self.step_waiting(vcpu, Wait::Flags)
    }

    /// [`Self::step`], the stretch scan told what the interrupt waits for.
    fn step_waiting(&mut self, vcpu: &VcpuFd, wait: Wait) -> Result<StepOutcome, IrqchipError> {
        if !self.enabled {
            return Ok(StepOutcome::Fallback);
        }
        if self.left == 0 {
            if self.on {
                self.fallbacks += 1;
            }
            self.end_run(vcpu)?;
            return Ok(StepOutcome::Fallback);
        }
        let regs = self.regs(vcpu)?;
        if self.keeps_running_to_return(&regs) {
            self.left -= 1;
            return Ok(StepOutcome::Stepping);
        }
        self.settle_first(vcpu, &regs)?;
        let plan = self.plan(vcpu, &regs, Some(wait))?;
        tracing::trace!(
            rip = regs.rip,
            rflags = regs.rflags,
            ?plan,
            left = self.left,
            "step"
        );
        match plan {
            Plan::Run(breaks) => {
                self.arm(vcpu, Armed::Break(breaks))?;
                self.on = true;
                self.left -= 1;
                self.stretch_runs += 1;
                Ok(StepOutcome::Stepping)
            }
            plan @ (Plan::Step | Plan::Break(_)) => {
                let armed = match plan {
                    Plan::Break(at) => Armed::Break(Breaks::one(at)),
                    _ => Armed::Step,
                };
                if armed == Armed::Step && self.armed != Armed::Step {
                    self.first = Some(FirstStep::at(&regs, &self.sregs(vcpu)?));
                }
                self.arm(vcpu, armed)?;
                self.on = true;
                self.left -= 1;
                self.steps += 1;
                Ok(StepOutcome::Stepping)
            }
            Plan::Unstepped => {
                self.off(vcpu)?;
                Ok(StepOutcome::ExitsItself)
            }
            Plan::Refuse => {
                self.left = 0;
                self.fallbacks += 1;
                self.off(vcpu)?;
                Ok(StepOutcome::Fallback)
            }
            Plan::NotNow | Plan::UserMode => {
                self.fallbacks += 1;
                self.off(vcpu)?;
                Ok(StepOutcome::Fallback)
            }
        }
    }

    /// Where an interrupt injected at this boundary returns ([`ReturnPoint`]), if the registers
    /// of this entry were offered (a stepped boundary: no ioctl) and it is CPL-0 64-bit code.
    pub fn return_point(&self) -> Option<ReturnPoint> {
        let s = self.synced.as_ref()?;
        in_kernel_64bit_code(&s.sregs).then_some(ReturnPoint {
            rip: Some(s.regs.rip),
            rsp: s.regs.rsp,
        })
    }

    /// [`Self::step`] for an interrupt that waits for IF while the vCPU runs the handler of the
    /// interrupt irqvm injected at `ret` (its stack pointer below `ret.rsp`, within
    /// `HANDLER_STACK`): instead of stepping every instruction to that handler's IRETQ, an
    /// execute breakpoint at the return RIP stops the guest right where the IRETQ returns, the
    /// boundary hardware takes the interrupt at (one exit instead of one per instruction: about
    /// 12 in the guest library's stub, ~30 µs each on the Intel host, docs/benchmarks.md §9).
    /// The return RIP is the RIP slot of the frame, read from the stack if that frame is still
    /// intact there ([`frame_at`], [`frame_return_rip`]), and must be `ret.rip` if the injection
    /// knew it: RSP below `ret.rsp` alone does not tell the handler from a deeper call that the
    /// interrupted code made after the handler returned without an exit (the `irq_boundary`
    /// guest's stretch checks, right after its ExtINT check, met exactly that). At that exit the
    /// backend injects if the interrupt is deliverable there, or steps on from there
    /// ([`Self::step`]) if not (the handler reached the return RIP by another path, or the
    /// vector is still blocked). If the handler sets IF itself
    /// before its IRETQ, the interrupt is taken at the return RIP rather than after that STI,
    /// or at KVM's window exit if that comes first: late, as the window kicks would take it.
    /// Anything this cannot cover (an episode already stepping, the guest's own TF or
    /// breakpoints, an event due, HLT or user mode at RIP, a frame not found) goes to
    /// [`Self::step`].
    pub fn run_to_return(
        &mut self,
        vcpu: &VcpuFd,
        ret: ReturnPoint,
    ) -> Result<StepOutcome, IrqchipError> {
        if !self.enabled || self.on || self.left == 0 {
            return self.step(vcpu);
        }
        let regs = self.regs(vcpu)?;
        if !inside_handler(regs.rsp, ret) {
            tracing::trace!(rsp = regs.rsp, ?ret, "not inside the handler: stepping");
            return self.step(vcpu);
        }
        // The frame must still be there even when the injection knew its RIP: a stack pointer
        // below the interrupted one is also what a deeper call of the interrupted code has once
        // the handler returned unseen, and a breakpoint at that old return would never be hit.
        let to = self.handler_return_rip(vcpu, ret)?;
        let Some(to) = to.filter(|&to| to != regs.rip) else {
            tracing::trace!(rip = regs.rip, ?ret, ?to, "no frame to return by: stepping");
            return self.step(vcpu);
        };
        if !matches!(self.plan(vcpu, &regs, None)?, Plan::Step | Plan::Break(_)) {
            return self.step(vcpu);
        }
        tracing::trace!(rip = regs.rip, to, "run to the handler's return");
        self.arm(vcpu, Armed::Break(Breaks::one(to)))?;
        self.returning = Some(to);
        self.on = true;
        self.left -= 1;
        self.return_runs += 1;
        Ok(StepOutcome::Stepping)
    }

    /// For an interrupt that waits for IF inside the handler of the interrupt irqvm injected at
    /// `ret`: runs the rest of that handler, up to and including the IRETQ that consumes its
    /// frame, in irqvm ([`super::epilogue`]), if that rest is a way out the module runs. Returns
    /// the registers right after the IRETQ, the boundary where the waiting interrupt goes in;
    /// the caller hands them to KVM with the injection, in the same KVM_RUN. `None`: nothing
    /// changed, and [`Self::run_to_return`] takes over as before.
    ///
    /// Only from the registers, system registers and events KVM copied out at this return (no
    /// ioctl for them), with no episode under way, and only where the processor itself would do
    /// nothing more than those instructions: CPL-0 64-bit code, the stack pointer inside the
    /// handler, TF clear, no breakpoint of the guest's own enabled (its DR7 is read: an enabled
    /// one could match an instruction or a stack slot), no interrupt shadow, NMIs not blocked
    /// (the IRETQ would unblock them), and nothing KVM is yet to deliver. The caller vouches that
    /// the instruction of the last exit has completed (an MMIO write, a debug exit, a KVM_RUN
    /// that returned without an exit), so that KVM has nothing left to finish at the next entry
    /// that the new registers would contradict.
    pub fn finish_return(
        &mut self,
        vcpu: &VcpuFd,
        ret: ReturnPoint,
    ) -> Result<Option<kvm_regs>, IrqchipError> {
        let (Some(synced), Some(events)) = (self.synced, self.events) else {
            return Ok(None);
        };
        let (regs, sregs) = (synced.regs, synced.sregs);
        if !self.enabled || self.on || !way_out_allowed(&regs, &sregs, &events, ret) {
            return Ok(None);
        }
        let Some(to) = self.handler_return_rip(vcpu, ret)? else {
            return Ok(None);
        };
        let target = epilogue::Target {
            frame: frame_at(ret.rsp),
            rip: to,
            rsp: ret.rsp,
            cs: sregs.cs,
            ss: sregs.ss,
            gdt_base: sregs.gdt.base,
            gdt_limit: sregs.gdt.limit,
        };
        let mut memory = SupervisorReads {
            memory: &self.memory,
            paging: crate::memory::Paging::of(&sregs),
            tlb: crate::memory::SupervisorTlb::default(),
        };
        // The attempt changes nothing until its registers go in, so the DR7 read (an ioctl) is
        // made only for a way out that ran: a handler whose tail is the guest's costs none.
        let after = match epilogue::finish(&regs, &target, &mut memory) {
            Ok(after) => after,
            Err(stop) => {
                tracing::trace!(
                    rip = regs.rip,
                    to,
                    ?stop,
                    "the handler's way out is the guest's"
                );
                return Ok(None);
            }
        };
        if guest_dr7_enables(vcpu)? {
            return Ok(None);
        }
        tracing::trace!(rip = regs.rip, to, "ran the handler's way out here");
        self.finished_returns += 1;
        Ok(Some(after))
    }

    /// True if a run to a handler's return ([`Self::run_to_return`]) is under way and the vCPU is
    /// not there yet: an exit of the handler's own came first (its EOI, an MMIO or port access,
    /// a kick). The breakpoint stays armed and the handler runs on, one unit of the budget per
    /// such exit, rather than being stepped from there. At the return RIP the run is over and
    /// stepping goes on as usual if the interrupt still waits.
    fn keeps_running_to_return(&mut self, regs: &kvm_regs) -> bool {
        let Some(to) = self.returning else {
            return false;
        };
        if regs.rip != to && self.armed == Armed::Break(Breaks::one(to)) {
            tracing::trace!(rip = regs.rip, to, "still running to the handler's return");
            return true;
        }
        self.returning = None;
        false
    }

    /// Where the handler of the interrupt injected at `ret` returns: the RIP of its frame, still
    /// on the stack ([`Self::read_frame_return`]), which must be `ret.rip` where the injection
    /// knew it.
    fn handler_return_rip(
        &self,
        vcpu: &VcpuFd,
        ret: ReturnPoint,
    ) -> Result<Option<u64>, IrqchipError> {
        let framed = self.read_frame_return(vcpu, ret.rsp)?;
        Ok(framed.filter(|&rip| ret.rip.is_none_or(|known| known == rip)))
    }

    /// The return RIP of the frame an interrupt taken at `rsp` pushed, if that frame is still
    /// on the stack ([`frame_return_rip`]) and the vCPU runs CPL-0 64-bit code in the same code
    /// segment, where that RIP is a linear address (base 0) a breakpoint can name.
    fn read_frame_return(&self, vcpu: &VcpuFd, rsp: u64) -> Result<Option<u64>, IrqchipError> {
        let sregs = self.sregs(vcpu)?;
        if !in_kernel_64bit_code(&sregs) {
            return Ok(None);
        }
        let mut bytes = [0u8; 40];
        if self.read_linear(vcpu, frame_at(rsp), &mut bytes) != bytes.len() {
            return Ok(None);
        }
        let mut slots = [0u64; 5];
        for (slot, b) in slots.iter_mut().zip(bytes.chunks_exact(8)) {
            *slot = u64::from_le_bytes(b.try_into().unwrap_or_default());
        }
        Ok(frame_return_rip(&slots, rsp, sregs.cs.selector))
    }

    /// [`Self::step`] for an interrupt that only the TPR holds (SDM vol. 3 §11.8.3.1): in CPL-0
    /// 64-bit code the stretch from RIP runs to where it can end (`stretch_plan`) with IF
    /// set too. Only a TPR write can release the vector there. An xAPIC MMIO or x2APIC MSR write
    /// exits by itself, and a MOV to CR8, which does not exit on this host (docs/kvm-facts.md),
    /// is a control-register write, where every scan stops. So a Windows-style guest that keeps
    /// an interrupt pending at a raised IRQL does not pay one exit per instruction until it
    /// lowers CR8, nor lose the boundary once the budget is spent.
    pub fn step_past_tpr(&mut self, vcpu: &VcpuFd) -> Result<StepOutcome, IrqchipError> {
        self.step_waiting(vcpu, Wait::Tpr)
    }

    /// [`Self::step`] for an NMI that waits for the IRET of the NMI handler in service: an
    /// episode that begins here gets [`NMI_STEP_BUDGET`] steps instead of [`STEP_BUDGET`].
    pub fn step_nmi(&mut self, vcpu: &VcpuFd) -> Result<StepOutcome, IrqchipError> {
        if !self.on && self.left == STEP_BUDGET {
            self.left = NMI_STEP_BUDGET;
        }
        self.step(vcpu)
    }

    /// The episode is over (the interrupt goes in now, or nothing waits any more): stepping off
    /// before the injection, so the interrupt frame gets the guest's RFLAGS; budget refilled.
    pub fn end(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        self.end_run(vcpu)?;
        self.left = STEP_BUDGET;
        Ok(())
    }

    /// [`Self::end`] for an injection at this entry. Made right where a run to a handler's
    /// return stopped at its breakpoint ([`Self::run_to_return`]), the new handler's frame
    /// returns to that same RIP, where the next interrupt that waits for its IRETQ will want the
    /// same breakpoint: it stays armed (no KVM_SET_GUEST_DEBUG now, none when the next run to
    /// that return re-arms it). The episode ends as in [`Self::end`]. The next entry that neither
    /// runs to that return nor injects there disarms it through [`Self::end`], which every entry
    /// without an episode reaches: at the new handler's EOI exit when nothing waits, so the
    /// IRETQ does not stop for nothing. If the vCPU gets to the breakpoint without such an entry
    /// (a handler with no exit before its IRETQ), that debug exit is one such entry. An
    /// instruction breakpoint is a fault of the instruction at RIP, and an event injected at
    /// entry is delivered before any guest instruction runs (SDM vol. 3, "Instruction-Breakpoint
    /// Exception Condition" and "Event Injection"), so the handler runs first; the `irq_boundary`
    /// guest checks that on this host. The guest's DR7 is read again at the next run to a
    /// return only every few kept runs (`Stepper::guest_breakpoints`). True if the breakpoint
    /// was kept; a caller that then injects nothing after all calls [`Self::end`], since the
    /// vCPU resumes right at it.
    pub fn end_for_injection(&mut self, vcpu: &VcpuFd) -> Result<bool, IrqchipError> {
        let Some(at) = (match self.armed {
            Armed::Break(breaks) => breaks.single(),
            _ => None,
        }) else {
            self.end(vcpu)?;
            return Ok(false);
        };
        if self.first.is_some() || self.regs(vcpu)?.rip != at {
            self.end(vcpu)?;
            return Ok(false);
        }
        tracing::trace!(at, "injected at the return breakpoint: kept armed");
        self.on = false;
        self.returning = None;
        self.left = STEP_BUDGET;
        self.kept_breakpoints += 1;
        Ok(true)
    }

    /// Stepping off, after looking at what the first stepped instruction left ([`FirstStep`]).
    /// No ioctl unless stepping was armed.
    fn end_run(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        if self.first.is_some() {
            let regs = self.regs(vcpu)?;
            self.settle_first(vcpu, &regs)?;
        }
        self.off(vcpu)
    }

    fn off(&mut self, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
        self.arm(vcpu, Armed::Off)?;
        self.on = false;
        self.first = None;
        self.returning = None;
        Ok(())
    }

    fn arm(&mut self, vcpu: &VcpuFd, want: Armed) -> Result<(), IrqchipError> {
        if self.armed == want {
            return Ok(());
        }
        // KVM_SET_GUEST_DEBUG is shared with the SYSCALL watch: crate::guest_debug composes.
        let part = match want {
            Armed::Off => Want::Nothing,
            Armed::Step => Want::Step,
            Armed::Break(breaks) => Want::Break(breaks),
        };
        guest_debug::set_stepper(vcpu, part).map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))?;
        self.armed = want;
        Ok(())
    }

    /// True if the guest's DR7 enables a breakpoint of its own, which armed breakpoints or
    /// steps would hide (KVM runs the guest with the VMM's DR7 then). Read with
    /// KVM_GET_DEBUGREGS (~10 µs on a nested host) at every arming, except that a breakpoint
    /// kept armed since the last read ([`Self::end_for_injection`]) is re-used without one up
    /// to [`UNREAD_DR7_RUNS`] times in a row: the guest's DR7 has been hidden since that read
    /// and stays hidden until the next disarm. So a breakpoint the guest enables while a chain
    /// of interrupts each taken at a kept return breakpoint runs (a closed-loop device, the
    /// `irq_host` workload) takes effect at most that many runs to a return later than with a
    /// read at every one; the chain saves the ioctl on the rest.
    fn guest_breakpoints(&mut self, vcpu: &VcpuFd) -> Result<bool, IrqchipError> {
        if matches!(self.armed, Armed::Break(_)) && self.unread_dr7_runs < UNREAD_DR7_RUNS {
            self.unread_dr7_runs += 1;
            return Ok(false);
        }
        self.unread_dr7_runs = 0;
        guest_dr7_enables(vcpu)
    }

    /// How to stop the guest after its next instruction ([`Plan`]): refused if the guest uses a
    /// debug feature of its own that stepping would hide (checked while stepping is off: KVM hides
    /// TF from KVM_GET_REGS while it steps) or the instruction at RIP loads TF or enables a
    /// breakpoint; not now if KVM delivers an event at this entry and stepping would be armed
    /// here ([`event_due`]). With `scan` (what the interrupt waits for), an instruction to step
    /// in code that holds it becomes a run over the stretch it begins ([`Self::stretch_plan`]).
    fn plan(
        &mut self,
        vcpu: &VcpuFd,
        regs: &kvm_regs,
        scan: Option<Wait>,
    ) -> Result<Plan, IrqchipError> {
        if !self.on && (regs.rflags & RFLAGS_TF != 0 || self.guest_breakpoints(vcpu)?) {
            return Ok(Plan::Refuse);
        }
        // Arming KVM_GUESTDBG_SINGLESTEP here (not yet stepping, or stepping from a breakpoint)
        // puts TF into the guest's RFLAGS until the instruction at RIP completes: an event KVM
        // delivers at this entry would carry it in its frame.
        if self.armed != Armed::Step {
            let events = match self.events {
                Some(events) => events,
                None => vcpu
                    .get_vcpu_events()
                    .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
            };
            if event_due(&events) {
                return Ok(Plan::NotNow);
            }
        }
        let sregs = self.sregs(vcpu)?;
        Ok(match self.plan_for(vcpu, regs, &sregs) {
            Plan::Step => match scan {
                Some(wait) => self.stretch_plan(vcpu, regs, &sregs, wait),
                None => Plan::Step,
            },
            plan => plan,
        })
    }

    /// An instruction to step at RIP in CPL-0 64-bit code with IF clear: the interrupt cannot be
    /// taken before an instruction that sets IF, so instead of stepping each instruction the
    /// guest runs to the first place on its way that may end the stretch, with a breakpoint on
    /// each ([`stretch::scan`]), or unstepped if every way ends at a HLT. The same with IF set
    /// where only the TPR holds the interrupt ([`Self::step_past_tpr`]): the scan's stops
    /// include every control-register write, MOV CR8 among them. Stepped as before where IF is
    /// set otherwise (an STI or MOV SS shadow), in other code, or if the stretch ends in more
    /// places than the stepper has breakpoints.
    fn stretch_plan(&self, vcpu: &VcpuFd, regs: &kvm_regs, sregs: &kvm_sregs, wait: Wait) -> Plan {
        let held = regs.rflags & RFLAGS_IF == 0 || wait == Wait::Tpr;
        if !held || !in_kernel_64bit_code(sregs) {
            return Plan::Step;
        }
        let mut code = CodePages::new(|base, page: &mut [u8]| {
            self.read_linear(vcpu, base, page) == page.len()
        });
        let mut at_rip = GuestAtRip {
            stepper: self,
            vcpu,
            regs,
            sregs,
        };
        let stretch = stretch::scan_at(regs.rip, |at, out| code.fetch(at, out), &mut at_rip);
        tracing::trace!(rip = regs.rip, ?wait, ?stretch, "held stretch");
        match stretch {
            Stretch::Halts => Plan::Unstepped,
            Stretch::StopAt(breaks) => Plan::Run(breaks),
            Stretch::Step => Plan::Step,
        }
    }

    /// After the first instruction of a stepping run: if it delivered an exception or interrupt
    /// (its own fault, a soft interrupt, an event KVM held), that frame holds KVM's TF
    /// ([`FirstStep`]); clear it there, before the handler's IRET could load it.
    fn settle_first(&mut self, vcpu: &VcpuFd, regs: &kvm_regs) -> Result<(), IrqchipError> {
        let Some(first) = self.first else {
            return Ok(());
        };
        if regs.rip == first.rip && regs.rsp == first.rsp {
            // Nothing ran yet (a KVM_RUN that returned before entering).
            return Ok(());
        }
        self.first = None;
        // A frame is five slots: its push moves RSP down by 40 bytes or more, or to another stack
        // (a privilege change, an IST). Anything closer was an ordinary instruction.
        let moved = (first.rsp as i64).wrapping_sub(regs.rsp as i64);
        if !first.long || moved.unsigned_abs() < 40 {
            return Ok(());
        }
        let mut stack = [0u8; FRAME_SCAN];
        let n = self.read_linear(vcpu, regs.rsp, &mut stack);
        let slots: Vec<u64> = stack[..n]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        if let Some(at) = find_tf_frame(&slots, &first) {
            let rflags = slots[at + 2] & !RFLAGS_TF;
            let linear = regs.rsp.wrapping_add(8 * (at as u64 + 2));
            if self.write_linear(vcpu, linear, &rflags.to_le_bytes()) {
                tracing::debug!(
                    rip = first.rip,
                    frame = linear,
                    "cleared KVM's TF in a frame pushed by the first stepped instruction"
                );
            }
        }
        Ok(())
    }

    fn plan_for(&self, vcpu: &VcpuFd, regs: &kvm_regs, sregs: &kvm_sregs) -> Plan {
        let mode = CodeMode {
            long: in_64bit_code(sregs),
            default32: sregs.cs.db != 0,
        };
        let cs_base = if mode.long { 0 } else { sregs.cs.base };
        let mut code = [0u8; MAX_INSN];
        let n = self.read_linear(vcpu, cs_base.wrapping_add(regs.rip), &mut code);
        if exits_itself(&code[..n], mode) {
            return Plan::Unstepped;
        }
        if self.in_or_to_user_mode(vcpu, &code[..n], mode, regs, sregs) {
            return Plan::UserMode;
        }
        if iretq(&code[..n], mode) {
            if let Some(plan) = self.iretq_plan(vcpu, regs, sregs) {
                return plan;
            }
        }
        match tf_source(&code[..n], mode) {
            None => Plan::Step,
            Some(TfSource::Refuse) => Plan::Refuse,
            Some(TfSource::R11) if regs.r11 & RFLAGS_TF == 0 => Plan::Step,
            Some(TfSource::R11) => Plan::Refuse,
            Some(TfSource::Stack { offset }) => {
                // TF is bit 0 of the flags image's second byte, whatever its width. An
                // unreadable image faults instead of loading anything.
                let flags_high = self.stack_byte(vcpu, mode, regs, sregs, offset + 1);
                if flags_high.is_some_and(|b| b & 1 != 0) {
                    return Plan::Refuse;
                }
                Plan::Step
            }
        }
    }

    /// An IRETQ in 64-bit code: a breakpoint at its return address if its frame (RIP, CS,
    /// RFLAGS at RSP, 8 bytes each: SDM vol. 2, IRET) returns to the same code segment with TF
    /// clear, so that the address is the linear one (base 0 in 64-bit mode) and the return
    /// loads no TF. `None`: step it (TF set in the image is refused by the caller's TF check).
    /// The guest runs at CPL 3 (CS.RPL), or the instruction at RIP (`code`) enters it: SYSRET
    /// and SYSEXIT always, an IRET whose CS image has RPL 3 (an unreadable image faults
    /// instead, at CPL 0).
    fn in_or_to_user_mode(
        &self,
        vcpu: &VcpuFd,
        code: &[u8],
        mode: CodeMode,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> bool {
        if sregs.cs.selector & 3 == 3 {
            return true;
        }
        match user_entry(code, mode) {
            None => false,
            Some(UserEntry::Always) => true,
            Some(UserEntry::IfFrameCsAt { offset }) => self
                .stack_byte(vcpu, mode, regs, sregs, offset)
                .is_some_and(|cs| cs & 3 == 3),
        }
    }

    /// The byte `offset` bytes above the stack pointer (SS base plus SP, ESP or RSP as the
    /// stack's size says), if it translates.
    fn stack_byte(
        &self,
        vcpu: &VcpuFd,
        mode: CodeMode,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        offset: u64,
    ) -> Option<u8> {
        let ss_base = if mode.long { 0 } else { sregs.ss.base };
        let sp = if mode.long || sregs.ss.db != 0 {
            regs.rsp
        } else {
            regs.rsp & 0xFFFF
        };
        let mut byte = [0u8; 1];
        let at = ss_base.wrapping_add(sp).wrapping_add(offset);
        (self.read_linear(vcpu, at, &mut byte) == 1).then_some(byte[0])
    }

    fn iretq_plan(&self, vcpu: &VcpuFd, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<Plan> {
        let mut frame = [0u8; 24];
        if self.read_linear(vcpu, regs.rsp, &mut frame) != frame.len() {
            return None;
        }
        let slot = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (rip, cs, rflags) = (slot(0), slot(1), slot(2));
        (cs & 0xFFFF == u64::from(sregs.cs.selector) && rflags & RFLAGS_TF == 0)
            .then_some(Plan::Break(rip))
    }

    /// Reads guest-linear memory: with offered registers, through the guest's page tables
    /// walked in guest RAM where they are 4-level ([`crate::memory::read_linear_paged`]), else
    /// with KVM_TRANSLATE.
    fn read_linear(&self, vcpu: &VcpuFd, linear: u64, out: &mut [u8]) -> usize {
        let paging = self.synced.map(|s| crate::memory::Paging::of(&s.sregs));
        crate::memory::read_linear_paged(&self.memory, vcpu, paging, linear, out)
    }

    /// Writes `data` to guest-linear memory if it all translates and lies in guest RAM.
    fn write_linear(&self, vcpu: &VcpuFd, linear: u64, data: &[u8]) -> bool {
        let mut done = 0;
        let mut parts = Vec::new();
        while done < data.len() {
            let addr = linear.wrapping_add(done as u64);
            match vcpu.translate_gva(addr) {
                Ok(tr) if tr.valid != 0 => {
                    let chunk = ((PAGE - (addr % PAGE)) as usize).min(data.len() - done);
                    parts.push((GuestAddress(tr.physical_address), done, chunk));
                    done += chunk;
                }
                _ => return false,
            }
        }
        parts.iter().all(|&(gpa, from, len)| {
            self.memory
                .write_slice(&data[from..from + len], gpa)
                .is_ok()
        })
    }
}

/// The guest at a stop, for the stretch scan to follow the returns and indirect branches ahead of
/// RIP ([`stretch::AtRip`]): its registers, and memory read as its page tables map it.
struct GuestAtRip<'a> {
    stepper: &'a Stepper,
    vcpu: &'a VcpuFd,
    regs: &'a kvm_regs,
    sregs: &'a kvm_sregs,
}

impl stretch::AtRip for GuestAtRip<'_> {
    fn register(&self, reg: iced_x86::Register) -> Option<u64> {
        use iced_x86::Register as R;
        let r = self.regs;
        Some(match reg {
            R::RAX => r.rax,
            R::RCX => r.rcx,
            R::RDX => r.rdx,
            R::RBX => r.rbx,
            R::RSP => r.rsp,
            R::RBP => r.rbp,
            R::RSI => r.rsi,
            R::RDI => r.rdi,
            R::R8 => r.r8,
            R::R9 => r.r9,
            R::R10 => r.r10,
            R::R11 => r.r11,
            R::R12 => r.r12,
            R::R13 => r.r13,
            R::R14 => r.r14,
            R::R15 => r.r15,
            // 64-bit mode: only FS and GS have a base (SDM vol. 3 §3.4.4).
            R::ES | R::CS | R::SS | R::DS => 0,
            R::FS => self.sregs.fs.base,
            R::GS => self.sregs.gs.base,
            _ => return None,
        })
    }

    fn read_u64(&mut self, linear: u64) -> Option<u64> {
        // The scan's loads may point anywhere (MMIO, unmapped): a page walk, not a
        // KVM_TRANSLATE, unless the guest's paging is not 4-level.
        let mut bytes = [0u8; 8];
        let paging = crate::memory::Paging::of(self.sregs);
        let memory = &self.stepper.memory;
        let read = crate::memory::read_linear_walked(memory, paging, linear, &mut bytes)
            .unwrap_or_else(|| self.stepper.read_linear(self.vcpu, linear, &mut bytes));
        (read == bytes.len()).then(|| u64::from_le_bytes(bytes))
    }
}

/// True if a stack pointer `rsp` lies inside the handler of the interrupt irqvm injected at `ret`:
/// below the interrupted RSP, within [`HANDLER_STACK`].
fn inside_handler(rsp: u64, ret: ReturnPoint) -> bool {
    rsp < ret.rsp && ret.rsp - rsp <= HANDLER_STACK
}

/// True if the guest's DR7 enables a breakpoint of its own (KVM_GET_DEBUGREGS reads the guest's
/// DR7 also while the VMM's breakpoints are armed).
fn guest_dr7_enables(vcpu: &VcpuFd) -> Result<bool, IrqchipError> {
    let dr7 = vcpu
        .get_debug_regs()
        .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?
        .dr7;
    Ok(dr7 & DR7_ENABLES != 0)
}

/// What [`Stepper::finish_return`] asks of the vCPU before it runs anything: inside the handler
/// irqvm entered at `ret` (RSP below the interrupted one, within [`HANDLER_STACK`]), CPL-0 64-bit
/// code, IF and TF clear, no STI or MOV SS shadow, NMIs not blocked (the IRETQ would unblock
/// them, SDM vol. 3 §6.7.1), and no event KVM has yet to deliver ([`event_due`]).
fn way_out_allowed(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    events: &kvm_vcpu_events,
    ret: ReturnPoint,
) -> bool {
    let quiet = events.interrupt.shadow == 0 && events.nmi.masked == 0 && !event_due(events);
    inside_handler(regs.rsp, ret)
        && quiet
        && in_kernel_64bit_code(sregs)
        && regs.rflags & (RFLAGS_TF | RFLAGS_IF) == 0
}

/// Guest memory as the CPL-0 instructions [`Stepper::finish_return`] runs read it.
struct SupervisorReads<'a> {
    memory: &'a GuestRam,
    paging: crate::memory::Paging,
    /// The attempt's translations: it runs no instruction that could change them.
    tlb: crate::memory::SupervisorTlb,
}

impl epilogue::Memory for SupervisorReads<'_> {
    fn read(&mut self, at: u64, out: &mut [u8], access: crate::memory::Access) -> bool {
        crate::memory::read_as_supervisor(self.memory, &self.paging, &mut self.tlb, at, out, access)
    }
}

/// What an interrupt the stepper steps towards waits for, as far as the stretch scan goes: IF
/// (or a shadow, or an IRET for an NMI), or the TPR to fall below its class
/// ([`Stepper::step_past_tpr`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Flags,
    Tpr,
}

/// True if KVM delivers an event at the next entry: an exception (one a completed exit raised,
/// or a soft interrupt irqvm emulated), an interrupt, an NMI being injected, or an NMI KVM holds
/// pending (`nmi.pending`: the second of two KVM_NMIs, which KVM injects itself at a later
/// entry; seen in the `fuzz` guest on 4 vCPUs: an NMI delivered at the entry where stepping was
/// armed, its IRETQ then gave the guest a single-step #DB one instruction later).
pub fn event_due(events: &kvm_vcpu_events) -> bool {
    events.exception.injected != 0
        || events.exception.pending != 0
        || events.interrupt.injected != 0
        || events.nmi.injected != 0
        || events.nmi.pending != 0
}

/// Bytes above RSP searched for a frame after a first step: the frame (5 slots), an error code,
/// and what the handler's first instruction may have pushed.
const FRAME_SCAN: usize = 16 * 8;

/// Where stepping was armed (KVM_SET_GUEST_DEBUG sets KVM's `singlestep_rip` there). Until the
/// instruction at that RIP completes, KVM keeps TF in the guest's RFLAGS (`__kvm_set_rflags`),
/// so an exception or interrupt delivered at that entry, including a fault of that instruction
/// itself, pushes a frame with TF set, and the handler's IRET would give the guest a single-step
/// #DB of ours. Events later in a stepping run are pushed clean (docs/kvm-facts.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FirstStep {
    rip: u64,
    rsp: u64,
    cs: u16,
    ss: u16,
    /// 64-bit code: the frame layout [`find_tf_frame`] knows.
    long: bool,
}

impl FirstStep {
    fn at(regs: &kvm_regs, sregs: &kvm_sregs) -> Self {
        Self {
            rip: regs.rip,
            rsp: regs.rsp,
            cs: sregs.cs.selector,
            ss: sregs.ss.selector,
            long: in_64bit_code(sregs),
        }
    }
}

/// The index in `slots` (qwords from RSP up) of a 64-bit interrupt frame (SDM vol. 3 §6.14.2:
/// RIP, CS, RFLAGS, RSP, SS) that the first stepped instruction's entry pushed with TF set: its
/// RIP is that instruction's (a fault, or an event delivered before it) or at most 15 bytes on
/// (a trap or soft interrupt after it), CS, RSP and SS are those stepping was armed with, and
/// RFLAGS has TF (the guest's own TF was clear, or stepping would not have begun).
fn find_tf_frame(slots: &[u64], first: &FirstStep) -> Option<usize> {
    slots.windows(5).position(|f| {
        (first.rip..=first.rip.wrapping_add(MAX_INSN as u64)).contains(&f[0])
            && f[1] & 0xFFFF == u64::from(first.cs)
            && f[2] & RFLAGS_TF != 0
            && f[3] == first.rsp
            && f[4] & 0xFFFF == u64::from(first.ss)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: CodeMode = CodeMode {
        long: true,
        default32: false,
    };
    const PROT32: CodeMode = CodeMode {
        long: false,
        default32: true,
    };
    const REAL: CodeMode = CodeMode {
        long: false,
        default32: false,
    };

    #[test]
    fn sysret_sysexit_and_iret_may_enter_user_mode() {
        assert_eq!(
            user_entry(&[0x48, 0x0F, 0x07], LONG),
            Some(UserEntry::Always)
        );
        assert_eq!(user_entry(&[0x0F, 0x07], LONG), Some(UserEntry::Always));
        assert_eq!(
            user_entry(&[0x0F, 0x07], PROT32),
            None,
            "SYSRET is 64-bit only here"
        );
        assert_eq!(user_entry(&[0x0F, 0x35], PROT32), Some(UserEntry::Always));
        assert_eq!(
            user_entry(&[0x48, 0xCF], LONG),
            Some(UserEntry::IfFrameCsAt { offset: 8 })
        );
        assert_eq!(
            user_entry(&[0xCF], PROT32),
            Some(UserEntry::IfFrameCsAt { offset: 4 })
        );
        assert_eq!(
            user_entry(&[0x0F, 0x05], LONG),
            None,
            "SYSCALL leaves CPL 3"
        );
        assert_eq!(user_entry(&[0x9D], LONG), None);
        assert_eq!(user_entry(&[0x66], LONG), None, "prefixes only");
    }

    #[test]
    fn popf_and_iret_read_the_flags_image() {
        assert_eq!(
            tf_source(&[0x9D], LONG),
            Some(TfSource::Stack { offset: 0 })
        );
        assert_eq!(
            tf_source(&[0x66, 0x9D], REAL),
            Some(TfSource::Stack { offset: 0 })
        );
        // IRETQ: RIP, CS, RFLAGS in 8-byte slots; IRETD in 4-byte ones; IRET (16-bit) in 2.
        assert_eq!(
            tf_source(&[0x48, 0xCF], LONG),
            Some(TfSource::Stack { offset: 16 })
        );
        assert_eq!(
            tf_source(&[0xCF], LONG),
            Some(TfSource::Stack { offset: 8 })
        );
        assert_eq!(
            tf_source(&[0x66, 0xCF], LONG),
            Some(TfSource::Stack { offset: 4 })
        );
        assert_eq!(
            tf_source(&[0xCF], PROT32),
            Some(TfSource::Stack { offset: 8 })
        );
        assert_eq!(
            tf_source(&[0xCF], REAL),
            Some(TfSource::Stack { offset: 4 })
        );
        assert_eq!(
            tf_source(&[0x66, 0xCF], REAL),
            Some(TfSource::Stack { offset: 8 })
        );
    }

    #[test]
    fn sysret_dr7_writes_and_icebp() {
        assert_eq!(tf_source(&[0x48, 0x0F, 0x07], LONG), Some(TfSource::R11));
        // MOV DR7, RAX (0F 23 F8) is refused; MOV DR6, RAX (0F 23 F0) is harmless.
        assert_eq!(tf_source(&[0x0F, 0x23, 0xF8], LONG), Some(TfSource::Refuse));
        assert_eq!(tf_source(&[0x0F, 0x23, 0xF0], LONG), None);
        assert_eq!(tf_source(&[0xF1], LONG), Some(TfSource::Refuse));
    }

    /// HLT runs unstepped (whatever its prefixes); nothing else does.
    #[test]
    fn hlt_exits_by_itself() {
        assert!(exits_itself(&[0xF4], LONG));
        assert!(exits_itself(&[0x66, 0xF4], REAL));
        assert!(exits_itself(&[0x48, 0xF4], LONG));
        assert!(
            exits_itself(&[0xFB, 0xF4], LONG),
            "sti; hlt: the boundary is the HLT's exit"
        );
        assert!(exits_itself(&[0xFB, 0x66, 0xF4], REAL));
        assert!(!exits_itself(&[0xFB, 0x90, 0xF4], LONG), "sti; nop; hlt");
        assert!(!exits_itself(&[0xFB], LONG), "sti, the HLT not readable");
        assert!(!exits_itself(&[0x90], LONG));
        assert!(!exits_itself(&[], LONG));
        assert!(!exits_itself(&[0x66; 15], LONG));
    }

    /// Only IRETQ in 64-bit code gets the breakpoint: REX.W CF, with a legacy prefix before the
    /// REX; a prefix after the REX cancels it (IRETD), and 0x48 is DEC outside 64-bit code.
    #[test]
    fn iretq_is_recognised() {
        assert!(iretq(&[0x48, 0xCF], LONG));
        assert!(iretq(&[0x66, 0x48, 0xCF], LONG));
        assert!(iretq(&[0x4F, 0xCF], LONG));
        assert!(!iretq(&[0xCF], LONG));
        assert!(!iretq(&[0x48, 0x66, 0xCF], LONG));
        assert!(!iretq(&[0x48, 0xCF], PROT32));
        assert!(!iretq(&[0x48, 0x9D], LONG));
        assert!(!iretq(&[0x48], LONG));
    }

    /// An NMI KVM holds (the second of two KVM_NMIs) is delivered at the next entry like an
    /// injected one: stepping must not be armed there.
    #[test]
    fn an_nmi_kvm_holds_is_an_event_due() {
        let mut events = kvm_vcpu_events::default();
        assert!(!event_due(&events));
        events.nmi.masked = 1;
        assert!(!event_due(&events), "NMIs blocked: nothing delivered");
        events.nmi.pending = 1;
        assert!(event_due(&events));
        let mut events = kvm_vcpu_events::default();
        events.exception.pending = 1;
        assert!(event_due(&events));
        let mut events = kvm_vcpu_events::default();
        events.interrupt.injected = 1;
        assert!(event_due(&events));
    }

    const FIRST: FirstStep = FirstStep {
        rip: 0x10_2000,
        rsp: 0x20_0ff8,
        cs: 0x08,
        ss: 0x10,
        long: true,
    };

    /// A #UD at the first stepped instruction, found one push above RSP (the stub pushed a
    /// vector); a frame without TF, or of another RSP, is left alone.
    #[test]
    fn a_frame_with_tf_from_the_first_step_is_found() {
        let frame = [FIRST.rip, 0x08, 0x106, FIRST.rsp, 0x10];
        let mut slots = vec![6, 0];
        slots.extend_from_slice(&frame);
        assert_eq!(find_tf_frame(&slots, &FIRST), Some(2));
        // A soft interrupt or trap: RIP after the instruction.
        let mut after = slots.clone();
        after[2] = FIRST.rip + 2;
        assert_eq!(find_tf_frame(&after, &FIRST), Some(2));
        let mut clean = slots.clone();
        clean[4] = 0x6;
        assert_eq!(find_tf_frame(&clean, &FIRST), None);
        let mut other = slots.clone();
        other[5] = FIRST.rsp - 8;
        assert_eq!(find_tf_frame(&other, &FIRST), None);
        let mut far = slots;
        far[2] = FIRST.rip + 16;
        assert_eq!(find_tf_frame(&far, &FIRST), None);
        assert_eq!(find_tf_frame(&[], &FIRST), None);
    }

    #[test]
    fn an_interrupt_frame_is_found_below_the_aligned_stack_pointer() {
        // SDM vol. 3 §6.14.2: RSP aligned down to 16, then five 8-byte pushes.
        assert_eq!(frame_at(0x8000), 0x8000 - 40);
        assert_eq!(frame_at(0x8008), 0x8000 - 40);
        assert_eq!(frame_at(0x800F), 0x8000 - 40);
        assert_eq!(frame_at(0x10), 0x10u64.wrapping_sub(40));
    }

    #[test]
    fn a_frame_gives_its_return_rip_only_while_it_is_intact() {
        let rsp = 0x7FF8;
        let frame = [0x1234, 0x08, 0x246, rsp, 0x10];
        assert_eq!(frame_return_rip(&frame, rsp, 0x08), Some(0x1234));
        // Overwritten RSP slot (the stack reused), another code segment (a privilege change or
        // another CS), IF clear (not an interrupt irqvm injected), TF set (the return would
        // trap first): no return point.
        let mut reused = frame;
        reused[3] = rsp - 8;
        assert_eq!(frame_return_rip(&reused, rsp, 0x08), None);
        assert_eq!(frame_return_rip(&frame, rsp, 0x10), None);
        let mut if_clear = frame;
        if_clear[2] = 0x46;
        assert_eq!(frame_return_rip(&if_clear, rsp, 0x08), None);
        let mut tf = frame;
        tf[2] = 0x346;
        assert_eq!(frame_return_rip(&tf, rsp, 0x08), None);
        // The CS slot is compared on its selector bits only (the pushed slot is 8 bytes).
        let mut wide_cs = frame;
        wide_cs[1] = 0xFFFF_0000_0000_0008;
        assert_eq!(frame_return_rip(&wide_cs, rsp, 0x08), Some(0x1234));
    }

    #[test]
    fn other_instructions_and_prefixes() {
        for code in [
            &[0x90][..],
            &[0xFB],
            &[0xFA],
            &[0x9C],
            &[0x0F, 0x22, 0xC0],
            &[0xC7, 0x04, 0x25, 0x80, 0, 0xE0, 0xFE, 0, 0, 0, 0],
        ] {
            assert_eq!(tf_source(code, LONG), None, "{code:x?}");
        }
        // 0x48 is DEC EAX outside 64-bit code, not a REX prefix.
        assert_eq!(tf_source(&[0x48, 0xCF], PROT32), None);
        // A legacy prefix after REX cancels REX.W: IRETD's slots.
        assert_eq!(
            tf_source(&[0x48, 0x2E, 0xCF], LONG),
            Some(TfSource::Stack { offset: 8 })
        );
        assert_eq!(tf_source(&[0x66; 15], LONG), None);
        assert_eq!(tf_source(&[], LONG), None);
    }

    /// `Stepper::finish_return` runs nothing unless every condition of `way_out_allowed` holds;
    /// each one alone refuses.
    #[test]
    fn a_way_out_is_run_only_from_a_plain_handler_state() {
        let ret = ReturnPoint {
            rip: Some(0x5000),
            rsp: 0x1_8000,
        };
        let regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x1_7F00,
            rflags: 0x2,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.l = 1;
        sregs.cs.selector = 0x08;
        sregs.efer = EFER_LMA;
        let events = kvm_vcpu_events::default();
        assert!(way_out_allowed(&regs, &sregs, &events, ret));
        let refused = |regs: kvm_regs, sregs: kvm_sregs, events: kvm_vcpu_events, what: &str| {
            assert!(!way_out_allowed(&regs, &sregs, &events, ret), "{what}");
        };
        refused(
            kvm_regs {
                rflags: 0x202,
                ..regs
            },
            sregs,
            events,
            "IF set",
        );
        refused(
            kvm_regs {
                rflags: 0x102,
                ..regs
            },
            sregs,
            events,
            "TF set",
        );
        refused(
            kvm_regs {
                rsp: 0x1_8000,
                ..regs
            },
            sregs,
            events,
            "RSP not below",
        );
        refused(
            kvm_regs {
                rsp: 0x1_8000 - HANDLER_STACK - 8,
                ..regs
            },
            sregs,
            events,
            "too far",
        );
        let mut user = sregs;
        user.cs.selector = 0x33;
        refused(regs, user, events, "CPL 3");
        let mut compat = sregs;
        compat.cs.l = 0;
        refused(regs, compat, events, "compatibility mode");
        type SetEvent = fn(&mut kvm_vcpu_events);
        let event_cases: [(SetEvent, &str); 5] = [
            (|e| e.interrupt.shadow = 1, "shadow"),
            (|e| e.nmi.masked = 1, "NMI blocked"),
            (|e| e.nmi.pending = 1, "NMI held"),
            (|e| e.exception.pending = 1, "exception pending"),
            (|e| e.interrupt.injected = 1, "interrupt in KVM"),
        ];
        for (set, what) in event_cases {
            let mut e = events;
            set(&mut e);
            refused(regs, sregs, e, what);
        }
    }
}
