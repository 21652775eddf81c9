//! Tests of the dual 8259A, each naming the datasheet section or command word it checks.

use super::*;
use proptest::prelude::*;

const LINUX_MASTER_BASE: u8 = 0x20;
const LINUX_SLAVE_BASE: u8 = 0x28;
const BIOS_MASTER_BASE: u8 = 0x08;
const BIOS_SLAVE_BASE: u8 = 0x70;

const OCW2_NONSPECIFIC_EOI: u8 = OCW2_EOI;
const OCW3_READ_IRR: u8 = CMD_OCW3 | OCW3_RR;
const OCW3_READ_ISR: u8 = CMD_OCW3 | OCW3_RR | OCW3_RIS;
const OCW3_POLL_CMD: u8 = CMD_OCW3 | OCW3_POLL;
const OCW3_SET_SMM: u8 = CMD_OCW3 | OCW3_ESMM | OCW3_SMM;
const OCW3_CLEAR_SMM: u8 = CMD_OCW3 | OCW3_ESMM;

/// ICW1-ICW4 on one chip, as Linux and SeaBIOS send them: edge, cascade, ICW4 needed.
fn init_chip(pic: &mut DualPic, command: u16, base: u8, icw3: u8, icw4: u8) {
    pic.port_write(command, CMD_ICW1 | ICW1_IC4);
    pic.port_write(command + 1, base);
    pic.port_write(command + 1, icw3);
    pic.port_write(command + 1, icw4);
}

fn init_pair(pic: &mut DualPic, master_base: u8, slave_base: u8, icw4: u8) {
    init_chip(pic, MASTER_COMMAND_PORT, master_base, 1 << CASCADE_IR, icw4);
    init_chip(pic, SLAVE_COMMAND_PORT, slave_base, CASCADE_IR, icw4);
}

/// Linux's init_8259A: mask both, ICW1 0x11, bases, ICW3 0x04 / 0x02, ICW4 0x01, then all
/// unmasked (the test decides the masks).
fn linux_pic() -> DualPic {
    let mut pic = DualPic::new();
    pic.port_write(MASTER_DATA_PORT, 0xFF);
    pic.port_write(SLAVE_DATA_PORT, 0xFF);
    init_pair(&mut pic, LINUX_MASTER_BASE, LINUX_SLAVE_BASE, ICW4_UPM);
    pic.port_write(MASTER_DATA_PORT, 0x00);
    pic.port_write(SLAVE_DATA_PORT, 0x00);
    pic
}

fn master_vector(ir: u8) -> Vector {
    LINUX_MASTER_BASE + ir
}

fn slave_vector(ir: u8) -> Vector {
    LINUX_SLAVE_BASE + ir
}

/// The Linux vector of ISA line `irq`.
fn irq_vector(irq: u8) -> Vector {
    if irq < 8 {
        master_vector(irq)
    } else {
        slave_vector(irq - 8)
    }
}

fn pulse(pic: &mut DualPic, irq: u8) {
    pic.set_irq(irq, true);
    pic.set_irq(irq, false);
}

fn eoi_master(pic: &mut DualPic) {
    pic.port_write(MASTER_COMMAND_PORT, OCW2_NONSPECIFIC_EOI);
}

fn eoi_slave(pic: &mut DualPic) {
    pic.port_write(SLAVE_COMMAND_PORT, OCW2_NONSPECIFIC_EOI);
}

fn read_isr(pic: &mut DualPic, command: u16) -> u8 {
    pic.port_write(command, OCW3_READ_ISR);
    pic.port_read(command)
}

fn read_irr(pic: &mut DualPic, command: u16) -> u8 {
    pic.port_write(command, OCW3_READ_IRR);
    pic.port_read(command)
}

/// A guest that acknowledges every interrupt and EOIs it at once, slave first then master
/// (Linux's mask_and_ack_8259A order). Returns the vectors taken.
fn service_all(pic: &mut DualPic) -> Vec<Vector> {
    let mut taken = Vec::new();
    for _ in 0..64 {
        if !pic.output() {
            break;
        }
        let vector = pic.acknowledge();
        if (LINUX_SLAVE_BASE..LINUX_SLAVE_BASE + 8).contains(&vector) {
            eoi_slave(pic);
        }
        eoi_master(pic);
        taken.push(vector);
    }
    taken
}

// ---- Initialization Command Words ----

#[test]
fn linux_init_sequence_icw1_to_icw4_master_and_slave() {
    let mut pic = linux_pic();
    for chip in [pic.master(), pic.slave()] {
        assert_eq!(chip.init_state(), InitState::Ready);
        assert!(!chip.auto_eoi() && !chip.single_mode() && !chip.special_fully_nested());
    }
    assert_eq!(pic.master().vector_base(), 0x20);
    assert_eq!(pic.slave().vector_base(), 0x28);
    assert_eq!(pic.master().icw3(), 0x04);
    assert_eq!(pic.slave().icw3(), 0x02);
    pulse(&mut pic, 0);
    assert_eq!(pic.acknowledge(), 0x20);
    eoi_master(&mut pic);
    pulse(&mut pic, 8);
    assert_eq!(pic.acknowledge(), 0x28);
}

#[test]
fn seabios_init_sequence_icw1_to_icw4_master_and_slave() {
    let mut pic = DualPic::new();
    init_pair(&mut pic, BIOS_MASTER_BASE, BIOS_SLAVE_BASE, ICW4_UPM);
    // SeaBIOS then masks everything but the cascade and unmasks what it drives.
    pic.port_write(MASTER_DATA_PORT, !(1 << CASCADE_IR) & !0x01);
    pic.port_write(SLAVE_DATA_PORT, !(1 << 6)); // IRQ 14
    pulse(&mut pic, 0);
    assert_eq!(pic.acknowledge(), 0x08);
    eoi_master(&mut pic);
    pulse(&mut pic, 14);
    assert_eq!(pic.acknowledge(), 0x76);
    pulse(&mut pic, 1);
    assert!(!pic.output(), "IRQ 1 masked by SeaBIOS");
}

