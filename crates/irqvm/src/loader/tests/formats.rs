//! Each format loads, lands where it says, and starts in the right mode with the right registers.

use super::*;
use crate::loader::layout::{PDPT_ADDR, PD_ADDR};
use crate::memory::HIGH_RAM_START;

#[test]
fn multiboot_elf32_enters_protected_mode_with_magic_and_info_spec_3_2() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::MultibootElf32);
    assert_eq!(loaded.boot.mode, CpuMode::Protected32);
    assert_eq!(loaded.boot.rip, 0x10_000C);
    assert_eq!(loaded.boot.rax, u64::from(MULTIBOOT_BOOTLOADER_MAGIC));
    assert_eq!(loaded.boot.rbx, loaded.info_addr);
    assert_eq!(loaded.boot.rsp, BOOT_STACK_TOP);
    assert_eq!(loaded.kernel_end, 0x10_0000 + 32 + 0x1000);
    let byte: u8 = mem.read_obj(GuestAddress(0x10_000C)).unwrap();
    assert_eq!(byte, 0xF4);
}

/// Every guest kernel crates/irqvm/build.rs builds (ELF32 multiboot images with 64-bit code,
/// linked at 1 MiB with the multiboot header first) loads through the ELF reader.
#[test]
fn every_built_guest_loads_as_multiboot_elf32() {
    let dir = std::path::Path::new(env!("IRQVM_GUESTS_DIR"));
    let mut loaded_count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "elf") {
            continue;
        }
        let image = std::fs::read(&path).unwrap();
        let mem = ram(64 * MIB);
        let loaded = load(&mem, &request(&image)).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert_eq!(loaded.kind, ImageKind::MultibootElf32, "{path:?}");
        assert_eq!(loaded.boot.mode, CpuMode::Protected32, "{path:?}");
        assert_eq!(loaded.boot.rax, u64::from(MULTIBOOT_BOOTLOADER_MAGIC));
        let rip = loaded.boot.rip;
        assert!((0x10_0000..loaded.kernel_end).contains(&rip), "{path:?}");
        assert_eq!(
            read_u32(&mem, 0x10_0000),
            MULTIBOOT_HEADER_MAGIC,
            "{path:?}"
        );
        loaded_count += 1;
    }
    assert!(loaded_count >= 10, "only {loaded_count} guests in {dir:?}");
}

/// The reader takes headers at any alignment: an image that starts at an odd host address
/// (as a slice of a larger buffer may) loads like any other.
#[test]
fn image_at_an_odd_host_address_loads() {
    for image in [multiboot_elf32(), elf64(0x20_0000, 0x20_0000, &[0xF4; 8])] {
        let mut buffer = vec![0u8; 1];
        buffer.extend_from_slice(&image);
        let mem = ram(64 * MIB);
        load(&mem, &request(&buffer[1..])).unwrap();
    }
}

#[test]
fn multiboot_elf64_is_entered_in_32_bit_mode_spec_3_2() {
    let mem = ram(64 * MIB);
    let mut code = multiboot_header(0x2, [0; 5])[..12].to_vec();
    code.extend_from_slice(&[0xF4; 4]);
    let image = elf64(0x20_000C, 0x20_0000, &code);
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::MultibootElf64);
    assert_eq!(loaded.boot.mode, CpuMode::Protected32);
    assert_eq!(loaded.boot.rip, 0x20_000C);
    assert_eq!(loaded.boot.rax, u64::from(MULTIBOOT_BOOTLOADER_MAGIC));
}

#[test]
fn aout_kludge_loads_at_load_addr_spec_3_1_3() {
    let mem = ram(64 * MIB);
    let image = aout_image();
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::MultibootAout);
    assert_eq!(loaded.boot.rip, 0x20_0000 + 40);
    assert_eq!(loaded.kernel_end, 0x20_0000 + 56 + 0x1000);
    let mut back = vec![0u8; image.len()];
    mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(back, image);
}

