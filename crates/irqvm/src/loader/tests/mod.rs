//! Loader tests: each format's happy path, the multiboot info block field by field (multiboot
//! spec §3.3), every malformed-image error, and fuzz-style properties (truncations, byte flips and
//! random bytes never panic).

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::create_guest_memory;

const MIB: u64 = 1 << 20;

fn ram(size: u64) -> GuestRam {
    create_guest_memory(size).unwrap()
}

fn read_u32(mem: &GuestRam, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn read_u64(mem: &GuestRam, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn read_cstr(mem: &GuestRam, addr: u64) -> String {
    let mut out = Vec::new();
    for i in 0..4096 {
        let b: u8 = mem.read_obj(GuestAddress(addr + i)).unwrap();
        if b == 0 {
            break;
        }
        out.push(b);
    }
    String::from_utf8(out).unwrap()
}

fn request(kernel: &[u8]) -> LoadRequest<'_> {
    LoadRequest {
        kernel,
        cmdline: "kernel.elf".into(),
        modules: vec![],
        raw: None,
    }
}

/// A multiboot header with `flags` and a valid checksum, plus the a.out fields.
fn multiboot_header(flags: u32, fields: [u32; 5]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MULTIBOOT_HEADER_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    let checksum = 0u32
        .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
        .wrapping_sub(flags);
    h.extend_from_slice(&checksum.to_le_bytes());
    for f in fields {
        h.extend_from_slice(&f.to_le_bytes());
    }
    h
}

/// A minimal ELF32 executable: one PT_LOAD of `code` at `paddr` (vaddr `vaddr`) with `bss`
/// extra bytes, optionally carrying a multiboot header at the start of the segment.
fn elf32(entry: u32, vaddr: u32, paddr: u32, code: &[u8], bss: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x54];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..28].copy_from_slice(&entry.to_le_bytes());
    f[28..32].copy_from_slice(&0x34u32.to_le_bytes()); // phoff
    f[40..42].copy_from_slice(&0x34u16.to_le_bytes()); // ehsize
    f[42..44].copy_from_slice(&32u16.to_le_bytes()); // phentsize
    f[44..46].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 0x34;
    let offset = 0x54u32;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&offset.to_le_bytes());
    f[ph + 8..ph + 12].copy_from_slice(&vaddr.to_le_bytes());
    f[ph + 12..ph + 16].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 16..ph + 20].copy_from_slice(&(code.len() as u32).to_le_bytes());
    f[ph + 20..ph + 24].copy_from_slice(&(code.len() as u32 + bss).to_le_bytes());
    f[ph + 24..ph + 28].copy_from_slice(&7u32.to_le_bytes());
    f.extend_from_slice(code);
    f
}

/// A minimal ELF64 executable with one PT_LOAD of `code` at `addr`.
fn elf64(entry: u64, addr: u64, code: &[u8]) -> Vec<u8> {
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

fn multiboot_elf32() -> Vec<u8> {
    let mut code = multiboot_header(0x3, [0; 5])[..12].to_vec();
    code.extend_from_slice(&[0xF4; 20]); // hlt
    elf32(0x10_000C, 0x10_0000, 0x10_0000, &code, 0x1000)
}

/// An a.out-kludge image: header at file offset 8, loaded at 0x200000.
fn aout_image() -> Vec<u8> {
    let load = 0x20_0000u32;
    let mut f = vec![0x90u8; 8];
    let header_addr = load + 8;
    let total = 8 + 32 + 16;
    f.extend(multiboot_header(
        MBH_AOUT_KLUDGE | 0x2,
        [
            header_addr,
            load,
            load + total,
            load + total + 0x1000,
            load + 40,
        ],
    ));
    f.extend_from_slice(&[0xF4; 16]);
    f
}

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
    assert_eq!(loaded.kernel_end, 0x10_0000 + 32 + 0x1000);
    let byte: u8 = mem.read_obj(GuestAddress(0x10_000C)).unwrap();
    assert_eq!(byte, 0xF4);
}

#[test]
fn info_block_memory_fields_spec_3_3() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let info = load(&mem, &request(&image)).unwrap().info_addr;
    let flags = read_u32(&mem, info);
    assert_ne!(flags & MBI_MEMORY, 0);
    assert_eq!(read_u32(&mem, info + 4), 639);
    assert_eq!(read_u32(&mem, info + 8), (64 * 1024) - 1024);
}

#[test]
fn info_block_memory_map_spec_3_3() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let info = load(&mem, &request(&image)).unwrap().info_addr;
    assert_ne!(read_u32(&mem, info) & MBI_MMAP, 0);
    let len = u64::from(read_u32(&mem, info + 44));
    let addr = u64::from(read_u32(&mem, info + 48));
    let mut entries = Vec::new();
    let mut at = addr;
    while at < addr + len {
        let size = u64::from(read_u32(&mem, at));
        entries.push((
            read_u64(&mem, at + 4),
            read_u64(&mem, at + 12),
            read_u32(&mem, at + 20),
        ));
        at += size + 4;
    }
    assert_eq!(entries[0], (0, 0x9FC00, 1));
    assert_eq!(entries.last().unwrap(), &(0x10_0000, 63 * MIB, 1));
    let available: u64 = entries.iter().filter(|e| e.2 == 1).map(|e| e.1).sum();
    assert_eq!(available, 0x9FC00 + 63 * MIB);
}

