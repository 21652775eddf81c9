//! `chip_sequence`: a multi-vCPU machine around [`PcIrqChip`], driven by the input as a VMM
//! would drive it from its vCPU and device threads (here all on one thread, in input order):
//! guest APIC accesses on either view, IPIs of every kind, EOIs, INIT/SIPI, HLT, device lines,
//! MSIs, route changes, IOAPIC and PIC programming, time passing on a fake clock, and
//! snapshot/restore into a fresh chip. After every step, every vCPU's APIC is read through the
//! guest interface and checked ([`super::apic`]); INTA follows the SDM's selection rule; a fixed
//! IPI to exactly one enabled APIC is in its IRR when that vCPU next drains; and a snapshot
//! restored elsewhere, at another time, saves back to the identical snapshot.

use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
use irqchip::ioapic::IoApicConfig;
use irqchip::lapic::{ApicMode, LocalSource};
use irqchip::mpstate::{InitBlocking, StandardSipi};
use irqchip::msi::MsiMessage;
use irqchip::routing::{RouteTarget, SourceId, MAX_TARGETS_PER_GSI};
use irqchip::snapshot::ChipSnapshot;
use irqchip::vcpu::{ApicAccessResult, Injection, VcpuInterrupts};
use irqchip::{ClockConfig, GuestFault, Nanos, VcpuIndex};

use super::apic::{self, apic_base, msr, msr_of, ApicPort, Reading, Step};
use super::input::Input;
use super::prio::{deliverable, Vectors};

/// Steps per input: bounds the time one input takes.
const MAX_STEPS: usize = 3000;
/// Beyond this the fake clock stops advancing: about 104 days, so that no guest TSC (at up to
/// 3 GHz, from an origin below 2^60) wraps its 64 bits.
const MAX_TIME: Nanos = 1 << 53;

fn ignore(_: VcpuIndex, _: irqchip::Notify) {}

pub struct Sim {
    config: PcIrqChipConfig,
    chip: PcIrqChip,
    cpus: Vec<VcpuInterrupts>,
    now: Nanos,
    /// The last reading of each APIC.
    seen: Vec<Reading>,
    /// Vectors that may have been posted to each vCPU since its last explicit drain.
    sent: Vec<Step>,
    /// Fixed IPIs addressed to exactly this enabled APIC: in IRR at its next explicit drain.
    expect: Vec<Vectors>,
    pub stats: Stats,
}

/// What a run did, for the figures in docs/fuzzing.md.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub steps: u64,
    pub injected: u64,
    pub extint: u64,
    pub nmi: u64,
    pub snapshots: u64,
}

fn config_from(input: &mut Input) -> PcIrqChipConfig {
    let flags = input.u8();
    let mut config = PcIrqChipConfig::new(1 + usize::from(flags & 3));
    config.apic.x2apic = flags & 4 == 0;
    config.apic.directed_eoi = flags & 8 == 0;
    config.extended_destination_id = flags & 16 != 0;
    config.ioapic = IoApicConfig {
        pins: if flags & 32 == 0 {
            24
        } else {
            1 + input.below(120)
        },
        id: input.u8() & 0xF,
        version: if flags & 64 == 0 { 0x20 } else { 0x11 },
    };
    if flags & 128 != 0 {
        let hz = [1, 3, 25_000_000, 100_000_000, 1_000_000_000, 3_000_000_007];
        config.apic.clock = ClockConfig {
            apic_bus_hz: input.pick(&hz),
            tsc_hz: input.pick(&hz),
            tsc_at_zero: input.u64() >> (4 + input.below(60)),
        };
    }
    config
}

