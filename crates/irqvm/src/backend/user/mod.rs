//! The `user` irqchip backend: every interrupt controller in userspace, from the pure `irqchip`
//! crate. KVM gets no irqchip at all (no KVM_CREATE_IRQCHIP); the VMM sees the guest's APIC
//! accesses as exits and injects interrupts through `kvm_run`'s synced events (KVM_INTERRUPT
//! where those are stale) and NMIs with KVM_NMI.
//!
//! VM-wide ([`UserIrqchip`]):
//! * KVM_CAP_X86_USER_SPACE_MSR with reasons INVAL (x2APIC MSRs 0x800-0x8FF, which no filter can
//!   catch) and FILTER, and an MSR filter denying IA32_TSC_DEADLINE (0x6E0) and writes of
//!   IA32_APIC_BASE (0x1B) and MSR_KVM_PV_EOI_EN (`pv_eoi`), so they exit to the LAPIC model
//!   instead of being absorbed by KVM (KVM's copies, kept equal to the model's, answer the
//!   reads of the latter two).
//! * an [`irqchip::chip::PcIrqChip`] (IOAPIC, PIC, GSI routing, APIC bus with one inbox per
//!   vCPU) wrapped in `platform::Platform`. No timer thread: each vCPU's APIC timer is a POSIX
//!   timer of its own thread (`apic_timer`).
//! * the VM clock ([`VmClock`]): `Nanos` since the VM's epoch, counted on the host TSC at the
//!   guest TSC's frequency where the host keeps time with an invariant TSC, else on
//!   CLOCK_MONOTONIC. The guest TSC is tied to it: each vCPU's IA32_TSC is written at creation
//!   to `tsc_hz * (now - epoch)`, so TSC-deadline compares against
//!   `ClockConfig { tsc_hz, tsc_at_zero: 0 }` (or, where KVM ignores the write, against the
//!   origin measured at the epoch); `tsc_hz` is KVM_GET_TSC_KHZ of a probe vCPU (the frequency
//!   KVM gives guests by default).
//!
//! Per vCPU (`percpu::UserVcpuChip`): see the `percpu` submodule: publish, drain, accept INIT/SIPI,
//! poll the timer, block or inject, with CR8 kept in step with the TPR.
//!
//! With `--protected-state-aps` ([`crate::backend::ProtectedStateAps`], seed 004 emulated): each
//! AP gets its launch state at creation and no register write after that (INIT resets only the
//! LAPIC, the first SIPI runs the launch state, later SIPIs end an AP Reset Hold); the filter also
//! denies the GHCB MSR 0xC0010130, whose WRMSR of the AP Reset Hold request parks the AP and
//! whose value irqvm keeps (`ghcb`). Without the option that MSR is not filtered and a guest
//! access takes #GP, as before (KVM does not know it without SEV-ES).

mod apic_timer;
mod counters;
mod futex;
mod ghcb;
mod notify;
mod percpu;
mod platform;
mod pv_eoi;
mod reset;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};

use irqchip::chip::{PcIrqChip, PcIrqChipConfig};
use irqchip::msi::MsiMessage;
use irqchip::vcpu::VcpuInterrupts;
use irqchip::{ClockConfig, Nanos};

use crate::api::model::PlatformInfo;
use crate::backend::{
    ChipContext, ChipFeatures, HostEvent, InterruptLines, Irqchip, IrqchipError, IrqchipMode,
    MsiDelivery, PlatformFabric, ProtectedStateAps, VcpuIrqchip, IRQ_LINES,
};
use crate::kvm::{require_cap, KvmError};
use irqchip::{ApicEvents, InterruptSink};

pub use ghcb::{AP_RESET_HOLD_RELEASED, MSR_GHCB};
pub use platform::{IOAPIC_BASE, IOAPIC_SIZE};
pub use pv_eoi::MSR_KVM_PV_EOI_EN;

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// IA32_TIME_STAMP_COUNTER.
const MSR_TSC: u32 = 0x10;
/// The x2APIC register MSRs (SDM vol. 3 §11.12.1.2).
pub const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8FF;

/// True for the MSRs the local APIC model owns.
pub fn is_apic_msr(index: u32) -> bool {
    index == MSR_APIC_BASE || index == MSR_TSC_DEADLINE || X2APIC_MSRS.contains(&index)
}