#[test]
fn icw1_clears_imr_priority_smm_and_selects_irr_but_keeps_isr() {
    // "Initialization Command Words" items a-f; ISR is not on the list and KVM keeps it (kernel
    // mode on this host: an in-service IR4 still reads in ISR after ICW1-ICW4).
    let mut pic = linux_pic();
    pic.port_write(MASTER_DATA_PORT, 0x55);
    pulse(&mut pic, 4);
    pic.port_write(MASTER_DATA_PORT, 0x00);
    pic.acknowledge();
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | 3); // set priority
    pic.port_write(MASTER_COMMAND_PORT, OCW3_SET_SMM);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_READ_ISR);
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    let m = pic.master();
    assert_eq!(m.imr(), 0);
    assert_eq!(m.isr(), 0x10, "ISR kept");
    assert_eq!(m.lowest_priority(), 7, "IR7 assigned priority 7");
    assert!(!m.special_mask_mode());
    assert_eq!(m.read_select(), ReadSelect::Irr);
    assert_eq!(m.init_state(), InitState::AwaitIcw2);
}

#[test]
fn icw1_resets_edge_sense_latches_dropped_level_requests_kept() {
    // "Initialization Command Words" a: after ICW1 an IR input must make a low-to-high
    // transition to generate an interrupt; latched edges are dropped (as in KVM). A level
    // request survives ICW1 (KVM keeps IRR & ELCR).
    let mut pic = linux_pic();
    pic.set_irq(3, true);
    init_pair(&mut pic, LINUX_MASTER_BASE, LINUX_SLAVE_BASE, ICW4_UPM);
    assert_eq!(pic.master().irr() & 0x08, 0, "latched edge dropped by ICW1");
    pic.set_irq(3, false);
    pic.set_irq(3, true);
    assert_eq!(pic.pending_vector(), Some(master_vector(3)));
    let mut pic = linux_pic();
    pic.port_write(ELCR_MASTER_PORT, 1 << 5);
    pic.set_irq(5, true);
    init_pair(&mut pic, LINUX_MASTER_BASE, LINUX_SLAVE_BASE, ICW4_UPM);
    assert_eq!(pic.master().irr(), 0x20);
}
#[test]
fn icw1_ic4_clear_skips_icw4_and_zeroes_its_functions() {
    let mut pic = linux_pic();
    init_chip(
        &mut pic,
        MASTER_COMMAND_PORT,
        0x20,
        0x04,
        ICW4_UPM | ICW4_AEOI,
    );
    assert!(pic.master().auto_eoi());
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1);
    pic.port_write(MASTER_DATA_PORT, 0x40);
    pic.port_write(MASTER_DATA_PORT, 0x04);
    assert_eq!(pic.master().init_state(), InitState::Ready);
    assert!(!pic.master().auto_eoi(), "ICW1 IC4=0: ICW4 functions zero");
    pic.port_write(MASTER_DATA_PORT, 0xFE); // now OCW1
    assert_eq!(pic.port_read(MASTER_DATA_PORT), 0xFE);
    pulse(&mut pic, 0);
    assert_eq!(pic.acknowledge(), 0x40);
}

#[test]
fn icw1_single_mode_is_ignored_icw3_still_expected_as_kvm() {
    // The datasheet skips ICW3 in single mode; KVM ignores SNGL (kernel mode on this host: after
    // ICW1 0x13, ICW2 0x40, 0x01, 0x5A the IMR reads 0: the third byte was ICW4).
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_SNGL | ICW1_IC4);
    pic.port_write(MASTER_DATA_PORT, 0x20);
    assert_eq!(pic.master().init_state(), InitState::AwaitIcw3);
    pic.port_write(MASTER_DATA_PORT, ICW4_UPM);
    assert_eq!(pic.master().init_state(), InitState::AwaitIcw4);
    pic.port_write(MASTER_DATA_PORT, 0x5A);
    assert_eq!(pic.master().init_state(), InitState::Ready);
    assert_eq!(pic.port_read(MASTER_DATA_PORT), 0);
    // The slave still answers for IR2.
    pulse(&mut pic, 9);
    assert_eq!(pic.acknowledge(), slave_vector(1));
}

#[test]
fn icw3_is_recorded_only_the_slave_always_answers_for_ir2() {
    // KVM's PIC ignores ICW3: the board wires the slave to IR2.
    let mut pic = linux_pic();
    init_chip(&mut pic, MASTER_COMMAND_PORT, 0x20, 0x00, ICW4_UPM);
    assert_eq!(pic.master().icw3(), 0);
    pulse(&mut pic, 12);
    assert_eq!(pic.acknowledge(), slave_vector(4));
}

#[test]
fn icw2_low_bits_are_dropped_in_8086_mode() {
    let mut pic = DualPic::new();
    init_pair(&mut pic, 0x27, 0x7F, ICW4_UPM);
    assert_eq!(pic.master().vector_base(), 0x20);
    assert_eq!(pic.slave().vector_base(), 0x78);
}

#[test]
fn incomplete_init_sequence_still_requests_and_eats_data_writes() {
    // KVM keeps resolving in mid-sequence (kernel mode on this host: a poll between ICW1 and
    // ICW2 returns 0x83 for an IRQ 3 pulsed after ICW1); ICW1 cleared the IMR.
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    pulse(&mut pic, 1);
    assert_eq!(pic.pending_vector(), Some(master_vector(1)));
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), POLL_INTERRUPT | 1);
    // The guest's OCW1 becomes ICW2, the next ICW3, the next ICW4.
    pic.port_write(MASTER_DATA_PORT, 0x48);
    pic.port_write(MASTER_DATA_PORT, 0x04);
    assert_eq!(pic.master().init_state(), InitState::AwaitIcw4);
    pic.port_write(MASTER_DATA_PORT, ICW4_UPM);
    pulse(&mut pic, 1);
    assert_eq!(pic.acknowledge(), 0x49);
}

#[test]
fn icw1_restarts_the_sequence_from_any_position() {
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    pic.port_write(MASTER_DATA_PORT, 0x60);
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    assert_eq!(pic.master().init_state(), InitState::AwaitIcw2);
    init_chip(&mut pic, MASTER_COMMAND_PORT, 0x30, 0x04, ICW4_UPM);
    pulse(&mut pic, 5);
    assert_eq!(pic.acknowledge(), 0x35);
}

#[test]
fn power_on_and_reset_state_is_unmasked_with_base_zero_as_kvm() {
    // Kernel mode on this host: ports 0x21 and 0xA1 read 0x00 at boot.
    let mut pic = DualPic::new();
    assert_eq!(pic.port_read(MASTER_DATA_PORT), 0);
    assert_eq!(pic.port_read(SLAVE_DATA_PORT), 0);
    pic.set_irq(4, true);
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), 4, "vector base 0 until programmed");

    let mut pic = linux_pic();
    pic.port_write(ELCR_SLAVE_PORT, 0x08);
    pic.set_irq(11, true);
    pic.set_irq(5, true);
    pic.reset();
    let fresh = DualPic::new();
    for (chip, power_on) in [(pic.master(), fresh.master()), (pic.slave(), fresh.slave())] {
        let mut expected = power_on.clone();
        expected.lines = chip.lines();
        assert_eq!(chip, &expected);
    }
    assert!(pic.line(11) && pic.line(5), "reset keeps the wires");
    assert_eq!(
        pic.master().irr() | pic.slave().irr(),
        0,
        "a high line is no edge"
    );
}

