//! One 8259A's registers and mode latches as plain data, for converting to and from other
//! implementations' state formats (KVM's `kvm_pic_state` in irqvm).

use super::chip::{InitState, Pic8259, ReadSelect, Role};
use super::DualPic;

/// Every register and latch of one 8259A (see [`Pic8259`] for their meaning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PicRegisters {
    /// Input pin levels.
    pub lines: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// Edge/level control register.
    pub elcr: u8,
    /// Initialization sequencer.
    pub init: InitState,
    /// ICW1 LTIM: every input level-triggered.
    pub ltim: bool,
    /// ICW1 SNGL: single mode.
    pub single: bool,
    /// ICW1 IC4: ICW4 follows.
    pub icw4_needed: bool,
    /// ICW2 vector base (bits 7:3).
    pub vector_base: u8,
    /// ICW3 as written.
    pub icw3: u8,
    /// ICW4 µPM (8086 mode).
    pub mode_8086: bool,
    /// ICW4 AEOI.
    pub auto_eoi: bool,
    /// ICW4 BUF.
    pub buffered: bool,
    /// ICW4 M/S.
    pub buffered_master: bool,
    /// ICW4 SFNM.
    pub special_fully_nested: bool,
    /// OCW2 rotate-in-automatic-EOI latch.
    pub rotate_on_auto_eoi: bool,
    /// The lowest-priority IR level (0-7).
    pub lowest_priority: u8,
    /// OCW3 special mask mode.
    pub special_mask: bool,
    /// OCW3 read register select.
    pub read_select: ReadSelect,
    /// OCW3 poll command pending.
    pub poll: bool,
}

impl Pic8259 {
    /// Every register and latch of this chip.
    pub fn registers(&self) -> PicRegisters {
        PicRegisters {
            lines: self.lines,
            irr: self.irr,
            isr: self.isr,
            imr: self.imr,
            elcr: self.elcr,
            init: self.init,
            ltim: self.ltim,
            single: self.single,
            icw4_needed: self.icw4_needed,
            vector_base: self.vector_base,
            icw3: self.icw3,
            mode_8086: self.mode_8086,
            auto_eoi: self.auto_eoi,
            buffered: self.buffered,
            buffered_master: self.buffered_master,
            special_fully_nested: self.special_fully_nested,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            lowest_priority: self.lowest_priority,
            special_mask: self.special_mask,
            read_select: self.read_select,
            poll: self.poll,
        }
    }

    fn from_registers(role: Role, regs: &PicRegisters) -> Self {
        let mut chip = Self {
            role,
            lines: regs.lines,
            irr: regs.irr,
            isr: regs.isr,
            imr: regs.imr,
            elcr: regs.elcr,
            init: regs.init,
            ltim: regs.ltim,
            single: regs.single,
            icw4_needed: regs.icw4_needed,
            vector_base: regs.vector_base,
            icw3: regs.icw3,
            mode_8086: regs.mode_8086,
            auto_eoi: regs.auto_eoi,
            buffered: regs.buffered,
            buffered_master: regs.buffered_master,
            special_fully_nested: regs.special_fully_nested,
            rotate_on_auto_eoi: regs.rotate_on_auto_eoi,
            lowest_priority: regs.lowest_priority,
            special_mask: regs.special_mask,
            read_select: regs.read_select,
            poll: regs.poll,
        };
        chip.sanitize(role);
        chip
    }
}

impl DualPic {
    /// The pair built from register values, scrubbed as a deserialized snapshot is: ELCR bits
    /// the chipset fixes as edge, vector base bits 2:0 and priority bits above 2 are dropped.
    /// The master's IR2 request is taken as given (it may be clear while the slave requests,
    /// as after an ICW1 of the master; see the module documentation, "Cascade").
    pub fn from_registers(master: &PicRegisters, slave: &PicRegisters) -> Self {
        Self {
            master: Pic8259::from_registers(Role::Master, master),
            slave: Pic8259::from_registers(Role::Slave, slave),
        }
    }
}