/// The VM clock: `Nanos` since the VM's epoch, counted on the host TSC at the guest TSC's
/// frequency where the host keeps time with an invariant TSC ([`Self::for_host`]), else on
/// CLOCK_MONOTONIC.
///
/// Why the TSC: the guest TSC runs on the host TSC (KVM without TSC scaling adds an offset;
/// kvm_pvm runs guests on it), and the model converts a TSC deadline to VM time with the
/// frequency KVM reports (KVM_GET_TSC_KHZ, whole kHz). Counted on CLOCK_MONOTONIC, VM time and
/// the guest TSC part by the difference between that frequency and the TSC's true rate against
/// CLOCK_MONOTONIC (kHz rounding, NTP's frequency corrections): 0.04 ppm on the AMD host, so
/// after a day a deadline would fire 3.4 ms before the guest's TSC reaches it (SDM vol. 3
/// §11.5.4.1: never before). Counted in host TSC ticks at that same frequency, VM time and the
/// guest TSC cannot part.
///
/// Every copy of a clock computes the same function of the host TSC (or of CLOCK_MONOTONIC), so
/// the vCPUs share one VM time. It never goes back on one thread; across threads it is as
/// monotonic as the host's own clock (the kernel picks the TSC as clocksource only once it found
/// it in step on every CPU). A vCPU's APIC timer does not rely on that for its wake-ups: a POSIX
/// timer that fires before VM time reaches the deadline is armed again (`apic_timer`).
#[derive(Clone, Copy, Debug)]
pub struct VmClock {
    epoch: Instant,
    tsc: Option<TscTime>,
}

/// VM time from the host TSC: the TSC at the epoch and the ticks per second VM time counts.
#[derive(Clone, Copy, Debug)]
struct TscTime {
    at_epoch: u64,
    hz: u64,
}

impl VmClock {
    /// VM time on CLOCK_MONOTONIC.
    pub fn new(epoch: Instant) -> Self {
        Self { epoch, tsc: None }
    }

    /// VM time on the host TSC at `hz` ticks per second where the host's TSC is invariant and
    /// its clocksource (its kernel found the TSC stable and in step on every CPU), else on
    /// CLOCK_MONOTONIC.
    pub fn for_host(epoch: Instant, hz: u64) -> Self {
        if hz == 0 || !host_keeps_time_with_tsc() {
            return Self::new(epoch);
        }
        Self::on_tsc(epoch, hz)
    }

    /// VM time on the host TSC at `hz` (non-zero) ticks per second, VM time now being the time
    /// since `epoch`.
    fn on_tsc(epoch: Instant, hz: u64) -> Self {
        let since = Self::new(epoch).now();
        let at_epoch = host_tsc().saturating_sub(tsc_ticks(since, hz));
        Self {
            epoch,
            tsc: Some(TscTime { at_epoch, hz }),
        }
    }

    /// True if VM time is counted on the host TSC.
    pub fn on_host_tsc(&self) -> bool {
        self.tsc.is_some()
    }

    pub fn now(&self) -> Nanos {
        match self.tsc {
            // Saturating: a CPU whose TSC lagged the one that read `at_epoch` reads 0, not 2^64.
            Some(t) => nanos_of_ticks(host_tsc().saturating_sub(t.at_epoch), t.hz),
            None => u64::try_from(
                Instant::now()
                    .saturating_duration_since(self.epoch)
                    .as_nanos(),
            )
            .unwrap_or(u64::MAX),
        }
    }

    /// The host instant at which VM time reaches `n`, for a sleep that ends then (the halt
    /// poll's deadline). On the TSC it is reckoned from now (the two clocks part by parts per
    /// million, nothing over one sleep); a time already reached is now.
    pub fn to_instant(&self, n: Nanos) -> Instant {
        if self.tsc.is_some() {
            let now = Instant::now();
            let ahead = Duration::from_nanos(n.saturating_sub(self.now()));
            return now
                .checked_add(ahead)
                .unwrap_or_else(|| now + Duration::from_secs(1 << 32));
        }
        self.epoch
            .checked_add(Duration::from_nanos(n))
            .unwrap_or_else(|| self.epoch + Duration::from_secs(1 << 32))
    }
}

/// The host's TSC, read after every earlier instruction has executed (LFENCE, as the kernel's
/// `rdtsc_ordered`), so a read that follows a wake-up is not taken before it. Needs no privilege:
/// CR4.TSD is clear for Linux processes.
fn host_tsc() -> u64 {
    use core::arch::x86_64::{_mm_lfence, _rdtsc};
    // SAFETY: LFENCE and RDTSC have no memory effects and no operands; every x86-64 CPU has both
    // (SSE2 is part of x86-64).
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}

/// True if the host's TSC is invariant (CPUID.80000007H:EDX[8]: constant rate in every P-, C-
/// and T-state) and the kernel's current clocksource. Where KVM gives the guest the host's TSC
/// frequency (irqvm never sets another), the guest TSC then counts exactly the host's ticks.
fn host_keeps_time_with_tsc() -> bool {
    use core::arch::x86_64::__cpuid;
    const INVARIANT_TSC: u32 = 1 << 8;
    let max_extended = __cpuid(0x8000_0000).eax;
    let invariant = max_extended >= 0x8000_0007 && __cpuid(0x8000_0007).edx & INVARIANT_TSC != 0;
    invariant
        && std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|name| name.trim() == "tsc")
}

