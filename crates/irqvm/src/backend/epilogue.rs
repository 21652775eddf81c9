//! Running the last instructions of an interrupt handler, up to and including its IRETQ, in
//! irqvm instead of in the guest, so that an interrupt that became deliverable inside the
//! handler goes in at the exact boundary without another trip through KVM.
//!
//! The common case it serves: a handler EOIs (an xAPIC MMIO write, which exits to irqvm), a
//! vector that the EOI uncovered or that arrived meanwhile waits for IF, and between that exit and
//! the IRETQ that sets IF the guest has only its stub's register restores left (a RET, POPs, an
//! ADD to RSP). Hardware takes the waiting interrupt right after the IRETQ (SDM vol. 3 §6.8.1).
//! Without this module the backend lets the guest run there with an execute breakpoint at the
//! return address (`step::Stepper::run_to_return`): a debug exit, and breakpoint registers KVM
//! loads at every entry, which cost this nested host ~20 µs per interrupt (docs/benchmarks.md).
//! Here the same instructions are executed on a copy of the registers, reading guest memory as
//! the processor would, and the backend hands KVM the result together with the injection.
//!
//! Only instructions that write nothing but registers are run (POP r64, RET, ADD r64 imm, LEA
//! r64 [RSP+disp], JMP rel, NOP, IRETQ), so nothing the guest or another vCPU can see happens
//! before the registers go in; anything else ends the attempt with [`Stop`] and no effect, and
//! the backend falls back to the breakpoint. Memory is read through [`Memory`], which refuses any
//! access the processor would fault on or would mark accessed. The IRETQ must be the one that
//! consumes the very frame the backend's injection pushed ([`Target`]): same stack slot, the return
//! RIP, RSP, CS and SS that frame holds, a flags image that loads nothing special (TF, NT, RF,
//! VM clear; IF set, or nothing would be deliverable), and descriptors for CS and SS in the GDT
//! equal to what the vCPU has loaded (an IRET reloads both from there, SDM vol. 2A IRET,
//! "IA-32e mode" return to the same privilege level). The caller checks what lies outside the
//! instructions: CPL 0 in 64-bit code, no TF, no breakpoint of the guest's own enabled in DR7, no
//! NMI blocking (an IRET would end it), no interrupt shadow, no event KVM has yet to deliver.

use kvm_bindings::{kvm_regs, kvm_segment};

use crate::memory::Access;

/// The most instructions one attempt runs: a stub restores 15 registers and adjusts RSP, the
/// function it called returns first, a few jumps and NOPs between. A longer way out is left to
/// the guest.
pub const MAX_INSNS: usize = 32;

/// Guest memory as a CPL-0 instruction reads it (`crate::memory::read_as_supervisor`).
pub trait Memory {
    /// Fills `out` from linear address `at` for an access of kind `access`; false if the
    /// processor would fault or set an accessed bit on the way, or the bytes are not RAM.
    fn read(&mut self, at: u64, out: &mut [u8], access: Access) -> bool;
}

/// The frame the handler returns through, as the injection that entered it pushed it.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Where the frame's RIP slot is ([`super::step::frame_at`]): the IRETQ must find RSP here.
    pub frame: u64,
    /// The return RIP and RSP the frame holds.
    pub rip: u64,
    pub rsp: u64,
    /// The vCPU's code and stack segments as loaded now; the frame's CS and SS must name them.
    pub cs: kvm_segment,
    pub ss: kvm_segment,
    /// GDTR's base and limit, to read the descriptors the IRETQ reloads.
    pub gdt_base: u64,
    pub gdt_limit: u16,
}

/// Why an attempt ended without reaching the IRETQ; the registers are left as they were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// An instruction this module does not run (it may write memory, or is not decoded here).
    Unsupported { rip: u64, opcode: u8 },
    /// A fetch or read the processor would fault on, mark accessed, or that is not RAM.
    Unreadable { at: u64 },
    /// A RET or JMP to a non-canonical address (#GP at that instruction).
    NonCanonical { rip: u64 },
    /// An IRETQ with RSP elsewhere than at the target frame, or a frame that does not return to
    /// the target's RIP, RSP, CS and SS.
    OtherFrame { rsp: u64 },
    /// The frame's flags image would load something this module does not model.
    Flags { image: u64 },
    /// A descriptor the IRETQ would reload differs from the one the vCPU has loaded.
    Descriptor { selector: u16 },
    /// [`MAX_INSNS`] instructions without an IRETQ.
    TooLong,
}

