//! Probes KVM_SET_GUEST_DEBUG single-stepping on this host, for the `user` backend's exact
//! interrupt boundary (docs/kvm-facts.md, "Single-stepping"): whether every step exits, what a
//! step costs, what `if_flag` / `ready_for_interrupt_injection` say across `sti` and `mov ss`
//! shadows, whether an interrupt injected at a step boundary saves that RIP and a clean RFLAGS,
//! whether the guest sees TF (PUSHF) or a changed DR6, whether its own TF still gives it #DB,
//! and whether CR8 writes exit.
//!
//!     cargo run --release -p irqvm --example single_step
//!
//! Needs /dev/kvm and binutils (`as`, `ld`, `objcopy`): the probe guest is assembled at run time.

use std::path::Path;
use std::time::Instant;

use irqvm::kvm::{create_vm, inject_interrupt, open_kvm};
use irqvm::loader::{load, CpuMode, LoadRequest, RawImage};
use irqvm::memory::{create_guest_memory, register_guest_memory, GuestRam};
use irqvm::vcpu::regs::apply_boot_state;
use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

mod probe;
use probe::gate;

/// The probe guest (64-bit, loaded at 0x100000). Each phase ends with an `out` to port 0x80+n.
const PROBE: &str = r#"
	.code64
	.text
	.globl _start
_start:
	lidt idtr
	/* phase 0: 1000 iterations of a 2-instruction loop (stepped: the cost of a step) */
	mov $1000, %ecx
1:	dec %ecx
	jnz 1b
	out %al, $0x80
	/* phase 1: PUSHF while stepped: does the guest see TF? */
	cli
	pushfq
	pop %rax
	mov %rax, 0x200000
	out %al, $0x81
	/* phase 2: sti; nop; nop; nop stepped, an interrupt injected at the first ready boundary */
	sti
	nop
	nop
	nop
	cli
	out %al, $0x82
	/* phase 3: the guest's DR6 after stepping */
	mov %dr6, %rax
	mov %rax, 0x200008
	out %al, $0x83
	/* phase 4: CR8 raised (an MMIO read and a port write show it), then lowered (not stepped) */
	mov $5, %eax
	mov %rax, %cr8
	mov 0xfee00030, %eax
	out %al, $0x8c
	mov 0xfee00030, %eax
	mov %cr8, %rbx
	mov %rbx, 0x200048
	xor %eax, %eax
	mov %rax, %cr8
	out %al, $0x84
	/* phase 5: the guest's own TF, not stepped: #DB after nop, pushf, and, popf */
	pushfq
	orq $0x100, (%rsp)
	popfq
	nop
	pushfq
	andq $~0x100, (%rsp)
	popfq
	out %al, $0x85
	/* phase 6: the same while the host steps */
	pushfq
	orq $0x100, (%rsp)
	popfq
	nop
	pushfq
	andq $~0x100, (%rsp)
	popfq
	out %al, $0x86
	/* phase 7: the mov-ss shadow, stepped */
	mov %ss, %ax
	mov %ax, %ss
	nop
	out %al, $0x87
	/* phase 8: IRETQ to the next instruction with IF=1 in the image, stepped; an interrupt
	 * injected at the boundary after it */
	cli
	mov %rsp, %rax
	push $0x10
	push %rax
	push $0x202
	push $0x18
	lea 2f(%rip), %rax
	push %rax
	iretq
2:	nop
	nop
	cli
	out %al, $0x88
	/* phase 9: vector 0x41 injected after `sti; nop` (not stepped); its handler exits (port
	 * 0x89), the host steps its IRETQ and injects 0x40 at the boundary after it */
	sti
	nop
3:	nop
	nop
	cli
	out %al, $0x8a
	hlt

	.balign 16
idtr:	.word 256*16-1
	.quad 0x300000

	.balign 64
	.globl irq_handler
irq_handler:
	push %rax
	mov 8(%rsp), %rax
	mov %rax, 0x200010
	mov 24(%rsp), %rax
	mov %rax, 0x200018
	incl 0x200030
	pop %rax
	iretq

	.balign 64
	.globl irq2_handler
irq2_handler:
	push %rax
	mov 8(%rsp), %rax
	mov %rax, 0x200040
	out %al, $0x89
	pop %rax
	iretq

	.balign 64
	.globl db_handler
