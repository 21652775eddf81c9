//! The port-I/O devices of the machine, each a `vm-device` `DevicePio` on the VM's
//! [`crate::iobus::IoBus`]:
//!
//! | ports | device |
//! |---|---|
//! | 0x3F8-0x3FF | 16550A UART (vm-superio), interrupt on ISA line 4 |
//! | 0xF4 | isa-debug-exit: a write of `v` ends the VM with exit status `(v << 1) \| 1` |
//! | 0x510 / 0x511 | fw_cfg, legacy I/O interface: selector / data |
//! | 0x2000-0x2017 | pc-testdev interrupt lines: a byte write of 1 / 0 raises / lowers line n |
//! | 0x2020-0x2023 | MSI doorbell (irqvm's own, not in QEMU): a 32-bit write sends one MSI (`MsiDoorbell`) |
//! | 0x60, 0x64 | i8042 keyboard controller without devices: probing and reset ([`crate::i8042`]) |
//! | 0x70 / 0x71 | CMOS RTC: index / data ([`crate::cmos`]) |
//!
//! Unclaimed ports read as all ones and ignore writes, as on an ISA bus with nothing decoding the
//! address; so do unclaimed MMIO addresses (the bus's rule). Every device is behind its own lock:
//! vCPU threads access them concurrently.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::backend::{InterruptLines, IrqchipError, IRQ_LINES};
use crate::snapshot::format::{DeviceState, SerialRegs};

/// A device state a snapshot holds that the device cannot take.
#[derive(Debug, thiserror::Error)]
#[error("device state refused: {0}")]
pub struct DeviceStateError(pub String);
use crate::cmos::{CmosPorts, CMOS_PORT, CMOS_PORTS};
use crate::i8042::{I8042Port, OnReset, I8042_COMMAND_PORT, I8042_DATA_PORT};
use crate::iobus::{BusError, IoBus};

pub const SERIAL_PORT: u16 = 0x3F8;
const SERIAL_PORTS: u16 = 8;
/// isa-debug-exit decodes a 32-bit port (QEMU's `iosize` 4); only a write at its base counts.
const DEBUG_EXIT_PORTS: u16 = 4;
pub const SERIAL_IRQ: u32 = 4;
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
pub const FW_CFG_SELECTOR_PORT: u16 = 0x510;
pub const FW_CFG_DATA_PORT: u16 = 0x511;
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;
pub const MSI_DOORBELL_PORT: u16 = 0x2020;
/// What a 32-bit read of the doorbell returns ("MSI1" in memory order): a guest probes for it,
/// an unclaimed port reads all ones.
pub const MSI_DOORBELL_ID: u32 = u32::from_le_bytes(*b"MSI1");

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

/// What isa-debug-exit calls with the exit status (`(v << 1) | 1`) when the guest writes `v`:
/// the VMM ends the VM. Called on the writing vCPU's thread.
pub type OnDebugExit = Box<dyn Fn(i32) + Send + Sync>;

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
    /// What a write to isa-debug-exit does.
    pub on_debug_exit: OnDebugExit,
    /// What a reset pulse from the i8042 (command 0xFE) does.
    pub on_reset: OnReset,
}

/// The 16550A UART at 0x3F8 (vm-superio), byte by byte.
struct SerialPort(Mutex<Serial<SerialIrq, NoEvents, SerialWriter>>);

impl DevicePio for SerialPort {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut serial = lock(&self.0);
        for (byte, offset) in data.iter_mut().zip(offset..) {
            *byte = serial.read(offset as u8);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let mut serial = lock(&self.0);
        for (byte, offset) in data.iter().zip(offset..) {
            if let Err(e) = serial.write(offset as u8, *byte) {
                crate::warn_ratelimited!("serial port: {e}");
            }
        }
    }
}

/// isa-debug-exit at 0xF4: a write of `v` at the base ends the VM with `(v << 1) | 1`.
struct DebugExit(OnDebugExit);

impl DevicePio for DebugExit {
    /// Nothing to read: the port floats high.
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 {
            (self.0)(debug_exit_status(le_value(data)));
        }
    }
}

/// fw_cfg's legacy I/O interface: selector at offset 0 (0x510), data at offset 1 (0x511).
struct FwCfgPorts(Mutex<FwCfg>);

