//! Building and running a VM: memory, kernel, devices, irqchip backend, vCPU threads.
//!
//! ```no_run
//! use irqvm::vm::{VmConfig, Vm};
//! let cfg = VmConfig::new(std::fs::read("hello.elf").unwrap(), "hello.elf");
//! let report = Vm::new(&cfg).unwrap().run(None).unwrap();
//! std::process::exit(report.exit.exit_status());
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi::{self, AcpiConfig, AcpiError};
use crate::backend::kernel::KernelIrqchip;
use crate::backend::split::SplitIrqchip;
use crate::backend::user::UserIrqchip;
use crate::backend::{
    ChipContext, Irqchip, IrqchipError, IrqchipMode, MsiDelivery, ProtectedStateAps, VcpuKicker,
};
use crate::cpuid;
use crate::cpumodel::{CpuModel, CpuModelError, FeatureEdits, HostLimits, Topology};
use crate::devices::{DeviceConfig, Devices, SerialOutput};
use crate::iobus::BusError;
use crate::kick::install_kick_handler;
use crate::kvm::{self, KvmError};
use crate::loader::{self, BootPlatform, LoadRequest, LoadedKernel, LoaderError, Module, RawImage};
use crate::memory::{self, GuestRam, MemoryError};
use crate::seccomp::{self, Role, SeccompError, ThreadFilter};
use crate::snapshot::model::CpuModelState;
use crate::trace::Tracer;
use crate::vcpu::{
    regs, GuestExit, SnapshotContext, VcpuFailure, VcpuShared, VcpuState, VcpuStatsSnapshot,
    VcpuThread, VmControl,
};
use ::irqchip::mpstate::MpState;

