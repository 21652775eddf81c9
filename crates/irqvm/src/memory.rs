//! Guest RAM: anonymous mappings registered with KVM as memory slots.
//!
//! Layout of the guest-physical address space (a PC without PCI):
//! RAM from 0 up to [`LOW_RAM_END`] (3 GiB), then the 32-bit device hole (IOAPIC at 0xFEC00000,
//! LAPIC at 0xFEE00000: no memory slot there, so accesses exit as MMIO), and any remaining RAM
//! from 4 GiB up.

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::GuestRegionMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// End of the RAM below the 32-bit device hole.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of the RAM above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest the loader can boot: low memory plus a little above 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest memory accepted; far above what the host has, but keeps sizes sane.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest page size; memory sizes are rounded to it.
pub const PAGE_SIZE: u64 = 4096;

/// The guest's RAM as vm-memory sees it. Each region carries a bitmap of the pages irqvm itself
/// wrote through vm-memory (`Bytes` writes mark it): KVM's dirty log records only what the
/// guest and KVM write, and a live migration must also send what userspace wrote
/// ([`take_dirty_pages`] reads both).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {size} bytes is too small: the minimum is {MIN_MEMORY} bytes (2 MiB)")]
    TooSmall { size: u64 },
    #[error("memory size {size} bytes is too large: the maximum is {MAX_MEMORY} bytes (1 TiB)")]
    TooLarge { size: u64 },
    #[error("memory size {size} bytes is not a multiple of 4 KiB")]
    Unaligned { size: u64 },
    #[error("cannot map guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
    #[error("KVM_GET_DIRTY_LOG failed for slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges (start, length) a guest of `size` bytes gets.
pub fn ram_ranges(size: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    if size < MIN_MEMORY {
        return Err(MemoryError::TooSmall { size });
    }
    if size > MAX_MEMORY {
        return Err(MemoryError::TooLarge { size });
    }
    if size % PAGE_SIZE != 0 {
        return Err(MemoryError::Unaligned { size });
    }
    let low = size.min(LOW_RAM_END);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((HIGH_RAM_START, size - low));
    }
    Ok(ranges)
}

/// Maps `size` bytes of guest RAM (not yet registered with KVM).
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)?
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    Ok(GuestRam::from_ranges(&ranges)?)
}

/// Registers every region of `mem` with the VM as one memory slot each.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    register_slots(vm, mem, 0)
}

/// Turns KVM's dirty page log of every slot of `mem` on or off (KVM_MEM_LOG_DIRTY_PAGES on the
/// slots `register_guest_memory` made, changing only their flags, which KVM allows on a live
/// slot). From the moment it is on, KVM records every page the guest (or KVM itself: kvmclock)
/// writes. Measured here: docs/kvm-facts.md. Turning it on also clears the record of irqvm's
/// own writes (each region's bitmap), so that [`take_dirty_pages`] starts from the same moment
/// for both.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestRam, on: bool) -> Result<(), MemoryError> {
    let flags = if on {
        for region in mem.iter() {
            own_writes(region).reset();
        }
        kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    register_slots(vm, mem, flags)
}

/// The pages of `mem` written since the last call (or since the log was turned on), as runs
/// (guest-physical address, page count) in address order: those KVM's log names (the guest's
/// and KVM's writes; KVM_GET_DIRTY_LOG clears it) and those irqvm wrote itself through
/// vm-memory (the paravirtual EOI flag `user` mode sets and clears, the stepper's repair of a
/// stacked RFLAGS), read and cleared from each region's bitmap.
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestRam) -> Result<Vec<(u64, u64)>, MemoryError> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let mut words = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        let ours = own_writes(region).get_and_reset();
        for (word, mine) in words.iter_mut().zip(ours) {
            *word |= mine;
        }
        append_runs(
            &mut runs,
            &words,
            region.start_addr().0,
            region.len() / PAGE_SIZE,
        );
    }
    Ok(runs)
}

