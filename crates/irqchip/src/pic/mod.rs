//! The dual Intel 8259A programmable interrupt controller of a PC/AT: a master at ports
//! 0x20/0x21, a slave at 0xA0/0xA1 whose INT output drives the master's IR2, and the edge/level
//! control registers (ELCR) of the PIIX/ICH chipsets at 0x4D0 (master) and 0x4D1 (slave).
//!
//! The chip-level rules (command words, priority, EOI, poll) are in the `chip` submodule
//! ([`Pic8259`]); this module wires the two chips together and gives the VMM its view: ISA lines
//! in ([`DualPic::set_irq`]), the master's INT pin out ([`DualPic::output`]), and the INTA cycle
//! ([`DualPic::acknowledge`]).
//! Datasheet references are to the Intel 8259A data sheet (order no. 231468) by section name.
//!
//! # KVM is the reference
//!
//! Where the datasheet leaves room, and where KVM's in-kernel PIC (arch/x86/kvm/i8259.c)
//! departs from it, this model does what KVM does, so a guest sees the same PIC in every irqchip
//! mode. Each departure was checked against KVM's PIC on this host (`kernel` mode) and is named
//! at its function: ICW1.SNGL, ICW1.LTIM and ICW3 are recorded but ignored (ICW3 is always
//! expected, the slave always sits on IR2, edge/level comes from the ELCR only); special mask
//! mode is recorded but changes neither priority nor the non-specific EOI; a chip between
//! ICW1 and its last ICW still requests; ICW1 keeps ISR; the poll command takes the request
//! without putting it in service and answers 0x07 when nothing is pending.
//!
//! # Lines and trigger modes ("Edge and Level Triggered Modes")
//!
//! `set_irq(irq, level)` takes the logical level of ISA line 0-15 (asserted = true; a PCI INTx
//! routed through the chipset is inverted before it reaches the PIC, so the caller passes
//! "asserted"). An input is level-sensitive when its ELCR bit is set. Edge inputs latch IRR on a
//! rising edge, and the latch survives the line dropping (devices emulated by a VMM pulse their
//! line; the datasheet asks the line to stay high until INTA, KVM latches as we do). A level
//! input's IRR bit is set and cleared as the line is driven, and INTA leaves it set, so a line
//! that drops before INTA leaves nothing and INTA yields the spurious vector. IRR sits before the
//! mask: an edge on a masked input is remembered and delivered when it is unmasked.
//!
//! ISA IRQ 2 does not exist on an AT (the master's IR2 pin is wired to the slave's INT; the ISA
//! bus's IRQ2 pin is IRQ 9), so `set_irq(2, _)` is ignored, as is any irq above 15. ELCR bits
//! for IRQ 0, 1, 2, 8 and 13 are hard-wired to 0 (edge) as on PIIX/ICH chipsets (KVM and QEMU
//! use the same masks, 0xF8 and 0xDE). ELCR is not touched by ICW1, only by [`DualPic::reset`],
//! and writing it does not resample IRR (as in KVM).
//!
//! # Cascade ("Cascade Mode")
//!
//! After an operation that leaves the slave requesting, the master's IR2 gets a fresh edge (IR2
//! is always edge-sensitive), as KVM pulses it when it evaluates the pair's outputs: after
//! OCW1, the EOI and priority commands of OCW2, line changes, INTA and polls, so the master's
//! IRR bit 2 is set again right after an acknowledge cleared it. KVM does not evaluate after
//! ICW1-ICW4, OCW3, the rotate-in-AEOI commands, an EOI with nothing in service, or a poll of
//! the master that took IR2 ([`Reevaluate`]); after those IR2 stays as it was, so a master ICW1
//! or such a poll leaves it clear while the slave still requests, until the next evaluation.
//! (The datasheet's master sees the slave's INT as a level that needs a new rising edge after
//! ICW1; KVM's pulse at each evaluation is what this model follows.) When the master
//! acknowledges IR2 the slave runs its own INTA and supplies the vector; if it has nothing to give it supplies its IR7 vector
//! without setting its ISR, while the master's IR2 stays in service ("spurious IRQ 15": the guest
//! must EOI the master only). The slave's ICW3 ID and the master's ICW3 are recorded but not
//! used: the board wiring makes the slave answer for IR2 (KVM does the same). A poll of the slave
//! that takes a request also clears the master's IR2 request and in-service bit, as in KVM.
//!
//! # Power-on, incomplete initialization, hostile guests
//!
//! The datasheet leaves the power-on state undefined. [`DualPic::new`] and [`DualPic::reset`]
//! give initialized chips with vector base 0, IMR 0 as KVM's PIC starts (nothing reaches a CPU
//! until the guest unmasks LINT0 in ExtINT mode, and a guest that does so before programming
//! the PIC takes vector 0 + IR, in every mode alike), ELCR 0, IR0 highest priority, ICW3 as a
//! PC wires it, 8086 mode, normal EOI. A chip whose ICW sequence is incomplete keeps requesting,
//! as KVM's does; data-port writes feed the sequence as on hardware, and a command-port ICW1
//! restarts it. Command-port OCW2/OCW3 writes are decoded even in mid-sequence. Every port byte
//! in any order is accepted; all arithmetic is on 3-bit level numbers and 8-bit masks, so
//! nothing can panic or loop.
//!
//! # Modes recorded but not modelled
//!
//! MCS-80/85 mode (ICW4.µPM = 0, or no ICW4): vectors are always 8086-style (base | level),
//! which is what every x86 guest programs. Buffered mode (ICW4.BUF, M/S): only changes the
//! SP/EN pin, which has no meaning here. ICW1.ADI and the call-address bits are ignored. ICW1
//! SNGL and LTIM, ICW3 and OCW3's special mask mode are recorded only (see above). Special
//! fully nested mode is modelled on the master (an in-service IR2 does not block IR2).
//!
//! # Snapshots
//!
//! [`DualPic`] serializes every register, latch, line level, the init sequencer position, the
//! rotation pointer and the modes. Deserializing scrubs values a guest could not produce (ELCR
//! fixed bits, vector base low bits, priority bits above 2). The master's IR2 request is kept as
//! saved: it may be clear while the slave requests (see "Cascade"), and KVM's PIC state carries
//! it the same way.

