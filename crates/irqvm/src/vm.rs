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
use crate::cpuid::{self, CpuidConfig};
use crate::devices::{DeviceConfig, Devices, SerialOutput};
use crate::iobus::BusError;
use crate::kick::install_kick_handler;
use crate::kvm::{self, KvmError};
use crate::loader::{self, BootPlatform, LoadRequest, LoadedKernel, LoaderError, Module, RawImage};
use crate::memory::{self, GuestRam, MemoryError};
use crate::seccomp::{self, Role, SeccompError, ThreadFilter};
use crate::vcpu::{
    regs, GuestExit, VcpuFailure, VcpuShared, VcpuState, VcpuStatsSnapshot, VcpuThread, VmControl,
};
use ::irqchip::mpstate::MpState;

/// Most vCPUs a VM may have: xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_VCPUS: u32 = 254;
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
    /// Run irqvm's threads of this VM (vCPUs, the `user` timer thread) under their seccomp
    /// filters (`crate::seccomp`, docs/security.md). On by default: the filters are per thread,
    /// so a process embedding the library (a test harness) keeps its own threads unfiltered.
    pub seccomp: bool,
    /// `--protected-state-aps`: seed 004's protected-state AP boot, emulated (`user` irqchip
    /// only; the other modes refuse it). See [`ProtectedStateAps`].
    pub protected_state_aps: Option<ProtectedStateAps>,
    /// `--exact-irq-boundaries`: single-step a vCPU to the instruction boundary where a waiting
    /// interrupt becomes deliverable (`user` mode: every interrupt; `split`: the PIC's ExtINT;
    /// `kernel`: ignored). Off by default: see `backend::step` and docs/architecture.md, "Exact
    /// interrupt boundaries", for what it costs and what is still open.
    pub exact_irq_boundaries: bool,
}

impl VmConfig {
    /// A 1-vCPU, 128 MiB, kernel-irqchip VM with serial on stdout.
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
            exact_irq_boundaries: false,
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
    devices: Arc<Devices>,
    control: Arc<VmControl>,
    shared: Vec<Arc<VcpuShared>>,
    loaded: LoadedKernel,
    // Drop order: the VM fd before the memory KVM maps.
    _vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    memory: GuestRam,
}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Self, VmError> {
        if cfg.cpus == 0 || cfg.cpus > MAX_VCPUS {
            return Err(VmError::BadCpuCount(cfg.cpus));
        }
        let memory = memory::create_guest_memory(cfg.memory)?;
        let modules: Vec<Module<'_>> = cfg
            .initrd
            .iter()
            .map(|(data, name)| Module {
                data,
                cmdline: name.clone(),
            })
            .collect();
        let loaded = load_kernel(&memory, cfg, modules)?;
        tracing::debug!(?loaded, "kernel loaded");

        let kvm = kvm::open_kvm()?;
        let vm_fd = Arc::new(kvm::create_vm(&kvm)?);
        memory::register_guest_memory(&vm_fd, &memory)?;
        let shared: Vec<Arc<VcpuShared>> = (0..cfg.cpus as usize)
            .map(|index| Arc::new(VcpuShared::new(index)))
            .collect();
        // The backend's VM-wide setup must precede KVM_CREATE_VCPU.
        let chip = create_irqchip(
            cfg.irqchip,
            ChipContext {
                kvm: &kvm,
                vm: vm_fd.clone(),
                kicker: Arc::new(VcpuKicks(shared.clone())),
                epoch: Instant::now(),
                seccomp: cfg.seccomp,
                protected_state_aps: cfg.protected_state_aps,
                memory: memory.clone(),
                exact_irq_boundaries: cfg.exact_irq_boundaries,
            },
        )?;
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
        let features = chip.features();
        let cpuid_cfg = CpuidConfig {
            cpus: cfg.cpus,
            x2apic: features.x2apic,
            tsc_deadline: features.tsc_deadline,
        };
        let supported = cpuid::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::new();
        for (index, vcpu_shared) in shared.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(index as u64)
                .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid::vcpu_cpuid(&supported, &cpuid_cfg, index as u32))
                .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;
            let vcpu_chip = chip.create_vcpu_chip(index, &fd)?;
            if index == 0 {
                set_boot_registers(&fd, &loaded)?;
            }
            vcpus.push(VcpuThread {
                fd,
                chip: vcpu_chip,
                bus: devices.bus().clone(),
                shared: vcpu_shared.clone(),
                control: control.clone(),
                last_exit: Default::default(),
            });
        }
        let vcpu_filter = cfg
            .seccomp
            .then(|| ThreadFilter::new(Role::Vcpu(cfg.irqchip)))
            .transpose()?;
        Ok(Self {
            vcpus,
            vcpu_filter,
            machine: Machine {
                chip,
                devices,
                control,
                shared,
                loaded,
                _vm_fd: vm_fd,
                _kvm: kvm,
                memory,
            },
        })
    }

    /// What the loader did.
    pub fn loaded_kernel(&self) -> &LoadedKernel {
        &self.machine.loaded
    }

    pub fn memory(&self) -> &GuestRam {
        &self.machine.memory
    }

    /// Starts one thread per vCPU.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        install_kick_handler().map_err(VmError::Signal)?;
        let started = Instant::now();
        let mut threads = Vec::new();
        for vcpu in std::mem::take(&mut self.vcpus) {
            let name = format!("vcpu{}", vcpu.shared.index);
            // Each thread installs its filter before it runs anything of the VM.
            match seccomp::spawn(name, self.vcpu_filter.clone(), move || vcpu.run()) {
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

/// Creates the backend for `mode` on a VM that has no vCPUs yet (the backend's VM-wide KVM
/// setup must precede KVM_CREATE_VCPU). `ctx.protected_state_aps` is refused outside `user` mode.
pub fn create_irqchip(
    mode: IrqchipMode,
    ctx: ChipContext<'_>,
) -> Result<Arc<dyn Irqchip>, IrqchipError> {
    check_protected_state(mode, ctx.protected_state_aps)?;
    Ok(match mode {
        IrqchipMode::Kernel => Arc::new(KernelIrqchip::new(ctx.kvm, ctx.vm)?),
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
    modules: Vec<Module<'_>>,
) -> Result<LoadedKernel, VmError> {
    let linux = cfg.raw.is_none() && loader::detect(&cfg.kernel)?.is_linux();
    let mut platform = BootPlatform::default();
    let cmdline = if linux {
        platform.acpi_rsdp = Some(acpi::write(memory, &acpi_config(cfg.cpus))?);
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

/// What the ACPI tables describe: vCPU `i` has APIC ID `i` (as `cpuid::vcpu_cpuid` says), the
/// IOAPIC has ID 0 (`IoApicConfig::default`), every irqchip mode has the dual 8259 (in KVM or in
/// irqvm), and the I/O bus has the i8042 and CMOS RTC of `devices.rs`.
fn acpi_config(cpus: u32) -> AcpiConfig {
    AcpiConfig {
        apic_ids: (0..cpus).collect(),
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
        }
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
