//! A simulated SMP machine driven by the irqchip crate alone: one host thread per vCPU, each
//! owning its `VcpuInterrupts`, running a tiny "guest program" written in Rust that programs its
//! local APIC through the same register interface a real guest uses (xAPIC MMIO offsets). The
//! bootstrap processor wakes the others with INIT-SIPI-SIPI; each AP says hello with an IPI;
//! then a token IPI travels around the ring of CPUs `rounds` times.
//!
//! Shared by the `smp_demo` example and the crate's threaded integration test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use irqchip::mpstate::{InitBlocking, StandardSipi};
use irqchip::posting::VcpuInbox;
use irqchip::vcpu::{ApicSystem, ApicSystemConfig, Injection, VcpuInterrupts, VmBus};
use irqchip::{ClockConfig, Notify, VcpuIndex, Vector};

const SVR: u64 = 0x0F0;
const EOI: u64 = 0x0B0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const SVR_ENABLE: u32 = 0x100 | 0xFF;
/// ICR: destination shorthand "all excluding self" (bits 19:18 = 11), level assert (bit 14).
const ICR_ALL_BUT_SELF_ASSERT: u32 = (0b11 << 18) | (1 << 14);
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
/// The page (vector << 12) the APs would start at; only its number matters here.
const SIPI_VECTOR: u32 = 0x08;
/// Each AP says hello with its own vector: hellos of several APs with one vector could coalesce
/// in the BSP's IRR (one IRR bit per vector, SDM vol. 3 §11.8.4), and the BSP would miss some.
const HELLO_BASE: Vector = 0x50;
/// The most vCPUs the demo runs: one hello vector each, below 0xFF.
pub const MAX_VCPUS: usize = 0xFF - HELLO_BASE as usize;
const TOKEN_VECTOR: Vector = 0x40;

/// What one run observed.
#[derive(Debug, Default)]
pub struct Report {
    /// vCPUs in the order they came online (APs only).
    pub online_order: Vec<VcpuIndex>,
    /// How many times each vCPU started from a SIPI.
    pub starts: Vec<u64>,
    /// Token IPIs taken by each vCPU.
    pub tokens: Vec<u64>,
    /// Hello IPIs taken by the BSP.
    pub hellos: u64,
    pub log: Vec<String>,
}

struct Shared {
    bus: Arc<VmBus>,
    vcpus: usize,
    rounds: u64,
    done: AtomicBool,
    starts: Vec<AtomicU64>,
    tokens: Vec<AtomicU64>,
    hellos: AtomicU64,
    online_order: Mutex<Vec<VcpuIndex>>,
    log: Mutex<Vec<String>>,
    echo: bool,
}

impl Shared {
    fn say(&self, line: String) {
        if self.echo {
            println!("{line}");
        }
        self.log.lock().unwrap().push(line);
    }

    fn inbox(&self, index: VcpuIndex) -> &Arc<VcpuInbox> {
        self.bus.sink(index).expect("vCPU index in range")
    }

    /// What a VMM does with a poster's `Notify`: a blocked vCPU's doorbell is rung; a vCPU "in
    /// guest" here only runs Rust code that drains before it next enters, so a kick needs no
    /// signal in this simulation.
    fn notify(&self, target: VcpuIndex, how: Notify) {
        if how == Notify::Wake {
            self.inbox(target).ring_doorbell();
        }
    }

    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        for index in 0..self.vcpus {
            let how = self.inbox(index).post_wakeup();
            self.notify(index, how);
            // A vCPU that already had work pending got no Notify::Wake: ring anyway.
            self.inbox(index).ring_doorbell();
        }
    }
}

/// Runs the machine with `vcpus` CPUs and `rounds` trips of the token around the ring.
pub fn run(vcpus: usize, rounds: u64, echo: bool) -> Report {
    assert!((1..=MAX_VCPUS).contains(&vcpus), "1 to {MAX_VCPUS} vCPUs");
    let config = ApicSystemConfig {
        vcpus,
        clock: ClockConfig::default(),
        x2apic: true,
        directed_eoi: true,
        cmci: false,
        max_phys_addr: irqchip::lapic::regs::MAX_PHYS_ADDR_LIMIT,
        apic_ids: Default::default(),
        smm: false,
    };
    let (system, cpus) = ApicSystem::new(config);
    let shared = Arc::new(Shared {
        bus: system.bus().clone(),
        vcpus,
        rounds,
        done: AtomicBool::new(false),
        starts: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        tokens: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
        hellos: AtomicU64::new(0),
        online_order: Mutex::new(Vec::new()),
        log: Mutex::new(Vec::new()),
        echo,
    });
    let threads: Vec<_> = cpus
        .into_iter()
        .map(|cpu| {
            let shared = shared.clone();
            thread::spawn(move || vcpu_thread(cpu, &shared))
        })
        .collect();
    for thread in threads {
        thread.join().expect("vCPU thread panicked");
    }
    let online_order = shared.online_order.lock().unwrap().clone();
    let log = shared.log.lock().unwrap().clone();
    Report {
        online_order,
        starts: shared
            .starts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect(),
        tokens: shared
            .tokens
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect(),
        hellos: shared.hellos.load(Ordering::SeqCst),
        log,
    }
}