/// `ticks` of a `hz` counter in ns (saturating).
fn nanos_of_ticks(ticks: u64, hz: u64) -> Nanos {
    u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(hz)).unwrap_or(u64::MAX)
}

/// What every vCPU half shares.
pub(crate) struct Shared {
    pub clock: VmClock,
    /// The MSRs INIT clears that this KVM knows (`reset::init_cleared_msrs`).
    pub init_msrs: Vec<reset::InitClearedMsr>,
    tsc: TscProbe,
    pub platform: platform::Platform,
    pub notifier: Arc<notify::Notifier>,
    /// Index = vCPU; each written only by its vCPU's thread.
    pub counters: Vec<counters::VcpuCounters>,
    /// `--protected-state-aps`: APs' registers are off limits after launch.
    pub protected_state_aps: Option<ProtectedStateAps>,
    /// The flight recorder and latency histograms (`crate::trace`).
    pub tracer: Arc<crate::trace::Tracer>,
    /// Guest RAM, for reading the instruction at RIP before each single-step.
    pub memory: crate::memory::GuestRam,
    /// `VmConfig::exact_irq_boundaries`.
    pub exact_irq_boundaries: bool,
    /// The guest may count instructions with a virtual PMU ([`guest_may_have_pmu`]): irqvm then
    /// never runs guest instructions itself (`backend::epilogue`), which the counters would miss.
    pub guest_pmu: bool,
    /// KVM_CAP_SYNC_REGS has KVM_SYNC_X86_EVENTS: interrupts go in through `kvm_run`'s synced
    /// events instead of a KVM_INTERRUPT ioctl (`percpu::UserVcpuChip::queue_interrupt`).
    pub sync_events: bool,
    /// KVM_CAP_SYNC_REGS has KVM_SYNC_X86_REGS and KVM_SYNC_X86_SREGS: a SIPI's CS and RIP go in
    /// through `kvm_run`'s synced registers instead of two ioctls (`reset::stage_sipi`), and
    /// while it single-steps a vCPU reads its registers from `kvm_run` instead of two ioctls per
    /// step (`percpu::UserVcpuChip::offer_synced_regs`).
    pub sync_regs: bool,
}

/// The VM-wide half of the `user` backend.
pub struct UserIrqchip {
    shared: Arc<Shared>,
    features: ChipFeatures,
    /// The per-vCPU halves not yet handed to their vCPUs.
    unclaimed: Mutex<Vec<Option<VcpuInterrupts>>>,
}

impl UserIrqchip {
    pub fn new(ctx: ChipContext<'_>) -> Result<Self, IrqchipError> {
        enable_msr_exits(ctx.kvm, &ctx.vm, ctx.protected_state_aps.is_some())?;
        let (tsc, vm_clock) = probe_tsc(ctx.kvm, ctx.epoch)?;
        tracing::debug!(
            hz = tsc.hz,
            writable = tsc.writable,
            at_zero = tsc.at_zero,
            on_host_tsc = vm_clock.on_host_tsc(),
            "guest TSC"
        );
        let clock = ClockConfig {
            tsc_hz: tsc.hz,
            tsc_at_zero: tsc.at_zero,
            ..ClockConfig::default()
        };
        let mut config = PcIrqChipConfig::new(ctx.kicker.vcpus());
        config.apic.clock = clock;
        config.apic.x2apic = ctx.cpu.x2apic;
        // As KVM (`kvm_apic_set_version`): version bit 24 only with x2APIC in CPUID, with the
        // IOAPIC outside KVM (irqvm's has the EOI register that directed EOI needs).
        config.apic.directed_eoi = ctx.cpu.x2apic;
        config.apic.apic_ids = ctx.cpu.layout;
        config.extended_destination_id = ctx.cpu.ext_dest_id;
        // No vCPU enters SMM here (that would take KVM_SMI and INIT held while in SMM): no local
        // APIC accepts an SMI, as KVM's refuses one where KVM has no SMM (kvm_pvm: none).
        config.apic.smm = false;
        // The guest's CPUID is derived from this table with leaf 80000008H unchanged.
        config.apic.max_phys_addr =
            crate::cpuid::max_phys_addr(&crate::cpuid::supported_cpuid(ctx.kvm)?);
        // One futex word per 32 vCPUs, shared by their inboxes' doorbells (`notify`).
        let bells = Arc::new(notify::Doorbells::new(
            ctx.kicker.vcpus(),
            futex::Futex::default(),
        ));
        let (chip, vcpus) = PcIrqChip::with_bells(config, |index| {
            Box::new(irqchip::wake::SharedBell::new(bells.clone(), index))
        });
        let bus = chip.bus().clone();
        bus.set_observer(Arc::new(crate::trace::BusObserver(ctx.tracer.clone())));
        let notifier = Arc::new(notify::Notifier::new(
            ctx.kicker.clone(),
            bells,
            ctx.tracer.clone(),
        ));
        let msr_index = ctx
            .kvm
            .get_msr_index_list()
            .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let shared = Arc::new(Shared {
            clock: vm_clock,
            init_msrs: reset::init_cleared_msrs(msr_index.as_slice()),
            tsc,
            platform: platform::Platform::new(chip, notifier.clone(), ctx.tracer.clone()),
            notifier,
            counters: (0..ctx.kicker.vcpus())
                .map(|_| counters::VcpuCounters::default())
                .collect(),
            protected_state_aps: ctx.protected_state_aps,
            tracer: ctx.tracer,
            memory: ctx.memory.clone(),
            exact_irq_boundaries: ctx.exact_irq_boundaries,
            guest_pmu: guest_may_have_pmu(ctx.kvm),
            sync_events: sync_fields(ctx.kvm) & kvm_bindings::KVM_SYNC_X86_EVENTS != 0,
            sync_regs: sync_fields(ctx.kvm) & SYNC_REGS_AND_SREGS == SYNC_REGS_AND_SREGS,
        });
        Ok(Self {
            shared,
            features: (&ctx.cpu).into(),
            unclaimed: Mutex::new(vcpus.into_iter().map(Some).collect()),
        })
    }
}

