//! ACPI tables for booting Linux (ACPI 6.5 chapter 5): RSDP, XSDT, RSDT, FADT, MADT and DSDT,
//! built with the `acpi_tables` crate and written into the PC BIOS area 0xE0000-0xFFFFF, where
//! Linux finds the RSDP by scanning (ACPI 6.5 §5.2.5.1) when no boot protocol passes its address
//! (PVH's `hvm_start_info.rsdp_paddr` and the zero page's `acpi_rsdp_addr` do: see
//! [`crate::loader::BootPlatform`]).
//!
//! # XSDT and RSDT
//!
//! The RSDP (revision 2) points to both: the XSDT (64-bit entries), which an ACPI 2.0 OS uses
//! (Linux's ACPICA takes the XSDT whenever the RSDP's revision is above 1 and its address is set),
//! and an RSDT (32-bit entries) listing the same tables, for readers that follow only the RSDP's
//! ACPI 1.0 field. kvm-unit-tests' library is one: its `find_acpi_table_addr` (the FADT for the
//! PM timer test of `vmexit`, the FADT and FACS for `s3`) walked only the RSDT until the library
//! learnt the XSDT, and a multiboot test finds the RSDP the same way Linux does, by scanning
//! 0xE0000-0xFFFFF (docs/kvm-unit-tests.md). Every table sits below 1 MiB, so 32 bits hold its
//! address.
//!
//! # A hardware-reduced FADT, as Cloud Hypervisor's
//!
//! The FADT sets HW_REDUCED_ACPI (ACPI 6.5 §4.1): no PM1 event/control blocks, no PM timer, no
//! GPE blocks, no SCI, no FACS. The alternative, a PC FADT with an SCI on IRQ 9, would make Linux
//! drive fixed hardware irqvm does not emulate (PM1a at some port, the 3.58 MHz PM timer it
//! would calibrate against). A hardware-reduced platform is also what the issue asks for on the
//! timer side: Linux's `acpi_generic_reduced_hw_init` (arch/x86/kernel/acpi/boot.c) skips the
//! PIT-based timer setup and the legacy PIC (it installs `null_legacy_pic`), so Linux runs on the
//! LAPIC timer (TSC deadline) with ISA interrupts through the IOAPIC, and needs no PIT
//! calibration when CPUID gives the TSC frequency. Without an SCI there is no IRQ 9 override.
//! IAPC_BOOT_ARCH still describes the PC: legacy (ISA) devices, an 8042 if the VMM has one, no
//! VGA, and no CMOS RTC only if the VMM lacks one.
//!
//! # MADT
//!
//! One Processor Local APIC entry per vCPU (type 0), or a Processor Local x2APIC entry (type 9,
//! ACPI 6.5 §5.2.12.12) for an APIC ID of 255 or more, which the 8-bit field cannot hold (0xFF is
//! the broadcast ID); the IOAPIC at 0xFEC00000 with GSI base 0; the ISA interrupt source
//! override of this PC, IRQ 0 -> GSI 2 (crates/irqchip/src/routing.rs: the PIT is wired to
//! IOAPIC pin 2); LINT1 of every CPU as NMI (type 4, and type 0x0A for x2APIC CPUs), as a PC
//! wires it. PCAT_COMPAT (flags bit 0) is set iff the dual 8259 exists, so an OS knows to mask
//! it before using the IOAPIC.
//!
//! # DSDT
//!
//! The DSDT must exist (the FADT points to it, ACPICA loads it) and describes the ISA devices
//! of this PC, each with its ports and its ISA IRQ (edge, active high, as the ISA bus drives
//! them; ACPI 6.5 §6.4.3.6, Extended Interrupt Descriptor, GSI = ISA IRQ: irqvm's IOAPIC pins
//! 1-15 are the ISA IRQs, crates/irqchip/src/routing.rs):
//!
//! | device | _HID | ports | IRQ |
//! |---|---|---|---|
//! | COM1 | PNP0501 (16550A) | 0x3F8-0x3FF | 4 |
//! | KBD | PNP0303 (8042 keyboard port), if the 8042 exists | 0x60, 0x64 | 1 |
//! | MOU | PNP0F13 (8042 aux port), if the 8042 exists | none: it shares the 8042's | 12 |
//! | RTC | PNP0B00 (AT CMOS RTC), if the CMOS RTC exists | 0x70-0x71 | 8 |
//!
//! On a hardware-reduced platform Linux has no legacy IRQs (no PIC: `nr_legacy_irqs()` is 0), so
//! a driver that asks for ISA IRQ n without a firmware description gets nothing: before these
//! entries Linux's i8042 and rtc_cmos probes failed with -EINVAL ("probe of rtc_cmos failed with
//! error -22"). Through PNPACPI each _CRS interrupt is registered as a GSI on the IOAPIC, and
//! the serial console, i8042 and rtc_cmos drivers bind to these devices by _HID. The 8042's
//! IRQs are described though irqvm's controller has no keyboard or mouse behind it and raises
//! neither (crate::i8042): the lines are the PC's, and Linux handles a silent port.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::memory::GuestRam;

