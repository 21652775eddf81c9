//! The whole stretch from RIP scanned with what is known of the guest along every way, not only up
//! to the first conditional branch.
//!
//! [`super::known::straight_path`] follows returns and indirect branches only on the one path up
//! to the first fork: past it, the scan is the plain one and stops at every return and indirect
//! branch. kvm-unit-tests' pending-NMI handler shows what that costs: its loop of ten ICR writes
//! exits at each WRMSR, and from there the plain scan stops at the `jmp *` through the APIC ops
//! on the way round, an exit more per write (docs/benchmarks.md §26). The values that jump reads
//! are the same each time round, and a scan that carries what it knows down both ways of each
//! branch can see that.
//!
//! [`whole_stretch`] is a forward data-flow pass: each instruction reached gets the [`Facts`]
//! that hold on every way found into it (the meet of what each way brings: a register known only
//! where all ways agree on its value); an instruction reached again with less known is scanned
//! again, so a loop is followed until what is known at its head no longer changes. What an
//! instruction computes from known values (moves, loads from memory no way has written over,
//! pushes and pops, LEA, constant adjustments) stays known ([`Facts::ran`]); returns and indirect
//! branches whose operands are known go where they say. A POPF that loads a known value is no
//! stop when it leaves IF clear; when it sets IF, the interrupt is deliverable right after it (no
//! shadow: SDM vol. 3 §6.8.3 names only STI and MOV SS), so the breakpoint goes on the next
//! instruction instead of a stop at the POPF and a step.
//!
//! It runs where the plain scan's ends fit the breakpoints and one of them is a branch or POPF
//! the facts may resolve ([`may_resolve`]: elsewhere it would come to the same ends, at several
//! times the plain scan's cost), and its answer is used only where it is whole: every end fits the
//! breakpoints, within the scan's budget, and none is at RIP. Otherwise the scan falls back to the
//! single path and the plain scan, as before. The bound on what it cannot see is the single
//! path's (`stretch::known`): a value another vCPU or a device changes under the scan makes the
//! guest go elsewhere, and the interrupt is then taken at the next exit, late, never lost.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Code, InstructionInfoFactory};

use super::known::{decode, AtRip, Facts};
use super::{canonical, classify, Next, Stretch, MAX_INSN, SCAN_BUDGET};
use crate::guest_debug::Breaks;

/// RFLAGS.TF and RFLAGS.IF (SDM vol. 1 §3.4.3).
const TF: u64 = 1 << 8;
const IF: u64 = 1 << 9;

/// What one instruction does to the scan, under the facts it was reached with.
enum Step {
    /// The way ends (a HLT).
    Ends,
    /// The guest has to stop at this address: before the instruction, or right after a POPF
    /// that sets IF.
    StopAt(u64),
    /// The way goes on at one or two instructions, with the facts after this one.
    Onward(u64, Option<u64>),
}

/// Every place the stretch from `rip` can end, scanned way by way with what is known of the
/// guest; `None` if they do not all fit the breakpoints, the scan runs out of budget, or RIP
/// itself would need a breakpoint (a loop back to it with less known).
pub fn whole_stretch(
    rip: u64,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
    at_rip: &mut impl AtRip,
) -> Option<Stretch> {
    let mut info = None;
    // The facts on entry to each instruction reached after RIP's own first run.
    let mut facts: BTreeMap<u64, Facts> = BTreeMap::new();
    // For each instruction that ends the stretch, where the guest stops for it (its latest
    // scan's, which had the least known).
    let mut stops: BTreeMap<u64, u64> = BTreeMap::new();
    let mut work = Vec::new();
    let mut next = Some((rip, Facts::at_rip(at_rip)));
    for _ in 0..SCAN_BUDGET {
        let Some((at, mut known)) = next.take().or_else(|| {
            let at = work.pop()?;
            Some((at, facts[&at]))
        }) else {
            return finish(rip, &stops);
        };
        match step(at, &mut known, fetch, at_rip, &mut info) {
            Step::Ends => {}
            Step::StopAt(stop) => {
                stops.insert(at, stop);
                if distinct(&stops) > Breaks::MAX {
                    return None;
                }
            }
            Step::Onward(to, also) => {
                for to in [Some(to), also].into_iter().flatten() {
                    arrive(to, &known, &mut facts, &mut work, at_rip);
                }
            }
        }
    }
    if next.is_none() && work.is_empty() {
        return finish(rip, &stops);
    }
    None
}

