//! The CPU model a VM's guest sees: how many vCPUs, their APIC IDs (`--topology`) and the
//! interrupt-related CPUID features (`--cpu-features`), checked against what the irqchip mode
//! and this host can honour before anything is created.
//!
//! * `--topology sockets=S,dies=D,cores=C,threads=T` numbers vCPUs thread first, then core, die
//!   and socket, and gives each the initial APIC ID hardware would: one bit field per level, each
//!   as wide as its count rounded up to a power of two (SDM vol. 3 §9.9.1), so 3 cores per die
//!   leave ID gaps. CPUID leaves 1, 4, 0xB and 0x1F (`crate::cpuid`) and the MADT
//!   (`crate::acpi`) describe the same IDs. Without it the IDs are packed (ID = vCPU index) and
//!   all vCPUs are cores of one socket, as before.
//! * `--cpu-features +name,-name,...` (QEMU's syntax) turns features on or off, see
//!   [`Feature`]. A feature the mode or host cannot honour is refused with
//!   [`CpuModelError`], never silently dropped.

use std::fmt;
use std::str::FromStr;

use irqchip::topology::ApicIdLayout;

use crate::mode::IrqchipMode;

/// Most vCPUs irqvm runs: KVM's KVM_MAX_VCPUS on x86 (the host's KVM_CAP_MAX_VCPUS is checked too).
pub const MAX_VCPUS: u32 = 1024;
/// The first APIC ID xAPIC mode cannot address (0xFF is its broadcast, SDM vol. 3 §11.6.2.1).
pub const XAPIC_ID_LIMIT: u32 = 0xFF;
/// The widest destination a device can name with the extended destination ID (bits 11:5 of
/// the MSI address and 55:49 of an IOAPIC entry extend the 8-bit field to 15 bits).
pub const EXT_DEST_ID_LIMIT: u32 = 0x7FFF;

/// `--topology`: the package hierarchy (counts of 0 are refused by the parser; a snapshot's is
/// checked by [`CpuModel::resolve`]: its product must be the vCPU count).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub sockets: u32,
    pub dies: u32,
    pub cores: u32,
    pub threads: u32,
}

impl Topology {
    /// One socket of `cpus` single-threaded cores (the layout without `--topology`).
    pub fn flat(cpus: u32) -> Self {
        Self {
            sockets: 1,
            dies: 1,
            cores: cpus.max(1),
            threads: 1,
        }
    }

    /// Logical processors in the whole machine.
    pub fn cpus(&self) -> u64 {
        [self.sockets, self.dies, self.cores, self.threads]
            .iter()
            .map(|&n| u64::from(n))
            .product()
    }

    /// The APIC ID layout: bit fields per level (SDM vol. 3 §9.9.1).
    pub fn layout(&self) -> ApicIdLayout {
        ApicIdLayout::Hierarchy {
            threads: self.threads,
            cores: self.cores,
            dies: self.dies,
        }
    }
}

impl FromStr for Topology {
    type Err = String;

    /// `sockets=S,dies=D,cores=C,threads=T`, any order, missing levels 1.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut topo = Self {
            sockets: 1,
            dies: 1,
            cores: 1,
            threads: 1,
        };
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not LEVEL=COUNT"))?;
            let count: u32 = value
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("'{value}' is not a count of 1 or more"))?;
            let slot = match key {
                "sockets" => &mut topo.sockets,
                "dies" => &mut topo.dies,
                "cores" => &mut topo.cores,
                "threads" => &mut topo.threads,
                _ => {
                    return Err(format!(
                        "unknown level '{key}' (sockets, dies, cores, threads)"
                    ))
                }
            };
            *slot = count;
        }
        Ok(topo)
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sockets={},dies={},cores={},threads={}",
            self.sockets, self.dies, self.cores, self.threads
        )
    }
}

/// A feature `--cpu-features` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// x2APIC mode (CPUID.1:ECX\[21\]).
    X2apic,
    /// The TSC-deadline timer (CPUID.1:ECX\[24\]).
    TscDeadline,
    /// KVM_FEATURE_MSI_EXT_DEST_ID (CPUID 0x40000001 EAX\[15\]): 15-bit destinations in MSIs
    /// and IOAPIC entries.
    MsiExtDestId,
    /// kvmclock (CPUID 0x40000001 EAX\[0\] and \[3\]).
    Kvmclock,
    /// KVM_FEATURE_PV_EOI (CPUID 0x40000001 EAX\[6\]; MSR_KVM_PV_EOI_EN, Linux
    /// Documentation/virt/kvm/x86/msr.rst): the guest may skip the EOI write of an interrupt whose
    /// flag the hypervisor set. KVM's LAPIC implements it in `kernel` and `split` mode, irqvm's in
    /// `user` mode.
    PvEoi,
    /// Hidden because this host's instruction emulator cannot run it (`crate::cpuid`): may be
    /// turned off (it is) but never on.
    EmulatorGap(&'static str),
}