// ---- OCW1 ----

#[test]
fn ocw1_masks_and_unmasks_and_reads_back_on_data_port() {
    let mut pic = linux_pic();
    pic.port_write(MASTER_DATA_PORT, 1 << 3);
    assert_eq!(pic.port_read(MASTER_DATA_PORT), 0x08);
    pulse(&mut pic, 3);
    assert!(!pic.output(), "masked");
    assert_eq!(pic.master().irr(), 0x08, "IRR latches behind the mask");
    pic.port_write(MASTER_DATA_PORT, 0);
    assert_eq!(pic.pending_vector(), Some(master_vector(3)));
    pic.port_write(MASTER_DATA_PORT, 1 << CASCADE_IR);
    pulse(&mut pic, 10);
    assert_eq!(
        pic.pending_vector(),
        Some(master_vector(3)),
        "IR2 masked on the master blocks the slave"
    );
    assert_eq!(pic.acknowledge(), master_vector(3));
    eoi_master(&mut pic);
    assert!(!pic.output());
    pic.port_write(MASTER_DATA_PORT, 0);
    assert_eq!(pic.acknowledge(), slave_vector(2));
}

// ---- Edge and Level Triggered Modes ----

#[test]
fn edge_irr_latches_on_rising_edge_and_clears_on_inta() {
    let mut pic = linux_pic();
    pic.set_irq(5, true);
    assert_eq!(pic.master().irr(), 0x20);
    pic.set_irq(5, true);
    pic.set_irq(5, false);
    assert_eq!(
        pic.master().irr(),
        0x20,
        "edge latch survives the line dropping"
    );
    assert_eq!(pic.acknowledge(), master_vector(5));
    assert_eq!(pic.master().irr(), 0);
    eoi_master(&mut pic);
    assert!(!pic.output(), "one edge, one interrupt");
}

#[test]
fn elcr_level_irr_follows_the_line() {
    let mut pic = linux_pic();
    pic.port_write(ELCR_MASTER_PORT, 1 << 5);
    pic.set_irq(5, true);
    assert_eq!(pic.master().irr(), 0x20);
    pic.set_irq(5, false);
    assert_eq!(pic.master().irr(), 0, "level IRR drops with the line");
    assert!(!pic.output());
    pic.set_irq(5, true);
    assert_eq!(pic.acknowledge(), master_vector(5));
    assert_eq!(pic.master().irr(), 0x20, "still high after INTA");
    assert!(!pic.output(), "in service blocks it");
    eoi_master(&mut pic);
    assert_eq!(
        pic.pending_vector(),
        Some(master_vector(5)),
        "re-presented after EOI"
    );
    pic.set_irq(5, false);
    assert!(!pic.output());
}

#[test]
fn elcr_fixed_bits_for_irq_0_1_2_8_13_read_zero() {
    let mut pic = linux_pic();
    pic.port_write(ELCR_MASTER_PORT, 0xFF);
    pic.port_write(ELCR_SLAVE_PORT, 0xFF);
    assert_eq!(pic.port_read(ELCR_MASTER_PORT), ELCR_MASTER_WRITABLE);
    assert_eq!(pic.port_read(ELCR_SLAVE_PORT), ELCR_SLAVE_WRITABLE);
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    assert_eq!(pic.port_read(ELCR_MASTER_PORT), 0xF8, "ICW1 keeps the ELCR");
}

#[test]
fn icw1_ltim_is_recorded_only_edge_level_comes_from_elcr() {
    // KVM ignores LTIM (kernel mode on this host: an IRQ 7 pulse after ICW1 0x19 stays latched).
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1 | ICW1_IC4 | ICW1_LTIM);
    pic.port_write(MASTER_DATA_PORT, LINUX_MASTER_BASE);
    pic.port_write(MASTER_DATA_PORT, 1 << CASCADE_IR);
    pic.port_write(MASTER_DATA_PORT, ICW4_UPM);
    assert_eq!(pic.master().level_mask(), 0);
    pulse(&mut pic, 7);
    assert_eq!(pic.master().irr(), 0x80, "edge latch");
    assert_eq!(pic.acknowledge(), master_vector(7));
}

#[test]
fn elcr_write_does_not_resample_irr() {
    // KVM does not resample IRR on an ELCR write (kernel mode on this host: an IRQ 5 edge
    // latched while edge still reads in IRR after the switch to level with the line low).
    let mut pic = linux_pic();
    pulse(&mut pic, 6);
    pic.port_write(ELCR_MASTER_PORT, 1 << 6);
    assert_eq!(pic.master().irr(), 0x40, "latched edge kept");
    assert_eq!(pic.acknowledge(), master_vector(6));
    assert_eq!(pic.master().irr(), 0x40, "a level bit stays through INTA");
    pic.set_irq(6, false);
    assert_eq!(
        pic.master().irr(),
        0,
        "driving the level line low clears it"
    );
}

// ---- Interrupt Sequence, fully nested mode, End of Interrupt ----

#[test]
fn inta_moves_irr_to_isr_and_fully_nested_blocks_lower_levels() {
    let mut pic = linux_pic();
    pulse(&mut pic, 4);
    assert_eq!(pic.acknowledge(), master_vector(4));
    assert_eq!((pic.master().irr(), pic.master().isr()), (0x00, 0x10));
    pulse(&mut pic, 6);
    assert!(!pic.output(), "IR6 below in-service IR4");
    pulse(&mut pic, 4);
    assert!(!pic.output(), "equal priority is blocked too");
    pulse(&mut pic, 1);
    assert_eq!(pic.acknowledge(), master_vector(1), "higher level nests");
    assert_eq!(pic.master().isr(), 0x12);
    eoi_master(&mut pic); // clears IR1, the highest
    assert_eq!(pic.master().isr(), 0x10);
    assert!(!pic.output());
    eoi_master(&mut pic);
    assert_eq!(pic.acknowledge(), master_vector(4));
    eoi_master(&mut pic);
    assert_eq!(pic.acknowledge(), master_vector(6));
}