/// RFLAGS bits an IRETQ at CPL 0 may load as they are here: CF, PF, AF, ZF, SF, IF, DF, OF,
/// IOPL, AC, VIF, VIP, ID and the fixed bit 1 (SDM vol. 1 §3.4.3). TF, NT, RF, VM and the
/// reserved bits end the attempt.
const PLAIN_FLAGS: u64 = 0x0001
    | 0x0002
    | 0x0004
    | 0x0010
    | 0x0040
    | 0x0080
    | 0x0200
    | 0x0400
    | 0x0800
    | 0x3000
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21);
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_FIXED: u64 = 1 << 1;
/// The arithmetic flags an ADD writes (SDM vol. 2A ADD): CF, PF, AF, ZF, SF, OF.
const ARITH_FLAGS: u64 = 0x0001 | 0x0004 | 0x0010 | 0x0040 | 0x0080 | 0x0800;

/// Runs from `regs.rip` to the IRETQ that returns through `target`'s frame and past it: the
/// registers right after that IRETQ, the boundary a waiting interrupt is taken at.
pub fn finish(regs: &kvm_regs, target: &Target, mem: &mut impl Memory) -> Result<kvm_regs, Stop> {
    if regs.rflags & RFLAGS_NT != 0 {
        // IRET with NT set is a task return, #GP in IA-32e mode (SDM vol. 2A IRET).
        return Err(Stop::Flags { image: regs.rflags });
    }
    let mut cpu = Cpu { regs: *regs };
    for _ in 0..MAX_INSNS {
        if let Some(done) = cpu.execute(target, mem)? {
            return Ok(done);
        }
    }
    Err(Stop::TooLong)
}

/// The general registers being run, indexed as the instruction encoding numbers them.
struct Cpu {
    regs: kvm_regs,
}

/// What decoding one instruction found.
enum Insn {
    Pop(usize),
    Ret,
    AddImm { reg: usize, imm: u64 },
    LeaRsp { reg: usize, disp: u64 },
    Jmp(u64),
    Nop,
    Iretq,
}

impl Cpu {
    /// Runs the instruction at RIP. `Some`: it was the target's IRETQ, and these are the
    /// registers after it.
    fn execute(
        &mut self,
        target: &Target,
        mem: &mut impl Memory,
    ) -> Result<Option<kvm_regs>, Stop> {
        let rip = self.regs.rip;
        let mut code = [0u8; 16];
        let fetched = fetch(mem, rip, &mut code);
        if fetched == 0 {
            return Err(Stop::Unreadable { at: rip });
        }
        let (insn, len) = decode(&code).ok_or(Stop::Unsupported {
            rip,
            opcode: code[0],
        })?;
        if len > fetched {
            // It runs into a page the fetch may not read.
            return Err(Stop::Unreadable {
                at: rip.wrapping_add(fetched as u64),
            });
        }
        let next = rip.wrapping_add(len as u64);
        match insn {
            Insn::Pop(reg) => {
                let value = self.read_stack(mem, 0)?;
                // POP RSP loads the value read; the increment is lost (SDM vol. 2B POP).
                self.regs.rsp = self.regs.rsp.wrapping_add(8);
                self.set(reg, value);
                self.regs.rip = next;
            }
            Insn::Ret => {
                let to = self.read_stack(mem, 0)?;
                if !crate::memory::canonical(to) {
                    return Err(Stop::NonCanonical { rip });
                }
                self.regs.rsp = self.regs.rsp.wrapping_add(8);
                self.regs.rip = to;
            }
            Insn::AddImm { reg, imm } => {
                let a = self.get(reg);
                let sum = a.wrapping_add(imm);
                self.regs.rflags = (self.regs.rflags & !ARITH_FLAGS) | add_flags(a, imm, sum);
                self.set(reg, sum);
                self.regs.rip = next;
            }
            Insn::LeaRsp { reg, disp } => {
                let value = self.regs.rsp.wrapping_add(disp);
                self.set(reg, value);
                self.regs.rip = next;
            }
            Insn::Jmp(rel) => {
                let to = next.wrapping_add(rel);
                if !crate::memory::canonical(to) {
                    return Err(Stop::NonCanonical { rip });
                }
                self.regs.rip = to;
            }
            Insn::Nop => self.regs.rip = next,
            Insn::Iretq => return self.iretq(target, mem).map(Some),
        }
        Ok(None)
    }

