//! Past a return or an indirect branch the scan meets on its way from RIP: the guest's registers
//! and memory at RIP say where it goes, as long as nothing between RIP and it has changed the
//! operands it reads.
//!
//! [`super::scan`] has to stop at every return and indirect branch: from the code alone it cannot
//! know the target. But the stepper scans at a stop of the guest, where it has the registers, and
//! the code from RIP up to the first conditional branch is one path the guest will take. Along that
//! path a RET whose stack slot, or a `jmp *`/`call *` whose register or memory operand, no
//! instruction before it writes, goes exactly where those values say. [`straight_path`] follows
//! that path through such branches; the scan then starts where it ends. Before this, such a branch
//! at RIP was stepped (one exit) and one further on got a breakpoint (one exit, then the step):
//! kvm-unit-tests' `apic_icr_write` (`jmp *` through the APIC ops, then `wrmsr; ret`) paid two
//! exits for each of them (docs/benchmarks.md §25).
//!
//! What is known along the way is kept in [`Facts`]: what an instruction computes from known values
//! stays known (moves of registers, immediates and loads of memory nothing has written over, pushes
//! and pops, LEAVE, LEA, a constant added, a register zeroed, a call's return address, an 8-byte
//! store of a known value at a known address); anything else the instruction decoder says an
//! instruction writes is not known any more (registers explicit and implicit; a store at an
//! address not known makes all memory unknown), nor are the segment bases after SWAPGS,
//! WRFSBASE/WRGSBASE, a segment load, or a WRMSR whose ECX is not known or names a base MSR. Only near 64-bit transfers
//! are followed (RET, RET imm16, `jmp`/`call` through a 64-bit register or memory operand): an
//! operand-size prefix makes them vendor-dependent, as for direct branches. [`super::flow`] uses
//! the same facts on every way of the stretch, past its conditional branches.
//! A value another vCPU writes between the read and the guest's own (a code pointer or a return
//! address under it) makes the guest go elsewhere than scanned: then an instruction that sets IF
//! may run with no stop before it and the interrupt is taken at the next exit, late but not lost,
//! as for an exception handler the scan cannot see.

use iced_x86::{
    Code, Decoder, DecoderOptions, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind,
    Register,
};

use super::{canonical, classify, operand_size_prefix, Next, MAX_INSN};

/// Instructions [`straight_path`] walks at most.
const PATH_BUDGET: usize = 64;

/// What the scan may know of the guest at RIP.
pub trait AtRip {
    /// A 64-bit general-purpose register (RAX-R15), or a segment register's base.
    fn register(&self, reg: Register) -> Option<u64>;
    /// The 8 bytes at a linear address, as the guest reads them.
    fn read_u64(&mut self, linear: u64) -> Option<u64>;
}

/// The one path from RIP through the branches [`straight_path`] resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct Path {
    /// The instructions the guest runs from RIP, in order, before `from`.
    pub passed: Vec<u64>,
    /// The returns and indirect branches among them that were followed, in order.
    pub followed: Vec<u64>,
    /// Where the path leaves what is known: a conditional branch, a HLT, a stop that cannot be
    /// resolved, or an instruction already passed (a loop).
    pub from: u64,
}

/// Follows the path from `rip` through straight-line code and the returns and indirect branches
/// on it whose operands are still as they were at RIP. `None` if it followed none (the plain
/// scan from RIP is then the same).
pub fn straight_path(
    rip: u64,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
    at_rip: &mut impl AtRip,
) -> Option<Path> {
    let mut walk = Walk::new(at_rip);
    let mut passed = Vec::new();
    let mut followed = Vec::new();
    let mut at = rip;
    while passed.len() < PATH_BUDGET && !passed.contains(&at) {
        let mut code = [0u8; MAX_INSN];
        let n = fetch(at, &mut code);
        let onward = match classify(at, &code[..n]) {
            Next::Go(to) => {
                walk.ran(&decode(at, &code[..n]));
                Some(to)
            }
            Next::Stop => {
                let target = walk.transfer(&decode(at, &code[..n]), &code[..n]);
                if target.is_some() {
                    followed.push(at);
                }
                target
            }
            Next::Fork(..) | Next::Halt => None,
        };
        let Some(to) = onward else {
            break;
        };
        passed.push(at);
        at = to;
    }
    (!followed.is_empty()).then_some(Path {
        passed,
        followed,
        from: at,
    })
}

/// An STI at RIP: where the instruction in its shadow leads, if that is a straight-line
/// instruction or a branch whose operands are known. A maskable interrupt is deliverable right
/// there, after the instruction that follows STI (SDM vol. 2, STI), so the guest can run to it for
/// one exit instead of stepping the STI and then its shadow's instruction: Linux's
/// `local_irq_enable()`, an STI and a 5-byte NOP once its paravirt call is patched, was stepped
/// twice (docs/benchmarks.md §25). `None` for anything else, and where that point is the STI or
/// its shadow's instruction again (a breakpoint there would stop the guest before it moves).
pub fn past_sti_shadow(
    rip: u64,
    fetch: &mut impl FnMut(u64, &mut [u8]) -> usize,
    at_rip: &mut impl AtRip,
) -> Option<u64> {
    let mut code = [0u8; MAX_INSN];
    let n = fetch(rip, &mut code);
    let sti = decode(rip, &code[..n]);
    if sti.mnemonic() != Mnemonic::Sti {
        return None;
    }
    let shadow = sti.next_ip();
    let n = fetch(shadow, &mut code);
    let to = match classify(shadow, &code[..n]) {
        Next::Go(to) => to,
        Next::Stop => Walk::new(at_rip).transfer(&decode(shadow, &code[..n]), &code[..n])?,
        Next::Fork(..) | Next::Halt => return None,
    };
    (to != rip && to != shadow).then_some(to)
}

