//! `irqvm run --kvm-stats FILE`: KVM's own statistics of the VM, written as `name=value` lines.
//!
//! KVM exposes binary statistics on a file descriptor it opens for a VM fd or a vCPU fd
//! (KVM_GET_STATS_FD, Linux Documentation/virt/kvm/api.rst "KVM_GET_STATS_FD"): a header, one
//! descriptor per statistic (name, type, offset) and a data block read with `pread`. The VM fd's
//! statistics are those of the MMU (shadow pages made, zapped, recycled, unsync; remote TLB
//! flushes) and include whatever a host's KVM adds; the vCPU ones (exits, page faults,
//! `mmu_cache_miss`...) are summed over the vCPUs. A diagnostic for the 2-vCPU wrong-page reads
//! (docs/kvm-facts.md, "User-mode reads through a page the guest does not map"): it compares
//! what a guest drives in the host MMU with what another drives.
//!
//! The stats fds are taken before the vCPUs run (a vCPU ioctl waits for KVM_RUN to end; the
//! stats fd does not), and a `kvm-stats` thread reads them every `--kvm-stats-every` seconds
//! and once when the VM ends, appending one block per reading to FILE:
//!
//! ```text
//! t=10.002
//! vm.remote_tlb_flush=1234
//! vcpu.exits=56789
//! ...
//! <blank line>
//! ```
//!
//! `t` is seconds since the recorder started. The last block is the final reading (after
//! `end=1`). Histogram statistics are left out (one line per bucket would drown the rest).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::seccomp::{self, Role, ThreadFilter};

/// `_IO(KVMIO, 0xce)` (linux/kvm.h), not wrapped by kvm-ioctls 0.25.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xCE;

/// `KVM_STATS_TYPE_MASK` and the types of linux/kvm.h that are one value each.
const STATS_TYPE_MASK: u32 = 0xF;
const STATS_TYPE_CUMULATIVE: u32 = 0;
const STATS_TYPE_INSTANT: u32 = 1;
const STATS_TYPE_PEAK: u32 = 2;

