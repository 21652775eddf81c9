//! Runs a guest kernel and prints KVM's own per-vCPU statistics for it (KVM_GET_STATS_FD, Linux
//! Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD"): the binary stats of each vCPU fd, read
//! from this process (KVM answers a vCPU ioctl only from the VM's own process) while the guest
//! runs; the last reading before the guest stops is printed. Made for `tlb_shootdown`
//! (docs/kvm-facts.md, "Remote TLB flushes here"): `preemption_reported` counts the times KVM
//! marked a descheduled vCPU PREEMPTED in its steal-time record, `preemption_other` the times it
//! did not because the vCPU had not left the guest at an instruction boundary.
//!
//!     cargo run -p irqvm --example kvm_stats -- KERNEL.elf CPUS user|split|kernel ["CMDLINE"] [STAT...]
//!
//! With no STAT names, every statistic is printed.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use irqvm::vm::{Vm, VmConfig};
use irqvm::IrqchipMode;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xCE;

/// The vCPU fds of this process, by their `anon_inode:kvm-vcpu:N` link.
fn vcpu_fds() -> Vec<(String, i32)> {
    let mut fds: Vec<(String, i32)> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| {
            let e = e.ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let link = link.to_string_lossy().into_owned();
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            link.contains("kvm-vcpu").then_some((link, fd))
        })
        .collect();
    fds.sort();
    fds
}

fn pread(file: &File, len: usize, off: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off)
        .expect("pread of the stats fd");
    buf
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

/// A stats fd of `vcpu_fd` (taken before the vCPU runs: a vCPU ioctl waits for KVM_RUN to end).
fn stats_fd(vcpu_fd: i32) -> Option<File> {
    // SAFETY: an ioctl without an argument on a file descriptor this process owns.
    let sfd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD) };
    // SAFETY: KVM just opened `sfd` for this process; nothing else owns it.
    (sfd >= 0).then(|| unsafe { File::from_raw_fd(sfd) })
}

/// Every statistic in a stats fd (the first value of each).
fn read_stats(raw: &File) -> Vec<(String, u64)> {
    let hdr = pread(raw, 24, 0);
    let (name_size, num_desc) = (u32_at(&hdr, 4) as usize, u32_at(&hdr, 8) as usize);
    let (desc_off, data_off) = (u32_at(&hdr, 16) as u64, u32_at(&hdr, 20) as u64);
    let desc_size = 16 + name_size;
    let descs = pread(raw, desc_size * num_desc, desc_off);
    descs
        .chunks(desc_size)
        .map(|d| {
            let offset = u32_at(d, 8) as u64;
            let name = String::from_utf8_lossy(&d[16..])
                .trim_end_matches('\0')
                .to_string();
            let value = u64::from_le_bytes(pread(raw, 8, data_off + offset).try_into().unwrap());
            (name, value)
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, cpus, mode, rest @ ..] = args.as_slice() else {
        eprintln!("usage: kvm_stats KERNEL.elf CPUS user|split|kernel [\"CMDLINE\"] [STAT...]");
        std::process::exit(2);
    };
    let mode = match mode.as_str() {
        "user" => IrqchipMode::User,
        "split" => IrqchipMode::Split,
        "kernel" => IrqchipMode::Kernel,
        m => panic!("mode {m}"),
    };
    let (cmdline, names) = match rest {
        [c, names @ ..] if c.contains('=') || c.is_empty() => (c.clone(), names),
        names => (String::new(), names),
    };
    let name = std::path::Path::new(kernel)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mut cfg = VmConfig::new(std::fs::read(kernel).expect("the kernel"), &name);
    cfg.cpus = cpus.parse().expect("a vCPU count");
    cfg.irqchip = mode;
    cfg.cmdline = cmdline;
    let vm = Vm::new(&cfg).expect("the VM");
    let fds: Vec<(String, File)> = vcpu_fds()
        .into_iter()
        .filter_map(|(link, fd)| Some((link, stats_fd(fd)?)))
        .collect();
    if fds.is_empty() {
        eprintln!("KVM_GET_STATS_FD refused on every vCPU fd");
    }
    let vm = vm.start().expect("started");
    let mut last: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    while vm.vcpu(0).state() != irqvm::vcpu::VcpuState::Stopped {
        last = fds
            .iter()
            .map(|(l, f)| (l.clone(), read_stats(f)))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = vm.wait(Some(Duration::from_secs(120)));
    eprintln!("run: {:?}", report.map(|r| r.exit));
    for (link, stats) in last {
        let shown: Vec<String> = stats
            .iter()
            .filter(|(n, _)| names.is_empty() || names.contains(n))
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        println!("{link}: {}", shown.join(" "));
    }
}