pub(super) fn decode(at: u64, code: &[u8]) -> Instruction {
    Decoder::with_ip(64, code, at, DecoderOptions::NONE).decode()
}

/// The registers and memory along one path, with the guest at RIP to read what the path has not
/// changed.
struct Walk<'a, K> {
    at_rip: &'a mut K,
    facts: Facts,
    /// Made at the first instruction run (it allocates; most scans run none before a stop).
    info: Option<InstructionInfoFactory>,
}

impl<'a, K: AtRip> Walk<'a, K> {
    fn new(at_rip: &'a mut K) -> Self {
        let facts = Facts::at_rip(at_rip);
        Self {
            at_rip,
            facts,
            info: None,
        }
    }

    fn ran(&mut self, insn: &Instruction) {
        self.facts.ran(insn, &mut self.info, self.at_rip);
    }

    fn transfer(&mut self, insn: &Instruction, code: &[u8]) -> Option<u64> {
        self.facts.transfer(insn, code, self.at_rip)
    }
}

/// The 8-byte windows of memory a path wrote at known addresses that [`Facts`] keeps: a few
/// calls' return addresses and pushes (one more write makes memory unknown).
const SLOTS: usize = 8;

/// What is known of the guest at one point of a way from RIP: the values of its general-purpose
/// registers, whether the FS and GS bases are still those of RIP, and its memory, which is RIP's
/// memory under the writes the way made at known addresses.
#[derive(Clone, Copy, Debug)]
pub(super) struct Facts {
    /// RAX-R15 by encoding number (RSP is 4).
    gprs: [Option<u64>; 16],
    bases_known: bool,
    /// The windows written (their address, and the value where an 8-byte store of a known value
    /// wrote it), pairwise disjoint; `len` in use.
    slots: [(u64, Option<u64>); SLOTS],
    len: usize,
    /// A write at an address or of a size not known, or more windows than kept: no memory is
    /// known any more.
    memory_unknown: bool,
}

impl PartialEq for Facts {
    fn eq(&self, other: &Self) -> bool {
        self.gprs == other.gprs
            && self.bases_known == other.bases_known
            && self.memory_unknown == other.memory_unknown
            && self.len == other.len
            && self.slots[..self.len]
                .iter()
                .all(|slot| other.slots[..other.len].contains(slot))
    }
}

/// True if the 8-byte windows at `a` and `b` share a byte.
fn overlap(a: u64, b: u64) -> bool {
    a.wrapping_sub(b).wrapping_add(7) < 15
}

impl Facts {
    /// The guest at RIP: every register, RIP's memory.
    pub(super) fn at_rip(at_rip: &impl AtRip) -> Self {
        let mut gprs = [None; 16];
        for (i, slot) in gprs.iter_mut().enumerate() {
            *slot = gpr(i).and_then(|reg| at_rip.register(reg));
        }
        Self {
            gprs,
            bases_known: true,
            slots: [(0, None); SLOTS],
            len: 0,
            memory_unknown: false,
        }
    }

    /// A general-purpose register's value, read at 64 or 32 bits.
    fn value(&self, reg: Register) -> Option<u64> {
        let full = self.gprs[gpr_number(reg)?]?;
        match reg.size() {
            8 => Some(full),
            4 => Some(full & 0xFFFF_FFFF),
            _ => None,
        }
    }

    /// A write of a general-purpose register: at 32 bits it zero-extends (SDM vol. 1
    /// §3.4.1.1); at 16 or 8 bits the rest of the register stays, which is not tracked.
    fn set(&mut self, reg: Register, value: Option<u64>) {
        let Some(i) = gpr_number(reg) else {
            return;
        };
        self.gprs[i] = match reg.size() {
            8 => value,
            4 => value.map(|v| v & 0xFFFF_FFFF),
            _ => None,
        };
    }

    /// What an address computation asks for: a register, or a segment's base while it is RIP's.
    fn operand(&self, reg: Register, at_rip: &impl AtRip) -> Option<u64> {
        if reg.is_segment_register() {
            return self.bases_known.then(|| at_rip.register(reg)).flatten();
        }
        self.value(reg)
    }

    /// The linear address of the instruction's memory operand `op`.
    fn address(&self, insn: &Instruction, op: u32, at_rip: &impl AtRip) -> Option<u64> {
        insn.virtual_address(op, 0, |reg, _, _| self.operand(reg, at_rip))
    }

