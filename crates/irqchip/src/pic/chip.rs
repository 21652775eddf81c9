//! One Intel 8259A: its registers, initialization sequencer, priority resolver and the
//! command words. The cascade wiring of two chips lives in the parent module.
//!
//! Section names in comments refer to the 8259A datasheet (Intel order no. 231468):
//! "Initialization Command Words", "Operation Command Words", "Interrupt Sequence",
//! "End of Interrupt", "Automatic Rotation", "Specific Rotation", "Special Mask Mode",
//! "Poll Command", "Reading the 8259A Status", "Edge and Level Triggered Modes",
//! "Special Fully Nested Mode", "Cascade Mode".

use serde::{Deserialize, Serialize};

use crate::types::Vector;

/// Command-port byte decoding (datasheet, "Initialization Command Words" and "Operation
/// Command Words"): D4 set is ICW1; D4 clear with D3 clear is OCW2, with D3 set is OCW3.
pub const CMD_ICW1: u8 = 1 << 4;
/// D3 of a command-port byte with D4 clear: set selects OCW3, clear OCW2.
pub const CMD_OCW3: u8 = 1 << 3;

/// ICW1 bits.
pub const ICW1_IC4: u8 = 1 << 0;
/// SNGL: single 8259A, no ICW3 follows (clear: cascade mode). Recorded only, as in KVM.
pub const ICW1_SNGL: u8 = 1 << 1;
/// Call address interval (MCS-80/85 only): stored nowhere, ignored.
pub const ICW1_ADI: u8 = 1 << 2;
/// LTIM: level-triggered mode for all eight inputs (clear: edge, or per input by ELCR).
/// Recorded only, as in KVM: edge/level comes from the ELCR.
pub const ICW1_LTIM: u8 = 1 << 3;

/// ICW2 in 8086 mode: T7-T3 are the vector base, bits 2:0 are replaced by the IR level.
pub const ICW2_VECTOR_BASE_MASK: u8 = 0xF8;

/// ICW3 of a slave: its cascade identity in bits 2:0.
pub const ICW3_SLAVE_ID_MASK: u8 = 0x07;

/// ICW4 bits.
pub const ICW4_UPM: u8 = 1 << 0;
/// AEOI: automatic EOI at the end of the interrupt acknowledge ("End of Interrupt").
pub const ICW4_AEOI: u8 = 1 << 1;
/// M/S: in buffered mode, set when this chip is the master.
pub const ICW4_MS: u8 = 1 << 2;
/// BUF: buffered mode (SP/EN becomes an output).
pub const ICW4_BUF: u8 = 1 << 3;
/// SFNM: special fully nested mode, for a master whose slave's inputs must nest.
pub const ICW4_SFNM: u8 = 1 << 4;

/// OCW2 fields: R (rotate), SL (specific level), EOI, and the level L2-L0.
pub const OCW2_R: u8 = 1 << 7;
/// SL: the command acts on the level in L2-L0 rather than the highest ISR bit.
pub const OCW2_SL: u8 = 1 << 6;
/// EOI: end-of-interrupt command.
pub const OCW2_EOI: u8 = 1 << 5;
/// L2-L0: the IR level a specific command acts on.
pub const OCW2_LEVEL_MASK: u8 = 0x07;
/// The R/SL/EOI triple, bits 7:5.
pub const OCW2_COMMAND_MASK: u8 = OCW2_R | OCW2_SL | OCW2_EOI;

/// OCW3 bits: ESMM enables the SMM bit, P is the poll command, RR enables RIS.
pub const OCW3_ESMM: u8 = 1 << 6;
/// SMM: set (with ESMM) enters special mask mode, clear (with ESMM) leaves it.
pub const OCW3_SMM: u8 = 1 << 5;
/// P: poll command; the next command-port read returns the poll word ("Poll Command").
pub const OCW3_POLL: u8 = 1 << 2;
/// RR: read-register command; RIS chooses ISR or IRR ("Reading the 8259A Status").
pub const OCW3_RR: u8 = 1 << 1;
/// RIS: with RR, set reads ISR on the next command-port read, clear reads IRR.
pub const OCW3_RIS: u8 = 1 << 0;

