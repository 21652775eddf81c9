//! The whole platform (both PICs, the IOAPIC, the GSI routing with its levels) between KVM's
//! in-kernel chips (`kernel` mode, KVM_GET/SET_IRQCHIP) and the model's [`DeviceSnapshot`].
//!
//! KVM keeps no routing table a VMM could read here (`kernel` mode never changes KVM's
//! default), so the model's side gets the PC table (`GsiRouting::pc_default`) with each device
//! line's level: line n's level is the PIC's `last_irr` bit n for n < 16 (n != 2, the cascade),
//! else the IOAPIC's `irr` bit n (KVM keeps it for level-triggered pins only: an edge pin 16-23
//! held high reads low). The IOAPIC's wires and the PIC's inputs are then what that table
//! drives, so the snapshot passes the model's level checks. KVM routes line 0 to IOAPIC pin 0,
//! the model (as a PC) to pin 2: a level on line 0 moves pins.

use irqchip::chip::ioapic_wire_level;
use irqchip::ioapic::IoApicConfig;
use irqchip::routing::{GsiRouting, RouteTarget, SourceId, PIC_CASCADE_LINE};
use irqchip::snapshot::DeviceSnapshot;
use kvm_bindings::{kvm_ioapic_state, kvm_irqchip, kvm_pic_state};
use kvm_ioctls::VmFd;

use super::convert::{ioapic_from_kvm, ioapic_to_kvm, pic_from_kvm, pic_to_kvm, KVM_PINS};
use crate::kvm::KvmError;

/// The source every device line is driven by (as in `split` mode's `DEVICE_SOURCE`).
const DEVICE_SOURCE: SourceId = SourceId(0);

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// KVM_GET_IRQCHIP of the master PIC, the slave PIC and the IOAPIC.
pub fn read_kvm(vm: &VmFd) -> Result<([kvm_pic_state; 2], kvm_ioapic_state), KvmError> {
    let (master, slave, ioapic) = (get_chip(vm, 0)?, get_chip(vm, 1)?, get_chip(vm, 2)?);
    // SAFETY: KVM_GET_IRQCHIP fills `pic` for chips 0 and 1 and `ioapic` for chip 2; all are
    // plain integers, valid for any bit pattern.
    Ok(unsafe { ([master.chip.pic, slave.chip.pic], ioapic.chip.ioapic) })
}

/// KVM_SET_IRQCHIP of the three chips.
pub fn write_kvm(
    vm: &VmFd,
    pics: &[kvm_pic_state; 2],
    ioapic: &kvm_ioapic_state,
) -> Result<(), KvmError> {
    for (chip_id, pic) in pics.iter().enumerate() {
        let mut chip = kvm_irqchip {
            chip_id: chip_id as u32,
            ..Default::default()
        };
        chip.chip.pic = *pic;
        vm.set_irqchip(&chip)
            .map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: 2,
        ..Default::default()
    };
    chip.chip.ioapic = *ioapic;
    vm.set_irqchip(&chip)
        .map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
    Ok(())
}

/// Each device line's level in KVM's chips (see the module documentation).
fn kvm_line_levels(pics: &[kvm_pic_state; 2], ioapic: &kvm_ioapic_state) -> Vec<bool> {
    (0..KVM_PINS)
        .map(|line| match line {
            2 => false,
            0..=7 => pics[0].last_irr & (1 << line) != 0,
            8..=15 => pics[1].last_irr & (1 << (line - 8)) != 0,
            _ => ioapic.irr & (1 << line) != 0,
        })
        .collect()
}

/// KVM's chips as the model's devices (see the module documentation).
pub fn devices_from_kvm(
    pics: &[kvm_pic_state; 2],
    ioapic: &kvm_ioapic_state,
) -> Result<DeviceSnapshot, super::convert::ConvertError> {
    let mut routing = GsiRouting::pc_default(KVM_PINS);
    for (line, high) in kvm_line_levels(pics, ioapic).into_iter().enumerate() {
        if high {
            // Only GSIs above the table or too many sources fail; neither can happen here.
            let _ = routing.set_source_level(line as u32, DEVICE_SOURCE, true, &mut |_, _| {});
        }
    }
    let mut pics = *pics;
    for irq in (0..16u8).filter(|irq| *irq != PIC_CASCADE_LINE) {
        let (chip, bit) = (usize::from(irq / 8), irq % 8);
        let high = routing.target_level(RouteTarget::Pic { irq });
        pics[chip].last_irr = (pics[chip].last_irr & !(1 << bit)) | (u8::from(high) << bit);
    }
    let mut ioapic = *ioapic;
    ioapic.irr = (0..KVM_PINS)
        .filter(|&pin| routing.target_level(RouteTarget::IoApic { pin }))
        .fold(0, |irr, pin| irr | 1 << pin);
    let model_ioapic = ioapic_from_kvm(&ioapic, IoApicConfig::default(), false)?;
    // The IOAPIC's wires from the routing, edge pins included (KVM's `irr` may not keep them).
    let pins: Vec<_> = (0..model_ioapic.pins())
        .map(|pin| {
            let entry = model_ioapic.entry(pin).unwrap_or_default();
            let level = routing.target_level(RouteTarget::IoApic { pin });
            (entry, ioapic_wire_level(pin, level))
        })
        .collect();
    let model_ioapic = irqchip::ioapic::IoApic::from_parts(
        model_ioapic.config(),
        false,
        model_ioapic.id(),
        model_ioapic.ioregsel(),
        &pins,
    )
    .map_err(super::convert::ConvertError::IoApic)?;
    Ok(DeviceSnapshot {
        pic: pic_from_kvm(&pics),
        ioapic: model_ioapic,
        routing,
    })
}

/// The model's devices as KVM's chips.
pub fn devices_to_kvm(
    devices: &DeviceSnapshot,
) -> Result<([kvm_pic_state; 2], kvm_ioapic_state), super::convert::ConvertError> {
    Ok((pic_to_kvm(&devices.pic), ioapic_to_kvm(&devices.ioapic)?))
}