/// Most vCPUs a VM may have (KVM's KVM_MAX_VCPUS; the host's KVM_CAP_MAX_VCPUS may be lower).
pub const MAX_VCPUS: u32 = crate::cpumodel::MAX_VCPUS;
/// Stack of each vCPU thread: the run loop needs little, and 1024 threads of Rust's default 2 MiB
/// would reserve 2 GiB of address space.
pub const VCPU_STACK_SIZE: usize = 256 << 10;
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 128 << 20;

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot load the kernel: {0}")]
    Loader(#[from] LoaderError),
    #[error("interrupt controller: {0}")]
    Irqchip(#[from] IrqchipError),
    #[error("vCPU count {0} is out of range: 1 to {MAX_VCPUS}")]
    BadCpuCount(u32),
    #[error(transparent)]
    CpuModel(#[from] CpuModelError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuFailure),
    #[error("cannot place a device on the I/O bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot write the ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot restore the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Everything that defines a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: Vec<u8>,
    /// The kernel's file name, first word of its command line.
    pub kernel_name: String,
    /// The arguments after the file name.
    pub cmdline: String,
    /// `--initrd`: a multiboot module (bytes, name).
    pub initrd: Option<(Vec<u8>, String)>,
    /// Load the kernel as a raw binary.
    pub raw: Option<RawImage>,
    pub cpus: u32,
    pub memory: u64,
    pub irqchip: IrqchipMode,
    pub serial: SerialOutput,
    /// Run irqvm's threads of this VM (its vCPUs) under their seccomp
    /// filters (`crate::seccomp`, docs/security.md). On by default: the filters are per thread,
    /// so a process embedding the library (a test harness) keeps its own threads unfiltered.
    pub seccomp: bool,
    /// `--protected-state-aps`: seed 004's protected-state AP boot, emulated (`user` irqchip
    /// only; the other modes refuse it). See [`ProtectedStateAps`].
    pub protected_state_aps: Option<ProtectedStateAps>,
    /// `--topology`: the package hierarchy and the APIC IDs it implies (`None`: one socket of
    /// `cpus` cores, APIC ID = vCPU index).
    pub topology: Option<Topology>,
    /// `--cpu-features`: `+name`/`-name` edits of the CPUID features (see [`crate::cpumodel`]).
    pub cpu_features: FeatureEdits,
    /// `--exact-irq-boundaries[=on|off]`: single-step a vCPU to the instruction boundary where a
    /// waiting interrupt becomes deliverable (`user` mode: every interrupt; `split`: the PIC's
    /// ExtINT; `kernel`: ignored). On by default; see `backend::step` and docs/architecture.md,
    /// "Exact interrupt boundaries", for how and what it costs.
    pub exact_irq_boundaries: bool,
    /// `--syscall-watch on|off`: on a kvm_pvm host, finish the SYSCALLs the host leaves half done
    /// with a breakpoint on the guest's page-fault handler ([`crate::emulate::syscall`]). On by
    /// default; `off` is a diagnostic that keeps irqvm out of every guest page fault, and with it
    /// 64-bit user processes' system calls do not work on kvm_pvm. No effect on other hosts.
    pub syscall_watch: bool,
}

impl VmConfig {
    /// A 1-vCPU, 128 MiB VM in `user` irqchip mode (every interrupt controller in irqvm) with
    /// serial on stdout.
    pub fn new(kernel: Vec<u8>, kernel_name: &str) -> Self {
        Self {
            kernel,
            kernel_name: kernel_name.to_string(),
            cmdline: String::new(),
            initrd: None,
            raw: None,
            cpus: 1,
            memory: DEFAULT_MEMORY,
            irqchip: IrqchipMode::default(),
            serial: SerialOutput::Stdout,
            seccomp: true,
            protected_state_aps: None,
            topology: None,
            cpu_features: FeatureEdits::default(),
            exact_irq_boundaries: true,
            syscall_watch: true,
        }
    }
}

/// A VM ready to start: every vCPU created and the boot vCPU's registers set.
pub struct Vm {
    // Drop order matters: the vCPU fds go before the VM fd and the memory (in `machine`).
    vcpus: Vec<VcpuThread>,
    /// The vCPU threads' seccomp filter, `None` without seccomp.
    vcpu_filter: Option<ThreadFilter>,
    machine: Machine,
}

/// The parts of a VM shared by its threads, kept alive until every vCPU thread is joined.
struct Machine {
    chip: Arc<dyn Irqchip>,
    tracer: Arc<Tracer>,
    devices: Arc<Devices>,
    control: Arc<VmControl>,
    shared: Vec<Arc<VcpuShared>>,
    /// What the loader did (`None` for a VM restored from a snapshot).
    loaded: Option<LoadedKernel>,
    mode: IrqchipMode,
    /// The resolved CPU model and the vCPUs' CPUID tables, for a snapshot.
    cpu_model: Arc<CpuModelState>,
    /// `VmConfig::seccomp`: threads started for this VM later (the control API's) are filtered too.
    seccomp: bool,
    // Drop order: the VM fd before the memory KVM maps.
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    memory: GuestRam,
}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Self, VmError> {
        let (kvm, model) = Self::open(cfg)?;
        let memory = memory::create_guest_memory(cfg.memory)?;
        let modules: Vec<Module<'_>> = cfg
            .initrd
            .iter()
            .map(|(data, name)| Module {
                data,
                cmdline: name.clone(),
            })
            .collect();
        let loaded = load_kernel(&memory, cfg, &model, modules)?;
        tracing::debug!(?loaded, "kernel loaded");
        Self::build(cfg, kvm, model, memory, Some(loaded))
    }

    /// KVM, and the CPU model `cfg` asks for resolved against this host (or refused), after the
    /// allocator is set up for the seccomp filters to come.
    fn open(cfg: &VmConfig) -> Result<(Kvm, CpuModel), VmError> {
        if cfg.cpus == 0 || cfg.cpus > MAX_VCPUS {
            return Err(VmError::BadCpuCount(cfg.cpus));
        }
        seccomp::prepare_allocator();
        let kvm = kvm::open_kvm()?;
        let model = CpuModel::resolve(
            cfg.cpus,
            cfg.topology,
            &cfg.cpu_features,
            cfg.irqchip,
            host_limits(&kvm),
        )?;
        Ok((kvm, model))
    }

    /// The VM around `memory`: KVM, the backend, the devices, the vCPUs (the boot vCPU's
    /// registers from `loaded`, if a kernel was loaded).
    fn build(
        cfg: &VmConfig,
        kvm: Kvm,
        model: CpuModel,
        memory: GuestRam,
        loaded: Option<LoadedKernel>,
    ) -> Result<Self, VmError> {
        let vm_fd = Arc::new(kvm::create_vm(&kvm)?);
        memory::register_guest_memory(&vm_fd, &memory)?;
        let shared: Vec<Arc<VcpuShared>> = (0..cfg.cpus as usize)
            .map(|index| Arc::new(VcpuShared::new(index)))
            .collect();
        let epoch = Instant::now();
        let tracer = Arc::new(Tracer::new(
            cfg.cpus as usize,
            epoch,
            crate::api::control::mode_name(cfg.irqchip),
        ));
        // The backend's VM-wide setup must precede KVM_CREATE_VCPU.
        let chip = create_irqchip(
            cfg.irqchip,
            ChipContext {
                kvm: &kvm,
                vm: vm_fd.clone(),
                kicker: Arc::new(VcpuKicks(shared.clone())),
                epoch,
                seccomp: cfg.seccomp,
                protected_state_aps: cfg.protected_state_aps,
                cpu: model,
                tracer: tracer.clone(),
                memory: memory.clone(),
                exact_irq_boundaries: cfg.exact_irq_boundaries,
            },
        )?;
        // `user` mode's MSR filter has the SYSCALL watch's MSRs in it already.
        if cfg.irqchip != IrqchipMode::User {
            crate::emulate::syscall::enable_msr_exits(&kvm, &vm_fd)?;
        }
        let control = Arc::new(VmControl::default());
        let devices = Arc::new(Devices::new(
            DeviceConfig {
                cpus: cfg.cpus as u16,
                ram_size: memory::ram_size(&memory),
                serial: cfg.serial.clone(),
                on_debug_exit: debug_exit_ends(control.clone()),
                on_reset: reset_ends(control.clone()),
            },
            chip.clone(),
        )?);
        let supported = cpuid::supported_cpuid(&kvm)?;
        let mut snapshot = SnapshotContext {
            msrs: crate::snapshot::cpu::snapshot_msrs(
                kvm.get_msr_index_list()
                    .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?
                    .as_slice(),
            ),
            caps: crate::snapshot::cpu::CpuCaps {
                xcrs: kvm.check_extension(kvm_ioctls::Cap::Xcrs),
                xsave: crate::snapshot::xstate::XsaveHost::probe(&kvm, &vm_fd, &supported),
            },
            lapics: Vec::new(),
        };
        let tables: Vec<kvm_bindings::CpuId> = (0..cfg.cpus as usize)
            .map(|index| cpuid::vcpu_cpuid(&supported, &model, index))
            .collect();
        let cpu_model = Arc::new(CpuModelState::new(&model, &tables));
        let mut vcpus = Vec::new();
        for ((index, vcpu_shared), table) in shared.iter().enumerate().zip(&tables) {
            let fd = vm_fd
                .create_vcpu(kvm_vcpu_id(cfg.irqchip, &model, index))
                .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(table)
                .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
            let vcpu_chip = chip.create_vcpu_chip(index, &fd)?;
            if let (0, Some(loaded)) = (index, &loaded) {
                set_boot_registers(&fd, loaded)?;
            }
            if index == 0 {
                let tsc_khz = fd
                    .get_tsc_khz()
                    .map_err(KvmError::ioctl("KVM_GET_TSC_KHZ"))?;
                snapshot.lapics = model_lapic_configs(
                    cfg.cpus,
                    &model,
                    tsc_khz,
                    cpuid::max_phys_addr(&supported),
                );
            }
            vcpus.push((fd, vcpu_chip, vcpu_shared.clone()));
        }
        let snapshot = Arc::new(snapshot);
        let vcpus = vcpus
            .into_iter()
            .map(|(fd, chip, shared)| VcpuThread {
                fd,
                chip,
                bus: devices.bus().clone(),
                shared,
                control: control.clone(),
                last_exit: Default::default(),
                tracer: tracer.clone(),
                snapshot: snapshot.clone(),
                syscall: crate::emulate::syscall::SyscallWatch::new(
                    memory.clone(),
                    cfg.syscall_watch && crate::emulate::syscall::host_needs_it(),
                ),
            })
            .collect();
        let vcpu_filter = cfg
            .seccomp
            .then(|| ThreadFilter::new(Role::Vcpu(cfg.irqchip)))
            .transpose()?;
        Ok(Self {
            vcpus,
            vcpu_filter,
            machine: Machine {
                chip,
                tracer,
                devices,
                control,
                shared,
                loaded,
                seccomp: cfg.seccomp,
                mode: cfg.irqchip,
                cpu_model,
                vm_fd,
                _kvm: kvm,
                memory,
            },
        })
    }

    /// The VM's flight recorder: start it here to record from the first instruction.
    pub fn tracer(&self) -> &Arc<Tracer> {
        &self.machine.tracer
    }

    /// A VM of `snapshot`'s shape in irqchip mode `cfg.irqchip` (any, whatever the snapshot's
    /// source mode), its RAM a private mapping of the snapshot's memory file, with the
    /// snapshot's state applied; not started. `cfg`'s kernel, CPU count and memory are not
    /// used; its `topology` and `cpu_features`, if given, must agree with the snapshot's CPU
    /// model, which the VM is built with (`snapshot::model`). Everything is checked before
    /// anything is applied (the CPUID tables against the saved ones, then
    /// `snapshot::restore::check`); then each vCPU in KVM's order: SREGS, REGS, XCRS, the XSAVE
    /// area (or FPU), the local APIC, the MSRs (IA32_TSC first, IA32_TSC_DEADLINE last), debug
    /// registers, events, MP state; then the platform (PICs, IOAPIC, routing), the devices and
    /// kvmclock.
    pub fn restore(
        snapshot: &crate::snapshot::LoadedSnapshot,
        cfg: &VmConfig,
    ) -> Result<Self, VmError> {
        let size = snapshot.state.header.memory_size;
        let memory = crate::snapshot::memory::map_private(&snapshot.memory, size)?;
        Self::restore_with_memory(&snapshot.state, memory, cfg)
    }

    /// [`Vm::restore`] of `state` with `memory` as the guest's RAM (of the state's size, as
    /// `snapshot::format::load` checks a memory file's): live migration's target fills an
    /// anonymous mapping from the stream (`crate::migrate`).
    pub fn restore_with_memory(
        state: &crate::snapshot::SnapshotState,
        memory: GuestRam,
        cfg: &VmConfig,
    ) -> Result<Self, VmError> {
        let saved_model = &state.cpu_model;
        let cfg = restore_config(state, cfg)?;
        let (kvm, model) = Self::open(&cfg)?;
        // The extended destination ID is a property of the target's platform (offered in
        // `user` and `split`, never in `kernel`: docs/architecture.md, "Snapshots"), not state;
        // but the guest keeps the CPUID bit it saw (`CpuModelState::kernel_ext_dest_id`).
        let platform_ext_dest_id = model.ext_dest_id;
        let model = saved_model
            .kernel_ext_dest_id(model)
            .map_err(crate::snapshot::SnapshotError::from)?;
        let mut state = state.clone();
        state.chip.devices.ioapic = state
            .chip
            .devices
            .ioapic
            .clone()
            .with_extended_destination_id(platform_ext_dest_id);
        let redeliver = crate::snapshot::restore::settle_held_level_eois(&mut state);
        let state = &state;
        let mut vm = Self::build(&cfg, kvm, model, memory, None)?;
        saved_model
            .check_cpuid(&vm.machine.cpu_model)
            .map_err(crate::snapshot::SnapshotError::from)?;
        let Some(ctx) = vm.vcpus.first().map(|v| v.snapshot.clone()) else {
            return Err(VmError::BadCpuCount(0));
        };
        crate::snapshot::restore::check(
            state,
            cfg.irqchip,
            &ctx.lapics,
            platform_ext_dest_id,
            ctx.caps,
        )?;
        for (vcpu, (cpu, part)) in vm
            .vcpus
            .iter_mut()
            .zip(state.vcpus.iter().zip(&state.chip.vcpus))
        {
            crate::snapshot::restore::apply_vcpu(
                &mut vcpu.fd,
                vcpu.chip.as_mut(),
                cpu,
                part,
                ctx.caps,
            )?;
        }
        crate::snapshot::restore::apply_vm(
            state,
            vm.machine.chip.as_ref(),
            &vm.machine.devices,
            &vm.machine.vm_fd,
        )?;
        // KVM_SET_IRQCHIP re-delivered the still-asserted lines in `kernel` mode; the model's
        // IOAPIC (`user`, `split`) delivers what the settled EOIs would have sent.
        if cfg.irqchip != IrqchipMode::Kernel {
            for message in &redeliver {
                let msi = ::irqchip::msi::MsiMessage::encode(message).map_err(|e| {
                    VmError::Snapshot(crate::snapshot::SnapshotError::Shape(format!(
                        "an IOAPIC entry's message cannot be sent as an MSI: {e}"
                    )))
                })?;
                vm.machine.chip.signal_msi(msi.address, msi.data)?;
            }
        }
        Ok(vm)
    }

    /// The stats fds of this VM's VM fd and vCPU fds (`--kvm-stats`), taken before the vCPUs
    /// run: a vCPU ioctl waits for KVM_RUN to end.
    pub fn kvm_stats(&self) -> Result<crate::kvm_stats::KvmStats, crate::kvm_stats::KvmStatsError> {
        crate::kvm_stats::KvmStats::open(
            self.machine.vm_fd.as_ref(),
            self.vcpus.iter().map(|v| &v.fd),
        )
    }

    /// What the loader did (`None` for a restored VM).
    pub fn loaded_kernel(&self) -> Option<&LoadedKernel> {
        self.machine.loaded.as_ref()
    }

    pub fn memory(&self) -> &GuestRam {
        &self.machine.memory
    }

    /// Starts one thread per vCPU, held paused (until `vm.resume`) if `paused`.
    pub fn start_paused(self, paused: bool) -> Result<RunningVm, VmError> {
        if paused {
            self.machine.control.pause();
        }
        self.start()
    }

    /// Starts one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        install_kick_handler().map_err(VmError::Signal)?;
        crate::flush_signal::install_flush_handler().map_err(VmError::Signal)?;
        let started = Instant::now();
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let name = format!("vcpu{}", vcpu.shared.index);
            // Each thread installs its filter before it runs anything of the VM.
            let filter = self.vcpu_filter.clone();
            match seccomp::spawn_sized(name, filter, Some(VCPU_STACK_SIZE), move || vcpu.run()) {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Dropping the RunningVm stops and joins the threads already started.
                    drop(RunningVm::new(self.machine, threads, started));
                    return Err(match e {
                        SeccompError::Spawn { source, .. } => VmError::Spawn(source),
                        other => VmError::Seccomp(other),
                    });
                }
            }
        }
        Ok(RunningVm::new(self.machine, threads, started))
    }

    /// Runs the VM to completion, or until `timeout`.
    pub fn run(self, timeout: Option<Duration>) -> Result<RunReport, VmError> {
        self.start()?.wait(timeout)
    }
}

