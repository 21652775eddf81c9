//! Finishing instructions this host's instruction emulator gives up on.
//!
//! On this host KVM emulates guest ring-0 code, and its emulator fails on a few instructions
//! (docs/kvm-facts.md, "The instruction emulator here"): it then exits with
//! KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION, and (flag
//! KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) the bytes it fetched at RIP. Where irqvm
//! can produce the instruction's architectural effect itself, [`try_recover`] does so and the
//! vCPU runs on; every other failure stays a VM-stopping error. On a host whose CPU runs guest
//! code (VMX, SVM) these exits do not happen for these instructions and this module is unused.
//!
//! Handled: `fwait` (9B), which Linux's FPU code executes (seen on an AP right after SMP
//! bring-up): with no unmasked x87 exception pending (FSW.ES, bit 7, clear; SDM vol. 1 §8.1.3,
//! vol. 2A "WAIT/FWAIT") it does nothing, so RIP is advanced past it; with one pending it would
//! raise #MF, which this module leaves to the error report. And the software interrupts `int3` (CC) and `int imm8` (CD ib) at CPL 0 in 64-bit mode,
//! which Linux executes on purpose (the alternatives self-test, `text_poke_bp`). Their effect
//! (SDM vol. 2A, "INT n/INTO/INT3/INT1"; vol. 3 §6.12.1) is the delivery of the vector through
//! the IDT with the *next* instruction's address as the saved RIP (#BP is a trap, vol. 3 §6.5),
//! whatever RFLAGS.IF says, without an error code. irqvm produces it with KVM_SET_VCPU_EVENTS:
//! RIP is first advanced past the instruction, then the vector is marked as an interrupt already
//! being delivered (`interrupt.injected`, not soft), which KVM delivers through the IDT at the
//! next entry and saves the (advanced) RIP, as for an external interrupt. A soft injection
//! (`soft` = 1, or an exception injection of #BP) would instead have KVM add an instruction
//! length of its own to RIP, which after an emulation failure it does not know. Between the two
//! forms only the gate's DPL check differs (INT n needs CPL <= DPL, an external interrupt does
//! not); at CPL 0 it always passes, so only CPL 0 is handled.
//!
//! [`syscall`]: the SYSCALL from user mode this host leaves half done (no emulation failure,
//! a page fault the guest would take instead), finished at the guest's page-fault handler.

pub mod syscall;

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;

/// `int3` (SDM vol. 2A: opcode CC, one byte).
const OP_INT3: u8 = 0xCC;
/// `int imm8` (opcode CD ib, two bytes).
const OP_INT_N: u8 = 0xCD;
/// #BP, the vector `int3` raises.
const BP_VECTOR: u8 = 3;

/// `fwait` (opcode 9B).
const OP_FWAIT: u8 = 0x9B;
/// x87 status word: exception summary (SDM vol. 1 §8.1.3).
const FSW_ES: u16 = 1 << 7;

/// An instruction this module can finish: a software interrupt to `vector`, `len` bytes long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftInterrupt {
    pub vector: u8,
    pub len: u8,
}

/// What [`decode_any`] recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finishable {
    SoftInterrupt(SoftInterrupt),
    Fwait,
}

/// [`decode`], plus `fwait`.
pub fn decode_any(bytes: &[u8]) -> Option<Finishable> {
    match bytes {
        [OP_FWAIT, ..] => Some(Finishable::Fwait),
        _ => decode(bytes).map(Finishable::SoftInterrupt),
    }
}

/// Decodes the instruction bytes KVM reported. Only unprefixed `int3` and `int imm8` are
/// recognised; `int imm8` with a vector below 32 other than 3 is left alone (INT n to an
/// exception vector pushes no error code even where the exception has one, which an injected
/// interrupt would reproduce, but nothing irqvm runs needs it).
pub fn decode(bytes: &[u8]) -> Option<SoftInterrupt> {
    match bytes {
        [OP_INT3, ..] => Some(SoftInterrupt {
            vector: BP_VECTOR,
            len: 1,
        }),
        [OP_INT_N, vector, ..] if *vector >= 32 || *vector == BP_VECTOR => Some(SoftInterrupt {
            vector: *vector,
            len: 2,
        }),
        _ => None,
    }
}

/// After a KVM_EXIT_INTERNAL_ERROR: if it is an emulation failure on an instruction this module
/// finishes, and the vCPU is in a state where that is sound (CPL 0, 64-bit code, no event
/// already being delivered), produces the instruction's effect and returns true: the vCPU may
/// re-enter. Returns false, touching nothing, in every other case.
pub fn try_recover(fd: &mut VcpuFd) -> bool {
    let result = match failed_instruction(fd).and_then(|b| decode_any(&b)) {
        None => return false,
        Some(Finishable::Fwait) => finish_fwait(fd),
        Some(Finishable::SoftInterrupt(insn)) => deliver(fd, insn),
    };
    match result {
        Ok(done) => done,
        Err(e) => {
            crate::warn_ratelimited!("cannot finish the instruction the emulator gave up on: {e}");
            false
        }
    }
}

