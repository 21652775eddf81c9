//! The tables' structure (checksums, lengths, pointers, MADT entries), and `iasl -d` (ACPICA's
//! disassembler, Debian package acpica-tools) reading each without an error.

use super::*;
use crate::memory::create_guest_memory;

fn config(cpus: u32, pic: bool) -> AcpiConfig {
    AcpiConfig {
        apic_ids: (0..cpus).collect(),
        ioapic_id: 0,
        pic,
        i8042: true,
        cmos_rtc: true,
    }
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The MADT's interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        assert!(len >= 2 && at + len <= madt.len(), "entry at {at}");
        out.push((madt[at], &madt[at..at + len]));
        at += len;
    }
    out
}

#[test]
fn checksums_lengths_and_placement() {
    let tables = build(&config(4, true)).unwrap();
    let mut end = ACPI_BASE;
    for t in &tables.tables {
        assert!(t.addr >= end, "{} overlaps the previous table", t.name);
        end = t.addr + t.bytes.len() as u64;
        assert!(end <= 0x10_0000, "{}", t.name);
        assert_eq!(sum(&t.bytes), 0, "{} checksum", t.name);
        assert_eq!(&t.bytes[..t.name.len()], t.name.as_bytes());
    }
    let rsdp = &tables.get("RSD PTR ").unwrap().bytes;
    assert_eq!(tables.tables[0].addr, RSDP_ADDR);
    assert_eq!(RSDP_ADDR % 16, 0, "Linux scans 16-byte boundaries");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!((rsdp[15], u32_at(rsdp, 20)), (2, 36), "revision, length");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    for name in ["XSDT", "RSDT", "DSDT", "FACP", "APIC"] {
        let t = &tables.get(name).unwrap().bytes;
        assert_eq!(u32_at(t, 4) as usize, t.len(), "{name} length");
    }
}

#[test]
fn rsdp_rsdt_lists_the_xsdt_tables_as_32_bit_addresses() {
    let tables = build(&config(2, true)).unwrap();
    let addr = |n| tables.get(n).unwrap().addr;
    let rsdp = &tables.get("RSD PTR ").unwrap().bytes;
    assert_eq!(u64::from(u32_at(rsdp, 16)), addr("RSDT"));
    let rsdt = &tables.get("RSDT").unwrap().bytes;
    assert_eq!(
        (rsdt.len(), rsdt[8]),
        (36 + 8, 1),
        "two entries, revision 1"
    );
    assert_eq!(
        [u32_at(rsdt, 36), u32_at(rsdt, 40)].map(u64::from),
        [addr("FACP"), addr("APIC")]
    );
}

/// What kvm-unit-tests' `find_acpi_table_addr` does on a multiboot boot, in either generation of
/// its library: scan 0xE0000-0xFFFFF on 16-byte boundaries for "RSD PTR ", then walk the RSDT
/// (every generation) or, for an RSDP of revision 2 or more, the XSDT (the newer one), comparing
/// each entry's signature. Both walks find the FADT and the MADT in guest memory.
#[test]
fn a_scan_of_the_bios_area_finds_fadt_and_madt_through_rsdt_and_xsdt() {
    let mem = create_guest_memory(16 << 20).unwrap();
    write(&mem, &config(3, true)).unwrap();
    let read = |addr: u64, len: usize| {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    };
    let rsdp = (0xE_0000..0x10_0000u64)
        .step_by(16)
        .find(|&a| read(a, 8) == b"RSD PTR ")
        .expect("RSDP in the BIOS area");
    let rsdp = read(rsdp, 36);
    let walk = |root: u64, signature: &[u8; 4], entry: usize| {
        let header = read(root, 36);
        assert_eq!(&header[..4], signature);
        let table = read(root, u32_at(&header, 4) as usize);
        assert_eq!(sum(&table), 0);
        (36..table.len())
            .step_by(entry)
            .map(|at| match entry {
                4 => u64::from(u32_at(&table, at)),
                _ => u64_at(&table, at),
            })
            .map(|a| (String::from_utf8(read(a, 4)).unwrap(), a))
            .collect::<Vec<_>>()
    };
    let via_rsdt = walk(u64::from(u32_at(&rsdp, 16)), b"RSDT", 4);
    let via_xsdt = walk(u64_at(&rsdp, 24), b"XSDT", 8);
    assert_eq!(via_rsdt, via_xsdt);
    let names: Vec<&str> = via_rsdt.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["FACP", "APIC"]);
}

