//! The CPUID table each vCPU gets: KVM's supported set, less what this host's instruction
//! emulator cannot run, with per-vCPU APIC IDs and a consistent topology.
//!
//! kvm_pvm emulates ring-0 guest code; it fails on xsave/xrstor, clac/stac and cmpxchg16b (see
//! `docs/kvm-facts.md`), so XSAVE and everything that needs it (AVX, AVX2, AVX-512, AMX, PKU/OSPKE),
//! SMAP and CX16 are hidden (Linux's SLUB uses cmpxchg16b whenever CX16 is advertised). So are
//! instructions KVM's emulator has no entry for and Linux would run in ring 0 once advertised:
//! RDRAND/RDSEED (random seeding at boot), RDFSBASE/WRGSBASE and friends (FSGSBASE: the entry
//! code and context switch), PCID/INVPCID (TLB flushes), RDTSCP (Linux's `rdtsc_ordered`, on
//! every kvmclock read; KVM's emulator decodes it for intercepts only) and POPCNT (`hweight`).
//! On this host the guest does not see all of the table: XSAVE, AVX, FMA, F16C, RDRAND (leaf 1)
//! and leaf 7 stay as the host has them (docs/kvm-facts.md, "CPUID here"), so a Linux guest also
//! needs `noxsave nofsgsbase clearcpuid=151,158,306,308` (scripts/linux-boot.sh); the table is still what a host that honours it must see.
//! KVM's paravirtual features that use hypercalls or that only KVM's own LAPIC delivers are hidden
//! too ([`kvm_features::HIDDEN`]); kvmclock and its TSC frequency stay as KVM offers them, so Linux
//! needs no PIT to calibrate the TSC. The APIC (leaf 1 EDX bit 9), x2APIC (leaf 1 ECX bit 21) and the
//! TSC-deadline timer (leaf 1 ECX bit 24), KVM_FEATURE_MSI_EXT_DEST_ID, kvmclock, KVM_FEATURE_PV_EOI
//! (every mode's LAPIC implements it: KVM's in `kernel` and `split` mode, irqvm's in `user` mode)
//! and the topology leaves (1, 4, 0xB, 0x1F) follow the VM's [`CpuModel`] (`--topology`,
//! `--cpu-features`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::cpumodel::CpuModel;
use crate::kvm::KvmError;

/// Leaf 1 bits (SDM vol. 2A, CPUID, "Feature Information").
pub mod leaf1 {
    pub const ECX_MONITOR: u32 = 1 << 3;
    pub const ECX_VMX: u32 = 1 << 5;
    pub const ECX_SMX: u32 = 1 << 6;
    pub const ECX_FMA: u32 = 1 << 12;
    pub const ECX_CX16: u32 = 1 << 13;
    pub const ECX_POPCNT: u32 = 1 << 23;
    pub const ECX_PCID: u32 = 1 << 17;
    pub const ECX_X2APIC: u32 = 1 << 21;
    pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
    pub const ECX_XSAVE: u32 = 1 << 26;
    pub const ECX_OSXSAVE: u32 = 1 << 27;
    pub const ECX_AVX: u32 = 1 << 28;
    pub const ECX_F16C: u32 = 1 << 29;
    pub const ECX_RDRAND: u32 = 1 << 30;
    pub const ECX_HYPERVISOR: u32 = 1 << 31;
    pub const EDX_APIC: u32 = 1 << 9;
    pub const EDX_HTT: u32 = 1 << 28;
}

