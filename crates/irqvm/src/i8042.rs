//! The PC's 8042 keyboard controller at ports 0x60 (data) and 0x64 (status / command), enough
//! for an OS to find it, test it and reset the machine through it; no keyboard or mouse is
//! attached, so no IRQ 1 or 12 is ever raised.
//!
//! Commands (written to 0x64; IBM PC/AT Technical Reference, "Keyboard controller commands";
//! what Linux's i8042 driver and its reboot path use):
//!
//! | command | effect |
//! |---|---|
//! | 0x20 | read the command byte (CTR): queued on 0x60 |
//! | 0x60 | write the command byte: the next 0x60 write is the CTR |
//! | 0xAA | controller self-test: queues 0x55 |
//! | 0xAB, 0xA9 | keyboard / aux interface test: queues 0x00 (no error) |
//! | 0xAD/0xAE, 0xA7/0xA8 | disable / enable keyboard / aux: CTR bits 4 / 5 |
//! | 0xD3 | write aux output buffer: the next 0x60 write comes back as aux data (Linux's aux loopback probe) |
//! | 0xFE (or any 0xF0-0xFF with bit 0 clear) | pulse the reset line: the machine resets |
//!
//! irqvm cannot reset a VM: a reset ends it, as KVM's KVM_SYSTEM_EVENT_RESET would (the reset
//! callback). Data written to 0x60 outside a command goes to the (absent) keyboard and is dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// System flag: set once the self-test passed (a BIOS runs it; irqvm's machine starts tested).
const STATUS_SYSTEM: u8 = 1 << 2;
/// Keyboard inhibit switch: set when the keyboard is not locked (IBM PC AT Technical Reference,
/// 8042 status bit 4). irqvm has no keylock: with the bit clear Linux warns "Keylock active".
const STATUS_UNLOCKED: u8 = 1 << 4;
/// The byte in the output buffer came from the aux (mouse) port.
const STATUS_AUX_DATA: u8 = 1 << 5;

/// CTR bits: keyboard / aux interrupts, system flag, keyboard / aux clock disabled, translation.
const CTR_DEFAULT: u8 = 0x01 | 0x02 | 0x04 | 0x40;
const CTR_KBD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;

/// Bytes the controller holds for the host to read. The 8042 itself has a one-byte output
/// buffer and produces the next byte only once the host has read it; a queue stands in for
/// that, and like QEMU's PS/2 queue (`hw/input/ps2.c`, 16 bytes, a byte arriving when it is
/// full is dropped) it is bounded, so that a guest writing commands without ever reading 0x60
/// cannot grow irqvm's memory without end. Linux's `i8042_flush` drains at most 16 bytes too.
pub const OUTPUT_QUEUE_BYTES: usize = 16;

/// What the VMM does when the guest pulses the reset line.
pub type OnReset = Box<dyn Fn() + Send + Sync>;

/// The controller's state.
#[derive(Debug)]
pub struct I8042 {
    ctr: u8,
    /// Output buffer: (byte, from aux).
    output: VecDeque<(u8, bool)>,
    /// A command waiting for its data byte on 0x60.
    pending: Option<u8>,
}

impl Default for I8042 {
    fn default() -> Self {
        Self {
            ctr: CTR_DEFAULT,
            output: VecDeque::new(),
            pending: None,
        }
    }
}

/// What a write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Reset,
}

/// The controller's state as plain values (snapshots): configuration byte, output buffer
/// (byte, from aux), command awaiting its data byte.
pub type I8042State = (u8, Vec<(u8, bool)>, Option<u8>);

impl I8042 {
    /// The state (snapshots).
    pub fn state(&self) -> I8042State {
        (
            self.ctr,
            self.output.iter().copied().collect(),
            self.pending,
        )
    }

    /// Restores [`Self::state`].
    pub fn restore(&mut self, (ctr, output, pending): &I8042State) {
        self.ctr = *ctr;
        self.output = output.iter().copied().take(OUTPUT_QUEUE_BYTES).collect();
        self.pending = *pending;
    }

    pub fn status(&self) -> u8 {
        let mut s = STATUS_SYSTEM | STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.output.front() {
            s |= STATUS_OUTPUT_FULL;
            if aux {
                s |= STATUS_AUX_DATA;
            }
        }
        s
    }

    /// Port 0x60 read: the output buffer's next byte, or the last value (0) when empty.
    pub fn read_data(&mut self) -> u8 {
        self.output.pop_front().map_or(0, |(b, _)| b)
    }

    pub fn write_data(&mut self, value: u8) {
        match self.pending.take() {
            Some(0x60) => self.ctr = value,
            Some(0xD3) => self.queue(value, true),
            // 0xD2 (write keyboard output buffer) echoes as keyboard data.
            Some(0xD2) => self.queue(value, false),
            // Output port writes (0xD1) and data for the absent keyboard are dropped.
            _ => {}
        }
    }