/// `cfg` for a restore of `state`: the snapshot's shape (vCPUs, memory, standard APs) and CPU
/// model, which `cfg`'s own `topology` and `cpu_features` may repeat but not contradict.
fn restore_config(
    state: &crate::snapshot::SnapshotState,
    cfg: &VmConfig,
) -> Result<VmConfig, VmError> {
    let saved_model = &state.cpu_model;
    saved_model
        .check_options(cfg.topology, &cfg.cpu_features)
        .map_err(crate::snapshot::SnapshotError::from)?;
    let mut cfg = cfg.clone();
    cfg.cpus = state.header.vcpus;
    cfg.memory = state.header.memory_size;
    cfg.protected_state_aps = None;
    cfg.topology = Some(saved_model.topology);
    cfg.cpu_features = saved_model.edits_for(cfg.irqchip);
    Ok(cfg)
}

/// What this KVM allows: KVM_CAP_MAX_VCPUS, KVM_CAP_MAX_VCPU_ID (0 from an old KVM means
/// "as many as vCPUs"), KVM_CAP_TSC_DEADLINE_TIMER.
fn host_limits(kvm: &Kvm) -> HostLimits {
    use kvm_ioctls::Cap;
    let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(0);
    let max_vcpu_id = u32::try_from(kvm.get_max_vcpu_id()).unwrap_or(0);
    HostLimits {
        max_vcpus,
        max_vcpu_id: if max_vcpu_id == 0 {
            max_vcpus
        } else {
            max_vcpu_id
        },
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    }
}

