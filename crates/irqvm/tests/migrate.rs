//! Live migration through the `irqvm` binary: a source `irqvm run --api-sock` migrated with
//! `PUT /api/v1/vm.send-migration` to an `irqvm restore --incoming PATH` target at a random
//! moment of the `snapstorm` guest (IPIs between all vCPUs, NMIs, edge and level IOAPIC lines,
//! MSIs, the three LAPIC timer modes, an AP in wait-for-SIPI: every interrupt counted exactly
//! once), in each of the 9 (source, target) irqchip mode pairs; the guest's checks over both
//! halves of its life must be exactly its expectations. And a migration that cannot start
//! leaves the source running to its normal end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::api::{curl, irqvm, mode_name, run_with_api, wait_for_socket, Rng};
use common::expect::Expectations;
use irqvm::IrqchipMode;

const MODES: [IrqchipMode; 3] = [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel];
const GUEST: &str = "snapstorm";
const CPUS: u32 = 4;

fn socket(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("irqvm-mig-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// The source: snapstorm with rounds enough to be running at the moment on an idle host.
fn source(mode: IrqchipMode, api: &Path) -> Child {
    run_with_api(GUEST, CPUS, mode, &["--cmdline", "rounds=80"], api)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn migration_body(incoming: &Path) -> String {
    format!(r#"{{"destination_url": "unix:{}"}}"#, incoming.display())
}

/// With `"final_pages": 0`: copy rounds while the guest runs until one finds nothing dirty (or
/// the most rounds), so the rounds after the first are exercised too.
fn rounds_body(incoming: &Path) -> String {
    format!(
        r#"{{"destination_url": "unix:{}", "final_pages": 0}}"#,
        incoming.display()
    )
}

/// One migration after `delay`: `Some(report)` once the target's guest ran to its end with its
/// checks as expected; `None` if the guest had ended before the migration (try earlier).
fn migrate_once(
    from: IrqchipMode,
    to: IrqchipMode,
    delay: Duration,
    tag: &str,
    body: fn(&Path) -> String,
) -> Option<serde_json::Value> {
    let (api, incoming) = (socket(&format!("{tag}-api")), socket(&format!("{tag}-in")));
    let mut target = irqvm()
        .args(["restore", "--incoming"])
        .arg(&incoming)
        .args(["--irqchip", mode_name(to), "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&incoming, &mut target);
    let src = source(from, &api);
    std::thread::sleep(delay);
    let (status, body) = curl(
        &api,
        "PUT",
        "/api/v1/vm.send-migration",
        Some(&body(&incoming)),
    );
    let src = src.wait_with_output().unwrap();
    let before = text(&src.stdout);
    let what = format!("{from:?} -> {to:?} after {delay:?}");
    if status != 200 {
        // The target still waits for a source: it is ours to end.
        let _ = target.kill();
        let _ = target.wait();
        let _ = std::fs::remove_file(&incoming);
        if common::expect::done_counts(&before).is_some() {
            return None;
        }
        panic!(
            "{what}: vm.send-migration answered {status} {body}\n{before}\n{}",
            text(&src.stderr)
        );
    }
    assert_eq!(
        src.status.code(),
        Some(0),
        "{what}: the source ends after the migration"
    );
    let out = target.wait_with_output().unwrap();
    let after = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: target exit status\n{after}\n{}",
        text(&out.stderr)
    );
    let whole = format!("{before}{after}");
    if let Err(problems) = Expectations::load(GUEST).verify(to, CPUS, &whole) {
        panic!("{what}:\n{problems}\n--- source ---\n{before}--- target ---\n{after}");
    }
    Some(serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}")))
}

/// The 9 pairs, each at a random moment of the storm's first 2 s (earlier if the guest was
/// already over). The report names rounds, final pages and a downtime. Every other pair copies
/// rounds until none finds a dirty page (`"final_pages": 0`): the storm keeps dirtying its
/// counters, so those run several rounds while the guest runs.
#[test]
fn snapstorm_migrates_in_every_mode_pair() {
    let _guard = common::exclusive();
    let mut rng = Rng::from_clock();
    let mut pair = 0;
    for from in MODES {
        for to in MODES {
            pair += 1;
            let body = if pair % 2 == 0 {
                rounds_body
            } else {
                migration_body
            };
            let tag = format!("{}-{}", mode_name(from), mode_name(to));
            let mut delay = Duration::from_millis(rng.below(2000));
            let report = loop {
                eprintln!("{from:?} -> {to:?}: migration after {delay:?}");
                if let Some(report) = migrate_once(from, to, delay, &tag, body) {
                    break report;
                }
                assert!(
                    delay > Duration::from_millis(10),
                    "snapstorm always ended first"
                );
                delay /= 2;
            };
            eprintln!("{from:?} -> {to:?}: {report}");
            assert!(
                report["rounds"].as_array().is_some_and(|r| !r.is_empty()),
                "{report}"
            );
            assert!(report["rounds"][0]["pages"].as_u64() > Some(0), "{report}");
            assert!(report["downtime_ms"].as_f64() > Some(0.0), "{report}");
            assert_eq!(report["target"]["irqchip"], mode_name(to), "{report}");
            if pair % 2 == 0 {
                let rounds = report["rounds"].as_array().map_or(0, Vec::len);
                assert!(rounds > 1, "rounds while the guest ran: {report}");
            }
        }
    }
}

/// A migration to a socket nobody listens on is refused (400, JSON) before anything changes,
/// and one with a bad URL too; the source keeps running and its guest ends as expected.
#[test]
fn a_migration_that_cannot_start_leaves_the_source_running() {
    let _guard = common::exclusive();
    let api = socket("nobody-api");
    let nobody = socket("nobody-in");
    let src = source(IrqchipMode::User, &api);
    for body in [
        migration_body(&nobody),
        r#"{"destination_url": "tcp:localhost:4444"}"#.to_string(),
        r#"{"destination_url": "unix:relative.sock"}"#.to_string(),
        r#"{"destination": "unix:/tmp/x"}"#.to_string(),
    ] {
        let (status, text) = curl(&api, "PUT", "/api/v1/vm.send-migration", Some(&body));
        assert!((400..500).contains(&status), "{body}: {status} {text}");
        assert!(text.contains("\"error\""), "{body}: {text}");
    }
    let (status, info) = curl(&api, "GET", "/api/v1/vm.info", None);
    assert_eq!(status, 200);
    assert!(info.contains(r#""state":"running""#), "{info}");
    let out = src.wait_with_output().unwrap();
    let output = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{output}");
    if let Err(problems) = Expectations::load(GUEST).verify(IrqchipMode::User, CPUS, &output) {
        panic!("{problems}\n{output}");
    }
}

/// A stand-in target that reads the whole stream (hello, page records, the state) and refuses the
/// VM: the source must resume its guest, which ends as expected with nothing lost.
fn refusing_target(listener: std::os::unix::net::UnixListener) -> std::thread::JoinHandle<u64> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 20];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"IRQVMMIG");
        let mut pages = 0u64;
        loop {
            let mut tag = [0u8; 1];
            s.read_exact(&mut tag).unwrap();
            match tag[0] {
                1 => {
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head).unwrap();
                    let count = u32::from_le_bytes(head[8..12].try_into().unwrap());
                    let mut data = vec![0u8; count as usize * 4096];
                    s.read_exact(&mut data).unwrap();
                    pages += u64::from(count);
                }
                2 => {
                    let mut len = [0u8; 8];
                    s.read_exact(&mut len).unwrap();
                    let mut state = vec![0u8; u64::from_le_bytes(len) as usize];
                    s.read_exact(&mut state).unwrap();
                    break;
                }
                other => panic!("record tag {other}"),
            }
        }
        let why = b"refused by the test";
        s.write_all(&[1]).unwrap();
        s.write_all(&(why.len() as u32).to_le_bytes()).unwrap();
        s.write_all(why).unwrap();
        pages
    })
}

/// The target refuses the VM once it was sent whole: `vm.send-migration` fails naming the
/// reason, the source resumes, and its guest's checks still come out as expected.
#[test]
fn a_refused_migration_resumes_the_source() {
    let _guard = common::exclusive();
    let (api, incoming) = (socket("refused-api"), socket("refused-in"));
    let target = refusing_target(std::os::unix::net::UnixListener::bind(&incoming).unwrap());
    let src = source(IrqchipMode::User, &api);
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = curl(
        &api,
        "PUT",
        "/api/v1/vm.send-migration",
        Some(&migration_body(&incoming)),
    );
    let out = src.wait_with_output().unwrap();
    let output = text(&out.stdout);
    let _ = std::fs::remove_file(&incoming);
    assert_eq!(status, 500, "{body}\n{output}");
    assert!(body.contains("refused by the test"), "{body}");
    assert!(target.join().unwrap() > 0, "pages were sent");
    assert_eq!(out.status.code(), Some(1), "{output}");
    if let Err(problems) = Expectations::load(GUEST).verify(IrqchipMode::User, CPUS, &output) {
        panic!("{problems}\n{output}");
    }
}
