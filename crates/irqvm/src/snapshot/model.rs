//! The CPU model a snapshot's guest saw (`--topology`, `--cpu-features` resolved, and every
//! vCPU's CPUID table), carried so that a restore gives the guest the same CPUs: a guest reads
//! CPUID once and relies on it (its APIC IDs, x2APIC, the TSC-deadline timer, kvmclock, PV EOI).
//!
//! `irqvm restore` builds its CPU model from the snapshot; an explicit `--topology` or
//! `--cpu-features` that says otherwise is refused ([`CpuModelState::check_options`]), and the
//! tables this host and irqvm build for that model must be the saved ones, entry by entry
//! ([`CpuModelState::check_cpuid`]). KVM_FEATURE_MSI_EXT_DEST_ID, which a new `kernel`-mode VM
//! never offers (its in-kernel IOAPIC reads 8 destination bits), stays in the CPUID of a guest
//! restored into `kernel` mode that saw it; the IOAPIC then honours 8 bits, which reach every
//! CPU as long as the APIC IDs stay below 255, so a guest with larger IDs is refused there
//! ([`CpuModelState::kernel_ext_dest_id`]; docs/architecture.md, "Snapshots").

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

use crate::cpumodel::{CpuModel, Feature, FeatureEdits, Topology, XAPIC_ID_LIMIT};
use crate::mode::IrqchipMode;

/// Why a snapshot's CPU model does not fit a restore (a [`super::format::SnapshotError`]).
#[derive(Debug, thiserror::Error)]
pub enum CpuModelMismatch {
    #[error(
        "{option} {given} conflicts with the snapshot's CPU model ({saved}): a restored guest \
         keeps the CPUs it saw; leave the option out"
    )]
    Conflict {
        option: &'static str,
        given: String,
        saved: String,
    },
    #[error("vCPU {vcpu}: the guest saw another CPUID: {what}")]
    Cpuid { vcpu: usize, what: String },
    #[error(
        "the guest saw KVM_FEATURE_MSI_EXT_DEST_ID with APIC IDs up to {max_apic_id}: kernel \
         mode's in-kernel IOAPIC reads 8 destination bits and could not reach them; restore \
         into user or split mode"
    )]
    ExtDestIdNeeded { max_apic_id: u32 },
    #[error("snapshot shape: {0}")]
    Shape(String),
}

/// One CPUID entry as KVM_SET_CPUID2 took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidEntry {
    fn from_kvm(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    /// The registers as compared.
    fn compared(&self) -> [(&'static str, u32); 5] {
        [
            ("flags", self.flags),
            ("EAX", self.eax),
            ("EBX", self.ebx),
            ("ECX", self.ecx),
            ("EDX", self.edx),
        ]
    }
}

/// The resolved CPU model and the CPUID tables the vCPUs were given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModelState {
    pub topology: Topology,
    pub x2apic: bool,
    pub tsc_deadline: bool,
    /// In the source's platform; the target's decides (module doc).
    pub ext_dest_id: bool,
    pub kvmclock: bool,
    /// KVM_FEATURE_PV_EOI. Absent from snapshots written before irqvm offered it: their guests
    /// saw it hidden, so they restore with it off (and the same CPUID).
    #[serde(default)]
    pub pv_eoi: bool,
    /// Index = vCPU: its CPUID table.
    pub cpuid: Vec<Vec<CpuidEntry>>,
}