/// Names of [`Feature::EmulatorGap`] features, as QEMU spells them.
const EMULATOR_GAPS: &[&str] = &[
    "cx16", "popcnt", "rdrand", "rdseed", "xsave", "avx", "avx2", "fma", "f16c", "fsgsbase",
    "pcid", "invpcid", "rdtscp", "smap", "monitor",
];

impl FromStr for Feature {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Ok(match name {
            "x2apic" => Self::X2apic,
            "tsc-deadline" => Self::TscDeadline,
            "kvm-msi-ext-dest-id" | "msi-ext-dest-id" => Self::MsiExtDestId,
            "kvmclock" => Self::Kvmclock,
            "kvm-pv-eoi" => Self::PvEoi,
            gap => match EMULATOR_GAPS.iter().find(|&&g| g == gap) {
                Some(&g) => Self::EmulatorGap(g),
                None => {
                    return Err(format!(
                        "unknown CPU feature '{name}' (x2apic, tsc-deadline, kvm-msi-ext-dest-id, \
                         kvmclock, kvm-pv-eoi, or one of the hidden {})",
                        EMULATOR_GAPS.join(" ")
                    ))
                }
            },
        })
    }
}

/// `--cpu-features`: the `+`/`-` items in order (a later item wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeatureEdits(pub Vec<(Feature, bool)>);

impl FeatureEdits {
    /// What the edits say about `feature`: `Some(on)` if named.
    pub fn get(&self, feature: Feature) -> Option<bool> {
        self.0
            .iter()
            .rev()
            .find(|(f, _)| *f == feature)
            .map(|&(_, on)| on)
    }
}

impl FromStr for FeatureEdits {
    type Err = String;

    /// `+x2apic,-tsc-deadline` (a bare name means `+name`, as in QEMU).
    fn from_str(text: &str) -> Result<Self, String> {
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(|item| {
                let (on, name) = match item.as_bytes()[0] {
                    b'+' => (true, &item[1..]),
                    b'-' => (false, &item[1..]),
                    _ => (true, item),
                };
                Ok((name.parse()?, on))
            })
            .collect::<Result<_, String>>()
            .map(Self)
    }
}

/// Why a CPU model cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CpuModelError {
    #[error("vCPU count {cpus} is out of range: 1 to {max} (KVM_CAP_MAX_VCPUS)")]
    BadCpuCount { cpus: u32, max: u32 },
    #[error("--topology {topology} has {product} logical processors but --cpus is {cpus}")]
    TopologyMismatch {
        topology: Topology,
        product: u64,
        cpus: u32,
    },
    #[error("--topology {0} gives an APIC ID that does not fit 32 bits")]
    ApicIdOverflow(Topology),
    #[error(
        "APIC ID {max_id} needs vCPU IDs up to {max_id}, past this KVM's KVM_CAP_MAX_VCPU_ID {limit}"
    )]
    VcpuIdLimit { max_id: u32, limit: u32 },
    #[error(
        "-x2apic refused: APIC ID {max_id} is past 254, which only x2APIC can address (SDM §11.12)"
    )]
    X2apicRequired { max_id: u32 },
    #[error("+tsc-deadline refused: {0}")]
    TscDeadlineUnavailable(&'static str),
    #[error(
        "+kvm-msi-ext-dest-id refused in kernel mode: KVM's in-kernel IOAPIC reads only 8 \
         destination bits"
    )]
    ExtDestIdUnsupported,
    #[error("+{0} refused: this host's instruction emulator cannot run it (docs/kvm-facts.md)")]
    EmulatorGap(&'static str),
    #[error("APIC ID {max_id} is past the 15-bit extended destination ID ({EXT_DEST_ID_LIMIT}): devices could not reach it")]
    ExtDestIdTooNarrow { max_id: u32 },
}

/// What the host offers, as far as the CPU model depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    /// KVM_CAP_MAX_VCPUS.
    pub max_vcpus: u32,
    /// KVM_CAP_MAX_VCPU_ID (vCPU IDs are below it).
    pub max_vcpu_id: u32,
    /// KVM_CAP_TSC_DEADLINE_TIMER (needed when KVM's LAPIC runs the timer).
    pub tsc_deadline: bool,
}

