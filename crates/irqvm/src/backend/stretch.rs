//! Where a stretch of IF-clear guest code can end: the scan behind the stepper's breakpoint runs
//! ([`super::step::Stepper`], docs/architecture.md "Exact interrupt boundaries").
//!
//! A maskable interrupt that waits for IF stays blocked until an instruction sets IF: STI, POPF,
//! IRET, SYSRET, RSM (SDM vol. 3 §6.8.1; an NMI waiting for the IRET of its handler likewise waits
//! for an IRET). Nothing else the guest does in between can make it deliverable, so the stepper
//! does not have to stop the guest after every instruction of such a stretch: it is enough to stop
//! it before the first instruction, on each path from RIP, that may set IF or that leads where
//! this scan cannot follow (an indirect branch, a return, a software interrupt, an instruction it
//! cannot decode). [`scan`] decodes forward from RIP along straight-line code, both ways of each
//! conditional branch and into directly called functions, and collects those instructions; the
//! stepper puts an execute breakpoint on each (DR0-DR2) and lets the guest run to whichever it
//! reaches first, where it steps that instruction or scans again.
//!
//! - A path that reaches a HLT, or STI then HLT, needs no breakpoint: the HLT exits by itself at
//!   the boundary (`step::exits_itself`). A path that comes back to an instruction already scanned
//!   (a loop) needs none either.
//! - Also stopped at: writes to a control or debug register (paging, breakpoints), to SS (a
//!   breakpoint on the instruction after MOV SS is not taken: SDM vol. 3 §6.8.3), descriptor-table
//!   loads, MWAIT, hypercalls and VM instructions, a branch with an operand-size prefix (Intel and
//!   AMD disagree on its target in 64-bit code), and the instruction past the scan's budget.
//! - What the scan cannot see: an exception an ordinary instruction raises (a page fault) runs its
//!   handler unscanned. If that handler set IF, the interrupt would be taken at the next exit, as
//!   the window kicks would take it: late, never lost.
//! - The same scan serves a vector that only the TPR holds, with IF set
//!   (`Stepper::step_past_tpr`): there only a TPR write can release it, and the one that does not
//!   exit by itself, MOV to CR8, is a control-register write, a stop like every other.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, RflagsBits};

use crate::guest_debug::Breaks;

/// Instructions one scan decodes at most. Far more than the stretches the exact boundaries meet
/// (a `cli` … `sti; hlt` idle loop is ~15, a handler's tail ~30), and far less work than the one
/// exit a breakpoint saves (decoding is ~0.1 µs an instruction, an exit ~10 µs here).
const SCAN_BUDGET: usize = 256;

/// The longest x86 instruction (SDM vol. 2 §2.3.11).
const MAX_INSN: usize = 15;

const PAGE: usize = 4096;

/// Guest code for one scan, read a whole page at a time and kept: one translation per page
/// touched (a KVM_TRANSLATE where the page tables cannot be walked in guest RAM) rather than one
/// per instruction. (B-trees, not hash maps, here and in [`scan`]: std's hash maps seed their
/// keys with `getrandom`, a syscall the vCPU threads' seccomp filter does not allow.)
pub struct CodePages<F> {
    read_page: F,
    pages: BTreeMap<u64, Option<Box<[u8]>>>,
}

impl<F: FnMut(u64, &mut [u8]) -> bool> CodePages<F> {
    /// `read_page(base, buf)` fills `buf` with the page at linear address `base`, or returns
    /// false if it cannot (not mapped, not RAM).
    pub fn new(read_page: F) -> Self {
        Self {
            read_page,
            pages: BTreeMap::new(),
        }
    }

    /// Reads code at `at` into `out`; returns how many bytes it could (up to the first page
    /// that cannot be read).
    pub fn fetch(&mut self, at: u64, out: &mut [u8]) -> usize {
        let Self { read_page, pages } = self;
        let mut done = 0;
        while done < out.len() {
            let addr = at.wrapping_add(done as u64);
            let base = addr & !(PAGE as u64 - 1);
            let page = pages.entry(base).or_insert_with(|| {
                let mut bytes = vec![0; PAGE].into_boxed_slice();
                read_page(base, &mut bytes).then_some(bytes)
            });
            let Some(page) = page else {
                break;
            };
            let offset = (addr - base) as usize;
            let n = (PAGE - offset).min(out.len() - done);
            out[done..done + n].copy_from_slice(&page[offset..offset + n]);
            done += n;
        }
        done
    }
}

