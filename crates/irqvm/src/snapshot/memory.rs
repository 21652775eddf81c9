//! Guest RAM in a snapshot: its regions one after the other in guest-physical order (the
//! layout `memory::ram_ranges` gives the size), written from a paused VM, and restored as a
//! private copy-on-write mapping of the file (nothing is read until the guest touches a page,
//! as Firecracker does).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::FileOffset;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::SnapshotError;
use crate::memory::{ram_ranges, GuestRam};

/// Bytes copied per write.
const CHUNK: usize = 1 << 20;

/// Writes every region of `mem` to `path`, in address order.
pub fn write(mem: &GuestRam, path: &Path) -> Result<(), SnapshotError> {
    let mut file = File::create(path).map_err(SnapshotError::io(path))?;
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + done))
                .map_err(|e| SnapshotError::NotReady(format!("cannot read guest RAM: {e}")))?;
            file.write_all(&buf[..n]).map_err(SnapshotError::io(path))?;
            done += n as u64;
        }
    }
    file.sync_all().map_err(SnapshotError::io(path))?;
    Ok(())
}

/// Maps `file` (of `size` bytes, checked by `format::load`) as the RAM of a guest of `size`
/// bytes: each region a MAP_PRIVATE mapping of its part of the file, so the guest's writes stay
/// in this process and the file is never changed.
pub fn map_private(file: &File, size: u64) -> Result<GuestRam, SnapshotError> {
    let bad = |what: String| SnapshotError::Shape(format!("guest RAM: {what}"));
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size).map_err(|e| bad(e.to_string()))? {
        let clone = file
            .try_clone()
            .map_err(|e| bad(format!("cannot reopen the memory file: {e}")))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(clone, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| bad(format!("cannot map the memory file: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| bad("a region wraps the address space".into()))?;
        regions.push(region);
        offset += len;
    }
    GuestRam::from_regions(regions).map_err(|e| bad(e.to_string()))
}