/// Leaf 7 subleaf 0 bits (SDM vol. 2A, CPUID, "Structured Extended Feature Flags").
pub mod leaf7 {
    pub const EBX_FSGSBASE: u32 = 1 << 0;
    pub const EBX_INVPCID: u32 = 1 << 10;
    pub const EBX_RDSEED: u32 = 1 << 18;
    pub const EBX_AVX2: u32 = 1 << 5;
    pub const EBX_SMAP: u32 = 1 << 20;
    /// AVX512F, DQ, IFMA, PF, ER, CD, BW, VL.
    pub const EBX_AVX512: u32 = (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31);
    /// AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, GFNI, VAES, VPCLMULQDQ, AVX512_VNNI, AVX512_BITALG,
    /// AVX512_VPOPCNTDQ.
    pub const ECX_AVX_PKU: u32 = (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 6)
        | (1 << 8)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 14);
    /// AVX512_4VNNIW, AVX512_4FMAPS, AVX512_VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE,
    /// AMX-INT8.
    pub const EDX_AVX_AMX: u32 =
        (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
}

/// Extended feature leaf 80000001H (SDM vol. 2A; AMD APM vol. 3 E.4.2): EDX bit 27 RDTSCP.
pub mod leaf_ext1 {
    pub const EDX_RDTSCP: u32 = 1 << 27;
}

/// KVM's paravirtual feature leaf 0x40000001 EAX (Linux Documentation/virt/kvm/x86/cpuid.rst).
pub mod kvm_features {
    pub const ASYNC_PF: u32 = 1 << 4;
    pub const PV_EOI: u32 = 1 << 6;
    pub const PV_UNHALT: u32 = 1 << 7;
    pub const PV_SEND_IPI: u32 = 1 << 11;
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
    pub const ASYNC_PF_INT: u32 = 1 << 14;
    /// What irqvm hides: the hypercalls (`vmcall` never completes on this host; PV_SEND_IPI
    /// would also send IPIs around a userspace LAPIC, PV_UNHALT and PV_SCHED_YIELD are
    /// hypercalls too) and what KVM delivers through its own LAPIC, which the `user` mode does
    /// not have (async page faults). PV_EOI is not hidden: it follows `CpuModel::pv_eoi`.
    pub const HIDDEN: u32 = ASYNC_PF | PV_UNHALT | PV_SEND_IPI | PV_SCHED_YIELD | ASYNC_PF_INT;
}
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT1: u32 = 0x8000_0001;

/// Leaf 0xD enumerates XSAVE state; hidden with XSAVE.
const LEAF_XSAVE: u32 = 0xD;
/// Extended topology leaves (SDM vol. 2A, CPUID leaf 0BH / 1FH).
const LEAF_TOPOLOGY: u32 = 0xB;
const LEAF_TOPOLOGY_V2: u32 = 0x1F;

/// The address-size leaf (SDM vol. 2A, CPUID 80000008H): EAX\[7:0\] is MAXPHYADDR.
const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;
/// MAXPHYADDR of a processor without that leaf (SDM vol. 3 §4.1.4: 36 with PAE; KVM's choice too).
const MAX_PHYS_ADDR_WITHOUT_LEAF: u8 = 36;

/// MAXPHYADDR as a guest given `table` (or a table derived from it by [`vcpu_cpuid`], which
/// leaves the leaf alone) sees it: CPUID 80000008H EAX\[7:0\], or 36 without the leaf. KVM
/// refuses an IA32_APIC_BASE with a bit at or above it, so the userspace LAPIC must #GP first.
pub fn max_phys_addr(table: &CpuId) -> u8 {
    table
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_ADDRESS_SIZES && e.index == 0)
        .map_or(MAX_PHYS_ADDR_WITHOUT_LEAF, |e| (e.eax & 0xFF) as u8)
}

/// KVM's supported CPUID table.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))
}

/// KVM_FEATURE_CLOCKSOURCE (bit 0) and KVM_FEATURE_CLOCKSOURCE2 (bit 3): kvmclock.
const KVM_FEATURE_KVMCLOCK: u32 = (1 << 0) | (1 << 3);
/// KVM_FEATURE_MSI_EXT_DEST_ID (Linux Documentation/virt/kvm/x86/cpuid.rst): MSI address bits
/// 11:5 and IOAPIC entry bits 55:49 carry destination bits 14:8.
pub const KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 1 << 15;
/// Deterministic cache parameters (SDM vol. 2A, CPUID leaf 04H).
const LEAF_CACHE: u32 = 4;

