//! The PC's CMOS RTC (Motorola MC146818A, as every PC chipset integrates it) at ports 0x70
//! (index, bit 7 = NMI disable) and 0x71 (data): the time of day from the host's clock, the
//! status registers A-D, the century byte, and 128 bytes of CMOS RAM for everything else.
//!
//! Linux reads the time once at boot (`mc146818_get_time`: it waits while status A's
//! update-in-progress bit is set, then reads the time registers in the format status B selects)
//! and checks status D's valid-RAM bit. No alarm, periodic or update interrupt is modelled (IRQ
//! 8 is never raised): Linux's clock events come from the LAPIC timer. Writes to the time
//! registers are kept in CMOS RAM but do not change the time read back (the guest cannot set the
//! host's clock; a guest that wants another time keeps its own offset, as Linux does with NTP).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

pub const CMOS_PORT: u16 = 0x70;
pub const CMOS_PORTS: u16 = 2;

/// Register indexes (MC146818A datasheet, "Address map"; 0x32 is the PC/AT century byte, which
/// the FADT's CENTURY field may name).
mod reg {
    pub const SECONDS: u8 = 0x00;
    pub const MINUTES: u8 = 0x02;
    pub const HOURS: u8 = 0x04;
    pub const DAY_OF_WEEK: u8 = 0x06;
    pub const DAY_OF_MONTH: u8 = 0x07;
    pub const MONTH: u8 = 0x08;
    pub const YEAR: u8 = 0x09;
    pub const STATUS_A: u8 = 0x0A;
    pub const STATUS_B: u8 = 0x0B;
    pub const STATUS_C: u8 = 0x0C;
    pub const STATUS_D: u8 = 0x0D;
    pub const CENTURY: u8 = 0x32;
}

/// Status A: divider 010 (32.768 kHz time base), rate 0110 (1024 Hz), UIP (bit 7) never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode (bit 1); data mode BCD (bit 2 clear), as a PC BIOS leaves it.
const STATUS_B_24H: u8 = 1 << 1;
const STATUS_B_BINARY: u8 = 1 << 2;
/// Status D bit 7: valid RAM and time (the battery is good).
const STATUS_D_VRT: u8 = 1 << 7;
/// Hours register bit 7 in 12-hour mode: PM.
const HOURS_PM: u8 = 1 << 7;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    /// 1 = Sunday .. 7 = Saturday (the RTC's convention).
    pub weekday: u8,
}

impl DateTime {
    /// The UTC date and time `secs` seconds after 1970-01-01 00:00:00 (proleptic Gregorian
    /// calendar, days counted in 400-year eras of 146097 days).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // 1970-01-01 was a Thursday (5 in 1..=7 from Sunday).
        let weekday = ((days + 4) % 7) as u8 + 1;
        // Shift the epoch to 0000-03-01, so that leap days end a year.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday,
        }
    }

    fn now() -> Self {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_unix(secs)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The register file: CMOS RAM plus the selected index.
#[derive(Debug)]
pub struct Cmos {
    ram: [u8; 128],
    index: u8,
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0; 128];
        ram[usize::from(reg::STATUS_A)] = STATUS_A_DEFAULT;
        ram[usize::from(reg::STATUS_B)] = STATUS_B_24H;
        ram[usize::from(reg::STATUS_D)] = STATUS_D_VRT;
        Self { ram, index: 0 }
    }
}

impl Cmos {
    /// The RAM and the selected index (snapshots).
    pub fn state(&self) -> (Vec<u8>, u8) {
        (self.ram.to_vec(), self.index)
    }

    /// Restores [`Self::state`]: `ram` must have 128 bytes (a snapshot's checks say so), else
    /// nothing changes.
    pub fn restore(&mut self, ram: &[u8], index: u8) {
        if let Ok(ram) = ram.try_into() {
            self.ram = ram;
            self.index = index & 0x7F;
        }
    }

    /// Port 0x70: bits 6:0 select the register; bit 7 (NMI disable) has no effect here.
    pub fn select(&mut self, value: u8) {
        self.index = value & 0x7F;
    }

