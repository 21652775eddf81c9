//! The control API from a test: requests with curl on the Unix socket, and waiting for an
//! `irqvm` child process to listen.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// One curl request: (HTTP status, body); status 0 if no answer came (the VMM went away).
/// Generous time limit: a migration answers when it is over.
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "60", "-w", "\n%{http_code}", "-X", method])
        .arg("--unix-socket")
        .arg(sock)
        .arg(format!("http://localhost{path}"));
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd
        .output()
        .expect("curl must be installed (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    // curl prints 000 when nothing answered.
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Waits (up to 20 s) until `sock` exists, failing if `child` exits first.
pub fn wait_for_socket(sock: &Path, child: &mut Child) {
    let start = Instant::now();
    while !sock.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("irqvm exited with {status} before listening");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A small xorshift: the test's random moments, from a seed it prints.
pub struct Rng(u64);

impl Rng {
    pub fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        eprintln!("test seed {seed}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The `--irqchip` value of `mode`.
pub fn mode_name(mode: irqvm::IrqchipMode) -> &'static str {
    match mode {
        irqvm::IrqchipMode::User => "user",
        irqvm::IrqchipMode::Split => "split",
        irqvm::IrqchipMode::Kernel => "kernel",
    }
}

/// The `irqvm` binary under test.
pub fn irqvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_irqvm"))
}

/// `irqvm run` of the guest test program `guest` on `cpus` vCPUs in `mode` (`extra` options
/// after), its API on `sock`, stdout and stderr piped; returns once the API listens.
pub fn run_with_api(
    guest: &str,
    cpus: u32,
    mode: irqvm::IrqchipMode,
    extra: &[&str],
    sock: &Path,
) -> Child {
    let mut child = irqvm()
        .args(["run", "--kernel", &super::guest_path(guest)])
        .args(["--cpus", &cpus.to_string(), "--irqchip", mode_name(mode)])
        .args(extra)
        .arg("--api-sock")
        .arg(sock)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(sock, &mut child);
    child
}