#[test]
fn ocw2_specific_eoi_clears_the_named_level_only() {
    let mut pic = linux_pic();
    pulse(&mut pic, 5);
    pic.acknowledge();
    pulse(&mut pic, 3);
    pic.acknowledge();
    assert_eq!(pic.master().isr(), 0x28);
    pic.port_write(MASTER_COMMAND_PORT, OCW2_SL | OCW2_EOI | 5);
    assert_eq!(pic.master().isr(), 0x08);
    pic.port_write(MASTER_COMMAND_PORT, OCW2_SL | OCW2_EOI | 6);
    assert_eq!(pic.master().isr(), 0x08, "EOI of a level not in service");
    pic.port_write(MASTER_COMMAND_PORT, OCW2_SL); // no operation
    assert_eq!(pic.master().isr(), 0x08);
    assert_eq!(pic.master().lowest_priority(), 7);
}

#[test]
fn ocw2_nonspecific_eoi_with_nothing_in_service_is_harmless() {
    let mut pic = linux_pic();
    eoi_master(&mut pic);
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_EOI);
    assert_eq!(pic.master().isr(), 0);
    assert_eq!(pic.master().lowest_priority(), 7, "no level, no rotation");
}

// ---- Automatic Rotation, Specific Rotation ----

#[test]
fn ocw2_rotate_on_nonspecific_eoi_makes_the_served_level_lowest() {
    let mut pic = linux_pic();
    pic.port_write(SLAVE_DATA_PORT, 0xFF); // keep the master's IR2 quiet
    for irq in [0, 3, 6] {
        pulse(&mut pic, irq);
    }
    assert_eq!(pic.acknowledge(), master_vector(0));
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_EOI);
    assert_eq!(pic.master().lowest_priority(), 0);
    pulse(&mut pic, 0);
    // Priority now 1,2,...,7,0: IR3 then IR6 then IR0.
    let mut order = Vec::new();
    for _ in 0..3 {
        order.push(pic.acknowledge());
        pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_EOI);
    }
    assert_eq!(order, [3, 6, 0].map(master_vector));
    assert_eq!(pic.master().lowest_priority(), 0);
}

#[test]
fn ocw2_set_priority_and_rotate_on_specific_eoi() {
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | 4); // IR4 lowest, IR5 highest
    for irq in [1, 4, 5, 7] {
        pulse(&mut pic, irq);
    }
    assert_eq!(pic.acknowledge(), master_vector(5));
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | OCW2_EOI | 5);
    assert_eq!(pic.master().lowest_priority(), 5);
    assert_eq!(pic.master().isr(), 0);
    // Priority 6,7,0,1,...: IR7, then IR1, then IR4.
    let order: Vec<_> = (0..3)
        .map(|_| {
            let v = pic.acknowledge();
            eoi_master(&mut pic);
            v
        })
        .collect();
    assert_eq!(order, [7, 1, 4].map(master_vector));
}

#[test]
fn rotation_priority_decides_nesting_too() {
    let mut pic = linux_pic();
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | 2); // IR3 highest, IR2 lowest
    pulse(&mut pic, 0);
    assert_eq!(pic.acknowledge(), master_vector(0));
    pulse(&mut pic, 6);
    assert_eq!(pic.acknowledge(), master_vector(6), "IR6 above IR0 now");
    pulse(&mut pic, 1);
    assert!(!pic.output(), "IR1 below both");
}

// ---- Automatic EOI ----

#[test]
fn icw4_auto_eoi_leaves_isr_clear() {
    let mut pic = DualPic::new();
    init_pair(&mut pic, 0x20, 0x28, ICW4_UPM | ICW4_AEOI);
    pic.port_write(MASTER_DATA_PORT, 0);
    pic.port_write(SLAVE_DATA_PORT, 0);
    pulse(&mut pic, 5);
    assert_eq!(pic.acknowledge(), master_vector(5));
    assert_eq!(pic.master().isr(), 0);
    pulse(&mut pic, 6);
    assert_eq!(
        pic.acknowledge(),
        master_vector(6),
        "nothing in service blocks"
    );
    pulse(&mut pic, 13);
    assert_eq!(pic.acknowledge(), slave_vector(5));
    assert_eq!(pic.master().isr() | pic.slave().isr(), 0);
    assert_eq!(
        pic.master().lowest_priority(),
        7,
        "no rotation unless asked"
    );
}

#[test]
fn ocw2_rotate_in_auto_eoi_mode_set_and_clear() {
    let mut pic = DualPic::new();
    init_pair(&mut pic, 0x20, 0x28, ICW4_UPM | ICW4_AEOI);
    pic.port_write(MASTER_DATA_PORT, 0);
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R); // rotate in AEOI: set
    pulse(&mut pic, 3);
    pic.acknowledge();
    assert_eq!(pic.master().lowest_priority(), 3);
    pulse(&mut pic, 3);
    pulse(&mut pic, 4);
    assert_eq!(pic.acknowledge(), master_vector(4), "IR3 is lowest now");
    assert_eq!(pic.master().lowest_priority(), 4);
    pic.port_write(MASTER_COMMAND_PORT, 0); // rotate in AEOI: clear
    assert_eq!(pic.acknowledge(), master_vector(3));
    assert_eq!(pic.master().lowest_priority(), 4);
}

#[test]
fn auto_eoi_slave_with_two_requests_raises_ir2_again() {
    // "Cascade Mode": a request still pending on the slave after its INTA is a new IR2 edge.
    let mut pic = DualPic::new();
    init_chip(
        &mut pic,
        MASTER_COMMAND_PORT,
        0x20,
        0x04,
        ICW4_UPM | ICW4_AEOI,
    );
    init_chip(
        &mut pic,
        SLAVE_COMMAND_PORT,
        0x28,
        0x02,
        ICW4_UPM | ICW4_AEOI,
    );
    pulse(&mut pic, 9);
    pulse(&mut pic, 11);
    assert_eq!(pic.acknowledge(), slave_vector(1));
    assert_eq!(pic.acknowledge(), slave_vector(3));
    assert!(!pic.output());
}

// ---- Special Mask Mode ----