impl DevicePio for FwCfgPorts {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut fw_cfg = lock(&self.0);
        for (byte, offset) in data.iter_mut().zip(offset..) {
            *byte = match offset {
                1 => fw_cfg.read_byte(),
                _ => 0xFF,
            };
        }
    }

    /// A selector write; the data port's write interface is not offered (writes dropped).
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset == 0 {
            lock(&self.0).select(le_value(data) as u16);
        }
    }
}

/// pc-testdev's interrupt lines at 0x2000: a byte write of 1 / 0 raises / lowers line n.
struct TestDevLines(Arc<dyn InterruptLines>);

impl DevicePio for TestDevLines {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        for (byte, line) in data.iter().zip(u32::from(offset)..) {
            if let Err(e) = self.0.set_line(line, *byte != 0) {
                crate::warn_ratelimited!(line, "pc-testdev: {e}");
            }
        }
    }
}

/// The MSI doorbell: lets a guest send itself message-signalled interrupts, as a PCI device's
/// MSI write would, with no PCI bus. One 32-bit write at the base port is one message (SDM vol. 3
/// §11.11): value bits 15:0 are the MSI data (vector, delivery mode, level, trigger mode), bits
/// 31:24 the destination ID (address bits 19:12), bit 16 the destination mode (address bit 2),
/// bit 17 the redirection hint (address bit 3); bits 23:18 are reserved and a write with any of
/// them set is dropped. The message goes through [`InterruptLines::signal_msi`], which refuses a
/// reserved delivery mode ([`IrqchipError::InvalidMsi`]: dropped, as hardware drops such a
/// write). Other widths and offsets are ignored. It has no state: nothing to snapshot.
struct MsiDoorbell(Arc<dyn InterruptLines>);

impl MsiDoorbell {
    const RESERVED: u32 = 0x00FC_0000;

    /// The MSI address and data a doorbell value stands for, or `None` if a reserved bit is set.
    fn message(value: u32) -> Option<(u64, u32)> {
        if value & Self::RESERVED != 0 {
            return None;
        }
        let dest = u64::from(value >> 24);
        let dm = u64::from((value >> 16) & 1);
        let rh = u64::from((value >> 17) & 1);
        Some((0xFEE0_0000 | dest << 12 | rh << 3 | dm << 2, value & 0xFFFF))
    }
}

impl DevicePio for MsiDoorbell {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let id = MSI_DOORBELL_ID.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = id.get(usize::from(offset) + i).copied().unwrap_or(0xFF);
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset != 0 || data.len() != 4 {
            return;
        }
        let value = le_value(data);
        let Some((address, msi_data)) = Self::message(value) else {
            crate::warn_ratelimited!(value, "msi doorbell: reserved bits set, dropped");
            return;
        };
        if let Err(e) = self.0.signal_msi(address, msi_data) {
            crate::warn_ratelimited!(value, "msi doorbell: {e}");
        }
    }
}

/// The VM's devices, registered on its bus.
pub struct Devices {
    serial: Arc<SerialPort>,
    /// What a restored UART is rebuilt with: its interrupt line and its output.
    lines: Arc<dyn InterruptLines>,
    serial_output: SerialOutput,
    fw_cfg: Arc<FwCfgPorts>,
    cmos: Arc<CmosPorts>,
    i8042: Arc<I8042Port>,
    bus: Arc<IoBus>,
}

impl Devices {
    /// Builds every device and the bus that carries them.
    pub fn new(cfg: DeviceConfig, lines: Arc<dyn InterruptLines>) -> Result<Self, BusError> {
        let irq = SerialIrq {
            lines: lines.clone(),
        };
        let serial_output = cfg.serial.clone();
        let serial = Arc::new(SerialPort(Mutex::new(Serial::new(
            irq,
            SerialWriter::from(cfg.serial),
        ))));
        let mut bus = IoBus::new();
        bus.register_pio(SERIAL_PORT, SERIAL_PORTS, serial.clone())?;
        bus.register_pio(
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORTS,
            Arc::new(DebugExit(cfg.on_debug_exit)),
        )?;
        let fw_cfg = Arc::new(FwCfgPorts(Mutex::new(FwCfg::new(cfg.cpus, cfg.ram_size))));
        bus.register_pio(FW_CFG_SELECTOR_PORT, 2, fw_cfg.clone())?;
        bus.register_pio(
            TESTDEV_IRQ_PORT,
            IRQ_LINES as u16,
            Arc::new(TestDevLines(lines.clone())),
        )?;
        bus.register_pio(MSI_DOORBELL_PORT, 4, Arc::new(MsiDoorbell(lines.clone())))?;
        let (i8042_data, i8042_command) = I8042Port::pair(cfg.on_reset);
        let i8042 = Arc::new(i8042_data);
        bus.register_pio(I8042_DATA_PORT, 1, i8042.clone())?;
        bus.register_pio(I8042_COMMAND_PORT, 1, Arc::new(i8042_command))?;
        let cmos = Arc::new(CmosPorts::default());
        bus.register_pio(CMOS_PORT, CMOS_PORTS, cmos.clone())?;
        Ok(Self {
            serial,
            lines,
            serial_output,
            fw_cfg,
            cmos,
            i8042,
            bus: Arc::new(bus),
        })
    }

