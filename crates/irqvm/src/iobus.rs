//! The bus that port-I/O and MMIO exits reach devices through: rust-vmm's `vm-device`
//! (`IoManager`, a `BusRange -> Arc<dyn DevicePio/DeviceMmio>` map per address space), plus the
//! one rule of an ISA/PCI bus with nothing decoding an address: reads of unclaimed addresses
//! return all ones, writes to them are dropped.
//!
//! An access is claimed only if it lies wholly inside one device's range (`vm-device`'s
//! `check_access`); one that starts in a range and runs past its end is unclaimed. Devices see
//! their range's base and the offset of the access in it.
//!
//! The interrupt controllers' own registers are not on this bus: the backend's
//! `VcpuIrqchip::handle_exit` sees every exit first (see `crate::vcpu`). The xAPIC page is
//! per-vCPU, relocatable by each vCPU's IA32_APIC_BASE and owned by the vCPU's thread without a
//! lock, which a VM-wide map of shared devices cannot express without a lookup, a lock or an
//! `Arc` clone on the hottest exit of `user` mode; the IOAPIC window and the PIC's ports stay with
//! it so that each backend keeps its controllers in one place (and `split` can report a failed
//! route update as an error, which a bus device cannot).

use std::sync::Arc;

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

/// A port-I/O device as the bus holds it.
pub type PioDevice = Arc<dyn DevicePio + Send + Sync>;
/// An MMIO device as the bus holds it.
pub type MmioDevice = Arc<dyn DeviceMmio + Send + Sync>;

/// Why a device could not be placed on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("bad {space} range: base {base:#x}, size {size:#x}")]
    BadRange {
        space: &'static str,
        base: u64,
        size: u64,
    },
    /// The range overlaps a device already registered.
    #[error("{space} range base {base:#x}, size {size:#x} overlaps another device")]
    Overlap {
        space: &'static str,
        base: u64,
        size: u64,
    },
}

/// The VM's port-I/O and MMIO address spaces. Built before the vCPUs start, then shared
/// read-only by every vCPU thread (`&self` dispatch, no lock: each device locks what it needs).
#[derive(Default)]
pub struct IoBus {
    io: IoManager,
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claims ports `base .. base + size` for `device`.
    pub fn register_pio(
        &mut self,
        base: u16,
        size: u16,
        device: PioDevice,
    ) -> Result<(), BusError> {
        let bad = || BusError::BadRange {
            space: "port",
            base: base.into(),
            size: size.into(),
        };
        let range = PioRange::new(PioAddress(base), size).map_err(|_| bad())?;
        self.io
            .register_pio(range, device)
            .map_err(|_| BusError::Overlap {
                space: "port",
                base: base.into(),
                size: size.into(),
            })
    }

    /// Claims guest-physical `base .. base + size` for `device`.
    pub fn register_mmio(
        &mut self,
        base: u64,
        size: u64,
        device: MmioDevice,
    ) -> Result<(), BusError> {
        let bad = || BusError::BadRange {
            space: "MMIO",
            base,
            size,
        };
        let range = MmioRange::new(MmioAddress(base), size).map_err(|_| bad())?;
        self.io
            .register_mmio(range, device)
            .map_err(|_| BusError::Overlap {
                space: "MMIO",
                base,
                size,
            })
    }

    /// A guest `in`: the device's answer, or all ones if no device claims the access.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            tracing::trace!(port, len = data.len(), "read of an unclaimed port");
            data.fill(0xFF);
        }
    }

    /// A guest `out`: to the device, or dropped if no device claims the access.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.io.pio_write(PioAddress(port), data).is_err() {
            tracing::trace!(port, ?data, "write to an unclaimed port");
        }
    }

    /// A guest MMIO read: the device's answer, or all ones if no device claims it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_err() {
            tracing::debug!(addr, len = data.len(), "read of unclaimed MMIO");
            data.fill(0xFF);
        }
    }

    /// A guest MMIO write: to the device, or dropped if no device claims it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_err() {
            tracing::debug!(addr, ?data, "write to unclaimed MMIO");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::bus::PioAddressOffset;

    /// Records the (base, offset, bytes) of every write and answers reads with its offset.
    #[derive(Default)]
    struct Probe(Mutex<Vec<(u16, u16, Vec<u8>)>>);

    impl DevicePio for Probe {
        fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(offset as u8);
        }

        fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.0.lock().unwrap().push((base.0, offset, data.to_vec()));
        }
    }

    #[test]
    fn claimed_ports_reach_the_device_with_their_offset() {
        let probe = Arc::new(Probe::default());
        let mut bus = IoBus::new();
        bus.register_pio(0x3F8, 8, probe.clone()).unwrap();
        bus.pio_write(0x3F9, &[7, 8]);
        assert_eq!(*probe.0.lock().unwrap(), vec![(0x3F8, 1, vec![7, 8])]);
        let mut data = [0; 2];
        bus.pio_read(0x3FD, &mut data);
        assert_eq!(data, [5, 5]);
    }

    /// ISA semantics: nothing decodes the address, so reads float high and writes vanish; an
    /// access running past a device's range is nobody's.
    #[test]
    fn unclaimed_accesses_read_all_ones_and_drop_writes() {
        let probe = Arc::new(Probe::default());
        let mut bus = IoBus::new();
        bus.register_pio(0x3F8, 8, probe.clone()).unwrap();
        let mut data = [0u8; 4];
        bus.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xFF; 4]);
        let mut data = [0u8; 2];
        bus.pio_read(0x3FF, &mut data);
        assert_eq!(data, [0xFF; 2], "straddles the end of the range");
        bus.pio_write(0x3F7, &[1, 2]);
        assert!(probe.0.lock().unwrap().is_empty());
        let mut data = [0u8; 8];
        bus.mmio_read(0xE000_0000, &mut data);
        assert_eq!(data, [0xFF; 8]);
        bus.mmio_write(0xE000_0000, &data);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = IoBus::new();
        bus.register_pio(0x510, 2, Arc::new(Probe::default()))
            .unwrap();
        assert!(matches!(
            bus.register_pio(0x511, 1, Arc::new(Probe::default())),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.register_pio(0x600, 0, Arc::new(Probe::default())),
            Err(BusError::BadRange { .. })
        ));
    }
}