    /// The 8 bytes at `linear` as the way left them: a window it wrote, else RIP's memory.
    fn read(&self, linear: u64, at_rip: &mut impl AtRip) -> Option<u64> {
        if self.memory_unknown {
            return None;
        }
        match self.slots[..self.len].iter().find(|s| overlap(s.0, linear)) {
            Some(&(at, value)) => value.filter(|_| at == linear),
            None => at_rip.read_u64(linear),
        }
    }

    /// A store of `size` bytes at `linear` (`value` if an 8-byte store of a known value).
    fn write(&mut self, linear: Option<u64>, size: usize, value: Option<u64>) {
        if self.memory_unknown {
            return;
        }
        let value = value.filter(|_| size == 8);
        let Some(linear) = linear.filter(|_| (1..=8).contains(&size)) else {
            return self.forget_memory();
        };
        match self.slots[..self.len]
            .iter()
            .position(|s| overlap(s.0, linear))
        {
            // The same window again (the windows are disjoint: no other one overlaps it).
            Some(i) if self.slots[i].0 == linear => self.slots[i].1 = value,
            // Part of a window: the rest of it would read as RIP's memory.
            Some(_) => self.forget_memory(),
            None if self.len == SLOTS => self.forget_memory(),
            None => {
                self.slots[self.len] = (linear, value);
                self.len += 1;
            }
        }
    }

    fn forget_memory(&mut self) {
        self.memory_unknown = true;
        self.slots = [(0, None); SLOTS];
        self.len = 0;
    }

    fn push(&mut self, value: Option<u64>) {
        let rsp = self.gprs[RSP].map(|rsp| rsp.wrapping_sub(8));
        self.write(rsp, 8, value);
        self.gprs[RSP] = rsp;
    }

    fn pop(&mut self, at_rip: &mut impl AtRip) -> Option<u64> {
        let rsp = self.gprs[RSP];
        self.gprs[RSP] = rsp.map(|rsp| rsp.wrapping_add(8));
        self.read(rsp?, at_rip)
    }

    /// What is known on both ways into one instruction.
    pub(super) fn meet(&self, other: &Self, at_rip: &mut impl AtRip) -> Self {
        let mut out = *self;
        for (mine, theirs) in out.gprs.iter_mut().zip(other.gprs) {
            if *mine != theirs {
                *mine = None;
            }
        }
        out.bases_known &= other.bases_known;
        if self.memory_unknown || other.memory_unknown {
            out.forget_memory();
            return out;
        }
        // Each window either way wrote, as both ways see it (the other's may be RIP's memory).
        out.slots = [(0, None); SLOTS];
        out.len = 0;
        let written = self.slots[..self.len]
            .iter()
            .chain(&other.slots[..other.len]);
        for &(at, _) in written {
            if out.slots[..out.len].iter().any(|s| s.0 == at) {
                continue;
            }
            let (Some(mine), Some(theirs)) = (self.window(at, at_rip), other.window(at, at_rip))
            else {
                out.forget_memory();
                return out;
            };
            out.write(Some(at), 8, mine.filter(|_| mine == theirs));
        }
        out
    }

    /// The window at `at` as this way knows it (`Some(None)`: known to be written, value not
    /// known); `None` if the way wrote part of it.
    fn window(&self, at: u64, at_rip: &mut impl AtRip) -> Option<Option<u64>> {
        match self.slots[..self.len].iter().find(|s| overlap(s.0, at)) {
            Some(&(slot, value)) => (slot == at).then_some(value),
            None => Some(at_rip.read_u64(at)),
        }
    }

    /// An instruction on the way ran: what it computed from known values, and nothing known of
    /// what else it wrote.
    pub(super) fn ran(
        &mut self,
        insn: &Instruction,
        info: &mut Option<InstructionInfoFactory>,
        at_rip: &mut impl AtRip,
    ) {
        if self.computed(insn, at_rip) {
            return;
        }
        let base_msr = |msr: u64| (0xC000_0100..=0xC000_0102).contains(&msr);
        match insn.mnemonic() {
            // WRMSR moves a base only through these (SDM vol. 4 table 2-2: FS_BASE, GS_BASE,
            // KERNEL_GS_BASE, which SWAPGS then loads).
            Mnemonic::Wrmsr if self.value(Register::ECX).is_some_and(|m| !base_msr(m)) => {}
            Mnemonic::Swapgs
            | Mnemonic::Wrfsbase
            | Mnemonic::Wrgsbase
            | Mnemonic::Wrmsr
            | Mnemonic::Wrmsrns
            | Mnemonic::Wrmsrlist => self.bases_known = false,
            _ => {}
        }
        let info = info
            .get_or_insert_with(InstructionInfoFactory::new)
            .info(insn);
        // Stores first, at addresses from the registers before the instruction.
        let repeated = insn.has_rep_prefix() || insn.has_repne_prefix();
        let mut stores = [(None, 0); 4];
        let mut n = 0;
        for used in info.used_memory().iter().filter(|m| writes(m.access())) {
            let linear = (!repeated && !used.index().is_vector_register())
                .then(|| used.virtual_address(0, |reg, _, _| self.operand(reg, at_rip)))
                .flatten();
            match stores.get_mut(n) {
                Some(store) => *store = (linear, used.memory_size().size()),
                None => self.memory_unknown = true,
            }
            n += 1;
        }
        for &(linear, size) in &stores[..n.min(stores.len())] {
            self.write(linear, size, None);
        }
        if self.memory_unknown {
            self.forget_memory();
        }
        for used in info.used_registers() {
            if !writes(used.access()) {
                continue;
            }
            let reg = used.register();
            if reg.is_segment_register() {
                self.bases_known = false;
            } else if let Some(i) = gpr_number(reg) {
                self.gprs[i] = None;
            }
        }
    }

