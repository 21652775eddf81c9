//! The `irqvm` binary end to end: serial on stdout, exit status from the guest's debug-exit,
//! errors on stderr with status 2.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary with `args`, killing it after the harness timeout; (status, stdout, stderr).
fn irqvm(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_irqvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn irqvm");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > common::HARNESS_TIMEOUT {
            let _ = child.kill();
            panic!("irqvm {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), out, err)
}

#[test]
fn run_hello_prints_on_stdout_and_exits_with_the_guest_status() {
    let kernel = common::guest_path("hello");
    let (status, out, _) = irqvm(&["run", "--kernel", &kernel, "--cpus", "2", "--timeout", "30"]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("PASS: fw_cfg signature"), "{out}");
    assert!(out.contains("2 CPU(s)"), "{out}");
}

#[test]
fn no_arguments_runs_the_demo() {
    let (status, out, err) = irqvm(&[]);
    assert_eq!(status, 1, "{out}{err}");
    assert!(out.contains("DONE: "), "{out}");
}

#[test]
fn unreadable_kernel_is_reported_with_status_2() {
    let (status, _, err) = irqvm(&["run", "--kernel", "/nonexistent/kernel.elf"]);
    assert_eq!(status, 2);
    assert!(
        err.contains("cannot read kernel /nonexistent/kernel.elf"),
        "{err}"
    );
}

/// `--topology` alone sets the vCPU count; a CPU model the mode cannot honour is an error with
/// status 2 that says why.
#[test]
fn topology_and_cpu_features_reach_the_guest_or_are_refused() {
    let kernel = common::guest_path("hello");
    let (status, out, err) = irqvm(&[
        "run",
        "--kernel",
        &kernel,
        "--topology",
        "sockets=1,cores=3",
        "--timeout",
        "30",
    ]);
    assert_eq!(status, 1, "{out}{err}");
    assert!(out.contains("3 CPU(s)"), "{out}");
    let (status, _, err) = irqvm(&[
        "run",
        "--kernel",
        &kernel,
        "--cpus",
        "300",
        "--cpu-features",
        "-x2apic",
    ]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("-x2apic refused: APIC ID 299"), "{err}");
    let (status, _, err) = irqvm(&["run", "--kernel", &kernel, "--cpu-features", "+cx16"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("+cx16 refused"), "{err}");
    let (status, _, err) = irqvm(&["run", "--kernel", &kernel, "--cpus", "1025"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("out of range: 1 to 1024"), "{err}");
}

#[test]
fn unknown_irqchip_modes_are_refused_with_the_list_of_modes() {
    let kernel = common::guest_path("hello");
    let (status, _, err) = irqvm(&["run", "--kernel", &kernel, "--irqchip", "userspace"]);
    assert_eq!(status, 2);
    assert!(
        err.contains("possible values: kernel, user, split"),
        "{err}"
    );
}

#[test]
fn timeout_gives_status_124() {
    let dir = std::env::temp_dir().join(format!("irqvm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spin.bin");
    std::fs::write(&path, common::HALT_FOREVER).unwrap();
    let (status, _, err) = irqvm(&[
        "run",
        "--kernel",
        path.to_str().unwrap(),
        "--raw-at",
        "0x100000",
        "--timeout",
        "0.3",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status, 124, "{err}");
}

/// A guest cannot flood the host's log (docs/architecture.md, "When the guest misbehaves"):
/// with irqvm's stdout a pipe nobody reads (closed before the guest starts), every serial byte
/// the guest writes fails (EPIPE), and each failure is a warning, rate-limited to one per
/// 5 s per site. The guest, which prints well over a hundred bytes, still runs to its end.
#[test]
fn a_broken_stdout_costs_one_warning_not_one_per_byte() {
    let kernel = common::guest_path("hello");
    let mut child = Command::new(env!("CARGO_BIN_EXE_irqvm"))
        .args(["run", "--kernel", &kernel, "--cpus", "1", "--timeout", "30"])
        .env("IRQVM_LOG", "warn") // warnings are not shown by default
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn irqvm");
    drop(child.stdout.take()); // the read end: every write to stdout now fails
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the guest's own exit: {err}");
    let warnings = err.matches("serial port:").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} serial warnings (one, or two if the run spans the 5 s interval):\n{err}"
    );
}