    /// Every device's state (snapshots; the VM paused). pc-testdev keeps none: its lines'
    /// levels are the interrupt chip's.
    pub fn save_state(&self) -> DeviceState {
        let s = lock(&self.serial.0).state();
        let (selected, offset) = {
            let f = lock(&self.fw_cfg.0);
            (f.selected, f.offset as u64)
        };
        let (cmos_ram, cmos_index) = self.cmos.lock().state();
        let (i8042_ctr, i8042_output, i8042_pending) = self.i8042.lock().state();
        DeviceState {
            serial: SerialRegs {
                baud_divisor_low: s.baud_divisor_low,
                baud_divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                in_buffer: s.in_buffer,
            },
            fw_cfg_selected: selected,
            fw_cfg_offset: offset,
            cmos_ram,
            cmos_index,
            i8042_ctr,
            i8042_output,
            i8042_pending,
        }
    }

    /// Restores [`Self::save_state`] before the VM runs. The UART is rebuilt with the same
    /// interrupt line and output; an over-full receive FIFO is refused.
    pub fn restore_state(&self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let r = &state.serial;
        let regs = vm_superio::serial::SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        };
        let irq = SerialIrq {
            lines: self.lines.clone(),
        };
        let serial = Serial::from_state(
            &regs,
            irq,
            NoEvents,
            SerialWriter::from(self.serial_output.clone()),
        )
        .map_err(|e| DeviceStateError(format!("serial port: {e:?}")))?;
        *lock(&self.serial.0) = serial;
        {
            let mut f = lock(&self.fw_cfg.0);
            f.selected = state.fw_cfg_selected;
            f.offset = usize::try_from(state.fw_cfg_offset).unwrap_or(usize::MAX);
        }
        self.cmos.lock().restore(&state.cmos_ram, state.cmos_index);
        self.i8042.lock().restore(&(
            state.i8042_ctr,
            state.i8042_output.clone(),
            state.i8042_pending,
        ));
        Ok(())
    }

    /// The port-I/O and MMIO bus the vCPUs' exits go to.
    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// A port read through the bus, as a vCPU's `in` would do it (for host threads: tests,
    /// benchmarks).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.bus.pio_read(port, data);
    }

    /// A port write through the bus, as a vCPU's `out` would do it (for host threads: tests,
    /// benchmarks driving pc-testdev lines).
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.bus.pio_write(port, data);
    }

    /// Bytes typed into the serial port; returns how many fit in its FIFO.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial.0).enqueue_raw_bytes(bytes).unwrap_or(0)
    }
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

    /// Records every line change and every MSI.
    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, bool)>>, Mutex<Vec<(u64, u32)>>);

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
            address: u64,
            data: u32,
        ) -> Result<crate::backend::MsiDelivery, IrqchipError> {
            lock(&self.1).push((address, data));
            Ok(crate::backend::MsiDelivery::Delivered)
        }
    }

    /// The devices, the line recorder, the serial output and the debug-exit statuses.
    fn devices() -> (Devices, Arc<Lines>, SerialCapture, Arc<Mutex<Vec<i32>>>) {
        let lines = Arc::new(Lines::default());
        let capture = SerialCapture::new();
        let exits = Arc::new(Mutex::new(Vec::new()));
        let seen = exits.clone();
        let cfg = DeviceConfig {
            cpus: 4,
            ram_size: 128 << 20,
            serial: SerialOutput::Capture(capture.clone()),
            on_debug_exit: Box::new(move |status| lock(&seen).push(status)),
            on_reset: Box::new(|| {}),
        };
        let devices = Devices::new(cfg, lines.clone()).unwrap();
        (devices, lines, capture, exits)
    }

    fn read_fw_cfg(d: &Devices, key: u16, len: usize) -> Vec<u8> {
        d.bus().pio_write(FW_CFG_SELECTOR_PORT, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0];
                d.bus().pio_read(FW_CFG_DATA_PORT, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn debug_exit_status_is_value_shifted_with_low_bit_set() {
        let (d, _, _, exits) = devices();
        d.bus().pio_write(DEBUG_EXIT_PORT, &0u32.to_le_bytes());
        d.bus().pio_write(DEBUG_EXIT_PORT, &0x10u32.to_le_bytes());
        d.bus().pio_write(DEBUG_EXIT_PORT, &[3]);
        d.bus().pio_write(DEBUG_EXIT_PORT + 1, &[3]);
        assert_eq!(*lock(&exits), vec![1, 0x21, 7], "only the base port counts");
        assert_eq!(debug_exit_status(u32::MAX), 0xFF);
    }

    #[test]
    fn serial_bytes_reach_the_output() {
        let (d, _, capture, _) = devices();
        for b in b"PASS hello\n" {
            d.bus().pio_write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(capture.text(), "PASS hello\n");
    }

    #[test]
    fn serial_thr_empty_interrupt_pulses_line_4_16550_ier() {
        let (d, lines, ..) = devices();
        d.bus().pio_write(SERIAL_PORT + 1, &[0x02]); // IER: THR empty interrupt
        let seen = lock(&lines.0).clone();
        assert_eq!(seen, vec![(4, true), (4, false)]);
    }

    #[test]
    fn serial_input_is_readable_from_the_data_port() {
        let (d, ..) = devices();
        assert_eq!(d.serial_input(b"x"), 1);
        let mut lsr = [0];
        d.bus().pio_read(SERIAL_PORT + 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0];
        d.bus().pio_read(SERIAL_PORT, &mut b);
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
        let (d, lines, ..) = devices();
        d.bus().pio_write(TESTDEV_IRQ_PORT + 10, &[1]);
        d.bus().pio_write(TESTDEV_IRQ_PORT + 10, &[0]);
        d.bus().pio_write(TESTDEV_IRQ_PORT + 23, &[1]);
        assert_eq!(
            lock(&lines.0).clone(),
            vec![(10, true), (10, false), (23, true)]
        );
        // Port 0x2018 is not a line.
        d.bus().pio_write(TESTDEV_IRQ_PORT + 24, &[1]);
        assert_eq!(lock(&lines.0).len(), 3);
    }

    #[test]
    fn msi_doorbell_reads_its_id_and_sends_one_msi_per_32_bit_write() {
        let (d, lines, ..) = devices();
        let mut id = [0u8; 4];
        d.bus().pio_read(MSI_DOORBELL_PORT, &mut id);
        assert_eq!(&id, b"MSI1");
        // Fixed, physical, edge, vector 0x62 to APIC ID 3; then lowest priority (data bit 8),
        // logical (bit 16) with the redirection hint (bit 17) to logical ID 0x0F.
        d.bus()
            .pio_write(MSI_DOORBELL_PORT, &(3u32 << 24 | 0x62).to_le_bytes());
        let lowest = 0x0Fu32 << 24 | 1 << 17 | 1 << 16 | 1 << 8 | 0x41;
        d.bus().pio_write(MSI_DOORBELL_PORT, &lowest.to_le_bytes());
        assert_eq!(
            lock(&lines.1).clone(),
            vec![(0xFEE0_3000, 0x62), (0xFEE0_F00C, 0x141)]
        );
        // Dropped: a reserved bit (23:18), a narrow write, a write at another offset.
        d.bus()
            .pio_write(MSI_DOORBELL_PORT, &(1u32 << 20 | 0x62).to_le_bytes());
        d.bus().pio_write(MSI_DOORBELL_PORT, &[0x62, 0]);
        d.bus().pio_write(MSI_DOORBELL_PORT + 1, &[0x62, 0, 0]);
        assert_eq!(lock(&lines.1).len(), 2);
        assert!(lock(&lines.0).is_empty(), "no line moved");
    }

    #[test]
    fn unclaimed_ports_and_mmio_read_all_ones() {
        let (d, _, _, exits) = devices();
        let mut data = [0u8; 4];
        d.bus().pio_read(0x1234, &mut data);
        assert_eq!(data, [0xFF; 4]);
        d.bus().pio_write(0x1234, &[1, 2]);
        assert!(lock(&exits).is_empty());
        let mut data = [0u8; 8];
        d.bus().mmio_read(0xE000_0000, &mut data);
        assert_eq!(data, [0xFF; 8]);
    }
}
