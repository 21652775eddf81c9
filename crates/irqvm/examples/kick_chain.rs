//! Probes whether a signal that ends KVM_RUN (irqvm's kick) can lose an interrupt that KVM's own
//! in-kernel LAPIC was injecting (docs/kvm-facts.md, "KVM's own in-kernel LAPIC here").
//!
//! The guest (KVM's irqchip, the `kernel` mode's setting) runs a chain of one-shot LAPIC timer
//! interrupts: its handler counts, re-arms the one-shot (100 µs) and EOIs (RBX holds the APIC's address
//! throughout), and the main loop spins with IF=1. A lost timer interrupt ends the chain for good. A second thread signals the
//! vCPU thread at random intervals (KVM_RUN returns EINTR, the vCPU thread enters again). The
//! probe reports every death of the chain with the LAPIC's IRR, ISR, TMCCT and the vCPU events,
//! and then revives it with KVM_SET_LAPIC so that the run goes on. `--no-kicks` runs the chain
//! without signals, as the control; `--immediate-exit` makes the signal handler also set
//! `kvm_run.immediate_exit`, as irqvm's kick does.
//!
//!     cargo run --release -p irqvm --example kick_chain [SECONDS] [--no-kicks]
//!
//! Needs /dev/kvm and binutils (`as`, `ld`, `objcopy`): the guest is assembled at run time.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use irqvm::kvm::{create_vm, open_kvm};
use irqvm::loader::{load, CpuMode, LoadRequest, RawImage};
use irqvm::memory::{create_guest_memory, register_guest_memory, GuestRam};
use irqvm::snapshot::convert::{page_reg, set_page_reg};
use irqvm::vcpu::regs::apply_boot_state;
use vm_memory::{Bytes, GuestAddress};

mod probe;
use probe::gate;

const GUEST: &str = r#"
	.code64
	.text
	.globl _start
_start:
	lidt idtr
	mov $0xfee00000, %ebx
	movl $0x1ff, 0xf0(%rbx)
	movl $0x40, 0x320(%rbx)
	movl $0xb, 0x3e0(%rbx)
	movl $100000, 0x380(%rbx)
	sti
1:	incq 0x200008
	jmp 1b

	.balign 16
idtr:	.word 256*16-1
	.quad 0x300000

	.balign 64
	.globl irq_handler
irq_handler:
	incl 0x200000
	movl $100000, 0x380(%rbx)
	movl $0, 0xb0(%rbx)
	iretq
"#;

const LOAD: u64 = 0x10_0000;
const IDT: u64 = 0x30_0000;
const COUNT: u64 = 0x20_0000;

/// `&kvm_run.immediate_exit` when kicks set it as irqvm's handler does (`--immediate-exit`).
static IMMEDIATE_EXIT: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

extern "C" fn ignore(_: libc::c_int) {
    let target = IMMEDIATE_EXIT.load(Ordering::Relaxed);
    if !target.is_null() {
        // SAFETY: points into the vCPU's kvm_run mapping, alive for the whole run.
        unsafe { std::ptr::write_volatile(target, 1) };
    }
}

fn count(mem: &GuestRam) -> u32 {
    mem.read_obj(GuestAddress(COUNT)).expect("guest RAM")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10);
    let kicks = !args.iter().any(|a| a == "--no-kicks");
    let set_immediate_exit = args.iter().any(|a| a == "--immediate-exit");
    let dir = std::env::temp_dir().join(format!("irqvm-kick-chain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (image, at) = probe::assemble(&dir, GUEST, LOAD, &["irq_handler"]);
    let handler = at[0];
    let _ = std::fs::remove_dir_all(&dir);

    let mem = create_guest_memory(16 << 20).expect("guest memory");
    let request = LoadRequest {
        kernel: &image,
        cmdline: String::new(),
        modules: Vec::new(),
        raw: Some(RawImage {
            load_addr: LOAD,
            entry: LOAD,
            mode: CpuMode::Long64,
        }),
    };
    let loaded = load(&mem, &request).expect("load");
    mem.write_slice(&gate(handler), GuestAddress(IDT + 16 * 0x40))
        .expect("IDT");
    let kvm = open_kvm().expect("/dev/kvm");
    let vm = create_vm(&kvm).expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    register_guest_memory(&vm, &mem).expect("memory");
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let supported = irqvm::cpuid::supported_cpuid(&kvm).expect("CPUID");
    vcpu.set_cpuid2(&supported).expect("KVM_SET_CPUID2");
    let mut sregs = vcpu.get_sregs().expect("KVM_GET_SREGS");
    let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
    apply_boot_state(&loaded.boot, &mut sregs, &mut regs);
    vcpu.set_sregs(&sregs).expect("KVM_SET_SREGS");
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");

    // SAFETY: installs a handler that does nothing for SIGUSR1; it touches no memory.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
    // SAFETY: gettid has no preconditions.
    let tid = Arc::new(AtomicI32::new(unsafe { libc::gettid() }));
    let stop = Arc::new(AtomicBool::new(false));
    let kicker = kicks.then(|| {
        let (tid, stop) = (tid.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                std::thread::sleep(Duration::from_micros(seed % 300));
                // SAFETY: signals a thread of this process with a handled signal.
                unsafe {
                    libc::syscall(
                        libc::SYS_tgkill,
                        libc::getpid(),
                        tid.load(Ordering::Relaxed),
                        libc::SIGUSR1,
                    )
                };
                sent += 1;
            }
            sent
        })
    });

    let start = Instant::now();
    let mut last = (0u32, Instant::now());
    let mut deaths = 0u32;
    let mut eintr = 0u64;
    if set_immediate_exit {
        IMMEDIATE_EXIT.store(&mut vcpu.get_kvm_run().immediate_exit, Ordering::Relaxed);
    }
    while start.elapsed() < Duration::from_secs(seconds) {
        vcpu.get_kvm_run().immediate_exit = 0;
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => eintr += 1,
            Err(e) => panic!("KVM_RUN: {e}"),
            Ok(exit) => panic!("unexpected exit {exit:?}"),
        }
        let now = count(&mem);
        if now != last.0 {
            last = (now, Instant::now());
            continue;
        }
        if last.1.elapsed() < Duration::from_millis(200) {
            continue;
        }
        deaths += 1;
        let mut page = vcpu.get_lapic().expect("KVM_GET_LAPIC");
        let events = vcpu.get_vcpu_events().expect("KVM_GET_VCPU_EVENTS");
        let rip = vcpu.get_regs().expect("KVM_GET_REGS").rip;
        println!(
            "chain died after {now} interrupts: IRR[2] {:08x} ISR[2] {:08x} TMICT {} TMCCT {} \
             injected {} nr {:#x} rip {rip:#x}",
            page_reg(&page, 0x220),
            page_reg(&page, 0x120),
            page_reg(&page, 0x380),
            page_reg(&page, 0x390),
            events.interrupt.injected,
            events.interrupt.nr
        );
        set_page_reg(&mut page, 0x120, 0);
        set_page_reg(&mut page, 0x390, 1000);
        vcpu.set_lapic(&page).expect("KVM_SET_LAPIC");
        last = (now, Instant::now());
    }
    stop.store(true, Ordering::Relaxed);
    let sent = kicker.map(|k| k.join().expect("kicker"));
    println!(
        "{seconds} s: {} timer interrupts, {deaths} chain deaths, {eintr} EINTR returns, kicks sent {sent:?}",
        count(&mem)
    );
}