/// The KVM vCPU ID of vCPU `index`. KVM's in-kernel LAPIC (`kernel`, `split`) takes its APIC
/// ID from the vCPU ID, so there it is the model's APIC ID (with gaps for a `--topology`, as
/// QEMU does); in `user` mode KVM has no LAPIC and the index serves.
fn kvm_vcpu_id(mode: IrqchipMode, model: &CpuModel, index: usize) -> u64 {
    match mode {
        IrqchipMode::User => index as u64,
        IrqchipMode::Kernel | IrqchipMode::Split => u64::from(model.apic_id(index)),
    }
}

/// The model configuration of each vCPU's local APIC, as the `user` backend builds it (KVM's
/// 1 GHz APIC bus, the guest TSC rate, the guest's MAXPHYADDR): what a snapshot's APIC state is
/// converted with and checked against, in every mode.
fn model_lapic_configs(
    cpus: u32,
    model: &CpuModel,
    tsc_khz: u32,
    max_phys_addr: u8,
) -> Vec<::irqchip::lapic::LapicConfig> {
    let cpus = cpus as usize;
    let mut config = ::irqchip::chip::PcIrqChipConfig::new(cpus);
    config.apic.clock.tsc_hz = u64::from(tsc_khz) * 1000;
    config.apic.max_phys_addr = max_phys_addr;
    config.apic.x2apic = model.x2apic;
    config.apic.directed_eoi = model.x2apic;
    config.apic.apic_ids = model.layout;
    (0..cpus)
        .filter_map(|index| config.apic.lapic(index))
        .collect()
}