/// The bitmap of the pages irqvm wrote in `region` through vm-memory (the mapping's own, not
/// the trait's bitmap slice).
fn own_writes(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &vm_memory::mmap::MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// Appends the pages set in `words` (bit `i` of word `w`: page `64 w + i` of a region of
/// `pages` pages at `base`) to `runs`, extending the last run where a page follows it.
fn append_runs(runs: &mut Vec<(u64, u64)>, words: &[u64], base: u64, pages: u64) {
    for (word_index, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = word_index as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if page >= pages {
                return;
            }
            let gpa = base + page * PAGE_SIZE;
            match runs.last_mut() {
                Some((start, count)) if *start + *count * PAGE_SIZE == gpa => *count += 1,
                _ => runs.push((gpa, 1)),
            }
        }
    }
}

fn register_slots(vm: &VmFd, mem: &GuestRam, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = mem
            .get_host_address(region.start_addr())
            .expect("a region's start address is inside guest memory");
        let desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [host, host + len) is a live mapping owned by `mem`, and the VMM
        // keeps `mem` alive for as long as the VM (the `Vm` owns both and drops the VM fd first).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// Total RAM in `mem`.
pub fn ram_size(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Parses a memory size as QEMU's `-m` does: a plain number is MiB; suffixes K, M, G, T (with an
/// optional "iB" or "B") scale by powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("memory size '{text}' does not start with a number"));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("memory size '{text}' is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown memory size suffix '{other}' in '{text}'")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("memory size '{text}' is too large"))
}

/// Reads guest-linear memory at `linear` through the guest's page tables (KVM_TRANSLATE on
/// `vcpu`), page by page; returns how many bytes were readable from the start (a page with no
/// mapping, or none in RAM, ends the read).
pub fn read_linear(
    memory: &GuestRam,
    vcpu: &kvm_ioctls::VcpuFd,
    linear: u64,
    out: &mut [u8],
) -> usize {
    read_linear_paged(memory, vcpu, None, linear, out)
}

/// The control registers a walk of the guest's page tables needs (from a `kvm_sregs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    pub fn of(sregs: &kvm_bindings::kvm_sregs) -> Self {
        Self {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        }
    }

    /// 4-level paging (SDM vol. 3 §4.5): CR0.PG, CR4.PAE and EFER.LMA set, CR4.LA57 clear.
    fn four_level(&self) -> bool {
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const CR4_LA57: u64 = 1 << 12;
        const EFER_LMA: u64 = 1 << 10;
        self.cr0 & CR0_PG != 0
            && self.cr4 & CR4_PAE != 0
            && self.cr4 & CR4_LA57 == 0
            && self.efer & EFER_LMA != 0
    }
}

/// Bits 51:12 of CR3 and of a paging-structure entry: the next table or the page frame (SDM vol. 3
/// §4.5).
const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
/// An entry's P and PS bits.
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;

/// The guest-physical address `linear` maps to under 4-level paging with `cr3`, walked in guest
/// RAM as the processor walks it (SDM vol. 3 §4.5, tables 4-15 to 4-20): a present entry at
/// every level, a 1-GiB page at the PDPTE or a 2-MiB page at the PDE when its PS bit is set.
/// `None` for anything else (an entry not present or not in RAM, PS in a PML4E), and the
/// caller then asks KVM: the walk only saves KVM_TRANSLATE where its answer is plain.
pub fn walk_four_level(memory: &GuestRam, cr3: u64, linear: u64) -> Option<u64> {
    let mut table = cr3 & ADDRESS;
    // Level 3 is the PML4, 0 the page table; each indexes 9 bits of the address.
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1FF;
        let entry: u64 =
            vm_memory::Bytes::read_obj(memory, GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 || (level == 3 && entry & PAGE_SIZE_BIT != 0) {
            return None;
        }
        if level == 0 || entry & PAGE_SIZE_BIT != 0 {
            let offset = (1u64 << shift) - 1;
            return Some((entry & ADDRESS & !offset) | (linear & offset));
        }
        table = entry & ADDRESS;
    }
    None
}

/// How a CPL-0 access that irqvm makes in the guest's place uses a page ([`walk_as_supervisor`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// An instruction fetch.
    Fetch,
    /// A data read (explicit, or an implicit supervisor read such as a descriptor's), with
    /// RFLAGS.AC as the instruction runs with (SMAP lets an explicit CPL-0 read of a user page
    /// through only with AC set; SDM vol. 3 §4.6.1).
    Read { ac: bool },
}