    /// IRETQ from CPL 0 to CPL 0 in 64-bit mode (SDM vol. 2A IRET): pops RIP, CS, RFLAGS, RSP
    /// and SS. Only the target's frame is taken, with the selectors the vCPU has loaded.
    fn iretq(&mut self, target: &Target, mem: &mut impl Memory) -> Result<kvm_regs, Stop> {
        if self.regs.rsp != target.frame {
            return Err(Stop::OtherFrame { rsp: self.regs.rsp });
        }
        let mut slots = [0u64; 5];
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = self.read_stack(mem, 8 * i as u64)?;
        }
        let [rip, cs, image, rsp, ss] = slots;
        let same = rip == target.rip
            && rsp == target.rsp
            && cs & 0xFFFF == u64::from(target.cs.selector)
            && ss & 0xFFFF == u64::from(target.ss.selector);
        if !same {
            return Err(Stop::OtherFrame { rsp: self.regs.rsp });
        }
        if image & !PLAIN_FLAGS != 0 || image & RFLAGS_IF == 0 {
            return Err(Stop::Flags { image });
        }
        // A return to CPL 0: CS.RPL 0, and SS.RPL must equal it, null SS included (SDM vol. 2A
        // IRET, IA-32e-MODE; a SYSCALL loads SS with whatever RPL STAR gives it).
        if target.cs.selector & 3 != 0 || target.ss.selector & 3 != 0 {
            return Err(Stop::Descriptor {
                selector: target.ss.selector,
            });
        }
        reloads_same(mem, target, &target.cs, false)?;
        reloads_same(mem, target, &target.ss, true)?;
        let mut after = self.regs;
        after.rip = rip;
        after.rsp = rsp;
        after.rflags = image | RFLAGS_FIXED;
        Ok(after)
    }

    /// The qword `offset` bytes above RSP.
    fn read_stack(&self, mem: &mut impl Memory, offset: u64) -> Result<u64, Stop> {
        let at = self.regs.rsp.wrapping_add(offset);
        let mut bytes = [0u8; 8];
        if !mem.read(at, &mut bytes, Access::Read { ac: self.ac() }) {
            return Err(Stop::Unreadable { at });
        }
        Ok(u64::from_le_bytes(bytes))
    }

    fn ac(&self) -> bool {
        self.regs.rflags & (1 << 18) != 0
    }

    fn get(&self, reg: usize) -> u64 {
        let r = &self.regs;
        [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ][reg & 15]
    }

    fn set(&mut self, reg: usize, value: u64) {
        let r = &mut self.regs;
        let slot = match reg & 15 {
            0 => &mut r.rax,
            1 => &mut r.rcx,
            2 => &mut r.rdx,
            3 => &mut r.rbx,
            4 => &mut r.rsp,
            5 => &mut r.rbp,
            6 => &mut r.rsi,
            7 => &mut r.rdi,
            8 => &mut r.r8,
            9 => &mut r.r9,
            10 => &mut r.r10,
            11 => &mut r.r11,
            12 => &mut r.r12,
            13 => &mut r.r13,
            14 => &mut r.r14,
            _ => &mut r.r15,
        };
        *slot = value;
    }
}

/// Reads up to 16 code bytes at `rip` and says how many it could: the instruction may end
/// before a page that is not readable, so a short read still decodes what lies before it.
fn fetch(mem: &mut impl Memory, rip: u64, code: &mut [u8; 16]) -> usize {
    let in_page = (4096 - (rip % 4096)) as usize;
    if in_page >= code.len() {
        return if mem.read(rip, code, Access::Fetch) {
            code.len()
        } else {
            0
        };
    }
    if !mem.read(rip, &mut code[..in_page], Access::Fetch) {
        return 0;
    }
    // Past the top of the address space there is nothing to fetch: an instruction that needs
    // bytes there stops as unreadable.
    let next_page = rip.checked_add(in_page as u64);
    if next_page.is_some_and(|at| mem.read(at, &mut code[in_page..], Access::Fetch)) {
        code.len()
    } else {
        in_page
    }
}