/// The poll word: I (bit 7) set when a request was found, W2-W0 the level.
pub const POLL_INTERRUPT: u8 = 1 << 7;

/// The IR level a chip answers with when its request vanished before INTA ("Interrupt
/// Sequence": "a default IR7 will occur").
pub const SPURIOUS_IR: u8 = 7;

/// Priority is resolved over 8 levels; the lowest-priority pointer is 3 bits.
const LEVELS: u8 = 8;
const LEVEL_MASK: u8 = LEVELS - 1;

/// Which of the two chips of a PC this is. It decides the ELCR bits the chipset lets software
/// set and whether IR2 can be a cascade input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The first chip (ports 0x20/0x21, IRQ 0-7), its IR2 the slave's cascade input.
    Master,
    /// The second chip (ports 0xA0/0xA1, IRQ 8-15), its INT wired to the master's IR2.
    Slave,
}

/// ELCR bits the PC chipsets (PIIX, ICH) leave settable: IRQ 0, 1 and 2 are always edge on the
/// master, IRQ 8 and 13 on the slave.
pub const ELCR_MASTER_WRITABLE: u8 = 0xF8;
/// ELCR bits the PC chipsets leave settable on the slave: IRQ 8 (RTC) and 13 (FPU) stay edge.
pub const ELCR_SLAVE_WRITABLE: u8 = 0xDE;

impl Role {
    /// The ELCR bits software may set on this chip ([`ELCR_MASTER_WRITABLE`],
    /// [`ELCR_SLAVE_WRITABLE`]).
    pub fn elcr_writable(self) -> u8 {
        match self {
            Role::Master => ELCR_MASTER_WRITABLE,
            Role::Slave => ELCR_SLAVE_WRITABLE,
        }
    }
}

/// Where the initialization sequencer stands ("Initialization Command Words", flowchart).
/// ICW1 on the command port moves any state to `AwaitIcw2`; data-port writes advance it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InitState {
    /// Initialized: data-port writes are OCW1.
    Ready,
    /// ICW1 was written: the next data-port write is ICW2 (the vector base).
    AwaitIcw2,
    /// ICW2 was written: the next data-port write is ICW3, in single mode too (as in KVM, see
    /// `write_icw2`).
    AwaitIcw3,
    /// ICW3 was written and ICW1 asked for ICW4: the next data-port write is ICW4.
    AwaitIcw4,
}

/// Which register a command-port read returns ("Reading the 8259A Status").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReadSelect {
    /// Interrupt request register: inputs requesting service.
    Irr,
    /// In-service register: levels being serviced, awaiting their EOI.
    Isr,
}

/// Whether the pair's outputs are evaluated after a port write. KVM's PIC runs its
/// `pic_update_irq` after OCW1, the EOI and priority commands of OCW2 and line changes, but not
/// after ICW1-ICW4, OCW3 or the rotate-in-AEOI commands; the evaluation is what gives the
/// master's cascade input IR2 a fresh edge while the slave requests (parent module), so after
/// an ICW1 of the master IR2 stays clear until the next evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Reevaluate {
    /// The outputs are evaluated after the write.
    Yes,
    /// They are not: the cascade input keeps what it had.
    No,
}