mod chip;
mod parts;
#[cfg(test)]
mod tests;

pub use chip::*;
pub use parts::PicRegisters;

use serde::{Deserialize, Serialize};

use crate::types::Vector;

/// The master's command port: ICW1, OCW2, OCW3; reads IRR, ISR or the poll word.
pub const MASTER_COMMAND_PORT: u16 = 0x20;
/// The master's data port: ICW2-ICW4 during initialization, then OCW1 (the IMR).
pub const MASTER_DATA_PORT: u16 = 0x21;
/// The slave's command port.
pub const SLAVE_COMMAND_PORT: u16 = 0xA0;
/// The slave's data port.
pub const SLAVE_DATA_PORT: u16 = 0xA1;
/// The master's edge/level control register (PIIX/ICH ELCR1, IRQ 0-7).
pub const ELCR_MASTER_PORT: u16 = 0x4D0;
/// The slave's edge/level control register (ELCR2, IRQ 8-15).
pub const ELCR_SLAVE_PORT: u16 = 0x4D1;

/// The master input the slave's INT is wired to.
pub const CASCADE_IR: u8 = 2;
/// ISA lines handled: 0-7 on the master, 8-15 on the slave.
pub const ISA_IRQS: u8 = 16;
const SLAVE_FIRST_IRQ: u8 = 8;

/// What a read of a port no chip decodes returns (an undriven ISA data bus).
pub const UNDECODED_READ: u8 = 0xFF;

