//! A single-threaded fake PC around `PcIrqChip`: the vCPU loop of a VMM without KVM, guest
//! register accesses by offset, and a log of what each vCPU took. Time is a plain counter.
#![allow(dead_code)]

use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
use irqchip::mpstate::{AcceptOutcome, InitBlocking, StandardSipi};
use irqchip::snapshot::{ChipSnapshot, SnapshotError};
use irqchip::vcpu::{ApicAccessResult, Injection, VcpuInterrupts};
use irqchip::{Nanos, Notify, VcpuIndex, Vector};

// xAPIC register offsets (SDM vol. 3 §11.4.1, table "Local APIC Register Address Map").
pub const APIC_ID: u64 = 0x020;
pub const APIC_TPR: u64 = 0x080;
pub const APIC_PPR: u64 = 0x0A0;
pub const APIC_EOI: u64 = 0x0B0;
pub const APIC_LDR: u64 = 0x0D0;
pub const APIC_SVR: u64 = 0x0F0;
pub const APIC_ISR0: u64 = 0x100;
pub const APIC_TMR0: u64 = 0x180;
pub const APIC_IRR0: u64 = 0x200;
pub const APIC_ICR_LOW: u64 = 0x300;
pub const APIC_ICR_HIGH: u64 = 0x310;
pub const APIC_LVT_TIMER: u64 = 0x320;
pub const APIC_LVT_LINT0: u64 = 0x350;
pub const APIC_INITIAL_COUNT: u64 = 0x380;
pub const APIC_CURRENT_COUNT: u64 = 0x390;
pub const APIC_DCR: u64 = 0x3E0;

pub const SVR_ENABLED: u32 = 0x100 | 0xFF;
/// LVT LINT0: ExtINT delivery (bits 10:8 = 111), unmasked: Linux's "virtual wire" mode.
pub const LINT0_EXTINT: u32 = 7 << 8;
pub const LVT_MASKED: u32 = 1 << 16;
/// ICR: level assert (bit 14), INIT (5) and StartUp (6) delivery modes.
pub const ICR_INIT: u32 = (1 << 14) | (5 << 8);
pub const ICR_STARTUP: u32 = (1 << 14) | (6 << 8);
pub const ICR_NMI: u32 = (1 << 14) | (4 << 8);
pub const ICR_FIXED: u32 = 1 << 14;

// IOAPIC (82093AA §3.1, §3.2.4).
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
pub const RTE_LOGICAL: u32 = 1 << 11;
pub const RTE_ACTIVE_LOW: u32 = 1 << 13;
pub const RTE_REMOTE_IRR: u32 = 1 << 14;
pub const RTE_LEVEL: u32 = 1 << 15;
pub const RTE_MASKED: u32 = 1 << 16;

/// What a vCPU took at one injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Taken {
    Nmi,
    /// The vector the PIC gave at INTA.
    ExtInt(Vector),
    Vector(Vector),
}

pub struct Machine {
    pub chip: PcIrqChip,
    pub cpus: Vec<VcpuInterrupts>,
    pub now: Nanos,
    /// Every kick/wake the chip asked for, in order.
    pub notes: Vec<(VcpuIndex, Notify)>,
}

impl Machine {
    pub fn new(vcpus: usize) -> Self {
        let (chip, cpus) = PcIrqChip::new(PcIrqChipConfig::new(vcpus));
        Self {
            chip,
            cpus,
            now: 0,
            notes: Vec::new(),
        }
    }

    // ---- guest accesses ----

    /// A 32-bit write to vCPU `cpu`'s xAPIC page; a broadcast EOI goes to the IOAPIC.
    pub fn apic_write(&mut self, cpu: VcpuIndex, offset: u64, value: u32) -> ApicAccessResult {
        let notes = &mut self.notes;
        let result =
            self.cpus[cpu].mmio_write(offset, &value.to_le_bytes(), self.now, &mut |index, how| {
                notes.push((index, how))
            });
        if let ApicAccessResult::Eoi(eoi) = result {
            self.chip
                .eoi(eoi, &mut |index, how| notes.push((index, how)));
        }
        result
    }

    pub fn apic_read(&mut self, cpu: VcpuIndex, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.cpus[cpu].mmio_read(offset, &mut data, self.now);
        u32::from_le_bytes(data)
    }

    /// A fixed IPI from `from` to the vCPU with APIC ID `to`.
    pub fn ipi(&mut self, from: VcpuIndex, to: u32, icr_low: u32) {
        self.apic_write(from, APIC_ICR_HIGH, to << 24);
        self.apic_write(from, APIC_ICR_LOW, icr_low);
    }

    pub fn ioapic_write(&mut self, index: u8, value: u32) {
        let notes = &mut self.notes;
        let mut note = |i, how| notes.push((i, how));
        self.chip
            .ioapic_mmio_write(IOREGSEL, &u32::from(index).to_le_bytes(), &mut note);
        self.chip
            .ioapic_mmio_write(IOWIN, &value.to_le_bytes(), &mut note);
    }