/// The registers and system registers KVM can copy into `kvm_run` at every KVM_RUN return.
const SYNC_REGS_AND_SREGS: u32 = kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS;

/// What KVM_CAP_SYNC_REGS lists (this host: 7, registers, system registers and events; 0 where
/// KVM lacks the capability).
/// True unless this host's KVM offers guests no performance counters: KVM_CAP_PMU_CAPABILITY
/// reads 0 only where KVM's `enable_pmu` is off (or the kernel predates the capability, Linux
/// 5.18), and CPUID leaf 0AH (the architectural PMU, which irqvm passes through) has version 0.
/// KVM counts the instructions its own emulator runs for the guest's counters
/// (`kvm_pmu_instruction_retired`); the instructions `backend::epilogue` runs in irqvm would be
/// missing from them, so where a PMU may be there irqvm leaves every instruction to the guest.
fn guest_may_have_pmu(kvm: &Kvm) -> bool {
    const KVM_CAP_PMU_CAPABILITY: libc::c_ulong = 225;
    let arch_pmu = crate::cpuid::supported_cpuid(kvm)
        .map(|c| {
            c.as_slice()
                .iter()
                .any(|e| e.function == 0xA && e.eax & 0xFF != 0)
        })
        .unwrap_or(true);
    kvm.check_extension_raw(KVM_CAP_PMU_CAPABILITY) != 0 || arch_pmu
}

fn sync_fields(kvm: &Kvm) -> u32 {
    u32::try_from(kvm.check_extension_int(Cap::SyncRegs)).unwrap_or(0)
}