/// Errors setting up the recorder (reading stats later only logs: the VM matters more).
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    #[error("KVM_GET_STATS_FD on the {what} fd: {source}")]
    StatsFd {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("reading KVM's stats descriptors of the {what} fd: {source}")]
    Descriptors {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create --kvm-stats file {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// How a statistic combines over vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    Sum,
    Max,
}

/// One single-valued statistic of a stats fd.
#[derive(Clone, Debug)]
struct Desc {
    name: String,
    offset: u64,
    combine: Combine,
}

/// A stats fd and its descriptors (read once: they do not change for the fd's life).
#[derive(Debug)]
struct StatsFile {
    file: File,
    descs: Vec<Desc>,
    data_offset: u64,
    data_len: usize,
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn read_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

impl StatsFile {
    /// The stats fd of `fd` (a VM or vCPU fd of this process), `what` naming it in errors.
    fn open(fd: &impl AsRawFd, what: &str) -> Result<Self, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new fd; `fd` is a
        // live KVM fd borrowed for the call.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD) };
        if raw < 0 {
            return Err(KvmStatsError::StatsFd {
                what: what.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: KVM just opened `raw` for this process and nothing else owns it.
        let file = unsafe { File::from_raw_fd(raw) };
        Self::parse(file).map_err(|source| KvmStatsError::Descriptors {
            what: what.to_string(),
            source,
        })
    }

    /// Reads `struct kvm_stats_header` and the `struct kvm_stats_desc` array after it.
    fn parse(file: File) -> io::Result<Self> {
        let header = read_at(&file, 24, 0)?;
        let name_size = u32_at(&header, 4) as usize;
        let count = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        let desc_size = 16 + name_size;
        let raw = read_at(&file, desc_size * count, desc_offset)?;
        let mut descs = Vec::new();
        let mut data_len = 0;
        for d in raw.chunks(desc_size) {
            let (flags, size, offset) = (u32_at(d, 0), u16_at(d, 6), u32_at(d, 8));
            data_len = data_len.max(offset as usize + 8 * size as usize);
            let combine = match flags & STATS_TYPE_MASK {
                STATS_TYPE_CUMULATIVE | STATS_TYPE_INSTANT => Combine::Sum,
                STATS_TYPE_PEAK => Combine::Max,
                _ => continue, // histograms
            };
            if size != 1 {
                continue;
            }
            let name = String::from_utf8_lossy(&d[16..])
                .trim_end_matches('\0')
                .to_string();
            descs.push(Desc {
                name,
                offset: u64::from(offset),
                combine,
            });
        }
        Ok(Self {
            file,
            descs,
            data_offset,
            data_len,
        })
    }

    /// Every single-valued statistic now, in descriptor order (one `pread` of the data block).
    fn read(&self) -> io::Result<Vec<u64>> {
        let data = read_at(&self.file, self.data_len, self.data_offset)?;
        Ok(self
            .descs
            .iter()
            .map(|d| {
                let i = d.offset as usize;
                u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"))
            })
            .collect())
    }
}

/// The stats fds of one VM: its VM fd's and each vCPU fd's.
#[derive(Debug)]
pub struct KvmStats {
    vm: StatsFile,
    vcpus: Vec<StatsFile>,
}

impl KvmStats {
    /// Opens the stats fds of a VM fd and its vCPU fds (before the vCPUs run).
    pub fn open<'a>(
        vm_fd: &impl AsRawFd,
        vcpu_fds: impl IntoIterator<Item = &'a kvm_ioctls::VcpuFd>,
    ) -> Result<Self, KvmStatsError> {
        let vm = StatsFile::open(vm_fd, "VM")?;
        let vcpus = vcpu_fds
            .into_iter()
            .enumerate()
            .map(|(i, fd)| StatsFile::open(fd, &format!("vCPU {i}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { vm, vcpus })
    }

    /// Every statistic now: `vm.NAME` for the VM fd's, `vcpu.NAME` summed over the vCPUs
    /// (the largest for a peak).
    pub fn read(&self) -> io::Result<Vec<(String, u64)>> {
        let mut out: Vec<(String, u64)> = self
            .vm
            .descs
            .iter()
            .zip(self.vm.read()?)
            .map(|(d, v)| (format!("vm.{}", d.name), v))
            .collect();
        out.extend(combine_vcpus(&self.vcpus)?);
        Ok(out)
    }
}

/// The vCPUs' statistics, each combined over the vCPUs (all vCPU fds share one descriptor list).
fn combine_vcpus(vcpus: &[StatsFile]) -> io::Result<Vec<(String, u64)>> {
    let Some(first) = vcpus.first() else {
        return Ok(Vec::new());
    };
    let mut totals = vec![0u64; first.descs.len()];
    for vcpu in vcpus {
        for ((total, value), d) in totals.iter_mut().zip(vcpu.read()?).zip(&first.descs) {
            *total = match d.combine {
                Combine::Sum => total.wrapping_add(value),
                Combine::Max => (*total).max(value),
            };
        }
    }
    Ok(first
        .descs
        .iter()
        .zip(totals)
        .map(|(d, v)| (format!("vcpu.{}", d.name), v))
        .collect())
}

/// One reading as a block of FILE.
fn format_block(seconds: f64, end: bool, stats: &[(String, u64)]) -> String {
    let mut block = format!("t={seconds:.3}\n");
    if end {
        block.push_str("end=1\n");
    }
    for (name, value) in stats {
        block.push_str(&format!("{name}={value}\n"));
    }
    block.push('\n');
    block
}

/// The `kvm-stats` thread: readings every `every` (none: only at the end), the last when
/// [`KvmStatsRecorder::finish`] is called.
#[derive(Debug)]
pub struct KvmStatsRecorder {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl KvmStatsRecorder {
    /// Creates `path` (before the main thread's seccomp filter, which allows no `open`) and
    /// starts the thread, filtered if `seccomp`.
    pub fn start(
        stats: KvmStats,
        path: &Path,
        every: Option<Duration>,
        seccomp: bool,
    ) -> Result<Self, KvmStatsError> {
        let file = File::create(path).map_err(|source| KvmStatsError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        let filter = seccomp
            .then(|| ThreadFilter::new(Role::Stats))
            .transpose()?;
        let (stop, stopped) = mpsc::channel();
        let thread = seccomp::spawn("kvm-stats".into(), filter, move || {
            record(&stats, file, every, &stopped)
        })?;
        Ok(Self { stop, thread })
    }

    /// Takes the last reading and waits for it to be written.
    pub fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

fn record(stats: &KvmStats, mut file: File, every: Option<Duration>, stopped: &mpsc::Receiver<()>) {
    let started = Instant::now();
    loop {
        let end = match every {
            Some(period) => !matches!(stopped.recv_timeout(period), Err(RecvTimeoutError::Timeout)),
            None => {
                let _ = stopped.recv();
                true
            }
        };
        let written = stats.read().and_then(|values| {
            let block = format_block(started.elapsed().as_secs_f64(), end, &values);
            file.write_all(block.as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!("--kvm-stats: {e}");
            return;
        }
        if end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as KVM lays it out: header, two descriptors (a counter and a histogram),
    /// an id string, the data.
    fn synthetic() -> File {
        let name_size = 48usize;
        let mut bytes = vec![0u8; 24];
        let desc_offset = 24 + 16; // after a 16-byte id
        let desc_size = 16 + name_size;
        let data_offset = desc_offset + 3 * desc_size;
        for (i, v) in [
            0u32,
            name_size as u32,
            3,
            24,
            desc_offset as u32,
            data_offset as u32,
        ]
        .iter()
        .enumerate()
        {
            bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        bytes.extend(b"kvm-1234\0\0\0\0\0\0\0\0");
        let desc = |flags: u32, size: u16, offset: u32, name: &str| {
            let mut d = vec![0u8; desc_size];
            d[0..4].copy_from_slice(&flags.to_le_bytes());
            d[6..8].copy_from_slice(&size.to_le_bytes());
            d[8..12].copy_from_slice(&offset.to_le_bytes());
            d[16..16 + name.len()].copy_from_slice(name.as_bytes());
            d
        };
        bytes.extend(desc(STATS_TYPE_CUMULATIVE, 1, 0, "mmu_recycled"));
        bytes.extend(desc(4, 2, 8, "halt_wait_hist"));
        bytes.extend(desc(STATS_TYPE_PEAK, 1, 24, "max_mmu_page_hash_collisions"));
        for v in [7u64, 1, 2, 9] {
            bytes.extend(v.to_le_bytes());
        }
        let mut f = tempfile();
        f.write_all(&bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "irqvm-kvm-stats-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn single_values_are_read_and_histograms_left_out() {
        let s = StatsFile::parse(synthetic()).unwrap();
        let names: Vec<&str> = s.descs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["mmu_recycled", "max_mmu_page_hash_collisions"]);
        assert_eq!(s.read().unwrap(), [7, 9]);
    }

    #[test]
    fn vcpu_counters_sum_and_peaks_take_the_largest() {
        let vcpus = [
            StatsFile::parse(synthetic()).unwrap(),
            StatsFile::parse(synthetic()).unwrap(),
        ];
        assert_eq!(
            combine_vcpus(&vcpus).unwrap(),
            [
                ("vcpu.mmu_recycled".to_string(), 14),
                ("vcpu.max_mmu_page_hash_collisions".to_string(), 9)
            ]
        );
    }

    #[test]
    fn a_block_is_name_value_lines() {
        let block = format_block(1.5, true, &[("vm.a".into(), 3)]);
        assert_eq!(block, "t=1.500\nend=1\nvm.a=3\n\n");
    }
}