/// Where an IF-clear stretch starting at RIP can end ([`scan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stretch {
    /// Every path from RIP ends at a HLT or loops within the stretch: run it without breakpoints.
    Halts,
    /// Stop before whichever of these instructions the guest reaches first (none is at RIP).
    StopAt(Breaks),
    /// Step the instruction at RIP: it may set IF itself or cannot be scanned past, or the
    /// stretch ends in more places than there are breakpoints.
    Step,
}

/// What one instruction means for the scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// HLT, or STI then HLT: the path ends at the HLT's own exit.
    Halt,
    /// The path must stop before this instruction.
    Stop,
    /// The path goes on here.
    Go(u64),
    /// A conditional branch: the path goes on at both.
    Fork(u64, u64),
}

/// Scans the 64-bit code at `rip`, which runs with IF clear, for where the stretch can end.
/// `fetch(linear, buf)` reads guest code at a linear address into `buf` and returns how many
/// bytes it could read.
pub fn scan(rip: u64, mut fetch: impl FnMut(u64, &mut [u8]) -> usize) -> Stretch {
    let mut stops: Vec<u64> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut work = vec![rip];
    while let Some(at) = work.pop() {
        if !seen.insert(at) {
            continue;
        }
        let next = if seen.len() > SCAN_BUDGET {
            Next::Stop
        } else {
            let mut code = [0u8; MAX_INSN];
            let n = fetch(at, &mut code);
            classify(at, &code[..n])
        };
        match next {
            Next::Halt => {}
            Next::Stop if at == rip => return Stretch::Step,
            Next::Stop => {
                stops.push(at);
                if stops.len() > Breaks::MAX {
                    return Stretch::Step;
                }
            }
            Next::Go(to) => work.push(to),
            Next::Fork(fall, taken) => work.extend([fall, taken]),
        }
    }
    Breaks::new(&stops).map_or(Stretch::Halts, Stretch::StopAt)
}

/// Decodes the instruction at `at` (its bytes `code`) and says where its path goes.
fn classify(at: u64, code: &[u8]) -> Next {
    let mut decoder = Decoder::with_ip(64, code, at, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Next::Stop;
    }
    match insn.mnemonic() {
        Mnemonic::Hlt => return Next::Halt,
        // STI's shadow holds the interrupt until the HLT after it has run (SDM vol. 2, STI).
        Mnemonic::Sti if decoder.can_decode() && decoder.decode().mnemonic() == Mnemonic::Hlt => {
            return Next::Halt
        }
        _ => {}
    }
    let next = insn.next_ip();
    match insn.flow_control() {
        FlowControl::Next if may_end_stretch(&insn) || !canonical(next) => Next::Stop,
        FlowControl::Next => Next::Go(next),
        FlowControl::ConditionalBranch => match near_target(&insn, code) {
            Some(taken) if canonical(next) => Next::Fork(next, taken),
            _ => Next::Stop,
        },
        // A direct call is followed into the callee; its RET is a stop, as every return is.
        FlowControl::UnconditionalBranch | FlowControl::Call => {
            near_target(&insn, code).map_or(Next::Stop, Next::Go)
        }
        // Returns (RET, IRET, SYSRET, RSM), indirect branches and calls, SYSCALL, VMCALL,
        // software interrupts and exceptions (INT n, INT3, INT1, UD2), transactions.
        _ => Next::Stop,
    }
}

/// An instruction that runs on to the next one but may set IF (POPF; STI not before HLT) or
/// change what the breakpoints and the scan rely on.
fn may_end_stretch(insn: &Instruction) -> bool {
    let may_set = insn.rflags_set() | insn.rflags_written() | insn.rflags_undefined();
    if may_set & RflagsBits::IF != 0 {
        return true;
    }
    let writes_register = insn.op0_kind() == OpKind::Register && {
        let reg = insn.op0_register();
        reg.is_cr() || reg.is_dr() || reg == iced_x86::Register::SS
    };
    writes_register
        || matches!(
            insn.mnemonic(),
            Mnemonic::Mwait
                | Mnemonic::Mwaitx
                | Mnemonic::Lmsw
                | Mnemonic::Clts
                | Mnemonic::Lss
                | Mnemonic::Lgdt
                | Mnemonic::Lidt
                | Mnemonic::Lldt
                | Mnemonic::Ltr
                | Mnemonic::Vmfunc
                | Mnemonic::Vmlaunch
                | Mnemonic::Vmresume
                | Mnemonic::Vmrun
                | Mnemonic::Stgi
                | Mnemonic::Clgi
                | Mnemonic::Tdcall
                | Mnemonic::Seamcall
        )
}