/// One 8259A. Fields are the chip's registers and mode latches; `lines` are the levels of its
/// IR input pins (for the master's IR2: the slave's INT output).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pic8259 {
    pub(super) role: Role,
    pub(super) lines: u8,
    pub(super) irr: u8,
    pub(super) isr: u8,
    pub(super) imr: u8,
    pub(super) elcr: u8,
    pub(super) init: InitState,
    /// ICW1: level-triggered mode for all eight inputs (LTIM).
    pub(super) ltim: bool,
    /// ICW1: single mode, no ICW3 and no cascade (SNGL).
    pub(super) single: bool,
    /// ICW1: ICW4 follows (IC4).
    pub(super) icw4_needed: bool,
    /// ICW2: vector base, bits 7:3.
    pub(super) vector_base: u8,
    /// ICW3 as written: slave inputs (master) or cascade ID (slave).
    pub(super) icw3: u8,
    /// ICW4 µPM: 8086 mode. Recorded only; vectors are always 8086-style.
    pub(super) mode_8086: bool,
    pub(super) auto_eoi: bool,
    /// ICW4 BUF and M/S. Recorded only: roles are fixed by the board wiring.
    pub(super) buffered: bool,
    pub(super) buffered_master: bool,
    pub(super) special_fully_nested: bool,
    /// OCW2 "rotate in automatic EOI mode" latch.
    pub(super) rotate_on_auto_eoi: bool,
    /// The IR level with the lowest priority (7 after ICW1: IR0 highest).
    pub(super) lowest_priority: u8,
    pub(super) special_mask: bool,
    pub(super) read_select: ReadSelect,
    /// OCW3 poll command issued: the next read of either port is the poll word.
    pub(super) poll: bool,
}

impl Pic8259 {
    /// The power-on state (the datasheet leaves it undefined and requires an initialization
    /// sequence), KVM's: initialized, vector base 0, IMR 0 (nothing masked; kernel mode on
    /// this host reads 0x00 from ports 0x21 and 0xA1 at boot), PC cascade wiring in ICW3,
    /// 8086 mode, IR0 highest priority, IRR selected for reads. Nothing reaches a CPU before
    /// the guest unmasks LINT0, whose reset state is masked.
    pub fn power_on(role: Role) -> Self {
        Self {
            role,
            lines: 0,
            irr: 0,
            isr: 0,
            imr: 0,
            elcr: 0,
            init: InitState::Ready,
            ltim: false,
            single: false,
            icw4_needed: true,
            vector_base: 0,
            icw3: match role {
                Role::Master => 1 << super::CASCADE_IR,
                Role::Slave => super::CASCADE_IR,
            },
            mode_8086: true,
            auto_eoi: false,
            buffered: false,
            buffered_master: false,
            special_fully_nested: false,
            rotate_on_auto_eoi: false,
            lowest_priority: LEVEL_MASK,
            special_mask: false,
            read_select: ReadSelect::Irr,
            poll: false,
        }
    }

    // ---- Read-only views ----

    /// Master or slave.
    pub fn role(&self) -> Role {
        self.role
    }
    /// Interrupt request register: bit `n` is set while IR`n` requests service.
    pub fn irr(&self) -> u8 {
        self.irr
    }
    /// In-service register: bit `n` is set from IR`n`'s acknowledge until its EOI.
    pub fn isr(&self) -> u8 {
        self.isr
    }
    /// Interrupt mask register (OCW1): bit `n` set masks IR`n`.
    pub fn imr(&self) -> u8 {
        self.imr
    }
    /// Edge/level control register (PC chipset, ports 0x4D0/0x4D1): bit `n` set makes IR`n`
    /// level-sensitive.
    pub fn elcr(&self) -> u8 {
        self.elcr
    }
    /// The levels of the eight input pins, as the devices drive them.
    pub fn lines(&self) -> u8 {
        self.lines
    }
    /// Where the initialization sequencer stands.
    pub fn init_state(&self) -> InitState {
        self.init
    }
    /// Vector base from ICW2 (bits 7:3); IR`n` is delivered as `vector_base + n`.
    pub fn vector_base(&self) -> u8 {
        self.vector_base
    }
    /// ICW3 as written: on the master the inputs with a slave, on a slave its cascade ID.
    pub fn icw3(&self) -> u8 {
        self.icw3
    }
    /// True when ICW4 selected automatic EOI.
    pub fn auto_eoi(&self) -> bool {
        self.auto_eoi
    }
    /// True in special mask mode (OCW3 ESMM/SMM). Recorded only, as in KVM: the datasheet's
    /// effect ("Special Mask Mode") is not applied (see `blocking_in_service`).
    pub fn special_mask_mode(&self) -> bool {
        self.special_mask
    }
    /// True when ICW4 selected special fully nested mode.
    pub fn special_fully_nested(&self) -> bool {
        self.special_fully_nested
    }
    /// True when ICW1 selected single mode. Recorded only, as in KVM: ICW3 is still expected
    /// and the slave still answers for IR2.
    pub fn single_mode(&self) -> bool {
        self.single
    }
    /// The lowest-priority level (0-7); the highest is the one after it. Rotation moves it
    /// ("Automatic Rotation", "Specific Rotation"); after initialization it is 7.
    pub fn lowest_priority(&self) -> u8 {
        self.lowest_priority
    }
    /// Which register a command-port read returns (set by OCW3 RR/RIS).
    pub fn read_select(&self) -> ReadSelect {
        self.read_select
    }
    /// True after a poll command, until the next command-port read answers it.
    pub fn poll_pending(&self) -> bool {
        self.poll
    }

