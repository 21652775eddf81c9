//! Least privilege: per-thread seccomp-bpf filters (built with `seccompiler`).
//!
//! Every thread irqvm creates for a VM runs under a filter that allows only the syscalls, and
//! for `ioctl` only the KVM requests, that thread's code makes; the `irqvm` binary's main
//! thread (and its serial-stdin reader) gets one after the VM is set up. The lists were derived
//! from `strace -ff` runs of the guests in all three irqchip modes (docs/security.md lists them
//! and says how to redo that).
//!
//! Filters are installed with `seccompiler::apply_filter`, which acts on the calling thread only
//! (no TSYNC), so a process that embeds the library, such as a test harness running several VMs,
//! keeps its own threads unfiltered; a filter ends with its thread.
//!
//! A forbidden syscall is trapped (`SECCOMP_RET_TRAP`): the SIGSYS handler installed here
//! writes one line naming the thread and the syscall number to stderr and then lets SIGSYS
//! kill the process, as Firecracker's kill action does, but with a message.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{mpsc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_debugregs, kvm_interrupt, kvm_irq_level, kvm_irq_routing, kvm_mp_state, kvm_msi, kvm_msrs,
    kvm_regs, kvm_sregs, kvm_vcpu_events, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::mode::IrqchipMode;

// The KVM requests a filtered thread may make (linux/kvm.h), encoded as the kernel does.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_io_nr!(KVM_NMI, KVMIO, 0x9a);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_bindings::kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_bindings::kvm_xsave);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_bindings::kvm_translation);
ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);
ioctl_iow_nr!(
    KVM_SET_GUEST_DEBUG,
    KVMIO,
    0x9b,
    kvm_bindings::kvm_guest_debug
);

/// Errors setting up a filtered thread.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {role:?} seccomp filter: {source}")]
    Build {
        role: Role,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the seccomp filter of thread {thread}: {source}")]
    Apply {
        thread: String,
        #[source]
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("cannot start thread {thread}: {source}")]
    Spawn {
        thread: String,
        #[source]
        source: std::io::Error,
    },
    #[error("thread {0} ended before it reported its seccomp filter")]
    Lost(String),
}

/// What a thread does, which decides what it may call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A vCPU thread of a VM in this irqchip mode: KVM_RUN, the mode's vCPU and VM ioctls,
    /// device emulation (serial output), kicks, and in `user` mode its kick timer.
    Vcpu(IrqchipMode),
    /// The `irqvm` binary's main thread after setup, and its serial-stdin reader: waits for the
    /// VM, raises the serial line, stops, joins and tears down, prints the report.
    Main(IrqchipMode),
    /// The control API of a VM in this irqchip mode (`crate::api::server`): the `api` thread and
    /// the threads `tiny_http` starts from it (accept, connection workers), which inherit it.
    /// Serves requests on the listening socket it was given, reads VM state, raises lines and
    /// signals MSIs.
    Api(IrqchipMode),
    /// `--kvm-stats`'s `kvm-stats` thread (`crate::kvm_stats`): reads KVM's stats fds with
    /// `pread64` and appends to the file it was given.
    Stats,
}

/// A compiled filter for one role, ready to install on a thread.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    role: Role,
    program: BpfProgram,
}