/// Creates the backend for `mode` on a VM that has no vCPUs yet (the backend's VM-wide KVM
/// setup must precede KVM_CREATE_VCPU). `ctx.protected_state_aps` is refused outside `user` mode.
pub fn create_irqchip(
    mode: IrqchipMode,
    ctx: ChipContext<'_>,
) -> Result<Arc<dyn Irqchip>, IrqchipError> {
    check_protected_state(mode, ctx.protected_state_aps)?;
    Ok(match mode {
        IrqchipMode::Kernel => Arc::new(KernelIrqchip::new(ctx.kvm, ctx.vm, ctx.cpu)?),
        IrqchipMode::User => Arc::new(UserIrqchip::new(ctx)?),
        IrqchipMode::Split => Arc::new(SplitIrqchip::new(ctx)?),
    })
}

/// Seed 004's emulation needs irqvm to run INIT and SIPI: in `kernel` and `split` mode KVM's
/// LAPICs do, and KVM writes an AP's registers unless the guest is SEV-ES, which this host lacks.
fn check_protected_state(
    mode: IrqchipMode,
    protected: Option<ProtectedStateAps>,
) -> Result<(), IrqchipError> {
    match (mode, protected) {
        (IrqchipMode::Kernel | IrqchipMode::Split, Some(_)) => {
            Err(IrqchipError::ProtectedStateUnsupported(mode))
        }
        _ => Ok(()),
    }
}