impl Sim {
    pub fn new(config: PcIrqChipConfig) -> Self {
        let (chip, cpus) = PcIrqChip::new(config);
        let n = cpus.len();
        let mut sim = Self {
            config,
            chip,
            cpus,
            now: 0,
            seen: vec![Reading::default(); n],
            sent: vec![Step::default(); n],
            expect: vec![Vectors::default(); n],
            stats: Stats::default(),
        };
        for i in 0..n {
            sim.seen[i] = apic::read(&mut sim.cpus[i], 0);
        }
        sim
    }

    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Checks vCPU `i` after a step that did `what` to it (acks, EOI, reset), against the sends
    /// accumulated since its last explicit drain.
    fn settle_cpu(&mut self, i: usize, what: Step) {
        self.allow_error_vector(i);
        let step = Step {
            edge: self.sent[i].edge,
            level: self.sent[i].level,
            ..what
        };
        let reading = apic::read(&mut self.cpus[i], self.now);
        step.check(&self.seen[i], &reading);
        self.seen[i] = reading;
        let topology = self.cpus[i].lapic().topology();
        if what.reset || !topology.hw_enabled || !topology.sw_enabled {
            // Disabled APICs drop fixed vectors at acceptance; a reset clears IRR.
            self.expect[i] = Vectors::default();
        }
    }

    fn settle_all(&mut self) {
        for i in 0..self.cpus.len() {
            self.settle_cpu(i, Step::default());
        }
    }

    /// The error LVT's vector may be raised by the APIC itself at almost any access
    /// (SDM vol. 3 §11.5.3).
    fn allow_error_vector(&mut self, i: usize) {
        let lvt = self.cpus[i].lapic().lvt(LocalSource::Error);
        self.sent[i].sent(lvt as u8, false);
    }

    fn allow_everywhere(&mut self, vector: u8, level: bool) {
        for step in &mut self.sent {
            step.sent(vector, level);
        }
    }

    /// Every vector a device can send now: IOAPIC entries and MSI routes.
    fn allow_device_vectors(&mut self) {
        let devices = self.chip.save_devices();
        let mut vectors = Vec::new();
        for pin in 0..devices.ioapic.pins() {
            if let Some(message) = devices.ioapic.entry_message(pin) {
                let level = message.trigger == irqchip::TriggerMode::Level;
                vectors.push((message.vector, level));
            }
        }
        for (_, targets) in devices.routing.routes() {
            for target in targets {
                if let RouteTarget::Msi(message) = target {
                    let level = message.trigger == irqchip::TriggerMode::Level;
                    vectors.push((message.vector, level));
                }
            }
        }
        for (vector, level) in vectors {
            self.allow_everywhere(vector, level);
        }
        let pic = &devices.pic;
        assert_eq!(
            pic.output(),
            pic.pending_vector().is_some(),
            "PIC INTR vs pending vector"
        );
    }

    /// Runs a device-side change with the device vectors allowed before and after it.
    fn device_op(&mut self, op: impl FnOnce(&mut Self)) {
        self.allow_device_vectors();
        op(self);
        self.allow_device_vectors();
    }

    // ---- the harness's own decoding of what a guest write sends ----

    fn all_in(&self, mode: ApicMode) -> bool {
        self.cpus.iter().all(|cpu| cpu.lapic().mode() == mode)
    }

    /// An ICR write from vCPU `from` that the model accepted: allow its vector everywhere and,
    /// for a fixed IPI to exactly one enabled APIC (or to self), expect it there.
    fn icr_sent(&mut self, from: usize, low: u32, destination: u32, x2: bool) {
        let vector = low as u8;
        let delivery_mode = (low >> 8) & 7;
        let level = low & (1 << 15) != 0;
        if delivery_mode <= 1 {
            self.allow_everywhere(vector, level);
        }
        let mode = if x2 {
            ApicMode::X2Apic
        } else {
            ApicMode::XApic
        };
        // Level trigger with the level bit clear: KVM's rule, nobody accepts it.
        let deassert = level && low & (1 << 14) == 0;
        if delivery_mode != 0 || vector < 16 || deassert || !self.all_in(mode) {
            return;
        }
        let target = match (low >> 18) & 3 {
            0 if low & (1 << 11) == 0 => self.unique_physical(destination, x2),
            1 => Some(from),
            _ => None,
        };
        if let Some(t) = target {
            let topology = self.cpus[t].lapic().topology();
            if topology.hw_enabled && topology.sw_enabled {
                self.expect[t].insert(vector);
            }
        }
    }

