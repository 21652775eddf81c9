//! 8259A pair: the model's [`DualPic`] <-> two `kvm_pic_state` (KVM_GET_IRQCHIP with
//! KVM_IRQCHIP_PIC_MASTER and KVM_IRQCHIP_PIC_SLAVE).

use irqchip::pic::{DualPic, InitState, Pic8259, PicRegisters, ReadSelect, Role};
use kvm_bindings::kvm_pic_state;

/// KVM's `init_state`: 0 ready, then the ICW it expects next (1 = ICW2, 2 = ICW3, 3 = ICW4).
fn init_to_kvm(init: InitState) -> u8 {
    match init {
        InitState::Ready => 0,
        InitState::AwaitIcw2 => 1,
        InitState::AwaitIcw3 => 2,
        InitState::AwaitIcw4 => 3,
    }
}

/// Values past 3 are taken as ready: KVM drops data-port writes in them, and the model has no
/// state that does.
fn init_from_kvm(init: u8) -> InitState {
    match init {
        1 => InitState::AwaitIcw2,
        2 => InitState::AwaitIcw3,
        3 => InitState::AwaitIcw4,
        _ => InitState::Ready,
    }
}

fn chip_to_kvm(chip: &Pic8259) -> kvm_pic_state {
    let regs = chip.registers();
    kvm_pic_state {
        last_irr: regs.lines,
        irr: regs.irr,
        imr: regs.imr,
        isr: regs.isr,
        // KVM's highest-priority level; the model stores the lowest, the level just before it.
        priority_add: (regs.lowest_priority + 1) & 7,
        irq_base: regs.vector_base,
        read_reg_select: u8::from(regs.read_select == ReadSelect::Isr),
        poll: u8::from(regs.poll),
        special_mask: u8::from(regs.special_mask),
        init_state: init_to_kvm(regs.init),
        auto_eoi: u8::from(regs.auto_eoi),
        rotate_on_auto_eoi: u8::from(regs.rotate_on_auto_eoi),
        special_fully_nested_mode: u8::from(regs.special_fully_nested),
        init4: u8::from(regs.icw4_needed),
        elcr: regs.elcr,
        elcr_mask: chip.role().elcr_writable(),
    }
}

fn chip_from_kvm(role: Role, state: &kvm_pic_state) -> PicRegisters {
    let power_on = Pic8259::power_on(role).registers();
    PicRegisters {
        lines: state.last_irr,
        irr: state.irr,
        isr: state.isr,
        imr: state.imr,
        elcr: state.elcr,
        init: init_from_kvm(state.init_state),
        icw4_needed: state.init4 != 0,
        vector_base: state.irq_base,
        auto_eoi: state.auto_eoi != 0,
        special_fully_nested: state.special_fully_nested_mode != 0,
        rotate_on_auto_eoi: state.rotate_on_auto_eoi != 0,
        lowest_priority: state.priority_add.wrapping_sub(1) & 7,
        special_mask: state.special_mask != 0,
        read_select: if state.read_reg_select != 0 {
            ReadSelect::Isr
        } else {
            ReadSelect::Irr
        },
        poll: state.poll != 0,
        // KVM has no LTIM, single mode, ICW3 or buffered mode and always uses 8086 vectors:
        // the PC wiring the model powers on with.
        ..power_on
    }
}

/// The model's PIC pair as KVM's `[master, slave]`. Lost, since KVM has no place for them:
/// ICW1 LTIM and single mode, ICW3, ICW4 µPM and buffered mode (a PC guest programs cascade,
/// edge via ELCR, 8086 mode, unbuffered). `last_irr` is each chip's input levels, the
/// master's IR2 being the slave's INT output (KVM pulses IR2 instead, so its own states
/// usually show 0 there).
pub fn pic_to_kvm(pic: &DualPic) -> [kvm_pic_state; 2] {
    [chip_to_kvm(pic.master()), chip_to_kvm(pic.slave())]
}

/// KVM's `[master, slave]` as the model's pair, with the PC wiring for what KVM does not keep
/// (see [`pic_to_kvm`]); `elcr_mask` is ignored (the model's is fixed by the chipset). The
/// master's IR2 input becomes the slave's INT output: when that is high and KVM's `last_irr`
/// bit 2 is not, the master latches an IR2 request, as KVM's next pulse would.
pub fn pic_from_kvm(states: &[kvm_pic_state; 2]) -> DualPic {
    DualPic::from_registers(
        &chip_from_kvm(Role::Master, &states[0]),
        &chip_from_kvm(Role::Slave, &states[1]),
    )
}
