//! `kernel` mode: KVM's in-kernel PIC, IOAPIC and LAPICs; and the KVM helpers the two backends
//! whose LAPICs are KVM's (`kernel`, `split`) share.

use std::sync::Arc;
use std::time::Instant;

use irqchip::lapic::LapicConfig;
use irqchip::msi::MsiMessage;
use kvm_bindings::{kvm_mp_state, kvm_msi, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::{
    validate_msi, ChipExit, ChipFeatures, EntryDecision, ExitHandled, HostEvent, InterruptLines,
    Irqchip, IrqchipError, IrqchipMode, MsiDelivery, PlatformFabric, VcpuFabric, VcpuIrqchip,
    IRQ_LINES,
};
use crate::api::model::PlatformInfo;
use crate::kvm::KvmError;

/// `kernel` mode: KVM's own PIC, IOAPIC and LAPICs.
pub struct KernelIrqchip {
    vm: Arc<VmFd>,
    features: ChipFeatures,
    cpu: crate::cpumodel::CpuModel,
    ids: KvmApicIds,
}

impl KernelIrqchip {
    /// KVM_CREATE_IRQCHIP (before any vCPU exists). No PIT: timers come from the LAPIC in every
    /// mode.
    pub fn new(
        kvm: &Kvm,
        vm: Arc<VmFd>,
        cpu: crate::cpumodel::CpuModel,
    ) -> Result<Self, IrqchipError> {
        crate::kvm::require_cap(kvm, Cap::Irqchip, "KVM_CAP_IRQCHIP")?;
        vm.create_irq_chip()
            .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let ids = KvmApicIds::for_model(&cpu);
        enable_x2apic_api(kvm, &vm, ids, SuppressEoiBroadcast::KvmDefault)?;
        let features = ChipFeatures::from(&cpu);
        Ok(Self {
            vm,
            features,
            cpu,
            ids,
        })
    }
}

impl InterruptLines for KernelIrqchip {
    /// KVM_IRQ_LINE: KVM's default routing sends line n to PIC input n and IOAPIC pin n, line 0
    /// included (pin 0, not a PC's pin 2: the control API's `platform` shows the IOAPIC's input
    /// levels, and line 0 raises pin 0).
    fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError> {
        if line >= IRQ_LINES {
            return Err(IrqchipError::NoSuchLine(line));
        }
        self.vm
            .set_irq_line(line, level)
            .map_err(KvmError::ioctl("KVM_IRQ_LINE"))?;
        Ok(())
    }

    /// KVM_SIGNAL_MSI to KVM's LAPICs (validated first).
    fn signal_msi(&self, address: u64, data: u32) -> Result<MsiDelivery, IrqchipError> {
        kvm_signal_msi(&self.vm, validate_msi(address, data)?)
    }
}

/// How KVM reads APIC IDs in one VM (KVM_CAP_X2APIC_API, Linux Documentation/virt/kvm/api.rst
/// 7.8), chosen from the VM's CPU model before any vCPU exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KvmApicIds {
    /// Every APIC ID fits xAPIC's 8 bits (the highest is at most 254): 32-bit IDs stay off, as
    /// QEMU leaves them for such VMs. KVM then keeps the architectural rule for a physical
    /// destination that two APICs hold after a guest wrote one's xAPIC ID into the other: both
    /// take the message (SDM vol. 3 §11.6.2.1). With 32-bit IDs on, KVM's APIC map keeps only the
    /// first vCPU with that ID (its "hotplug hack", `kvm_recalculate_phys_map`).
    Xapic,
    /// Some APIC ID is 255 or more: KVM_X2APIC_API_USE_32BIT_IDS is on, so an x2APIC-mode vCPU
    /// gets its whole vCPU ID as x2APIC ID and destinations past 8 bits are read from MSI
    /// address bits 63:40 (`address_hi[31:8]`).
    Wide,
}

impl KvmApicIds {
    /// 32-bit IDs only where an APIC ID needs them.
    pub(crate) fn for_model(cpu: &crate::cpumodel::CpuModel) -> Self {
        if cpu.max_apic_id() >= crate::cpumodel::XAPIC_ID_LIMIT {
            Self::Wide
        } else {
            Self::Xapic
        }
    }

    /// How KVM lays out the APIC page's ID register in x2APIC mode with this setting: with
    /// 32-bit IDs the whole x2APIC ID at 0x20 (KVM_SET_LAPIC fails with EINVAL for any other than
    /// the vCPU's), without them `id << 24` (KVM ignores the field on set).
    pub(crate) fn page_format(self) -> crate::snapshot::convert::LapicFormat {
        crate::snapshot::convert::LapicFormat {
            x2apic_ids: self == Self::Wide,
        }
    }