#[test]
fn ocw3_special_mask_mode_is_recorded_but_has_no_effect_as_kvm() {
    // "Special Mask Mode" would let IR5 through a masked, in-service IR3 and make the
    // non-specific EOI skip IR3; KVM applies neither (kernel mode on this host: IR4 stays
    // blocked, the EOI clears IR3).
    let mut pic = linux_pic();
    pulse(&mut pic, 3);
    assert_eq!(pic.acknowledge(), master_vector(3));
    pulse(&mut pic, 5);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_SET_SMM);
    assert!(pic.master().special_mask_mode());
    pic.port_write(MASTER_DATA_PORT, 1 << 3);
    assert!(!pic.output(), "masked IR3 in service still blocks");
    eoi_master(&mut pic);
    assert_eq!(pic.master().isr(), 0, "the EOI clears the masked IR3");
    assert_eq!(pic.acknowledge(), master_vector(5));
    pic.port_write(MASTER_COMMAND_PORT, OCW3_CLEAR_SMM);
    assert!(!pic.master().special_mask_mode());
    // OCW3 without ESMM leaves the mode alone.
    pic.port_write(MASTER_COMMAND_PORT, CMD_OCW3 | OCW3_SMM);
    assert!(!pic.master().special_mask_mode());
}

// ---- Special Fully Nested Mode ----

#[test]
fn icw4_sfnm_lets_a_higher_slave_request_nest() {
    let mut pic = DualPic::new();
    init_chip(
        &mut pic,
        MASTER_COMMAND_PORT,
        0x20,
        0x04,
        ICW4_UPM | ICW4_SFNM,
    );
    init_chip(&mut pic, SLAVE_COMMAND_PORT, 0x28, 0x02, ICW4_UPM);
    pulse(&mut pic, 12);
    assert_eq!(pic.acknowledge(), slave_vector(4));
    pulse(&mut pic, 9);
    assert_eq!(
        pic.acknowledge(),
        slave_vector(1),
        "nests through IR2 in service"
    );
    pulse(&mut pic, 14);
    assert!(!pic.output(), "lower slave request waits");

    let mut plain = linux_pic();
    pulse(&mut plain, 12);
    plain.acknowledge();
    pulse(&mut plain, 9);
    assert!(!plain.output(), "without SFNM the master's ISR2 blocks it");
}

// ---- Poll Command ----

#[test]
fn ocw3_poll_reads_level_and_takes_the_request_without_isr() {
    // "Poll Command" as KVM does it (kernel mode on this host: poll words 0x83 then 0x84 with
    // ISR 0 in between, and 0x07 with nothing pending).
    let mut pic = linux_pic();
    pulse(&mut pic, 6);
    pulse(&mut pic, 4);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), POLL_INTERRUPT | 4);
    assert_eq!(pic.master().isr(), 0, "nothing in service");
    assert_eq!(pic.master().irr(), 0x40);
    assert_eq!(
        pic.port_read(MASTER_COMMAND_PORT),
        0x40,
        "one read only, then IRR"
    );
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(
        pic.port_read(MASTER_DATA_PORT),
        POLL_INTERRUPT | 6,
        "data port too, no EOI needed"
    );
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(
        pic.port_read(MASTER_COMMAND_PORT),
        0x07,
        "no request: IR7, I clear"
    );
    assert_eq!(pic.master().isr(), 0);
    // A level request is taken too, until its line is driven high again.
    pic.port_write(ELCR_MASTER_PORT, 1 << 5);
    pic.set_irq(5, true);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), POLL_INTERRUPT | 5);
    assert!(!pic.output());
    pic.set_irq(5, true);
    assert_eq!(pic.pending_vector(), Some(master_vector(5)));
}

#[test]
fn ocw3_poll_on_master_and_slave_for_a_cascaded_request() {
    // Kernel mode on this host: the master's poll answers 0x82 and leaves the slave's request;
    // the slave's poll answers 0x82 and takes the master's IR2 request with it.
    let mut pic = linux_pic();
    pulse(&mut pic, 10);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), POLL_INTERRUPT | 2);
    assert_eq!((pic.master().isr(), pic.slave().isr()), (0, 0));
    assert_eq!(pic.slave().irr(), 0x04, "a poll is not a cascade INTA");
    pic.port_write(SLAVE_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(SLAVE_DATA_PORT), POLL_INTERRUPT | 2);
    assert_eq!((pic.master().irr(), pic.slave().irr()), (0, 0));
    assert_eq!((pic.master().isr(), pic.slave().isr()), (0, 0));
    assert!(!pic.output());
}

/// KVM evaluates the pair's outputs (and so pulses IR2 while the slave requests) after OCW1,
/// EOIs, priority commands, line changes, INTA and polls, but not after a poll of the master
/// that took IR2 nor after ICW1-ICW4 or OCW3. Kernel mode on this host, found by the
/// differential guest: a master poll right after the master's ICW1 with the slave requesting
/// reads 0x07, not 0x82.
#[test]
fn a_master_poll_that_takes_the_cascade_leaves_ir2_clear_until_the_next_evaluation() {
    let mut pic = linux_pic();
    pulse(&mut pic, 10);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), POLL_INTERRUPT | 2);
    assert_eq!(
        pic.master().irr() & 0x04,
        0,
        "no fresh edge after that poll"
    );
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(
        pic.port_read(MASTER_COMMAND_PORT),
        0x07,
        "nothing left to poll"
    );
    assert_eq!(
        pic.master().irr() & 0x04,
        0x04,
        "the empty poll evaluated the outputs"
    );
    assert_eq!(pic.slave().irr(), 0x04);

    // ICW1 of the master drops the edge; no evaluation until OCW1 ends the sequence.
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1);
    assert_eq!(pic.master().irr() & 0x04, 0);
    pic.port_write(MASTER_COMMAND_PORT, OCW3_POLL_CMD);
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), 0x07);
    pic.port_write(MASTER_DATA_PORT, LINUX_MASTER_BASE);
    pic.port_write(MASTER_DATA_PORT, 1 << CASCADE_IR);
    assert_eq!(
        pic.master().irr() & 0x04,
        0x04,
        "the poll after ICW1 evaluated"
    );
    pic.port_write(MASTER_COMMAND_PORT, CMD_ICW1);
    pic.port_write(MASTER_DATA_PORT, LINUX_MASTER_BASE);
    pic.port_write(MASTER_DATA_PORT, 1 << CASCADE_IR);
    assert_eq!(
        pic.master().irr() & 0x04,
        0,
        "ICW2 and ICW3 do not evaluate"
    );
    pic.port_write(MASTER_DATA_PORT, 0x00);
    assert_eq!(pic.master().irr() & 0x04, 0x04, "OCW1 does");
}

// ---- Reading the 8259A Status ----