#[test]
fn memory_map_includes_ram_above_4g() {
    let mem = ram(3 * 1024 * MIB + 64 * MIB);
    let map = memory_map(&mem);
    assert_eq!(map.last().unwrap(), &(HIGH_RAM_START, 64 * MIB, 1));
}

#[test]
fn cmdline_is_file_name_then_arguments_like_qemu() {
    assert_eq!(kernel_cmdline("hello.elf", ""), "hello.elf");
    assert_eq!(kernel_cmdline("hello.elf", "a=1 b"), "hello.elf a=1 b");
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let mut req = request(&image);
    req.cmdline = kernel_cmdline("/boot/k.elf", "console=ttyS0");
    let info = load(&mem, &req).unwrap().info_addr;
    assert_ne!(read_u32(&mem, info) & MBI_CMDLINE, 0);
    let cmdline = u64::from(read_u32(&mem, info + 16));
    assert_eq!(read_cstr(&mem, cmdline), "/boot/k.elf console=ttyS0");
    let name = u64::from(read_u32(&mem, info + 64));
    assert_eq!(read_cstr(&mem, name), "irqvm");
}

#[test]
fn initrd_becomes_a_page_aligned_module_after_the_kernel_spec_3_3() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let initrd = b"initrd contents".to_vec();
    let mut req = request(&image);
    req.modules.push(Module {
        data: &initrd,
        cmdline: "initrd.img".into(),
    });
    let loaded = load(&mem, &req).unwrap();
    let info = loaded.info_addr;
    assert_ne!(read_u32(&mem, info) & MBI_MODS, 0);
    assert_eq!(read_u32(&mem, info + 20), 1);
    let mods = u64::from(read_u32(&mem, info + 24));
    let start = u64::from(read_u32(&mem, mods));
    let end = u64::from(read_u32(&mem, mods + 4));
    assert_eq!(start % 4096, 0);
    assert!(start >= loaded.kernel_end);
    assert_eq!(end - start, initrd.len() as u64);
    let mut data = vec![0u8; initrd.len()];
    mem.read_slice(&mut data, GuestAddress(start)).unwrap();
    assert_eq!(data, initrd);
    assert_eq!(
        read_cstr(&mem, u64::from(read_u32(&mem, mods + 8))),
        "initrd.img"
    );
}

#[test]
fn module_too_large_for_ram_is_rejected() {
    let mem = ram(2 * MIB);
    let image = multiboot_elf32();
    let big = vec![0u8; 2 * MIB as usize];
    let mut req = request(&image);
    req.modules.push(Module {
        data: &big,
        cmdline: "big".into(),
    });
    assert!(matches!(
        load(&mem, &req),
        Err(LoaderError::OutOfRam { what: "module", .. })
    ));
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
fn plain_elf32_enters_protected_mode_without_magic() {
    let mem = ram(64 * MIB);
    let image = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4; 8], 0);
    let loaded = load(&mem, &request(&image)).unwrap();
    assert_eq!(loaded.kind, ImageKind::Elf32);
    assert_eq!(loaded.boot.mode, CpuMode::Protected32);
    assert_eq!(loaded.boot.rax, 0);
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
    let b: u16 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(b, 0xFEEB);
}

#[test]
fn raw_real_mode_entry_must_be_below_1m() {
    let mem = ram(8 * MIB);
    let code = [0xF4];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode: CpuMode::Real,
    });
    assert_eq!(
        load(&mem, &req).unwrap_err(),
        LoaderError::RealModeEntry(0x10_0000)
    );
}

#[test]
fn boot_gdt_is_written() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    load(&mem, &request(&image)).unwrap();
    assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 8), BOOT_GDT[1]);
    assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 16), BOOT_GDT[2]);
}

#[test]
fn empty_and_unknown_images_are_named() {
    let mem = ram(8 * MIB);
    assert_eq!(load(&mem, &request(&[])).unwrap_err(), LoaderError::Empty);
    assert_eq!(
        load(&mem, &request(&[0u8; 100])).unwrap_err(),
        LoaderError::UnknownFormat
    );
}

#[test]
fn bad_checksum_means_no_header() {
    let mut h = multiboot_header(0, [0; 5]);
    h[8] ^= 1;
    assert_eq!(find_multiboot_header(&h).unwrap(), None);
}

#[test]
fn header_beyond_8k_is_not_found_spec_3_1_1() {
    let mut image = vec![0u8; 8192];
    image.extend(multiboot_header(0, [0; 5]));
    assert_eq!(find_multiboot_header(&image).unwrap(), None);
}

#[test]
fn unsupported_required_flags_are_refused_spec_3_1_2() {
    let mem = ram(8 * MIB);
    let image = multiboot_header(0x4, [0; 5]); // video mode required
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::UnsupportedMultibootFlags(0x4)
    );
}

