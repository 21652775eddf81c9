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
//! - Where the stretch ends in more places than there are breakpoints (branchy code, such as a
//!   kernel's scheduler or timer handler with interrupts off), the breakpoints go on the nearest
//!   points ahead instead: the scan goes breadth-first from RIP and stops where going on would
//!   need a fourth breakpoint; every path from RIP then meets one of the ends found so far or one
//!   of the instructions not yet scanned, and those get the breakpoints. The guest runs there
//!   (many instructions for one exit) and the scan begins again. Only when RIP itself is such an
//!   end is it stepped. Before this, such code was stepped an instruction at a time, and in a
//!   2-vCPU Linux boot nearly every episode spent its budget that way (docs/benchmarks.md §24).
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, RflagsBits};

use crate::guest_debug::Breaks;

mod flow;
mod known;
pub use known::AtRip;

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
    let mut next_of = |at: u64| {
        let mut code = [0u8; MAX_INSN];
        let n = fetch(at, &mut code);
        classify(at, &code[..n])
    };
    whole_stretch(rip, &mut next_of).unwrap_or_else(|| nearest_ends(rip, &mut next_of))
}

/// [`scan`] where the guest's registers and memory at RIP are known. An STI at RIP runs with its
/// shadow's instruction to the boundary after them. Otherwise, where the plain scan's ends fit the
/// breakpoints and one of them is a return, an indirect branch or a POPF, the whole stretch is
/// scanned way by way with what is known of the guest (`stretch::flow`); where that does not fit
/// either, or the plain scan's ends did not, the returns and indirect branches on the straight
/// path from RIP whose operands are known are followed to their targets (`stretch::known`), and
/// the plain scan goes on from where that path ends.
pub fn scan_at(
    rip: u64,
    mut fetch: impl FnMut(u64, &mut [u8]) -> usize,
    at_rip: &mut impl AtRip,
) -> Stretch {
    if let Some(boundary) = known::past_sti_shadow(rip, &mut fetch, at_rip) {
        return Stretch::StopAt(Breaks::one(boundary));
    }
    let mut next_of = |at: u64| {
        let mut code = [0u8; MAX_INSN];
        let n = fetch(at, &mut code);
        classify(at, &code[..n])
    };
    // Where the plain scan's ends fit and none is a branch or POPF the values could resolve, the
    // scans with the registers come to the same ends: the plain one is the cheapest.
    if let Some(plain) = whole_stretch(rip, &mut next_of) {
        if !flow::may_resolve(&plain, rip, &mut fetch) {
            return plain;
        }
        if let Some(stretch) = flow::whole_stretch(rip, &mut fetch, at_rip) {
            return stretch;
        }
    }
    known::straight_path(rip, &mut fetch, at_rip)
        .and_then(|path| scan_past(rip, &path, &mut fetch))
        .unwrap_or_else(|| scan(rip, fetch))
}

/// The stretch from where `path` ends. A breakpoint at RIP would stop the guest before it moves:
/// where the scan from there comes back to RIP (a loop through an indirect branch at RIP, such
/// as a call through a function pointer in a loop), the guest runs instead to the last branch
/// the path followed after RIP, and `None` (the plain scan from RIP) if there is none.
fn scan_past(
    rip: u64,
    path: &known::Path,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
) -> Option<Stretch> {
    let last_followed = || {
        let at = *path.followed.iter().rev().find(|&&at| at != rip)?;
        Some(Stretch::StopAt(Breaks::one(at)))
    };
    if path.from == rip {
        return last_followed();
    }
    match scan(path.from, fetch) {
        // The path's end is itself a stop: the guest runs there.
        Stretch::Step => Some(Stretch::StopAt(Breaks::one(path.from))),
        Stretch::StopAt(breaks) if breaks.addresses().contains(&rip) => last_followed(),
        stretch => Some(stretch),
    }
}

/// Every place the stretch from `rip` can end, if they fit the breakpoints; `None` if there are
/// more ([`nearest_ends`] then).
fn whole_stretch(rip: u64, next_of: &mut impl FnMut(u64) -> Next) -> Option<Stretch> {
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
            next_of(at)
        };
        match next {
            Next::Halt => {}
            Next::Stop if at == rip => return Some(Stretch::Step),
            Next::Stop => {
                stops.push(at);
                if stops.len() > Breaks::MAX {
                    return None;
                }
            }
            Next::Go(to) => work.push(to),
            Next::Fork(fall, taken) => work.extend([fall, taken]),
        }
    }
    Some(Breaks::new(&stops).map_or(Stretch::Halts, Stretch::StopAt))
}

