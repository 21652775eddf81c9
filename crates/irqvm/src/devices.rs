//! The port-I/O devices of the machine:
//!
//! | ports | device |
//! |---|---|
//! | 0x3F8-0x3FF | 16550A UART (vm-superio), interrupt on ISA line 4 |
//! | 0xF4 | isa-debug-exit: a write of `v` ends the VM with exit status `(v << 1) \| 1` |
//! | 0x510 / 0x511 | fw_cfg, legacy I/O interface: selector / data |
//! | 0x2000-0x2017 | pc-testdev interrupt lines: a byte write of 1 / 0 raises / lowers line n |
//!
//! Unclaimed ports read as all ones and ignore writes, as on an ISA bus with nothing decoding the
//! address; so do unclaimed MMIO addresses. Every device is behind its own lock: vCPU threads
//! access them concurrently.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::backend::{InterruptLines, IrqchipError, IRQ_LINES};

pub const SERIAL_PORT: u16 = 0x3F8;
const SERIAL_PORTS: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
pub const FW_CFG_SELECTOR_PORT: u16 = 0x510;
pub const FW_CFG_DATA_PORT: u16 = 0x511;
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;

/// fw_cfg keys (QEMU docs/specs/fw_cfg.rst, "Legacy selector keys").
pub mod fw_cfg_key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0F;
    pub const FILE_DIR: u16 = 0x19;
}
/// Selector bit 15 marks architecture-specific keys (none are provided); bit 14 is the write
/// flag of the (unsupported) write interface.
const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
const FW_CFG_ENTRY_MASK: u16 = 0x3FFF;

/// What a port write asks the VMM to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// isa-debug-exit was written: the VM ends with this exit status.
    Exit(i32),
}

/// Where the serial port's output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A buffer the caller reads (tests).
    Capture(SerialCapture),
    /// Both.
    StdoutAndCapture(SerialCapture),
    /// Nowhere.
    Discard,
}

/// A shared buffer collecting the serial output.
#[derive(Clone, Debug, Default)]
pub struct SerialCapture(Arc<Mutex<Vec<u8>>>);

impl SerialCapture {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far, lossily decoded as UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }

    fn append(&self, bytes: &[u8]) {
        lock(&self.0).extend_from_slice(bytes);
    }
}

/// Locks a device mutex; a panic on another vCPU thread while holding it does not make the
/// device unusable (the state is plain data and stays consistent per access).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The serial port's byte sink.
struct SerialWriter {
    stdout: bool,
    capture: Option<SerialCapture>,
}

impl Write for SerialWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.stdout {
            io::stdout().write_all(buf)?;
        }
        if let Some(capture) = &self.capture {
            capture.append(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.stdout {
            io::stdout().flush()?;
        }
        Ok(())
    }
}

impl From<SerialOutput> for SerialWriter {
    fn from(out: SerialOutput) -> Self {
        match out {
            SerialOutput::Stdout => Self {
                stdout: true,
                capture: None,
            },
            SerialOutput::Capture(c) => Self {
                stdout: false,
                capture: Some(c),
            },
            SerialOutput::StdoutAndCapture(c) => Self {
                stdout: true,
                capture: Some(c),
            },
            SerialOutput::Discard => Self {
                stdout: false,
                capture: None,
            },
        }
    }
}

/// The UART's interrupt output: vm-superio signals each new interrupt condition once, which on
/// the edge-triggered ISA line 4 is a pulse.
struct SerialIrq {
    lines: Arc<dyn InterruptLines>,
}

impl Trigger for SerialIrq {
    type E = IrqchipError;

    fn trigger(&self) -> Result<(), IrqchipError> {
        self.lines.pulse_line(SERIAL_IRQ)
    }
}

/// QEMU's fw_cfg, legacy I/O interface: write a 16-bit key to the selector port, then read the
/// item byte by byte from the data port; reads past the end return 0.
#[derive(Debug, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: Option<u16>,
    offset: usize,
}