/// True if the plain scan's answer has an end the facts may resolve: a near return, `jmp *` or
/// `call *`, or a POPFQ (at RIP itself where the answer is to step it). Otherwise
/// [`whole_stretch`] would stop at the same places.
pub fn may_resolve(
    plain: &Stretch,
    rip: u64,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
) -> bool {
    let rip = [rip];
    let ends = match plain {
        Stretch::Halts => return false,
        Stretch::Step => &rip[..],
        Stretch::StopAt(breaks) => breaks.addresses(),
    };
    ends.iter().any(|&at| {
        let mut code = [0u8; MAX_INSN];
        let n = fetch(at, &mut code);
        matches!(
            decode(at, &code[..n]).code(),
            Code::Retnq | Code::Retnq_imm16 | Code::Jmp_rm64 | Code::Call_rm64 | Code::Popfq
        )
    })
}

fn distinct(stops: &BTreeMap<u64, u64>) -> usize {
    stops.values().collect::<BTreeSet<_>>().len()
}

fn finish(rip: u64, stops: &BTreeMap<u64, u64>) -> Option<Stretch> {
    let at: BTreeSet<u64> = stops.values().copied().collect();
    if at.contains(&rip) {
        return None;
    }
    let at: Vec<u64> = at.into_iter().collect();
    match Breaks::new(&at) {
        Some(breaks) => Some(Stretch::StopAt(breaks)),
        None if at.is_empty() => Some(Stretch::Halts),
        None => None,
    }
}

/// A way reaches `to` with `known`: scanned (again) if that tells less than what was known there.
fn arrive(
    to: u64,
    known: &Facts,
    facts: &mut BTreeMap<u64, Facts>,
    work: &mut Vec<u64>,
    at_rip: &mut impl AtRip,
) {
    match facts.get_mut(&to) {
        None => {
            facts.insert(to, *known);
            work.push(to);
        }
        Some(there) => {
            let met = there.meet(known, at_rip);
            if met != *there {
                *there = met;
                if !work.contains(&to) {
                    work.push(to);
                }
            }
        }
    }
}