/// KVM_CAP_X86_USER_SPACE_MSR (INVAL | FILTER) and the filter that sends 0x1B writes, 0x6E0 and
/// MSR_KVM_PV_EOI_EN writes (`pv_eoi`: KVM's copy answers the reads) out, and with `ghcb`
/// (`--protected-state-aps`) the GHCB MSR too.
///
/// RDMSR of IA32_APIC_BASE stays in KVM: its copy is the model's value whenever the guest runs
/// (`percpu::sync_kvm_apic_base` after every exit, with KVM_SET_MSRS or the synced system
/// registers of the next KVM_RUN; the register writes of INIT and restore carry it), and an AP's start-up reads it first thing, so a read exit would cost every AP
/// one userspace round trip (issue 13, docs/benchmarks.md "AP bring-up").
fn enable_msr_exits(kvm: &Kvm, vm: &VmFd, ghcb: bool) -> Result<(), KvmError> {
    require_cap(kvm, Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR")?;
    require_cap(kvm, Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER")?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap)
        .map_err(KvmError::ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A 0 bit denies: one single-MSR range per MSR the LAPIC model owns.
    let deny = [0u8];
    let denied: &[u32] = if ghcb {
        &[MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_KVM_PV_EOI_EN, MSR_GHCB]
    } else {
        &[MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_KVM_PV_EOI_EN]
    };
    // And the writes the SYSCALL watch applies itself (emulate::syscall), on hosts that need it.
    let watched = crate::emulate::syscall::watched_msr_writes();
    let ranges: Vec<MsrFilterRange<'_>> = denied
        .iter()
        .chain(watched)
        .map(|&base| MsrFilterRange {
            flags: if base == MSR_APIC_BASE || base == MSR_KVM_PV_EOI_EN || watched.contains(&base)
            {
                MsrFilterRangeFlags::WRITE
            } else {
                MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE
            },
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(KvmError::ioctl("KVM_X86_SET_MSR_FILTER"))?;
    Ok(())
}

/// The guest TSC as the VM clock sees it, learnt from a throw-away VM's vCPU (the real VM has no
/// vCPU yet when the APIC system is built): its frequency (KVM_GET_TSC_KHZ) and whether KVM
/// honours host writes of IA32_TSC. Where it does, every vCPU's TSC is written at creation to
/// `tsc_hz * (now - epoch)` (`tsc_at_zero` = 0). Where it does not (kvm_pvm runs guests on the
/// host TSC and ignores the write), `tsc_at_zero` is the guest TSC measured at the epoch.
struct TscProbe {
    hz: u64,
    writable: bool,
    at_zero: u64,
}

/// Also builds the VM clock, counted at the guest TSC's frequency ([`VmClock::for_host`]).
fn probe_tsc(kvm: &Kvm, epoch: Instant) -> Result<(TscProbe, VmClock), KvmError> {
    let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
    let khz = vcpu
        .get_tsc_khz()
        .map_err(KvmError::ioctl("KVM_GET_TSC_KHZ"))?;
    let hz = u64::from(khz) * 1000;
    let clock = VmClock::for_host(epoch, hz);
    // Write a value far from anything the TSC could hold by itself, read it back.
    const MARKER: u64 = 1 << 20;
    write_tsc(&vcpu, MARKER)?;
    let back = read_tsc(&vcpu)?;
    let writable = back.wrapping_sub(MARKER) < hz; // within one second of the write
    let at_zero = if writable {
        0
    } else {
        tsc_origin(|| clock.now(), || read_tsc(&vcpu), hz)?
    };
    let probe = TscProbe {
        hz,
        writable,
        at_zero,
    };
    Ok((probe, clock))
}

/// Readings of the guest TSC against the VM clock; the one with the narrowest bracket is used.
const TSC_ORIGIN_SAMPLES: usize = 4;

/// The guest TSC at VM time 0 (`ClockConfig::tsc_at_zero`), from `read` (a KVM_GET_MSRS ioctl,
/// 7-10 µs here) bracketed by two clock reads. The TSC was read somewhere inside the bracket, so
/// the origin is computed with the clock read *after* it, the latest time it can have been read
/// at: the origin is then at most the true one, and a TSC deadline converted to VM time with it
/// fires late by at most the bracket, never early. SDM vol. 3 §11.5.4.1: the timer fires when
/// the TSC reaches the deadline, so a handler must never read a TSC below it. (With the read
/// before, the origin came out late by the ioctl's duration, and every deadline fired that much
/// early.) The narrowest of a few brackets keeps the lateness to a few µs.
fn tsc_origin<E>(
    mut now: impl FnMut() -> Nanos,
    mut read: impl FnMut() -> Result<u64, E>,
    hz: u64,
) -> Result<u64, E> {
    let mut best: Option<(Nanos, u64)> = None;
    for _ in 0..TSC_ORIGIN_SAMPLES {
        let before = now();
        let tsc = read()?;
        let after = now();
        let width = after.saturating_sub(before);
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, tsc.wrapping_sub(tsc_ticks(after, hz))));
        }
    }
    Ok(best.map_or(0, |(_, origin)| origin))
}

/// TSC ticks in `ns` nanoseconds at `hz`.
fn tsc_ticks(ns: Nanos, hz: u64) -> u64 {
    (u128::from(ns) * u128::from(hz) / 1_000_000_000) as u64
}

fn tsc_msr(value: u64) -> Result<kvm_bindings::Msrs, KvmError> {
    kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_TSC,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| KvmError::TooManyEntries {
        what: "KVM_SET_MSRS list",
        entries: 1,
    })
}

fn write_tsc(vcpu: &VcpuFd, value: u64) -> Result<(), KvmError> {
    vcpu.set_msrs(&tsc_msr(value)?)
        .map_err(KvmError::ioctl("KVM_SET_MSRS(IA32_TSC)"))?;
    Ok(())
}

fn read_tsc(vcpu: &VcpuFd) -> Result<u64, KvmError> {
    let mut msrs = tsc_msr(0)?;
    vcpu.get_msrs(&mut msrs)
        .map_err(KvmError::ioctl("KVM_GET_MSRS(IA32_TSC)"))?;
    Ok(msrs.as_slice().first().map_or(0, |e| e.data))
}

impl InterruptLines for UserIrqchip {
    fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError> {
        if line >= IRQ_LINES {
            return Err(IrqchipError::NoSuchLine(line));
        }
        self.shared.platform.set_gsi(line, level);
        Ok(())
    }

    /// Decodes the message (once: a message that does not decode is refused, as
    /// [`crate::backend::validate_msi`] refuses it in the other modes) and posts it on the APIC
    /// bus, kicking a target in guest mode and waking a blocked one (the chip's notify).
    fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError> {
        let msi = MsiMessage { address, data };
        let tracer = &self.shared.tracer;
        let source = crate::trace::Source::Msi;
        let at = crate::trace::hooks::stamp(tracer);
        let reached = crate::trace::hooks::posting_for(tracer, source, || {
            self.shared.platform.signal_msi(msi)
        })
        .map_err(|reason| IrqchipError::InvalidMsi {
            address,
            data,
            reason,
        })?;
        // The bus recorded a post per LAPIC it reached; one that reached none is recorded here.
        let decoded = || self.shared.platform.chip().decode_msi(msi).ok();
        if let Some(message) = at.filter(|_| reached == 0).and_then(|_| decoded()) {
            crate::trace::hooks::untargeted_post(tracer, at, &message, Some(source), false);
        }
        Ok(if reached > 0 {
            MsiDelivery::Delivered
        } else {
            MsiDelivery::NoTarget
        })
    }
}

impl Irqchip for UserIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::User
    }

    fn features(&self) -> ChipFeatures {
        self.features
    }

    /// Hands out vCPU `index`'s `VcpuInterrupts` and sets its TSC on the VM clock.
    fn create_vcpu_chip(
        &self,
        index: usize,
        vcpu: &VcpuFd,
    ) -> Result<Box<dyn VcpuIrqchip>, IrqchipError> {
        let interrupts = self
            .unclaimed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(index)
            .and_then(Option::take)
            .ok_or(IrqchipError::VcpuCreatedTwice(index))?;
        self.set_guest_tsc(vcpu)?;
        let signature = processor_signature(vcpu);
        // Seed 004: an AP's launch state, the last register write irqvm makes to it.
        let protected = match self.shared.protected_state_aps {
            Some(aps) if index != 0 => {
                let launch = irqchip::mpstate::SipiAction::real_mode(aps.launch_page);
                reset::apply_sipi(vcpu, &launch, None)?;
                true
            }
            _ => false,
        };
        Ok(Box::new(percpu::UserVcpuChip::new(
            interrupts,
            self.shared.clone(),
            signature,
            protected,
        )))
    }

    fn wake_vcpu(&self, index: usize) {
        self.shared.notifier.ring(index);
    }

    /// The model's PICs, IOAPIC and routing (one short hold of the chip's device locks).
    fn platform_info(&self) -> Result<PlatformInfo, IrqchipError> {
        Ok(crate::api::platform::from_devices(
            &self.shared.platform.chip().save_devices(),
        ))
    }

    /// Latches the event in vCPU `index`'s inbox, as the APIC bus does for an IPI with that
    /// delivery mode, and kicks or wakes it.
    fn send_event(&self, index: usize, event: HostEvent) -> Result<MsiDelivery, IrqchipError> {
        let inbox = self
            .shared
            .platform
            .chip()
            .bus()
            .sink(index)
            .ok_or(IrqchipError::NoSuchVcpu(index))?;
        let events = ApicEvents {
            nmi: event == HostEvent::Nmi,
            init: event == HostEvent::Init,
            sipi: match event {
                HostEvent::Sipi(vector) => Some(vector),
                _ => None,
            },
            ..ApicEvents::default()
        };
        self.shared
            .tracer
            .host_event(index, event.vector(), event.delivery_mode());
        let how = inbox.post_events(events);
        self.shared.notifier.notify(index, how);
        Ok(MsiDelivery::Delivered)
    }

    fn counters(&self, out: &mut dyn FnMut(Option<usize>, &str, u64)) {
        for (index, c) in self.shared.counters.iter().enumerate() {
            c.visit(&mut |name, value| out(Some(index), name, value));
        }
        self.shared
            .notifier
            .visit(&mut |index, name, value| out(Some(index), name, value));
        self.shared
            .notifier
            .visit_doorbells(&mut |name, value| out(None, name, value));
        self.shared
            .tracer
            .latency()
            .visit(&mut |name, value| out(None, name, value));
        let refused = self.shared.platform.chip().bus().dropped_smis();
        out(None, "smis_refused", refused);
    }

    /// The model's PICs, IOAPIC and routing, and the bus's round-robin position.
    fn save_platform(&self) -> Result<PlatformFabric, IrqchipError> {
        let chip = self.shared.platform.chip();
        Ok(PlatformFabric {
            devices: chip.save_devices(),
            lowest_priority_turn: chip.bus().lowest_priority_turn(),
        })
    }

    fn restore_platform(&self, platform: &PlatformFabric) -> Result<(), IrqchipError> {
        let chip = self.shared.platform.chip();
        chip.restore_device_state(&platform.devices)?;
        chip.bus()
            .set_lowest_priority_turn(platform.lowest_priority_turn);
        Ok(())
    }
}