#[test]
fn pointers_rsdp_to_xsdt_to_fadt_madt_and_fadt_to_dsdt() {
    let tables = build(&config(2, true)).unwrap();
    let addr = |n| tables.get(n).unwrap().addr;
    let rsdp = &tables.get("RSD PTR ").unwrap().bytes;
    assert_eq!(u64_at(rsdp, 24), addr("XSDT"));
    let xsdt = &tables.get("XSDT").unwrap().bytes;
    assert_eq!(xsdt.len(), 36 + 16);
    assert_eq!(
        [u64_at(xsdt, 36), u64_at(xsdt, 44)],
        [addr("FACP"), addr("APIC")]
    );
    let fadt = &tables.get("FACP").unwrap().bytes;
    assert_eq!(fadt.len(), 276, "FADT 6.x length");
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT unused");
    assert_eq!(u64_at(fadt, 140), addr("DSDT"), "X_DSDT");
    assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
    let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
    assert_eq!(boot_arch, 0b111, "legacy devices, 8042, no VGA");
}

#[test]
fn madt_has_one_local_apic_per_cpu_the_ioapic_and_irq0_override() {
    for (cpus, pic) in [(1, true), (2, false), (4, true), (254, true)] {
        let tables = build(&config(cpus, pic)).unwrap();
        let madt = &tables.get("APIC").unwrap().bytes;
        assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(madt, 40), u32::from(pic), "PCAT_COMPAT iff 8259");
        let entries = madt_entries(madt);
        let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
        assert_eq!(lapics.len(), cpus as usize);
        for (i, (_, e)) in lapics.iter().enumerate() {
            assert_eq!((e[1], e[2], e[3], u32_at(e, 4)), (8, i as u8, i as u8, 1));
        }
        let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
        assert_eq!(ioapics.len(), 1);
        let io = ioapics[0].1;
        assert_eq!(
            (u32_at(io, 4), u32_at(io, 8)),
            (0xFEC0_0000, 0),
            "address, GSI base"
        );
        let isos: Vec<_> = entries.iter().filter(|e| e.0 == 2).collect();
        assert_eq!(isos.len(), 1);
        let iso = isos[0].1;
        assert_eq!((iso[1], iso[2], iso[3], u32_at(iso, 4)), (10, 0, 0, 2));
        assert!(entries
            .iter()
            .any(|e| e.0 == 4 && e.1[2] == 0xFF && e.1[5] == 1));
        assert!(!entries.iter().any(|e| e.0 == 9 || e.0 == 0x0A));
    }
}

#[test]
fn apic_ids_from_255_get_x2apic_entries() {
    let tables = build(&config(300, true)).unwrap();
    let madt = &tables.get("APIC").unwrap().bytes;
    let entries = madt_entries(madt);
    let xapic = entries.iter().filter(|e| e.0 == 0).count();
    let x2apic: Vec<_> = entries.iter().filter(|e| e.0 == 9).collect();
    assert_eq!((xapic, x2apic.len()), (255, 45));
    let first = x2apic[0].1;
    assert_eq!(
        (
            first[1],
            u32_at(first, 4),
            u32_at(first, 8),
            u32_at(first, 12)
        ),
        (16, 255, 1, 255)
    );
    assert!(entries
        .iter()
        .any(|e| e.0 == 0x0A && u32_at(e.1, 4) == u32::MAX));
    assert_eq!(sum(madt), 0);
}

#[test]
fn bad_cpu_lists_are_named() {
    let mut c = config(1, true);
    c.apic_ids.clear();
    assert_eq!(build(&c).unwrap_err(), AcpiError::NoCpus);
    c.apic_ids = vec![0, 1, 0];
    assert_eq!(build(&c).unwrap_err(), AcpiError::DuplicateApicId(0));
    c.apic_ids = (0..=MAX_CPUS as u32).collect();
    assert_eq!(build(&c).unwrap_err(), AcpiError::TooManyCpus(MAX_CPUS + 1));
    c.apic_ids = (0..MAX_CPUS as u32).collect();
    build(&c).unwrap();
}

#[test]
fn tables_land_in_guest_memory_where_linux_scans() {
    let mem = create_guest_memory(16 << 20).unwrap();
    let rsdp = write(&mem, &config(2, true)).unwrap();
    assert_eq!(rsdp, 0xE_0000);
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    let tables = build(&config(2, true)).unwrap();
    for t in &tables.tables {
        let mut back = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut back, GuestAddress(t.addr)).unwrap();
        assert_eq!(back, t.bytes, "{}", t.name);
    }
}