#[test]
fn higher_half_elf_entry_is_translated_to_physical() {
    let mem = ram(64 * MIB);
    let mut code = multiboot_header(0x2, [0; 5])[..12].to_vec();
    code.extend_from_slice(&[0xF4; 4]);
    let image = elf32(0xC010_000C, 0xC010_0000, 0x10_0000, &code, 0);
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.boot.rip, 0x10_000C);
}

#[test]
fn every_segment_of_a_multi_segment_elf_is_copied() {
    let mem = ram(64 * MIB);
    let text = [0xF4u8; 16];
    let data = *b"data segment";
    let image = elf32_segments(
        0x10_0000,
        &[
            Seg {
                vaddr: 0x10_0000,
                paddr: 0x10_0000,
                code: &text,
                bss: 0,
            },
            Seg {
                vaddr: 0x30_0000,
                paddr: 0x30_0000,
                code: &data,
                bss: 0x2000,
            },
        ],
    );
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kernel_end, 0x30_0000 + data.len() as u64 + 0x2000);
    let mut back = [0u8; 12];
    mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn plain_elf32_enters_protected_mode_without_magic() {
    let mem = ram(64 * MIB);
    let image = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4; 8], 0);
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::Elf32);
    assert_eq!(loaded.boot.mode, CpuMode::Protected32);
    assert_eq!(loaded.boot.rax, 0);
    assert_eq!(loaded.boot.rbx, loaded.info_addr);
    assert_eq!(loaded.boot.rdi, 0);
}

#[test]
fn plain_elf64_enters_long_mode_with_identity_paging() {
    let mem = ram(64 * MIB);
    let image = elf64(0x20_0000, 0x20_0000, &[0xF4; 8]);
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::Elf64);
    assert_eq!(loaded.boot.mode, CpuMode::Long64);
    assert_eq!(loaded.boot.rip, 0x20_0000);
    assert_eq!(loaded.boot.rdi, loaded.info_addr);
    assert_eq!(read_u64(&mem, PML4_ADDR) & !0xFFF, PDPT_ADDR);
    // The PD entry for 2 MiB maps 2 MiB as a large page.
    assert_eq!(read_u64(&mem, PD_ADDR + 8), 0x20_0000 | 0x83);
    // The last 2 MiB page below 4 GiB.
    assert_eq!(
        read_u64(&mem, PD_ADDR + 3 * 4096 + 511 * 8),
        0xFFE0_0000 | 0x83
    );
}

#[test]
fn protected_mode_images_get_no_page_tables() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    load(&mem, &request(&image)).unwrap();
    assert_eq!(read_u64(&mem, PML4_ADDR), 0);
}

#[test]
fn raw_image_is_copied_and_entered_as_asked() {
    let mem = ram(8 * MIB);
    let code = [0xEB, 0xFE];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode: CpuMode::Protected32,
    });
    let loaded = load(&mem, &req).unwrap();
    assert_eq!(loaded.kind, ImageKind::Raw);
    assert_eq!(loaded.boot.rip, 0x10_0000);
    assert_eq!(loaded.boot.rdi, loaded.info_addr);
    assert_eq!(loaded.kernel_end, 0x10_0002);
    let b: u16 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(b, 0xFEEB);
}

#[test]
fn raw_image_in_long_mode_gets_page_tables() {
    let mem = ram(8 * MIB);
    let code = [0xF4];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode: CpuMode::Long64,
    });
    assert_eq!(load(&mem, &req).unwrap().boot.mode, CpuMode::Long64);
    assert_eq!(read_u64(&mem, PML4_ADDR), PDPT_ADDR | 0x3);
}

#[test]
fn boot_gdt_is_written() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    load(&mem, &request(&image)).unwrap();
    for (i, descriptor) in BOOT_GDT.iter().enumerate() {
        assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 8 * i as u64), *descriptor);
    }
}

#[test]
fn elf64_entry_above_4g_is_refused() {
    let mem = ram(3 * 1024 * MIB + 64 * MIB);
    let image = elf64(HIGH_RAM_START, HIGH_RAM_START, &[0xF4; 8]);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::EntryAbove4G(HIGH_RAM_START)
    );
}
