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

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::ioapic::IOAPIC_DEFAULT_BASE;

    /// KVM's chips as Linux leaves them (PIC vectors 0x20/0x28, ELCR, line 9 held high as a
    /// level-triggered ACPI SCI, line 17 a level PCI pin asserted), converted to the model's
    /// devices: the model's level checks pass, the levels are the lines', and back in KVM's
    /// terms the entries, the level pins' `irr` and the PIC registers are unchanged.
    #[test]
    fn kvm_chips_become_consistent_model_devices_and_back() {
        let mut pics = [kvm_pic_state::default(); 2];
        pics[0].irq_base = 0x20;
        pics[1].irq_base = 0x28;
        pics[1].elcr = 0x02;
        pics[1].last_irr = 0x02; // line 9
        pics[0].imr = 0xFB;
        let mut ioapic = kvm_ioapic_state {
            base_address: IOAPIC_DEFAULT_BASE,
            ..Default::default()
        };
        ioapic.redirtbl[9].bits = 0x41 | 1 << 15; // level, active high
        ioapic.redirtbl[17].bits = 0x51 | 1 << 15 | 1 << 13; // level, active low
        ioapic.irr = 1 << 9 | 1 << 17;
        let devices = devices_from_kvm(&pics, &ioapic).unwrap();
        devices
            .check(IoApicConfig::default(), false, ioapic_wire_level)
            .unwrap();
        assert!(devices.routing.wire_level(9));
        assert!(devices.routing.wire_level(17));
        assert!(!devices.routing.wire_level(4));
        assert!(devices.pic.line(9));
        let (pics2, ioapic2) = devices_to_kvm(&devices).unwrap();
        assert_eq!(ioapic2.irr, 1 << 9 | 1 << 17);
        for pin in [9, 17] {
            // SAFETY: `bits` views the whole 64-bit entry.
            let (a, b) = unsafe { (ioapic.redirtbl[pin].bits, ioapic2.redirtbl[pin].bits) };
            assert_eq!(a, b, "pin {pin}");
        }
        assert_eq!(pics2[1].elcr, 0x02);
        assert_eq!(pics2[1].last_irr & 0x02, 0x02);
        assert_eq!((pics2[0].irq_base, pics2[0].imr), (0x20, 0xFB));
    }
}
