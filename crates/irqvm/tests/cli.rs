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

/// `run --trace` (under the binary's seccomp filters, which allow no `open` after setup) writes
/// the trace when the guest ends; `trace report` prints a table whose rows add up (every fixed
/// IPI of the ipi guest injected and EOIed) and draws the SVG.
#[test]
fn run_trace_then_report() {
    let dir = std::env::temp_dir();
    let trace = dir.join(format!("irqvm-cli-trace-{}.json", std::process::id()));
    let svg = dir.join(format!("irqvm-cli-trace-{}.svg", std::process::id()));
    let kernel = common::guest_path("ipi");
    let trace_arg = trace.to_str().unwrap();
    let (status, out, err) = irqvm(&[
        "run", "--kernel", &kernel, "--cpus", "2", "--trace", trace_arg,
    ]);
    assert_eq!(status, 1, "{out}\n{err}");
    assert!(err.contains("(0 dropped)"), "{err}");
    let svg_arg = svg.to_str().unwrap();
    let (status, report, err) = irqvm(&["trace", "report", trace_arg, "--svg", svg_arg]);
    assert_eq!(status, 0, "{err}");
    // "0x40  POSTS | INJ p50 p90 p99 max | EOI p50 p90 p99 max | EOI p50 p90 p99 max" (post to
    // injection, injection to EOI, post to EOI), one row per fixed vector (NMI, INIT and
    // start-up have rows of their own).
    let rows: Vec<Vec<u64>> = report
        .lines()
        .skip_while(|l| !l.starts_with("per vector"))
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("0x"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            [1, 3, 9, 15]
                .iter()
                .map(|&i| cols[i].parse().unwrap_or_else(|_| panic!("{l}")))
                .collect()
        })
        .collect();
    for row in &rows {
        assert!(row.iter().all(|&n| n == row[0]), "{row:?}:\n{report}");
    }
    let posts: u64 = rows.iter().map(|r| r[0]).sum();
    assert!(
        posts >= 20,
        "the ipi guest sends dozens of fixed IPIs:\n{report}"
    );
    assert!(report.contains("\nper source\n"), "{report}");
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.contains("vCPU 1"));
    let (status, _, err) = irqvm(&[
        "trace", "report", trace_arg, "--focus", "0x05", "--svg", svg_arg,
    ]);
    assert_eq!(status, 2, "no vector 0x05 in the trace: {err}");
    let _ = std::fs::remove_file(trace);
    let _ = std::fs::remove_file(svg);
}

/// `run --kvm-stats` (its `kvm-stats` thread under the binary's seccomp filters) writes KVM's
/// statistics of the VM fd and the summed vCPU fds, one block at the end marked `end=1`, with
/// the vCPUs' exits to irqvm (the `hello` guest's serial output) counted.
#[test]
fn run_kvm_stats_writes_the_vm_and_vcpu_statistics() {
    let file = std::env::temp_dir().join(format!("irqvm-cli-kvm-stats-{}.txt", std::process::id()));
    let kernel = common::guest_path("hello");
    let path = file.to_str().unwrap();
    let (status, out, err) = irqvm(&[
        "run",
        "--kernel",
        &kernel,
        "--cpus",
        "2",
        "--irqchip",
        "kernel",
        "--kvm-stats",
        path,
    ]);
    assert_eq!(status, 1, "{out}\n{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let value = |name: &str| {
        last.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(|v| v.parse::<u64>().unwrap())
    };
    assert!(last.starts_with("t="), "{text}");
    assert_eq!(value("end"), Some(1), "{text}");
    assert!(value("vm.mmu_cache_miss").is_some(), "{text}");
    // Every port write of the serial output leaves KVM_RUN (kvm_pvm counts no `io_exits`).
    assert!(value("vcpu.exits").unwrap() > 0, "{text}");
}

/// `--kvm-stats-every` needs `--kvm-stats` and a positive period.
#[test]
fn kvm_stats_every_needs_a_file_and_a_positive_period() {
    let kernel = common::guest_path("hello");
    let (status, _, err) = irqvm(&["run", "--kernel", &kernel, "--kvm-stats-every", "1"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("--kvm-stats"), "{err}");
    let file =
        std::env::temp_dir().join(format!("irqvm-cli-kvm-stats0-{}.txt", std::process::id()));
    let path = file.to_str().unwrap();
    let (status, _, err) = irqvm(&[
        "run",
        "--kernel",
        &kernel,
        "--kvm-stats",
        path,
        "--kvm-stats-every",
        "0",
    ]);
    let _ = std::fs::remove_file(&file);
    assert_ne!(status, 1, "{err}");
    assert!(
        err.contains("--kvm-stats-every must be a positive number"),
        "{err}"
    );
}