/// isa-debug-exit's action: the VM ends with the status, as any guest outcome does (the first
/// wins; the writing vCPU sees the stop flag before it re-enters, the others are kicked).
fn debug_exit_ends(control: Arc<VmControl>) -> crate::devices::OnDebugExit {
    Box::new(move |status| {
        tracing::debug!(status, "guest ended the VM through isa-debug-exit");
        control.finish(Ok(GuestExit::DebugExit { status }));
    })
}

/// The i8042's reset pulse: irqvm cannot reset a VM, so it ends it as KVM's
/// KVM_SYSTEM_EVENT_RESET would (Linux's `reboot=k` and its fallback after `panic`).
fn reset_ends(control: Arc<VmControl>) -> crate::i8042::OnReset {
    Box::new(move || {
        tracing::debug!("guest reset the machine through the i8042");
        control.finish(Ok(GuestExit::SystemEvent {
            kind: kvm_bindings::KVM_SYSTEM_EVENT_RESET,
        }));
    })
}

/// The vCPU threads as a backend sees them: kick targets, nothing else.
struct VcpuKicks(Vec<Arc<VcpuShared>>);

impl VcpuKicker for VcpuKicks {
    fn vcpus(&self) -> usize {
        self.0.len()
    }

    fn kick(&self, index: usize) {
        if let Some(vcpu) = self.0.get(index) {
            vcpu.kick.kick();
        }
    }
}

/// Loads the kernel. A Linux image (bzImage or PVH vmlinux) gets the command line as the
/// arguments alone and the ACPI tables (whose RSDP its boot protocol passes); any other image
/// gets multiboot's "FILENAME ARGS" and no tables.
fn load_kernel(
    memory: &GuestRam,
    cfg: &VmConfig,
    model: &CpuModel,
    modules: Vec<Module<'_>>,
) -> Result<LoadedKernel, VmError> {
    let linux = cfg.raw.is_none() && loader::detect(&cfg.kernel)?.is_linux();
    let mut platform = BootPlatform::default();
    // Every kernel but a raw binary gets the tables in the BIOS area, where an OS scans for the
    // RSDP (ACPI 6.5 §5.2.5.1): the guest library enumerates CPUs from the MADT too.
    let rsdp = match cfg.raw {
        None => Some(acpi::write(memory, &acpi_config(model))?),
        Some(_) => None,
    };
    let cmdline = if linux {
        platform.acpi_rsdp = rsdp;
        cfg.cmdline.clone()
    } else {
        loader::kernel_cmdline(&cfg.kernel_name, &cfg.cmdline)
    };
    let req = LoadRequest {
        kernel: &cfg.kernel,
        cmdline,
        modules,
        raw: cfg.raw,
    };
    Ok(loader::load_with(memory, &req, &platform)?)
}

/// What the ACPI tables describe: vCPU `i` has the model's APIC ID (as `cpuid::vcpu_cpuid` says),
/// the IOAPIC has ID 0 (`IoApicConfig::default`), every irqchip mode has the dual 8259 (in KVM or
/// in irqvm), and the I/O bus has the i8042 and CMOS RTC of `devices.rs`.
fn acpi_config(model: &CpuModel) -> AcpiConfig {
    AcpiConfig {
        apic_ids: model.apic_ids(),
        ioapic_id: 0,
        pic: true,
        i8042: true,
        cmos_rtc: true,
    }
}