/// Decodes the instructions this module runs (64-bit mode, SDM vol. 2): an optional REX
/// prefix, no legacy prefix. Returns the instruction and its length.
fn decode(code: &[u8; 16]) -> Option<(Insn, usize)> {
    let (rex, at) = match code[0] {
        b @ 0x40..=0x4F => (b, 1),
        _ => (0, 0),
    };
    let w = rex & 0x08 != 0;
    let b = usize::from(rex & 0x01) << 3;
    let op = code[at];
    let rest = &code[at + 1..];
    let insn = match op {
        // POP r64 (58+rd): 64-bit operand in 64-bit mode, REX.B extends the register.
        0x58..=0x5F => (Insn::Pop(usize::from(op - 0x58) | b), at + 1),
        0xC3 if rex == 0 => (Insn::Ret, 1),
        // REP RET, the two-byte return older compilers emit for AMD's branch predictors.
        0xF3 if rex == 0 && code[1] == 0xC3 => (Insn::Ret, 2),
        0x90 if rex == 0 => (Insn::Nop, 1),
        0xEB if rex == 0 => (Insn::Jmp(rest[0] as i8 as i64 as u64), 2),
        0xE9 if rex == 0 => (Insn::Jmp(imm32(rest) as i64 as u64), 5),
        0xCF if w => (Insn::Iretq, at + 1),
        // ADD r/m64, imm8 (83 /0) and imm32 (81 /0), register form only.
        0x83 | 0x81 if w => {
            let modrm = rest[0];
            if modrm >> 6 != 3 || (modrm >> 3) & 7 != 0 {
                return None;
            }
            let reg = usize::from(modrm & 7) | b;
            let (imm, n) = if op == 0x83 {
                (rest[1] as i8 as i64 as u64, 1)
            } else {
                (imm32(&rest[1..]) as i64 as u64, 4)
            };
            (Insn::AddImm { reg, imm }, at + 2 + n)
        }
        // LEA r64, [RSP + disp8/disp32] (8D /r with SIB 24: base RSP, no index).
        0x8D if w => {
            let modrm = rest[0];
            let reg = usize::from((modrm >> 3) & 7) | (usize::from(rex & 0x04) << 1);
            if modrm & 7 != 4 || rest[1] != 0x24 || rex & 0x03 != 0 {
                return None;
            }
            match modrm >> 6 {
                1 => (
                    Insn::LeaRsp {
                        reg,
                        disp: rest[2] as i8 as i64 as u64,
                    },
                    at + 4,
                ),
                2 => (
                    Insn::LeaRsp {
                        reg,
                        disp: imm32(&rest[2..]) as i64 as u64,
                    },
                    at + 7,
                ),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(insn)
}

fn imm32(bytes: &[u8]) -> i32 {
    i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The arithmetic flags of `a + b = sum` in 64 bits (SDM vol. 1 §3.4.3.1, vol. 2A ADD).
fn add_flags(a: u64, b: u64, sum: u64) -> u64 {
    let mut flags = 0;
    if sum < a {
        flags |= 0x0001; // CF
    }
    if (sum as u8).count_ones() % 2 == 0 {
        flags |= 0x0004; // PF: even parity of the low byte
    }
    if (a ^ b ^ sum) & 0x10 != 0 {
        flags |= 0x0010; // AF: carry out of bit 3
    }
    if sum == 0 {
        flags |= 0x0040; // ZF
    }
    if sum >> 63 != 0 {
        flags |= 0x0080; // SF
    }
    if ((a ^ sum) & (b ^ sum)) >> 63 != 0 {
        flags |= 0x0800; // OF
    }
    flags
}

/// The IRETQ reloads `seg`'s selector from the GDT (SDM vol. 2A IRET; vol. 3 §3.4.2): the
/// descriptor there must give back exactly what the vCPU has loaded, and already be marked
/// accessed (the processor would write that bit). A null SS (`null_allowed`: at CPL 0 in 64-bit
/// mode) loads no descriptor; a null CS, or a selector into the LDT, is not taken.
fn reloads_same(
    mem: &mut impl Memory,
    target: &Target,
    seg: &kvm_segment,
    null_allowed: bool,
) -> Result<(), Stop> {
    let selector = seg.selector;
    let refused = Err(Stop::Descriptor { selector });
    if selector & !3 == 0 {
        // Null: allowed for SS only (a null CS is #GP).
        return if null_allowed && seg.unusable != 0 {
            Ok(())
        } else {
            refused
        };
    }
    let index = u64::from(selector & !7);
    if selector & 4 != 0 || index + 7 > u64::from(target.gdt_limit) {
        return refused;
    }
    // An implicit supervisor-mode access: SMAP keeps it off user pages whatever AC says (SDM vol. 3
    // §4.6.1).
    let mut raw = [0u8; 8];
    if !mem.read(
        target.gdt_base.wrapping_add(index),
        &mut raw,
        Access::Read { ac: false },
    ) {
        return refused;
    }
    if descriptor_matches(u64::from_le_bytes(raw), seg) {
        Ok(())
    } else {
        refused
    }
}

/// A segment descriptor (SDM vol. 3 §3.4.5) as KVM describes a loaded segment.
fn descriptor_matches(raw: u64, seg: &kvm_segment) -> bool {
    let bit = |n: u32| ((raw >> n) & 1) as u8;
    let mut limit = ((raw & 0xFFFF) | ((raw >> 32) & 0xF_0000)) as u32;
    if bit(55) != 0 {
        limit = (limit << 12) | 0xFFF;
    }
    let base = ((raw >> 16) & 0xFF_FFFF) | ((raw >> 32) & 0xFF00_0000);
    let type_ = ((raw >> 40) & 0xF) as u8;
    type_ & 1 != 0 // accessed
        && seg.unusable == 0
        && seg.base == base
        && seg.limit == limit
        && seg.type_ == type_
        && seg.s == bit(44)
        && seg.dpl == ((raw >> 45) & 3) as u8
        && seg.present == bit(47)
        && seg.avl == bit(52)
        && seg.l == bit(53)
        && seg.db == bit(54)
        && seg.g == bit(55)
}

#[cfg(test)]
mod tests;