/// The master/slave 8259A pair with its ELCRs. See the module documentation.
///
/// Programmed as Linux programs it (vectors 0x30 and 0x38, slave on IR2), an edge on IRQ 12
/// (the slave's IR4) raises the master's INT; the INTA cycle returns the slave's vector and
/// puts IR4 in service on the slave and the cascade input IR2 on the master, so the guest ends
/// it with an EOI to each chip ("Interrupt Sequence", "Cascade Mode"):
///
/// ```
/// use irqchip::pic::{DualPic, MASTER_COMMAND_PORT as M_CMD, MASTER_DATA_PORT as M_DATA};
/// use irqchip::pic::{SLAVE_COMMAND_PORT as S_CMD, SLAVE_DATA_PORT as S_DATA};
///
/// let mut pic = DualPic::new();
/// for (command, data, base, icw3) in [(M_CMD, M_DATA, 0x30, 0x04), (S_CMD, S_DATA, 0x38, 0x02)] {
///     pic.port_write(command, 0x11); // ICW1: edge, cascade, ICW4 follows
///     pic.port_write(data, base); // ICW2: vector base
///     pic.port_write(data, icw3); // ICW3: slave on IR2 / slave ID 2
///     pic.port_write(data, 0x01); // ICW4: 8086 mode, normal EOI
/// }
/// pic.port_write(M_DATA, !0x04); // OCW1: only the cascade input unmasked on the master
/// pic.port_write(S_DATA, !0x10); // and IR4 (IRQ 12) on the slave
///
/// pic.set_irq(12, true);
/// assert!(pic.output(), "INT to the CPU");
/// assert_eq!(pic.acknowledge(), 0x38 + 4);
/// assert!(!pic.output());
/// assert_eq!((pic.master().isr(), pic.slave().isr()), (0x04, 0x10));
///
/// pic.port_write(M_CMD, 0x0B); // OCW3: the next command-port read returns ISR
/// assert_eq!(pic.port_read(M_CMD), 0x04);
/// pic.port_write(S_CMD, 0x20); // OCW2: non-specific EOI, slave first
/// pic.port_write(M_CMD, 0x20);
/// assert_eq!((pic.master().isr(), pic.slave().isr()), (0, 0));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "DualPicState")]
pub struct DualPic {
    master: Pic8259,
    slave: Pic8259,
}

/// The serialized form of [`DualPic`], scrubbed before it becomes one.
#[derive(Deserialize)]
struct DualPicState {
    master: Pic8259,
    slave: Pic8259,
}

impl From<DualPicState> for DualPic {
    fn from(state: DualPicState) -> Self {
        let mut pic = Self {
            master: state.master,
            slave: state.slave,
        };
        pic.master.sanitize(Role::Master);
        pic.slave.sanitize(Role::Slave);
        pic
    }
}

impl Default for DualPic {
    fn default() -> Self {
        Self::new()
    }
}

impl DualPic {
    /// The power-on state (see the module documentation).
    pub fn new() -> Self {
        Self {
            master: Pic8259::power_on(Role::Master),
            slave: Pic8259::power_on(Role::Slave),
        }
    }

    /// A system reset: both chips and the ELCRs return to the power-on state. ISA line levels
    /// are outside the chips and are kept; a line that is high is not an edge.
    pub fn reset(&mut self) {
        let (master_lines, slave_lines) = (self.master.lines, self.slave.lines);
        *self = Self::new();
        self.master.lines = master_lines & !chip::bit(CASCADE_IR);
        self.slave.lines = slave_lines;
    }

    /// The ports this device decodes: both chips' command and data ports and the two ELCRs.
    pub fn handles_port(port: u16) -> bool {
        matches!(
            port,
            MASTER_COMMAND_PORT
                | MASTER_DATA_PORT
                | SLAVE_COMMAND_PORT
                | SLAVE_DATA_PORT
                | ELCR_MASTER_PORT
                | ELCR_SLAVE_PORT
        )
    }

