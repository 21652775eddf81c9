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
//! This host's event delivery does not check the gate's code segment (a handler reached through
//! a selector of a not-present or data descriptor runs with that CS, docs/kvm-facts.md), so
//! before delivering irqvm makes the checks of the INT n pseudocode itself ([`check_gate`]):
//! IDT limit, gate type and present bit, then the target code segment (null, table limit, code
//! type, DPL, present, 64-bit). Where one fails the guest gets the fault hardware raises, at the
//! INT instruction (#GP or #NP with the error code the SDM gives), instead of the handler.
//!
//! [`syscall`]: the SYSCALL from user mode this host leaves half done (no emulation failure,
//! a page fault the guest would take instead), finished at the guest's page-fault handler.

pub mod syscall;

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::VcpuFd;

use crate::memory::GuestRam;

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

/// A descriptor table as the segment registers describe it: linear base and limit (the last
/// valid byte offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    pub base: u64,
    pub limit: u32,
}

/// The descriptor tables a delivery through the IDT reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tables {
    pub idt: Table,
    pub gdt: Table,
    /// `None` while LDTR is unusable (null).
    pub ldt: Option<Table>,
}

/// The fault a delivery raises instead of reaching the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryFault {
    /// #GP (13) or #NP (11).
    pub vector: u8,
    pub error: u32,
}

/// A descriptor [`check_gate`] needed could not be read at this guest-linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnreadableTable(pub u64);

/// #NP, #GP (SDM vol. 3 §6.15).
const NP_VECTOR: u8 = 11;
const GP_VECTOR: u8 = 13;
/// Error code bit 1: the index refers to the IDT (SDM vol. 3 §6.13).
const ERROR_IDT: u32 = 1 << 1;
/// Selector bit 2: the LDT, not the GDT.
const SELECTOR_TI: u16 = 1 << 2;
/// 64-bit interrupt and trap gates (SDM vol. 3 §3.5, Table 3-2, IA-32e mode).
const GATE_INTERRUPT: u8 = 0xE;
const GATE_TRAP: u8 = 0xF;