/// The features `--cpu-features` can turn on, with the model's value of each.
fn features(model: &CpuModelState) -> [(Feature, &'static str, bool); 5] {
    [
        (Feature::X2apic, "x2apic", model.x2apic),
        (Feature::TscDeadline, "tsc-deadline", model.tsc_deadline),
        (Feature::Kvmclock, "kvmclock", model.kvmclock),
        (Feature::PvEoi, "kvm-pv-eoi", model.pv_eoi),
        (
            Feature::MsiExtDestId,
            "kvm-msi-ext-dest-id",
            model.ext_dest_id,
        ),
    ]
}

fn sign(on: bool) -> char {
    if on {
        '+'
    } else {
        '-'
    }
}

impl CpuModelState {
    /// The state of a VM built with `model`, whose vCPU `i` was given `tables[i]`.
    pub fn new(model: &CpuModel, tables: &[CpuId]) -> Self {
        Self {
            topology: model.topology,
            x2apic: model.x2apic,
            tsc_deadline: model.tsc_deadline,
            ext_dest_id: model.ext_dest_id,
            kvmclock: model.kvmclock,
            pv_eoi: model.pv_eoi,
            cpuid: tables
                .iter()
                .map(|t| t.as_slice().iter().map(CpuidEntry::from_kvm).collect())
                .collect(),
        }
    }

    /// `--cpu-features` items that give this model in `target` (which may refuse one, as for
    /// a new VM: the error names it). KVM_FEATURE_MSI_EXT_DEST_ID is off for `kernel` mode's
    /// platform; [`Self::kernel_ext_dest_id`] puts it back into the guest's CPUID.
    pub fn edits_for(&self, target: IrqchipMode) -> FeatureEdits {
        FeatureEdits(
            features(self)
                .into_iter()
                .map(|(feature, _, on)| match feature {
                    Feature::MsiExtDestId => (feature, on && target != IrqchipMode::Kernel),
                    _ => (feature, on),
                })
                .collect(),
        )
    }

    /// Refuses an explicit `--topology` or `--cpu-features` item on restore that differs from
    /// the model the guest saw (the same values are accepted).
    pub fn check_options(
        &self,
        topology: Option<Topology>,
        edits: &FeatureEdits,
    ) -> Result<(), CpuModelMismatch> {
        if let Some(given) = topology.filter(|t| *t != self.topology) {
            return Err(CpuModelMismatch::Conflict {
                option: "--topology",
                given: given.to_string(),
                saved: self.topology.to_string(),
            });
        }
        let saved_features = features(self);
        for &(feature, on) in &edits.0 {
            let saved = match feature {
                Feature::EmulatorGap(_) => Some(false),
                _ => saved_features.iter().find(|f| f.0 == feature).map(|f| f.2),
            };
            if saved != Some(on) {
                let name = match feature {
                    Feature::EmulatorGap(name) => name,
                    _ => features(self)
                        .into_iter()
                        .find(|f| f.0 == feature)
                        .map_or("?", |f| f.1),
                };
                return Err(CpuModelMismatch::Conflict {
                    option: "--cpu-features",
                    given: format!("{}{name}", sign(on)),
                    saved: format!("{}{name}", sign(!on)),
                });
            }
        }
        Ok(())
    }

    /// `model` (resolved from [`Self::edits_for`]) with the guest's KVM_FEATURE_MSI_EXT_DEST_ID
    /// back for its CPUID where the target's platform dropped it (`kernel` mode), or the refusal
    /// when an APIC ID needs more than the 8 destination bits KVM's IOAPIC reads.
    pub fn kernel_ext_dest_id(&self, mut model: CpuModel) -> Result<CpuModel, CpuModelMismatch> {
        if !self.ext_dest_id || model.ext_dest_id {
            return Ok(model);
        }
        let max_apic_id = model.max_apic_id();
        if max_apic_id >= XAPIC_ID_LIMIT {
            return Err(CpuModelMismatch::ExtDestIdNeeded { max_apic_id });
        }
        model.ext_dest_id = true;
        Ok(model)
    }

    /// The checks that need no host: the topology's processors and a table per vCPU.
    pub fn check_shape(&self, vcpus: usize) -> Result<(), CpuModelMismatch> {
        if self.topology.cpus() != vcpus as u64 {
            return Err(CpuModelMismatch::Shape(format!(
                "the header says {vcpus} vCPUs, the CPU model's topology {} has {}",
                self.topology,
                self.topology.cpus()
            )));
        }
        if self.cpuid.len() != vcpus {
            return Err(CpuModelMismatch::Shape(format!(
                "the header says {vcpus} vCPUs, the CPU model has {} CPUID tables",
                self.cpuid.len()
            )));
        }
        Ok(())
    }

    /// Whether `now` (the tables this host and irqvm built for the restored model) are the
    /// saved ones, entry by entry.
    pub fn check_cpuid(&self, now: &CpuModelState) -> Result<(), CpuModelMismatch> {
        for (vcpu, (saved, built)) in self.cpuid.iter().zip(&now.cpuid).enumerate() {
            let mismatch = |what: String| CpuModelMismatch::Cpuid { vcpu, what };
            let key = |e: &CpuidEntry| (e.function, e.index);
            for s in saved {
                let Some(b) = built.iter().find(|b| key(b) == key(s)) else {
                    return Err(mismatch(format!(
                        "leaf {:#x} subleaf {} is in the snapshot, not here",
                        s.function, s.index
                    )));
                };
                for ((reg, was), (_, is)) in s.compared().into_iter().zip(b.compared()) {
                    if was != is {
                        return Err(mismatch(format!(
                            "leaf {:#x} subleaf {} {reg} was {was:#x}, here {is:#x}",
                            s.function, s.index
                        )));
                    }
                }
            }
            if let Some(b) = built
                .iter()
                .find(|b| !saved.iter().any(|s| key(s) == key(b)))
            {
                return Err(mismatch(format!(
                    "leaf {:#x} subleaf {} is here, not in the snapshot",
                    b.function, b.index
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpumodel::HostLimits;

    const HOST: HostLimits = HostLimits {
        max_vcpus: 64,
        max_vcpu_id: 64,
        tsc_deadline: true,
    };

    fn state(topology: &str, edits: &str, mode: IrqchipMode) -> CpuModelState {
        let t: Topology = topology.parse().unwrap();
        let model = CpuModel::resolve(
            t.cpus() as u32,
            Some(t),
            &edits.parse().unwrap(),
            mode,
            HOST,
        )
        .unwrap();
        let table = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        let tables: Vec<CpuId> = (0..model.cpus as usize)
            .map(|i| crate::cpuid::vcpu_cpuid(&table, &model, i))
            .collect();
        CpuModelState::new(&model, &tables)
    }

    /// The edits rebuild the same model in any mode but for the platform's ext-dest-ID.
    #[test]
    fn edits_rebuild_the_model() {
        let saved = state(
            "sockets=2,cores=2",
            "-tsc-deadline,-x2apic",
            IrqchipMode::User,
        );
        for mode in [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel] {
            let edits = saved.edits_for(mode);
            let model = CpuModel::resolve(4, Some(saved.topology), &edits, mode, HOST).unwrap();
            assert!(!model.x2apic && !model.tsc_deadline && model.kvmclock && model.pv_eoi);
            assert_eq!(model.ext_dest_id, mode != IrqchipMode::Kernel);
            assert_eq!(model.topology, saved.topology);
        }
    }

    /// A snapshot written before irqvm offered PV EOI has no `pv_eoi`: its guest saw the
    /// feature hidden, so it reads as off, and the edits rebuild a model (and CPUID) without it.
    #[test]
    fn a_snapshot_without_pv_eoi_restores_with_it_off() {
        // What an older irqvm wrote: CPUID 0x40000001 EAX without bit 6, no `pv_eoi` key.
        let saved = state("cores=2", "-kvm-pv-eoi", IrqchipMode::Split);
        assert_eq!(saved.cpuid[0][1].function, 0x4000_0001);
        assert_eq!(
            saved.cpuid[0][1].eax & crate::cpuid::kvm_features::PV_EOI,
            0
        );
        let mut value = serde_json::to_value(&saved).unwrap();
        let object = value.as_object_mut().unwrap();
        assert_eq!(
            object.remove("pv_eoi"),
            Some(serde_json::Value::Bool(false))
        );
        let text = serde_json::to_string(&value).unwrap();
        assert!(!text.contains("pv_eoi"));
        let old: CpuModelState = serde_json::from_str(&text).unwrap();
        assert!(!old.pv_eoi && old.kvmclock && old.x2apic);
        assert_eq!(old, saved);
        // Today's default would give the guest another CPUID than it saw.
        let default = state("cores=2", "", IrqchipMode::Split);
        assert!(old.check_cpuid(&default).is_err());
        for mode in [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel] {
            let edits = old.edits_for(mode);
            assert_eq!(edits.get(Feature::PvEoi), Some(false));
            let model = CpuModel::resolve(2, Some(old.topology), &edits, mode, HOST).unwrap();
            assert!(!model.pv_eoi);
        }
        assert!(old
            .check_options(None, &"-kvm-pv-eoi".parse().unwrap())
            .is_ok());
        let err = old
            .check_options(None, &"+kvm-pv-eoi".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("+kvm-pv-eoi") && err.contains("-kvm-pv-eoi"),
            "{err}"
        );
    }

    /// Options that agree pass; each that differs is refused by name.
    #[test]
    fn conflicting_options_are_named() {
        let saved = state("sockets=2,cores=2", "-tsc-deadline", IrqchipMode::Split);
        let same: Topology = "sockets=2,cores=2".parse().unwrap();
        let ok: FeatureEdits = "-tsc-deadline,+x2apic,-cx16".parse().unwrap();
        assert!(saved.check_options(Some(same), &ok).is_ok());
        let err = saved
            .check_options(Some("cores=4".parse().unwrap()), &FeatureEdits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--topology sockets=1,dies=1,cores=4,threads=1")
                && err.contains("sockets=2,dies=1,cores=2,threads=1"),
            "{err}"
        );
        let err = saved
            .check_options(None, &"+tsc-deadline".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--cpu-features +tsc-deadline") && err.contains("-tsc-deadline"),
            "{err}"
        );
        let err = saved
            .check_options(None, &"-kvm-msi-ext-dest-id".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, CpuModelMismatch::Conflict { .. }));
    }

    /// Into `kernel` mode the guest keeps KVM_FEATURE_MSI_EXT_DEST_ID in its CPUID while its
    /// APIC IDs fit the IOAPIC's 8 bits, and is refused past them.
    #[test]
    fn kernel_keeps_the_ext_dest_id_bit_the_guest_saw() {
        let saved = state("cores=2", "", IrqchipMode::User);
        let kernel = |cpus: u32| {
            CpuModel::resolve(
                cpus,
                None,
                &saved.edits_for(IrqchipMode::Kernel),
                IrqchipMode::Kernel,
                HostLimits {
                    max_vcpus: 1024,
                    max_vcpu_id: 4096,
                    tsc_deadline: true,
                },
            )
            .unwrap()
        };
        assert!(!kernel(2).ext_dest_id);
        assert!(saved.kernel_ext_dest_id(kernel(2)).unwrap().ext_dest_id);
        assert!(matches!(
            saved.kernel_ext_dest_id(kernel(300)),
            Err(CpuModelMismatch::ExtDestIdNeeded { max_apic_id: 299 })
        ));
        let mut without = saved.clone();
        without.ext_dest_id = false;
        assert!(!without.kernel_ext_dest_id(kernel(300)).unwrap().ext_dest_id);
    }

    /// The tables compare entry by entry, naming the first difference.
    #[test]
    fn cpuid_differences_are_named() {
        let saved = state("cores=2", "", IrqchipMode::User);
        assert!(saved.check_cpuid(&saved.clone()).is_ok());
        let kernel = state("cores=2", "", IrqchipMode::Kernel);
        let err = saved.check_cpuid(&kernel).unwrap_err().to_string();
        assert!(err.contains("leaf 0x40000001 subleaf 0 EAX"), "{err}");
        let other = state("sockets=2", "", IrqchipMode::User);
        let err = saved.check_cpuid(&other).unwrap_err().to_string();
        assert!(
            err.contains("vCPU 0") && err.contains("leaf 0x1 subleaf 0 EBX"),
            "{err}"
        );
        let mut fewer = saved.clone();
        fewer.cpuid[1].pop();
        let err = saved.check_cpuid(&fewer).unwrap_err().to_string();
        assert!(err.contains("vCPU 1") && err.contains("not here"), "{err}");
        assert!(saved.check_shape(2).is_ok());
        let err = saved.check_shape(3).unwrap_err().to_string();
        assert!(
            err.contains("topology sockets=1,dies=1,cores=2,threads=1 has 2"),
            "{err}"
        );
        let mut tables = saved.clone();
        tables.topology.cores = 3;
        let err = tables.check_shape(3).unwrap_err().to_string();
        assert!(err.contains("the CPU model has 2 CPUID tables"), "{err}");
    }
}