    fn unique_physical(&self, destination: u32, x2: bool) -> Option<usize> {
        let (id_mask, broadcast) = if x2 {
            (u32::MAX, u32::MAX)
        } else {
            (0xFF, 0xFF)
        };
        if destination == broadcast {
            return None;
        }
        let mut matches = (0..self.cpus.len())
            .filter(|&i| self.cpus[i].lapic().topology().apic_id.0 & id_mask == destination);
        let first = matches.next()?;
        matches.next().is_none().then_some(first)
    }

    // ---- guest APIC accesses ----

    fn after_access(&mut self, cpu: usize, result: ApicAccessResult, eoi: bool) {
        if let ApicAccessResult::Eoi(message) = result {
            assert!(eoi, "an EOI message from a write that is not an EOI");
            self.device_op(|sim| sim.chip.eoi(message, &mut ignore));
        }
        self.settle_cpu(
            cpu,
            Step {
                eoi,
                ..Step::default()
            },
        );
        self.settle_all();
    }

    fn mmio_write(&mut self, cpu: usize, offset: u64, data: &[u8]) {
        let xapic = self.cpus[cpu].lapic().mode() == ApicMode::XApic;
        let aligned32 = data.len() == 4;
        let value = if aligned32 {
            u32::from_le_bytes([data[0], data[1], data[2], data[3]])
        } else {
            0
        };
        let icr_high = self.cpus[cpu].read32(apic::ICR_HIGH, self.now);
        if xapic && aligned32 && offset == apic::ICR_LOW {
            self.icr_sent(cpu, value, icr_high >> 24, false);
        }
        let is_eoi = xapic && aligned32 && offset == apic::EOI;
        let result = self.cpus[cpu].mmio_write(offset, data, self.now, &mut ignore);
        self.after_access(cpu, result, is_eoi);
    }

    fn msr_write(&mut self, cpu: usize, msr: u32, value: u64) {
        let x2 = self.cpus[cpu].lapic().mode() == ApicMode::X2Apic;
        if x2 && msr == msr_of(apic::SELF_IPI) {
            // Truncation keeps the vector field.
            self.sent[cpu].sent(value as u8, false);
        }
        let result: Result<ApicAccessResult, GuestFault> =
            self.cpus[cpu].msr_write(msr, value, self.now, &mut ignore);
        let ok = result.is_ok();
        if ok && x2 && msr == msr_of(apic::ICR_LOW) {
            // Truncations split the 64-bit ICR into its halves.
            self.icr_sent(cpu, value as u32, (value >> 32) as u32, true);
        }
        let is_eoi = ok && x2 && msr == msr_of(apic::EOI);
        // An IA32_APIC_BASE write keeps IRR, ISR and TMR (KVM's rule, `LocalApic::set_apic_base`),
        // so it is held to every transition rule like any other access.
        self.after_access(cpu, result.unwrap_or(ApicAccessResult::Done), is_eoi);
    }

    /// A 32-bit register write through the view of the APIC's current mode.
    fn reg_write(&mut self, cpu: usize, offset: u64, value: u32) {
        if self.cpus[cpu].lapic().mode() == ApicMode::X2Apic {
            self.msr_write(cpu, msr_of(offset), u64::from(value));
        } else {
            self.mmio_write(cpu, offset, &value.to_le_bytes());
        }
    }

    fn ipi(&mut self, cpu: usize, low: u32, destination: u32) {
        if self.cpus[cpu].lapic().mode() == ApicMode::X2Apic {
            let value = u64::from(destination) << 32 | u64::from(low);
            self.msr_write(cpu, msr_of(apic::ICR_LOW), value);
        } else {
            self.mmio_write(cpu, apic::ICR_HIGH, &(destination << 24).to_le_bytes());
            self.mmio_write(cpu, apic::ICR_LOW, &low.to_le_bytes());
        }
    }

    // ---- the vCPU loop ----