    fn cap_flags(self) -> u32 {
        let quirk_off = kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK;
        match self {
            Self::Xapic => quirk_off,
            Self::Wide => quirk_off | kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS,
        }
    }
}

/// KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST (Linux uapi asm/kvm.h, KVM_CAP_X2APIC_API flag
/// bit 2, which an earlier form of the patch called ..._DISABLE_SUPPRESS_EOI_BROADCAST_QUIRK;
/// not in kvm-bindings yet): with a split irqchip KVM honours SVR bit 12 and sends no
/// KVM_EXIT_IOAPIC_EOI for an EOI the guest suppressed.
const KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST: u32 = 1 << 2;

/// What KVM's LAPICs do with SVR bit 12 (Suppress EOI Broadcast, SDM vol. 3 §11.8.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SuppressEoiBroadcast {
    /// KVM's own choice: with its in-kernel IOAPIC it offers no directed EOI; with a split
    /// irqchip, a KVM without the flag offers it and still broadcasts every EOI (its "legacy
    /// quirky behavior", Documentation/virt/kvm/api.rst 7.8).
    KvmDefault,
    /// `split` mode, whose userspace IOAPIC has the EOI register (version 0x20): ask KVM to
    /// honour the bit where it can (KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST), so a guest that
    /// suppresses the broadcast gets no EOI at the IOAPIC until it writes that register, as in
    /// `user` mode.
    HonourWhereOffered,
}

/// KVM_ENABLE_CAP(KVM_CAP_X2APIC_API), before any vCPU exists (for `split` after
/// KVM_CAP_SPLIT_IRQCHIP, which the suppression flag needs): 32-bit APIC IDs as `ids` says,
/// always the x2APIC broadcast quirk disabled, as QEMU does for every in-kernel LAPIC (KVM
/// then no longer treats a device's destination 0xFF as a broadcast to x2APIC-mode vCPUs: it
/// names APIC ID 255), and EOI broadcast suppression as `suppress` says.
pub(crate) fn enable_x2apic_api(
    kvm: &Kvm,
    vm: &VmFd,
    ids: KvmApicIds,
    suppress: SuppressEoiBroadcast,
) -> Result<(), KvmError> {
    crate::kvm::require_cap(kvm, Cap::X2ApicApi, "KVM_CAP_X2APIC_API")?;
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X2APIC_API,
        ..Default::default()
    };
    let flags = ids.cap_flags();
    if suppress == SuppressEoiBroadcast::HonourWhereOffered {
        // Asked for, not checked first: KVM answers which flags it takes only for a VM that
        // already has its split irqchip, in some versions. A KVM without the flag refuses the
        // whole set (EINVAL, nothing changed) and gets it again without.
        cap.args[0] = u64::from(flags | KVM_X2APIC_ENABLE_SUPPRESS_EOI_BROADCAST);
        match vm.enable_cap(&cap) {
            Ok(()) => return Ok(()),
            Err(e) if e.errno() == libc::EINVAL => {
                tracing::info!("KVM cannot honour Suppress EOI Broadcast: EOIs are broadcast")
            }
            Err(e) => return Err(KvmError::ioctl("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)")(e)),
        }
    }
    cap.args[0] = u64::from(flags);
    vm.enable_cap(&cap)
        .map_err(KvmError::ioctl("KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)"))
}