/// The guest-physical address of `linear` for a CPL-0 access of kind `access` under 4-level
/// paging, if the processor would make that access without a fault and without writing
/// anything: every entry present and already accessed (the processor would set an A bit that
/// is clear, SDM vol. 3 §4.8; irqvm does not write page tables), no reserved PS bit, execute
/// allowed for a fetch (no XD with EFER.NXE, SDM §4.6.2), and no supervisor-mode protection in
/// the way: a user page (U/S set at every level) is refused to a fetch with CR4.SMEP, to a read
/// with CR4.SMAP unless AC is set, and to any read with CR4.PKE (its protection key would need
/// PKRU); a supervisor page to any read with CR4.PKS. CR4.CET (shadow stacks) and anything but
/// 4-level paging are refused whole: the caller then lets the guest make the access itself.
pub fn walk_as_supervisor(
    memory: &GuestRam,
    paging: &Paging,
    linear: u64,
    access: Access,
) -> Option<u64> {
    const USER: u64 = 1 << 2;
    const ACCESSED: u64 = 1 << 5;
    const XD: u64 = 1 << 63;
    const CR4_SMEP: u64 = 1 << 20;
    const CR4_SMAP: u64 = 1 << 21;
    const CR4_PKE: u64 = 1 << 22;
    const CR4_CET: u64 = 1 << 23;
    const CR4_PKS: u64 = 1 << 24;
    const EFER_NXE: u64 = 1 << 11;
    if !paging.four_level() || paging.cr4 & CR4_CET != 0 || !canonical(linear) {
        return None;
    }
    let nxe = paging.efer & EFER_NXE != 0;
    let (mut user, mut no_exec) = (true, false);
    let mut table = paging.cr3 & ADDRESS;
    for level in (0..4u32).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1FF;
        let entry: u64 =
            vm_memory::Bytes::read_obj(memory, GuestAddress(table + index * 8)).ok()?;
        let leaf = level == 0 || (entry & PAGE_SIZE_BIT != 0);
        let bad = entry & PRESENT == 0
            || entry & ACCESSED == 0
            || (level == 3 && entry & PAGE_SIZE_BIT != 0)
            || (!nxe && entry & XD != 0)
            || (leaf && level > 0 && large_page_reserved(entry, shift));
        if bad {
            return None;
        }
        user &= entry & USER != 0;
        no_exec |= entry & XD != 0;
        if leaf {
            let refused = match access {
                Access::Fetch => no_exec || (user && paging.cr4 & CR4_SMEP != 0),
                Access::Read { ac } => {
                    if user {
                        (paging.cr4 & CR4_SMAP != 0 && !ac) || paging.cr4 & CR4_PKE != 0
                    } else {
                        paging.cr4 & CR4_PKS != 0
                    }
                }
            };
            if refused {
                return None;
            }
            let offset = (1u64 << shift) - 1;
            return Some((entry & ADDRESS & !offset) | (linear & offset));
        }
        table = entry & ADDRESS;
    }
    None
}

/// A 2-MiB or 1-GiB page entry with a reserved bit set between bit 13 and its frame (bit 12 is
/// PAT there; SDM vol. 3 tables 4-17 and 4-19).
fn large_page_reserved(entry: u64, shift: u32) -> bool {
    let reserved = ((1u64 << shift) - 1) & !0x1FFF;
    entry & reserved != 0
}

/// A 48-bit canonical address: bits 63:47 all equal (SDM vol. 1 §3.3.7.1).
pub fn canonical(linear: u64) -> bool {
    let top = (linear as i64) >> 47;
    top == 0 || top == -1
}

/// Translations that [`walk_as_supervisor`] made for one run of CPL-0 accesses irqvm makes in
/// the guest's place (one handler's way out, `backend::epilogue`), re-used for the rest of that
/// run as the processor re-uses the translations its walks cached in the TLB (SDM vol. 3
/// §4.10.2). A way out fetches and pops within a page or two, and each walk is four reads of
/// guest RAM: most of the userspace time of an attempt before this cache. Keyed by linear page
/// and kind of access, whose permission checks the walk applied; a refused walk is not kept.
#[derive(Debug, Default)]
pub struct SupervisorTlb {
    entries: [Option<(u64, Access, u64)>; SUPERVISOR_TLB_ENTRIES],
    next: usize,
}

/// Pages one [`SupervisorTlb`] holds: a way out's code, its stack, and the GDT it reads.
const SUPERVISOR_TLB_ENTRIES: usize = 4;

