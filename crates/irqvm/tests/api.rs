//! The control API driven with curl (Debian's `curl`) in every irqchip mode:
//! - the `irqvm` binary with `--api-sock` on a spinning 2-vCPU guest: state, pause/resume,
//!   bad requests (each a 4xx with `{"error": ...}`, the VM running untouched), INIT/SIPI of
//!   the AP from the host, lines, MSIs, `vm.shutdown`;
//! - the storm guest on 2 vCPUs while the API is hammered with state queries and pauses: it must
//!   still count every IPI and every device interrupt exactly once (guests/expect/storm.txt).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api::{curl, mode_name, wait_for_socket};
use irqvm::api::model::{PlatformInfo, VcpuInfo, VmInfo};
use irqvm::api::ApiServer;
use irqvm::devices::SerialCapture;
use irqvm::vcpu::VcpuState;
use irqvm::vm::RunningVm;
use irqvm::IrqchipMode;

const MODES: [IrqchipMode; 3] = [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel];

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("irqvm-api-{}-{tag}.sock", std::process::id()))
}

fn get<T: serde::de::DeserializeOwned>(sock: &Path, path: &str) -> T {
    let (code, body) = curl(sock, "GET", path, None);
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// Asserts a refusal: `status` and a JSON `{"error": "..."}` body.
fn refused(sock: &Path, method: &str, path: &str, body: Option<&str>, status: u16) {
    let (code, text) = curl(sock, method, path, body);
    assert_eq!(code, status, "{method} {path} {body:?}: {text}");
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{text}");
}

/// Polls vCPU `index` until `pred` holds (2 s).
fn wait_vcpu(sock: &Path, index: usize, pred: impl Fn(&VcpuInfo) -> bool) -> VcpuInfo {
    let start = Instant::now();
    loop {
        let info: VcpuInfo = get(sock, &format!("/api/v1/vcpus/{index}"));
        if pred(&info) || start.elapsed() > Duration::from_secs(2) {
            return info;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The API of one `irqvm run --api-sock` on `jmp $` with 2 vCPUs (the AP waits for its SIPI).
fn drive_the_binary(mode: IrqchipMode) {
    let dir = std::env::temp_dir();
    let kernel = dir.join(format!("irqvm-api-spin-{}.bin", std::process::id()));
    std::fs::write(&kernel, common::SPIN).unwrap();
    let sock = socket_path(mode_name(mode));
    let mut child = Command::new(env!("CARGO_BIN_EXE_irqvm"))
        .args([
            "run",
            "--cpus",
            "2",
            "--raw-at",
            "0x100000",
            "--timeout",
            "40",
        ])
        .args(["--irqchip", mode_name(mode)])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn irqvm");
    wait_for_socket(&sock, &mut child);
    check_api(&sock, mode);
    // vm.shutdown ends the VM as a host stop: status 0, socket removed.
    assert_eq!(curl(&sock, "PUT", "/api/v1/vm.shutdown", None).0, 204);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > common::HARNESS_TIMEOUT {
            let _ = child.kill();
            panic!("irqvm did not end after vm.shutdown");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the socket outlived the VM");
    let _ = std::fs::remove_file(kernel);
}

fn check_api(sock: &Path, mode: IrqchipMode) {
    let info: VmInfo = get(sock, "/api/v1/vm.info");
    assert_eq!(info.state, "running");
    assert_eq!(info.irqchip, mode_name(mode));
    assert_eq!(info.vcpus, 2);
    let ap = wait_vcpu(sock, 1, |v| v.mp_state == "uninitialized");
    assert_eq!(ap.mp_state, "uninitialized", "{ap:?}");
    let bsp: VcpuInfo = get(sock, "/api/v1/vcpus/0");
    assert_eq!((bsp.mp_state.as_str(), bsp.rip), ("runnable", 0x10_0000));
    assert_eq!((bsp.lapic.id, bsp.lapic.mode.as_str()), (0, "xapic"));
    assert_eq!(ap.lapic.id, 1);

    check_bad_requests(sock);
    check_pause(sock, mode);
    check_lines_and_msis(sock);

    // The flight recorder through the API, around the host's INIT, SIPI and NMI.
    let trace = trace_start(sock, mode);
    let pulse = r#"{"gsi": 5, "action": "pulse"}"#;
    assert_eq!(curl(sock, "PUT", "/api/v1/irq.line", Some(pulse)).0, 204);
    let msi = r#"{"address": 4276092928, "data": 48}"#;
    let (code, answer) = curl(sock, "PUT", "/api/v1/irq.msi", Some(msi));
    assert_eq!(code, 200, "{answer}");
    let msi_reached = answer.contains("true");
    // INIT-SIPI from the host starts the AP at vector << 12 in real mode.
    let delivered = (200, r#"{"delivered":true}"#.to_string());
    assert_eq!(curl(sock, "PUT", "/api/v1/vcpus/1/init", None), delivered);
    let ap = wait_vcpu(sock, 1, |v| v.mp_state == "init_received");
    assert_eq!(ap.mp_state, "init_received", "{ap:?}");
    let sipi = Some(r#"{"vector": 16}"#);
    assert_eq!(curl(sock, "PUT", "/api/v1/vcpus/1/sipi", sipi), delivered);
    let ap = wait_vcpu(sock, 1, |v| v.mp_state == "runnable");
    assert_eq!(ap.mp_state, "runnable", "{ap:?}");
    // Real mode at 0x10000: CS = vector << 8, so RIP counts from 0 within that segment.
    assert!(ap.rip < 0x1_0000, "{ap:?}");
    assert_eq!(curl(sock, "PUT", "/api/v1/vcpus/1/nmi", None), delivered);
    let info: VmInfo = get(sock, "/api/v1/vm.info");
    assert_eq!(info.state, "running", "{info:?}");
    if mode == IrqchipMode::User {
        // The user backend injects the host's NMI with KVM_NMI and counts it.
        let start = Instant::now();
        loop {
            let counters: serde_json::Value = get(sock, "/api/v1/vm.counters");
            if counters["vcpu1"]["nmis_injected"].as_u64() == Some(1) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(2), "{counters}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let counters: serde_json::Value = get(sock, "/api/v1/vm.counters");
    assert!(
        counters["vcpu0"]["kvm_runs"].as_u64().unwrap() > 0,
        "{counters}"
    );
    trace_stop(sock, mode, &trace, msi_reached);
}

/// `trace.start` with a file that cannot be created is refused (400); a good one starts the
/// recorder, and a second start is refused (409) while it records.
fn trace_start(sock: &Path, mode: IrqchipMode) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "irqvm-api-trace-{}-{}.json",
        std::process::id(),
        mode_name(mode)
    ));
    let body = |p: &Path| serde_json::json!({ "path": p }).to_string();
    let bad = Path::new("/nonexistent-dir/t.json");
    refused(sock, "PUT", "/api/v1/trace.start", Some(&body(bad)), 400);
    refused(sock, "PUT", "/api/v1/trace.stop", None, 409);
    let (code, text) = curl(sock, "PUT", "/api/v1/trace.start", Some(&body(&path)));
    assert_eq!(code, 204, "{text}");
    refused(sock, "PUT", "/api/v1/trace.start", Some(&body(&path)), 409);
    path
}

/// `trace.stop` writes the file: it parses, nothing was dropped, vCPU 1's exits are there in
/// every mode; in `user` and `split` mode the host's line pulse is a rise and a fall of GSI 5,
/// its MSI one post of source `msi` (to vCPU 0 in `user` mode if its LAPIC took it, else
/// without a target and marked as reaching none, as always in `split`, where KVM takes it),
/// and its INIT, SIPI and NMI to vCPU 1 are posts of source `host` in that order; in `user`
/// mode the AP accepts INIT and SIPI and the NMI is injected.
fn trace_stop(sock: &Path, mode: IrqchipMode, path: &Path, msi_reached: bool) {
    let (code, text) = curl(sock, "PUT", "/api/v1/trace.stop", None);
    assert_eq!(code, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["dropped_events"], 0, "{answer}");
    assert!(answer["events"].as_u64().unwrap() > 0, "{answer}");
    refused(sock, "PUT", "/api/v1/trace.stop", None, 409);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let _ = std::fs::remove_file(path);
    let events = json["traceEvents"].as_array().unwrap();
    let has = |pred: &dyn Fn(&serde_json::Value) -> bool| events.iter().any(pred);
    // The queries kick vCPU 1 out of the guest (or, in `kernel` mode, out of KVM's wait for
    // its SIPI): each return from KVM_RUN is an exit on its track.
    assert!(
        has(&|e| e["name"] == "guest" && e["tid"] == 1),
        "no guest time"
    );
    assert_eq!(json["otherData"]["irqchip"], mode_name(mode));
    if mode == IrqchipMode::Kernel {
        return;
    }
    let trace = irqvm::trace::report::parse(&json).unwrap();
    let deliveries = irqvm::trace::report::deliveries(&trace);
    let host: Vec<&str> = deliveries
        .iter()
        .filter(|d| d.source == "host" && d.target == Some(1))
        .map(|d| d.delivery.as_str())
        .collect();
    assert_eq!(host, ["init", "startup", "nmi"], "{host:?}");
    let lines: Vec<&str> = trace
        .slices
        .iter()
        .filter(|s| s.cat == "line" && s.tid == irqvm::trace::chrome::TID_LINES)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(lines, ["line 5 high", "line 5 low"]);
    let msis: Vec<(u8, Option<u64>)> = deliveries
        .iter()
        .filter(|d| d.source == "msi")
        .map(|d| (d.vector, d.target))
        .collect();
    let target = (mode == IrqchipMode::User && msi_reached).then_some(0);
    assert_eq!(msis, [(0x30, target)]);
    let reached: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["cat"] == "post" && e["args"]["source"] == "msi")
        .map(|e| &e["args"]["reached"])
        .collect();
    let none = serde_json::Value::from("none");
    let want = if msi_reached {
        &serde_json::Value::Null
    } else {
        &none
    };
    assert_eq!(reached, [want], "reached: {msi_reached}");
    if mode != IrqchipMode::User {
        return;
    }
    for name in ["init_accept", "sipi_accept"] {
        assert!(has(&|e| e["name"] == name && e["tid"] == 1), "no {name}");
    }
    assert!(has(&|e| e["cat"] == "inject"
        && e["args"]["kind"] == "nmi"
        && e["tid"] == 1));
}

fn check_bad_requests(sock: &Path) {
    refused(sock, "GET", "/api/v1/no.such", None, 404);
    refused(sock, "GET", "/nope", None, 404);
    refused(sock, "DELETE", "/api/v1/vm.info", None, 405);
    refused(sock, "GET", "/api/v1/vm.pause", None, 405);
    refused(sock, "GET", "/api/v1/vcpus/7", None, 404);
    refused(sock, "PUT", "/api/v1/vcpus/7/nmi", None, 404);
    refused(sock, "PUT", "/api/v1/vm.resume", None, 409);
    refused(sock, "PUT", "/api/v1/irq.line", Some("{\"gsi\": "), 400);
    refused(
        sock,
        "PUT",
        "/api/v1/irq.line",
        Some(r#"{"gsi": 40, "action": "pulse"}"#),
        400,
    );
    refused(
        sock,
        "PUT",
        "/api/v1/irq.line",
        Some(r#"{"gsi": 4, "action": "wiggle"}"#),
        400,
    );
    // Outside 0xFEExxxxx, and a reserved delivery mode (SDM vol. 3 §11.11).
    refused(
        sock,
        "PUT",
        "/api/v1/irq.msi",
        Some(r#"{"address": 4096, "data": 48}"#),
        400,
    );
    let reserved = r#"{"address": 4276092928, "data": 816}"#;
    refused(sock, "PUT", "/api/v1/irq.msi", Some(reserved), 400);
    refused(sock, "PUT", "/api/v1/vcpus/1/sipi", Some("[]"), 400);
    let huge = format!("{{\"gsi\": 1, \"action\": \"{}\"}}", "a".repeat(70_000));
    refused(sock, "PUT", "/api/v1/irq.line", Some(&huge), 413);
    // Not HTTP at all: the server answers 400 and goes on serving.
    let mut raw = std::os::unix::net::UnixStream::connect(sock).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GARBAGE\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let info: VmInfo = get(sock, "/api/v1/vm.info");
    assert_eq!(
        info.state, "running",
        "a bad request changed the VM: {info:?}"
    );
}

fn check_pause(sock: &Path, mode: IrqchipMode) {
    assert_eq!(curl(sock, "PUT", "/api/v1/vm.pause", None).0, 204);
    refused(sock, "PUT", "/api/v1/vm.pause", None, 409);
    let info: VmInfo = get(sock, "/api/v1/vm.info");
    assert_eq!(info.state, "paused");
    assert!(
        info.vcpu_threads.iter().all(|t| t != "running"),
        "a vCPU runs while paused: {info:?}"
    );
    // The AP waits for its SIPI: blocked outside KVM_RUN in user mode, where the pause leaves it
    // blocked; inside KVM_RUN in the other modes, which the pause kicks it out of.
    let ap = if mode == IrqchipMode::User {
        "waiting_for_sipi"
    } else {
        "paused"
    };
    assert_eq!(info.vcpu_threads, ["paused", ap]);
    // Paused vCPUs still answer, and stay where they were.
    let a: VcpuInfo = get(sock, "/api/v1/vcpus/0");
    let b: VcpuInfo = get(sock, "/api/v1/vcpus/0");
    assert_eq!((a.thread.as_str(), a.rip), ("paused", b.rip));
    assert_eq!(curl(sock, "PUT", "/api/v1/vm.resume", None).0, 204);
    let info: VmInfo = get(sock, "/api/v1/vm.info");
    assert_eq!(info.state, "running");
}

fn check_lines_and_msis(sock: &Path) {
    let assert = r#"{"gsi": 3, "action": "assert"}"#;
    assert_eq!(curl(sock, "PUT", "/api/v1/irq.line", Some(assert)).0, 204);
    let platform: PlatformInfo = get(sock, "/api/v1/platform");
    assert_eq!(platform.pics.len(), 2);
    assert!(platform.ioapic.pins.len() >= 24);
    assert!(
        platform.ioapic.pins[3].asserted,
        "{:?}",
        platform.ioapic.pins[3]
    );
    assert!(platform.gsi_routing.iter().any(|r| r.gsi == 3));
    let deassert = r#"{"gsi": 3, "action": "deassert"}"#;
    assert_eq!(curl(sock, "PUT", "/api/v1/irq.line", Some(deassert)).0, 204);
    let platform: PlatformInfo = get(sock, "/api/v1/platform");
    assert!(!platform.ioapic.pins[3].asserted);
    let pulse = r#"{"gsi": 5, "action": "pulse"}"#;
    assert_eq!(curl(sock, "PUT", "/api/v1/irq.line", Some(pulse)).0, 204);
    // Fixed, vector 0x30, to APIC 0.
    let msi = r#"{"address": 4276092928, "data": 48}"#;
    let (code, body) = curl(sock, "PUT", "/api/v1/irq.msi", Some(msi));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("delivered"), "{body}");
}

#[test]
fn the_binary_serves_the_api_in_every_mode() {
    for mode in MODES {
        let _one = common::exclusive();
        drive_the_binary(mode);
    }
}

/// What the hammering thread saw.
#[derive(Debug, Default)]
struct Hammered {
    queries: u32,
    pauses: u32,
}

/// Beside storm's host-line pulser: state queries and pause/resume cycles until the VM ends.
fn hammer(vm: &RunningVm, capture: &SerialCapture) -> (common::HostLine, Hammered) {
    let sock = socket_path(&format!("storm-{}", vm.vcpu_count()));
    let server = ApiServer::start(&sock, vm.handle()).expect("API server");
    let mut seen = Hammered::default();
    let host = std::thread::scope(|s| {
        let pulser = s.spawn(|| common::pulse_host_line(vm, capture));
        let over = || vm.vcpu(0).state() == VcpuState::Stopped;
        // The API refuses (409) as soon as the guest's exit asks the VM to stop, which comes
        // before vCPU 0's thread reports itself stopped (a run that ended right there once
        // failed): a refusal is the end if vCPU 0 is stopped within a few seconds of it.
        let ended = |code: u16| {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while code == 409 && !over() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            over()
        };
        while !over() {
            // A pause/resume cycle first: the first one comes right after the VM started, long
            // before the storm can end, so every run pauses the VM at least once.
            let (code, body) = curl(&sock, "PUT", "/api/v1/vm.pause", None);
            if code == 204 {
                seen.pauses += 1;
                let (code, body) = curl(&sock, "GET", "/api/v1/vcpus/1", None);
                assert!(code == 200 || ended(code), "{code} {body}");
                assert_eq!(curl(&sock, "PUT", "/api/v1/vm.pause", None).0, 409);
                let (code, body) = curl(&sock, "PUT", "/api/v1/vm.resume", None);
                assert!(code == 204 || ended(code), "resume: {code} {body}");
            } else {
                assert!(ended(code), "pause: {code} {body}");
            }
            for path in [
                "/api/v1/vm.info",
                "/api/v1/vcpus",
                "/api/v1/platform",
                "/api/v1/vm.counters",
            ] {
                let (code, body) = curl(&sock, "GET", path, None);
                // A request racing with the guest's end may find a vCPU stopped (409).
                assert!(code == 200 || ended(code), "GET {path}: {code} {body}");
                seen.queries += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        pulser.join().expect("the pulsing thread panicked")
    });
    drop(server);
    (host, seen)
}

#[test]
fn storm_counts_exactly_once_while_the_api_is_hammered() {
    for mode in MODES {
        let _one = common::exclusive();
        let (run, out) = common::run_with_host_thread("storm", mode, 2, hammer);
        let (host, seen) =
            out.unwrap_or_else(|_| panic!("{mode:?}: hammering panicked:\n{}", run.output));
        let what = format!("storm under the API, {mode:?}");
        common::assert_storm_counts_exact(&run, mode, 2, &host, &what);
        assert!(seen.pauses > 0 && seen.queries > 0, "{what}: {seen:?}");
        eprintln!("{what}: {seen:?}");
    }
}