/// Everything the guest is told about its CPUs, resolved and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuModel {
    pub cpus: u32,
    /// The hierarchy CPUID describes (one socket of `cpus` cores without `--topology`).
    pub topology: Topology,
    /// The initial APIC ID of each vCPU.
    pub layout: ApicIdLayout,
    pub x2apic: bool,
    pub tsc_deadline: bool,
    /// KVM_FEATURE_MSI_EXT_DEST_ID is advertised and honoured by the IOAPIC and MSI decode.
    pub ext_dest_id: bool,
    pub kvmclock: bool,
    /// KVM_FEATURE_PV_EOI is advertised: every mode's LAPIC implements MSR_KVM_PV_EOI_EN.
    pub pv_eoi: bool,
}

impl CpuModel {
    /// Resolves `cpus`, `topology` and `edits` for `mode` on a host with `host`'s limits.
    pub fn resolve(
        cpus: u32,
        topology: Option<Topology>,
        edits: &FeatureEdits,
        mode: IrqchipMode,
        host: HostLimits,
    ) -> Result<Self, CpuModelError> {
        let max = host.max_vcpus.min(MAX_VCPUS);
        if cpus == 0 || cpus > max {
            return Err(CpuModelError::BadCpuCount { cpus, max });
        }
        let (topology, layout) = match topology {
            Some(t) if t.cpus() != u64::from(cpus) => {
                return Err(CpuModelError::TopologyMismatch {
                    topology: t,
                    product: t.cpus(),
                    cpus,
                })
            }
            Some(t) => (t, t.layout()),
            // One socket of single-threaded cores: the IDs are the indices (packed).
            None => (Topology::flat(cpus), Topology::flat(cpus).layout()),
        };
        let max_id = layout
            .max_apic_id(cpus as usize)
            .ok_or(CpuModelError::ApicIdOverflow(topology))?
            .0;
        if mode != IrqchipMode::User && max_id >= host.max_vcpu_id {
            // KVM's LAPIC takes its APIC ID from the vCPU ID.
            return Err(CpuModelError::VcpuIdLimit {
                max_id,
                limit: host.max_vcpu_id,
            });
        }
        for (feature, on) in &edits.0 {
            if let (Feature::EmulatorGap(name), true) = (feature, on) {
                return Err(CpuModelError::EmulatorGap(name));
            }
        }
        let needs_x2apic = max_id >= XAPIC_ID_LIMIT;
        let x2apic = edits.get(Feature::X2apic).unwrap_or(true);
        if needs_x2apic && !x2apic {
            return Err(CpuModelError::X2apicRequired { max_id });
        }
        let tsc_ok = mode == IrqchipMode::User || host.tsc_deadline;
        let tsc_deadline = match edits.get(Feature::TscDeadline) {
            Some(true) if !tsc_ok => {
                return Err(CpuModelError::TscDeadlineUnavailable(
                    "KVM_CAP_TSC_DEADLINE_TIMER is missing",
                ))
            }
            Some(on) => on,
            None => tsc_ok,
        };
        let ext_ok = mode != IrqchipMode::Kernel;
        let ext_dest_id = match edits.get(Feature::MsiExtDestId) {
            Some(true) if !ext_ok => return Err(CpuModelError::ExtDestIdUnsupported),
            Some(on) => on,
            None => ext_ok,
        };
        if ext_dest_id && max_id > EXT_DEST_ID_LIMIT {
            return Err(CpuModelError::ExtDestIdTooNarrow { max_id });
        }
        Ok(Self {
            cpus,
            topology,
            layout,
            x2apic,
            tsc_deadline,
            ext_dest_id,
            kvmclock: edits.get(Feature::Kvmclock).unwrap_or(true),
            // KVM's LAPIC (kernel, split) and irqvm's (user) both implement it: on by default.
            pv_eoi: edits.get(Feature::PvEoi).unwrap_or(true),
        })
    }

    /// The initial APIC ID of vCPU `index` (checked to fit by [`CpuModel::resolve`]).
    pub fn apic_id(&self, index: usize) -> u32 {
        self.layout.apic_id(index).map_or(u32::MAX, |id| id.0)
    }

    /// Every vCPU's APIC ID, vCPU 0 (the BSP) first.
    pub fn apic_ids(&self) -> Vec<u32> {
        (0..self.cpus as usize).map(|i| self.apic_id(i)).collect()
    }