    /// Port 0x71 read of the selected register, with the time taken at `now`.
    pub fn read(&self, now: &DateTime) -> u8 {
        let b = self.ram[usize::from(reg::STATUS_B)];
        let fmt = |v: u8| {
            if b & STATUS_B_BINARY != 0 {
                v
            } else {
                to_bcd(v)
            }
        };
        match self.index {
            reg::SECONDS => fmt(now.second),
            reg::MINUTES => fmt(now.minute),
            reg::HOURS => self.hours(now.hour, b, fmt),
            reg::DAY_OF_WEEK => fmt(now.weekday),
            reg::DAY_OF_MONTH => fmt(now.day),
            reg::MONTH => fmt(now.month),
            reg::YEAR => fmt((now.year % 100) as u8),
            reg::CENTURY => fmt((now.year / 100 % 100) as u8),
            // Status C: no interrupt flags (no interrupt is modelled); reading clears it anyway.
            reg::STATUS_C => 0,
            reg::STATUS_D => STATUS_D_VRT,
            i => self.ram[usize::from(i)],
        }
    }

    /// 12-hour mode: 1-12 with bit 7 = PM (datasheet, table 3).
    fn hours(&self, hour: u8, b: u8, fmt: impl Fn(u8) -> u8) -> u8 {
        if b & STATUS_B_24H != 0 {
            return fmt(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        fmt(h12) | if hour >= 12 { HOURS_PM } else { 0 }
    }

    /// Port 0x71 write: stored, except the read-only status C and D (and UIP in status A).
    pub fn write(&mut self, value: u8) {
        match self.index {
            reg::STATUS_C | reg::STATUS_D => {}
            reg::STATUS_A => self.ram[usize::from(reg::STATUS_A)] = value & 0x7F,
            i => self.ram[usize::from(i)] = value,
        }
    }
}

/// The RTC on the I/O bus.
#[derive(Debug, Default)]
pub struct CmosPorts(Mutex<Cmos>);

impl CmosPorts {
    /// The register file, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Cmos> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DevicePio for CmosPorts {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let cmos = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = DateTime::now();
        for (byte, offset) in data.iter_mut().zip(offset..) {
            // The index port reads back as all ones on most chipsets (it is write-only).
            *byte = if offset == 1 { cmos.read(&now) } else { 0xFF };
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let mut cmos = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (byte, offset) in data.iter().zip(offset..) {
            match offset {
                0 => cmos.select(*byte),
                1 => cmos.write(*byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, index: u8, now: &DateTime) -> u8 {
        c.select(index | 0x80);
        c.read(now)
    }

    #[test]
    fn unix_time_to_civil_date() {
        let t = DateTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        let t = DateTime::from_unix(951_827_696);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2000, 2, 29, 12, 34, 56, 3)
        );
        // 2026-12-01 23:59:59 UTC, a Tuesday.
        let t = DateTime::from_unix(1_796_169_599);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (2026, 12, 1, 23, 3)
        );
    }

    #[test]
    fn time_reads_in_bcd_24h_by_default_with_century() {
        let mut c = Cmos::default();
        let now = DateTime::from_unix(951_827_696);
        assert_eq!(read(&mut c, reg::SECONDS, &now), 0x56);
        assert_eq!(read(&mut c, reg::HOURS, &now), 0x12);
        assert_eq!(read(&mut c, reg::MONTH, &now), 0x02);
        assert_eq!(read(&mut c, reg::YEAR, &now), 0x00);
        assert_eq!(read(&mut c, reg::CENTURY, &now), 0x20);
        assert_eq!(
            read(&mut c, reg::STATUS_A, &now) & 0x80,
            0,
            "no update in progress"
        );
        assert_eq!(read(&mut c, reg::STATUS_D, &now), STATUS_D_VRT);
    }

    #[test]
    fn status_b_selects_binary_and_12_hour_modes() {
        let mut c = Cmos::default();
        let now = DateTime::from_unix(951_827_696 + 3600); // 13:34:56
        c.select(reg::STATUS_B);
        c.write(STATUS_B_BINARY);
        assert_eq!(read(&mut c, reg::HOURS, &now), 1 | HOURS_PM);
        assert_eq!(read(&mut c, reg::MINUTES, &now), 34);
        c.select(reg::STATUS_B);
        c.write(STATUS_B_BINARY | STATUS_B_24H);
        assert_eq!(read(&mut c, reg::HOURS, &now), 13);
    }

    #[test]
    fn ram_is_kept_and_status_c_d_are_read_only() {
        let mut c = Cmos::default();
        let now = DateTime::from_unix(0);
        c.select(0x40);
        c.write(0x5A);
        assert_eq!(read(&mut c, 0x40, &now), 0x5A);
        c.select(reg::STATUS_D);
        c.write(0);
        assert_eq!(read(&mut c, reg::STATUS_D, &now), STATUS_D_VRT);
    }
}