#[test]
fn ocw3_read_irr_and_isr_select_persists() {
    let mut pic = linux_pic();
    pulse(&mut pic, 1);
    pulse(&mut pic, 7);
    pic.acknowledge();
    assert_eq!(read_irr(&mut pic, MASTER_COMMAND_PORT), 0x80);
    assert_eq!(read_isr(&mut pic, MASTER_COMMAND_PORT), 0x02);
    pic.port_write(MASTER_COMMAND_PORT, CMD_OCW3 | OCW3_RIS); // RR clear: no change
    assert_eq!(pic.port_read(MASTER_COMMAND_PORT), 0x02);
    assert_eq!(
        pic.port_read(MASTER_COMMAND_PORT),
        0x02,
        "selection persists"
    );
    assert_eq!(pic.port_read(MASTER_DATA_PORT), 0x00, "data port reads IMR");
}

// ---- Cascade Mode ----

#[test]
fn cascaded_slave_interrupt_goes_through_master_ir2_and_needs_two_eois() {
    let mut pic = linux_pic();
    pulse(&mut pic, 12);
    assert_eq!(pic.master().irr(), 0x04, "slave INT raised master IR2");
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), slave_vector(4));
    assert_eq!((pic.master().isr(), pic.slave().isr()), (0x04, 0x10));
    assert_eq!(pic.master().irr() | pic.slave().irr(), 0);
    pulse(&mut pic, 5);
    eoi_slave(&mut pic);
    assert!(!pic.output(), "master IR2 still in service blocks IR5");
    pulse(&mut pic, 1);
    assert_eq!(pic.acknowledge(), master_vector(1), "IR1 above IR2 nests");
    eoi_master(&mut pic);
    eoi_master(&mut pic);
    assert_eq!(pic.acknowledge(), master_vector(5));
}

#[test]
fn slave_eoi_with_a_second_slave_request_raises_ir2_again() {
    let mut pic = linux_pic();
    pulse(&mut pic, 9);
    pulse(&mut pic, 14);
    assert_eq!(service_all(&mut pic), [slave_vector(1), slave_vector(6)]);
    // Master EOI first, then slave: the slave's INT rises after its EOI.
    pulse(&mut pic, 9);
    pulse(&mut pic, 14);
    assert_eq!(pic.acknowledge(), slave_vector(1));
    eoi_master(&mut pic);
    assert!(!pic.output());
    eoi_slave(&mut pic);
    assert_eq!(pic.acknowledge(), slave_vector(6));
}

// ---- Spurious interrupts ("Interrupt Sequence": default IR7) ----

#[test]
fn spurious_irq7_when_the_request_vanished() {
    let mut pic = linux_pic();
    assert_eq!(pic.acknowledge(), master_vector(7), "nothing pending");
    pic.port_write(ELCR_MASTER_PORT, 1 << 4);
    pic.set_irq(4, true);
    assert!(pic.output());
    pic.set_irq(4, false);
    assert_eq!(pic.acknowledge(), master_vector(7));
    assert_eq!(pic.master().isr(), 0, "no ISR for a spurious interrupt");
    pulse(&mut pic, 6);
    pic.port_write(MASTER_DATA_PORT, 1 << 6);
    assert_eq!(pic.acknowledge(), master_vector(7), "masked before INTA");
    assert_eq!(pic.master().irr(), 0x40, "the real request stays latched");
}

#[test]
fn spurious_irq15_keeps_master_ir2_in_service() {
    let mut pic = linux_pic();
    pic.port_write(ELCR_SLAVE_PORT, 1 << 2);
    pic.set_irq(10, true);
    assert_eq!(pic.master().irr(), 0x04);
    pic.set_irq(10, false);
    assert!(pic.output(), "master IR2 is edge-latched");
    assert_eq!(pic.pending_vector(), Some(slave_vector(7)));
    assert_eq!(pic.acknowledge(), slave_vector(7));
    assert_eq!((pic.master().isr(), pic.slave().isr()), (0x04, 0x00));
    eoi_master(&mut pic); // what Linux does for a spurious IRQ 15
    assert_eq!(pic.master().isr(), 0);
    assert!(!pic.output());
}

// ---- The INT output ----

#[test]
fn output_follows_lines_masks_and_eois() {
    let mut pic = linux_pic();
    assert!(!pic.output());
    pic.port_write(ELCR_SLAVE_PORT, 1 << 3);
    pic.set_irq(11, true);
    assert!(pic.output());
    pic.port_write(SLAVE_DATA_PORT, 1 << 3);
    assert!(pic.output(), "master IR2 edge already latched");
    assert_eq!(pic.acknowledge(), slave_vector(7));
    eoi_master(&mut pic);
    assert!(!pic.output());
    pic.port_write(SLAVE_DATA_PORT, 0);
    assert!(pic.output(), "unmasked level line raises IR2 again");
    pic.port_write(MASTER_DATA_PORT, 1 << CASCADE_IR);
    assert!(!pic.output());
    pic.port_write(MASTER_DATA_PORT, 0);
    pic.set_irq(11, false);
    assert!(pic.output(), "IR2 latched its edge; INTA would be spurious");
    assert_eq!(pic.acknowledge(), slave_vector(7));
    eoi_master(&mut pic);
    assert!(!pic.output());
}

// ---- Ports and hostile input ----

#[test]
fn ports_decoded_and_others_ignored() {
    for port in [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1] {
        assert!(DualPic::handles_port(port));
    }
    for port in [0x22, 0x1F, 0xA2, 0x4D2, 0x4CF, 0x60, 0xFFFF] {
        assert!(!DualPic::handles_port(port));
    }
    let mut pic = linux_pic();
    let before = pic.clone();
    pic.port_write(0x22, 0x11);
    pic.port_write(0x4D2, 0xFF);
    assert_eq!(pic, before);
    assert_eq!(pic.port_read(0x22), UNDECODED_READ);
}

#[test]
fn irq2_and_out_of_range_lines_are_ignored() {
    let mut pic = linux_pic();
    let before = pic.clone();
    pic.set_irq(2, true);
    pic.set_irq(16, true);
    pic.set_irq(255, true);
    assert_eq!(pic, before);
    assert!(!pic.line(2) && !pic.line(16));
}

#[test]
fn snapshot_round_trips_and_is_scrubbed() {
    let mut pic = linux_pic();
    pic.port_write(ELCR_SLAVE_PORT, 0x08);
    pic.set_irq(11, true);
    pulse(&mut pic, 4);
    pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | 5);
    pic.port_write(SLAVE_COMMAND_PORT, CMD_ICW1 | ICW1_IC4);
    let json = serde_json::to_string(&pic).unwrap();
    let back: DualPic = serde_json::from_str(&json).unwrap();
    assert_eq!(back, pic);

    let mut value = serde_json::to_value(&pic).unwrap();
    value["master"]["elcr"] = serde_json::json!(0xFF);
    value["master"]["vector_base"] = serde_json::json!(0x27);
    value["master"]["lowest_priority"] = serde_json::json!(0xFF);
    value["slave"]["role"] = serde_json::json!("Master");
    let back: DualPic = serde_json::from_value(value).unwrap();
    assert_eq!(back.master().elcr(), ELCR_MASTER_WRITABLE);
    assert_eq!(back.master().vector_base(), 0x20);
    assert_eq!(back.master().lowest_priority(), 7);
    assert_eq!(back.slave().role(), Role::Slave);
}