    /// Drains vCPU `i`'s inbox and checks that every expected IPI arrived.
    fn explicit_drain(&mut self, i: usize) {
        self.cpus[i].drain();
        self.settle_cpu(i, Step::default());
        let missing = self.expect[i].minus(&self.seen[i].irr);
        assert!(
            missing.is_empty(),
            "vCPU {i}: fixed IPIs {missing:?} addressed to it alone never reached IRR"
        );
        self.expect[i] = Vectors::default();
        self.sent[i] = Step::default();
    }

    /// One turn of vCPU `i`'s loop before a guest entry, taking every injection it would take.
    fn run(&mut self, i: usize, max_injections: usize) {
        self.explicit_drain(i);
        let outcome = self.cpus[i].accept_events(InitBlocking::NONE, &mut StandardSipi);
        if outcome.reset.is_some() {
            self.settle_cpu(
                i,
                Step {
                    reset: true,
                    ..Step::default()
                },
            );
            let seen = &self.seen[i];
            assert!(
                seen.irr.is_empty() && seen.isr.is_empty(),
                "INIT left IRR/ISR"
            );
        }
        self.poll(i);
        let pic_intr = self.chip.pic_intr();
        self.cpus[i].should_block(InitBlocking::NONE, pic_intr);
        for _ in 0..max_injections {
            if !self.inject_one(i) {
                break;
            }
        }
    }

    fn poll(&mut self, i: usize) {
        let lvt = self.cpus[i].lapic().lvt(LocalSource::Timer);
        self.sent[i].sent(lvt as u8, false);
        self.cpus[i].poll_timer(self.now);
        self.settle_cpu(i, Step::default());
    }

    /// One injection decision of vCPU `i`; false when there was nothing to inject.
    fn inject_one(&mut self, i: usize) -> bool {
        let pic_intr = self.chip.pic_intr();
        let lapic = self.cpus[i].lapic();
        let enabled = lapic.hw_enabled();
        let runs = self.cpus[i].mp_state().runs_guest();
        let seen = self.seen[i];
        let expected = if enabled {
            deliverable(&seen.irr, seen.ppr)
        } else {
            None
        };
        match self.cpus[i].next_injection(pic_intr) {
            None => {
                assert!(
                    !runs || expected.is_none(),
                    "vCPU {i}: {expected:?} deliverable but nothing injected ({seen:?})"
                );
                false
            }
            Some(Injection::Nmi) => {
                self.cpus[i].take_nmi();
                self.stats.nmi += 1;
                true
            }
            Some(Injection::ExtInt) => {
                let pic = self.chip.save_devices().pic;
                self.cpus[i].take_extint();
                let vector = self.chip.pic_acknowledge();
                let in_range = |base: u8| (base..=base | 7).contains(&vector);
                assert!(
                    in_range(pic.master().vector_base()) || in_range(pic.slave().vector_base()),
                    "INTA vector {vector:#x} from neither PIC"
                );
                self.stats.extint += 1;
                self.settle_all();
                true
            }
            Some(Injection::Vector(v)) => {
                assert!(runs, "injection into a vCPU that does not run");
                assert_eq!(
                    Some(v),
                    expected,
                    "vCPU {i}: wrong vector chosen ({seen:?})"
                );
                let acked = self.cpus[i].acknowledge_interrupt();
                assert_eq!(acked, Some(v), "INTA disagrees with next_injection");
                self.settle_cpu(
                    i,
                    Step {
                        acked,
                        ..Step::default()
                    },
                );
                self.stats.injected += 1;
                true
            }
        }
    }

    fn advance(&mut self, delta: Nanos) {
        self.now = self.now.saturating_add(delta).min(MAX_TIME);
        for i in 0..self.cpus.len() {
            self.poll(i);
        }
    }

    // ---- snapshots ----

    fn save(&mut self) -> ChipSnapshot {
        let now = self.now;
        let vcpus = self.cpus.iter_mut().map(|cpu| cpu.save(now)).collect();
        ChipSnapshot::new(vcpus, self.chip.save_devices())
    }