    pub fn write_command(&mut self, command: u8) -> Action {
        self.pending = None;
        match command {
            0x20 => self.queue(self.ctr, false),
            0x60 | 0xD1 | 0xD2 | 0xD3 => self.pending = Some(command),
            0xAA => self.queue(0x55, false),
            0xA9 | 0xAB => self.queue(0x00, false),
            0xA7 => self.ctr |= CTR_AUX_DISABLED,
            0xA8 => self.ctr &= !CTR_AUX_DISABLED,
            0xAD => self.ctr |= CTR_KBD_DISABLED,
            0xAE => self.ctr &= !CTR_KBD_DISABLED,
            // Pulse output lines: bit 0 is the CPU reset line, active low.
            0xF0..=0xFF if command & 1 == 0 => return Action::Reset,
            _ => tracing::debug!(command, "i8042: command ignored"),
        }
        Action::None
    }

    /// A byte for the host (`aux`: from the aux port), dropped if [`OUTPUT_QUEUE_BYTES`] wait.
    fn queue(&mut self, byte: u8, aux: bool) {
        if self.output.len() < OUTPUT_QUEUE_BYTES {
            self.output.push_back((byte, aux));
        } else {
            tracing::debug!(byte, aux, "i8042: output queue full, byte dropped");
        }
    }
}

/// The controller on the I/O bus: one device per port (0x60 and 0x64 are not adjacent).
pub struct I8042Port {
    state: Arc<Mutex<I8042>>,
    command_port: bool,
    on_reset: Arc<OnReset>,
}

impl I8042Port {
    /// The data and command ports of one controller, which calls `on_reset` on a reset pulse.
    pub fn pair(on_reset: OnReset) -> (Self, Self) {
        let state = Arc::new(Mutex::new(I8042::default()));
        let on_reset = Arc::new(on_reset);
        let port = |command_port| Self {
            state: state.clone(),
            command_port,
            on_reset: on_reset.clone(),
        };
        (port(false), port(true))
    }

    /// The controller (shared by both ports), locked.
    pub fn lock(&self) -> MutexGuard<'_, I8042> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DevicePio for I8042Port {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut c = self.lock();
        for (byte, offset) in data.iter_mut().zip(offset..) {
            *byte = match (offset, self.command_port) {
                (0, false) => c.read_data(),
                (0, true) => c.status(),
                _ => 0xFF,
            };
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let (Some(&value), 0) = (data.first(), offset) else {
            return;
        };
        let action = {
            let mut c = self.lock();
            if self.command_port {
                c.write_command(value)
            } else {
                c.write_data(value);
                Action::None
            }
        };
        if action == Action::Reset {
            tracing::debug!("i8042: reset pulse, the VM ends");
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyboard_is_never_locked() {
        let mut c = I8042::default();
        assert_eq!(c.status() & STATUS_UNLOCKED, STATUS_UNLOCKED);
        c.write_command(0xAA);
        assert_eq!(
            c.status() & STATUS_UNLOCKED,
            STATUS_UNLOCKED,
            "with a byte waiting"
        );
    }

    #[test]
    fn self_test_and_ctr_round_trip() {
        let mut c = I8042::default();
        assert_eq!(c.status() & STATUS_OUTPUT_FULL, 0);
        c.write_command(0xAA);
        assert_eq!(c.status() & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(c.read_data(), 0x55);
        c.write_command(0x60);
        c.write_data(0x47);
        c.write_command(0x20);
        assert_eq!(c.read_data(), 0x47);
        assert_eq!(c.status() & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn aux_loopback_comes_back_as_aux_data() {
        let mut c = I8042::default();
        c.write_command(0xD3);
        c.write_data(0x5A);
        assert_eq!(
            c.status() & (STATUS_OUTPUT_FULL | STATUS_AUX_DATA),
            STATUS_OUTPUT_FULL | STATUS_AUX_DATA
        );
        assert_eq!(c.read_data(), 0x5A);
    }

    /// A guest that issues self-tests without ever reading the data port: the controller keeps
    /// the first 16 answers and drops the rest, instead of queueing one per command forever.
    #[test]
    fn unread_output_is_bounded() {
        let mut c = I8042::default();
        for _ in 0..1000 {
            c.write_command(0xAA);
            c.write_command(0xD3);
            c.write_data(0x5A);
        }
        assert_eq!(c.state().1.len(), OUTPUT_QUEUE_BYTES);
        for _ in 0..OUTPUT_QUEUE_BYTES / 2 {
            assert_eq!(c.read_data(), 0x55);
            assert_eq!(c.read_data(), 0x5A);
        }
        assert_eq!(c.status() & STATUS_OUTPUT_FULL, 0, "nothing beyond the 16");
        c.write_command(0x20);
        assert_eq!(c.read_data(), CTR_DEFAULT, "answers again once read");
    }

    #[test]
    fn fe_pulses_reset_and_ff_does_not() {
        let mut c = I8042::default();
        assert_eq!(c.write_command(0xFE), Action::Reset);
        assert_eq!(c.write_command(0xFF), Action::None);
    }

    #[test]
    fn reset_through_the_port_calls_back() {
        let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let h = hits.clone();
        let (_data, cmd) = I8042Port::pair(Box::new(move || {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        cmd.pio_write(PioAddress(0x64), 0, &[0xFE]);
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
