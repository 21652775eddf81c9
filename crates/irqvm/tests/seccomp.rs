//! Which threads run under a seccomp filter (docs/security.md): irqvm's own threads (vCPUs, the
//! binary's main and serial-stdin threads, the control API's `api`
//! thread and the accept and worker threads `tiny_http` starts from it) do, in every irqchip mode,
//! with the library defaults the guest suites use; the embedding process's threads do not; and
//! `--no-seccomp` / `VmConfig::seccomp = false` turn it off. The refusal itself is tested in
//! `irqvm::seccomp`'s unit tests (it kills the process).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{raw_config, HALT_FOREVER};
use irqvm::api::ApiServer;
use irqvm::loader::CpuMode;
use irqvm::vm::Vm;
use irqvm::IrqchipMode;

const MODES: [IrqchipMode; 3] = [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel];

/// Thread name → the `Seccomp:` field of /proc/PID/task/TID/status (0 none, 2 filter), for
/// every thread of process `pid` (a name seen twice keeps the highest mode).
fn seccomp_modes(pid: &str) -> BTreeMap<String, u32> {
    let mut modes = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        let (Some(name), Some(mode)) = (field("Name:"), field("Seccomp:")) else {
            continue;
        };
        let mode: u32 = mode.parse().unwrap();
        let entry = modes.entry(name).or_insert(0);
        *entry = (*entry).max(mode);
    }
    modes
}

/// The `Seccomp:` field of every thread of `pid` named `name`.
fn modes_of(pid: &str, name: &str) -> Vec<u32> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        if field("Name:") == Some(name) {
            modes.extend(field("Seccomp:").and_then(|m| m.parse::<u32>().ok()));
        }
    }
    modes
}

/// The control API's threads: `api` itself, tiny_http's accept thread and the 4 connection
/// workers its pool starts at once (tiny_http 0.12 `TaskPool::new`), all named `api` (a thread
/// inherits its creator's name). Polls until all six are there (or 10 s pass).
const API_THREADS: usize = 6;

fn wait_for_api_threads(pid: &str) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let modes = modes_of(pid, "api");
        if modes.len() >= API_THREADS || Instant::now() > deadline {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `pid`'s threads until `names` all show up (or 10 s pass).
fn wait_for_threads(pid: &str, names: &[&str]) -> BTreeMap<String, u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let modes = seccomp_modes(pid);
        if names.iter().all(|n| modes.contains_key(*n)) || Instant::now() > deadline {
            return modes;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A VM's own threads: its vCPUs, in every mode (`user` mode's APIC timers are POSIX timers of
/// the vCPU threads, not a thread of their own).
fn expected_threads() -> Vec<&'static str> {
    vec!["vcpu0", "vcpu1"]
}

/// In-process VMs (as the guest suites and the bench run them): with `VmConfig`'s default,
/// each of irqvm's threads is filtered and this test's own thread is not.
#[test]
fn library_default_filters_irqvm_threads_only() {
    // One VM at a time: threads are told apart by name, and both library tests name theirs alike.
    let _one = common::exclusive();
    for mode in MODES {
        let mut cfg = raw_config(&HALT_FOREVER, CpuMode::Protected32, 2);
        cfg.irqchip = mode;
        assert!(cfg.seccomp, "seccomp is on by default");
        let vm = Vm::new(&cfg).unwrap().start().unwrap();
        let sock = std::env::temp_dir().join(format!(
            "irqvm-seccomp-lib-{}-{mode:?}.sock",
            std::process::id()
        ));
        let api = ApiServer::start(&sock, vm.handle()).unwrap();
        let names = expected_threads();
        let modes = wait_for_threads("self", &names);
        let api_modes = wait_for_api_threads("self");
        drop(api);
        vm.stop();
        drop(vm);
        for name in &names {
            assert_eq!(modes.get(*name), Some(&2), "{mode:?}: {name} in {modes:?}");
        }
        assert!(
            api_modes.len() >= API_THREADS && api_modes.iter().all(|&m| m == 2),
            "{mode:?}: API threads {api_modes:?}"
        );
        let me = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(
            me.contains("\nSeccomp:\t0\n"),
            "{mode:?}: this thread is filtered:\n{me}"
        );
    }
}

#[test]
fn library_without_seccomp_filters_nothing() {
    let _one = common::exclusive();
    for mode in MODES {
        let mut cfg = raw_config(&HALT_FOREVER, CpuMode::Protected32, 2);
        cfg.irqchip = mode;
        cfg.seccomp = false;
        let vm = Vm::new(&cfg).unwrap().start().unwrap();
        let names = expected_threads();
        let modes = wait_for_threads("self", &names);
        vm.stop();
        drop(vm);
        for name in &names {
            assert_eq!(modes.get(*name), Some(&0), "{mode:?}: {name} in {modes:?}");
        }
    }
}

/// The binary: main, serial-stdin and the VM's threads filtered; none with `--no-seccomp`.
#[test]
fn binary_filters_main_and_its_threads_unless_told_not_to() {
    let dir = std::env::temp_dir().join(format!("irqvm-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("halt.bin");
    std::fs::write(&image, HALT_FOREVER).unwrap();
    for mode in ["user", "split", "kernel"] {
        for (flag, want) in [(None, 2), (Some("--no-seccomp"), 0)] {
            let mut args = vec!["run", "--kernel", image.to_str().unwrap()];
            args.extend(["--raw-at", "0x100000", "--cpus", "2", "--irqchip", mode]);
            args.extend(["--timeout", "20"]);
            let sock = dir.join(format!("{mode}.sock"));
            args.extend(["--api-sock", sock.to_str().unwrap()]);
            args.extend(flag);
            let mut child = Command::new(env!("CARGO_BIN_EXE_irqvm"))
                .args(&args)
                .stdin(Stdio::piped()) // kept open: the stdin reader stays blocked in read
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let pid = child.id().to_string();
            let names = ["irqvm", "serial-stdin", "vcpu0", "vcpu1"];
            // The main thread's filter comes after setup: wait until it is in place.
            let deadline = Instant::now() + Duration::from_secs(10);
            let modes = loop {
                let modes = wait_for_threads(&pid, &names);
                if modes.get("irqvm") == Some(&want) || Instant::now() > deadline {
                    break modes;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let api_modes = wait_for_api_threads(&pid);
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                api_modes.len() >= API_THREADS && api_modes.iter().all(|&m| m == want),
                "{mode} {flag:?}: API threads {api_modes:?}"
            );
            for name in &names {
                assert_eq!(
                    modes.get(*name),
                    Some(&want),
                    "{mode} {flag:?}: {name} in {modes:?}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