impl ThreadFilter {
    pub fn new(role: Role) -> Result<Self, SeccompError> {
        let build = |source| SeccompError::Build { role, source };
        let filter = SeccompFilter::new(
            rules(role).map_err(build)?,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| build(e.into()))?;
        let program = BpfProgram::try_from(filter).map_err(|e| build(e.into()))?;
        Ok(Self { role, program })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Installs the filter on the calling thread, named `thread` in the SIGSYS report. It stays
    /// until the thread ends and cannot be removed.
    pub fn apply(&self, thread: &str) -> Result<(), SeccompError> {
        install_sigsys_handler()?;
        install_panic_report();
        prepare_allocator();
        set_thread_label(thread);
        seccompiler::apply_filter(&self.program).map_err(|source| SeccompError::Apply {
            thread: thread.to_string(),
            source,
        })
    }
}

/// Keeps glibc's malloc from opening files in filtered threads; called before the first VM.
///
/// glibc opens files from inside malloc in whichever thread gets there first: once more than 8
/// threads allocate, `arena_get2` reads `/sys/devices/system/cpu/online` to size its arena limit,
/// and the first shrink of a thread arena's heap reads `/proc/sys/vm/overcommit_memory`. Both are
/// `openat`, which no filter allows: a VM with 255 vCPUs was stopped with SIGSYS in its timer
/// thread (since removed) at its end, and strace caught a `tiny_http` worker of the API doing the same. Setting
/// M_ARENA_MAX (glibc's own default, 8 per online CPU on 64-bit) makes the limit known, and a
/// M_TRIM_THRESHOLD of `i32::MAX` means no heap is ever trimmed, so neither file is read.
/// Called before the first VM and again (a no-op then) by the first `ThreadFilter::apply`.
/// The cost: freed memory stays in the process instead of going back to the system (irqvm
/// allocates little after start-up). Process-wide and idempotent; the settings cannot be undone.
pub fn prepare_allocator() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(target_env = "gnu")]
        // SAFETY: sysconf reads a system value; mallopt only sets parameters of glibc's
        // allocator; no memory of ours is touched.
        unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16) as libc::c_int;
            libc::mallopt(libc::M_ARENA_MAX, 8 * cpus);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    });
}

/// Starts thread `name` running `body` under `filter` (none: unfiltered), and returns once the
/// thread has installed it; a thread whose filter fails to install never runs `body`.
pub fn spawn<F>(
    name: String,
    filter: Option<ThreadFilter>,
    body: F,
) -> Result<JoinHandle<()>, SeccompError>
where
    F: FnOnce() + Send + 'static,
{
    spawn_sized(name, filter, None, body)
}

/// [`spawn`] with a stack of `stack` bytes instead of Rust's default (2 MiB): vCPU threads,
/// of which a VM may have 1024, take a small one.
pub fn spawn_sized<F>(
    name: String,
    filter: Option<ThreadFilter>,
    stack: Option<usize>,
    body: F,
) -> Result<JoinHandle<()>, SeccompError>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let label = name.clone();
    let mut builder = std::thread::Builder::new().name(name.clone());
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    let handle = builder
        .spawn(move || {
            let applied = filter.as_ref().map_or(Ok(()), |f| f.apply(&label));
            let ok = applied.is_ok();
            let _ = tx.send(applied);
            if ok {
                #[cfg(test)]
                tests::run_hook(&label);
                body();
            }
        })
        .map_err(|source| SeccompError::Spawn {
            thread: name.clone(),
            source,
        })?;
    let reported = rx.recv();
    match reported {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(SeccompError::Lost(name))
        }
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The allow list of `role`: syscall number → rules (an empty list allows every call).
fn rules(role: Role) -> Result<Rules, seccompiler::Error> {
    let mut rules = common_rules()?;
    match role {
        Role::Vcpu(mode) => {
            allow_ioctls(&mut rules, &vcpu_ioctls(mode))?;
            // Consuming the flush signal after a flushing KVM_RUN (`crate::flush_signal::take`).
            rules.insert(libc::SYS_rt_sigtimedwait, vec![]);
            if mode != IrqchipMode::Kernel {
                // The per-vCPU kick timer (`kick::KickTimer`), a POSIX timer signalling its thread
                // (`user`: the window kicks and the APIC timer, `apic_timer`; `split`: the EOI
                // probe, `eoi_probe`).
                for nr in [
                    libc::SYS_timer_create,
                    libc::SYS_timer_settime,
                    libc::SYS_timer_delete,
                ] {
                    rules.insert(nr, vec![]);
                }
            }
        }
        Role::Main(mode) => {
            allow_ioctls(&mut rules, &line_ioctls(mode))?;
            // stdin → serial input; `exit_group` ends the process when `main` returns.
            let stdin = arg_eq(0, libc::STDIN_FILENO as u64)?;
            rules.insert(libc::SYS_read, vec![SeccompRule::new(vec![stdin])?]);
            rules.insert(libc::SYS_exit_group, vec![]);
            // Tearing down the control API: `tiny_http` wakes its accept thread by connecting
            // to its own Unix socket (AF_UNIX only), then the socket file is removed.
            let unix = arg_eq(0, libc::AF_UNIX as u64)?;
            rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix])?]);
            rules.insert(libc::SYS_connect, vec![]);
            rules.insert(libc::SYS_shutdown, vec![]);
            rules.insert(libc::SYS_unlink, vec![]);
            rules.insert(libc::SYS_unlinkat, vec![]);
        }
        Role::Stats => {
            rules.insert(libc::SYS_pread64, vec![]);
        }
        Role::Api(mode) => {
            allow_ioctls(&mut rules, &api_ioctls(mode))?;
            for nr in [
                // Serving: accept on the listening socket, requests in, answers out
                // (tiny_http reads with recvfrom, writes with sendto(MSG_NOSIGNAL), and shuts a
                // connection down before closing it); `getsockname` when it takes the listener.
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_getsockname,
                // tiny_http starts its accept thread and its connection workers from here:
                // glibc's pthread_create (clone3; its flags are in memory, which a filter cannot
                // read) and each new thread's start-up (robust futex list, rseq, the affinity
                // std reads for the stack guard).
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_sched_getaffinity,
                // The seed of std's HashMap (`RandomState`): `trace.stop`'s JSON writer builds
                // maps. It reads the kernel's random pool and nothing else.
                libc::SYS_getrandom,
            ] {
                rules.insert(nr, vec![]);
            }
            // tiny_http splits each accepted connection into a read and a write half
            // (`UnixStream::try_clone`: fcntl F_DUPFD_CLOEXEC).
            let dup = SeccompRule::new(vec![arg_eq(1, libc::F_DUPFD_CLOEXEC as u64)?])?;
            rules.entry(libc::SYS_fcntl).or_default().push(dup);
        }
    }
    Ok(rules)
}