    /// Inputs that are level-sensitive: the ELCR bits. ICW1.LTIM would make all eight inputs
    /// level-sensitive ("Edge and Level Triggered Modes"); KVM's PIC ignores LTIM (edge/level
    /// comes from the ELCR alone; on this host an IRQ 7 pulse after ICW1 0x19 stays latched in
    /// IRR), and so does this model. LTIM is recorded only.
    pub fn level_mask(&self) -> u8 {
        self.elcr
    }

    /// The vector for `ir` in 8086 mode: T7-T3 from ICW2, the level in bits 2:0.
    pub fn vector(&self, ir: u8) -> Vector {
        self.vector_base | (ir & LEVEL_MASK)
    }

    /// The IR7 vector a chip supplies when its request vanished before INTA.
    pub fn spurious_vector(&self) -> Vector {
        self.vector(SPURIOUS_IR)
    }

    /// For the master: IR`ir` has a slave behind it, whose vector the INTA sequence then
    /// returns ("Cascade Mode"). Always IR2 and only IR2: the board wires the slave there, and
    /// KVM's PIC ignores ICW1.SNGL and ICW3 (the datasheet would take the slave inputs from
    /// ICW3 in cascade mode and have none in single mode). This model follows KVM.
    pub fn has_slave_on(&self, ir: u8) -> bool {
        self.role == Role::Master && ir == super::CASCADE_IR
    }

    // ---- Inputs ----

    /// Drives IR input `ir` (0-7). On a level input, driving the pin sets or clears its IRR
    /// bit; on an edge input a rising edge sets the IRR bit, which stays set until INTA
    /// ("Edge and Level Triggered Modes"). The datasheet asks edge inputs to stay high until
    /// INTA; devices emulated by a VMM pulse them, so the latch is kept (as KVM does).
    ///
    /// As in KVM, a level IRR bit is state of its own, set and cleared when the pin is driven:
    /// INTA leaves it set, a poll clears it until the pin is driven high again, and an ELCR
    /// write does not resample it. `lines` is the last level driven, the edge detector's
    /// memory. KVM's ICW1 also forgets it (driving a pin that is already high is then an edge);
    /// here `lines` is the wire level the snapshot checks against the GSI routing, so ICW1
    /// keeps it and a pin must fall and rise again, as the datasheet says.
    pub fn set_line(&mut self, ir: u8, high: bool) {
        let mask = bit(ir);
        let was_high = self.lines & mask != 0;
        if high {
            self.lines |= mask;
        } else {
            self.lines &= !mask;
        }
        if self.level_mask() & mask != 0 {
            if high {
                self.irr |= mask;
            } else {
                self.irr &= !mask;
            }
        } else if high && !was_high {
            self.irr |= mask;
        }
    }