/// Where the tables go: the BIOS area Linux scans for the RSDP (on 16-byte boundaries).
pub const ACPI_BASE: u64 = 0xE_0000;
const ACPI_END: u64 = 0x10_0000;
/// The RSDP is the first table, so a scan from 0xE0000 finds it at once.
pub const RSDP_ADDR: u64 = ACPI_BASE;
/// The RSDP's length with the ACPI 2.0 fields (ACPI 6.5 table 5.3).
const RSDP_LEN: usize = 36;
/// The LAPIC and IOAPIC MMIO bases (SDM vol. 3 §11.4.1; 82093AA datasheet §3.0).
pub const LAPIC_BASE: u32 = 0xFEE0_0000;
pub const IOAPIC_BASE: u32 = 0xFEC0_0000;
/// ISA IRQ 0 (the PIT) reaches IOAPIC input 2 (crates/irqchip/src/routing.rs).
const TIMER_ISA_IRQ: u8 = 0;
const TIMER_GSI: u32 = 2;
/// COM1: ports 0x3F8-0x3FF, ISA IRQ 4.
const COM1_PORT: u16 = 0x3F8;
const COM1_IRQ: u32 = 4;
/// The 8042's ports (crate::i8042) and ISA IRQs: 1 for the keyboard port, 12 for the aux port.
const I8042_DATA_PORT: u16 = crate::i8042::I8042_DATA_PORT;
const I8042_COMMAND_PORT: u16 = crate::i8042::I8042_COMMAND_PORT;
const I8042_KBD_IRQ: u32 = 1;
const I8042_AUX_IRQ: u32 = 12;
/// The CMOS RTC: index and data ports 0x70/0x71 (crate::cmos), ISA IRQ 8.
const RTC_PORT: u16 = crate::cmos::CMOS_PORT;
const RTC_PORTS: u8 = crate::cmos::CMOS_PORTS as u8;
const RTC_IRQ: u32 = 8;
/// APIC IDs from here on need x2APIC entries: 0xFF is the xAPIC broadcast ID.
const X2APIC_FROM: u32 = 0xFF;
/// More vCPUs than KVM allows (KVM_MAX_VCPUS is 1024 on x86), so a bad count is an error.
pub const MAX_CPUS: usize = 1024;

const OEM_ID: [u8; 6] = *b"IRQVM ";
const OEM_TABLE_ID: [u8; 8] = *b"IRQVMPC ";
const OEM_REVISION: u32 = 1;

/// MADT flags bit 0 (ACPI 6.5 table 5.20).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure types (ACPI 6.5 table 5.21).
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_LOCAL_X2APIC_NMI: u8 = 0x0A;
/// IAPC_BOOT_ARCH bits (ACPI 6.5 table 5.11).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// APIC ID of each vCPU, the boot CPU first (its index is the ACPI processor UID).
    pub apic_ids: Vec<u32>,
    /// The IOAPIC's ID (`irqchip::ioapic::IoApicConfig::id`).
    pub ioapic_id: u8,
    /// The dual 8259 PIC exists (the `user` and `kernel` irqchip modes): MADT PCAT_COMPAT.
    pub pic: bool,
    /// An 8042 keyboard controller exists (IAPC_BOOT_ARCH bit 1).
    pub i8042: bool,
    /// A CMOS RTC exists at 0x70/0x71 (otherwise IAPC_BOOT_ARCH says it does not).
    pub cmos_rtc: bool,
}