// ---- Properties ----

/// Lines a test may drive: all but the cascade input.
fn isa_line() -> impl Strategy<Value = u8> {
    (0u8..15).prop_map(|i| if i >= CASCADE_IR { i + 1 } else { i })
}

/// The order in which pending lines are served under the given rotations, slave lines
/// taking the master's IR2 slot.
fn priority_order(master_lowest: u8, slave_lowest: u8) -> Vec<u8> {
    let mut order = Vec::new();
    for k in 1..=8u8 {
        let ir = master_lowest.wrapping_add(k) & 7;
        if ir == CASCADE_IR {
            order.extend((1..=8u8).map(|j| 8 + (slave_lowest.wrapping_add(j) & 7)));
        } else {
            order.push(ir);
        }
    }
    order
}

#[derive(Clone, Debug)]
enum Traffic {
    Write(u16, u8),
    Read(u16),
    Irq(u8, bool),
    Ack,
    Snapshot,
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        8 => prop::sample::select(vec![0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
        1 => any::<u16>(),
    ]
}

fn traffic() -> impl Strategy<Value = Traffic> {
    prop_oneof![
        4 => (port(), any::<u8>()).prop_map(|(p, v)| Traffic::Write(p, v)),
        2 => port().prop_map(Traffic::Read),
        4 => (0u8..20, any::<bool>()).prop_map(|(i, l)| Traffic::Irq(i, l)),
        2 => Just(Traffic::Ack),
        1 => Just(Traffic::Snapshot),
    ]
}

/// Structured guest traffic on an initialized pair: masks, EOIs and rotations, OCW3, ELCR,
/// lines and INTAs, but no ICW1 (the vector bases stay known).
#[derive(Clone, Debug)]
enum GuestOp {
    Mask(bool, u8),
    Ocw2(bool, u8),
    Ocw3(bool, u8),
    Elcr(bool, u8),
    Irq(u8, bool),
    Ack,
    Read(u16),
}

fn guest_op() -> impl Strategy<Value = GuestOp> {
    prop_oneof![
        2 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| GuestOp::Mask(s, v)),
        2 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| GuestOp::Ocw2(s, v & !(CMD_ICW1 | CMD_OCW3))),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| GuestOp::Ocw3(s, (v | CMD_OCW3) & 0x6F)),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(s, v)| GuestOp::Elcr(s, v)),
        5 => (0u8..16, any::<bool>()).prop_map(|(i, l)| GuestOp::Irq(i, l)),
        3 => Just(GuestOp::Ack),
        1 => prop::sample::select(vec![0x20u16, 0x21, 0xA0, 0xA1]).prop_map(GuestOp::Read),
    ]
}

/// Internal invariants that must hold after every operation.
fn check_invariants(pic: &DualPic) -> Result<(), TestCaseError> {
    prop_assert_eq!(pic.output(), pic.pending_vector().is_some());
    for chip in [pic.master(), pic.slave()] {
        prop_assert!(chip.lowest_priority() < 8);
    }
    // (A requesting slave need not have a request on the master's IR2: a poll of the master
    // that took IR2 leaves it clear until the next evaluation of the outputs, as in KVM;
    // `a_master_poll_that_takes_the_cascade_leaves_ir2_clear_until_the_next_evaluation`.)
    Ok(())
}