    pub fn ioapic_read(&mut self, index: u8) -> u32 {
        let notes = &mut self.notes;
        self.chip
            .ioapic_mmio_write(IOREGSEL, &u32::from(index).to_le_bytes(), &mut |i, how| {
                notes.push((i, how))
            });
        let mut data = [0u8; 4];
        self.chip.ioapic_mmio_read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    /// Programs redirection entry `pin` (high dword first, as Linux does, then the low dword).
    pub fn ioapic_entry(&mut self, pin: u8, low: u32, destination: u8) {
        self.ioapic_write(0x11 + 2 * pin, u32::from(destination) << 24);
        self.ioapic_write(0x10 + 2 * pin, low);
    }

    pub fn ioapic_entry_low(&mut self, pin: u8) -> u32 {
        self.ioapic_read(0x10 + 2 * pin)
    }

    pub fn pic_write(&mut self, port: u16, value: u8) {
        let notes = &mut self.notes;
        self.chip
            .pic_port_write(port, value, &mut |i, how| notes.push((i, how)));
    }

    pub fn pic_read(&mut self, port: u16) -> u8 {
        let notes = &mut self.notes;
        self.chip
            .pic_port_read(port, &mut |i, how| notes.push((i, how)))
    }

    /// Linux's `init_8259A`: mask everything, ICW1-4 on both chips (vectors 0x30 and 0x38,
    /// slave on IR2, 8086 mode, normal EOI), then the masks `master_imr` / `slave_imr`.
    pub fn pic_init_like_linux(&mut self, master_imr: u8, slave_imr: u8) {
        self.pic_write(0x21, 0xFF);
        self.pic_write(0xA1, 0xFF);
        for (command, data, base, icw3) in [(0x20, 0x21, 0x30, 0x04), (0xA0, 0xA1, 0x38, 0x02)] {
            self.pic_write(command, 0x11); // ICW1: edge, cascade, ICW4 needed
            self.pic_write(data, base); // ICW2: vector base
            self.pic_write(data, icw3); // ICW3: slave on IR2 / slave ID 2
            self.pic_write(data, 0x01); // ICW4: 8086 mode, normal EOI
        }
        self.pic_write(0x21, master_imr);
        self.pic_write(0xA1, slave_imr);
    }

    // ---- devices ----

    pub fn set_gsi(&mut self, gsi: u32, source: u32, level: bool) {
        let notes = &mut self.notes;
        self.chip
            .set_gsi(
                gsi,
                irqchip::routing::SourceId(source),
                level,
                &mut |i, how| notes.push((i, how)),
            )
            .expect("GSI in range");
    }

    pub fn pulse_gsi(&mut self, gsi: u32, source: u32) {
        let notes = &mut self.notes;
        self.chip
            .pulse_gsi(gsi, irqchip::routing::SourceId(source), &mut |i, how| {
                notes.push((i, how))
            })
            .expect("GSI in range");
    }

    // ---- the vCPU loop ----

    /// One turn of vCPU `cpu`'s loop, as a VMM runs it before entering the guest: drain the
    /// inbox, accept INIT/SIPI, poll the timer, then take every injection the vCPU would take
    /// now (interrupts nest only by priority, so this ends), without EOI.
    pub fn run(&mut self, cpu: VcpuIndex) -> (AcceptOutcome, Vec<Taken>) {
        let vcpu = &mut self.cpus[cpu];
        vcpu.drain();
        let outcome = vcpu.accept_events(InitBlocking::NONE, &mut StandardSipi);
        vcpu.poll_timer(self.now);
        // A halted vCPU with something deliverable becomes runnable here.
        vcpu.should_block(InitBlocking::NONE, self.chip.pic_intr());
        let mut taken = Vec::new();
        // Bounded: each turn consumes an NMI, an ExtINT request or an IRR bit.
        for _ in 0..600 {
            let Some(injection) = vcpu.next_injection(self.chip.pic_intr()) else {
                break;
            };
            taken.push(match injection {
                Injection::Nmi => {
                    vcpu.take_nmi();
                    Taken::Nmi
                }
                Injection::ExtInt => {
                    vcpu.take_extint();
                    Taken::ExtInt(self.chip.pic_acknowledge())
                }
                Injection::Vector(_) => {
                    Taken::Vector(vcpu.acknowledge_interrupt().expect("a deliverable vector"))
                }
            });
        }
        (outcome, taken)
    }

    /// What vCPU `cpu` takes at its next turn.
    pub fn take(&mut self, cpu: VcpuIndex) -> Vec<Taken> {
        self.run(cpu).1
    }
}

impl Machine {
    pub fn with_config(config: PcIrqChipConfig) -> Self {
        let (chip, cpus) = PcIrqChip::new(config);
        Self {
            chip,
            cpus,
            now: 0,
            notes: Vec::new(),
        }
    }

    /// Saves the whole chip at `self.now`, as a paused VM does: every vCPU, then the devices.
    pub fn snapshot(&mut self) -> ChipSnapshot {
        let now = self.now;
        let vcpus = self.cpus.iter_mut().map(|cpu| cpu.save(now)).collect();
        ChipSnapshot::new(vcpus, self.chip.save_devices())
    }

    /// Restores `snapshot` into this machine at time `now`: devices, then every vCPU.
    pub fn restore(&mut self, snapshot: &ChipSnapshot, now: Nanos) -> Result<(), SnapshotError> {
        self.chip.restore_devices(snapshot)?;
        self.now = now;
        for cpu in &mut self.cpus {
            let index = cpu.index();
            cpu.restore(&snapshot.vcpus[index], now)?;
        }
        Ok(())
    }

    /// Every defined xAPIC register of vCPU `cpu` as the guest reads it now (reserved slots
    /// are left out: reading them sets ESR).
    pub fn apic_registers(&mut self, cpu: VcpuIndex) -> Vec<(u64, u32)> {
        let mut offsets = vec![0x20, 0x30, 0x80, 0x90, 0xA0, 0xD0, 0xE0, 0xF0];
        offsets.extend((0..8).flat_map(|i| [0x100 + 0x10 * i, 0x180 + 0x10 * i, 0x200 + 0x10 * i]));
        offsets.extend([
            0x280, 0x300, 0x310, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370,
        ]);
        offsets.extend([0x380, 0x390, 0x3E0]);
        offsets
            .into_iter()
            .map(|offset| (offset, self.apic_read(cpu, offset)))
            .collect()
    }
}
