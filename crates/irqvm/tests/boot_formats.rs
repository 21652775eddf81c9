//! Kernel formats and entry modes on a real vCPU: each tiny guest ends with a debug-exit whose
//! value proves it ran in the expected mode with the expected registers.

mod common;

use common::*;
use irqvm::loader::CpuMode;
use irqvm::vcpu::GuestExit;
use irqvm::vm::{Vm, VmConfig, VmError};

fn exit_status(cfg: VmConfig) -> i32 {
    let run = run_vm(cfg);
    match run.result {
        Ok(report) => report.exit.exit_status(),
        Err(e) => panic!("{e}\n{}", run.output),
    }
}

#[test]
fn debug_exit_status_is_value_shifted_left_with_bit_0() {
    let cfg = raw_config(&debug_exit32(0x10), CpuMode::Protected32, 1);
    assert_eq!(exit_status(cfg), 0x21);
}

#[test]
fn raw_real_mode_entry() {
    // mov ax, 7; out 0xF4, ax (16-bit operand size in real mode).
    let code = [0xB8, 0x07, 0x00, 0xE7, 0xF4];
    let mut cfg = raw_config(&code, CpuMode::Real, 1);
    cfg.raw = Some(irqvm::loader::RawImage {
        load_addr: 0x9_F000 + 0x1000,
        entry: 0x9_F000 + 0x1000,
        mode: CpuMode::Real,
    });
    assert_eq!(exit_status(cfg), 15);
}

/// An ELF64 executable with one PT_LOAD of `code` at 2 MiB, entered at `entry`.
fn elf64_at(entry: u64, code: &[u8]) -> Vec<u8> {
    let addr: u64 = 0x20_0000;
    let mut f = vec![0u8; 0x78];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&0x40u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 0x40;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(code);
    f
}

fn elf64(code: &[u8]) -> Vec<u8> {
    elf64_at(0x20_0000, code)
}

/// An ELF32 i386 executable with one PT_LOAD per (address, bytes), entered at the first.
fn elf32(segments: &[(u32, &[u8])]) -> Vec<u8> {
    let (ehsize, phentsize) = (0x34usize, 32usize);
    let mut f = vec![0u8; ehsize];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[24..28].copy_from_slice(&segments[0].0.to_le_bytes());
    f[28..32].copy_from_slice(&(ehsize as u32).to_le_bytes());
    f[42..44].copy_from_slice(&(phentsize as u16).to_le_bytes());
    f[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
    let mut offset = ehsize + segments.len() * phentsize;
    for (addr, data) in segments {
        let len = data.len() as u32;
        for word in [1, offset as u32, *addr, *addr, len, len, 7, 0] {
            f.extend_from_slice(&word.to_le_bytes());
        }
        offset += data.len();
    }
    for (_, data) in segments {
        f.extend_from_slice(data);
    }
    f
}

#[test]
fn plain_elf64_runs_in_long_mode() {
    // A 64-bit-only instruction sequence: mov rax, 0x100000003; shr rax, 32 (-> 1 only if the
    // register is 64 bits wide); add eax, 2; out 0xF4, eax. Status (3 << 1) | 1 = 7.
    let code = [
        0x48, 0xB8, 0x03, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov rax, imm64
        0x48, 0xC1, 0xE8, 0x20, // shr rax, 32
        0x83, 0xC0, 0x02, // add eax, 2
        0xE7, 0xF4, // out 0xF4, eax
    ];
    let cfg = VmConfig::new(elf64(&code), "k64.elf");
    assert_eq!(exit_status(cfg), 7);
}

#[test]
fn plain_elf32_with_two_segments_runs_in_protected_mode() {
    // mov eax, [0x300000] (a dword of the second segment); out 0xF4, eax. Status (5 << 1) | 1.
    let code = [0xA1, 0x00, 0x00, 0x30, 0x00, 0xE7, 0xF4];
    let data = 5u32.to_le_bytes();
    let cfg = VmConfig::new(elf32(&[(0x10_0000, &code), (0x30_0000, &data)]), "k32.elf");
    assert_eq!(exit_status(cfg), 11);
}

/// Code that exits with 5 if EAX holds the multiboot boot loader magic 0x2BADB002, 9 if not.
const CHECK_MULTIBOOT_MAGIC: [u8; 21] = [
    0x3D, 0x02, 0xB0, 0xAD, 0x2B, // cmp eax, 0x2BADB002
    0x75, 0x07, // jne fail
    0xB8, 0x05, 0x00, 0x00, 0x00, // mov eax, 5
    0xE7, 0xF4, // out 0xF4, eax
    0xB8, 0x09, 0x00, 0x00, 0x00, // fail: mov eax, 9
    0xE7, 0xF4, // out 0xF4, eax
];

#[test]
fn multiboot_elf64_is_entered_in_32_bit_mode_with_the_magic() {
    // The header (magic, flags 0, checksum) opens the segment; the entry follows it. Byte 0x40
    // is `inc eax` in 32-bit mode but a REX prefix in long mode, so the status is 11 only if the
    // kernel starts in 32-bit mode (spec §3.2) with EAX = 0x2BADB002: 9 without the magic or in
    // long mode.
    const MAGIC: u32 = 0x1BAD_B002;
    let mut image = Vec::new();
    for word in [MAGIC, 0, 0u32.wrapping_sub(MAGIC)] {
        image.extend_from_slice(&word.to_le_bytes());
    }
    image.extend_from_slice(&[
        0x3D, 0x02, 0xB0, 0xAD, 0x2B, // cmp eax, 0x2BADB002
        0x75, 0x08, // jne fail
        0xB8, 0x04, 0x00, 0x00, 0x00, // mov eax, 4
        0x40, // inc eax (32-bit mode only)
        0xE7, 0xF4, // out 0xF4, eax
        0xB8, 0x04, 0x00, 0x00, 0x00, // fail: mov eax, 4
        0xE7, 0xF4, // out 0xF4, eax
    ]);
    let cfg = VmConfig::new(elf64_at(0x20_000C, &image), "mb64.elf");
    assert_eq!(exit_status(cfg), 11);
}

/// An a.out-kludge multiboot image at 2 MiB whose code checks EAX = 0x2BADB002.
fn aout_checking_magic() -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    let flags: u32 = 1 << 16;
    let load: u32 = 0x20_0000;
    let code = CHECK_MULTIBOOT_MAGIC;
    let header_len = 32u32;
    let total = header_len + code.len() as u32;
    let mut f = Vec::new();
    for word in [
        MAGIC,
        flags,
        0u32.wrapping_sub(MAGIC).wrapping_sub(flags),
        load,                // header_addr
        load,                // load_addr
        load + total,        // load_end_addr
        load + total + 4096, // bss_end_addr
        load + header_len,   // entry_addr
    ] {
        f.extend_from_slice(&word.to_le_bytes());
    }
    f.extend_from_slice(&code);
    f
}