fn set_boot_registers(fd: &kvm_ioctls::VcpuFd, loaded: &LoadedKernel) -> Result<(), KvmError> {
    let mut sregs = fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
    let mut kregs = fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
    regs::apply_boot_state(&loaded.boot, &mut sregs, &mut kregs);
    // Linux's 64-bit boot protocol passes the zero page in RSI (0 for every other format).
    kregs.rsi = loaded.rsi;
    fd.set_sregs(&sregs)
        .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
    fd.set_regs(&kregs)
        .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
    Ok(())
}

/// How a VM run ended.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub exit: GuestExit,
    pub elapsed: Duration,
    pub vcpus: Vec<VcpuStatsSnapshot>,
    /// Each vCPU's multiprocessor state when it stopped (KVM_GET_MP_STATE in kernel and split
    /// mode, the irqchip model's in user mode), index = vCPU; `None` if it could not be read.
    pub mp_states: Vec<Option<MpState>>,
}

/// A started VM.
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    vm: Machine,
}

impl RunningVm {
    fn new(vm: Machine, threads: Vec<JoinHandle<()>>, started: Instant) -> Self {
        Self {
            threads,
            started,
            vm,
        }
    }

    pub fn vcpu_count(&self) -> usize {
        self.vm.shared.len()
    }

    pub fn vcpu(&self, index: usize) -> &VcpuShared {
        &self.vm.shared[index]
    }

    pub fn devices(&self) -> &Arc<Devices> {
        &self.vm.devices
    }

    /// The VM's interrupt controller: host threads (tests) drive device lines through it.
    pub fn irqchip(&self) -> &Arc<dyn Irqchip> {
        &self.vm.chip
    }

    /// A message-signalled interrupt from a host thread (a test, a device model's thread):
    /// `data` written to `address` (SDM vol. 3 §11.11). See
    /// [`crate::backend::InterruptLines::signal_msi`]: malformed messages are refused and
    /// reach no vCPU.
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError> {
        self.vm.chip.signal_msi(address, data)
    }

    /// The aligned 32-bit word at guest-physical `addr`, read as one atomic access (SeqCst):
    /// how a host thread (a test) follows a flag or counter the guest shares with it. `None`
    /// outside guest RAM or unaligned.
    pub fn load_guest_u32(&self, addr: u64) -> Option<u32> {
        self.vm
            .memory
            .load(GuestAddress(addr), Ordering::SeqCst)
            .ok()
    }

    /// Writes the aligned 32-bit word at guest-physical `addr` as one atomic access (SeqCst,
    /// a full fence on x86). Returns false outside guest RAM or unaligned.
    pub fn store_guest_u32(&self, addr: u64, value: u32) -> bool {
        self.vm
            .memory
            .store(value, GuestAddress(addr), Ordering::SeqCst)
            .is_ok()
    }