    /// The master 8259A (IRQ 0-7).
    pub fn master(&self) -> &Pic8259 {
        &self.master
    }

    /// The slave 8259A (IRQ 8-15), cascaded on the master's IR2.
    pub fn slave(&self) -> &Pic8259 {
        &self.slave
    }

    /// The level last set on ISA line `irq` (false for 2 and out-of-range lines).
    pub fn line(&self, irq: u8) -> bool {
        match Self::route(irq) {
            Some((Role::Master, ir)) => self.master.lines & chip::bit(ir) != 0,
            Some((Role::Slave, ir)) => self.slave.lines & chip::bit(ir) != 0,
            None => false,
        }
    }

    /// A one-byte guest read. Reads after an OCW3 poll command are the poll word and
    /// acknowledge like INTA; the command port otherwise reads IRR or ISR per OCW3, the data
    /// port reads the IMR ("Reading the 8259A Status"). Undecoded ports read 0xFF.
    pub fn port_read(&mut self, port: u16) -> u8 {
        match port {
            MASTER_COMMAND_PORT => self.chip_read(Role::Master, false),
            MASTER_DATA_PORT => self.chip_read(Role::Master, true),
            SLAVE_COMMAND_PORT => self.chip_read(Role::Slave, false),
            SLAVE_DATA_PORT => self.chip_read(Role::Slave, true),
            ELCR_MASTER_PORT => self.master.elcr,
            ELCR_SLAVE_PORT => self.slave.elcr,
            _ => UNDECODED_READ,
        }
    }

    /// A one-byte guest write. Command ports take ICW1/OCW2/OCW3, data ports ICW2-4 or OCW1,
    /// ELCR ports the trigger-mode bits (fixed bits ignored). Undecoded ports are ignored.
    pub fn port_write(&mut self, port: u16, value: u8) {
        let reevaluate = match port {
            MASTER_COMMAND_PORT => self.master.write_command(value),
            MASTER_DATA_PORT => self.master.write_data(value),
            SLAVE_COMMAND_PORT => self.slave.write_command(value),
            SLAVE_DATA_PORT => self.slave.write_data(value),
            // An ELCR write changes no request (KVM does not re-evaluate either).
            ELCR_MASTER_PORT => return self.master.write_elcr(value),
            ELCR_SLAVE_PORT => return self.slave.write_elcr(value),
            _ => return,
        };
        if reevaluate == Reevaluate::Yes {
            self.settle_cascade();
        }
    }