    /// Snapshot, JSON round trip, restore into a fresh chip `delta` later, snapshot again: the
    /// two snapshots and the guest-visible APIC state must be identical. The run continues on
    /// the restored chip.
    fn snapshot_restore(&mut self, delta: Nanos) {
        for i in 0..self.cpus.len() {
            self.explicit_drain(i);
        }
        let first = self.save();
        let json = serde_json::to_vec(&first).expect("a snapshot serializes");
        let parsed: ChipSnapshot = serde_json::from_slice(&json).expect("own snapshot parses");
        assert!(parsed == first, "JSON round trip changed the snapshot");
        let later = restore_time(&first, delta);
        let (chip, mut cpus) = PcIrqChip::new(self.config);
        chip.restore_devices(&parsed)
            .expect("own snapshot restores");
        for cpu in &mut cpus {
            let index = cpu.index();
            cpu.restore(&parsed.vcpus[index], later)
                .expect("own vCPU snapshot restores");
        }
        self.chip = chip;
        self.cpus = cpus;
        self.now = later;
        let second = self.save();
        assert!(
            second == first,
            "snapshot -> restore -> snapshot differs {}",
            super::diff::first_difference(&first, &second)
        );
        let json2 = serde_json::to_vec(&second).expect("a snapshot serializes");
        assert!(json == json2, "snapshot JSON differs after restore");
        for i in 0..self.cpus.len() {
            let before = self.seen[i];
            let after = apic::read(&mut self.cpus[i], self.now);
            assert_eq!(
                before, after,
                "vCPU {i}: APIC reads differently after restore"
            );
        }
        self.stats.snapshots += 1;
    }

    /// Restores `snapshot` (already checked by the caller) at time 0 and re-reads every APIC.
    pub fn restore_foreign(&mut self, snapshot: &ChipSnapshot) -> Result<(), String> {
        self.chip
            .restore_devices(snapshot)
            .map_err(|e| e.to_string())?;
        for cpu in &mut self.cpus {
            let index = cpu.index();
            cpu.restore(&snapshot.vcpus[index], 0)
                .map_err(|e| e.to_string())?;
        }
        for i in 0..self.cpus.len() {
            self.seen[i] = apic::read(&mut self.cpus[i], self.now);
            self.sent[i] = Step::default();
            self.expect[i] = Vectors::default();
        }
        Ok(())
    }

    pub fn save_at_now(&mut self) -> ChipSnapshot {
        self.save()
    }

    // ---- the operations ----