/// The instruction at `at`, reached with `known`, which becomes what holds after it.
fn step(
    at: u64,
    known: &mut Facts,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
    at_rip: &mut impl AtRip,
    info: &mut Option<InstructionInfoFactory>,
) -> Step {
    let mut code = [0u8; MAX_INSN];
    let n = fetch(at, &mut code);
    let code = &code[..n];
    match classify(at, code) {
        Next::Halt => Step::Ends,
        Next::Go(to) => {
            known.ran(&decode(at, code), info, at_rip);
            Step::Onward(to, None)
        }
        // A conditional branch may write registers too (LOOP counts RCX down).
        Next::Fork(fall, taken) => {
            known.ran(&decode(at, code), info, at_rip);
            Step::Onward(fall, Some(taken))
        }
        Next::Stop => {
            let insn = decode(at, code);
            if let Some(to) = known.transfer(&insn, code, at_rip) {
                return Step::Onward(to, None);
            }
            let after = insn.next_ip();
            match known.popf(&insn, code, at_rip) {
                // A trap flag loaded would make the guest's own single step: left to a stop.
                Some(flags) if flags & TF != 0 => Step::StopAt(at),
                Some(_) if !canonical(after) => Step::StopAt(at),
                Some(flags) if flags & IF == 0 => Step::Onward(after, None),
                Some(_) => Step::StopAt(after),
                None => Step::StopAt(at),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scan against a small interpreter: programs made of instructions whose effects the
    //! interpreter knows, run from RIP with random registers, memory and branch outcomes. Each
    //! run must meet a breakpoint of the plan before the first boundary where an interrupt could
    //! be taken (IF set, no STI shadow) and before any instruction the interpreter cannot run.

    use std::collections::BTreeMap;

    use iced_x86::Register;

    use super::super::{scan_at, Stretch};
    use super::*;

    /// An instruction of the test programs. Registers are numbers 0-7 (RAX-RDI); 4 (RSP) only
    /// where the stack pointer itself is meant.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        Nop,
        MovImm(u8, u8),
        MovReg(u8, u8),
        Mov32(u8, u8),
        Zero(u8),
        AddImm(u8, i8),
        Push(u8),
        Pop(u8),
        PushImm(u8),
        Pushf,
        Popf,
        Load(u8, i8),
        Store(u8, i8),
        StoreVia(u8, u8),
        Lea(u8, u8, i8),
        Leave,
        Call(u8),
        Ret,
        JmpReg(u8),
        CallReg(u8),
        Jcc(u8),
        Jmp(u8),
        GsLoad(u8),
        GsJmp,
        Wrmsr,
        Swapgs,
        Rdtsc,
        Sti,
        Cli,
        Hlt,
        Iret,
    }

    const CODE: u64 = 0x1000;
    const STACK: u64 = 0x8000;
    const GS: u64 = 0x9000;
    const KERNEL_GS: u64 = 0xA000;
    const GS_BASE: u32 = 0xC000_0101;
    const KERNEL_GS_BASE: u32 = 0xC000_0102;

    /// A register other than RSP.
    fn r(n: u8) -> u8 {
        [0, 1, 2, 3, 5, 6, 7][usize::from(n) % 7]
    }

    /// The program's bytes and where each op begins.
    fn assemble(ops: &[Op]) -> (Vec<u8>, Vec<u64>) {
        let len = |op: &Op| match op {
            Op::Nop | Op::Push(_) | Op::Pop(_) | Op::Pushf | Op::Popf | Op::Leave => 1,
            Op::Ret | Op::Sti | Op::Cli | Op::Hlt => 1,
            Op::PushImm(_) | Op::JmpReg(_) | Op::CallReg(_) | Op::Mov32(..) | Op::Zero(_) => 2,
            Op::Wrmsr | Op::Rdtsc | Op::Iret => 2,
            Op::MovReg(..) | Op::StoreVia(..) | Op::Swapgs => 3,
            Op::AddImm(..) | Op::Lea(..) => 4,
            Op::Load(..) | Op::Store(..) | Op::Call(_) | Op::Jmp(_) => 5,
            Op::Jcc(_) => 6,
            Op::MovImm(..) => 7,
            Op::GsJmp => 8,
            Op::GsLoad(_) => 9,
        };
        let mut starts = vec![CODE];
        for op in ops {
            starts.push(starts.last().unwrap() + len(op) as u64);
        }
        let target = |to: u8| starts[usize::from(to) % ops.len()];
        let rel = |at: usize, to: u8| {
            let next = starts[at + 1] as i64;
            ((target(to) as i64 - next) as i32).to_le_bytes()
        };
        let mut code = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let modrm = |reg: u8, rm: u8| 0xc0 | (reg << 3) | rm;
            match *op {
                Op::Nop => code.push(0x90),
                Op::MovImm(d, imm) => {
                    code.extend([0x48, 0xc7, 0xc0 | r(d)]);
                    code.extend(u32::from(imm).to_le_bytes());
                }
                Op::MovReg(d, s) => code.extend([0x48, 0x89, modrm(r(s), r(d))]),
                Op::Mov32(d, s) => code.extend([0x89, modrm(r(s), r(d))]),
                Op::Zero(d) => code.extend([0x31, modrm(r(d), r(d))]),
                Op::AddImm(d, imm) => code.extend([0x48, 0x83, 0xc0 | (d % 8), imm as u8]),
                Op::Push(s) => code.push(0x50 + s % 8),
                Op::Pop(d) => code.push(0x58 + r(d)),
                Op::PushImm(imm) => code.extend([0x6a, imm]),
                Op::Pushf => code.push(0x9c),
                Op::Popf => code.push(0x9d),
                Op::Load(d, disp) => {
                    code.extend([0x48, 0x8b, 0x44 | (r(d) << 3), 0x24, disp as u8])
                }
                Op::Store(s, disp) => {
                    code.extend([0x48, 0x89, 0x44 | (r(s) << 3), 0x24, disp as u8])
                }
                Op::StoreVia(s, b) => code.extend([0x48, 0x89, (r(s) << 3) | (r(b) % 4)]),
                Op::Lea(d, b, disp) => {
                    code.extend([0x48, 0x8d, 0x40 | (r(d) << 3) | (r(b) % 4), disp as u8]);
                }
                Op::Leave => code.push(0xc9),
                Op::Call(to) => {
                    code.push(0xe8);
                    code.extend(rel(i, to));
                }
                Op::Ret => code.push(0xc3),
                Op::JmpReg(s) => code.extend([0xff, 0xe0 | r(s)]),
                Op::CallReg(s) => code.extend([0xff, 0xd0 | r(s)]),
                Op::Jcc(to) => {
                    code.extend([0x0f, 0x84]);
                    code.extend(rel(i, to));
                }
                Op::Jmp(to) => {
                    code.push(0xe9);
                    code.extend(rel(i, to));
                }
                Op::GsLoad(d) => {
                    code.extend([0x65, 0x48, 0x8b, 0x04 | (r(d) << 3), 0x25, 8, 0, 0, 0])
                }
                Op::GsJmp => code.extend([0x65, 0xff, 0x24, 0x25, 0x10, 0, 0, 0]),
                Op::Wrmsr => code.extend([0x0f, 0x30]),
                Op::Swapgs => code.extend([0x0f, 0x01, 0xf8]),
                Op::Rdtsc => code.extend([0x0f, 0x31]),
                Op::Sti => code.push(0xfb),
                Op::Cli => code.push(0xfa),
                Op::Hlt => code.push(0xf4),
                Op::Iret => code.extend([0x48, 0xcf]),
            }
        }
        (code, starts)
    }

    /// The guest at RIP: registers, GS bases (current, kernel), and 8-byte words.
    #[derive(Clone)]
    struct Guest {
        regs: [u64; 16],
        gs: [u64; 2],
        words: BTreeMap<u64, u64>,
    }

    impl AtRip for Guest {
        fn register(&self, reg: Register) -> Option<u64> {
            match reg {
                Register::ES | Register::CS | Register::SS | Register::DS | Register::FS => Some(0),
                Register::GS => Some(self.gs[0]),
                _ => (0..16)
                    .find(|&i| super::super::known::gpr(i) == Some(reg))
                    .map(|i| self.regs[i]),
            }
        }

        fn read_u64(&mut self, linear: u64) -> Option<u64> {
            self.words.get(&linear).copied()
        }
    }

    fn fetch(code: &[u8]) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
        super::super::tests::code_at(CODE, code)
    }

    /// The interpreter's memory, byte by byte (bytes never written read as 0).
    struct Memory(BTreeMap<u64, u8>);

    impl Memory {
        fn of(words: &BTreeMap<u64, u64>) -> Self {
            let mut memory = Self(BTreeMap::new());
            for (&at, &value) in words {
                memory.write(at, value);
            }
            memory
        }

        fn read(&self, at: u64) -> u64 {
            let mut bytes = [0u8; 8];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = self.0.get(&at.wrapping_add(i as u64)).copied().unwrap_or(0);
            }
            u64::from_le_bytes(bytes)
        }

        fn write(&mut self, at: u64, value: u64) {
            for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                self.0.insert(at.wrapping_add(i as u64), byte);
            }
        }
    }

    /// One run of the program from `rip` until it meets one of `breaks`, halts, or has run
    /// `limit` instructions; an error names what it reached instead.
    fn run(
        guest: &Guest,
        ops: &[Op],
        starts: &[u64],
        rip: u64,
        breaks: &[u64],
        choices: &mut impl Iterator<Item = bool>,
        noise: &mut impl Iterator<Item = u32>,
    ) -> Result<(), String> {
        let mut regs = guest.regs;
        let mut gs = guest.gs;
        let mut memory = Memory::of(&guest.words);
        let mut rip = rip;
        let mut interrupts = false;
        for ran in 0..400 {
            if ran > 0 && breaks.contains(&rip) {
                return Ok(());
            }
            let Some(index) = starts[..ops.len()].iter().position(|&s| s == rip) else {
                if (CODE..starts[ops.len()]).contains(&rip) {
                    // Inside an instruction: code the interpreter does not know, no verdict.
                    return Ok(());
                }
                return Err(format!("ran to {rip:#x}, outside the program, unstopped"));
            };
            let next = starts[index + 1];
            let target = |to: u8| starts[usize::from(to) % ops.len()];
            let reg = |n: u8| usize::from(r(n));
            let mut shadow = false;
            rip = next;
            match ops[index] {
                Op::Nop => {}
                Op::Cli => interrupts = false,
                Op::MovImm(d, imm) => regs[reg(d)] = u64::from(imm),
                Op::MovReg(d, s) => regs[reg(d)] = regs[reg(s)],
                Op::Mov32(d, s) => regs[reg(d)] = regs[reg(s)] & 0xFFFF_FFFF,
                Op::Zero(d) => regs[reg(d)] = 0,
                Op::AddImm(d, imm) => {
                    let d = usize::from(d % 8);
                    regs[d] = regs[d].wrapping_add(imm as i64 as u64);
                }
                Op::Push(s) => {
                    let value = regs[usize::from(s % 8)];
                    regs[4] = regs[4].wrapping_sub(8);
                    memory.write(regs[4], value);
                }
                Op::PushImm(imm) => {
                    regs[4] = regs[4].wrapping_sub(8);
                    memory.write(regs[4], imm as i8 as i64 as u64);
                }
                Op::Pushf => {
                    regs[4] = regs[4].wrapping_sub(8);
                    memory.write(regs[4], 2 | u64::from(interrupts) << 9);
                }
                Op::Pop(d) => {
                    let value = memory.read(regs[4]);
                    regs[4] = regs[4].wrapping_add(8);
                    regs[reg(d)] = value;
                }
                Op::Popf => {
                    let flags = memory.read(regs[4]);
                    if flags & TF != 0 {
                        return Err(format!("POPF of TF at {:#x} unstopped", starts[index]));
                    }
                    regs[4] = regs[4].wrapping_add(8);
                    interrupts = flags & IF != 0;
                }
                Op::Load(d, disp) => {
                    regs[reg(d)] = memory.read(regs[4].wrapping_add(disp as i64 as u64));
                }
                Op::Store(s, disp) => {
                    memory.write(regs[4].wrapping_add(disp as i64 as u64), regs[reg(s)]);
                }
                Op::StoreVia(s, b) => memory.write(regs[usize::from(r(b) % 4)], regs[reg(s)]),
                Op::Lea(d, b, disp) => {
                    regs[reg(d)] = regs[usize::from(r(b) % 4)].wrapping_add(disp as i64 as u64);
                }
                Op::Leave => {
                    regs[4] = regs[5];
                    regs[5] = memory.read(regs[4]);
                    regs[4] = regs[4].wrapping_add(8);
                }
                Op::Call(to) => {
                    regs[4] = regs[4].wrapping_sub(8);
                    memory.write(regs[4], next);
                    rip = target(to);
                }
                Op::Ret => {
                    rip = memory.read(regs[4]);
                    regs[4] = regs[4].wrapping_add(8);
                }
                Op::JmpReg(s) => rip = regs[reg(s)],
                Op::CallReg(s) => {
                    rip = regs[reg(s)];
                    regs[4] = regs[4].wrapping_sub(8);
                    memory.write(regs[4], next);
                }
                Op::Jcc(to) => {
                    if choices.next().unwrap_or(false) {
                        rip = target(to);
                    }
                }
                Op::Jmp(to) => rip = target(to),
                Op::GsLoad(d) => regs[reg(d)] = memory.read(gs[0].wrapping_add(8)),
                Op::GsJmp => rip = memory.read(gs[0].wrapping_add(0x10)),
                Op::Wrmsr => {
                    let value = (regs[2] & 0xFFFF_FFFF) << 32 | (regs[0] & 0xFFFF_FFFF);
                    match regs[1] as u32 {
                        GS_BASE => gs[0] = value,
                        KERNEL_GS_BASE => gs[1] = value,
                        _ => {}
                    }
                }
                Op::Swapgs => gs.swap(0, 1),
                Op::Rdtsc => {
                    regs[0] = u64::from(noise.next().unwrap_or(0));
                    regs[2] = u64::from(noise.next().unwrap_or(0));
                }
                Op::Sti => {
                    shadow = !interrupts;
                    interrupts = true;
                }
                Op::Hlt => return Ok(()),
                Op::Iret => return Err(format!("IRETQ at {:#x} unstopped", starts[index])),
            }
            // The boundary after this instruction.
            if interrupts && !shadow && !breaks.contains(&rip) {
                return Err(format!(
                    "an interrupt deliverable at {rip:#x}, no breakpoint there"
                ));
            }
        }
        Ok(())
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let reg = 0u8..8;
        prop_oneof![
            Just(Op::Nop),
            (reg.clone(), any::<u8>()).prop_map(|(d, i)| Op::MovImm(d, i)),
            (reg.clone(), reg.clone()).prop_map(|(d, s)| Op::MovReg(d, s)),
            (reg.clone(), reg.clone()).prop_map(|(d, s)| Op::Mov32(d, s)),
            reg.clone().prop_map(Op::Zero),
            (
                reg.clone(),
                proptest::sample::select(vec![-16i8, -8, 8, 16, 3])
            )
                .prop_map(|(d, i)| Op::AddImm(d, i)),
            reg.clone().prop_map(Op::Push),
            reg.clone().prop_map(Op::Pop),
            proptest::sample::select(vec![0u8, 2, 0x40]).prop_map(Op::PushImm),
            Just(Op::Pushf),
            Just(Op::Popf),
            Just(Op::Popf),
            (
                reg.clone(),
                proptest::sample::select(vec![-8i8, 0, 8, 16, 4])
            )
                .prop_map(|(d, i)| Op::Load(d, i)),
            (
                reg.clone(),
                proptest::sample::select(vec![-8i8, 0, 8, 16, 4])
            )
                .prop_map(|(s, i)| Op::Store(s, i)),
            (reg.clone(), reg.clone()).prop_map(|(s, b)| Op::StoreVia(s, b)),
            (
                reg.clone(),
                reg.clone(),
                proptest::sample::select(vec![-8i8, 0, 8, 0x10])
            )
                .prop_map(|(d, b, i)| Op::Lea(d, b, i)),
            Just(Op::Leave),
            any::<u8>().prop_map(Op::Call),
            Just(Op::Ret),
            Just(Op::Ret),
            reg.clone().prop_map(Op::JmpReg),
            reg.clone().prop_map(Op::CallReg),
            any::<u8>().prop_map(Op::Jcc),
            any::<u8>().prop_map(Op::Jcc),
            any::<u8>().prop_map(Op::Jmp),
            reg.clone().prop_map(Op::GsLoad),
            Just(Op::GsJmp),
            Just(Op::Wrmsr),
            Just(Op::Swapgs),
            Just(Op::Rdtsc),
            Just(Op::Sti),
            Just(Op::Cli),
            Just(Op::Hlt),
            Just(Op::Iret),
        ]
    }

    /// A value of a register or a word: a code address, a stack address, flags, an MSR number,
    /// a GS base, or anything small.
    fn value(kind: u8, x: u8, starts: &[u64]) -> u64 {
        let x = usize::from(x);
        match kind % 6 {
            0 => starts[x % starts.len()],
            1 => STACK - 64 + 8 * (x % 16) as u64,
            2 => [0, 2, 0x202, 0x102, 0x200][x % 5],
            3 => [u64::from(GS_BASE), u64::from(KERNEL_GS_BASE), 0x830][x % 3],
            4 => [GS, KERNEL_GS][x % 2],
            _ => x as u64,
        }
    }

    /// Programs the property runs: 10,000 in a release build, 3,000 in `./test.sh`'s debug build
    /// (~12 s).
    const PROGRAMS: u32 = if cfg!(debug_assertions) { 3000 } else { 10000 };

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(PROGRAMS))]
        /// Whatever the program, registers and memory, every run from RIP meets the plan's
        /// breakpoints before an interrupt could be taken or code it cannot know runs.
        #[test]
        fn every_run_meets_the_plan_before_an_interrupt_could_be_taken(
            ops in proptest::collection::vec(op(), 1..40),
            start in 0usize..40,
            regs in proptest::collection::vec((0u8..6, proptest::prelude::any::<u8>()), 8),
            words in proptest::collection::vec(
                (0usize..20, 0u8..6, proptest::prelude::any::<u8>()),
                0..24,
            ),
            gs in (0usize..2, 0usize..2),
            choices in proptest::collection::vec(proptest::prelude::any::<bool>(), 1..16),
            noise in proptest::collection::vec(0u32..0x2000, 1..8),
        ) {
            let (code, starts) = assemble(&ops);
            let bases = [GS, KERNEL_GS];
            let gs = [bases[gs.0], bases[gs.1]];
            let mut guest = Guest { regs: [0; 16], gs, words: BTreeMap::new() };
            for (i, &(kind, x)) in regs.iter().enumerate() {
                guest.regs[i] = value(kind, x, &starts);
            }
            guest.regs[4] = STACK;
            // Words on the stack and under both GS bases.
            let places: Vec<u64> = (0..16).map(|i| STACK - 64 + 8 * i)
                .chain([GS + 8, GS + 0x10, KERNEL_GS + 8, KERNEL_GS + 0x10]).collect();
            for &(at, kind, x) in &words {
                guest.words.insert(places[at], value(kind, x, &starts));
            }
            let rip = starts[start % ops.len()];
            let stretch = scan_at(rip, fetch(&code), &mut guest.clone());
            let breaks = match stretch {
                Stretch::Step => return Ok(()),
                Stretch::Halts => vec![],
                Stretch::StopAt(b) => b.addresses().to_vec(),
            };
            proptest::prop_assert!(!breaks.contains(&rip));
            for round in 0..4 {
                let mut choice = choices.iter().copied().cycle().skip(round * 3);
                let mut noise = noise.iter().copied().cycle();
                let verdict = run(&guest, &ops, &starts, rip, &breaks, &mut choice, &mut noise);
                proptest::prop_assert!(
                    verdict.is_ok(),
                    "{:?}: {:?} from {rip:#x} with {:?}",
                    verdict,
                    stretch,
                    ops
                );
            }
        }
    }

    #[test]
    fn a_popf_of_a_known_value_runs_on_or_stops_right_after_it() {
        // 1000: push %rcx; 1001: popf; 1002: nop; 1003: sti (a stop)
        let ops = [Op::Push(1), Op::Popf, Op::Nop, Op::Sti];
        let (code, _) = assemble(&ops);
        let mut guest = Guest {
            regs: [0; 16],
            gs: [GS, KERNEL_GS],
            words: BTreeMap::new(),
        };
        guest.regs[4] = STACK;
        let plan = |guest: &Guest| scan_at(CODE, fetch(&code), &mut guest.clone());
        guest.regs[1] = 0x202;
        assert_eq!(
            plan(&guest),
            Stretch::StopAt(Breaks::one(0x1002)),
            "IF set: right after"
        );
        guest.regs[1] = 0x2;
        assert_eq!(
            plan(&guest),
            Stretch::StopAt(Breaks::one(0x1003)),
            "IF clear: on to the STI"
        );
        guest.regs[1] = 0x302;
        assert_eq!(
            plan(&guest),
            Stretch::StopAt(Breaks::one(0x1001)),
            "TF: at the POPF"
        );
        // The flags saved by PUSHF are not known: at the POPF.
        let (code, _) = assemble(&[Op::Pushf, Op::Popf, Op::Nop]);
        let stretch = scan_at(CODE, fetch(&code), &mut guest.clone());
        assert_eq!(stretch, Stretch::StopAt(Breaks::one(0x1001)));
    }
}