    /// vCPU `index`'s multiprocessor state now, as KVM_GET_MP_STATE would report it (see
    /// [`crate::backend::VcpuIrqchip::mp_state`]): the vCPU's thread reads it when it answers a
    /// ping, so this kicks the vCPU and waits up to `timeout` for the answer. A stopped vCPU gives
    /// the state it stopped in. `None` on timeout.
    pub fn mp_state(&self, index: usize, timeout: Duration) -> Option<MpState> {
        let shared = &self.vm.shared[index];
        if shared.state() != VcpuState::Stopped {
            let deadline = Instant::now() + timeout;
            let n = self.ping(index);
            while shared.pings_answered() < n && shared.state() != VcpuState::Stopped {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        shared.mp_state()
    }

    /// What the control API needs of this VM (see `crate::api`).
    pub fn handle(&self) -> crate::api::VmHandle {
        crate::api::VmHandle {
            chip: self.vm.chip.clone(),
            control: self.vm.control.clone(),
            vcpus: self.vm.shared.clone(),
            started: self.started,
            seccomp: self.vm.seccomp,
            tracer: self.vm.tracer.clone(),
            trace_file: Arc::default(),
            snapshot: Arc::new(crate::snapshot::source::SnapshotSource {
                vm_fd: self.vm.vm_fd.clone(),
                memory: self.vm.memory.clone(),
                devices: self.vm.devices.clone(),
                mode: self.vm.mode,
                cpu_model: self.vm.cpu_model.clone(),
            }),
            files: Arc::default(),
        }
    }

    /// The VM's flight recorder (`crate::trace`).
    pub fn tracer(&self) -> &Arc<Tracer> {
        &self.vm.tracer
    }

    /// Kicks vCPU `index` out of KVM_RUN (and out of blocking), and nudges it if paused.
    pub fn kick(&self, index: usize) {
        self.vm.shared[index].kick.kick();
        self.vm.chip.wake_vcpu(index);
        self.vm.control.nudge_paused();
    }

    /// Requests a ping from vCPU `index` and kicks it; returns the ping number (see
    /// [`VcpuShared::request_ping`]).
    pub fn ping(&self, index: usize) -> u64 {
        let n = self.vm.shared[index].request_ping();
        self.kick(index);
        n
    }

    /// Ends the VM from the host side.
    pub fn stop(&self) {
        self.vm.control.finish(Ok(GuestExit::Stopped));
        self.stop_all_vcpus();
    }

    fn stop_all_vcpus(&self) {
        for index in 0..self.vm.shared.len() {
            self.kick(index);
        }
    }

    /// Waits until the guest ends the VM (or `timeout` passes: then the VM is stopped and
    /// [`VmError::Timeout`] returned), stops every vCPU and joins their threads.
    pub fn wait(mut self, timeout: Option<Duration>) -> Result<RunReport, VmError> {
        let deadline = timeout.map(|t| self.started + t);
        let outcome = self.vm.control.wait(deadline);
        if outcome.is_none() {
            self.stop();
        } else {
            self.stop_all_vcpus();
        }
        self.join();
        let vcpus = self.vm.shared.iter().map(|s| s.stats.snapshot()).collect();
        let mp_states = self.vm.shared.iter().map(|s| s.mp_state()).collect();
        let elapsed = self.started.elapsed();
        match outcome {
            None => Err(VmError::Timeout(timeout.unwrap_or_default())),
            Some(Ok(exit)) => Ok(RunReport {
                exit,
                elapsed,
                vcpus,
                mp_states,
            }),
            Some(Err(failure)) => Err(VmError::Vcpu(failure)),
        }
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for RunningVm {
    /// A VM dropped while running is stopped, and its threads joined before the fds and the
    /// guest memory go away.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
            self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MADT lists the model's APIC IDs, gaps and all, BSP first: 2 sockets of 3 cores of 2
    /// threads put socket 1 at ID 8; past 254 the IDs get x2APIC entries (type 9).
    #[test]
    fn acpi_tables_list_the_models_apic_ids() {
        let host = HostLimits {
            max_vcpus: 1024,
            max_vcpu_id: 4096,
            tsc_deadline: true,
        };
        let topology = Some("sockets=2,cores=3,threads=2".parse().unwrap());
        let edits = FeatureEdits::default();
        let model = CpuModel::resolve(12, topology, &edits, IrqchipMode::User, host).unwrap();
        let cfg = acpi_config(&model);
        assert_eq!(cfg.apic_ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let big = CpuModel::resolve(300, None, &edits, IrqchipMode::Kernel, host).unwrap();
        let madt = acpi::build(&acpi_config(&big)).unwrap();
        let madt = &madt.get("APIC").unwrap().bytes;
        let mut entries = Vec::new();
        let mut off = 44;
        while off + 2 <= madt.len() {
            entries.push(madt[off]);
            off += usize::from(madt[off + 1]);
        }
        assert_eq!(entries.iter().filter(|&&t| t == 0).count(), 255);
        assert_eq!(entries.iter().filter(|&&t| t == 9).count(), 45);
        assert_eq!(kvm_vcpu_id(IrqchipMode::Split, &model, 6), 8);
        assert_eq!(kvm_vcpu_id(IrqchipMode::User, &model, 6), 6);
    }

    /// `--protected-state-aps` only in `user` mode, with an error that names the option and mode.
    #[test]
    fn protected_state_aps_is_refused_outside_user_mode() {
        let aps = Some(ProtectedStateAps::default());
        assert!(check_protected_state(IrqchipMode::User, aps).is_ok());
        for mode in [IrqchipMode::Kernel, IrqchipMode::Split] {
            let err = check_protected_state(mode, aps).unwrap_err();
            assert!(
                matches!(err, IrqchipError::ProtectedStateUnsupported(m) if m == mode),
                "{err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("--protected-state-aps needs the user irqchip"),
                "{text}"
            );
            assert!(check_protected_state(mode, None).is_ok());
        }
    }
}