/// Why the tables cannot be built or written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    #[error("no vCPU to describe")]
    NoCpus,
    #[error("{0} vCPUs, more than the {MAX_CPUS} the MADT is built for")]
    TooManyCpus(usize),
    #[error("APIC ID {0} is given to two vCPUs")]
    DuplicateApicId(u32),
    #[error("the ACPI tables end at {end:#x}, beyond the BIOS area (0x100000)")]
    TooLarge { end: u64 },
    #[error("cannot write the ACPI tables at {addr:#x}: outside guest RAM")]
    OutOfRam { addr: u64 },
    #[error("the {what} at {addr:#x} is beyond the RSDT's 32-bit addresses")]
    Above4G { what: &'static str, addr: u64 },
}

/// One table and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The signature ("RSD PTR " for the RSDP).
    pub name: &'static str,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The tables in address order, RSDP first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub tables: Vec<Table>,
}

impl AcpiTables {
    pub fn get(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }
}

/// Hands out table addresses in the BIOS area, 16-byte aligned (the RSDP must be; the others
/// need only byte alignment, but aligned tables are easier to read in a dump).
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let addr = self.next;
        let end = addr + len as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge { end });
        }
        self.next = end.next_multiple_of(16);
        Ok(addr)
    }
}

/// Builds every table for `config`, with its final address.
pub fn build(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    check_cpus(&config.apic_ids)?;
    let mut placer = Placer { next: RSDP_ADDR };
    let rsdp_addr = placer.place(RSDP_LEN)?;
    let dsdt = bytes(&dsdt(config));
    let madt = bytes(&madt(config));
    // The XSDT lists two tables: its size is known before their addresses.
    let xsdt_len = 36 + 2 * 8;
    let xsdt_addr = placer.place(xsdt_len)?;
    let rsdt_len = 36 + 2 * 4;
    let rsdt_addr = placer.place(rsdt_len)?;
    let dsdt_addr = placer.place(dsdt.len())?;
    let fadt = bytes(&fadt(config, dsdt_addr));
    let fadt_addr = placer.place(fadt.len())?;
    let madt_addr = placer.place(madt.len())?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), xsdt_len);
    let rsdt = rsdt(&[fadt_addr, madt_addr])?;
    debug_assert_eq!(rsdt.len(), rsdt_len);
    let rsdp = rsdp(xsdt_addr, rsdt_addr)?;
    let table = |name, addr, bytes| Table { name, addr, bytes };
    Ok(AcpiTables {
        tables: vec![
            table("RSD PTR ", rsdp_addr, rsdp),
            table("XSDT", xsdt_addr, xsdt),
            table("RSDT", rsdt_addr, rsdt),
            table("DSDT", dsdt_addr, dsdt),
            table("FACP", fadt_addr, fadt),
            table("APIC", madt_addr, madt),
        ],
    })
}

/// Builds the tables and writes them into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestRam, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build(config)?;
    for t in &tables.tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|_| AcpiError::OutOfRam { addr: t.addr })?;
    }
    Ok(RSDP_ADDR)
}