/// The instruction bytes of the last exit, if it was an emulation failure that carries them.
fn failed_instruction(fd: &mut VcpuFd) -> Option<Vec<u8>> {
    let run = fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // `internal` and `emulation_failure` share the suberror field; the bytes are plain data,
    // read below only when the flag says KVM wrote them.
    // SAFETY: the exit is KVM_EXIT_INTERNAL_ERROR, for which KVM fills this union member.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION
        || failure.ndata < 2
        || failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) == 0
    {
        return None;
    }
    // SAFETY: as above; the union's only member is the (size, bytes) pair.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let size = usize::from(insn.insn_size).min(insn.insn_bytes.len());
    Some(insn.insn_bytes[..size].to_vec())
}

/// `fwait` with no x87 exception pending is a no-op: RIP moves past it. Refuses (Ok(false))
/// when FSW.ES says #MF is due.
fn finish_fwait(fd: &VcpuFd) -> Result<bool, kvm_ioctls::Error> {
    if fd.get_fpu()?.fsw & FSW_ES != 0 {
        return Ok(false);
    }
    let mut regs = fd.get_regs()?;
    regs.rip = regs.rip.wrapping_add(1);
    fd.set_regs(&regs)?;
    Ok(true)
}

/// Advances RIP past `insn` and hands its vector to KVM as an interrupt in delivery. Refuses
/// (Ok(false)) outside 64-bit CPL-0 code or while another event is being delivered.
///
/// KVM then holds an interrupt being delivered, and at an exit it would report the vCPU as not
/// ready for another (`kvm_run.ready_for_interrupt_injection` is 0 while an event awaits
/// re-injection): the flag is cleared here to say so, because the exit it comes from predates
/// the event. Without that, `user` mode saw the failure exit's "ready" and IF=1 and injected a
/// pending interrupt with KVM_INTERRUPT, which replaces KVM's queued interrupt: the software
/// interrupt was lost with RIP already past it, and Linux ran the bytes after a `text_poke_bp`
/// int3 (an Oops at a data address during 4-vCPU SMP bring-up, docs/benchmarks.md). The
/// backends request an interrupt window instead, which KVM opens after the delivery.
fn deliver(fd: &mut VcpuFd, insn: SoftInterrupt) -> Result<bool, kvm_ioctls::Error> {
    let sregs = fd.get_sregs()?;
    if sregs.cs.l != 1 || sregs.cs.dpl != 0 {
        return Ok(false);
    }
    let mut events = fd.get_vcpu_events()?;
    if events.exception.injected != 0
        || events.exception.pending != 0
        || events.interrupt.injected != 0
        || events.nmi.injected != 0
    {
        return Ok(false);
    }
    let mut regs = fd.get_regs()?;
    regs.rip = regs.rip.wrapping_add(u64::from(insn.len));
    events.interrupt.injected = 1;
    events.interrupt.nr = insn.vector;
    events.interrupt.soft = 0;
    // Only the fields above: no NMI, SIPI, shadow, SMM or payload update.
    events.flags = 0;
    fd.set_regs(&regs)?;
    fd.set_vcpu_events(&events)?;
    fd.get_kvm_run().ready_for_interrupt_injection = 0;
    tracing::trace!(
        ?insn,
        rip = regs.rip,
        "software interrupt delivered for the emulator"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int3_is_vector_3_one_byte() {
        assert_eq!(
            decode(&[0xCC, 0x90, 0x90]),
            Some(SoftInterrupt { vector: 3, len: 1 })
        );
    }

    #[test]
    fn int_n_is_its_immediate_two_bytes() {
        assert_eq!(
            decode(&[0xCD, 0x80]),
            Some(SoftInterrupt {
                vector: 0x80,
                len: 2
            })
        );
        assert_eq!(
            decode(&[0xCD, 3]),
            Some(SoftInterrupt { vector: 3, len: 2 })
        );
    }

    #[test]
    fn fwait_is_recognised_and_int3_still_is() {
        assert_eq!(decode_any(&[0x9B, 0x65]), Some(Finishable::Fwait));
        assert_eq!(
            decode_any(&[0xCC]),
            Some(Finishable::SoftInterrupt(SoftInterrupt {
                vector: 3,
                len: 1
            }))
        );
        assert_eq!(decode_any(&[0x0F, 0x01, 0xCA]), None, "clac");
    }

    #[test]
    fn everything_else_is_left_to_the_error_report() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0xCD]), None, "truncated int imm8");
        assert_eq!(
            decode(&[0xCD, 14]),
            None,
            "int to an exception vector with an error code"
        );
        assert_eq!(decode(&[0x0F, 0xC7, 0x0E]), None, "cmpxchg16b");
        assert_eq!(decode(&[0x66, 0xCC]), None, "prefixed");
    }
}