/// The checks INT n makes at CPL 0 in 64-bit mode before it reaches the handler (SDM vol. 2A,
/// "INT n/INTO/INT3/INT1" pseudocode, IA-32e mode; vol. 3 §6.12.1, §6.14.1), in their order:
/// the IDT entry within the limit, a 64-bit interrupt or trap gate, present (else
/// #GP/#NP(vector * 8 + 2)); its selector not null (#GP(0)), within its table, a code segment of
/// DPL 0 (else #GP(selector)), present (else #NP(selector)), 64-bit (else #GP(selector)). The
/// gate's DPL is not checked: CPL 0 always passes it. `read(linear, buf)` reads guest-linear memory and says
/// whether all of it was read; `Err` when a table could not be read (the caller then leaves the
/// delivery to KVM, as before these checks).
pub fn check_gate(
    vector: u8,
    tables: &Tables,
    read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
) -> Result<Option<DeliveryFault>, UnreadableTable> {
    let idt_fault = |v: u8| DeliveryFault {
        vector: v,
        error: (u32::from(vector) * 8) | ERROR_IDT,
    };
    let offset = u32::from(vector) * 16;
    if offset + 15 > tables.idt.limit {
        return Ok(Some(idt_fault(GP_VECTOR)));
    }
    let mut gate = [0u8; 16];
    let gate_at = tables.idt.base.wrapping_add(u64::from(offset));
    if !read(gate_at, &mut gate) {
        return Err(UnreadableTable(gate_at));
    }
    let access = gate[5];
    if !matches!(access & 0xF, GATE_INTERRUPT | GATE_TRAP) {
        return Ok(Some(idt_fault(GP_VECTOR)));
    }
    if access & 0x80 == 0 {
        return Ok(Some(idt_fault(NP_VECTOR)));
    }
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    let selector_fault = |v: u8| DeliveryFault {
        vector: v,
        error: u32::from(selector & !3),
    };
    if selector & !3 == 0 {
        return Ok(Some(DeliveryFault {
            vector: GP_VECTOR,
            error: 0,
        }));
    }
    let table = if selector & SELECTOR_TI != 0 {
        match tables.ldt {
            Some(ldt) => ldt,
            None => return Ok(Some(selector_fault(GP_VECTOR))),
        }
    } else {
        tables.gdt
    };
    let index = u32::from(selector & !7);
    if index + 7 > table.limit {
        return Ok(Some(selector_fault(GP_VECTOR)));
    }
    let mut descriptor = [0u8; 8];
    let descriptor_at = table.base.wrapping_add(u64::from(index));
    if !read(descriptor_at, &mut descriptor) {
        return Err(UnreadableTable(descriptor_at));
    }
    // Access byte: P (7), DPL (6:5), S (4), type (3:0; bit 3 = code). Flags: L (5), D (6).
    let (access, flags) = (descriptor[5], descriptor[6]);
    let code = access & 0x18 == 0x18;
    let dpl = (access >> 5) & 3;
    let long = flags & 0x20 != 0 && flags & 0x40 == 0;
    if !code || dpl != 0 {
        return Ok(Some(selector_fault(GP_VECTOR)));
    }
    if access & 0x80 == 0 {
        return Ok(Some(selector_fault(NP_VECTOR)));
    }
    if !long {
        return Ok(Some(selector_fault(GP_VECTOR)));
    }
    Ok(None)
}

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
pub fn try_recover(fd: &mut VcpuFd, memory: &GuestRam) -> bool {
    let result = match failed_instruction(fd).and_then(|b| decode_any(&b)) {
        None => return false,
        Some(Finishable::Fwait) => finish_fwait(fd),
        Some(Finishable::SoftInterrupt(insn)) => deliver(fd, memory, insn),
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
fn deliver(
    fd: &mut VcpuFd,
    memory: &GuestRam,
    insn: SoftInterrupt,
) -> Result<bool, kvm_ioctls::Error> {
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
    if let Some(fault) = delivery_fault(fd, memory, &sregs, insn.vector) {
        raise(fd, &mut events, fault)?;
        return Ok(true);
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

/// The fault delivering `vector` through the guest's IDT raises ([`check_gate`]), if any; none
/// when a table cannot be read (KVM then delivers, as before the checks).
fn delivery_fault(
    fd: &VcpuFd,
    memory: &GuestRam,
    sregs: &kvm_bindings::kvm_sregs,
    vector: u8,
) -> Option<DeliveryFault> {
    let tables = Tables {
        idt: Table {
            base: sregs.idt.base,
            limit: u32::from(sregs.idt.limit),
        },
        gdt: Table {
            base: sregs.gdt.base,
            limit: u32::from(sregs.gdt.limit),
        },
        ldt: (sregs.ldt.unusable == 0 && sregs.ldt.present != 0).then_some(Table {
            base: sregs.ldt.base,
            limit: sregs.ldt.limit,
        }),
    };
    let mut read = |linear: u64, out: &mut [u8]| {
        crate::memory::read_linear(memory, fd, linear, out) == out.len()
    };
    match check_gate(vector, &tables, &mut read) {
        Ok(fault) => fault,
        Err(UnreadableTable(at)) => {
            tracing::debug!(
                at,
                "descriptor table unreadable: the delivery is left to KVM"
            );
            None
        }
    }
}

/// Raises `fault` at the INT instruction (a fault: RIP is left on it, SDM vol. 3 §6.5) by
/// handing KVM the exception with its error code for delivery at the next entry.
fn raise(
    fd: &mut VcpuFd,
    events: &mut kvm_bindings::kvm_vcpu_events,
    fault: DeliveryFault,
) -> Result<(), kvm_ioctls::Error> {
    events.exception.injected = 1;
    events.exception.nr = fault.vector;
    events.exception.has_error_code = 1;
    events.exception.error_code = fault.error;
    events.flags = 0;
    fd.set_vcpu_events(events)?;
    fd.get_kvm_run().ready_for_interrupt_injection = 0;
    tracing::debug!(?fault, "software interrupt's delivery faults");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDT: u64 = 0x1000;
    const GDT: u64 = 0x2000;
    const VECTOR: u8 = 0x90;
    /// The descriptors of the test GDT, by selector / 8.
    const DESCRIPTORS: [u64; 7] = [
        0,
        0x00CF_9A00_0000_FFFF, // 0x08: 32-bit code
        0x00CF_9200_0000_FFFF, // 0x10: data
        0x00AF_9A00_0000_FFFF, // 0x18: 64-bit code
        0x00AF_1A00_0000_FFFF, // 0x20: 64-bit code, not present
        0x00AF_DA00_0000_FFFF, // 0x28: 64-bit code, DPL 2
        0x00EF_9A00_0000_FFFF, // 0x30: L and D both set
    ];

    /// Guest-linear memory holding an IDT whose VECTOR gate has `selector` and access byte
    /// `access`, and the GDT above.
    struct Memory(std::collections::BTreeMap<u64, u8>);

    impl Memory {
        fn new(selector: u16, access: u8) -> Self {
            let mut bytes = std::collections::BTreeMap::new();
            let gate = IDT + u64::from(VECTOR) * 16;
            let mut entry = [0u8; 16];
            entry[2..4].copy_from_slice(&selector.to_le_bytes());
            entry[5] = access;
            for (i, b) in entry.into_iter().enumerate() {
                bytes.insert(gate + i as u64, b);
            }
            for (n, d) in DESCRIPTORS.into_iter().enumerate() {
                for (i, b) in d.to_le_bytes().into_iter().enumerate() {
                    bytes.insert(GDT + 8 * n as u64 + i as u64, b);
                }
            }
            Self(bytes)
        }

        fn read(&self, linear: u64, out: &mut [u8]) -> bool {
            for (i, b) in out.iter_mut().enumerate() {
                match self.0.get(&(linear + i as u64)) {
                    Some(v) => *b = *v,
                    None => return false,
                }
            }
            true
        }
    }

    fn tables(idt_limit: u32, ldt: Option<Table>) -> Tables {
        Tables {
            idt: Table {
                base: IDT,
                limit: idt_limit,
            },
            gdt: Table {
                base: GDT,
                limit: DESCRIPTORS.len() as u32 * 8 - 1,
            },
            ldt,
        }
    }

    /// The outcome of delivering VECTOR through a gate with `selector` and `access`.
    fn outcome(selector: u16, access: u8) -> Option<(u8, u32)> {
        let memory = Memory::new(selector, access);
        check_gate(VECTOR, &tables(4095, None), &mut |l, o| memory.read(l, o))
            .expect("the tables are readable")
            .map(|f| (f.vector, f.error))
    }

    const INTERRUPT_GATE: u8 = 0x8E;
    const IDT_ERROR: u32 = VECTOR as u32 * 8 + 2;

    /// SDM vol. 2A, INT n pseudocode (IA-32e mode) and vol. 3 §6.12.1: a 64-bit interrupt or
    /// trap gate to a present 64-bit DPL-0 code segment is delivered.
    #[test]
    fn a_gate_to_a_present_64_bit_code_segment_is_delivered() {
        assert_eq!(outcome(0x18, INTERRUPT_GATE), None);
        assert_eq!(outcome(0x18, 0x8F), None, "trap gate");
        assert_eq!(
            outcome(0x1B, 0xEE),
            None,
            "selector RPL and gate DPL 3 do not matter at CPL 0"
        );
    }

    /// The gate's own faults carry the IDT error code, vector * 8 + 2 (SDM vol. 3 §6.13).
    #[test]
    fn gate_faults_name_the_idt_entry() {
        assert_eq!(
            outcome(0x18, 0x0E),
            Some((NP_VECTOR, IDT_ERROR)),
            "not present"
        );
        assert_eq!(
            outcome(0x18, 0x8C),
            Some((GP_VECTOR, IDT_ERROR)),
            "call gate"
        );
        assert_eq!(
            outcome(0x18, 0x86),
            Some((GP_VECTOR, IDT_ERROR)),
            "16-bit gate"
        );
        let memory = Memory::new(0x18, INTERRUPT_GATE);
        let last_byte = u32::from(VECTOR) * 16 + 14;
        let fault = check_gate(VECTOR, &tables(last_byte, None), &mut |l, o| {
            memory.read(l, o)
        });
        assert_eq!(
            fault,
            Ok(Some(DeliveryFault {
                vector: GP_VECTOR,
                error: IDT_ERROR
            })),
            "the entry's last byte past the IDT limit"
        );
    }

    /// The code segment's faults carry the selector (RPL cleared, TI kept), a null one 0.
    #[test]
    fn code_segment_faults_name_the_selector() {
        assert_eq!(outcome(0x0, INTERRUPT_GATE), Some((GP_VECTOR, 0)), "null");
        assert_eq!(
            outcome(0x3, INTERRUPT_GATE),
            Some((GP_VECTOR, 0)),
            "null with RPL 3"
        );
        assert_eq!(
            outcome(0x38, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x38)),
            "past the GDT limit"
        );
        assert_eq!(
            outcome(0x10, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x10)),
            "data segment"
        );
        assert_eq!(
            outcome(0x28, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x28)),
            "DPL 2 > CPL"
        );
        assert_eq!(
            outcome(0x23, INTERRUPT_GATE),
            Some((NP_VECTOR, 0x20)),
            "not present"
        );
        assert_eq!(
            outcome(0x08, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x08)),
            "32-bit code"
        );
        assert_eq!(
            outcome(0x30, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x30)),
            "L and D both set"
        );
        assert_eq!(
            outcome(0x1C, INTERRUPT_GATE),
            Some((GP_VECTOR, 0x1C)),
            "LDT selector, no LDT"
        );
    }

    /// A selector with TI set is looked up in the LDT; an unreadable table leaves the delivery
    /// to KVM.
    #[test]
    fn ldt_selectors_use_the_ldt_and_unreadable_tables_are_no_verdict() {
        let memory = Memory::new(0x1C, INTERRUPT_GATE);
        let ldt = Table {
            base: GDT,
            limit: 0x1F,
        };
        let verdict = check_gate(VECTOR, &tables(4095, Some(ldt)), &mut |l, o| {
            memory.read(l, o)
        });
        assert_eq!(verdict, Ok(None), "LDT entry 3 is the 64-bit code segment");
        let unmapped = Tables {
            idt: Table {
                base: 0x9000,
                limit: 4095,
            },
            ..tables(4095, None)
        };
        let gate = 0x9000 + u64::from(VECTOR) * 16;
        assert_eq!(
            check_gate(VECTOR, &unmapped, &mut |l, o| memory.read(l, o)),
            Err(UnreadableTable(gate))
        );
    }

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