    /// The instructions whose results are worked out from known values: moves, the stack's
    /// pushes and pops, zeroing, LEA, constant adjustments of a register. False for the rest.
    fn computed(&mut self, insn: &Instruction, at_rip: &mut impl AtRip) -> bool {
        let reg0 = insn.op0_register();
        let regs = insn.op0_kind() == OpKind::Register && insn.op1_kind() == OpKind::Register;
        let onto_reg = insn.op0_kind() == OpKind::Register;
        match insn.code() {
            Code::Call_rel32_64 => self.push(Some(insn.next_ip())),
            Code::Push_r64 => self.push(self.value(reg0)),
            Code::Pushq_imm8 | Code::Pushq_imm32 => self.push(Some(insn.immediate(0))),
            Code::Pushfq => self.push(None),
            Code::Pop_r64 => {
                let value = self.pop(at_rip);
                self.set(reg0, value);
            }
            Code::Leaveq => {
                self.gprs[RSP] = self.gprs[RBP];
                self.gprs[RBP] = self.pop(at_rip);
            }
            Code::Mov_r64_imm64 | Code::Mov_r32_imm32 => self.set(reg0, Some(insn.immediate(1))),
            Code::Mov_rm64_imm32 | Code::Mov_rm32_imm32 if onto_reg => {
                self.set(reg0, Some(insn.immediate(1)));
            }
            Code::Mov_r64_rm64 | Code::Mov_rm64_r64 | Code::Mov_r32_rm32 | Code::Mov_rm32_r32 => {
                self.mov(insn, at_rip);
            }
            Code::Xor_r32_rm32
            | Code::Xor_rm32_r32
            | Code::Xor_r64_rm64
            | Code::Xor_rm64_r64
            | Code::Sub_r32_rm32
            | Code::Sub_rm32_r32
            | Code::Sub_r64_rm64
            | Code::Sub_rm64_r64
                if regs && reg0 == insn.op1_register() =>
            {
                self.set(reg0, Some(0));
            }
            Code::Add_rm64_imm8 | Code::Add_rm64_imm32 if onto_reg => {
                let sum = self.value(reg0).map(|v| v.wrapping_add(insn.immediate(1)));
                self.set(reg0, sum);
            }
            Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 if onto_reg => {
                let difference = self.value(reg0).map(|v| v.wrapping_sub(insn.immediate(1)));
                self.set(reg0, difference);
            }
            // LEA computes the offset only: no segment base (SDM vol. 2, LEA).
            Code::Lea_r64_m | Code::Lea_r32_m => {
                let offset = insn.virtual_address(1, 0, |reg, _, _| {
                    if reg.is_segment_register() {
                        Some(0)
                    } else {
                        self.value(reg)
                    }
                });
                self.set(reg0, offset);
            }
            _ => return false,
        }
        true
    }

    /// MOV between registers, or between a register and memory, at 64 or 32 bits.
    fn mov(&mut self, insn: &Instruction, at_rip: &mut impl AtRip) {
        let size = if matches!(insn.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64) {
            8
        } else {
            4
        };
        match (insn.op0_kind(), insn.op1_kind()) {
            (OpKind::Register, OpKind::Register) => {
                self.set(insn.op0_register(), self.value(insn.op1_register()));
            }
            (OpKind::Register, _) => {
                let value = self
                    .address(insn, 1, at_rip)
                    .and_then(|at| self.read(at, at_rip));
                self.set(insn.op0_register(), value);
            }
            _ => {
                let at = self.address(insn, 0, at_rip);
                self.write(at, size, self.value(insn.op1_register()));
            }
        }
    }

    /// Where a stop goes if it is a near 64-bit return or indirect branch (its bytes `code`)
    /// whose operands are known, and the state after it; unchanged if not.
    pub(super) fn transfer(
        &mut self,
        insn: &Instruction,
        code: &[u8],
        at_rip: &mut impl AtRip,
    ) -> Option<u64> {
        if operand_size_prefix(&code[..insn.len()]) {
            return None;
        }
        let (target, rsp) = match insn.code() {
            Code::Retnq | Code::Retnq_imm16 => {
                let rsp = self.gprs[RSP]?;
                let pop = 8 + if insn.op_count() == 1 {
                    u64::from(insn.immediate16())
                } else {
                    0
                };
                (self.read(rsp, at_rip)?, rsp.wrapping_add(pop))
            }
            Code::Jmp_rm64 | Code::Call_rm64 => {
                let target = match insn.op0_kind() {
                    OpKind::Register => self.value(insn.op0_register())?,
                    OpKind::Memory => {
                        let at = self.address(insn, 0, at_rip)?;
                        self.read(at, at_rip)?
                    }
                    _ => return None,
                };
                (target, self.gprs[RSP]?)
            }
            _ => return None,
        };
        if !canonical(target) {
            return None;
        }
        self.gprs[RSP] = Some(rsp);
        if insn.code() == Code::Call_rm64 {
            self.push(Some(insn.next_ip()));
        }
        Some(target)
    }