db_handler:
	push %rax
	incl 0x200020
	mov 8(%rsp), %rax
	mov %rax, 0x200028
	mov %dr6, %rax
	mov %rax, 0x200038
	pop %rax
	iretq
"#;

const LOAD: u64 = 0x10_0000;
const IDT: u64 = 0x30_0000;
const DATA: u64 = 0x20_0000;
const VECTOR: u8 = 0x40;

/// Assembles the probe; returns the flat binary and the handlers' addresses.
fn assemble(dir: &Path) -> (Vec<u8>, u64, u64, u64) {
    let (image, at) = probe::assemble(
        dir,
        PROBE,
        LOAD,
        &["irq_handler", "db_handler", "irq2_handler"],
    );
    (image, at[0], at[1], at[2])
}

fn read_u64(mem: &GuestRam, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn set_step(vcpu: &VcpuFd, on: bool) {
    let dbg = kvm_guest_debug {
        control: if on {
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        } else {
            0
        },
        ..Default::default()
    };
    vcpu.set_guest_debug(&dbg).unwrap();
}

/// Flags of the last KVM_RUN return, and the interrupt shadow KVM reports.
fn flags(vcpu: &mut VcpuFd) -> String {
    let shadow = vcpu.get_vcpu_events().unwrap().interrupt.shadow;
    let run = vcpu.get_kvm_run();
    format!(
        "if={} ready={} shadow={shadow} cr8={}",
        run.if_flag, run.ready_for_interrupt_injection, run.cr8
    )
}

fn main() {
    let dir = std::env::temp_dir().join(format!("irqvm-single-step-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (image, irq_handler, db_handler, irq2_handler) = assemble(&dir);
    let _ = std::fs::remove_dir_all(&dir);

    let mem = create_guest_memory(16 << 20).unwrap();
    let loaded = load(
        &mem,
        &LoadRequest {
            kernel: &image,
            cmdline: String::new(),
            modules: Vec::new(),
            raw: Some(RawImage {
                load_addr: LOAD,
                entry: LOAD,
                mode: CpuMode::Long64,
            }),
        },
    )
    .unwrap();
    for v in 0..256u64 {
        let h = match v as u8 {
            1 => db_handler,
            VECTOR => irq_handler,
            0x41 => irq2_handler,
            _ => 0,
        };
        if h != 0 {
            mem.write_slice(&gate(h), GuestAddress(IDT + 16 * v))
                .unwrap();
        }
    }
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    register_guest_memory(&vm, &mem).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let supported = irqvm::cpuid::supported_cpuid(&kvm).unwrap();
    vcpu.set_cpuid2(&supported).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    apply_boot_state(&loaded.boot, &mut sregs, &mut regs);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs).unwrap();

    let dr6_before = vcpu.get_debug_regs().unwrap().dr6;
    let mut probe = Probe {
        vcpu,
        mem,
        phase: 0,
        steps: 0,
        injected_at: None,
        start: Instant::now(),
        dr6_before,
    };
    probe.set_step(true);
    probe.run();
}

/// The host side of the probe: one phase per `out` marker (port 0x80 + n ends phase n).
struct Probe {
    vcpu: VcpuFd,
    mem: GuestRam,
    phase: u32,
    /// Step exits in phase 0.
    steps: u32,
    /// Where the phase's interrupt was injected, if it was.
    injected_at: Option<u64>,
    start: Instant,
    dr6_before: u64,
}

impl Probe {
    fn set_step(&self, on: bool) {
        set_step(&self.vcpu, on);
    }

    fn data(&self, offset: u64) -> u64 {
        read_u64(&self.mem, DATA + offset)
    }

    fn run(&mut self) {
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::Debug(arch)) => self.step_exit(arch.pc, arch.dr6),
                Ok(VcpuExit::IoOut(port, _)) => self.marker(port),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0xFF);
                    let f = flags(&mut self.vcpu);
                    println!("phase {}: mmio read {addr:#x} {f}", self.phase);
                }
                Ok(VcpuExit::Hlt) => {
                    println!("hlt: done in {:?}", self.start.elapsed());
                    return;
                }
                Ok(VcpuExit::SetTpr) => {
                    let f = flags(&mut self.vcpu);
                    println!("phase {}: KVM_EXIT_SET_TPR {f}", self.phase);
                }
                Ok(other) => println!("phase {}: exit {other:?}", self.phase),
                Err(e) => {
                    println!("phase {}: KVM_RUN error {e}", self.phase);
                    return;
                }
            }
        }
    }

    /// A step (or breakpoint) exit. In phases 2, 8, 9 and 10 the first boundary that takes an
    /// interrupt gets one, with stepping off first.
    fn step_exit(&mut self, pc: u64, dr6: u64) {
        if self.phase == 0 {
            self.steps += 1;
            return;
        }
        let f = flags(&mut self.vcpu);
        println!(
            "phase {}: debug exit pc {pc:#x} dr6 {dr6:#x} {f}",
            self.phase
        );
        let run = self.vcpu.get_kvm_run();
        let ready = run.if_flag != 0 && run.ready_for_interrupt_injection != 0;
        if matches!(self.phase, 2 | 8 | 9 | 10) && ready && self.injected_at.is_none() {
            self.set_step(false);
            let vector = if self.phase == 9 { 0x41 } else { VECTOR };
            inject_interrupt(&self.vcpu, vector).unwrap();
            self.injected_at = Some(pc);
            println!("  injected vector {vector:#x} at {pc:#x}, stepping off");
        }
    }

    fn marker(&mut self, port: u16) {
        let f = flags(&mut self.vcpu);
        let rip = self.vcpu.get_regs().unwrap().rip;
        println!("marker {port:#x} rip {rip:#x} {f}");
        match port {
            0x80 => {
                let t = self.start.elapsed();
                let n = self.steps;
                println!(
                    "  phase 0: {n} step exits for 2002 instructions, {t:?}, {:.1} us per step",
                    t.as_secs_f64() * 1e6 / f64::from(n.max(1))
                );
            }
            0x81 => {
                let flags = self.data(0);
                println!("  phase 1: guest PUSHF saw {flags:#x} (TF {})", (flags >> 8) & 1);
            }
            0x82 => println!(
                "  phase 2: injected at {:x?}; handler ran {} times, saved rip {:#x}, saved rflags {:#x}",
                self.injected_at,
                self.data(0x30) as u32,
                self.data(0x10),
                self.data(0x18)
            ),
            0x83 => println!(
                "  phase 3: guest DR6 {:#x}; KVM_GET_DEBUGREGS dr6 before {:#x} now {:#x}",
                self.data(8),
                self.dr6_before,
                self.vcpu.get_debug_regs().unwrap().dr6
            ),
            0x8c => {
                println!("  phase 4: a port write after the CR8 raise");
                return;
            }
            0x84 => println!(
                "  phase 4: guest read CR8 {} after the raise; guest #DB so far {}",
                self.data(0x48),
                self.data(0x20) as u32
            ),
            0x85 => {
                println!(
                    "  phase 5: guest #DB {} times, last at {:#x}, guest DR6 in its handler {:#x}; stepping on",
                    self.data(0x20) as u32,
                    self.data(0x28),
                    self.data(0x38)
                );
                self.set_step(true);
            }
            0x86 => println!("  phase 6: guest #DB {} times in all", self.data(0x20) as u32),
            0x87 => self.injected_at = None,
            0x88 => {
                println!(
                    "  phase 8: injected at {:x?} after a hand-made IRETQ; saved rip {:#x}",
                    self.injected_at,
                    self.data(0x10)
                );
                self.injected_at = None;
                self.set_step(true);
            }
            0x89 => {
                let target = self.data(0x40);
                println!("  phase 9: in 0x41's handler (saved rip {target:#x}); breakpoint there");
                self.injected_at = None;
                self.break_at(target);
            }
            0x8a => println!(
                "  phase 10: 0x40 injected at {:x?} after the handler's IRETQ; saved rip {:#x}",
                self.injected_at,
                self.data(0x10)
            ),
            _ => {}
        }
        self.phase = u32::from(port & 0xF) + 1;
    }

    /// An execute breakpoint at `target` (KVM_GUESTDBG_USE_HW_BP; DR7 L0, R/W0 = LEN0 = 0).
    /// `IRQVM_PROBE_STEP_IRET=1` steps the IRETQ instead, which shows this host's overshoot.
    fn break_at(&self, target: u64) {
        if std::env::var_os("IRQVM_PROBE_STEP_IRET").is_some() {
            self.set_step(true);
            return;
        }
        let mut dbg = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        dbg.arch.debugreg[0] = target;
        dbg.arch.debugreg[7] = 1;
        self.vcpu.set_guest_debug(&dbg).unwrap();
    }
}
