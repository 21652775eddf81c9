//! Loads a real Linux kernel through irqvm's loader, both ways it can come: the bzImage (64-bit
//! boot protocol) and the vmlinux extracted from it (PVH entry), and checks what a kernel would
//! find. Run by crates/irqvm/scripts/check-linux-image.sh, which needs an installed kernel
//! (Debian's linux-image-cloud-amd64), so it is not part of ./test.sh.
//!
//! Usage: linux_image BZIMAGE VMLINUX [INITRD]; with EXPECT_PVH_ENTRY=HEX in the environment it
//! also compares the PVH entry with that address (the script reads it with binutils' readelf).
//! Prints one line per check and ends with "N passed, N failed"; exits 1 if any check failed.

use std::process::ExitCode;

use irqvm::acpi::{self, AcpiConfig};
use irqvm::loader::{self, bzimage, BootPlatform, CpuMode, ImageKind, LoadRequest, Module};
use irqvm::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};

/// Enough for Debian's kernel: loaded at 16 MiB, ~50 MiB of init_size, plus an initrd.
const GUEST_MEMORY: u64 = 512 << 20;
/// `cld`, the first instruction of both `startup_64` (arch/x86/boot/compressed/head_64.S) and
/// `pvh_start_xen` (arch/x86/platform/pvh/head.S).
const CLD: u8 = 0xFC;

struct Checks {
    passed: usize,
    failed: usize,
}

impl Checks {
    fn check(&mut self, ok: bool, what: String) {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

fn read_bytes(mem: &irqvm::memory::GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(addr))
        .unwrap_or_default();
    b
}

fn request<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>) -> LoadRequest<'a> {
    LoadRequest {
        kernel,
        cmdline: "console=ttyS0 nokaslr".into(),
        modules: initrd
            .map(|data| Module {
                data,
                cmdline: "initrd".into(),
            })
            .into_iter()
            .collect(),
        raw: None,
    }
}

fn platform(mem: &irqvm::memory::GuestRam) -> BootPlatform {
    let config = AcpiConfig {
        apic_ids: vec![0, 1],
        ioapic_id: 0,
        pic: true,
        i8042: false,
        cmos_rtc: true,
    };
    let rsdp = acpi::write(mem, &config).expect("ACPI tables");
    BootPlatform {
        acpi_rsdp: Some(rsdp),
    }
}

fn check_bzimage(c: &mut Checks, image: &[u8], initrd: Option<&[u8]>) {
    c.check(
        loader::detect(image).ok() == Some(ImageKind::BzImage),
        "bzImage detected as BzImage".into(),
    );
    let header = match bzimage::read_setup_header(image) {
        Ok(h) => h,
        Err(e) => return c.check(false, format!("bzImage setup header: {e}")),
    };
    let (version, pref, init_size) = (header.version, header.pref_address, header.init_size);
    println!("     protocol {version:#x}, pref_address {pref:#x}, init_size {init_size:#x}");
    let mem = create_guest_memory(GUEST_MEMORY).expect("guest memory");
    let platform = platform(&mem);
    let loaded = match loader::load_with(&mem, &request(image, initrd), &platform) {
        Ok(l) => l,
        Err(e) => return c.check(false, format!("bzImage loads: {e}")),
    };
    let load = bzimage::load_address(&header);
    c.check(
        loaded.boot.mode == CpuMode::Long64 && loaded.boot.rip == load + 0x200,
        format!(
            "bzImage entered in long mode at startup_64 = {:#x}",
            loaded.boot.rip
        ),
    );
    c.check(
        (0x100_0000..0x1_0000_0000).contains(&loaded.boot.rip),
        "the entry is between 16 MiB and 4 GiB".into(),
    );
    let code = read_bytes(&mem, loaded.boot.rip, 4);
    c.check(
        code[0] == CLD,
        format!("startup_64 starts with cld (bytes {code:02x?})"),
    );
    c.check(
        loaded.rsi == loader::INFO_BASE && loaded.kernel_end == load + u64::from(init_size),
        format!(
            "RSI = zero page {:#x}, kernel_end = load + init_size = {:#x}",
            loaded.rsi, loaded.kernel_end
        ),
    );
    let zp = read_bytes(&mem, loaded.rsi, 4096);
    let u32_at = |at: usize| u32::from_le_bytes(zp[at..at + 4].try_into().unwrap_or_default());
    c.check(
        &zp[0x202..0x206] == b"HdrS" && zp[0x210] == 0xFF,
        "zero page: setup header copied, type_of_loader 0xFF".into(),
    );
    let cmdline = read_bytes(&mem, u64::from(u32_at(0x228)), 21);
    c.check(
        cmdline == b"console=ttyS0 nokaslr",
        "zero page: cmd_line_ptr -> the command line".into(),
    );
    if let Some(initrd) = initrd {
        let (addr, size) = (u32_at(0x218), u32_at(0x21C));
        let head = read_bytes(&mem, u64::from(addr), 64.min(initrd.len()));
        c.check(
            size as usize == initrd.len() && head == initrd[..head.len()],
            format!("zero page: ramdisk at {addr:#x}, {size} bytes"),
        );
    }
    let rsdp = u64::from_le_bytes(zp[0x70..0x78].try_into().unwrap_or_default());
    c.check(
        rsdp == 0xE_0000 && read_bytes(&mem, rsdp, 8) == b"RSD PTR ",
        format!("zero page: acpi_rsdp_addr {rsdp:#x} -> RSDP"),
    );
    c.check(
        zp[0x1E8] >= 5,
        format!("zero page: {} e820 entries", zp[0x1E8]),
    );
}