#[test]
fn multiboot_header_without_elf_or_addresses_is_refused() {
    let mem = ram(8 * MIB);
    let image = multiboot_header(0x2, [0; 5]);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::BadMultiboot(_))
    ));
}

#[test]
fn aout_with_inconsistent_addresses_is_refused() {
    let mem = ram(64 * MIB);
    let cases: [[u32; 5]; 4] = [
        // header_addr below load_addr
        [0x10_0000, 0x20_0000, 0, 0, 0x20_0000],
        // load_addr puts the file start before offset 0
        [0x20_1000, 0x20_0000, 0, 0, 0x20_1000],
        // load_end beyond the file
        [0x20_0000, 0x20_0000, 0x30_0000, 0, 0x20_0000],
        // entry outside the image
        [0x20_0000, 0x20_0000, 0, 0, 0x90_0000],
    ];
    for fields in cases {
        let image = multiboot_header(MBH_AOUT_KLUDGE, fields);
        let err = load(&mem, &request(&image)).unwrap_err();
        assert!(
            matches!(
                err,
                LoaderError::BadMultiboot(_) | LoaderError::EntryOutsideImage(_)
            ),
            "{fields:x?}: {err}"
        );
    }
}

#[test]
fn segment_outside_ram_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x4000_0000, 0x4000_0000, 0x4000_0000, &[0xF4], 0);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OutOfRam { .. })
    ));
}

#[test]
fn segment_on_the_boot_area_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x8000, 0x8000, 0x8000, &[0xF4], 0);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OverlapsBootArea { .. })
    ));
}

#[test]
fn huge_bss_is_refused_without_allocating() {
    let mem = ram(8 * MIB);
    let image = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4], 0xF000_0000);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OutOfRam { .. })
    ));
}

#[test]
fn elf_header_errors_are_named() {
    let good = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4], 0);
    let mut wrong_machine = good.clone();
    wrong_machine[18] = 40; // ARM
    let mut big_endian = good.clone();
    big_endian[5] = 2;
    let mut not_exec = good.clone();
    not_exec[16] = 3; // ET_DYN
    let mut no_phdrs = good.clone();
    no_phdrs[44] = 0;
    let mut phdrs_outside = good.clone();
    phdrs_outside[28..32].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let mut filesz_gt_memsz = good.clone();
    filesz_gt_memsz[0x34 + 16..0x34 + 20].copy_from_slice(&2u32.to_le_bytes());
    filesz_gt_memsz.push(0xF4);
    let mut only_empty_segment = good.clone();
    only_empty_segment[0x34 + 20..0x34 + 24].copy_from_slice(&0u32.to_le_bytes());
    let mut data_outside = good.clone();
    data_outside[0x34 + 16..0x34 + 20].copy_from_slice(&0x1000u32.to_le_bytes());
    data_outside[0x34 + 20..0x34 + 24].copy_from_slice(&0x1000u32.to_le_bytes());
    for image in [
        wrong_machine,
        big_endian,
        not_exec,
        no_phdrs,
        phdrs_outside,
        filesz_gt_memsz,
        only_empty_segment,
        data_outside,
    ] {
        let err = parse_elf(&image).unwrap_err();
        assert!(matches!(err, LoaderError::BadElf(_)), "{err}");
    }
}

#[test]
fn elf_entry_outside_segments_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x50_0000, 0x10_0000, 0x10_0000, &[0xF4], 0);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::EntryOutsideImage(0x50_0000)
    );
}

#[test]
fn oversized_command_line_is_refused() {
    let mem = ram(8 * MIB);
    let image = multiboot_elf32();
    let mut req = request(&image);
    req.cmdline = "x".repeat(1 << 20);
    assert_eq!(load(&mem, &req).unwrap_err(), LoaderError::BootInfoTooLarge);
}

/// Every prefix of every valid image either loads or fails with an error: no panic.
#[test]
fn every_truncation_of_valid_images_fails_cleanly() {
    let mem = ram(64 * MIB);
    for image in [
        multiboot_elf32(),
        aout_image(),
        elf64(0x20_0000, 0x20_0000, &[0xF4; 8]),
    ] {
        for len in 0..image.len() {
            let _ = load(&mem, &request(&image[..len]));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mem = ram(4 * MIB);
        let _ = load(&mem, &request(&bytes));
    }

    #[test]
    fn random_byte_flips_of_valid_images_never_panic(
        which in 0usize..3,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mem = ram(64 * MIB);
        let mut image = match which {
            0 => multiboot_elf32(),
            1 => aout_image(),
            _ => elf64(0x20_0000, 0x20_0000, &[0xF4; 8]),
        };
        for (at, value) in flips {
            let n = image.len();
            image[at % n] = value;
        }
        let _ = load(&mem, &request(&image));
    }

    #[test]
    fn random_aout_fields_never_panic(fields in any::<[u32; 5]>(), pad in 0usize..64) {
        let mem = ram(4 * MIB);
        let mut image = vec![0u8; pad * 4];
        image.extend(multiboot_header(MBH_AOUT_KLUDGE, fields));
        image.extend_from_slice(&[0xF4; 64]);
        let _ = load(&mem, &request(&image));
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