    /// Sets the logical level of ISA line `irq` (0-15). IRQ 2 and lines above 15 are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match Self::route(irq) {
            Some((Role::Master, ir)) => self.master.set_line(ir, level),
            Some((Role::Slave, ir)) => self.slave.set_line(ir, level),
            None => return,
        }
        self.settle_cascade();
    }

    /// The master's INT pin: an interrupt is waiting for an INTA cycle. Connect it to LINT0
    /// (ExtINT) or to the processor's INTR when the local APIC is disabled.
    pub fn output(&self) -> bool {
        self.master.int_output()
    }

    /// The INTA cycle ("Interrupt Sequence"): returns the vector and moves the request from
    /// IRR to ISR on the chip(s) involved. With nothing pending the master answers with its
    /// IR7 vector and changes nothing; a cascade with nothing on the slave gives the slave's
    /// IR7 vector (see the module documentation).
    pub fn acknowledge(&mut self) -> Vector {
        let Some(ir) = self.master.resolve() else {
            return self.master.spurious_vector();
        };
        self.master.acknowledge(ir);
        if !self.slave_supplies_vector(ir) {
            self.settle_cascade();
            return self.master.vector(ir);
        }
        let vector = match self.slave.resolve() {
            Some(slave_ir) => {
                self.slave.acknowledge(slave_ir);
                self.slave.vector(slave_ir)
            }
            None => self.slave.spurious_vector(),
        };
        self.settle_cascade();
        vector
    }

    /// The vector [`DualPic::acknowledge`] would return now, or `None` when the master's INT is
    /// low (acknowledge would then return the spurious IR7 vector). No side effects.
    pub fn pending_vector(&self) -> Option<Vector> {
        let ir = self.master.resolve()?;
        if !self.slave_supplies_vector(ir) {
            return Some(self.master.vector(ir));
        }
        Some(match self.slave.resolve() {
            Some(slave_ir) => self.slave.vector(slave_ir),
            None => self.slave.spurious_vector(),
        })
    }

    /// The ISA IRQ (0-15) that INTA answers with `vector` under the current ICW2 bases: the
    /// slave's IR n is IRQ 8+n, the master's IR n is IRQ n (its cascade input IR2, whose vectors
    /// the slave supplies, is no IRQ). `None` for a vector of neither chip. For an observer that
    /// joins an INTA with the line that requested it; no side effects.
    pub fn irq_of_vector(&self, vector: Vector) -> Option<u8> {
        let level = vector & 7;
        if self.master.has_slave_on(CASCADE_IR) && self.slave.vector(level) == vector {
            return Some(8 + level);
        }
        let master = self.master.vector(level) == vector;
        (master && !self.slave_supplies_vector(level)).then_some(level)
    }

    /// The ISA IRQs in service (bit n = IRQ n): the slave's ISR as IRQs 8-15, the master's as
    /// IRQs 0-7 without the cascade input IR2 while a slave is attached there (its bit only
    /// mirrors the slave's service).
    pub fn in_service_irqs(&self) -> u16 {
        let mut master = u16::from(self.master.isr());
        if self.master.has_slave_on(CASCADE_IR) {
            master &= !u16::from(chip::bit(CASCADE_IR));
        }
        master | u16::from(self.slave.isr()) << 8
    }

    /// Master input `ir` was acknowledged: does the slave put the vector on the bus?
    fn slave_supplies_vector(&self, ir: u8) -> bool {
        ir == CASCADE_IR && self.master.has_slave_on(CASCADE_IR)
    }

    fn chip_read(&mut self, role: Role, data_port: bool) -> u8 {
        let chip = match role {
            Role::Master => &mut self.master,
            Role::Slave => &mut self.slave,
        };
        if chip.poll {
            let (word, taken) = chip.poll_read();
            if role == Role::Slave && taken.is_some() {
                // As in KVM: the slave's poll also takes the master's cascade request.
                let cascade = chip::bit(CASCADE_IR);
                self.master.irr &= !cascade;
                self.master.isr &= !cascade;
            }
            // KVM evaluates the outputs after every poll but the master's that took IR2, so
            // that one leaves IR2 clear while the slave still requests.
            if !(role == Role::Master && taken == Some(CASCADE_IR)) {
                self.settle_cascade();
            }
            word
        } else if data_port {
            chip.imr
        } else {
            chip.read_status()
        }
    }

    /// Passes the slave's INT output to the master's IR2 after an operation, the way KVM
    /// does: while the slave requests, IR2 gets a fresh edge (a pulse), so the master's IRR
    /// bit 2 is set again after every operation that left the slave requesting, even when an
    /// acknowledge or poll just cleared it. (IR2's ELCR bit is fixed at edge.)
    fn settle_cascade(&mut self) {
        if self.slave.int_output() {
            self.master.set_line(CASCADE_IR, true);
            self.master.set_line(CASCADE_IR, false);
        }
    }

    /// The chip and input an ISA line lands on; `None` for IRQ 2 and lines above 15.
    fn route(irq: u8) -> Option<(Role, u8)> {
        match irq {
            CASCADE_IR => None,
            0..SLAVE_FIRST_IRQ => Some((Role::Master, irq)),
            SLAVE_FIRST_IRQ..ISA_IRQS => Some((Role::Slave, irq - SLAVE_FIRST_IRQ)),
            _ => None,
        }
    }
}