fn check_vmlinux(c: &mut Checks, image: &[u8], initrd: Option<&[u8]>) {
    c.check(
        loader::detect(image).ok() == Some(ImageKind::Pvh),
        "vmlinux detected as PVH".into(),
    );
    let mem = create_guest_memory(GUEST_MEMORY).expect("guest memory");
    let platform = platform(&mem);
    let loaded = match loader::load_with(&mem, &request(image, initrd), &platform) {
        Ok(l) => l,
        Err(e) => return c.check(false, format!("vmlinux loads: {e}")),
    };
    c.check(
        loaded.boot.mode == CpuMode::Protected32 && loaded.boot.rbx == loader::INFO_BASE,
        format!(
            "vmlinux entered in 32-bit protected mode at {:#x}, EBX = start_info {:#x}",
            loaded.boot.rip, loaded.boot.rbx
        ),
    );
    c.check(
        (0x100_0000..loaded.kernel_end).contains(&loaded.boot.rip),
        format!(
            "the PVH entry lies in the loaded kernel (16 MiB..{:#x})",
            loaded.kernel_end
        ),
    );
    let code = read_bytes(&mem, loaded.boot.rip, 4);
    c.check(
        code[0] == CLD,
        format!("pvh_start_xen starts with cld (bytes {code:02x?})"),
    );
    let si = read_bytes(&mem, loaded.boot.rbx, 56);
    let u32_at = |at: usize| u32::from_le_bytes(si[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(si[at..at + 8].try_into().unwrap_or_default());
    c.check(
        u32_at(0) == loader::pvh::XEN_HVM_START_MAGIC && u32_at(4) == 1,
        "hvm_start_info: magic, version 1".into(),
    );
    c.check(
        read_bytes(&mem, u64_at(24), 21) == b"console=ttyS0 nokaslr",
        "hvm_start_info: cmdline_paddr -> the command line".into(),
    );
    c.check(
        u64_at(32) == 0xE_0000 && u32_at(48) >= 5,
        format!(
            "hvm_start_info: rsdp_paddr {:#x}, {} memory map entries",
            u64_at(32),
            u32_at(48)
        ),
    );
    if let Some(initrd) = initrd {
        let module = read_bytes(&mem, u64_at(16), 16);
        let size = u64::from_le_bytes(module[8..16].try_into().unwrap_or_default());
        c.check(
            u32_at(12) == 1 && size == initrd.len() as u64,
            format!("hvm_start_info: one module (the initrd, {size} bytes)"),
        );
    }
    if let Ok(expected) = std::env::var("EXPECT_PVH_ENTRY") {
        let expected = u64::from_str_radix(expected.trim_start_matches("0x"), 16).ok();
        c.check(
            expected == Some(loaded.boot.rip),
            format!(
                "the entry is the note's as readelf decodes it ({})",
                expected.map_or("unparsable".into(), |e| format!("{e:#x}"))
            ),
        );
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(2..=3).contains(&args.len()) {
        eprintln!("usage: linux_image BZIMAGE VMLINUX [INITRD]");
        return ExitCode::from(2);
    }
    let read = |p: &String| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (bz, vmlinux) = (read(&args[0]), read(&args[1]));
    let initrd = args.get(2).map(read);
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    check_bzimage(&mut c, &bz, initrd.as_deref());
    check_vmlinux(&mut c, &vmlinux, initrd.as_deref());
    println!("{} passed, {} failed", c.passed, c.failed);
    if c.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