/// Each system description table disassembles with ACPICA's `iasl -d` without an error or
/// warning. The RSDP is not one (no length at offset 4): iasl's file reader refuses it ("does not
/// contain a valid ACPI table"), so it is checked by the structural tests above only. iasl must
/// be installed (acpica-tools; .ci/run installs it): without it this test fails.
#[test]
fn iasl_disassembles_every_table_without_errors() {
    let dir = std::env::temp_dir().join(format!("irqvm-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (cpus, pic) in [(1, true), (4, false), (300, true)] {
        let tables = build(&config(cpus, pic)).unwrap();
        for t in tables.tables.iter().filter(|t| t.name != "RSD PTR ") {
            let name = t.name;
            let dsl = iasl_disassemble(&dir, &format!("{name}-{cpus}.dat"), &t.bytes);
            let signature = format!("\"{name}\"");
            assert!(dsl.contains(&signature), "{name}: {dsl}");
            if name == "APIC" {
                let cpus_seen = dsl.matches("[Processor Local APIC]").count()
                    + dsl.matches("[Processor Local x2APIC]").count();
                assert_eq!(cpus_seen, cpus as usize, "{dsl}");
                assert_eq!(dsl.matches("[Interrupt Source Override]").count(), 1);
            }
            if std::env::var_os("IRQVM_ACPI_DUMP").is_some() {
                println!("{dsl}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bytes` disassembled by `iasl -d` in `dir` (as `file`), checked free of errors and warnings.
fn iasl_disassemble(dir: &std::path::Path, file: &str, bytes: &[u8]) -> String {
    let path = dir.join(file);
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new("iasl")
        .arg("-d")
        .arg(&path)
        .current_dir(dir)
        .output()
        .expect("run iasl (apt-get install acpica-tools)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {file}: {text}");
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("warning"),
        "iasl -d {file}: {text}"
    );
    std::fs::read_to_string(path.with_extension("dsl")).unwrap()
}

/// One ISA device as iasl's disassembly shows it.
#[derive(Debug, PartialEq, Eq)]
struct DslDevice {
    /// The last name segment, without iasl's trailing-underscore trimming differences.
    name: String,
    hid: String,
    /// (minimum, maximum, length) of each `IO (Decode16, ...)` descriptor.
    io: Vec<(u64, u64, u64)>,
    /// The number of each `Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ...)`.
    edge_high_irqs: Vec<u64>,
}

/// The hexadecimal numbers ("0x...") of `text`, in order.
fn hex_numbers(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|t| t.strip_prefix("0x"))
        .map(|t| u64::from_str_radix(t, 16).unwrap())
        .collect()
}

/// The `Device (...)` blocks of a disassembled DSDT.
fn dsl_devices(dsl: &str) -> Vec<DslDevice> {
    dsl.split("Device (")
        .skip(1)
        .map(|block| {
            let path = &block[..block.find(')').unwrap()];
            let name = path.rsplit(['.', '\\']).next().unwrap();
            let hid_at = block.find("EisaId (\"").expect("an EisaId _HID") + 9;
            let io = block
                .split("IO (Decode16,")
                .skip(1)
                .map(|d| match hex_numbers(&d[..d.find(')').unwrap()])[..] {
                    [min, max, _align, len] => (min, max, len),
                    ref other => panic!("IO descriptor {other:?}"),
                })
                .collect();
            let edge_high_irqs = block
                .split("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive")
                .skip(1)
                .map(|d| hex_numbers(&d[d.find('{').unwrap()..d.find('}').unwrap()])[0])
                .collect();
            DslDevice {
                name: name.trim_end_matches('_').to_string(),
                hid: block[hid_at..hid_at + 7].to_string(),
                io,
                edge_high_irqs,
            }
        })
        .collect()
}

fn device(name: &str, hid: &str, io: &[(u64, u64, u64)], irq: u64) -> DslDevice {
    DslDevice {
        name: name.into(),
        hid: hid.into(),
        io: io.to_vec(),
        edge_high_irqs: vec![irq],
    }
}

/// The DSDT, read back through iasl's disassembly, describes the PC's ISA devices with their
/// _HID, ports and ISA IRQ (edge, active high), which is what Linux's PNPACPI binds the 8250,
/// i8042 and rtc_cmos drivers by; without an 8042 or an RTC their devices are left out.
#[test]
fn dsdt_describes_com1_the_8042_and_the_rtc() {
    let dir = std::env::temp_dir().join(format!("irqvm-dsdt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dsdt = |config: &AcpiConfig| {
        let tables = build(config).unwrap();
        let dsl = iasl_disassemble(&dir, "DSDT.dat", &tables.get("DSDT").unwrap().bytes);
        dsl_devices(&dsl)
    };
    let com1 = || device("COM1", "PNP0501", &[(0x3F8, 0x3F8, 8)], 4);
    assert_eq!(
        dsdt(&config(2, true)),
        vec![
            com1(),
            device("KBD", "PNP0303", &[(0x60, 0x60, 1), (0x64, 0x64, 1)], 1),
            device("MOU", "PNP0F13", &[], 12),
            device("RTC", "PNP0B00", &[(0x70, 0x70, 2)], 8),
        ]
    );
    let bare = AcpiConfig {
        i8042: false,
        cmos_rtc: false,
        ..config(2, true)
    };
    assert_eq!(dsdt(&bare), vec![com1()]);
    std::fs::remove_dir_all(&dir).unwrap();
}
