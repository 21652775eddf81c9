//! The chip shared by device threads and vCPU threads: a PCI device raising a level line on
//! its thread and an MSI device on another, each waiting for its interrupt to be serviced
//! before raising the next, while two vCPU threads take, service and EOI them and halt in
//! between. Every interrupt is taken exactly once: counts of guest-visible events only.
#![cfg(not(feature = "loom"))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
use irqchip::mpstate::{InitBlocking, StandardSipi};
use irqchip::msi::MsiMessage;
use irqchip::routing::SourceId;
use irqchip::vcpu::{ApicAccessResult, Injection, VcpuInterrupts};
use irqchip::{Notify, VcpuIndex};

const ROUNDS: u64 = 300;
const PCI_VECTOR: u8 = 0x41;
const MSI_VECTOR: u8 = 0x51;
const PCI_GSI: u32 = 16;
const NIC: SourceId = SourceId(1);
const EOI: u64 = 0xB0;
const SVR: u64 = 0xF0;

struct Shared {
    chip: PcIrqChip,
    done: AtomicBool,
    taken: [AtomicU64; 2],
    /// The device threads wait on these for "interrupt serviced".
    serviced: [Sender<()>; 2],
}

impl Shared {
    fn notify(&self, target: VcpuIndex, how: Notify) {
        if how == Notify::Wake {
            if let Some(inbox) = self.chip.apic_system().inbox(target) {
                inbox.ring_doorbell();
            }
        }
    }
}

fn apic_write(cpu: &mut VcpuInterrupts, shared: &Shared, offset: u64, value: u32) {
    let result = cpu.mmio_write(offset, &value.to_le_bytes(), 0, &mut |t, how| {
        shared.notify(t, how)
    });
    if let ApicAccessResult::Eoi(eoi) = result {
        shared.chip.eoi(eoi, &mut |t, how| shared.notify(t, how));
    }
}

/// The interrupt handlers of the "guest": read the device (which lowers its line), EOI, tell
/// the device thread it may interrupt again.
fn handle(cpu: &mut VcpuInterrupts, shared: &Shared, vector: u8) {
    let index = cpu.index();
    shared.taken[index].fetch_add(1, Ordering::SeqCst);
    let device = match vector {
        PCI_VECTOR => {
            shared
                .chip
                .set_gsi(PCI_GSI, NIC, false, &mut |t, how| shared.notify(t, how))
                .unwrap();
            0
        }
        _ => 1,
    };
    apic_write(cpu, shared, EOI, 0);
    let _ = shared.serviced[device].send(());
}

fn vcpu_thread(mut cpu: VcpuInterrupts, shared: &Shared) {
    while !shared.done.load(Ordering::SeqCst) {
        cpu.drain();
        cpu.accept_events(InitBlocking::NONE, &mut StandardSipi);
        if cpu.should_block(InitBlocking::NONE, shared.chip.pic_intr()) {
            cpu.block();
            continue;
        }
        cpu.begin_guest_entry();
        while let Some(Injection::Vector(_)) = cpu.next_injection(shared.chip.pic_intr()) {
            let vector = cpu.acknowledge_interrupt().expect("deliverable");
            handle(&mut cpu, shared, vector);
        }
        cpu.end_guest_entry();
        cpu.halt();
    }
}

fn device_thread(shared: &Shared, serviced: Receiver<()>, raise: impl Fn(&Shared)) {
    for _ in 0..ROUNDS {
        raise(shared);
        serviced
            .recv_timeout(Duration::from_secs(60))
            .expect("interrupt serviced");
    }
}

fn run() -> [u64; 2] {
    let (pci_tx, pci_rx) = mpsc::channel();
    let (msi_tx, msi_rx) = mpsc::channel();
    let (chip, mut cpus) = PcIrqChip::new(PcIrqChipConfig::new(2));
    let shared = Arc::new(Shared {
        chip,
        done: AtomicBool::new(false),
        taken: [AtomicU64::new(0), AtomicU64::new(0)],
        serviced: [pci_tx, msi_tx],
    });
    // Boot on this thread: both APICs on, the AP started, pin 16 (active-low, level) to the AP.
    apic_write(&mut cpus[0], &shared, SVR, 0x1FF);
    apic_write(&mut cpus[0], &shared, 0x310, 1 << 24);
    apic_write(&mut cpus[0], &shared, 0x300, 0x4500);
    apic_write(&mut cpus[0], &shared, 0x300, 0x4610);
    cpus[1].drain();
    cpus[1].accept_events(InitBlocking::NONE, &mut StandardSipi);
    apic_write(&mut cpus[1], &shared, SVR, 0x1FF);
    for (index, value) in [
        (0x31u32, 1u32 << 24),
        (0x30, 0xA000 | u32::from(PCI_VECTOR)),
    ] {
        shared
            .chip
            .ioapic_mmio_write(0, &index.to_le_bytes(), &mut |_, _| {});
        shared
            .chip
            .ioapic_mmio_write(0x10, &value.to_le_bytes(), &mut |_, _| {});
    }

    let vcpus: Vec<_> = cpus
        .into_iter()
        .map(|cpu| {
            let shared = shared.clone();
            thread::spawn(move || vcpu_thread(cpu, &shared))
        })
        .collect();
    let nic = {
        let shared = shared.clone();
        thread::spawn(move || {
            device_thread(&shared, pci_rx, |s| {
                s.chip
                    .set_gsi(PCI_GSI, NIC, true, &mut |t, how| s.notify(t, how))
                    .unwrap();
            })
        })
    };
    let msi_device = {
        let shared = shared.clone();
        thread::spawn(move || {
            device_thread(&shared, msi_rx, |s| {
                let msi = MsiMessage {
                    address: 0xFEE0_0000,
                    data: u32::from(MSI_VECTOR),
                };
                assert_eq!(
                    s.chip.signal_msi(msi, &mut |t, how| s.notify(t, how)),
                    Ok(1)
                );
            })
        })
    };
    nic.join().expect("NIC thread");
    msi_device.join().expect("MSI thread");
    shared.done.store(true, Ordering::SeqCst);
    for index in 0..2 {
        let inbox = shared.chip.apic_system().inbox(index).unwrap();
        inbox.post_wakeup();
        inbox.ring_doorbell();
    }
    for vcpu in vcpus {
        vcpu.join().expect("vCPU thread");
    }
    [
        shared.taken[0].load(Ordering::SeqCst),
        shared.taken[1].load(Ordering::SeqCst),
    ]
}

/// 82093AA §3.2.4 (level: one delivery per assertion when the handler lowers the line before
/// its EOI) and SDM vol. 3 §11.11 (MSI), across threads.
#[test]
fn device_threads_and_vcpu_threads_lose_and_duplicate_nothing() {
    let (done, result) = mpsc::channel();
    thread::spawn(move || done.send(run()));
    let taken = result
        .recv_timeout(Duration::from_secs(120))
        .expect("finished: no interrupt or wake-up lost");
    assert_eq!(
        taken,
        [ROUNDS, ROUNDS],
        "BSP took the MSIs, the AP the PCI line"
    );
}