    /// The largest APIC ID.
    pub fn max_apic_id(&self) -> u32 {
        self.apic_id(self.cpus as usize - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        max_vcpus: 1024,
        max_vcpu_id: 4096,
        tsc_deadline: true,
    };

    fn resolve(
        cpus: u32,
        topo: Option<&str>,
        edits: &str,
        mode: IrqchipMode,
    ) -> Result<CpuModel, CpuModelError> {
        let topo = topo.map(|t| t.parse().unwrap());
        CpuModel::resolve(cpus, topo, &edits.parse().unwrap(), mode, HOST)
    }

    #[test]
    fn topology_parses_any_order_and_refuses_zero_or_unknown() {
        let t: Topology = "threads=2,sockets=2,cores=3".parse().unwrap();
        assert_eq!((t.sockets, t.dies, t.cores, t.threads), (2, 1, 3, 2));
        assert_eq!(t.cpus(), 12);
        assert!("cores=0".parse::<Topology>().is_err());
        assert!("books=2".parse::<Topology>().is_err());
        assert!("cores".parse::<Topology>().is_err());
    }

    #[test]
    fn topology_gives_gapped_ids_and_must_match_the_count() {
        let m = resolve(
            12,
            Some("sockets=2,cores=3,threads=2"),
            "",
            IrqchipMode::User,
        )
        .unwrap();
        // thread: 1 bit, core: 2 bits (3 cores), socket from bit 3.
        assert_eq!(m.apic_ids(), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        let err = resolve(8, Some("sockets=2,cores=3"), "", IrqchipMode::User).unwrap_err();
        assert!(matches!(
            err,
            CpuModelError::TopologyMismatch { product: 6, .. }
        ));
    }

    #[test]
    fn count_limits_follow_kvm() {
        assert!(resolve(1024, None, "", IrqchipMode::Kernel).is_ok());
        assert_eq!(
            resolve(1025, None, "", IrqchipMode::User).unwrap_err(),
            CpuModelError::BadCpuCount {
                cpus: 1025,
                max: 1024
            }
        );
        assert!(resolve(0, None, "", IrqchipMode::User).is_err());
        let small = HostLimits {
            max_vcpu_id: 300,
            ..HOST
        };
        let t = Some("sockets=2,cores=160".parse().unwrap());
        let err = CpuModel::resolve(320, t, &FeatureEdits::default(), IrqchipMode::Split, small);
        assert!(matches!(err, Err(CpuModelError::VcpuIdLimit { .. })));
    }

    #[test]
    fn x2apic_is_required_past_254() {
        assert!(resolve(255, None, "-x2apic", IrqchipMode::User).is_ok());
        assert_eq!(
            resolve(256, None, "-x2apic", IrqchipMode::User).unwrap_err(),
            CpuModelError::X2apicRequired { max_id: 255 }
        );
        let m = resolve(256, None, "+x2apic", IrqchipMode::User).unwrap();
        assert!(m.x2apic);
        assert!(
            !resolve(4, None, "-x2apic", IrqchipMode::Kernel)
                .unwrap()
                .x2apic
        );
    }

    #[test]
    fn features_follow_the_mode() {
        let user = resolve(2, None, "", IrqchipMode::User).unwrap();
        assert!(user.tsc_deadline && user.ext_dest_id && user.x2apic && user.kvmclock);
        for mode in [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel] {
            assert!(resolve(2, None, "", mode).unwrap().pv_eoi, "{mode:?}");
            assert!(
                !resolve(2, None, "-kvm-pv-eoi", mode).unwrap().pv_eoi,
                "{mode:?}"
            );
        }
        assert!(
            resolve(2, None, "", IrqchipMode::Split)
                .unwrap()
                .ext_dest_id
        );
        assert!(
            !resolve(2, None, "", IrqchipMode::Kernel)
                .unwrap()
                .ext_dest_id
        );
        assert_eq!(
            resolve(2, None, "+kvm-msi-ext-dest-id", IrqchipMode::Kernel).unwrap_err(),
            CpuModelError::ExtDestIdUnsupported
        );
        let m = resolve(2, None, "-tsc-deadline,-kvmclock", IrqchipMode::Split).unwrap();
        assert!(!m.tsc_deadline && !m.kvmclock);
        let no_tsc = HostLimits {
            tsc_deadline: false,
            ..HOST
        };
        let plus = "+tsc-deadline".parse().unwrap();
        assert!(CpuModel::resolve(2, None, &plus, IrqchipMode::Kernel, no_tsc).is_err());
        assert!(CpuModel::resolve(2, None, &plus, IrqchipMode::User, no_tsc).is_ok());
    }

    #[test]
    fn emulator_gaps_may_only_be_turned_off() {
        assert!(resolve(1, None, "-cx16,-popcnt", IrqchipMode::User).is_ok());
        assert_eq!(
            resolve(1, None, "+cx16", IrqchipMode::User).unwrap_err(),
            CpuModelError::EmulatorGap("cx16")
        );
        let err = "+sse9".parse::<FeatureEdits>().unwrap_err();
        assert!(err.contains("kvm-pv-eoi"), "{err}");
        let edits: FeatureEdits = "x2apic,-x2apic".parse().unwrap();
        assert_eq!(edits.get(Feature::X2apic), Some(false));
    }
}