/// The table for vCPU `index`, derived from KVM's supported table for the CPU model `model`.
pub fn vcpu_cpuid(supported: &CpuId, model: &CpuModel, index: usize) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter(|e| e.function != LEAF_XSAVE)
        .collect();
    let apic_id = model.apic_id(index);
    for entry in entries.iter_mut() {
        adjust_entry(entry, model, apic_id);
    }
    add_missing_topology(&mut entries, model, apic_id);
    CpuId::from_entries(&entries).expect("no more entries than KVM gave us")
}

/// Leaves 0BH and 1FH are irqvm's own: KVM's supported table may hold only subleaf 0 of leaf
/// 0BH (this AMD host's does) and no leaf 1FH, and a subleaf missing from the vCPU's table reads
/// as zeros. So every subleaf, up to and including the first invalid one, is generated. Leaf 1FH
/// is added when the table reaches it, or when the model has dies (only 1FH can describe them;
/// the maximum basic leaf is then raised to 1FH, as QEMU does for a multi-die CPU).
fn add_missing_topology(entries: &mut Vec<kvm_cpuid_entry2>, model: &CpuModel, apic_id: u32) {
    entries.retain(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2);
    let levels = TopologyLevels::of(model);
    let max_leaf = entries.iter_mut().find(|e| e.function == 0);
    let want_v2 = match max_leaf {
        Some(leaf0) if model.topology.dies > 1 => {
            leaf0.eax = leaf0.eax.max(LEAF_TOPOLOGY_V2);
            true
        }
        Some(leaf0) => leaf0.eax >= LEAF_TOPOLOGY_V2,
        None => false,
    };
    let mut add = |function: u32, count: usize| {
        for index in 0..=count as u32 {
            let mut e = kvm_cpuid_entry2 {
                function,
                index,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            topology_entry(&mut e, model, apic_id);
            entries.push(e);
        }
    };
    add(LEAF_TOPOLOGY, levels.v1.len());
    if want_v2 {
        add(LEAF_TOPOLOGY_V2, levels.v2.len());
    }
}

fn adjust_entry(e: &mut kvm_cpuid_entry2, model: &CpuModel, apic_id: u32) {
    match e.function {
        1 => {
            use leaf1::*;
            e.ecx &= !(ECX_MONITOR
                | ECX_VMX
                | ECX_SMX
                | ECX_FMA
                | ECX_CX16
                | ECX_PCID
                | ECX_POPCNT
                | ECX_XSAVE
                | ECX_OSXSAVE
                | ECX_AVX
                | ECX_F16C
                | ECX_RDRAND);
            e.ecx |= ECX_HYPERVISOR;
            set_bit(&mut e.ecx, ECX_X2APIC, model.x2apic);
            set_bit(&mut e.ecx, ECX_TSC_DEADLINE, model.tsc_deadline);
            e.edx |= EDX_APIC;
            let per_package = package_span(model);
            set_bit(&mut e.edx, EDX_HTT, per_package > 1);
            // EBX[31:24] initial APIC ID (its low 8 bits past 255), [23:16] addressable IDs
            // per package: 2^(package shift), capped at 255 (SDM vol. 2A, CPUID leaf 01H).
            let count = per_package.min(255);
            e.ebx = (e.ebx & 0xFFFF) | ((count & 0xFF) << 16) | ((apic_id & 0xFF) << 24);
        }
        LEAF_CACHE => cache_entry(e, model),
        7 if e.index == 0 => {
            use leaf7::*;
            e.ebx &= !(EBX_FSGSBASE | EBX_INVPCID | EBX_RDSEED | EBX_AVX2 | EBX_SMAP | EBX_AVX512);
            e.ecx &= !ECX_AVX_PKU;
            e.edx &= !EDX_AVX_AMX;
        }
        7 => {
            // Subleaf 1 lists AVX-VNNI, AVX512_BF16 and newer AVX forms.
            e.eax = 0;
        }
        LEAF_EXT1 => e.edx &= !leaf_ext1::EDX_RDTSCP,
        LEAF_KVM_FEATURES => {
            e.eax &= !kvm_features::HIDDEN;
            set_bit(&mut e.eax, KVM_FEATURE_MSI_EXT_DEST_ID, model.ext_dest_id);
            // Set even where KVM's table lacks it: in `user` mode irqvm's LAPIC, not KVM's,
            // implements MSR_KVM_PV_EOI_EN.
            set_bit(&mut e.eax, kvm_features::PV_EOI, model.pv_eoi);
            if !model.kvmclock {
                e.eax &= !KVM_FEATURE_KVMCLOCK;
            }
        }
        _ => {}
    }
}

/// Addressable APIC IDs in one package: 2 to the power of the package field's shift.
fn package_span(model: &CpuModel) -> u32 {
    1u32.checked_shl(TopologyLevels::of(model).package_shift())
        .unwrap_or(u32::MAX)
}

/// Leaf 4 (SDM vol. 2A, CPUID leaf 04H) for each cache: EAX[25:14] "maximum addressable IDs for
/// logical processors sharing this cache" minus 1, EAX[31:26] "maximum addressable IDs for
/// processor cores in the physical package" minus 1. L1 and L2 are per core (shared by its
/// threads), L3 per die; like QEMU's `encode_cache_cpuid4` the counts are the field spans (powers
/// of two), so they agree with leaf 0xB's shifts.
fn cache_entry(e: &mut kvm_cpuid_entry2, model: &CpuModel) {
    let cache_type = e.eax & 0x1F;
    if cache_type == 0 {
        return; // no more caches: EAX stays 0
    }
    let [thread_bits, core_bits, _] = model.layout.field_bits();
    let level = (e.eax >> 5) & 0x7;
    let sharing_bits = if level >= 3 {
        thread_bits + core_bits
    } else {
        thread_bits
    };
    let sharing = 1u32 << sharing_bits.min(12);
    let cores = 1u32 << core_bits.min(6);
    e.eax = (e.eax & 0x3FFF) | ((sharing - 1).min(0xFFF) << 14) | ((cores - 1).min(0x3F) << 26);
}

/// Level types of leaves 0BH/1FH (SDM vol. 2A, table "CPUID leaf 1FH"): SMT 1, core 2, die 5.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;
const LEVEL_DIE: u32 = 5;

/// The levels leaves 0BH and 1FH enumerate: (type, shift to the next level's ID, logical
/// processors at this level) from the lowest up.
struct TopologyLevels {
    v1: Vec<(u32, u32, u32)>,
    v2: Vec<(u32, u32, u32)>,
}

impl TopologyLevels {
    fn of(model: &CpuModel) -> Self {
        let t = model.topology;
        let [thread_bits, core_bits, die_bits] = model.layout.field_bits();
        let smt = (LEVEL_SMT, thread_bits, t.threads);
        let core = (LEVEL_CORE, thread_bits + core_bits, t.threads * t.cores);
        let die = (
            LEVEL_DIE,
            thread_bits + core_bits + die_bits,
            t.threads * t.cores * t.dies,
        );
        // Leaf 0BH has no die level: its core level's shift must reach the package (SDM: the
        // shift of the last level is the package's), so dies fold into it.
        let core_v1 = (LEVEL_CORE, die.1, die.2);
        let v2 = if t.dies > 1 {
            vec![smt, core, die]
        } else {
            vec![smt, core]
        };
        Self {
            v1: vec![smt, core_v1],
            v2,
        }
    }

    fn package_shift(&self) -> u32 {
        self.v1.last().map_or(0, |l| l.1)
    }
}

/// Extended topology (SDM vol. 2A, CPUID leaves 0BH and 1FH): per subleaf EAX[4:0] the shift
/// of the APIC ID to the next level's ID, EBX[15:0] the logical processors at this level,
/// ECX[15:8] the level type and [7:0] the subleaf, EDX the x2APIC ID at every subleaf; after
/// the last level, type 0 (invalid) with EAX = EBX = 0.
fn topology_entry(e: &mut kvm_cpuid_entry2, model: &CpuModel, apic_id: u32) {
    let levels = TopologyLevels::of(model);
    let list = if e.function == LEAF_TOPOLOGY {
        &levels.v1
    } else {
        &levels.v2
    };
    let (ecx_type, eax, ebx) = list
        .get(e.index as usize)
        .map_or((0, 0, 0), |&(t, shift, count)| (t, shift, count & 0xFFFF));
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = (ecx_type << 8) | (e.index & 0xFF);
    e.edx = apic_id;
}

fn set_bit(word: &mut u32, bit: u32, on: bool) {
    if on {
        *word |= bit;
    } else {
        *word &= !bit;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xB, 0),
            entry(0xB, 1),
            entry(0xB, 2),
            entry(0xD, 0),
            entry(0xD, 1),
            entry(LEAF_EXT1, 0),
            entry(LEAF_KVM_FEATURES, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .copied()
            .find(|e| e.function == function && e.index == index)
    }

    fn model(cpus: u32, topology: Option<&str>, edits: &str) -> CpuModel {
        let host = crate::cpumodel::HostLimits {
            max_vcpus: 1024,
            max_vcpu_id: 4096,
            tsc_deadline: true,
        };
        let topology = topology.map(|t| t.parse().unwrap());
        let edits = edits.parse().unwrap();
        CpuModel::resolve(cpus, topology, &edits, crate::IrqchipMode::User, host).unwrap()
    }

    fn cfg() -> CpuModel {
        model(4, None, "")
    }

    #[test]
    fn leaf1_carries_the_apic_id_and_count_sdm_vol2_cpuid() {
        let c = vcpu_cpuid(&table(), &cfg(), 3);
        let e = find(&c, 1, 0).unwrap();
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xFF, 4);
        assert_ne!(e.edx & leaf1::EDX_APIC, 0);
        assert_ne!(e.edx & leaf1::EDX_HTT, 0);
    }

    #[test]
    fn xsave_and_avx_are_hidden() {
        let c = vcpu_cpuid(&table(), &cfg(), 0);
        let e = find(&c, 1, 0).unwrap();
        assert_eq!(
            e.ecx & (leaf1::ECX_XSAVE | leaf1::ECX_OSXSAVE | leaf1::ECX_AVX),
            0
        );
        let l7 = find(&c, 7, 0).unwrap();
        assert_eq!(
            l7.ebx & (leaf7::EBX_AVX2 | leaf7::EBX_SMAP | leaf7::EBX_AVX512),
            0
        );
        assert_eq!(find(&c, 7, 1).unwrap().eax, 0);
        assert!(find(&c, 0xD, 0).is_none());
        assert!(find(&c, 0xD, 1).is_none());
    }

    #[test]
    fn emulator_gaps_and_kvm_hypercall_features_are_hidden() {
        let c = vcpu_cpuid(&table(), &cfg(), 0);
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(
            l1.ecx & (leaf1::ECX_CX16 | leaf1::ECX_RDRAND | leaf1::ECX_POPCNT),
            0
        );
        let l7 = find(&c, 7, 0).unwrap();
        assert_eq!(l7.ebx & (leaf7::EBX_FSGSBASE | leaf7::EBX_RDSEED), 0);
        assert_eq!(
            find(&c, LEAF_EXT1, 0).unwrap().edx & leaf_ext1::EDX_RDTSCP,
            0
        );
        let kvm = find(&c, LEAF_KVM_FEATURES, 0).unwrap();
        assert_eq!(kvm.eax & kvm_features::HIDDEN, 0);
        assert_eq!(
            kvm.eax & (kvm_features::ASYNC_PF | kvm_features::PV_SEND_IPI),
            0
        );
        assert_ne!(kvm.eax & 1, 0, "kvmclock stays");
        assert_ne!(kvm.eax & kvm_features::PV_EOI, 0, "PV EOI is on by default");
    }

    #[test]
    fn x2apic_and_tsc_deadline_follow_the_config() {
        let c = vcpu_cpuid(&table(), &cfg(), 0);
        let e = find(&c, 1, 0).unwrap();
        assert_ne!(e.ecx & leaf1::ECX_X2APIC, 0);
        assert_ne!(e.ecx & leaf1::ECX_TSC_DEADLINE, 0);
        let off = model(4, None, "-x2apic,-tsc-deadline");
        let e = find(&vcpu_cpuid(&table(), &off, 0), 1, 0).unwrap();
        assert_eq!(e.ecx & (leaf1::ECX_X2APIC | leaf1::ECX_TSC_DEADLINE), 0);
    }

    #[test]
    fn leaf_0b_reports_x2apic_id_and_core_count_sdm_vol2_cpuid_0bh() {
        let c = vcpu_cpuid(&table(), &cfg(), 2);
        let smt = find(&c, 0xB, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&c, 0xB, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let end = find(&c, 0xB, 2).unwrap();
        assert_eq!((end.eax, end.ebx, end.ecx >> 8), (0, 0, 0));
    }

    #[test]
    fn max_phys_addr_is_leaf_80000008_eax_low_byte_or_36() {
        assert_eq!(max_phys_addr(&table()), MAX_PHYS_ADDR_WITHOUT_LEAF);
        let mut leaf = entry(LEAF_ADDRESS_SIZES, 0);
        leaf.eax = 0x3027; // 39 physical, 48 linear address bits
        let with = CpuId::from_entries(&[entry(1, 0), leaf]).unwrap();
        assert_eq!(max_phys_addr(&with), 39);
        assert_eq!(
            max_phys_addr(&vcpu_cpuid(&with, &model(2, None, ""), 1)),
            39
        );
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let e = find(&vcpu_cpuid(&table(), &model(1, None, ""), 0), 1, 0).unwrap();
        assert_eq!(e.edx & leaf1::EDX_HTT, 0);
    }

    /// 2 sockets x 3 cores x 2 threads: thread 1 bit, core 2 bits (3 rounds up to 4), so vCPU 6
    /// (socket 1) has APIC ID 8 and every leaf reports the shifts 1 and 3 (SDM vol. 2A leaf 0BH;
    /// SDM vol. 3 §9.9.1).
    #[test]
    fn topology_leaves_agree_with_the_gapped_apic_ids() {
        let m = model(12, Some("sockets=2,cores=3,threads=2"), "");
        let c = vcpu_cpuid(&table(), &m, 7);
        assert_eq!(m.apic_id(7), 9);
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xFF), (9, 8));
        assert_ne!(l1.edx & leaf1::EDX_HTT, 0);
        let smt = find(&c, 0xB, 0).unwrap();
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (1, 2, 0x100, 9));
        let core = find(&c, 0xB, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 9));
        assert_eq!(find(&c, 0x1F, 1).unwrap().eax, 3);
        assert_eq!(find(&c, 0x1F, 2).unwrap().ecx >> 8, 0);
    }

    /// This host's KVM lists only subleaf 0 of leaf 0BH and stops at leaf 0x10: the other
    /// subleaves are generated, and leaf 1FH appears (with the maximum leaf raised) only for dies.
    #[test]
    fn missing_topology_subleaves_are_generated() {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0x10;
        let host = CpuId::from_entries(&[leaf0, entry(1, 0), entry(0xB, 0)]).unwrap();
        let c = vcpu_cpuid(&host, &model(4, None, ""), 3);
        let core = find(&c, 0xB, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        assert_ne!(
            core.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            0
        );
        assert_eq!(find(&c, 0xB, 2).unwrap().ecx, 2);
        assert!(find(&c, 0x1F, 0).is_none());
        assert_eq!(find(&c, 0, 0).unwrap().eax, 0x10);
        let dies = model(8, Some("dies=2,cores=4"), "");
        let c = vcpu_cpuid(&host, &dies, 0);
        assert_eq!(find(&c, 0, 0).unwrap().eax, 0x1F);
        assert_eq!(find(&c, 0x1F, 2).unwrap().ecx >> 8, 5);
        assert_eq!(find(&c, 0x1F, 3).unwrap().ecx >> 8, 0);
    }

    /// Dies appear in leaf 1FH only; leaf 0BH folds them into its core level.
    #[test]
    fn dies_are_a_leaf_1f_level() {
        let m = model(16, Some("sockets=1,dies=2,cores=4,threads=2"), "");
        let c = vcpu_cpuid(&table(), &m, 15);
        let die = find(&c, 0x1F, 2).unwrap();
        assert_eq!((die.eax, die.ebx, die.ecx >> 8), (4, 16, 5));
        let core_v1 = find(&c, 0xB, 1).unwrap();
        assert_eq!((core_v1.eax, core_v1.ebx), (4, 16));
        let core_v2 = find(&c, 0x1F, 1).unwrap();
        assert_eq!((core_v2.eax, core_v2.ebx), (3, 8));
    }

    /// Leaf 4: L1/L2 shared by a core's threads, L3 by the die; EAX[31:26] the cores' span - 1.
    #[test]
    fn cache_leaf_counts_follow_the_topology() {
        let m = model(12, Some("sockets=2,cores=3,threads=2"), "");
        let mut l1 = entry(4, 0);
        l1.eax = 1 | (1 << 5); // data cache, level 1
        let mut l3 = entry(4, 3);
        l3.eax = 3 | (3 << 5);
        let t = CpuId::from_entries(&[entry(1, 0), l1, l3, entry(4, 4)]).unwrap();
        let c = vcpu_cpuid(&t, &m, 0);
        let got = |i| find(&c, 4, i).unwrap().eax;
        assert_eq!((got(0) >> 14) & 0xFFF, 1);
        assert_eq!(got(0) >> 26, 3);
        assert_eq!((got(3) >> 14) & 0xFFF, 7);
        assert_eq!(got(3) & 0x1F, 3);
    }

    #[test]
    fn ext_dest_id_kvmclock_and_pv_eoi_follow_the_model() {
        let c = vcpu_cpuid(&table(), &cfg(), 0);
        let eax = find(&c, LEAF_KVM_FEATURES, 0).unwrap().eax;
        assert_ne!(eax & KVM_FEATURE_MSI_EXT_DEST_ID, 0);
        assert_ne!(eax & kvm_features::PV_EOI, 0);
        let off = model(2, None, "-kvm-msi-ext-dest-id,-kvmclock,-kvm-pv-eoi");
        let eax = find(&vcpu_cpuid(&table(), &off, 0), LEAF_KVM_FEATURES, 0)
            .unwrap()
            .eax;
        assert_eq!(
            eax & (KVM_FEATURE_MSI_EXT_DEST_ID | KVM_FEATURE_KVMCLOCK | kvm_features::PV_EOI),
            0
        );
        // A host table without the bit still gets it when the model says so.
        let mut bare = entry(LEAF_KVM_FEATURES, 0);
        bare.eax = 0;
        let host = CpuId::from_entries(&[entry(1, 0), bare]).unwrap();
        let eax = find(&vcpu_cpuid(&host, &cfg(), 0), LEAF_KVM_FEATURES, 0)
            .unwrap()
            .eax;
        assert_eq!(eax & kvm_features::PV_EOI, kvm_features::PV_EOI);
    }

    /// Past 255 the 8-bit fields keep the low byte; leaf 0BH has the whole ID.
    #[test]
    fn wide_ids_are_whole_in_leaf_0b_only() {
        let m = model(300, None, "");
        let c = vcpu_cpuid(&table(), &m, 299);
        assert_eq!(find(&c, 1, 0).unwrap().ebx >> 24, 299 & 0xFF);
        assert_eq!(find(&c, 0xB, 1).unwrap().edx, 299);
        assert_eq!(find(&c, 0xB, 1).unwrap().eax, 9);
    }
}