/// The nearest points ahead of `rip` that every path from it meets, at most [`Breaks::MAX`] of
/// them: breadth-first, each instruction scanned is replaced by where it leads (nothing for a
/// HLT or a loop back into scanned code, itself for a stop) until going on would need more
/// breakpoints than there are, or [`SCAN_BUDGET`] instructions were scanned. `rip` is always
/// scanned first (its own stop is stepped), so the guest moves on before the next scan.
fn nearest_ends(rip: u64, next_of: &mut impl FnMut(u64) -> Next) -> Stretch {
    let mut seen = BTreeSet::from([rip]);
    let mut ahead = VecDeque::from([rip]);
    let mut stops: Vec<u64> = Vec::new();
    let mut scanned = 0;
    while let Some(&at) = ahead.front() {
        if scanned == SCAN_BUDGET {
            break;
        }
        let next = next_of(at);
        let (onward, count) = match next {
            Next::Go(to) => ([to, to], 1),
            Next::Fork(fall, taken) => ([fall, taken], 2),
            Next::Halt | Next::Stop => ([0, 0], 0),
        };
        // The successors not scanned or waiting yet, once each (no allocation: this runs at
        // every stepping exit).
        let (mut fresh, mut new) = ([0u64; 2], 0);
        for to in onward.into_iter().take(count) {
            if !seen.contains(&to) && !fresh[..new].contains(&to) {
                fresh[new] = to;
                new += 1;
            }
        }
        let new = &fresh[..new];
        let stop = next == Next::Stop;
        if stop && at == rip {
            return Stretch::Step;
        }
        // `at` leaves the ends ahead; its stop or its new successors join them.
        let ends = stops.len() + ahead.len() - 1 + usize::from(stop) + new.len();
        if ends > Breaks::MAX {
            break;
        }
        ahead.pop_front();
        scanned += 1;
        if stop {
            stops.push(at);
        }
        seen.extend(new.iter().copied());
        ahead.extend(new.iter().copied());
    }
    let ends: Vec<u64> = stops.into_iter().chain(ahead).collect();
    Breaks::new(&ends).map_or(Stretch::Halts, Stretch::StopAt)
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
    pub(super) fn code_at(base: u64, bytes: &[u8]) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
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
        // Four stops, more than DR0-DR2: the guest runs to the nearest three points ahead, the
        // last branch not yet scanned among them.
        let four = scan(0x1000, code_at(0x1000, &three));
        assert_eq!(sorted(four), [0x1002, 0x1006, 0x1008]);
        assert_eq!(
            sorted(scan(0x1008, code_at(0x1000, &three))),
            [0x100a, 0x100c],
            "from there, the last two"
        );
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

    fn sorted(stretch: Stretch) -> Vec<u64> {
        let Stretch::StopAt(breaks) = stretch else {
            panic!("{stretch:?}");
        };
        let mut at = breaks.addresses().to_vec();
        at.sort_unstable();
        at
    }

    /// Checks that every path from `rip` through the code `fetch` reads meets one of `ends`
    /// before it runs any instruction the scan stops at (one that may set IF or cannot be
    /// followed), or ends at a HLT or in a loop: no such instruction is reachable from `rip`
    /// without passing an end.
    pub(super) fn every_path_meets(
        rip: u64,
        fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
        ends: &[u64],
    ) {
        let mut seen = BTreeSet::from([rip]);
        let mut work = vec![rip];
        while let Some(at) = work.pop() {
            let mut insn = [0u8; MAX_INSN];
            let n = fetch(at, &mut insn);
            let onward = match classify(at, &insn[..n]) {
                Next::Halt => vec![],
                Next::Stop => panic!("a path from {rip:#x} reaches the stop at {at:#x} unchecked"),
                Next::Go(to) => vec![to],
                Next::Fork(fall, taken) => vec![fall, taken],
            };
            for to in onward {
                if !ends.contains(&to) && seen.insert(to) {
                    work.push(to);
                }
            }
        }
    }

    #[test]
    fn branchy_code_runs_to_the_nearest_points_every_path_meets() {
        // A tree of conditional branches three deep, eight leaves each a POPF then RET, and a
        // loop on one way: more ends than breakpoints, at every depth.
        //   1000: test; jz 1010          1010: jc 1020           1020: jo 1030
        //   (fall) jnz 1040              ...
        let mut code = vec![0x90u8; 0x100];
        let mut put = |at: usize, bytes: &[u8]| code[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &[0x85, 0xc0, 0x74, 0x0c]); // 1000: test %eax,%eax; jz 1010
        put(0x04, &[0x75, 0x3a]); // 1004: jnz 1040
        put(0x06, &[0xeb, 0xf8]); // 1006: jmp 1000 (a loop back)
        for (at, leaves) in [(0x10, [0x50, 0x60]), (0x40, [0x70, 0x80])] {
            // jc to the first leaf; jo to the second; then the fall-through's own POPF
            let jc = (leaves[0] - (at + 2)) as u8;
            let jo = (leaves[1] - (at + 4)) as u8;
            put(at, &[0x72, jc, 0x70, jo, 0x9d, 0xc3]);
        }
        for leaf in [0x50, 0x60, 0x70, 0x80] {
            put(
                leaf,
                &[0x48, 0x01, 0xc3, 0x75, 0x02, 0x9d, 0xc3, 0x9d, 0xc3],
            ); // add; jnz; popf; ret
        }
        let base = 0x1000;
        let mut rip = base;
        for _ in 0..12 {
            let stretch = scan(rip, code_at(base, &code));
            let ends = match stretch {
                Stretch::Step => break,
                Stretch::Halts => panic!("the POPFs end this stretch"),
                Stretch::StopAt(b) => b.addresses().to_vec(),
            };
            assert!(ends.len() <= Breaks::MAX && !ends.contains(&rip));
            every_path_meets(rip, &mut code_at(base, &code), &ends);
            // Go on from the farthest end, as a guest taking that way would.
            rip = *ends.iter().max().unwrap();
        }
        let mut insn = [0u8; MAX_INSN];
        let n = code_at(base, &code)(rip, &mut insn);
        assert_eq!(
            classify(rip, &insn[..n]),
            Next::Stop,
            "the walk ends stepping a stop at {rip:#x}"
        );
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

    proptest::proptest! {
        /// Whatever the guest's code: no panic; at most three breakpoints, none at RIP, all
        /// canonical; and every path from RIP meets one of them (or a HLT, or a loop) before
        /// anything that may set IF.
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
                    every_path_meets(rip, &mut code_at(base, &bytes), at);
                }
                Stretch::Halts => every_path_meets(rip, &mut code_at(base, &bytes), &[]),
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