impl UserIrqchip {
    /// IA32_TSC = tsc_hz * (now - epoch): the relation `ClockConfig` assumes (see
    /// [`TscProbe`]). KVM matches later vCPUs' writes to the first one's offset, so all vCPUs
    /// share one TSC.
    fn set_guest_tsc(&self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        let tsc = &self.shared.tsc;
        if tsc.writable {
            write_tsc(vcpu, tsc_ticks(self.shared.clock.now(), tsc.hz))?;
        }
        Ok(())
    }

    /// The PC interrupt chip (IOAPIC, PIC, routing, APIC bus), for tests and measurements.
    pub fn pc_chip(&self) -> &PcIrqChip {
        self.shared.platform.chip()
    }
}

/// CPUID.1:EAX of the vCPU (the RDX value after INIT), or the crate's default.
fn processor_signature(vcpu: &VcpuFd) -> u32 {
    vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|cpuid| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == 1)
                .map(|e| e.eax)
        })
        .unwrap_or(irqchip::mpstate::DEFAULT_PROCESSOR_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::lapic::timer::{ApicTimer, TimerMode};
    use std::cell::Cell;

    const HZ: u64 = 2_596_000_000;
    /// The guest TSC at VM time 0 on the fake host.
    const TRUE_ORIGIN: u64 = 0x1234_5678_9ABC;

    /// A fake host: a VM clock that advances `step` ns per read, and a TSC read (an ioctl of
    /// `ioctl` ns) whose value is taken `inside` ns into the ioctl.
    struct FakeHost {
        now: Cell<Nanos>,
        step: Nanos,
        ioctl: Nanos,
        inside: Nanos,
    }

    impl FakeHost {
        fn clock(&self) -> Nanos {
            let t = self.now.get();
            self.now.set(t + self.step);
            t
        }

        fn read_tsc(&self) -> Result<u64, ()> {
            let read_at = self.now.get() + self.inside;
            self.now.set(self.now.get() + self.ioctl);
            Ok(TRUE_ORIGIN + tsc_ticks(read_at, HZ))
        }

        fn origin(&self) -> u64 {
            tsc_origin(|| self.clock(), || self.read_tsc(), HZ).unwrap()
        }
    }

    /// When the model fires a TSC deadline `deadline` (VM ns), with the origin `origin`.
    fn model_fires_at(origin: u64, deadline: u64) -> Nanos {
        let mut timer = ApicTimer::new(ClockConfig {
            tsc_hz: HZ,
            tsc_at_zero: origin,
            ..ClockConfig::default()
        });
        timer.set_mode(TimerMode::TscDeadline, 0);
        timer.write_tsc_deadline(deadline, 0);
        timer.next_deadline().unwrap()
    }

    /// The first VM ns at which the fake host's real TSC has reached `deadline`.
    fn tsc_reaches(deadline: u64) -> Nanos {
        let ticks = u128::from(deadline - TRUE_ORIGIN);
        (ticks * 1_000_000_000).div_ceil(u128::from(HZ)) as Nanos
    }

    /// SDM vol. 3 §11.5.4.1: a TSC deadline fires when the TSC reaches it, never before. With
    /// the origin measured by `tsc_origin`, the model's expiry is never before the moment the
    /// guest's real TSC reaches the deadline, wherever inside the ioctl the TSC was read, and
    /// late by no more than the bracket. An origin computed from the clock read before the
    /// ioctl (the old probe) fires early by up to the ioctl's duration.
    #[test]
    fn tsc_deadline_never_fires_before_the_guest_tsc_reaches_it() {
        for inside in [0, 1, 2_500, 9_999] {
            let host = FakeHost {
                now: Cell::new(5_000_000),
                step: 30,
                ioctl: 10_000,
                inside,
            };
            let origin = host.origin();
            assert!(
                origin <= TRUE_ORIGIN,
                "origin {origin:#x} after the true one"
            );
            let late = TRUE_ORIGIN - origin;
            assert!(
                late <= tsc_ticks(10_000 + 30, HZ) + 1,
                "late by {late} ticks"
            );
            for offset_ns in [0u64, 1, 17, 1_000, 50_000, 3_000_000_000] {
                let deadline = TRUE_ORIGIN + tsc_ticks(7_000_000 + offset_ns, HZ) + 3;
                let fires = model_fires_at(origin, deadline);
                assert!(
                    fires >= tsc_reaches(deadline),
                    "inside {inside}: fires at {fires} ns, the TSC reaches it at {}",
                    tsc_reaches(deadline)
                );
            }
        }
        // The old order (clock, then TSC) with the TSC read at the end of a 10 µs ioctl.
        let host = FakeHost {
            now: Cell::new(5_000_000),
            step: 30,
            ioctl: 10_000,
            inside: 9_999,
        };
        let before = host.clock();
        let old_origin = host.read_tsc().unwrap() - tsc_ticks(before, HZ);
        let deadline = TRUE_ORIGIN + tsc_ticks(7_000_000, HZ);
        let early = tsc_reaches(deadline) - model_fires_at(old_origin, deadline);
        assert!(early > 9_000, "the old probe fired {early} ns early");
    }

    /// The narrowest of the brackets is used: one slow read among fast ones does not widen the
    /// error.
    #[test]
    fn tsc_origin_uses_the_narrowest_bracket() {
        let calls = Cell::new(0u64);
        let now = Cell::new(1_000_000u64);
        let clock = || {
            let t = now.get();
            now.set(t + 10);
            t
        };
        let read = || -> Result<u64, ()> {
            let n = calls.get();
            calls.set(n + 1);
            // The first read takes 1 ms and reads the TSC at its start; the others 2 µs.
            let (len, at) = if n == 0 {
                (1_000_000, 0)
            } else {
                (2_000, 1_000)
            };
            let read_at = now.get() + at;
            now.set(now.get() + len);
            Ok(TRUE_ORIGIN + tsc_ticks(read_at, HZ))
        };
        let origin = tsc_origin(clock, read, HZ).unwrap();
        assert!(origin <= TRUE_ORIGIN);
        assert!(TRUE_ORIGIN - origin <= tsc_ticks(1_020, HZ) + 1);
        assert_eq!(calls.get(), TSC_ORIGIN_SAMPLES as u64);
    }

    /// Whole VM clock conversions: ticks at `hz` to ns, and back through the model's TSC
    /// deadline. VM time counted on the TSC reaches the model's time for a deadline exactly when
    /// the ticks reach the deadline (to the ns): not one tick before, however long the VM ran.
    #[test]
    fn vm_time_on_tsc_ticks_reaches_a_tsc_deadline_only_with_the_ticks() {
        let hz = 2_596_094_000;
        assert_eq!(nanos_of_ticks(hz, hz), 1_000_000_000);
        assert_eq!(nanos_of_ticks(hz * 86_400, hz), 86_400_000_000_000);
        assert_eq!(nanos_of_ticks(u64::MAX, 1), u64::MAX, "saturates");
        for deadline in [
            1,
            2,
            3,
            hz - 1,
            hz,
            hz * 86_400 + 12_345,
            hz * 86_400 * 365 + 7,
        ] {
            let fires = model_fires_at_hz(0, deadline, hz);
            assert!(
                nanos_of_ticks(deadline - 1, hz) < fires,
                "deadline {deadline}: due a tick early"
            );
            // Due within the ns the clock counts in (3 ticks at 2.6 GHz).
            assert!(
                nanos_of_ticks(deadline + 3, hz) >= fires,
                "deadline {deadline}"
            );
            assert!(tsc_ticks(nanos_of_ticks(deadline, hz), hz) <= deadline);
        }
    }

    /// VM time on the TSC starts at the time since the epoch, never goes back on a thread, and
    /// a sleep until a VM time is reckoned from now: a time already reached is now, one a second
    /// ahead at most a second from now. (`hz` need not be the TSC's true rate for these.)
    #[test]
    fn vm_time_on_the_tsc_counts_from_the_epoch_and_converts_for_sleeping() {
        let hz = 2_000_000_000;
        let epoch = Instant::now() - Duration::from_millis(500);
        let clock = VmClock::on_tsc(epoch, hz);
        assert!(clock.on_host_tsc());
        let first = clock.now();
        assert!(
            first >= 499_999_999,
            "VM time {first} ns, 500 ms after the epoch"
        );
        let mut last = first;
        for _ in 0..100_000 {
            let now = clock.now();
            assert!(now >= last, "VM time went back from {last} to {now}");
            last = now;
        }
        let now = clock.now();
        assert!(clock.to_instant(now.saturating_sub(1_000_000)) <= Instant::now());
        let before = Instant::now();
        let wake = clock.to_instant(clock.now() + 1_000_000_000);
        let after = Instant::now();
        assert!(wake >= before && wake <= after + Duration::from_secs(1));
    }

    /// On CLOCK_MONOTONIC (where the host does not keep time with an invariant TSC) VM time is
    /// the time since the epoch, and converts to the instant that far from it.
    #[test]
    fn vm_time_on_clock_monotonic_is_the_time_since_the_epoch() {
        let epoch = Instant::now() - Duration::from_millis(500);
        let clock = VmClock::new(epoch);
        assert!(!clock.on_host_tsc());
        assert!(clock.now() >= 500_000_000);
        assert_eq!(clock.to_instant(7), epoch + Duration::from_nanos(7));
        assert!(
            !VmClock::for_host(epoch, 0).on_host_tsc(),
            "no frequency, no TSC"
        );
    }

    fn model_fires_at_hz(origin: u64, deadline: u64, hz: u64) -> Nanos {
        let mut timer = ApicTimer::new(ClockConfig {
            tsc_hz: hz,
            tsc_at_zero: origin,
            ..ClockConfig::default()
        });
        timer.set_mode(TimerMode::TscDeadline, 0);
        timer.write_tsc_deadline(deadline, 0);
        timer.next_deadline().unwrap()
    }
}