/// What every filtered thread may do: the std runtime (locks, allocation, its signal stack,
/// thread exit), sleep on and ring `user` mode's doorbells (futex FUTEX_WAIT_BITSET and
/// FUTEX_WAKE_BITSET, `backend::user::futex`: any thread that posts may wake), log to stderr, write serial output, read clocks and sleep, kick a vCPU of this
/// process (pthread_kill = getpid + tgkill between signal-mask changes), return from the kick
/// handler, and close the fds it owns.
fn common_rules() -> Result<Rules, seccompiler::Error> {
    let mut rules = Rules::new();
    for nr in [
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_exit,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_close,
    ] {
        rules.insert(nr, vec![]);
    }
    // Signals only to threads of this process.
    let own = arg_eq(0, u64::from(std::process::id()))?;
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![own])?]);
    // Memory, never executable: a filtered thread has no reason to make code.
    let no_exec = SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?;
    rules.insert(
        libc::SYS_mmap,
        vec![SeccompRule::new(vec![no_exec.clone()])?],
    );
    rules.insert(libc::SYS_mprotect, vec![SeccompRule::new(vec![no_exec])?]);
    // Debug builds check an fd with F_GETFD before closing it.
    let getfd = arg_eq(1, libc::F_GETFD as u64)?;
    rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd])?]);
    Ok(rules)
}