fn check_cpus(apic_ids: &[u32]) -> Result<(), AcpiError> {
    if apic_ids.is_empty() {
        return Err(AcpiError::NoCpus);
    }
    if apic_ids.len() > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(apic_ids.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for &id in apic_ids {
        if !seen.insert(id) {
            return Err(AcpiError::DuplicateApicId(id));
        }
    }
    Ok(())
}

/// The RSDP (ACPI 6.5 §5.2.5.3), revision 2, with both the RSDT's 32-bit address and the XSDT's
/// 64-bit one; the first checksum covers the ACPI 1.0 part (bytes 0-19), the extended one all 36
/// bytes. The crate's `Rsdp` leaves the RSDT address at 0, hence this one.
fn rsdp(xsdt_addr: u64, rsdt_addr: u64) -> Result<Vec<u8>, AcpiError> {
    let rsdt_addr = u32::try_from(rsdt_addr).map_err(|_| AcpiError::Above4G {
        what: "RSDT",
        addr: rsdt_addr,
    })?;
    let mut b = Vec::with_capacity(RSDP_LEN);
    b.extend_from_slice(b"RSD PTR ");
    b.push(0); // checksum, below
    b.extend_from_slice(&OEM_ID);
    b.push(2); // revision: ACPI 2.0 and later
    b.extend_from_slice(&rsdt_addr.to_le_bytes());
    b.extend_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    b.extend_from_slice(&xsdt_addr.to_le_bytes());
    b.push(0); // extended checksum, below
    b.extend_from_slice(&[0; 3]);
    debug_assert_eq!(b.len(), RSDP_LEN);
    b[8] = checksum(&b[..20]);
    b[32] = checksum(&b);
    Ok(b)
}

/// The RSDT (ACPI 6.5 §5.2.7): the same tables as the XSDT, as 32-bit addresses.
fn rsdt(entries: &[u64]) -> Result<Vec<u8>, AcpiError> {
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &addr in entries {
        let entry = u32::try_from(addr).map_err(|_| AcpiError::Above4G {
            what: "table",
            addr,
        })?;
        rsdt.append(entry);
    }
    Ok(rsdt.as_slice().to_vec())
}

/// The byte that makes `bytes` (with that byte 0) sum to 0 modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The FADT: hardware-reduced (see the module comment), DSDT through X_DSDT.
fn fadt(config: &AcpiConfig, dsdt_addr: u64) -> impl Aml {
    let mut boot_arch = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT;
    if config.i8042 {
        boot_arch |= BOOT_ARCH_8042;
    }
    if !config.cmos_rtc {
        boot_arch |= BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    }
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep button (ACPI 6.5 table 5.10: set = absent or a control method).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.iapc_boot_arch = boot_arch.into();
    builder.finalize()
}

/// Interrupt Source Override (ACPI 6.5 §5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

/// Processor Local x2APIC (ACPI 6.5 §5.2.12.12).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalX2Apic {
    r#type: u8,
    length: u8,
    reserved: U16<LE>,
    x2apic_id: U32<LE>,
    flags: U32<LE>,
    uid: U32<LE>,
}

/// Local APIC NMI (ACPI 6.5 §5.2.12.7).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    uid: u8,
    flags: U16<LE>,
    lint: u8,
}

/// Local x2APIC NMI (ACPI 6.5 §5.2.12.13).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalX2ApicNmi {
    r#type: u8,
    length: u8,
    flags: U16<LE>,
    uid: U32<LE>,
    lint: u8,
    reserved: [u8; 3],
}

macro_rules! madt_entry_as_aml {
    ($($t:ty),*) => {$(
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    )*};
}
madt_entry_as_aml!(
    InterruptSourceOverride,
    LocalX2Apic,
    LocalApicNmi,
    LocalX2ApicNmi
);

/// MPS INTI flags "conforms to the bus" (ACPI 6.5 table 5.26): ISA is edge, active high.
const INTI_CONFORMS: u16 = 0;
/// Every processor (the UID in the NMI entries).
const ALL_PROCESSORS_UID: u8 = 0xFF;
/// LINT1 carries NMI on a PC.
const NMI_LINT: u8 = 1;