impl SupervisorTlb {
    /// [`walk_as_supervisor`], answered from a translation this run already made where there is
    /// one for `linear`'s page and `access`.
    pub fn translate(
        &mut self,
        memory: &GuestRam,
        paging: &Paging,
        linear: u64,
        access: Access,
    ) -> Option<u64> {
        const OFFSET: u64 = 0xFFF;
        let page = linear & !OFFSET;
        let cached = self
            .entries
            .iter()
            .flatten()
            .find(|&&(p, a, _)| p == page && a == access);
        if let Some(&(_, _, frame)) = cached {
            return Some(frame | (linear & OFFSET));
        }
        let gpa = walk_as_supervisor(memory, paging, linear, access)?;
        self.entries[self.next] = Some((page, access, gpa & !OFFSET));
        self.next = (self.next + 1) % SUPERVISOR_TLB_ENTRIES;
        Some(gpa)
    }
}

/// Reads `out.len()` bytes at `linear` as [`walk_as_supervisor`] allows, page by page, with the
/// translations `tlb` holds; false (and `out` partly written) if any byte is refused or not in
/// guest RAM.
pub fn read_as_supervisor(
    memory: &GuestRam,
    paging: &Paging,
    tlb: &mut SupervisorTlb,
    linear: u64,
    out: &mut [u8],
    access: Access,
) -> bool {
    const PAGE: u64 = 4096;
    let mut done = 0;
    while done < out.len() {
        let addr = linear.wrapping_add(done as u64);
        let Some(gpa) = tlb.translate(memory, paging, addr, access) else {
            return false;
        };
        let chunk = ((PAGE - (addr % PAGE)) as usize).min(out.len() - done);
        let dest = &mut out[done..done + chunk];
        if vm_memory::Bytes::read_slice(memory, dest, GuestAddress(gpa)).is_err() {
            return false;
        }
        done += chunk;
    }
    true
}

/// Reads guest-linear memory through a walk of the guest's 4-level page tables only: how many
/// bytes it read, up to the first page that is not mapped or not RAM; `None` under any other
/// paging (the caller then translates). For reads that may go unmapped often, where a
/// KVM_TRANSLATE would cost an ioctl for nothing (the stretch scan's loads).
pub fn read_linear_walked(
    memory: &GuestRam,
    paging: Paging,
    linear: u64,
    out: &mut [u8],
) -> Option<usize> {
    const PAGE: u64 = 4096;
    if !paging.four_level() {
        return None;
    }
    let mut done = 0;
    while done < out.len() {
        let addr = linear.wrapping_add(done as u64);
        let Some(gpa) = walk_four_level(memory, paging.cr3, addr) else {
            break;
        };
        let chunk = ((PAGE - (addr % PAGE)) as usize).min(out.len() - done);
        let part = &mut out[done..done + chunk];
        if vm_memory::Bytes::read_slice(memory, part, GuestAddress(gpa)).is_err() {
            break;
        }
        done += chunk;
    }
    Some(done)
}

