//! The VM-wide interrupt controllers in the API's one shape ([`PlatformInfo`]): from the
//! `irqchip` model's device snapshot (`user` and `split` mode) or from KVM_GET_IRQCHIP
//! (`kernel` mode).

use irqchip::pic::Pic8259;
use irqchip::routing::RouteTarget;
use irqchip::snapshot::DeviceSnapshot;
use kvm_bindings::{kvm_ioapic_state, kvm_irqchip, kvm_pic_state};
use kvm_ioctls::VmFd;

use super::model::{GsiRoute, IoApicInfo, IoApicPin, PicInfo, PlatformInfo};
use crate::kvm::KvmError;

fn model_pic(pic: &Pic8259) -> PicInfo {
    PicInfo {
        irr: pic.irr(),
        isr: pic.isr(),
        imr: pic.imr(),
        elcr: pic.elcr(),
        vector_base: pic.vector_base(),
    }
}

fn target_name(target: &RouteTarget) -> String {
    match target {
        RouteTarget::Pic { irq } => format!("pic:{irq}"),
        RouteTarget::IoApic { pin } => format!("ioapic:{pin}"),
        RouteTarget::Msi(_) => "msi".into(),
    }
}

/// `user` and `split` mode: the model's PIC pair, IOAPIC and routing table.
pub fn from_devices(devices: &DeviceSnapshot) -> PlatformInfo {
    let ioapic = &devices.ioapic;
    let pins = (0..ioapic.pins())
        .filter_map(|pin| {
            let entry = ioapic.entry(pin)?;
            Some(IoApicPin::decode(
                pin as u32,
                entry.0,
                ioapic.is_asserted(pin),
            ))
        })
        .collect();
    PlatformInfo {
        ioapic: IoApicInfo {
            id: ioapic.id(),
            pins,
        },
        pics: vec![
            model_pic(devices.pic.master()),
            model_pic(devices.pic.slave()),
        ],
        gsi_routing: devices
            .routing
            .routes()
            .map(|(gsi, targets)| GsiRoute {
                gsi,
                targets: targets.iter().map(target_name).collect(),
            })
            .filter(|route| !route.targets.is_empty())
            .collect(),
    }
}

fn kvm_pic(pic: &kvm_pic_state) -> PicInfo {
    PicInfo {
        irr: pic.irr,
        isr: pic.isr,
        imr: pic.imr,
        elcr: pic.elcr,
        vector_base: pic.irq_base,
    }
}

/// KVM_GET_IRQCHIP of one chip (0 = master PIC, 1 = slave PIC, 2 = IOAPIC).
fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// KVM's default GSI routing, which `kernel` mode never changes (virt/kvm/irqchip.c,
/// `kvm_setup_default_irq_routing`): GSIs 0-15 to the PIC input and the IOAPIC pin of the same
/// number, GSIs 16-23 to the IOAPIC only.
fn kvm_default_routing(pins: u32) -> Vec<GsiRoute> {
    (0..pins)
        .map(|gsi| {
            let mut targets = Vec::new();
            if gsi < 16 {
                targets.push(format!("pic:{gsi}"));
            }
            targets.push(format!("ioapic:{gsi}"));
            GsiRoute { gsi, targets }
        })
        .collect()
}

/// `kernel` mode: KVM's PICs and IOAPIC.
pub fn from_kvm(vm: &VmFd) -> Result<PlatformInfo, KvmError> {
    let master = get_chip(vm, 0)?;
    let slave = get_chip(vm, 1)?;
    let ioapic = get_chip(vm, 2)?;
    // KVM_GET_IRQCHIP fills `pic` for chips 0 and 1, `ioapic` for chip 2.
    type Chips = (kvm_pic_state, kvm_pic_state, kvm_ioapic_state);
    // SAFETY: each member read is the one KVM filled; all are plain integers (any bit pattern).
    let chips: Chips = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    let (master, slave, ioapic) = chips;
    let pins = (0..ioapic.redirtbl.len() as u32)
        .map(|pin| {
            // SAFETY: `bits` views the whole 64-bit redirection entry, valid for any bits.
            let raw = unsafe { ioapic.redirtbl[pin as usize].bits };
            // KVM's `irr` holds the pins' asserted levels.
            IoApicPin::decode(pin, raw, ioapic.irr & (1 << pin) != 0)
        })
        .collect::<Vec<_>>();
    Ok(PlatformInfo {
        gsi_routing: kvm_default_routing(pins.len() as u32),
        ioapic: IoApicInfo {
            id: ioapic.id as u8,
            pins,
        },
        pics: vec![kvm_pic(&master), kvm_pic(&slave)],
    })
}