    /// Writes the ELCR; bits the chipset fixes as edge are ignored ([`Role::elcr_writable`]).
    /// IRR is not resampled (KVM does not either): an edge latched before the switch to level
    /// stays requested until INTA clears it or the pin is driven low.
    pub fn write_elcr(&mut self, value: u8) {
        self.elcr = value & self.role.elcr_writable();
    }

    // ---- Priority resolution ("Interrupt Sequence", "Automatic Rotation") ----

    /// Rank of `ir` in the current rotation: 0 is the highest priority, 7 the lowest.
    fn rank(&self, ir: u8) -> u8 {
        ir.wrapping_sub(self.lowest_priority).wrapping_sub(1) & LEVEL_MASK
    }

    /// The highest-priority level set in `mask`.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..LEVELS)
            .map(|k| self.lowest_priority.wrapping_add(1).wrapping_add(k) & LEVEL_MASK)
            .find(|&ir| mask & bit(ir) != 0)
    }

    /// In-service levels that block requests of equal or lower priority. In special fully
    /// nested mode the master's cascade input does not, so a higher-priority slave request can
    /// nest ("Special Fully Nested Mode"). Special mask mode would stop masked in-service
    /// levels from blocking ("Special Mask Mode"); KVM's PIC records OCW3's SMM but never
    /// applies it (on this host an in-service, masked IR3 still blocks IR4 with SMM set), and
    /// this model follows KVM.
    fn blocking_in_service(&self) -> u8 {
        let mut isr = self.isr;
        if self.special_fully_nested && self.has_slave_on(super::CASCADE_IR) {
            isr &= !bit(super::CASCADE_IR);
        }
        isr
    }

    /// The level this chip would put on INT now, if any: the highest unmasked request that
    /// no in-service level of equal or higher priority blocks. A chip in the middle of its
    /// ICW sequence still requests (ICW1 cleared the IMR): the datasheet leaves that state
    /// undefined, and KVM's PIC keeps resolving (on this host a poll between ICW1 and ICW2
    /// returns a request pulsed after ICW1).
    pub fn resolve(&self) -> Option<u8> {
        let request = self.highest(self.irr & !self.imr)?;
        match self.highest(self.blocking_in_service()) {
            Some(serving) if self.rank(serving) <= self.rank(request) => None,
            _ => Some(request),
        }
    }

    /// The INT output pin.
    pub fn int_output(&self) -> bool {
        self.resolve().is_some()
    }

    /// The first INTA pulse for level `ir` ("Interrupt Sequence"): an edge input's IRR bit is
    /// cleared (a level input's stays set while its pin is), and the ISR bit set, unless in
    /// auto-EOI mode, where the ISR bit is cleared again at the end of the sequence and
    /// "rotate in automatic EOI mode" makes `ir` the lowest priority.
    pub fn acknowledge(&mut self, ir: u8) {
        let mask = bit(ir);
        self.irr &= !(mask & !self.level_mask());
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest_priority = ir & LEVEL_MASK;
            }
        } else {
            self.isr |= mask;
        }
    }

    // ---- Port accesses ----

    /// A write to the command port (A0 = 0). Says whether the pair's outputs are evaluated
    /// after it, as KVM's PIC does after some commands only (see [`Reevaluate`]).
    pub fn write_command(&mut self, value: u8) -> Reevaluate {
        if value & CMD_ICW1 != 0 {
            self.write_icw1(value);
            Reevaluate::No
        } else if value & CMD_OCW3 != 0 {
            self.write_ocw3(value);
            Reevaluate::No
        } else {
            self.write_ocw2(value)
        }
    }

    /// A write to the data port (A0 = 1): the next ICW while initializing, else OCW1. OCW1 is
    /// followed by an evaluation of the outputs, an ICW is not (KVM's `pic_ioport_write`).
    pub fn write_data(&mut self, value: u8) -> Reevaluate {
        match self.init {
            InitState::Ready => {
                self.imr = value;
                return Reevaluate::Yes;
            }
            InitState::AwaitIcw2 => self.write_icw2(value),
            InitState::AwaitIcw3 => self.write_icw3(value),
            InitState::AwaitIcw4 => self.write_icw4(value),
        }
        Reevaluate::No
    }

    /// A command-port read without a pending poll: IRR or ISR per OCW3.
    pub fn read_status(&self) -> u8 {
        match self.read_select {
            ReadSelect::Irr => self.irr,
            ReadSelect::Isr => self.isr,
        }
    }

    /// A read after the poll command ("Poll Command"): returns I in bit 7 and the level in
    /// bits 2:0, and takes the request. The datasheet makes the read an interrupt acknowledge
    /// that sets the ISR bit; KVM's PIC instead clears the level's IRR bit (level inputs
    /// included) and its ISR bit, so nothing stays in service and no EOI is due. With no
    /// request the word is 0x07 (the datasheet leaves W2-W0 undefined; KVM answers IR7 with
    /// I clear). This model follows KVM, as checked on this host. Returns the level taken with
    /// the word.
    pub fn poll_read(&mut self) -> (u8, Option<u8>) {
        self.poll = false;
        match self.resolve() {
            Some(ir) => {
                self.irr &= !bit(ir);
                self.isr &= !bit(ir);
                (POLL_INTERRUPT | ir, Some(ir))
            }
            None => (SPURIOUS_IR, None),
        }
    }

    // ---- Initialization Command Words ----

    /// ICW1 starts the sequence and ("Initialization Command Words", a-f): resets the edge
    /// sense circuit (latched edge requests are dropped, so an edge input must make a new
    /// low-to-high transition; level IRR bits stay), clears the IMR, gives
    /// IR7 the lowest priority, clears special mask mode and selects IRR for reads. When IC4
    /// is clear the ICW4 functions (AEOI, SFNM, 8086 mode, buffered mode) become zero; when it
    /// is set they keep their value until ICW4. As in KVM, ISR, a pending poll and "rotate in
    /// AEOI" are kept (the datasheet's list does not touch them; on this host an in-service
    /// IR4 is still in ISR after a new ICW1-ICW4). The slave ID is not reset to 7 because
    /// cascade addressing is fixed by the board (see the parent module). KVM also drops ISR
    /// bits whose line had an edge latched, through its ack notifiers, when a vCPU accepts
    /// PIC interrupts; that side effect is not modelled.
    fn write_icw1(&mut self, value: u8) {
        self.ltim = value & ICW1_LTIM != 0;
        self.single = value & ICW1_SNGL != 0;
        self.icw4_needed = value & ICW1_IC4 != 0;
        self.irr &= self.level_mask();
        self.imr = 0;
        self.lowest_priority = LEVEL_MASK;
        self.special_mask = false;
        self.read_select = ReadSelect::Irr;
        if !self.icw4_needed {
            self.mode_8086 = false;
            self.auto_eoi = false;
            self.buffered = false;
            self.buffered_master = false;
            self.special_fully_nested = false;
        }
        self.init = InitState::AwaitIcw2;
    }

    /// ICW2: the vector base (8086 mode: T7-T3; A10-A8 of the MCS-80/85 call address are
    /// dropped). ICW3 comes next even in single mode: KVM's PIC ignores ICW1.SNGL and always
    /// takes a third byte (on this host ICW1 0x13, ICW2, ICW4 leaves the chip waiting for
    /// ICW4), where the datasheet would skip ICW3. This model follows KVM.
    fn write_icw2(&mut self, value: u8) {
        self.vector_base = value & ICW2_VECTOR_BASE_MASK;
        self.init = InitState::AwaitIcw3;
    }

    /// ICW3: slave inputs (master) or cascade ID (slave), kept whole.
    fn write_icw3(&mut self, value: u8) {
        self.icw3 = value;
        self.init = self.after_icw3();
    }

    fn after_icw3(&self) -> InitState {
        if self.icw4_needed {
            InitState::AwaitIcw4
        } else {
            InitState::Ready
        }
    }

    /// ICW4: µPM, AEOI, M/S, BUF, SFNM. The sequence ends.
    fn write_icw4(&mut self, value: u8) {
        self.mode_8086 = value & ICW4_UPM != 0;
        self.auto_eoi = value & ICW4_AEOI != 0;
        self.buffered_master = value & ICW4_MS != 0;
        self.buffered = value & ICW4_BUF != 0;
        self.special_fully_nested = value & ICW4_SFNM != 0;
        self.init = InitState::Ready;
    }

    // ---- Operation Command Words ----

    /// OCW2: EOI, rotation and priority commands, decoded on R, SL, EOI. The outputs are
    /// evaluated after an EOI that cleared a bit, a specific EOI and a priority change, not after
    /// the rotate-in-AEOI commands or a no-op (KVM).
    fn write_ocw2(&mut self, value: u8) -> Reevaluate {
        let level = value & OCW2_LEVEL_MASK;
        match value & OCW2_COMMAND_MASK {
            OCW2_EOI => return self.nonspecific_eoi(false),
            c if c == OCW2_SL | OCW2_EOI => self.specific_eoi(level, false),
            c if c == OCW2_R | OCW2_EOI => return self.nonspecific_eoi(true),
            OCW2_R => {
                self.rotate_on_auto_eoi = true;
                return Reevaluate::No;
            }
            0 => {
                self.rotate_on_auto_eoi = false;
                return Reevaluate::No;
            }
            c if c == OCW2_R | OCW2_SL | OCW2_EOI => self.specific_eoi(level, true),
            c if c == OCW2_R | OCW2_SL => self.lowest_priority = level,
            _ => return Reevaluate::No, // SL alone: no operation
        }
        Reevaluate::Yes
    }

    /// Non-specific EOI ("End of Interrupt"): clears the highest-priority ISR bit. With
    /// `rotate`, the level cleared becomes the lowest priority ("Automatic Rotation"). In
    /// special mask mode the datasheet would skip ISR bits masked in the IMR; KVM ignores
    /// special mask mode here too (on this host the EOI clears a masked in-service IR3), and
    /// this model follows KVM.
    fn nonspecific_eoi(&mut self, rotate: bool) -> Reevaluate {
        let Some(ir) = self.highest(self.isr) else {
            return Reevaluate::No;
        };
        self.isr &= !bit(ir);
        if rotate {
            self.lowest_priority = ir;
        }
        Reevaluate::Yes
    }

    /// Specific EOI: clears ISR bit `ir`; with `rotate` ("Specific Rotation"), `ir` becomes the
    /// lowest priority whether or not it was in service.
    fn specific_eoi(&mut self, ir: u8, rotate: bool) {
        self.isr &= !bit(ir);
        if rotate {
            self.lowest_priority = ir & LEVEL_MASK;
        }
    }

    /// OCW3: special mask mode set/reset (when ESMM), poll command, read-register select
    /// (when RR).
    fn write_ocw3(&mut self, value: u8) {
        if value & OCW3_ESMM != 0 {
            self.special_mask = value & OCW3_SMM != 0;
        }
        if value & OCW3_POLL != 0 {
            self.poll = true;
        }
        if value & OCW3_RR != 0 {
            self.read_select = if value & OCW3_RIS != 0 {
                ReadSelect::Isr
            } else {
                ReadSelect::Irr
            };
        }
    }

    /// Brings a deserialized chip back inside the values a guest could have produced.
    pub(super) fn sanitize(&mut self, role: Role) {
        self.role = role;
        self.elcr &= role.elcr_writable();
        self.vector_base &= ICW2_VECTOR_BASE_MASK;
        self.lowest_priority &= LEVEL_MASK;
    }
}

/// The mask bit of IR level `ir` (only bits 2:0 are used).
pub(super) fn bit(ir: u8) -> u8 {
    1 << (ir & LEVEL_MASK)
}