/// The vCPU loop a VMM runs, minus KVM: drain, accept INIT/SIPI, block or run, take interrupts.
fn vcpu_thread(mut cpu: VcpuInterrupts, shared: &Shared) {
    let mut program = Program::new(cpu.index());
    let no_blocking = InitBlocking::default();
    while !shared.done.load(Ordering::SeqCst) {
        cpu.drain();
        let outcome = cpu.accept_events(no_blocking, &mut StandardSipi);
        if outcome.start.is_some() {
            program.on_start(&mut cpu, shared);
        }
        if cpu.should_block(no_blocking, false) {
            cpu.block();
            continue;
        }
        cpu.begin_guest_entry();
        while let Some(Injection::Vector(_)) = cpu.next_injection(false) {
            let vector = cpu.acknowledge_interrupt().expect("a pending vector");
            program.on_interrupt(vector, &mut cpu, shared);
            write(&mut cpu, EOI, 0, shared);
        }
        program.step(&mut cpu, shared);
        cpu.end_guest_entry();
    }
}

fn write(cpu: &mut VcpuInterrupts, offset: u64, value: u32, shared: &Shared) {
    cpu.mmio_write(offset, &value.to_le_bytes(), 0, &mut |target, how| {
        shared.notify(target, how)
    });
}

fn send_fixed(cpu: &mut VcpuInterrupts, target: VcpuIndex, vector: Vector, shared: &Shared) {
    write(cpu, ICR_HIGH, (target as u32) << 24, shared);
    write(cpu, ICR_LOW, (1 << 14) | u32::from(vector), shared);
}

/// The "guest program": what each CPU's code would do.
enum Program {
    BspBoot,
    BspWaitingForAps { online: usize },
    Idle,
}

impl Program {
    fn new(index: VcpuIndex) -> Self {
        if index == 0 {
            Program::BspBoot
        } else {
            Program::Idle
        }
    }

    fn on_start(&mut self, cpu: &mut VcpuInterrupts, shared: &Shared) {
        let index = cpu.index();
        shared.starts[index].fetch_add(1, Ordering::SeqCst);
        write(cpu, SVR, SVR_ENABLE, shared);
        shared.online_order.lock().unwrap().push(index);
        shared.say(format!("CPU {index} online (APIC ID {index})"));
        send_fixed(cpu, 0, HELLO_BASE + index as Vector, shared);
        *self = Program::Idle;
    }

    fn on_interrupt(&mut self, vector: Vector, cpu: &mut VcpuInterrupts, shared: &Shared) {
        let index = cpu.index();
        match vector {
            hello if hello > HELLO_BASE => {
                shared.hellos.fetch_add(1, Ordering::SeqCst);
                if let Program::BspWaitingForAps { online } = self {
                    *online += 1;
                }
            }
            TOKEN_VECTOR => {
                let taken = shared.tokens[index].fetch_add(1, Ordering::SeqCst) + 1;
                let next = (index + 1) % shared.vcpus;
                if index == 0 && taken > shared.rounds {
                    shared.say(format!(
                        "CPU 0 got the token back {} times: done",
                        shared.rounds
                    ));
                    shared.finish();
                    return;
                }
                shared.say(format!("CPU {index} -> CPU {next}"));
                send_fixed(cpu, next, TOKEN_VECTOR, shared);
            }
            other => shared.say(format!("CPU {index}: unexpected vector {other:#x}")),
        }
    }

    fn step(&mut self, cpu: &mut VcpuInterrupts, shared: &Shared) {
        match *self {
            Program::BspBoot => {
                write(cpu, SVR, SVR_ENABLE, shared);
                shared.say(format!(
                    "CPU 0 online (APIC ID 0), starting {} APs",
                    shared.vcpus - 1
                ));
                let init = ICR_ALL_BUT_SELF_ASSERT | ICR_INIT;
                let sipi = ICR_ALL_BUT_SELF_ASSERT | ICR_STARTUP | SIPI_VECTOR;
                write(cpu, ICR_LOW, init, shared);
                write(cpu, ICR_LOW, sipi, shared);
                write(cpu, ICR_LOW, sipi, shared);
                *self = Program::BspWaitingForAps { online: 0 };
            }
            Program::BspWaitingForAps { online } if online + 1 == shared.vcpus => {
                shared.say("all CPUs online; passing the token".to_string());
                // The BSP counts its own start as a token take of zero: it sends first.
                shared.tokens[0].fetch_add(1, Ordering::SeqCst);
                send_fixed(cpu, 1 % shared.vcpus, TOKEN_VECTOR, shared);
                *self = Program::Idle;
            }
            Program::BspWaitingForAps { .. } | Program::Idle => cpu.halt(),
        }
    }
}