/// [`read_linear`], walking the page tables itself where `paging` is 4-level paging (no
/// ioctl: ~5 µs a page less here), else, or where its walk has no plain answer, with
/// KVM_TRANSLATE.
pub fn read_linear_paged(
    memory: &GuestRam,
    vcpu: &kvm_ioctls::VcpuFd,
    paging: Option<Paging>,
    linear: u64,
    out: &mut [u8],
) -> usize {
    const PAGE: u64 = 4096;
    let walk = paging.filter(Paging::four_level);
    let mut done = 0;
    while done < out.len() {
        let addr = linear.wrapping_add(done as u64);
        let walked = walk.and_then(|p| walk_four_level(memory, p.cr3, addr));
        let gpa = match walked {
            Some(gpa) => gpa,
            None => match vcpu.translate_gva(addr) {
                Ok(tr) if tr.valid != 0 => tr.physical_address,
                _ => break,
            },
        };
        let chunk = ((PAGE - (addr % PAGE)) as usize).min(out.len() - done);
        let gpa = GuestAddress(gpa);
        if vm_memory::Bytes::read_slice(memory, &mut out[done..done + chunk], gpa).is_err() {
            break;
        }
        done += chunk;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page irqvm writes itself (through vm-memory, as the PV EOI flag and the stepper's
    /// RFLAGS repair are written) is in the dirty pages of a live migration, as KVM's log would
    /// not have it; once taken it is not reported again, and a write from before the log was
    /// turned on is not reported at all. Guest RAM with a low and a high region, so that the
    /// run's address is the region's.
    #[test]
    fn the_dirty_pages_include_irqvm_s_own_writes() {
        use vm_memory::Bytes;
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let ram = create_guest_memory(LOW_RAM_END + (4 << 20)).unwrap();
        register_guest_memory(&vm, &ram).unwrap();
        ram.write_obj(1u8, GuestAddress(0x7000)).unwrap();
        set_dirty_logging(&vm, &ram, true).unwrap();
        ram.write_obj(0u8, GuestAddress(0x1_2345)).unwrap();
        ram.write_obj(7u64, GuestAddress(HIGH_RAM_START + 0x2FFC))
            .unwrap();
        assert_eq!(
            take_dirty_pages(&vm, &ram).unwrap(),
            vec![
                (0x1_2000, 1),
                (HIGH_RAM_START + 0x2000, 2), // the qword crosses into the next page
            ]
        );
        assert!(take_dirty_pages(&vm, &ram).unwrap().is_empty());
    }

    /// Bits become page runs at the region's base; a run continues across words, and bits past
    /// the region's last page are not pages.
    #[test]
    fn dirty_bits_become_runs() {
        let mut runs = vec![(0x1000, 1)];
        let words = [1u64 << 63 | 1 << 1 | 1, 1 | 1 << 5, u64::MAX];
        append_runs(&mut runs, &words, 0x10_0000, 64 + 6 + 64 + 2);
        let page = |i: u64| 0x10_0000 + i * PAGE_SIZE;
        assert_eq!(
            runs,
            vec![
                (0x1000, 1),
                (page(0), 2),
                (page(63), 2),
                (page(69), 1),
                (page(128), 8)
            ]
        );
    }

    /// Page tables in guest RAM map a 4-KiB, a 2-MiB and a 1-GiB page; the walk finds each
    /// one's frame plus the offset, and has no answer for a hole or PS in a PML4E.
    #[test]
    fn four_level_walk_finds_each_page_size() {
        use vm_memory::Bytes;
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let put = |at: u64, entry: u64| ram.write_obj(entry, GuestAddress(at)).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        // Linear 0x7F80_0000_0000 (PML4 index 255): PDPT 0 -> PD, PDPT 1 -> 1 GiB page.
        put(pml4 + 255 * 8, pdpt | 0x3);
        put(pdpt, pd | 0x3);
        put(pdpt + 8, 0x4000_0000 | 0x83);
        // PD 0 -> PT, PD 1 -> 2 MiB page at 0x60_0000 (bit 12, PAT, set: not an address bit).
        put(pd, pt | 0x3);
        put(pd + 8, 0x60_0000 | 0x1000 | 0x83);
        // PT 5 -> 0x9000, with XD (bit 63) set.
        put(pt + 5 * 8, 0x9000 | (1 << 63) | 0x3);
        let base = 0x7F80_0000_0000u64;
        let cr3 = pml4 | 0x5; // PCID bits below 12 are not address bits
        assert_eq!(walk_four_level(&ram, cr3, base + 0x5123), Some(0x9123));
        assert_eq!(
            walk_four_level(&ram, cr3, base + 0x20_0000 + 0x1_2345),
            Some(0x61_2345)
        );
        assert_eq!(
            walk_four_level(&ram, cr3, base + 0x4000_0000 + 0x123_4567),
            Some(0x4123_4567)
        );
        assert_eq!(
            walk_four_level(&ram, cr3, base + 0x6000),
            None,
            "PTE not present"
        );
        assert_eq!(
            walk_four_level(&ram, cr3, 0x1000),
            None,
            "PML4E not present"
        );
        put(0x1000, 0x83);
        assert_eq!(walk_four_level(&ram, cr3, 0x1000), None, "PS in a PML4E");
    }

    /// The stretch scan's reads: through the walk, across a page into the next, up to a page
    /// that is not mapped (no KVM_TRANSLATE: there is no vCPU here to make one); and not at all
    /// under paging the walk does not do.
    #[test]
    fn walked_reads_stop_at_an_unmapped_page() {
        use vm_memory::Bytes;
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let put = |at: u64, entry: u64| ram.write_obj(entry, GuestAddress(at)).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        put(pml4, pdpt | 0x3);
        put(pdpt, pd | 0x3);
        put(pd, pt | 0x3);
        // Linear 0x5000 -> 0x9000, 0x6000 -> 0xA000 (not contiguous), 0x7000 not mapped.
        put(pt + 5 * 8, 0x9000 | 0x3);
        put(pt + 6 * 8, 0xA000 | 0x3);
        ram.write_obj(0x1122_3344u32, GuestAddress(0x9FFC)).unwrap();
        ram.write_obj(0x5566_7788u32, GuestAddress(0xA000)).unwrap();
        let paging = Paging {
            cr0: 1 << 31,
            cr3: pml4,
            cr4: 1 << 5,
            efer: 1 << 10,
        };
        let mut word = [0u8; 8];
        assert_eq!(read_linear_walked(&ram, paging, 0x5FFC, &mut word), Some(8));
        assert_eq!(u64::from_le_bytes(word), 0x5566_7788_1122_3344);
        assert_eq!(read_linear_walked(&ram, paging, 0x6FFC, &mut word), Some(4));
        assert_eq!(read_linear_walked(&ram, paging, 0x7000, &mut word), Some(0));
        let no_paging = Paging { cr0: 0, ..paging };
        assert_eq!(read_linear_walked(&ram, no_paging, 0x5FFC, &mut word), None);
    }

    /// The tables of the supervisor-walk tests: PML4, PDPT, PD and PT at these addresses, and
    /// the A, U/S and XD bits of an entry.
    const TABLES: (u64, u64, u64, u64) = (0x1000, 0x2000, 0x3000, 0x4000);
    const A: u64 = 0x20;
    const U: u64 = 0x4;
    const XD: u64 = 1 << 63;

    fn put_entry(ram: &GuestRam, at: u64, entry: u64) {
        vm_memory::Bytes::write_obj(ram, entry, GuestAddress(at)).unwrap();
    }

    /// 4-level paging from the PML4 at `cr3`: CR0.PG, CR4.PAE, EFER.LME and NXE.
    fn long_mode_paging(cr3: u64) -> Paging {
        Paging {
            cr0: 1 << 31,
            cr3,
            cr4: 1 << 5,
            efer: (1 << 10) | (1 << 11),
        }
    }

    /// The walk irqvm makes in the guest's place refuses what the processor would fault on or
    /// would write: an A bit clear at any level, XD for a fetch (and XD without EFER.NXE), SMEP,
    /// SMAP (unless AC), PKE on a user page, PKS on a supervisor page, CET, a reserved bit in a
    /// large page, a non-canonical address.
    #[test]
    fn the_supervisor_walk_refuses_what_the_processor_would_fault_on_or_mark() {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let put = |at: u64, entry: u64| put_entry(&ram, at, entry);
        let (pml4, pdpt, pd, pt) = TABLES;
        // PML4 0 -> PDPT 0 -> PD 0 -> PT; PD 1 is a 2 MiB page at 0x60_0000.
        put(pml4, pdpt | 0x3 | U | A);
        put(pdpt, pd | 0x3 | U | A);
        put(pd, pt | 0x3 | U | A);
        put(pd + 8, 0x60_0000 | 0x83 | A);
        put(pt + 8, 0x9000 | 0x3 | A); // supervisor page
        put(pt + 2 * 8, 0xA000 | 0x3 | U | A); // user page
        put(pt + 3 * 8, 0xB000 | 0x3); // not accessed yet
        put(pt + 4 * 8, 0xC000 | 0x3 | A | XD);
        let paging = long_mode_paging(pml4);
        let read = Access::Read { ac: false };
        let walk = |p: &Paging, linear, access| walk_as_supervisor(&ram, p, linear, access);
        assert_eq!(walk(&paging, 0x1234, read), Some(0x9234));
        assert_eq!(walk(&paging, 0x1234, Access::Fetch), Some(0x9234));
        assert_eq!(walk(&paging, 0x20_1234, read), Some(0x60_1234));
        assert_eq!(walk(&paging, 0x2010, read), Some(0xA010));
        assert_eq!(walk(&paging, 0x3000, read), None, "A bit clear");
        assert_eq!(walk(&paging, 0x4000, read), Some(0xC000));
        assert_eq!(walk(&paging, 0x4000, Access::Fetch), None, "XD");
        let no_nxe = Paging {
            efer: 1 << 10,
            ..paging
        };
        assert_eq!(
            walk(&no_nxe, 0x4000, read),
            None,
            "XD is reserved without NXE"
        );
        let smep = Paging {
            cr4: paging.cr4 | (1 << 20),
            ..paging
        };
        assert_eq!(walk(&smep, 0x2000, Access::Fetch), None, "SMEP");
        assert_eq!(walk(&smep, 0x1000, Access::Fetch), Some(0x9000));
        let smap = Paging {
            cr4: paging.cr4 | (1 << 21),
            ..paging
        };
        assert_eq!(walk(&smap, 0x2000, read), None, "SMAP");
        assert_eq!(walk(&smap, 0x2000, Access::Read { ac: true }), Some(0xA000));
        let pke = Paging {
            cr4: paging.cr4 | (1 << 22),
            ..paging
        };
        assert_eq!(walk(&pke, 0x2000, read), None, "PKE, user page");
        assert_eq!(walk(&pke, 0x1000, read), Some(0x9000));
        let pks = Paging {
            cr4: paging.cr4 | (1 << 24),
            ..paging
        };
        assert_eq!(walk(&pks, 0x1000, read), None, "PKS, supervisor page");
        let cet = Paging {
            cr4: paging.cr4 | (1 << 23),
            ..paging
        };
        assert_eq!(walk(&cet, 0x1000, read), None, "CET");
        assert_eq!(
            walk(&paging, 0xFFFF_0000_0000_1000, read),
            None,
            "not canonical"
        );
        put(pd + 8, 0x60_0000 | 0x2000 | 0x83 | A);
        assert_eq!(
            walk(&paging, 0x20_1234, read),
            None,
            "reserved bit 13 in a 2 MiB entry"
        );
        put(pml4, pdpt | 0x3 | U);
        assert_eq!(walk(&paging, 0x1234, read), None, "PML4E not accessed");
        let mut out = [0u8; 8];
        assert!(!read_as_supervisor(
            &ram,
            &paging,
            &mut SupervisorTlb::default(),
            0xFF8,
            &mut out,
            read
        ));
    }

    /// The same walk's finer points: PAT (bit 12) in a large page is no reserved bit, a 1-GiB
    /// entry with a reserved bit in 29:13 is refused, U/S clear at any level makes the page a
    /// supervisor one (SMEP and SMAP then let it be), XD in a directory refuses a fetch through
    /// the 4-KiB entry below it, and a read that runs from a good page into a refused one fails.
    #[test]
    fn the_supervisor_walk_takes_every_level_into_account() {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let put = |at: u64, entry: u64| put_entry(&ram, at, entry);
        let (pml4, pdpt, pd, pt) = TABLES;
        put(pml4, pdpt | 0x3 | A); // U/S clear here: everything below is supervisor
        put(pdpt, pd | 0x3 | U | A);
        put(pdpt + 8, 0x4000_0000 | 0x1000 | 0x83 | U | A); // 1 GiB, PAT set
        put(pdpt + 16, 0x8000_0000 | 0x2000 | 0x83 | A); // 1 GiB, bit 13 reserved
        put(pd, pt | 0x3 | U | A);
        put(pd + 8, pt | 0x3 | U | A | XD); // a directory with XD over the same table
        put(pt, 0x9000 | 0x3 | U | A);
        put(pt + 8, 0xA000 | 0x3 | U | A);
        put(pt + 16, 0xB000 | 0x3 | U); // not accessed
        let guarded = Paging {
            cr0: 1 << 31,
            cr3: pml4,
            cr4: (1 << 5) | (1 << 20) | (1 << 21),
            efer: (1 << 10) | (1 << 11),
        };
        let read = Access::Read { ac: false };
        let walk = |linear, access| walk_as_supervisor(&ram, &guarded, linear, access);
        assert_eq!(
            walk(0x10, Access::Fetch),
            Some(0x9010),
            "supervisor through the PML4E"
        );
        assert_eq!(walk(0x10, read), Some(0x9010));
        assert_eq!(
            walk(0x4012_3456, read),
            Some(0x4012_3456),
            "PAT is no address bit"
        );
        assert_eq!(
            walk(0x8000_0000, read),
            None,
            "reserved bit 13 of a 1-GiB entry"
        );
        assert_eq!(walk(0x20_0010, read), Some(0x9010));
        assert_eq!(walk(0x20_0010, Access::Fetch), None, "XD in the PDE");
        let mut out = [0u8; 16];
        assert!(read_as_supervisor(
            &ram,
            &guarded,
            &mut SupervisorTlb::default(),
            0x1FF8,
            &mut out[..8],
            read
        ));
        assert!(
            !read_as_supervisor(
                &ram,
                &guarded,
                &mut SupervisorTlb::default(),
                0x1FF8,
                &mut out,
                read
            ),
            "from a good page into one not yet accessed"
        );
        assert!(canonical(0x7FFF_FFFF_FFFF));
        assert!(!canonical(0x8000_0000_0000));
        assert!(canonical(0xFFFF_8000_0000_0000));
        assert!(!canonical(0xFFFF_7FFF_FFFF_FFFF));
    }

    /// One attempt's translations are re-used as a TLB's would be: a page's second read finds
    /// its frame without a walk (a PTE cleared meanwhile does not refuse it, as a cached
    /// translation would not fault), a fresh attempt walks again, a kind of access not yet
    /// walked is checked on its own (XD refuses the fetch of a page read before), and the
    /// oldest of more pages than the cache holds is walked again.
    #[test]
    fn an_attempt_reuses_its_translations_as_a_tlb_would() {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let put = |at: u64, entry: u64| put_entry(&ram, at, entry);
        let (pml4, pdpt, pd, pt) = TABLES;
        put(pml4, pdpt | 0x3 | A);
        put(pdpt, pd | 0x3 | A);
        put(pd, pt | 0x3 | A);
        for page in 0..6u64 {
            put(pt + page * 8, (0x9000 + page * 0x1000) | 0x3 | A | XD);
        }
        let paging = long_mode_paging(pml4);
        let read = Access::Read { ac: false };
        let mut tlb = SupervisorTlb::default();
        assert_eq!(tlb.translate(&ram, &paging, 0x10, read), Some(0x9010));
        put(pt, 0);
        assert_eq!(
            tlb.translate(&ram, &paging, 0x18, read),
            Some(0x9018),
            "cached"
        );
        assert_eq!(
            SupervisorTlb::default().translate(&ram, &paging, 0x18, read),
            None,
            "a new attempt walks"
        );
        assert_eq!(
            tlb.translate(&ram, &paging, 0x1010, Access::Fetch),
            None,
            "XD, a fetch"
        );
        for page in 1..=SUPERVISOR_TLB_ENTRIES as u64 {
            let at = page * 0x1000;
            assert_eq!(tlb.translate(&ram, &paging, at, read), Some(0x9000 + at));
        }
        assert_eq!(
            tlb.translate(&ram, &paging, 0x10, read),
            None,
            "the oldest entry was replaced: walked again"
        );
    }

    #[test]
    fn only_four_level_paging_is_walked() {
        let long = Paging {
            cr0: 1 << 31,
            cr3: 0,
            cr4: 1 << 5,
            efer: 1 << 10,
        };
        assert!(long.four_level());
        assert!(
            !Paging {
                cr4: (1 << 5) | (1 << 12),
                ..long
            }
            .four_level(),
            "LA57"
        );
        assert!(!Paging { efer: 0, ..long }.four_level(), "legacy PAE");
        assert!(!Paging { cr0: 0, ..long }.four_level(), "no paging");
    }

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(64 << 20).unwrap(), vec![(0, 64 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_device_hole() {
        let ranges = ram_ranges(4 << 30).unwrap();
        assert_eq!(ranges, vec![(0, LOW_RAM_END), (HIGH_RAM_START, 1 << 30)]);
    }

    #[test]
    fn bad_sizes_are_named() {
        assert!(matches!(
            ram_ranges(1 << 20),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            ram_ranges((64 << 20) + 1),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            ram_ranges(MAX_MEMORY + PAGE_SIZE),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("128").unwrap(), 128 << 20);
        assert_eq!(parse_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096k").unwrap(), 4 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn guest_memory_maps_the_requested_size() {
        let mem = create_guest_memory(8 << 20).unwrap();
        assert_eq!(ram_size(&mem), 8 << 20);
    }
}