/// The ioctls of a vCPU thread in `mode`. All modes read registers for error reports.
fn vcpu_ioctls(mode: IrqchipMode) -> Vec<u64> {
    let mut list = vec![KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()];
    // `emulate`: finishing an instruction KVM's emulator gave up on (x87 status, RIP, the
    // injected vector), in every mode.
    list.extend([KVM_GET_FPU(), KVM_SET_REGS(), KVM_SET_VCPU_EVENTS()]);
    // `emulate::syscall`: the SYSCALL watch (its breakpoint, the IDT gate and the page-fault
    // frame through KVM_TRANSLATE, STAR/LSTAR/FMASK, the guest's LSTAR write, CS and SS), in
    // every mode.
    list.extend([
        KVM_SET_GUEST_DEBUG(),
        KVM_TRANSLATE(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_SET_SREGS(),
    ]);
    list.extend(line_ioctls(mode));
    // The flush signal (`crate::flush_signal`): unblocked only inside KVM_RUN.
    list.push(KVM_SET_SIGNAL_MASK());
    // A snapshot's save, on the paused vCPU's thread (`crate::snapshot`): the processor state
    // in every mode (KVM_RUN with immediate_exit completes the last exit first).
    list.extend([
        KVM_GET_XCRS(),
        KVM_GET_XSAVE(),
        KVM_GET_XSAVE2(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_MSRS(),
        KVM_GET_VCPU_EVENTS(),
    ]);
    list.extend(match mode {
        // KVM's MP state for the run report; KVM's LAPIC, APIC base / TSC deadline MSRs and
        // events for the control API's state queries (`VcpuIrqchip::introspect`).
        IrqchipMode::Kernel => vec![
            KVM_GET_MP_STATE(),
            KVM_GET_LAPIC(),
            KVM_GET_MSRS(),
            KVM_GET_VCPU_EVENTS(),
        ],
        // ExtINT by KVM_INTERRUPT; the IOAPIC's redirection table as MSI routes; the same
        // state queries as `kernel`; single-stepping to an ExtINT boundary (`backend::step`).
        IrqchipMode::Split => vec![
            KVM_SET_GUEST_DEBUG(),
            KVM_TRANSLATE(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_MP_STATE(),
            KVM_INTERRUPT(),
            KVM_SET_GSI_ROUTING(),
            KVM_SET_MP_STATE(),
            KVM_GET_LAPIC(),
            KVM_GET_MSRS(),
            KVM_GET_VCPU_EVENTS(),
        ],
        // Injection, NMI blocking, the INIT reset of registers, events and MSRs, and
        // single-stepping to an interrupt boundary (`backend::step`: guest debug, DR7, the
        // instruction at RIP through KVM_TRANSLATE).
        IrqchipMode::User => vec![
            KVM_SET_GUEST_DEBUG(),
            KVM_TRANSLATE(),
            KVM_INTERRUPT(),
            KVM_NMI(),
            KVM_SET_REGS(),
            KVM_SET_SREGS(),
            KVM_GET_DEBUGREGS(),
            KVM_SET_DEBUGREGS(),
            KVM_GET_VCPU_EVENTS(),
            KVM_SET_VCPU_EVENTS(),
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
        ],
    });
    list.sort_unstable();
    list.dedup();
    list
}

/// The ioctls of the control API's threads: the lines, MSIs and host events of `irq.line`,
/// `irq.msi` and `vcpus/N/{nmi,init,sipi}` (KVM_IRQ_LINE, KVM_SIGNAL_MSI), and `platform`'s
/// KVM_GET_IRQCHIP in `kernel` mode. The per-vCPU state (`vcpus/N`) is read by each vCPU's own
/// thread (KVM_GET_LAPIC, KVM_GET_MP_STATE, ... are in `vcpu_ioctls`), and `user` mode's
/// controllers are irqvm's own, so its API makes no ioctl at all.
fn api_ioctls(mode: IrqchipMode) -> Vec<u64> {
    match mode {
        IrqchipMode::Kernel => vec![KVM_IRQ_LINE(), KVM_SIGNAL_MSI(), KVM_GET_IRQCHIP()],
        IrqchipMode::Split => vec![KVM_SIGNAL_MSI()],
        IrqchipMode::User => vec![],
    }
}

/// The ioctls that raise a device line or signal an MSI in `mode` (a device write on a vCPU
/// thread, serial input on the stdin thread); `user` mode raises lines without KVM.
fn line_ioctls(mode: IrqchipMode) -> Vec<u64> {
    match mode {
        // KVM_SIGNAL_MSI: the MSI doorbell (`devices`), and host threads (`RunningVm::signal_msi`).
        IrqchipMode::Kernel => vec![KVM_IRQ_LINE(), KVM_SIGNAL_MSI()],
        IrqchipMode::Split => vec![KVM_SIGNAL_MSI()],
        IrqchipMode::User => vec![],
    }
}

fn allow_ioctls(rules: &mut Rules, requests: &[u64]) -> Result<(), seccompiler::Error> {
    // An empty rule list would allow every ioctl (seccompiler matches a syscall with no rules
    // unconditionally): no request allowed means no entry at all.
    if requests.is_empty() {
        return Ok(());
    }
    // The kernel takes the request as an unsigned int, so only the low 32 bits count.
    let list = requests
        .iter()
        .map(|&r| Ok(SeccompRule::new(vec![arg_eq(1, r)?])?))
        .collect::<Result<Vec<_>, seccompiler::Error>>()?;
    rules.insert(libc::SYS_ioctl, list);
    Ok(())
}

fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::Error> {
    Ok(SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?)
}

// --- The SIGSYS report -----------------------------------------------------------------------

const LABEL_LEN: usize = 16;

thread_local! {
    /// The filtered thread's name for the SIGSYS report (const-initialised, so reading it in
    /// the handler neither allocates nor locks).
    static LABEL: Cell<([u8; LABEL_LEN], usize)> = const { Cell::new(([0; LABEL_LEN], 0)) };
}

/// Installs, once, a panic hook that reports a filtered thread's panic in one line (thread,
/// location, message) straight to stderr, without a backtrace, and hands every other thread's
/// panic to the hook that was there before. Rust's default hook, when RUST_BACKTRACE asks for
/// a backtrace, resolves it with `getcwd` and by opening the executable, which no filter
/// allows: the panic then ended as a SIGSYS report that named the syscall but not the panic
/// (`thread vcpu3 made the forbidden syscall 79`, a test harness having captured the rest).
fn install_panic_report() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let (label, len) = LABEL.with(Cell::get);
            if len == 0 {
                return previous(info);
            }
            let thread = String::from_utf8_lossy(&label[..len]);
            let location = info
                .location()
                .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            let line = format!("irqvm: thread {thread} panicked{location}: {message}\n");
            // Straight to fd 2 (a test harness's capture of eprintln! would keep it from a
            // process that dies next).
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }));
    });
}