    /// Decodes and runs one operation.
    pub fn step(&mut self, input: &mut Input) {
        self.stats.steps += 1;
        let cpu = input.below(self.cpus.len());
        match input.u8() % 26 {
            0 => {
                let offset = offset(input);
                let len = input.below(17);
                let data = input.bytes(len).to_vec();
                self.mmio_write(cpu, offset, &data);
            }
            1 => {
                let (offset, len) = (offset(input), input.below(17));
                let mut data = vec![0u8; len];
                self.cpus[cpu].mmio_read(offset, &mut data, self.now);
                self.settle_all();
            }
            2 => {
                let (msr, value) = (msr(input), input.u64());
                self.msr_write(cpu, msr, value);
            }
            3 => {
                let msr = msr(input);
                let _ = self.cpus[cpu].msr_read(msr, self.now);
                self.settle_all();
            }
            4 => {
                let (low, destination) = (input.u32(), input.u32());
                self.ipi(cpu, low, destination);
            }
            5 => {
                // A fixed IPI to an APIC ID of the machine (or one past it).
                let vector = input.u8();
                let target = input.below(self.cpus.len() + 1) as u32;
                let level = u32::from(input.bool()) << 15;
                self.ipi(cpu, 1 << 14 | level | u32::from(vector), target);
            }
            6 => self.reg_write(cpu, apic::EOI, 0),
            7 => {
                let max = 1 + input.below(8);
                self.run(cpu, max);
            }
            8 => {
                let delta = u64::from(input.u16()) << input.below(40);
                self.advance(delta);
            }
            9 | 10 => {
                let (gsi, source, level) = (gsi(input), SourceId(input.u32() % 3), input.bool());
                let pulse = input.u8() & 1 == 0;
                self.device_op(|sim| {
                    let _ = if pulse {
                        sim.chip.pulse_gsi(gsi, source, &mut ignore)
                    } else {
                        sim.chip.set_gsi(gsi, source, level, &mut ignore)
                    };
                });
                self.settle_all();
            }
            11 => {
                let offset = input.pick_or(&[0u64, 0x10, 0x40, 0x20, 0x14], |i| u64::from(i.u16()));
                let len = input.pick(&[4usize, 4, 1, 2, 8, 0, 3]);
                let data = input.bytes(len).to_vec();
                self.device_op(|sim| sim.chip.ioapic_mmio_write(offset, &data, &mut ignore));
                self.settle_all();
            }
            12 => {
                // A redirection entry, high dword first as Linux does.
                let pin = input.below(26) as u32;
                let (low, high) = (input.u32(), input.u32());
                self.device_op(|sim| {
                    for (index, value) in [(0x11 + 2 * pin, high), (0x10 + 2 * pin, low)] {
                        sim.chip
                            .ioapic_mmio_write(0, &index.to_le_bytes(), &mut ignore);
                        sim.chip
                            .ioapic_mmio_write(0x10, &value.to_le_bytes(), &mut ignore);
                    }
                });
                self.settle_all();
            }
            13 => {
                let offset = input.pick(&[0u64, 0x10, 0x40]);
                let mut data = [0u8; 4];
                self.chip.ioapic_mmio_read(offset, &mut data);
            }
            14 => {
                let port = pic_port(input);
                let value = input.u8();
                self.device_op(|sim| sim.chip.pic_port_write(port, value, &mut ignore));
                self.settle_all();
            }
            15 => {
                let port = pic_port(input);
                self.device_op(|sim| {
                    sim.chip.pic_port_read(port, &mut ignore);
                });
                self.settle_all();
            }
            16 => {
                let msi = msi(input);
                self.allow_everywhere(msi.data as u8, msi.data & (1 << 15) != 0);
                self.device_op(|sim| {
                    let _ = sim.chip.signal_msi(msi, &mut ignore);
                });
                self.settle_all();
            }
            17 => {
                let gsi = gsi(input);
                let targets = route_targets(input);
                self.device_op(|sim| {
                    let _ = sim.chip.set_route(gsi, &targets, &mut ignore);
                });
                self.settle_all();
            }
            18 => {
                let (gsi, msi) = (gsi(input), msi(input));
                self.device_op(|sim| {
                    let _ = sim.chip.bind_msi(gsi, msi, &mut ignore);
                });
                self.settle_all();
            }
            19 => {
                let delta = u64::from(input.u16()) << input.below(32);
                self.snapshot_restore(delta);
            }
            20 => {
                let value = apic_base(input);
                self.msr_write(cpu, apic::MSR_APIC_BASE, value);
            }
            21 => {
                self.cpus[cpu].halt();
                self.settle_all();
            }
            22 => self.program_timer(cpu, input),
            23 => {
                let tpr = input.u8();
                if input.bool() {
                    self.cpus[cpu].sync_cr8(u64::from(tpr >> 4));
                    self.settle_all();
                } else {
                    self.reg_write(cpu, apic::TPR, u32::from(tpr));
                }
            }
            24 => {
                let enable = u32::from(input.u8() & 3 != 0) << 8;
                let rest = u32::from(input.u8()) | (u32::from(input.bool()) << 12);
                self.reg_write(cpu, apic::SVR, enable | rest);
            }
            _ => self.init_pic(input),
        }
    }

    fn program_timer(&mut self, cpu: usize, input: &mut Input) {
        let mode = input.below(4) as u32;
        let lvt = mode << 17 | u32::from(input.bool()) << 16 | u32::from(input.u8());
        self.reg_write(cpu, apic::TIMER_DCR, u32::from(input.u8() & 0xB));
        self.reg_write(cpu, apic::LVT_TIMER, lvt);
        if mode == 2 {
            let tsc = self.cpus[cpu].guest_tsc(self.now);
            let deadline = tsc.saturating_add(u64::from(input.u32()));
            self.msr_write(cpu, apic::MSR_TSC_DEADLINE, deadline);
        } else {
            self.reg_write(cpu, apic::TIMER_INITIAL, input.u32() >> input.below(32));
        }
    }