/// The target of a direct near branch or call, unless an operand-size prefix makes it
/// vendor-dependent (Intel ignores the prefix in 64-bit code, AMD truncates the target to 16
/// bits: SDM vol. 2 JMP/Jcc, AMD APM vol. 3) or the target is not canonical (the branch faults).
fn near_target(insn: &Instruction, code: &[u8]) -> Option<u64> {
    if insn.op0_kind() != OpKind::NearBranch64 || operand_size_prefix(&code[..insn.len()]) {
        return None;
    }
    let to = insn.near_branch_target();
    canonical(to).then_some(to)
}

/// True if the instruction's prefixes include 66 (legacy prefixes, then REX: SDM vol. 2 §2.1.1).
fn operand_size_prefix(code: &[u8]) -> bool {
    code.iter()
        .take_while(|&&b| {
            matches!(
                b,
                0x66 | 0x67 | 0xF0 | 0xF2 | 0xF3 | 0x2E | 0x36 | 0x3E | 0x26 | 0x64 | 0x65
            ) || (0x40..=0x4F).contains(&b)
        })
        .any(|&b| b == 0x66)
}

/// A canonical 48-bit linear address (bits 63:47 all equal: SDM vol. 1 §3.3.7.1). A breakpoint
/// anywhere else could never be reached.
fn canonical(linear: u64) -> bool {
    let top = linear >> 47;
    top == 0 || top == (1 << 17) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest code at `base`: what `scan` may fetch.
    fn code_at(base: u64, bytes: &[u8]) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
        move |at, buf| {
            let Some(off) = at.checked_sub(base).map(|o| o as usize) else {
                return 0;
            };
            let avail = bytes.get(off..).unwrap_or(&[]);
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            n
        }
    }

    fn stops(at: &[u64]) -> Stretch {
        Stretch::StopAt(Breaks::new(at).unwrap())
    }

    /// The `ipi_storm` loop of the `bench_ipi` guest as gcc builds it: `cli`, the count check,
    /// the TSC check, `sti; hlt`, back to `cli`; the loop's exits both go to the `sti()` after it.
    const STORM_BASE: u64 = 0x10_3ec0;
    const STORM: &[u8] = &[
        0x0f, 0x31, // 103ec0 rdtsc
        0x48, 0xc1, 0xe2, 0x20, // shl $0x20,%rdx
        0x89, 0xc0, // mov %eax,%eax
        0x48, 0x09, 0xc2, // or %rax,%rdx
        0x48, 0x29, 0xda, // sub %rbx,%rdx
        0x48, 0x39, 0xca, // cmp %rcx,%rdx
        0x73, 0x10, // 103ed1 jae 103ee3
        0xfb, 0xf4, // 103ed3 sti; hlt
        0xfa, // 103ed5 cli
        0x8b, 0x05, 0x84, 0xdc, 0x04, 0x00, // mov storm_taken(%rip),%eax
        0x44, 0x29, 0xe0, // sub %r12d,%eax
        0x39, 0xe8, // cmp %ebp,%eax
        0x72, 0xdd, // 103ee1 jb 103ec0
        0xfb, // 103ee3 sti
        0x0f, 0x31, // rdtsc
    ];

    #[test]
    fn the_storm_loop_stops_only_where_it_leaves_for_sti() {
        assert_eq!(
            scan(0x10_3ed6, code_at(STORM_BASE, STORM)),
            stops(&[0x10_3ee3]),
            "the loop's own `sti; hlt` needs no breakpoint"
        );
        assert_eq!(
            scan(STORM_BASE, code_at(STORM_BASE, STORM)),
            stops(&[0x10_3ee3])
        );
    }

    #[test]
    fn an_instruction_that_may_set_if_at_rip_is_stepped() {
        for insn in [
            &[0xfb, 0x90][..],   // sti; nop
            &[0x9d],             // popfq
            &[0x48, 0xcf],       // iretq
            &[0x48, 0x0f, 0x07], // sysretq
            &[0xc3],             // ret
            &[0xff, 0xe0],       // jmp *%rax
            &[0xcc],             // int3
            &[0x0f, 0x0b],       // ud2
            &[0x0f, 0x23, 0xf8], // mov %rax,%dr7
            &[0x0f, 0x22, 0xd8], // mov %rax,%cr3
            &[0x8e, 0xd0],       // mov %eax,%ss
            &[0x0f, 0x01, 0xc1], // vmcall
            &[0x0f, 0x01, 0xc9], // mwait
            &[0x66, 0xeb, 0x00], // jmp with an operand-size prefix
            &[0x0f, 0xff, 0xff], // not an instruction (UD0 without its ModRM's bytes)
            &[],                 // nothing readable
        ] {
            assert_eq!(
                scan(0x1000, code_at(0x1000, insn)),
                Stretch::Step,
                "{insn:x?}"
            );
        }
    }

    /// A stretch the TPR holds (IF set) ends only where CR8 may be written: a loop, a read of
    /// CR8 and memory stores run on, and the MOV to CR8 after them is the one stop.
    #[test]
    fn a_write_of_cr8_stops_and_a_read_does_not() {
        let code = [
            0x44, 0x0f, 0x20, 0xc1, // 1000 mov %cr8,%rcx
            0x48, 0x89, 0x0f, // 1004 mov %rcx,(%rdi)
            0xff, 0xca, // 1007 dec %edx
            0x75, 0xf5, // 1009 jne 1000
            0x44, 0x0f, 0x22, 0xc0, // 100b mov %rax,%cr8
            0xfb, 0xf4, // 100f sti; hlt
        ];
        assert_eq!(scan(0x1000, code_at(0x1000, &code)), stops(&[0x100b]));
        assert_eq!(scan(0x100b, code_at(0x1000, &code)), Stretch::Step);
    }

    #[test]
    fn a_stop_further_on_gets_the_breakpoint() {
        // nop; popfq
        assert_eq!(
            scan(0x1000, code_at(0x1000, &[0x90, 0x9d])),
            stops(&[0x1001])
        );
        // cli; pushf; mov %rax,%cr3; sti; hlt
        let code = [0xfa, 0x9c, 0x0f, 0x22, 0xd8, 0xfb, 0xf4];
        assert_eq!(scan(0x1000, code_at(0x1000, &code)), stops(&[0x1002]));
    }

    #[test]
    fn halts_and_loops_need_no_breakpoint() {
        // nop; sti; hlt
        assert_eq!(
            scan(0x1000, code_at(0x1000, &[0x90, 0xfb, 0xf4])),
            Stretch::Halts
        );
        // hlt
        assert_eq!(scan(0x1000, code_at(0x1000, &[0xf4])), Stretch::Halts);
        // 1: pause; jmp 1b (a spin with IF clear: nothing in it can set IF)
        assert_eq!(
            scan(0x1000, code_at(0x1000, &[0xf3, 0x90, 0xeb, 0xfc])),
            Stretch::Halts
        );
        // cli; jmp . (smp_park_cli_hlt's tail)
        assert_eq!(
            scan(0x1000, code_at(0x1000, &[0xfa, 0xeb, 0xfe])),
            Stretch::Halts
        );
    }

    #[test]
    fn a_direct_call_is_followed_into_its_callee_whose_return_stops() {
        // 1000: call 1006; hlt; nop   1006: add $1,%eax; ret
        let code = [0xe8, 0x01, 0x00, 0x00, 0x00, 0xf4, 0x83, 0xc0, 0x01, 0xc3];
        assert_eq!(scan(0x1000, code_at(0x1000, &code)), stops(&[0x1009]));
    }

    #[test]
    fn both_ways_of_a_branch_are_scanned_up_to_three_stops() {
        // 1000: jz 1004; popfq; nop; 1004: jc 1008; popfq; nop; 1008: jo 100c; popfq; nop;
        // 100c: popfq
        let three = [
            0x74, 0x02, 0x9d, 0x90, 0x72, 0x02, 0x9d, 0x90, 0x70, 0x02, 0x9d, 0x90, 0x9d,
        ];
        assert_eq!(
            scan(0x1000, code_at(0x1000, &three[2..])),
            Stretch::Step,
            "POPF at RIP"
        );
        let four = scan(0x1000, code_at(0x1000, &three));
        assert_eq!(four, Stretch::Step, "four stops: more than DR0-DR2");
        // The same with the last branch's two ways meeting at one POPF: three stops.
        let mut met = three;
        met[10] = 0x90; // 100a: nop, so the fall-through reaches 100c's POPF too
        match scan(0x1000, code_at(0x1000, &met)) {
            Stretch::StopAt(b) => {
                let mut at = b.addresses().to_vec();
                at.sort_unstable();
                assert_eq!(at, [0x1002, 0x1006, 0x100c]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn past_the_budget_the_next_instruction_is_a_stop() {
        let mut code = vec![0x90; SCAN_BUDGET + 10];
        code.push(0xf4);
        assert_eq!(
            scan(0x1000, code_at(0x1000, &code)),
            stops(&[0x1000 + SCAN_BUDGET as u64])
        );
    }

    #[test]
    fn code_pages_read_each_page_once_and_cross_page_ends() {
        let mut reads = Vec::new();
        let mut pages = CodePages::new(|base, buf: &mut [u8]| {
            reads.push(base);
            buf.fill((base >> 12) as u8);
            base != 0x3000
        });
        let mut out = [0u8; 8];
        assert_eq!(pages.fetch(0x1ffc, &mut out), 8);
        assert_eq!(out, [1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(pages.fetch(0x1000, &mut out), 8);
        assert_eq!(
            pages.fetch(0x2ffd, &mut out),
            3,
            "stops at the unreadable page"
        );
        assert_eq!(pages.fetch(0x3000, &mut out), 0);
        drop(pages);
        assert_eq!(reads, [0x1000, 0x2000, 0x3000]);
    }

    /// Walks one path the guest could take from `rip` (fall-throughs and direct jumps and
    /// calls, as `classify` reads them) until it meets a stop, a HLT or an instruction seen
    /// before: no instruction that may set IF or that leaves the scanned code is run on the way.
    fn check_path(rip: u64, code: &mut dyn FnMut(u64, &mut [u8]) -> usize, stops: &[u64]) {
        let mut at = rip;
        let mut seen = BTreeSet::new();
        while seen.insert(at) && seen.len() <= SCAN_BUDGET {
            if stops.contains(&at) {
                return;
            }
            let mut buf = [0u8; MAX_INSN];
            let n = code(at, &mut buf);
            match classify(at, &buf[..n]) {
                Next::Halt => return,
                Next::Stop => panic!("{at:#x} would run unstopped (stops {stops:x?})"),
                Next::Go(to) | Next::Fork(to, _) => at = to,
            }
        }
    }

    proptest::proptest! {
        /// Whatever the guest's code: no panic; at most three breakpoints, none at RIP, all
        /// canonical; and the fall-through path from RIP meets one of them (or a HLT, or a
        /// loop) before anything that may set IF.
        #[test]
        fn any_code_gives_a_sound_plan(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            start in 0usize..400,
            high in proptest::prelude::any::<bool>(),
        ) {
            let base = if high { 0xFFFF_FFFF_8100_0000 } else { 0x10_0000 };
            let rip = base + (start.min(bytes.len())) as u64;
            let result = scan(rip, code_at(base, &bytes));
            match result {
                Stretch::StopAt(breaks) => {
                    let at = breaks.addresses();
                    proptest::prop_assert!(!at.is_empty() && at.len() <= Breaks::MAX);
                    proptest::prop_assert!(!at.contains(&rip));
                    proptest::prop_assert!(at.iter().all(|&a| canonical(a)));
                    check_path(rip, &mut code_at(base, &bytes), at);
                }
                Stretch::Halts => check_path(rip, &mut code_at(base, &bytes), &[]),
                Stretch::Step => {}
            }
        }
    }

    #[test]
    fn a_branch_out_of_the_canonical_range_stops() {
        // jmp to 0x8000_0000_0000 + ...: from just below the canonical boundary.
        let base = 0x7FFF_FFFF_FFF0;
        let code = [0x90, 0xe9, 0x00, 0x01, 0x00, 0x00];
        assert_eq!(scan(base, code_at(base, &code)), stops(&[base + 1]));
        assert!(canonical(0xFFFF_8000_0000_0000));
        assert!(!canonical(0x8000_0000_0000));
    }
}