fn set_thread_label(name: &str) {
    let mut buf = [0u8; LABEL_LEN];
    let len = name.len().min(LABEL_LEN);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    LABEL.with(|l| l.set((buf, len)));
}

/// Installs the process-wide SIGSYS handler once. SA_RESETHAND: the first trapped syscall
/// restores the default action, so the SIGSYS the handler re-raises kills the process.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and
        // only uses async-signal-safe operations (a const thread-local, write, tgkill).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
            }
        }
    });
    result
}

/// Offset of `si_syscall` in the kernel's siginfo for SIGSYS on x86-64: signo, errno, code and
/// padding (16 bytes), then `_call_addr` (8), then the syscall number.
const SI_SYSCALL_OFFSET: usize = 24;
/// `si_code` of a SIGSYS sent by a seccomp filter (linux/siginfo.h).
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; a seccomp trap has
    // si_code SYS_SECCOMP and the syscall number at SI_SYSCALL_OFFSET (linux/signal.h `_sigsys`).
    let (code, nr) = unsafe {
        let nr = (info as *const u8)
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned();
        ((*info).si_code, nr)
    };
    let mut line = Line::default();
    line.push(b"irqvm: seccomp: thread ");
    let (label, len) = LABEL.with(Cell::get);
    if len == 0 {
        // A thread a filtered thread started (tiny_http's under `api`): it inherited the filter
        // but never named itself here.
        line.push(b"(unnamed, started by a filtered thread)");
    }
    line.push(&label[..len]);
    if code == SYS_SECCOMP {
        line.push(b" made the forbidden syscall ");
        line.push_number(nr);
    } else {
        line.push(b" got a SIGSYS not from its filter");
    }
    line.push(b"; stopping irqvm (run with --no-seccomp to debug)\n");
    // SIGSYS is blocked while this handler runs and its action is now the default (SA_RESETHAND),
    // so the re-raised signal kills the process as soon as the handler returns.
    // SAFETY: write, getpid, gettid and tgkill are async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// A fixed buffer for the handler's one line (no allocation in a signal handler).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = value.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if value < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A closure the next filtered thread whose name starts with the key runs on itself, after
    /// its filter and before its body: how a test makes a vCPU thread perform a forbidden
    /// syscall. Test builds only: release builds have no hook, and no guest can reach it.
    type Hook = (String, Box<dyn FnOnce() + Send>);
    static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

    pub(crate) fn set_hook(prefix: &str, hook: Box<dyn FnOnce() + Send>) {
        *HOOK.lock().unwrap() = Some((prefix.to_string(), hook));
    }

    pub(super) fn run_hook(thread: &str) {
        let hook = {
            let mut slot = HOOK.lock().unwrap_or_else(|p| p.into_inner());
            match slot.take() {
                Some((prefix, hook)) if thread.starts_with(&prefix) => Some(hook),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        if let Some(hook) = hook {
            hook();
        }
    }

    #[test]
    fn every_role_compiles_in_every_mode() {
        for mode in [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel] {
            for role in [
                Role::Vcpu(mode),
                Role::Main(mode),
                Role::Api(mode),
                Role::Stats,
            ] {
                let f = ThreadFilter::new(role).unwrap();
                assert!(!f.program.is_empty());
            }
        }
    }

    /// The encodings match linux/kvm.h's values (x86-64), so the lists name what strace showed.
    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_INTERRUPT(), 0x4004_ae86);
        assert_eq!(KVM_NMI(), 0xae9a);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_IRQ_LINE(), 0x4008_ae61);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
    }

    /// A role with no ioctl allows none: an empty rule list would match every request.
    #[test]
    fn a_role_without_ioctls_has_no_ioctl_entry() {
        for role in [
            Role::Main(IrqchipMode::User),
            Role::Api(IrqchipMode::User),
            Role::Stats,
        ] {
            assert!(
                !rules(role).unwrap().contains_key(&libc::SYS_ioctl),
                "{role:?}"
            );
        }
        for role in [
            Role::Api(IrqchipMode::Kernel),
            Role::Vcpu(IrqchipMode::User),
        ] {
            assert!(
                !rules(role).unwrap()[&libc::SYS_ioctl].is_empty(),
                "{role:?}"
            );
        }
    }

    #[test]
    fn line_formats_negative_and_positive_numbers() {
        let mut line = Line::default();
        line.push(b"n=");
        line.push_number(39);
        line.push(b",");
        line.push_number(-7);
        line.push(b",");
        line.push_number(0);
        assert_eq!(&line.buf[..line.len], b"n=39,-7,0");
    }

    /// Allowed calls keep working on a filtered thread of our own.
    #[test]
    fn a_filtered_thread_keeps_allowed_calls() {
        let handle = spawn(
            "filtered".into(),
            Some(ThreadFilter::new(Role::Stats).unwrap()),
            || {
                // futex, clock, write to stderr: all allowed.
                std::thread::sleep(std::time::Duration::from_millis(1));
                eprintln!("filtered thread alive");
            },
        )
        .unwrap();
        handle.join().unwrap();
    }

    const PANIC_TEST: &str = "seccomp::tests::a_filtered_threads_panic_is_reported_not_trapped";

    /// A filtered thread that panics, with RUST_BACKTRACE asking for a backtrace (whose
    /// resolution makes syscalls no filter allows), is reported in one line naming the thread,
    /// the place and the message, and the process lives on (no SIGSYS). Run in a child, as the
    /// failure it guards against kills the process.
    #[test]
    fn a_filtered_threads_panic_is_reported_not_trapped() {
        if std::env::var_os(CHILD_ENV).is_some() {
            let handle = spawn(
                "panicky".into(),
                Some(ThreadFilter::new(Role::Vcpu(IrqchipMode::User)).unwrap()),
                || panic!("boom {}", 42),
            )
            .unwrap();
            assert!(handle.join().is_err(), "the thread panicked");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([PANIC_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "panic")
            .env("RUST_BACKTRACE", "full")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}\n{stderr}", out.status);
        assert!(
            stderr.contains("irqvm: thread panicky panicked at crates/irqvm/src/seccomp.rs:")
                && stderr.contains(": boom 42\n"),
            "{stderr}"
        );
        assert!(!stderr.contains("forbidden syscall"), "{stderr}");
    }

    const CHILD_ENV: &str = "IRQVM_SECCOMP_CHILD";
    const THIS_TEST: &str =
        "seccomp::tests::a_forbidden_syscall_on_a_vcpu_thread_kills_irqvm_with_a_report";

    /// The documented refusal: a vCPU thread of a running VM (in each irqchip mode) makes a call
    /// no filter allows, a syscall (opening a file: openat = 257 on x86-64) or an ioctl request
    /// outside its list (KVM_CREATE_VM, ioctl = 16); irqvm prints one line naming the thread and
    /// the syscall and dies of SIGSYS. The refusal kills the process, so the VM runs in a child:
    /// this test binary re-run on this test alone, told by `CHILD_ENV` ("MODE:CALL").
    #[test]
    fn a_forbidden_syscall_on_a_vcpu_thread_kills_irqvm_with_a_report() {
        if let Ok(what) = std::env::var(CHILD_ENV) {
            forbidden_syscall_child(&what);
            return;
        }
        for mode in ["user", "split", "kernel"] {
            for (call, nr) in [("open", libc::SYS_openat), ("ioctl", libc::SYS_ioctl)] {
                expect_sigsys(THIS_TEST, &format!("{mode}:{call}"), "vcpu0", nr);
            }
        }
    }

    /// Runs test `test` of this binary in a child told `what` by `CHILD_ENV`; it must die of
    /// SIGSYS after the report line naming `thread` and syscall `nr`, and the hook must not return.
    fn expect_sigsys(test: &str, what: &str, thread: &str, nr: i64) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, what)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{what}: {:?}\n{stderr}",
            out.status
        );
        let report = format!("irqvm: seccomp: thread {thread} made the forbidden syscall {nr};");
        assert!(stderr.contains(&report), "{what}: {stderr}");
        assert!(!stderr.contains("hook returned"), "{what}: {stderr}");
    }

    /// A hook that makes the forbidden call `call`: opening a file, or an ioctl request no
    /// filter lists (KVM_CREATE_VM = _IO(KVMIO, 0x01)).
    fn forbidden_call(call: &str) -> Box<dyn FnOnce() + Send> {
        if call == "open" {
            Box::new(|| {
                let opened = std::fs::File::open("/dev/null");
                eprintln!("hook returned: {opened:?}");
            })
        } else {
            Box::new(|| {
                // The filter looks at the request before the kernel looks at the fd, so fd -1
                // is refused by the filter, not by EBADF.
                // SAFETY: an ioctl on an invalid fd touches no memory of this process.
                let r = unsafe { libc::ioctl(-1, 0xae01) };
                eprintln!("hook returned: {r}");
            })
        }
    }

    fn child_config(mode: &str) -> crate::vm::VmConfig {
        use crate::loader::{CpuMode, RawImage};
        let mut cfg = crate::vm::VmConfig::new(vec![0xf4, 0xeb, 0xfd], "raw"); // hlt; jmp back
        cfg.raw = Some(RawImage {
            load_addr: 0x10_0000,
            entry: 0x10_0000,
            mode: CpuMode::Protected32,
        });
        cfg.memory = 16 << 20;
        cfg.irqchip = match mode {
            "split" => IrqchipMode::Split,
            "kernel" => IrqchipMode::Kernel,
            _ => IrqchipMode::User,
        };
        assert!(cfg.seccomp, "seccomp is the library default");
        cfg
    }

    const API_TEST: &str =
        "seccomp::tests::a_forbidden_syscall_on_the_api_thread_kills_irqvm_with_a_report";

    /// The same refusal on the control API's thread (`Role::Api`), started as `irqvm run
    /// --api-sock` starts it, with the VM's default (seccomp on): in each mode its thread makes
    /// a forbidden syscall, or a KVM ioctl outside the API's list, before serving.
    #[test]
    fn a_forbidden_syscall_on_the_api_thread_kills_irqvm_with_a_report() {
        if let Ok(what) = std::env::var(CHILD_ENV) {
            api_child(&what);
            return;
        }
        for mode in ["user", "split", "kernel"] {
            for (call, nr) in [("open", libc::SYS_openat), ("ioctl", libc::SYS_ioctl)] {
                expect_sigsys(API_TEST, &format!("{mode}:{call}"), "api", nr);
            }
        }
    }

    fn api_child(what: &str) {
        let (mode, call) = what.split_once(':').unwrap();
        let vm = crate::vm::Vm::new(&child_config(mode))
            .unwrap()
            .start()
            .unwrap();
        let sock = std::env::temp_dir().join(format!(
            "irqvm-seccomp-api-{}-{mode}-{call}.sock",
            std::process::id()
        ));
        set_hook("api", forbidden_call(call));
        let server = crate::api::ApiServer::start(&sock, vm.handle());
        // The hook runs before the server listens; give the refusal time to land.
        std::thread::sleep(std::time::Duration::from_secs(5));
        drop(server);
        vm.stop();
        panic!("the forbidden syscall did not stop irqvm");
    }

    /// The child: a 1-vCPU VM whose vCPU 0 makes the forbidden call through the test hook, after
    /// its filter is installed and before its run loop. Returning at all is the failure.
    fn forbidden_syscall_child(what: &str) {
        let (mode, call) = what.split_once(':').unwrap();
        set_hook("vcpu0", forbidden_call(call));
        let _ = crate::vm::Vm::new(&child_config(mode))
            .unwrap()
            .run(Some(std::time::Duration::from_secs(5)));
        panic!("the forbidden syscall did not stop irqvm");
    }
}