/// Where KVM runs INIT/SIPI (`kernel` and `split` modes): the BSP (vCPU 0) RUNNABLE and every AP
/// UNINITIALIZED, set explicitly so the start state does not depend on KVM's default. An
/// UNINITIALIZED AP blocks inside KVM_RUN until KVM's LAPIC takes INIT and SIPI.
pub(crate) fn set_initial_kvm_mp_state(index: usize, vcpu: &VcpuFd) -> Result<(), IrqchipError> {
    let mp_state = if index == 0 {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
    // KVM rebuilds its APIC ID -> vCPU map when a LAPIC is reset, which for a new vCPU happens
    // inside KVM_CREATE_VCPU before the vCPU is online: the newest vCPU stays out of the map
    // until some LAPIC changes (on this host a host MSI, NMI or INIT to the last AP reached
    // nobody until the guest wrote an APIC register). Writing its own LAPIC state back
    // rebuilds the map with it.
    let lapic = vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
    vcpu.set_lapic(&lapic)
        .map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
    Ok(())
}

impl Irqchip for KernelIrqchip {
    fn mode(&self) -> IrqchipMode {
        IrqchipMode::Kernel
    }

    fn features(&self) -> ChipFeatures {
        self.features
    }

    /// KVM runs INIT/SIPI: see `set_initial_kvm_mp_state`.
    fn create_vcpu_chip(
        &self,
        index: usize,
        vcpu: &VcpuFd,
    ) -> Result<Box<dyn VcpuIrqchip>, IrqchipError> {
        set_initial_kvm_mp_state(index, vcpu)?;
        Ok(Box::new(KernelVcpuChip {
            held_timer: Default::default(),
            ids: self.ids,
        }))
    }

    /// Nothing to do: a kernel-mode vCPU blocks inside KVM_RUN, which the kick interrupts.
    fn wake_vcpu(&self, _index: usize) {}

    /// KVM_GET_IRQCHIP of both PICs and the IOAPIC.
    fn platform_info(&self) -> Result<PlatformInfo, IrqchipError> {
        Ok(crate::api::platform::from_kvm(&self.vm)?)
    }

    fn send_event(&self, index: usize, event: HostEvent) -> Result<MsiDelivery, IrqchipError> {
        super::kvm_send_event(&self.vm, &self.cpu, index, event)
    }

    /// KVM_GET_IRQCHIP of both PICs and the IOAPIC, in the model's format.
    fn save_platform(&self) -> Result<PlatformFabric, IrqchipError> {
        let (pics, ioapic) = crate::snapshot::platform::read_kvm(&self.vm)?;
        Ok(PlatformFabric {
            devices: crate::snapshot::platform::devices_from_kvm(&pics, &ioapic)?,
            lowest_priority_turn: 0,
        })
    }

    /// KVM_SET_IRQCHIP of both PICs and the IOAPIC (KVM's round-robin is not settable).
    fn restore_platform(&self, platform: &PlatformFabric) -> Result<(), IrqchipError> {
        let (pics, ioapic) = crate::snapshot::platform::devices_to_kvm(&platform.devices)?;
        crate::snapshot::platform::write_kvm(&self.vm, &pics, &ioapic)?;
        Ok(())
    }
}

/// The per-vCPU half of `kernel` mode: KVM does everything.
struct KernelVcpuChip {
    /// KVM's held-back LAPIC timer expiry across a pause.
    held_timer: super::kvm_timer::HeldTimer,
    /// How KVM lays out the APIC page's ID (the VM's setting).
    ids: KvmApicIds,
}

impl VcpuIrqchip for KernelVcpuChip {
    fn before_entry(&mut self, _vcpu: &mut VcpuFd) -> Result<EntryDecision, IrqchipError> {
        Ok(EntryDecision::Enter)
    }

    fn after_exit(&mut self, _vcpu: &mut VcpuFd) -> Result<(), IrqchipError> {
        Ok(())
    }

    fn handle_exit(&mut self, _exit: &mut ChipExit<'_>) -> Result<ExitHandled, IrqchipError> {
        Ok(ExitHandled::NotMine)
    }

    /// Never called: `before_entry` always says `Enter`.
    fn block(&mut self, _deadline: Option<Instant>) {}

    fn mp_state(&mut self, vcpu: &mut VcpuFd) -> Result<u32, IrqchipError> {
        kvm_mp_state(vcpu)
    }

    fn save_fabric(
        &mut self,
        vcpu: &mut VcpuFd,
        lapic: LapicConfig,
    ) -> Result<VcpuFabric, IrqchipError> {
        kvm_save_fabric(vcpu, lapic, &self.held_timer, self.ids)
    }

    fn injection_in_flight(&self) -> bool {
        self.held_timer.needs_flush()
    }

    fn flush_without_entry(&self) -> bool {
        self.held_timer.needs_flush()
    }

    fn pause_started(&mut self, vcpu: &mut VcpuFd, entered: bool) -> Result<(), IrqchipError> {
        self.held_timer.pause_started(vcpu, entered)
    }

    fn pause_ended(&mut self) {
        self.held_timer.pause_ended();
    }

    fn interrupted(&mut self, vcpu: &mut VcpuFd, through_loop: bool) -> Result<(), IrqchipError> {
        self.held_timer.interrupted(vcpu, through_loop)
    }

    fn restore_apic(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
        _saved_tsc: u64,
    ) -> Result<Option<u64>, IrqchipError> {
        kvm_restore_apic(vcpu, fabric, self.ids)
    }

    fn restore_events(
        &mut self,
        vcpu: &mut VcpuFd,
        fabric: &VcpuFabric,
    ) -> Result<(), IrqchipError> {
        kvm_restore_events(vcpu, fabric)
    }
}

/// A KVM local APIC's vCPU (`kernel`, `split`): KVM_GET_MP_STATE first (it accepts a pending
/// INIT/SIPI, as the model's accept step would), then the events, KVM_GET_LAPIC (with the
/// timer expiry KVM held back since the pause's flush added to IRR, `kvm_timer`) with
/// IA32_APIC_BASE and IA32_TSC_DEADLINE, and IA32_TSC as the clock's `tsc_at_zero`: all
/// converted to the model's format (`snapshot::convert`).
pub(crate) fn kvm_save_fabric(
    vcpu: &VcpuFd,
    mut cfg: LapicConfig,
    held_timer: &super::kvm_timer::HeldTimer,
    ids: KvmApicIds,
) -> Result<VcpuFabric, IrqchipError> {
    use crate::snapshot::convert::{events_from_kvm, lapic_from_kvm, KvmLapic, KvmVcpuEvents};
    use crate::snapshot::cpu::{read_msr, MSR_TSC};
    let mp_state = kvm_mp_state(vcpu)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
    let mut page = vcpu.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
    if let Some(vector) = held_timer.account(&mut page) {
        tracing::debug!(
            vcpu = cfg.index,
            vector,
            "saved a timer expiry KVM held back"
        );
    }
    let apic_base = read_msr(vcpu, 0x1B)?;
    let tsc_deadline = read_msr(vcpu, 0x6E0)?;
    cfg.clock.tsc_at_zero = read_msr(vcpu, MSR_TSC)?;
    let state = KvmLapic {
        page,
        apic_base,
        tsc_deadline,
    };
    let lapic = lapic_from_kvm(cfg, &state, ids.page_format())?;
    let model = events_from_kvm(&KvmVcpuEvents { events, mp_state }, cfg.bsp)?;
    Ok(VcpuFabric {
        model: irqchip::snapshot::VcpuSnapshot {
            index: cfg.index,
            lapic,
            mp: model.mp,
            pending: model.pending,
        },
        cpu_events: model.cpu,
    })
}

/// KVM_SET_LAPIC of the model's APIC; its TSC deadline goes in with the MSRs, after IA32_TSC.
pub(crate) fn kvm_restore_apic(
    vcpu: &VcpuFd,
    fabric: &VcpuFabric,
    ids: KvmApicIds,
) -> Result<Option<u64>, IrqchipError> {
    let state = crate::snapshot::convert::lapic_to_kvm(&fabric.model.lapic, ids.page_format());
    vcpu.set_lapic(&state.page)
        .map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
    Ok(Some(state.tsc_deadline))
}

/// KVM_SET_VCPU_EVENTS, then KVM_SET_MP_STATE last (a latched SIPI becomes SIPI_RECEIVED).
pub(crate) fn kvm_restore_events(vcpu: &VcpuFd, fabric: &VcpuFabric) -> Result<(), IrqchipError> {
    let model = &fabric.model;
    let kvm = crate::snapshot::convert::events_to_kvm(
        &model.pending,
        &model.mp,
        model.lapic.bsp_flag(),
        &fabric.cpu_events,
    );
    vcpu.set_vcpu_events(&kvm.events)
        .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: kvm.mp_state,
    })
    .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
    Ok(())
}

/// KVM_SIGNAL_MSI of a validated message (`kernel` and `split` mode). KVM returns the number of
/// LAPICs that accepted it: > 0 delivered, 0 no target or blocked.
pub(crate) fn kvm_signal_msi(vm: &VmFd, msi: MsiMessage) -> Result<MsiDelivery, IrqchipError> {
    let request = kvm_msi {
        address_lo: msi.address as u32,
        address_hi: (msi.address >> 32) as u32,
        data: msi.data,
        ..Default::default()
    };
    match vm.signal_msi(request) {
        Ok(0) => Ok(MsiDelivery::NoTarget),
        Ok(_) => Ok(MsiDelivery::Delivered),
        Err(e) => Err(KvmError::ioctl("KVM_SIGNAL_MSI")(e).into()),
    }
}

/// KVM_GET_MP_STATE of a vCPU whose LAPIC is KVM's (`kernel` and `split` mode).
pub(crate) fn kvm_mp_state(vcpu: &VcpuFd) -> Result<u32, IrqchipError> {
    let state = vcpu
        .get_mp_state()
        .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?;
    Ok(state.mp_state)
}