impl FwCfg {
    /// The items a guest can read: signature, interface ID, UUID, RAM size, no-graphics, CPU
    /// counts and an empty file directory.
    pub fn new(cpus: u16, ram_size: u64) -> Self {
        use fw_cfg_key::*;
        let mut items = BTreeMap::new();
        items.insert(SIGNATURE, b"QEMU".to_vec());
        // Bit 0: traditional interface; no DMA.
        items.insert(ID, 1u32.to_le_bytes().to_vec());
        items.insert(UUID, vec![0; 16]);
        items.insert(RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(MAX_CPUS, cpus.to_le_bytes().to_vec());
        // The file directory's count is big-endian (fw_cfg.rst, "FW_CFG_FILE_DIR").
        items.insert(FILE_DIR, 0u32.to_be_bytes().to_vec());
        Self {
            items,
            selected: None,
            offset: 0,
        }
    }

    pub fn select(&mut self, selector: u16) {
        self.selected = (selector & FW_CFG_ARCH_LOCAL == 0).then_some(selector & FW_CFG_ENTRY_MASK);
        self.offset = 0;
    }

    pub fn read_byte(&mut self) -> u8 {
        let byte = self
            .selected
            .and_then(|key| self.items.get(&key))
            .and_then(|item| item.get(self.offset).copied())
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }
}

/// Configuration of the device set.
pub struct DeviceConfig {
    pub cpus: u16,
    pub ram_size: u64,
    pub serial: SerialOutput,
}

/// All port-I/O devices of the VM.
pub struct Devices {
    serial: Mutex<Serial<SerialIrq, NoEvents, SerialWriter>>,
    fw_cfg: Mutex<FwCfg>,
    lines: Arc<dyn InterruptLines>,
}

impl Devices {
    pub fn new(cfg: DeviceConfig, lines: Arc<dyn InterruptLines>) -> Self {
        let irq = SerialIrq {
            lines: lines.clone(),
        };
        Self {
            serial: Mutex::new(Serial::new(irq, SerialWriter::from(cfg.serial))),
            fw_cfg: Mutex::new(FwCfg::new(cfg.cpus, cfg.ram_size)),
            lines,
        }
    }

    /// A guest `in` from `port`; `data` is filled (its length is the access size).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_port_byte(port.wrapping_add(i as u16));
        }
    }

    fn read_port_byte(&self, port: u16) -> u8 {
        match port {
            p if serial_offset(p).is_some() => {
                lock(&self.serial).read(serial_offset(p).unwrap_or(0))
            }
            FW_CFG_DATA_PORT => lock(&self.fw_cfg).read_byte(),
            p if testdev_line(p).is_some() => 0,
            _ => 0xFF,
        }
    }

    /// A guest `out` to `port` with `data` (little-endian, 1, 2 or 4 bytes).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            DEBUG_EXIT_PORT => return PioAction::Exit(debug_exit_status(le_value(data))),
            FW_CFG_SELECTOR_PORT => lock(&self.fw_cfg).select(le_value(data) as u16),
            p if testdev_line(p).is_some() => {
                for (i, byte) in data.iter().enumerate() {
                    if let Some(line) = testdev_line(p.wrapping_add(i as u16)) {
                        self.drive_line(line, *byte != 0);
                    }
                }
            }
            p if serial_offset(p).is_some() => {
                for (i, byte) in data.iter().enumerate() {
                    if let Some(offset) = serial_offset(p.wrapping_add(i as u16)) {
                        self.write_serial(offset, *byte);
                    }
                }
            }
            _ => tracing::trace!(port, ?data, "write to an unclaimed port"),
        }
        PioAction::Continue
    }

    fn write_serial(&self, offset: u8, byte: u8) {
        if let Err(e) = lock(&self.serial).write(offset, byte) {
            tracing::warn!("serial port: {e}");
        }
    }

    fn drive_line(&self, line: u32, level: bool) {
        if let Err(e) = self.lines.set_line(line, level) {
            tracing::warn!(line, level, "pc-testdev: {e}");
        }
    }

    /// Bytes typed into the serial port; returns how many fit in its FIFO.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// A guest read of an address no device claims: all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        tracing::debug!(addr, len = data.len(), "read of unclaimed MMIO");
        data.fill(0xFF);
    }

    /// A guest write to an address no device claims: dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        tracing::debug!(addr, ?data, "write to unclaimed MMIO");
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    let offset = port.checked_sub(SERIAL_PORT)?;
    (offset < SERIAL_PORTS).then_some(offset as u8)
}

fn testdev_line(port: u16) -> Option<u32> {
    let line = u32::from(port.checked_sub(TESTDEV_IRQ_PORT)?);
    (line < IRQ_LINES).then_some(line)
}