    /// A POPFQ whose value is known: the flags it loads, RSP moved past them.
    pub(super) fn popf(
        &mut self,
        insn: &Instruction,
        code: &[u8],
        at_rip: &mut impl AtRip,
    ) -> Option<u64> {
        if insn.code() != Code::Popfq || operand_size_prefix(&code[..insn.len()]) {
            return None;
        }
        let rsp = self.gprs[RSP]?;
        let flags = self.read(rsp, at_rip)?;
        self.gprs[RSP] = Some(rsp.wrapping_add(8));
        Some(flags)
    }
}

const RSP: usize = 4;
const RBP: usize = 5;

/// RAX-R15 by their encoding number (RSP is 4).
pub(super) fn gpr(i: usize) -> Option<Register> {
    const GPRS: [Register; 16] = [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    GPRS.get(i).copied()
}

/// The encoding number of the 64-bit register a general-purpose register is part of.
fn gpr_number(reg: Register) -> Option<usize> {
    let full = reg.full_register();
    (0..16).find(|&i| gpr(i) == Some(full))
}

fn writes(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::{scan, scan_at, Stretch};
    use super::*;
    use crate::guest_debug::Breaks;

    /// Guest code and data: code bytes at `base`, 8-byte words at addresses, registers.
    struct Guest {
        base: u64,
        code: Vec<u8>,
        words: BTreeMap<u64, u64>,
        regs: BTreeMap<Register, u64>,
    }

    impl Guest {
        fn new(base: u64, code: &[u8]) -> Self {
            Self {
                base,
                code: code.to_vec(),
                words: BTreeMap::new(),
                regs: BTreeMap::from([(Register::RSP, 0x8000), (Register::GS, 0x9000)]),
            }
        }

        fn reg(mut self, reg: Register, value: u64) -> Self {
            self.regs.insert(reg, value);
            self
        }

        fn word(mut self, at: u64, value: u64) -> Self {
            self.words.insert(at, value);
            self
        }

        fn fetch(&self) -> impl FnMut(u64, &mut [u8]) -> usize + '_ {
            move |at, buf| {
                let Some(off) = at.checked_sub(self.base).map(|o| o as usize) else {
                    return 0;
                };
                let avail = self.code.get(off..).unwrap_or(&[]);
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
                n
            }
        }

        fn scan(&self, rip: u64) -> Stretch {
            let mut at_rip = Known(self);
            scan_at(rip, self.fetch(), &mut at_rip)
        }
    }

    struct Known<'a>(&'a Guest);

    impl AtRip for Known<'_> {
        fn register(&self, reg: Register) -> Option<u64> {
            match reg {
                Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
                _ => self.0.regs.get(&reg).copied(),
            }
        }

        fn read_u64(&mut self, linear: u64) -> Option<u64> {
            self.0.words.get(&linear).copied()
        }
    }

    fn stops(at: &[u64]) -> Stretch {
        Stretch::StopAt(Breaks::new(at).unwrap())
    }

    /// kvm-unit-tests' pending-NMI handler sends ten self-NMIs through `apic_icr_write`, a jump
    /// through the APIC ops to `x2apic_icr_write` (`wrmsr; ret`), in a loop:
    const ICR_BASE: u64 = 0x401af0;
    fn icr_loop() -> Vec<u8> {
        let mut code = vec![0x90u8; 0x1520];
        let mut put = |at: u64, bytes: &[u8]| {
            let at = (at - ICR_BASE) as usize;
            code[at..at + bytes.len()].copy_from_slice(bytes);
        };
        // 401af0 x2apic_icr_write: mov %edi,%eax; mov %esi,%edx; mfence; mov $0x830,%ecx;
        // 401afc wrmsr; 401afe ret
        put(
            0x401af0,
            &[
                0x89, 0xf8, 0x89, 0xf2, 0x0f, 0xae, 0xf0, 0xb9, 0x30, 0x08, 0x00, 0x00, 0x0f, 0x30,
                0xc3,
            ],
        );
        // 401b90 apic_icr_write: mov %gs:0x8,%rax; 401b99 jmp *0x10(%rax)
        put(
            0x401b90,
            &[
                0x65, 0x48, 0x8b, 0x04, 0x25, 0x08, 0x00, 0x00, 0x00, 0xff, 0x60, 0x10,
            ],
        );
        // 402ff0: xor %esi,%esi; mov $0x400,%edi; call 401b90; 402ffc sub $1,%ebx;
        // jne 402ff0; mov -8(%rbp),%rbx; leave; 403006 ret
        put(
            0x402ff0,
            &[
                0x31, 0xf6, 0xbf, 0x00, 0x04, 0x00, 0x00, 0xe8, 0x94, 0xeb, 0xff, 0xff, 0x83, 0xeb,
                0x01, 0x75, 0xef, 0x48, 0x8b, 0x5d, 0xf8, 0xc9, 0xc3,
            ],
        );
        code
    }

    #[test]
    fn the_pending_nmi_handlers_icr_loop() {
        let guest = Guest::new(ICR_BASE, &icr_loop())
            .reg(Register::RAX, 0x40a700)
            .reg(Register::RCX, 0x830)
            .word(0x40a710, 0x401af0)
            .word(0x8000, 0x402ffc);
        // Plain: the jump at RIP is stepped; from the WRMSR the RET is a stop.
        assert_eq!(scan(0x401b99, guest.fetch()), Stretch::Step);
        assert_eq!(scan(0x401afc, guest.fetch()), stops(&[0x401afe]));
        // Known on the one path (no per-CPU pointer to load): from the WRMSR the RET goes back
        // into the loop, which the scan follows to the jump and the handler's own RET.
        assert_eq!(guest.scan(0x401afc), stops(&[0x401b99, 0x403006]));
        // From the jump: through the ops to the WRMSR and its RET, back into the loop, whose
        // way round comes back to the jump at RIP: the guest runs to the RET.
        assert_eq!(guest.scan(0x401b99), stops(&[0x401afe]));
        let path = straight_path(0x401b99, &mut guest.fetch(), &mut Known(&guest)).unwrap();
        assert_eq!(path.followed, [0x401b99, 0x401afe]);
        assert_eq!(path.from, 0x402fff, "the loop's JNE");
        // With the per-CPU pointer the loop's `mov %gs:0x8,%rax` loads (GS base 0x9000), every
        // way round is known: the WRMSR to the ICR leaves the GS base as it was, the call pushes
        // the return address its callee's RET takes, and the guest runs to the handler's RET
        // (RBP is not known, so neither is RSP after its LEAVE), exiting only at each WRMSR.
        let guest = guest.word(0x9008, 0x40a700);
        assert_eq!(guest.scan(0x401afc), stops(&[0x403006]));
        assert_eq!(guest.scan(0x401b99), stops(&[0x403006]));
        // An ICR write to the GS base's MSR instead: after it, the pointer is not known.
        let to_gs_base = guest.reg(Register::RCX, 0xC000_0101);
        assert_eq!(to_gs_base.scan(0x401afc), stops(&[0x401b99, 0x403006]));
    }

    /// Each case: code at 0x1000 whose RET or indirect branch, after what precedes it, is or is
    /// not followed: the target at 0x2000 is an STI (a stop) after a NOP.
    fn target_guest(code: &[u8]) -> Guest {
        let mut bytes = code.to_vec();
        bytes.resize(0x1000, 0x90);
        bytes.extend([0x90, 0xfb]); // 2000: nop; 2001: sti
        Guest::new(0x1000, &bytes)
            .reg(Register::RAX, 0x2000)
            .reg(Register::RBX, 0x7000)
            .word(0x8000, 0x2000) // the return address at RSP
            .word(0x7010, 0x2000) // a code pointer
            .word(0x9010, 0x2000) // a per-CPU code pointer (GS base 0x9000)
    }

    #[test]
    fn a_branch_is_followed_only_while_its_operands_are_those_of_rip() {
        let followed = stops(&[0x2001]);
        for (code, want, what) in [
            (&[0xc3][..], &followed, "ret"),
            (&[0xc2, 0x10, 0x00], &followed, "ret $0x10"),
            (&[0xff, 0xe0], &followed, "jmp *%rax"),
            (&[0xff, 0x63, 0x10], &followed, "jmp *0x10(%rbx)"),
            (
                &[0x65, 0xff, 0x24, 0x25, 0x10, 0, 0, 0],
                &followed,
                "jmp *%gs:0x10",
            ),
            (
                &[0x48, 0x89, 0xd9, 0xff, 0xe0],
                &followed,
                "mov %rbx,%rcx; jmp *%rax",
            ),
            (&[0x0f, 0x30, 0xc3], &followed, "wrmsr; ret"),
            // Values the path computes from known ones.
            (
                &[0x48, 0x89, 0x04, 0x24, 0xc3],
                &followed,
                "mov %rax,(%rsp); ret (a retpoline's)",
            ),
            (&[0x50, 0xc3], &followed, "push %rax; ret"),
            (&[0x58, 0xff, 0xe0], &followed, "pop %rax; jmp *%rax"),
            (
                &[0x48, 0x89, 0x03, 0xff, 0x63, 0x10],
                &followed,
                "mov %rax,(%rbx); jmp *0x10(%rbx): another word",
            ),
            (
                &[0x48, 0x8b, 0x4b, 0x10, 0xff, 0xe1],
                &followed,
                "mov 0x10(%rbx),%rcx; jmp *%rcx",
            ),
            (
                &[0x48, 0x8d, 0x4b, 0x08, 0xff, 0x61, 0x08],
                &followed,
                "lea 8(%rbx),%rcx; jmp *8(%rcx)",
            ),
            (
                &[
                    0xb9, 0x30, 0x08, 0, 0, 0x0f, 0x30, 0x65, 0xff, 0x24, 0x25, 0x10, 0, 0, 0,
                ],
                &followed,
                "mov $0x830,%ecx; wrmsr; jmp *%gs:0x10",
            ),
        ] {
            assert_eq!(target_guest(code).scan(0x1000), *want, "{what}");
        }
        for (code, what) in [
            (&[0x48, 0x01, 0x04, 0x24, 0xc3][..], "add %rax,(%rsp); ret"),
            (
                &[0x48, 0x89, 0x04, 0x0c, 0xc3],
                "mov %rax,(%rsp,%rcx); ret: RCX not known",
            ),
            (
                &[0x48, 0x89, 0x44, 0x24, 0xfc, 0xc3],
                "mov %rax,-4(%rsp); ret: half the slot",
            ),
            (&[0x0f, 0x31, 0xff, 0xe0], "rdtsc; jmp *%rax"),
            (&[0x66, 0x50, 0xc3], "pushw %ax; ret"),
            (
                &[0x48, 0x31, 0xdb, 0xff, 0x63, 0x10],
                "xor %rbx,%rbx; jmp *0x10(%rbx): no pointer at 0x10",
            ),
            (
                &[0x48, 0x89, 0x4b, 0x10, 0xff, 0x63, 0x10],
                "mov %rcx,0x10(%rbx); jmp *0x10(%rbx): the code pointer overwritten",
            ),
            (
                &[0x0f, 0x01, 0xf8, 0x65, 0xff, 0x24, 0x25, 0x10, 0, 0, 0],
                "swapgs; jmp *%gs:0x10",
            ),
            (
                &[0x0f, 0x30, 0x65, 0xff, 0x24, 0x25, 0x10, 0, 0, 0],
                "wrmsr; jmp *%gs:0x10",
            ),
            (&[0x66, 0xc3], "ret with an operand-size prefix"),
            (&[0x48, 0xcf], "iretq"),
            (&[0xff, 0x2b], "ljmp *(%rbx)"),
        ] {
            let guest = target_guest(code);
            assert_eq!(
                guest.scan(0x1000),
                scan(0x1000, guest.fetch()),
                "{what}: as without registers"
            );
        }
    }

    #[test]
    fn a_call_pushes_its_return_address_for_the_callee_s_ret() {
        // 1000: call *%rax; 1002: sti     2000: nop; ret (back to 1002)
        let mut guest = target_guest(&[0xff, 0xd0, 0xfb]);
        guest.code[0x1001] = 0xc3;
        assert_eq!(guest.scan(0x1000), stops(&[0x1002]));
        // 1000: call 2000 (direct); 1005: sti
        let mut guest = target_guest(&[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xfb]);
        guest.code[0x1001] = 0xc3;
        assert_eq!(guest.scan(0x1000), stops(&[0x1005]));
        // The callee adds to its return address: no longer known.
        // 2000: add %rax,(%rsp); ret
        let mut guest = target_guest(&[0xe8, 0xfb, 0x0f, 0x00, 0x00, 0xfb]);
        guest.code.truncate(0x1000);
        guest.code.extend([0x48, 0x01, 0x04, 0x24, 0xc3]);
        assert_eq!(guest.scan(0x1000), stops(&[0x2004]), "the RET is a stop");
        // It stores a known value there instead: the RET goes to it.
        // 2000: mov %rbx,(%rsp); ret (to 0x7000: unreadable, a stop there)
        guest.code[0x1001] = 0x89;
        guest.code[0x1002] = 0x1c;
        assert_eq!(guest.scan(0x1000), stops(&[0x7000]), "the stored value");
    }

    #[test]
    fn a_target_out_of_reach_is_not_followed() {
        let guest = target_guest(&[0xff, 0xe0]).reg(Register::RAX, 0x8000_0000_0000);
        assert_eq!(guest.scan(0x1000), Stretch::Step, "not canonical");
        let guest = target_guest(&[0xc3]).word(0x8000, 0x1000);
        assert_eq!(guest.scan(0x1000), Stretch::Step, "a RET to itself");
        let guest = Guest::new(0x1000, &[0xff, 0x63, 0x10]).reg(Register::RBX, 0x7000);
        assert_eq!(guest.scan(0x1000), Stretch::Step, "an unreadable pointer");
    }

    #[test]
    fn an_sti_runs_with_its_shadow_to_the_boundary_after_them() {
        // sti; nopl 0x0(%rax,%rax,1) (Linux's patched local_irq_enable); mov ...
        let code = [0xfb, 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x48, 0x89, 0xc3];
        let guest = Guest::new(0x1000, &code);
        assert_eq!(scan(0x1000, guest.fetch()), Stretch::Step, "plain: stepped");
        assert_eq!(guest.scan(0x1000), stops(&[0x1006]));
        // sti; ret: to the return address.
        let guest = target_guest(&[0xfb, 0xc3]);
        assert_eq!(guest.scan(0x1000), stops(&[0x2000]));
        for (code, what) in [
            (&[0xfb, 0xf4][..], "sti; hlt"),
            (&[0xfb, 0x74, 0x02], "sti; jz: either way"),
            (&[0xfb, 0xeb, 0xfd], "sti; jmp back to the STI"),
            (
                &[0xfb, 0xeb, 0xfe],
                "sti; jmp . (the shadow's own instruction)",
            ),
            (&[0xfb, 0x9d], "sti; popfq"),
            (
                &[0xfb, 0x48, 0x89, 0x04, 0x24, 0xc3],
                "sti; mov %rax,(%rsp): then a RET",
            ),
        ] {
            let guest = target_guest(code);
            let want = match what {
                "sti; mov %rax,(%rsp): then a RET" => stops(&[0x1005]),
                "sti; hlt" => Stretch::Halts,
                _ => Stretch::Step,
            };
            assert_eq!(guest.scan(0x1000), want, "{what}");
        }
    }

    proptest::proptest! {
        /// Whatever the code, registers and memory: no panic; a plan of at most three
        /// breakpoints, none at RIP; the path's instructions lead one to the next, each a
        /// straight-line instruction or a branch it followed; and from where it ends, every
        /// path meets a breakpoint (or a HLT, or a loop) before anything that may set IF.
        #[test]
        fn any_guest_gives_a_sound_plan(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(vec![0xc3u8, 0xff, 0xe0, 0xd0, 0x63, 0x9d, 0xf4, 0x74, 0x90, 0xe8]),
                ],
                0..300,
            ),
            start in 0usize..300,
            lead in 0usize..7,
            regs in proptest::collection::vec(0u64..0x140, 16),
            words in proptest::collection::vec(
                (
                    proptest::sample::select(vec![0usize, 3, 4, 4, 4, 5]),
                    proptest::sample::select(vec![0u64, 0, 0x10, 8]),
                    0u64..0x140,
                ),
                0..8,
            ),
        ) {
            // Often a return or an indirect branch at RIP.
            let leads: [&[u8]; 7] = [&[], &[0xc3], &[0xff, 0xe0], &[0xff, 0x63, 0x10], &[0xff, 0xd0], &[0x0f, 0x30, 0xc3], &[0xfb]];
            let mut bytes = bytes;
            let start = start.min(bytes.len());
            bytes.splice(start..start, leads[lead].iter().copied());
            let base = 0x1000;
            let mut guest = Guest::new(base, &bytes);
            for (i, &value) in regs.iter().enumerate() {
                guest = guest.reg(gpr(i).unwrap(), base + value);
            }
            // Words where the registers point, so that returns and branches through memory
            // find their targets.
            for &(reg, offset, value) in &words {
                guest = guest.word(base + regs[reg] + offset, base + value);
            }
            let rip = base + start as u64;
            let stretch = guest.scan(rip);
            if let Stretch::StopAt(b) = stretch {
                proptest::prop_assert!(!b.addresses().contains(&rip));
            }
            if let Some(to) = past_sti_shadow(rip, &mut guest.fetch(), &mut Known(&guest)) {
                // The STI, then one instruction that leads to `to`, the breakpoint.
                let mut code = [0u8; MAX_INSN];
                let n = guest.fetch()(rip, &mut code);
                proptest::prop_assert_eq!(decode(rip, &code[..n]).mnemonic(), Mnemonic::Sti);
                proptest::prop_assert_eq!(stretch, Stretch::StopAt(Breaks::one(to)));
                let shadow = decode(rip, &code[..n]).next_ip();
                let n = guest.fetch()(shadow, &mut code);
                let next = classify(shadow, &code[..n]);
                proptest::prop_assert!(next == Next::Go(to) || next == Next::Stop);
                proptest::prop_assert!(to != rip && to != shadow);
                return Ok(());
            }
            // The whole stretch way by way, where the scan took it: its soundness is `flow`'s
            // property.
            let whole = super::super::flow::whole_stretch(rip, &mut guest.fetch(), &mut Known(&guest));
            if whole == Some(stretch) {
                return Ok(());
            }
            let path = straight_path(rip, &mut guest.fetch(), &mut Known(&guest));
            let Some(path) = path else {
                proptest::prop_assert_eq!(stretch, scan(rip, guest.fetch()));
                return Ok(());
            };
            let mut fetch = guest.fetch();
            let mut chain = path.passed.clone();
            chain.push(path.from);
            proptest::prop_assert_eq!(chain[0], rip);
            for pair in chain.windows(2) {
                let mut code = [0u8; MAX_INSN];
                let n = fetch(pair[0], &mut code);
                match classify(pair[0], &code[..n]) {
                    Next::Go(to) => proptest::prop_assert_eq!(to, pair[1]),
                    Next::Stop => proptest::prop_assert!(path.followed.contains(&pair[0])),
                    other => proptest::prop_assert!(false, "{other:?} inside the path"),
                }
            }
            let plain = scan(rip, guest.fetch());
            let last = path.followed.iter().rev().find(|&&at| at != rip);
            match stretch {
                s if s == plain => {}
                Stretch::StopAt(b) if last.is_some_and(|&at| b == Breaks::one(at)) => {}
                // The path ends at a stop: the guest runs to it.
                Stretch::StopAt(b) if b == Breaks::one(path.from) => {}
                Stretch::StopAt(b) => {
                    super::super::tests::every_path_meets(path.from, &mut fetch, b.addresses())
                }
                Stretch::Halts => super::super::tests::every_path_meets(path.from, &mut fetch, &[]),
                Stretch::Step => proptest::prop_assert!(false, "stepped though {plain:?}"),
            }
        }
    }
}