    /// Linux's 8259 initialisation with vector bases and masks from the input.
    fn init_pic(&mut self, input: &mut Input) {
        let (master_base, slave_base) = (input.u8() & 0xF8, input.u8() & 0xF8);
        let (master_imr, slave_imr, elcr) = (input.u8(), input.u8(), input.u16());
        let writes = [
            (0x20u16, 0x11u8),
            (0x21, master_base),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, slave_base),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, master_imr),
            (0xA1, slave_imr),
            (0x4D0, elcr as u8),
            (0x4D1, (elcr >> 8) as u8),
        ];
        self.device_op(|sim| {
            for (port, value) in writes {
                sim.chip.pic_port_write(port, value, &mut ignore);
            }
        });
        self.settle_all();
    }
}

/// When to restore `snapshot` on the new timeline: `delta`, but no later than the instant at
/// which a guest TSC that starts counting at 0 would pass the saved one. Beyond it the model
/// saturates the TSC origin at 0 and the guest TSC jumps forward (documented in
/// `LocalApic::rebase_timeline`), so the snapshot could not come back identical.
fn restore_time(snapshot: &ChipSnapshot, delta: Nanos) -> Nanos {
    let latest = snapshot
        .vcpus
        .iter()
        .map(|vcpu| {
            let clock = vcpu.lapic.config().clock;
            let ns =
                u128::from(clock.tsc_at_zero) * 1_000_000_000 / u128::from(clock.tsc_hz.max(1));
            Nanos::try_from(ns).unwrap_or(Nanos::MAX)
        })
        .min()
        .unwrap_or(0);
    delta.min(latest).min(MAX_TIME)
}

fn offset(input: &mut Input) -> u64 {
    match input.u8() {
        0..=199 => u64::from(input.u8() & 0x3F) << 4,
        200..=239 => u64::from(input.u16() & 0x1FFF),
        _ => input.u64(),
    }
}

fn gsi(input: &mut Input) -> u32 {
    match input.u8() {
        0..=239 => u32::from(input.u8() % 32),
        _ => u32::from(input.u16()),
    }
}

fn pic_port(input: &mut Input) -> u16 {
    input.pick_or(&[0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1], Input::u16)
}

fn msi(input: &mut Input) -> MsiMessage {
    let address = match input.u8() {
        0..=199 => 0xFEE0_0000 | u64::from(input.u32() & 0xF_FFFF),
        _ => input.u64(),
    };
    MsiMessage {
        address,
        data: input.u32(),
    }
}

fn route_targets(input: &mut Input) -> Vec<RouteTarget> {
    let count = input.below(MAX_TARGETS_PER_GSI + 2);
    (0..count)
        .filter_map(|_| match input.u8() % 3 {
            0 => Some(RouteTarget::Pic {
                irq: input.u8() % 18,
            }),
            1 => Some(RouteTarget::IoApic {
                pin: input.below(130),
            }),
            _ => msi(input).decode().ok().map(RouteTarget::Msi),
        })
        .collect()
}

/// The `chip_sequence` target.
pub fn run(data: &[u8]) -> Stats {
    let mut input = Input::new(data);
    let mut sim = Sim::new(config_from(&mut input));
    while !input.is_empty() && (sim.stats.steps as usize) < MAX_STEPS {
        sim.step(&mut input);
    }
    // Finally every vCPU drains and runs once more: nothing expected may be missing.
    for i in 0..sim.cpus() {
        sim.run(i, 300);
    }
    sim.stats
}

/// Runs `data` as `chip_sequence` does and saves the machine at the end: seeds for
/// `snapshot_restore` (examples/snapshot_seeds.rs).
pub fn final_snapshot(data: &[u8]) -> ChipSnapshot {
    let mut input = Input::new(data);
    let mut sim = Sim::new(config_from(&mut input));
    while !input.is_empty() && (sim.stats.steps as usize) < MAX_STEPS {
        sim.step(&mut input);
    }
    sim.save()
}