/// Little-endian value of an access of up to 4 bytes (longer data is cut to 4).
fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// isa-debug-exit's status for a written value: `(v << 1) | 1`, as QEMU computes it, truncated
/// to the 8 bits a process exit status carries.
pub fn debug_exit_status(value: u32) -> i32 {
    ((value.wrapping_shl(1) | 1) & 0xFF) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every line change.
    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>);

    impl InterruptLines for Lines {
        fn set_line(&self, line: u32, level: bool) -> Result<(), IrqchipError> {
            if line >= IRQ_LINES {
                return Err(IrqchipError::NoSuchLine(line));
            }
            lock(&self.0).push((line, level));
            Ok(())
        }

        fn signal_msi(
            &self,
            _address: u64,
            _data: u32,
        ) -> Result<crate::backend::MsiDelivery, IrqchipError> {
            unreachable!("no device here sends MSIs")
        }
    }

    fn devices() -> (Devices, Arc<Lines>, SerialCapture) {
        let lines = Arc::new(Lines::default());
        let capture = SerialCapture::new();
        let cfg = DeviceConfig {
            cpus: 4,
            ram_size: 128 << 20,
            serial: SerialOutput::Capture(capture.clone()),
        };
        (Devices::new(cfg, lines.clone()), lines, capture)
    }

    fn read_fw_cfg(d: &Devices, key: u16, len: usize) -> Vec<u8> {
        d.pio_write(FW_CFG_SELECTOR_PORT, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0];
                d.pio_read(FW_CFG_DATA_PORT, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn debug_exit_status_is_value_shifted_with_low_bit_set() {
        let (d, ..) = devices();
        assert_eq!(
            d.pio_write(DEBUG_EXIT_PORT, &0u32.to_le_bytes()),
            PioAction::Exit(1)
        );
        assert_eq!(
            d.pio_write(DEBUG_EXIT_PORT, &0x10u32.to_le_bytes()),
            PioAction::Exit(0x21)
        );
        assert_eq!(d.pio_write(DEBUG_EXIT_PORT, &[3]), PioAction::Exit(7));
        assert_eq!(debug_exit_status(u32::MAX), 0xFF);
    }

    #[test]
    fn serial_bytes_reach_the_output() {
        let (d, _, capture) = devices();
        for b in b"PASS hello\n" {
            d.pio_write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(capture.text(), "PASS hello\n");
    }

    #[test]
    fn serial_thr_empty_interrupt_pulses_line_4_16550_ier() {
        let (d, lines, _) = devices();
        d.pio_write(SERIAL_PORT + 1, &[0x02]); // IER: THR empty interrupt
        let seen = lock(&lines.0).clone();
        assert_eq!(seen, vec![(4, true), (4, false)]);
    }

    #[test]
    fn serial_input_is_readable_from_the_data_port() {
        let (d, ..) = devices();
        assert_eq!(d.serial_input(b"x"), 1);
        let mut lsr = [0];
        d.pio_read(SERIAL_PORT + 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        d.pio_read(SERIAL_PORT, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn fw_cfg_signature_cpus_and_ram() {
        let (d, ..) = devices();
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::NB_CPUS, 2), 4u16.to_le_bytes());
        assert_eq!(
            read_fw_cfg(&d, fw_cfg_key::RAM_SIZE, 8),
            (128u64 << 20).to_le_bytes()
        );
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::ID, 4), 1u32.to_le_bytes());
    }

    #[test]
    fn fw_cfg_reads_past_the_end_or_unknown_keys_are_zero() {
        let (d, ..) = devices();
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_fw_cfg(&d, 0x1234, 2), [0, 0]);
        assert_eq!(read_fw_cfg(&d, 0x8000, 2), [0, 0]);
    }

    #[test]
    fn fw_cfg_reselect_restarts_the_item() {
        let (d, ..) = devices();
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::SIGNATURE, 2), b"QE");
        assert_eq!(read_fw_cfg(&d, fw_cfg_key::SIGNATURE, 2), b"QE");
    }

    #[test]
    fn testdev_lines_raise_and_lower() {
        let (d, lines, _) = devices();
        d.pio_write(TESTDEV_IRQ_PORT + 10, &[1]);
        d.pio_write(TESTDEV_IRQ_PORT + 10, &[0]);
        d.pio_write(TESTDEV_IRQ_PORT + 23, &[1]);
        assert_eq!(
            lock(&lines.0).clone(),
            vec![(10, true), (10, false), (23, true)]
        );
        // Port 0x2018 is not a line.
        d.pio_write(TESTDEV_IRQ_PORT + 24, &[1]);
        assert_eq!(lock(&lines.0).len(), 3);
    }

    #[test]
    fn unclaimed_ports_and_mmio_read_all_ones() {
        let (d, ..) = devices();
        let mut data = [0u8; 4];
        d.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xFF; 4]);
        assert_eq!(d.pio_write(0x1234, &[1, 2]), PioAction::Continue);
        let mut data = [0u8; 8];
        d.mmio_read(0xE000_0000, &mut data);
        assert_eq!(data, [0xFF; 8]);
    }
}