proptest! {
    /// "Edge and Level Triggered Modes", "Interrupt Sequence", "End of Interrupt", "Automatic
    /// Rotation": (a) every rising edge on an unmasked edge line is acknowledged exactly once
    /// when the guest acknowledges and EOIs each interrupt in turn, in the priority order the
    /// rotation gives. Each batch raises distinct lines (the 8259A has one latch per level:
    /// two edges before INTA are one request); some stay high while the guest runs.
    #[test]
    fn prop_every_edge_is_acknowledged_exactly_once(
        batches in prop::collection::vec(
            (prop::collection::btree_set(isa_line(), 1..8), any::<u16>(), 0u8..8, 0u8..8),
            1..12,
        ),
    ) {
        let mut pic = linux_pic();
        for (lines, hold, master_lowest, slave_lowest) in batches {
            pic.port_write(MASTER_COMMAND_PORT, OCW2_R | OCW2_SL | master_lowest);
            pic.port_write(SLAVE_COMMAND_PORT, OCW2_R | OCW2_SL | slave_lowest);
            for &irq in &lines {
                pic.set_irq(irq, true);
                if hold & (1 << irq) == 0 {
                    pic.set_irq(irq, false);
                }
            }
            let taken = service_all(&mut pic);
            let expected: Vec<Vector> = priority_order(master_lowest, slave_lowest)
                .into_iter()
                .filter(|irq| lines.contains(irq))
                .map(irq_vector)
                .collect();
            prop_assert_eq!(taken, expected);
            for &irq in &lines {
                pic.set_irq(irq, false);
            }
            prop_assert!(service_all(&mut pic).is_empty(), "falling edges request nothing");
            prop_assert_eq!(pic.master().isr() | pic.slave().isr(), 0);
        }
    }

    /// "Edge and Level Triggered Modes": (b) a level line held high is presented again after
    /// its EOI, never before (level from the ELCR; LTIM is ignored, as in KVM).
    #[test]
    fn prop_level_line_is_presented_again_after_eoi_not_before(
        irq in prop::sample::select(vec![3u8, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15]),
        rounds in 1usize..6,
        noise in prop::collection::vec(0u8..4, 0..6),
    ) {
        let mut pic = linux_pic();
        let on_slave = irq >= 8;
        let (command, ir) = if on_slave { (SLAVE_COMMAND_PORT, irq - 8) } else { (MASTER_COMMAND_PORT, irq) };
        pic.port_write(if on_slave { ELCR_SLAVE_PORT } else { ELCR_MASTER_PORT }, 1 << ir);
        pic.set_irq(irq, true);
        for _ in 0..rounds {
            prop_assert_eq!(pic.pending_vector(), Some(irq_vector(irq)));
            prop_assert_eq!(pic.acknowledge(), irq_vector(irq));
            for &n in &noise {
                match n {
                    0 => pic.set_irq(irq, true),
                    1 => { pic.port_read(command); }
                    2 => { pic.port_read(command + 1); }
                    _ => pic.port_write(command, OCW3_READ_ISR),
                }
                prop_assert!(!pic.output(), "presented again before EOI");
            }
            if on_slave {
                eoi_slave(&mut pic);
                prop_assert!(!pic.output(), "master IR2 still in service");
            }
            eoi_master(&mut pic);
        }
        prop_assert_eq!(pic.pending_vector(), Some(irq_vector(irq)));
        pic.set_irq(irq, false);
        // The request goes with the line; on the slave, the master's edge-triggered IR2 has
        // latched it and INTA would be the spurious IRQ 15.
        let left = if on_slave { Some(slave_vector(SPURIOUS_IR)) } else { None };
        prop_assert_eq!(pic.pending_vector(), left);
    }

    /// Hostile guest: (c) any port traffic, lines and INTAs never panic, output() always equals
    /// pending_vector().is_some(), acknowledge() returns what pending_vector() announced (or
    /// the master's IR7 vector), and snapshots round-trip.
    #[test]
    fn prop_random_traffic_never_panics_and_output_matches_pending(
        ops in prop::collection::vec(traffic(), 1..200),
    ) {
        let mut pic = DualPic::new();
        for op in ops {
            match op {
                Traffic::Write(port, value) => pic.port_write(port, value),
                Traffic::Read(port) => { pic.port_read(port); }
                Traffic::Irq(irq, level) => pic.set_irq(irq, level),
                Traffic::Ack => {
                    let expected = pic.pending_vector().unwrap_or(pic.master().spurious_vector());
                    prop_assert_eq!(pic.acknowledge(), expected);
                }
                Traffic::Snapshot => {
                    let json = serde_json::to_string(&pic).unwrap();
                    let back: DualPic = serde_json::from_str(&json).unwrap();
                    prop_assert_eq!(&back, &pic);
                }
            }
            check_invariants(&pic)?;
        }
    }

    /// "Operation Command Words" OCW1: (d) acknowledge() never returns the vector of a masked
    /// line; the only vectors that may belong to a masked line are the spurious IR7 of the
    /// master (nothing pending) and IR7 of the slave (cascade with nothing on the slave).
    #[test]
    fn prop_acknowledge_never_returns_a_masked_line(
        icw4 in prop::sample::select(vec![ICW4_UPM, ICW4_UPM | ICW4_AEOI, ICW4_UPM | ICW4_SFNM]),
        ops in prop::collection::vec(guest_op(), 1..200),
    ) {
        let mut pic = DualPic::new();
        init_pair(&mut pic, LINUX_MASTER_BASE, LINUX_SLAVE_BASE, icw4);
        for op in ops {
            match op {
                GuestOp::Mask(slave, v) => pic.port_write(if slave { SLAVE_DATA_PORT } else { MASTER_DATA_PORT }, v),
                GuestOp::Ocw2(slave, v) | GuestOp::Ocw3(slave, v) => {
                    pic.port_write(if slave { SLAVE_COMMAND_PORT } else { MASTER_COMMAND_PORT }, v)
                }
                GuestOp::Elcr(slave, v) => pic.port_write(if slave { ELCR_SLAVE_PORT } else { ELCR_MASTER_PORT }, v),
                GuestOp::Irq(irq, level) => pic.set_irq(irq, level),
                GuestOp::Read(port) => { pic.port_read(port); }
                GuestOp::Ack => {
                    let (master_imr, slave_imr) = (pic.master().imr(), pic.slave().imr());
                    let master_request = pic.master().resolve();
                    let slave_request = pic.slave().resolve();
                    let vector = pic.acknowledge();
                    if (LINUX_MASTER_BASE..LINUX_MASTER_BASE + 8).contains(&vector) {
                        let ir = vector - LINUX_MASTER_BASE;
                        let spurious = master_request.is_none() && ir == SPURIOUS_IR;
                        prop_assert!(spurious || master_imr & (1 << ir) == 0, "master IR{} masked", ir);
                        prop_assert!(ir != CASCADE_IR, "the cascade input never gives the master vector");
                    } else {
                        prop_assert!((LINUX_SLAVE_BASE..LINUX_SLAVE_BASE + 8).contains(&vector));
                        let ir = vector - LINUX_SLAVE_BASE;
                        prop_assert_eq!(master_imr & (1 << CASCADE_IR), 0, "master IR2 masked");
                        let spurious = slave_request.is_none() && ir == SPURIOUS_IR;
                        prop_assert!(spurious || slave_imr & (1 << ir) == 0, "slave IR{} masked", ir);
                    }
                }
            }
            check_invariants(&pic)?;
        }
    }
}

/// The observer's view: INTA's vector names its ISA IRQ under the current bases (the slave's
/// IR n is IRQ 8+n; the master's cascade input is no IRQ), and the IRQs in service leave out
/// the master's cascade bit, so an OCW2 EOI to both chips ends IRQ 10 alone.
#[test]
fn irq_of_vector_and_in_service_irqs_name_isa_irqs() {
    let mut pic = linux_pic();
    assert_eq!(pic.irq_of_vector(master_vector(4)), Some(4));
    assert_eq!(pic.irq_of_vector(slave_vector(2)), Some(10));
    assert_eq!(pic.irq_of_vector(master_vector(CASCADE_IR)), None);
    assert_eq!(pic.irq_of_vector(0x80), None);
    pulse(&mut pic, 4);
    assert_eq!(pic.acknowledge(), master_vector(4));
    pulse(&mut pic, 10);
    assert_eq!(
        pic.acknowledge(),
        slave_vector(2),
        "IR2 outranks IR4 in service"
    );
    assert_eq!(pic.in_service_irqs(), 1 << 10 | 1 << 4);
    pic.port_write(SLAVE_COMMAND_PORT, OCW2_NONSPECIFIC_EOI);
    assert_eq!(pic.in_service_irqs(), 1 << 4, "the master's IR2 is no IRQ");
    pic.port_write(MASTER_COMMAND_PORT, OCW2_NONSPECIFIC_EOI);
    assert_eq!(
        pic.in_service_irqs(),
        1 << 4,
        "the master ended its cascade input first"
    );
    pic.port_write(MASTER_COMMAND_PORT, OCW2_NONSPECIFIC_EOI);
    assert_eq!(pic.in_service_irqs(), 0);
}