#[test]
fn multiboot_aout_kludge_gets_the_magic_in_eax() {
    let cfg = VmConfig::new(aout_checking_magic(), "aout.bin");
    assert_eq!(exit_status(cfg), 11);
}

#[test]
fn malformed_kernel_is_a_named_error() {
    let cfg = VmConfig::new(b"definitely not a kernel".to_vec(), "junk");
    let err = Vm::new(&cfg).err().expect("junk must not load");
    assert!(matches!(err, VmError::Loader(_)), "{err}");
    assert!(err.to_string().contains("unknown kernel format"), "{err}");
}

#[test]
fn bad_vcpu_counts_are_rejected() {
    for cpus in [0, 1025, 5000] {
        let mut cfg = raw_config(&SPIN, CpuMode::Protected32, 1);
        cfg.cpus = cpus;
        assert!(matches!(Vm::new(&cfg), Err(VmError::BadCpuCount(n)) if n == cpus));
    }
}

/// APIC IDs past 254 need x2APIC: `--cpu-features -x2apic` is refused there, and kernel mode
/// refuses to advertise the extended destination ID its in-kernel IOAPIC cannot honour.
#[test]
fn cpu_models_the_mode_cannot_honour_are_rejected() {
    use irqvm::cpumodel::CpuModelError;
    let mut cfg = raw_config(&SPIN, CpuMode::Protected32, 1);
    cfg.cpus = 256;
    cfg.cpu_features = "-x2apic".parse().unwrap();
    let err = Vm::new(&cfg).err().expect("refused");
    assert!(
        matches!(
            err,
            VmError::CpuModel(CpuModelError::X2apicRequired { max_id: 255 })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("-x2apic refused"), "{err}");
    cfg.cpus = 2;
    cfg.cpu_features = "+kvm-msi-ext-dest-id".parse().unwrap();
    cfg.irqchip = irqvm::IrqchipMode::Kernel;
    let err = Vm::new(&cfg).err().expect("refused");
    assert!(
        matches!(err, VmError::CpuModel(CpuModelError::ExtDestIdUnsupported)),
        "{err}"
    );
    cfg.topology = Some("sockets=2,cores=2".parse().unwrap());
    cfg.cpu_features = Default::default();
    let err = Vm::new(&cfg).err().expect("refused");
    assert!(
        matches!(
            err,
            VmError::CpuModel(CpuModelError::TopologyMismatch { .. })
        ),
        "{err}"
    );
}

#[test]
fn bad_memory_size_is_rejected() {
    let mut cfg = raw_config(&SPIN, CpuMode::Protected32, 1);
    cfg.memory = 1 << 20;
    assert!(matches!(Vm::new(&cfg), Err(VmError::Memory(_))));
}

#[test]
fn triple_fault_is_a_shutdown() {
    // Load a null IDT, then raise an exception: #UD -> #DF -> shutdown.
    let code = [
        0x0F, 0x01, 0x1D, 0x10, 0x00, 0x10, 0x00, // lidt [0x100010]
        0x0F, 0x0B, // ud2
        0xEB, 0xFE, // (not reached)
        0x00, 0x00, 0x00, 0x00, 0x00, // pad to 0x10
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // IDTR: limit 0, base 0
    ];
    let run = run_vm(raw_config(&code, CpuMode::Protected32, 1));
    let report = run.result.expect("VM runs");
    assert_eq!(report.exit, GuestExit::Shutdown);
}