/// The MADT (see the module comment). The header flags are patched in after construction: the
/// builder always starts them at 0.
fn madt(config: &AcpiConfig) -> impl Aml {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE),
    );
    let mut any_x2apic = false;
    for (uid, &apic_id) in config.apic_ids.iter().enumerate() {
        match (u8::try_from(uid), u8::try_from(apic_id)) {
            (Ok(uid), Ok(id)) if apic_id < X2APIC_FROM => {
                madt.add_structure(ProcessorLocalApic::new(uid, id, EnabledStatus::Enabled));
            }
            _ => {
                any_x2apic = true;
                madt.add_structure(LocalX2Apic {
                    r#type: MADT_LOCAL_X2APIC,
                    length: 16,
                    reserved: 0.into(),
                    x2apic_id: apic_id.into(),
                    flags: (EnabledStatus::Enabled as u32).into(),
                    uid: (uid as u32).into(),
                });
            }
        }
    }
    madt.add_structure(IoApic::new(config.ioapic_id, IOAPIC_BASE, 0));
    madt.add_structure(InterruptSourceOverride {
        r#type: MADT_INTERRUPT_SOURCE_OVERRIDE,
        length: 10,
        bus: 0, // ISA
        source: TIMER_ISA_IRQ,
        gsi: TIMER_GSI.into(),
        flags: INTI_CONFORMS.into(),
    });
    madt.add_structure(LocalApicNmi {
        r#type: MADT_LOCAL_APIC_NMI,
        length: 6,
        uid: ALL_PROCESSORS_UID,
        flags: INTI_CONFORMS.into(),
        lint: NMI_LINT,
    });
    if any_x2apic {
        madt.add_structure(LocalX2ApicNmi {
            r#type: MADT_LOCAL_X2APIC_NMI,
            length: 12,
            flags: INTI_CONFORMS.into(),
            uid: u32::MAX.into(),
            lint: NMI_LINT,
            reserved: [0; 3],
        });
    }
    MadtWithFlags {
        madt,
        flags: if config.pic { MADT_PCAT_COMPAT } else { 0 },
    }
}

/// The crate's MADT with its flags field (offset 40) set and the checksum fixed.
struct MadtWithFlags {
    madt: MADT,
    flags: u32,
}

impl Aml for MadtWithFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        const FLAGS_OFFSET: usize = 40;
        const CHECKSUM_OFFSET: usize = 9;
        let mut table = bytes(&self.madt);
        table[FLAGS_OFFSET..FLAGS_OFFSET + 4].copy_from_slice(&self.flags.to_le_bytes());
        table[CHECKSUM_OFFSET] = 0;
        let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        table[CHECKSUM_OFFSET] = sum.wrapping_neg();
        sink.vec(&table);
    }
}

/// The DSDT: the ISA devices (see the module comment). Revision 2: 64-bit AML integers.
fn dsdt(config: &AcpiConfig) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let com1 = aml::IO::new(COM1_PORT, COM1_PORT, 0, 8);
    isa_device(&mut dsdt, "COM1", "PNP0501", &[&com1], COM1_IRQ);
    if config.i8042 {
        let data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 0, 1);
        let command = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 0, 1);
        isa_device(
            &mut dsdt,
            "KBD_",
            "PNP0303",
            &[&data, &command],
            I8042_KBD_IRQ,
        );
        isa_device(&mut dsdt, "MOU_", "PNP0F13", &[], I8042_AUX_IRQ);
    }
    if config.cmos_rtc {
        let rtc = aml::IO::new(RTC_PORT, RTC_PORT, 0, RTC_PORTS);
        isa_device(&mut dsdt, "RTC_", "PNP0B00", &[&rtc], RTC_IRQ);
    }
    dsdt
}

/// Appends the ISA device `\_SB_.<name>` to `sink`: _HID, _UID 0 and a _CRS of its I/O ranges
/// and its ISA IRQ, edge-triggered and active high (ISA, "conforms to the bus").
fn isa_device(sink: &mut dyn AmlSink, name: &str, hid: &str, io: &[&aml::IO], irq: u32) {
    let hid = aml::EISAName::new(hid);
    let irq = aml::Interrupt::new(true, true, false, false, irq);
    let mut resources: Vec<&dyn Aml> = io.iter().map(|r| *r as &dyn Aml).collect();
    resources.push(&irq);
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), &hid);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let path = format!("_SB_.{name}");
    aml::Device::new(path.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
}

#[cfg(test)]
mod tests;
