//! The Linux boot protocols with images built here: a PVH ELF (ELF64 and ELF32, the note's
//! descriptor 8 or 4 bytes) and a bzImage (setup sectors, header at 0x1F1, protected-mode
//! kernel). Each test checks what the kernel would read: hvm_start_info or the zero page, field by
//! field, the command line, the initrd, the memory map; then every malformed header by name, and
//! that truncations and byte flips never panic.

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use proptest::prelude::*;

use super::*;
use crate::loader::layout::{linux_memory_map, MapEntry, RangeKind};
use crate::loader::pvh::{XEN_ELFNOTE_PHYS32_ENTRY, XEN_HVM_START_MAGIC};
use crate::memory::HIGH_RAM_START;

const RSDP: u64 = 0xE_0000;

fn read<T: vm_memory::ByteValued>(mem: &GuestRam, addr: u64) -> T {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn linux_request<'a>(kernel: &'a [u8], cmdline: &str, modules: &[&'a [u8]]) -> LoadRequest<'a> {
    LoadRequest {
        kernel,
        cmdline: cmdline.into(),
        modules: modules
            .iter()
            .map(|&data| Module {
                data,
                cmdline: "initrd".into(),
            })
            .collect(),
        raw: None,
    }
}

fn platform() -> BootPlatform {
    BootPlatform {
        acpi_rsdp: Some(RSDP),
    }
}

/// An ELF note: namesz, descsz, type, name padded to 4, desc padded to 4 (ELF gABI "Note
/// Section").
fn note(name: &[u8], n_type: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&n_type.to_le_bytes());
    n.extend_from_slice(name);
    n.push(0);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

/// [`elf64`] plus a PT_NOTE program header holding `notes`, appended after the code.
fn elf64_with_notes(entry: u64, addr: u64, code: &[u8], notes: &[u8]) -> Vec<u8> {
    let mut f = elf64(entry, addr, code);
    // Move the code to make room for a second program header (56 bytes) at 0x78.
    let code_at = 0x78 + 56;
    f.truncate(0x78);
    f.resize(code_at, 0);
    f.extend_from_slice(code);
    let notes_at = f.len();
    f.extend_from_slice(notes);
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum
    f[0x40 + 8..0x40 + 16].copy_from_slice(&(code_at as u64).to_le_bytes());
    let ph = 0x78;
    f[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    f[ph + 8..ph + 16].copy_from_slice(&(notes_at as u64).to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(notes.len() as u64).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&4u64.to_le_bytes()); // p_align
    f
}

/// A vmlinux-like PVH image: code at 16 MiB, its PVH entry 0x10 bytes in (8-byte descriptor,
/// as Linux's `_ASM_PTR` emits it), after a GNU note the loader must skip.
fn pvh_elf64() -> Vec<u8> {
    let mut notes = note(b"GNU", 3, &[1, 2, 3, 4]);
    notes.extend(note(
        b"Xen",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &0x100_0010u64.to_le_bytes(),
    ));
    let mut code = vec![0x90u8; 0x10];
    code.extend_from_slice(&[0xFC, 0xF4]); // cld; hlt
    elf64_with_notes(0xFFFF_FFFF_8100_0000, 0x100_0000, &code, &notes)
}

/// Fields of a test bzImage's setup header.
struct BzHeader {
    version: u16,
    loadflags: u8,
    xloadflags: u16,
    pref_address: u64,
    init_size: u32,
    boot_flag: u16,
}

impl Default for BzHeader {
    fn default() -> Self {
        BzHeader {
            version: 0x020F,
            loadflags: 1,
            xloadflags: 1 | 2,
            pref_address: 0x20_0000,
            init_size: 0x10_0000,
            boot_flag: 0xAA55,
        }
    }
}

/// A bzImage: one setup sector after the boot sector (setup 1024 bytes), the header at 0x1F1,
/// then `kernel` as the protected-mode kernel.
fn bzimage_with(h: &BzHeader, kernel: &[u8]) -> Vec<u8> {
    let mut hdr = setup_header {
        setup_sects: 1,
        boot_flag: h.boot_flag,
        header: u32::from_le_bytes(*b"HdrS"),
        version: h.version,
        loadflags: h.loadflags,
        xloadflags: h.xloadflags,
        pref_address: h.pref_address,
        init_size: h.init_size,
        cmdline_size: 255,
        initrd_addr_max: 0x7FFF_FFFF,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        ..Default::default()
    };
    hdr.jump = 0x66EB;
    let mut f = vec![0u8; 1024];
    f[0x1F1..0x1F1 + std::mem::size_of::<setup_header>()]
        .copy_from_slice(vm_memory::ByteValued::as_slice(&hdr));
    f.extend_from_slice(kernel);
    f
}

fn bzimage() -> Vec<u8> {
    let mut kernel = vec![0x90u8; 0x400];
    kernel[0x200] = 0xF4; // startup_64: hlt
    bzimage_with(&BzHeader::default(), &kernel)
}

#[test]
fn detection_order_multiboot_bzimage_pvh_plain_elf() {
    assert_eq!(
        detect(&multiboot_elf32()).unwrap(),
        ImageKind::MultibootElf32
    );
    assert_eq!(detect(&bzimage()).unwrap(), ImageKind::BzImage);
    assert_eq!(detect(&pvh_elf64()).unwrap(), ImageKind::Pvh);
    assert_eq!(
        detect(&elf64(0x20_0000, 0x20_0000, &[0xF4])).unwrap(),
        ImageKind::Elf64
    );
    // A multiboot kernel that happens to hold "HdrS" at 0x202 is still a multiboot kernel.
    let mut both = multiboot_elf32();
    both.resize(0x300, 0);
    both[0x202..0x206].copy_from_slice(b"HdrS");
    assert_eq!(detect(&both).unwrap(), ImageKind::MultibootElf32);
    assert!(ImageKind::Pvh.is_linux() && ImageKind::BzImage.is_linux());
    assert!(!ImageKind::MultibootElf32.is_linux() && !ImageKind::Elf64.is_linux());
}

#[test]
fn linux_memory_map_reserves_bios_area_and_mmio_hole() {
    let mem = ram(64 * MIB);
    let map = linux_memory_map(&mem);
    let e = |base, len, kind| MapEntry { base, len, kind };
    assert_eq!(
        map,
        vec![
            e(0, 0x9_FC00, RangeKind::Ram),
            e(0x9_FC00, 0x400, RangeKind::Reserved),
            e(0xE_0000, 0x2_0000, RangeKind::Reserved),
            e(0x10_0000, 63 * MIB, RangeKind::Ram),
            e(0xFEC0_0000, 0x140_0000, RangeKind::Reserved),
        ]
    );
    let big = ram(5 << 30);
    let map = linux_memory_map(&big);
    assert_eq!(map.len(), 6);
    assert_eq!(map[5], e(HIGH_RAM_START, 2 << 30, RangeKind::Ram));
    assert!(map.windows(2).all(|w| w[0].base + w[0].len <= w[1].base));
}

#[test]
fn pvh_enters_protected_mode_with_ebx_start_info() {
    let mem = ram(64 * MIB);
    let image = pvh_elf64();
    let initrd = [0xA5u8; 5000];
    let req = linux_request(&image, "console=ttyS0 quiet", &[&initrd]);
    let loaded = load_with(&mem, &req, &platform()).unwrap();
    assert_eq!(loaded.kind, ImageKind::Pvh);
    assert_eq!(loaded.boot.mode, CpuMode::Protected32);
    assert_eq!(loaded.boot.rip, 0x100_0010);
    assert_eq!((loaded.boot.rax, loaded.boot.rbx), (0, INFO_BASE));
    assert_eq!((loaded.boot.rdi, loaded.rsi), (0, 0));
    assert_eq!(loaded.info_addr, INFO_BASE);
    let byte: u8 = read(&mem, 0x100_0010);
    assert_eq!(byte, 0xFC);
    let si: hvm_start_info = read(&mem, INFO_BASE);
    assert_eq!(
        (si.magic, si.version, si.flags),
        (XEN_HVM_START_MAGIC, 1, 0)
    );
    assert_eq!(read_cstr(&mem, si.cmdline_paddr), "console=ttyS0 quiet");
    assert_eq!(si.rsdp_paddr, RSDP);
    assert_eq!(si.nr_modules, 1);
    let module: hvm_modlist_entry = read(&mem, si.modlist_paddr);
    assert_eq!(module.paddr, loaded.kernel_end.next_multiple_of(4096));
    assert_eq!(module.size, 5000);
    let byte: u8 = read(&mem, module.paddr + 4999);
    assert_eq!(byte, 0xA5);
    let map = linux_memory_map(&mem);
    assert_eq!(si.memmap_entries as usize, map.len());
    for (i, want) in map.iter().enumerate() {
        let got: hvm_memmap_table_entry = read(&mem, si.memmap_paddr + 24 * i as u64);
        assert_eq!(
            (got.addr, got.size, got.type_),
            (want.base, want.len, want.kind as u32)
        );
    }
}

#[test]
fn pvh_without_modules_or_rsdp_leaves_them_zero() {
    let mem = ram(64 * MIB);
    let image = pvh_elf64();
    let loaded = load(&mem, &linux_request(&image, "", &[])).unwrap();
    let si: hvm_start_info = read(&mem, loaded.info_addr);
    assert_eq!((si.nr_modules, si.modlist_paddr, si.rsdp_paddr), (0, 0, 0));
    assert_eq!(read_cstr(&mem, si.cmdline_paddr), "");
}

#[test]
fn pvh_note_with_4_byte_descriptor_in_elf32() {
    // An ELF32 PVH kernel: the [`elf32`] image with a PT_NOTE added by hand.
    let code = [0xF4u8; 16];
    let mut f = elf32(0x10_0000, 0x10_0000, 0x10_0000, &code, 0);
    let notes = note(
        b"Xen",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &0x10_0004u32.to_le_bytes(),
    );
    // Second program header after the first (at 0x54), data moved behind it.
    f.truncate(0x54);
    f.resize(0x74, 0);
    let code_at = f.len();
    f.extend_from_slice(&code);
    let notes_at = f.len();
    f.extend_from_slice(&notes);
    f[44..46].copy_from_slice(&2u16.to_le_bytes());
    f[0x34 + 4..0x34 + 8].copy_from_slice(&(code_at as u32).to_le_bytes());
    let ph = 0x54;
    f[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&(notes_at as u32).to_le_bytes());
    f[ph + 16..ph + 20].copy_from_slice(&(notes.len() as u32).to_le_bytes());
    f[ph + 20..ph + 24].copy_from_slice(&(notes.len() as u32).to_le_bytes());
    f[ph + 28..ph + 32].copy_from_slice(&4u32.to_le_bytes());
    let mem = ram(8 * MIB);
    let loaded = load(&mem, &linux_request(&f, "", &[])).unwrap();
    assert_eq!(loaded.kind, ImageKind::Pvh);
    assert_eq!(loaded.boot.rip, 0x10_0004);
}

#[test]
fn pvh_note_errors_are_named() {
    let mem = ram(64 * MIB);
    let with_desc = |desc: &[u8]| {
        let notes = note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, desc);
        elf64_with_notes(0x100_0000, 0x100_0000, &[0xF4; 16], &notes)
    };
    let err = |image: Vec<u8>| load(&mem, &linux_request(&image, "", &[])).unwrap_err();
    assert_eq!(
        err(with_desc(&[0; 6])),
        LoaderError::BadPvhNote(PvhError::DescriptorSize(6))
    );
    assert_eq!(
        err(with_desc(&(1u64 << 32).to_le_bytes())),
        LoaderError::BadPvhNote(PvhError::EntryAbove4G(1 << 32))
    );
    assert_eq!(
        err(with_desc(&0x200_0000u64.to_le_bytes())),
        LoaderError::EntryOutsideImage(0x200_0000)
    );
    // A note claiming more bytes than its segment holds.
    let mut broken = with_desc(&0x100_0000u64.to_le_bytes());
    let n = broken.len();
    broken[n - 20..n - 16].copy_from_slice(&0x1000u32.to_le_bytes()); // descsz
    assert_eq!(
        err(broken),
        LoaderError::BadPvhNote(PvhError::MalformedNotes)
    );
}

#[test]
fn xen_note_of_another_type_or_owner_is_plain_elf() {
    let mem = ram(64 * MIB);
    for notes in [
        note(b"Xen", 17, &0x100_0000u64.to_le_bytes()),
        note(
            b"GNU",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0000u64.to_le_bytes(),
        ),
    ] {
        let image = elf64_with_notes(0x100_0000, 0x100_0000, &[0xF4; 16], &notes);
        let loaded = load(&mem, &linux_request(&image, "", &[])).unwrap();
        assert_eq!(loaded.kind, ImageKind::Elf64);
    }
}

#[test]
fn bzimage_enters_startup_64_with_rsi_zero_page() {
    let mem = ram(64 * MIB);
    let image = bzimage();
    let initrd = [0x5Au8; 3000];
    let req = linux_request(&image, "console=ttyS0 root=/dev/ram0", &[&initrd]);
    let loaded = load_with(&mem, &req, &platform()).unwrap();
    assert_eq!(loaded.kind, ImageKind::BzImage);
    assert_eq!(loaded.boot.mode, CpuMode::Long64);
    assert_eq!(loaded.boot.rip, 0x20_0200);
    assert_eq!(loaded.rsi, INFO_BASE);
    assert_eq!(
        (loaded.boot.rax, loaded.boot.rbx, loaded.boot.rdi),
        (0, 0, 0)
    );
    // The protected-mode kernel (after 2 sectors of setup) at pref_address; init_size reserved.
    let byte: u8 = read(&mem, 0x20_0200);
    assert_eq!(byte, 0xF4);
    assert_eq!(loaded.kernel_end, 0x20_0000 + 0x10_0000);
    // Long mode needs the identity page tables.
    assert_ne!(read_u64(&mem, PML4_ADDR), 0);
    let zp: boot_params = read(&mem, loaded.rsi);
    let hdr = zp.hdr;
    let (flag, magic, loader) = (hdr.boot_flag, hdr.header, hdr.type_of_loader);
    assert_eq!(
        (flag, magic, loader),
        (0xAA55, u32::from_le_bytes(*b"HdrS"), 0xFF)
    );
    let (code32, cmd) = (hdr.code32_start, hdr.cmd_line_ptr);
    assert_eq!(code32, 0x20_0000);
    assert_eq!(
        read_cstr(&mem, u64::from(cmd)),
        "console=ttyS0 root=/dev/ram0"
    );
    let (rd_image, rd_size) = (hdr.ramdisk_image, hdr.ramdisk_size);
    assert_eq!((u64::from(rd_image), rd_size), (loaded.kernel_end, 3000));
    let byte: u8 = read(&mem, u64::from(rd_image));
    assert_eq!(byte, 0x5A);
    let rsdp = zp.acpi_rsdp_addr;
    assert_eq!(rsdp, RSDP);
    let map = linux_memory_map(&mem);
    assert_eq!(usize::from(zp.e820_entries), map.len());
    for (got, want) in zp.e820_table.iter().zip(&map) {
        let (addr, size, kind) = (got.addr, got.size, got.r#type);
        assert_eq!((addr, size, kind), (want.base, want.len, want.kind as u32));
    }
}

#[test]
fn bzimage_without_pref_address_loads_at_1mib_and_old_protocol_gets_no_rsdp() {
    let mem = ram(64 * MIB);
    let h = BzHeader {
        pref_address: 0,
        version: 0x020C,
        ..Default::default()
    };
    let image = bzimage_with(&h, &[0xF4; 0x400]);
    let loaded = load_with(&mem, &linux_request(&image, "", &[]), &platform()).unwrap();
    assert_eq!(loaded.boot.rip, 0x10_0200);
    let zp: boot_params = read(&mem, loaded.rsi);
    let (rsdp, rd) = (zp.acpi_rsdp_addr, zp.hdr.ramdisk_image);
    assert_eq!((rsdp, rd), (0, 0));
}

#[test]
fn bzimage_header_errors_are_named() {
    let mem = ram(64 * MIB);
    let kernel = [0xF4u8; 0x400];
    let err = |h: BzHeader| {
        let image = bzimage_with(&h, &kernel);
        load(&mem, &linux_request(&image, "", &[])).unwrap_err()
    };
    let bz = |e| LoaderError::BadBzImage(e);
    let d = BzHeader::default;
    assert_eq!(
        err(BzHeader {
            boot_flag: 0x1234,
            ..d()
        }),
        bz(BzImageError::BadBootFlag(0x1234))
    );
    assert_eq!(
        err(BzHeader {
            version: 0x020B,
            ..d()
        }),
        bz(BzImageError::ProtocolTooOld(0x020B))
    );
    assert_eq!(
        err(BzHeader {
            loadflags: 0,
            ..d()
        }),
        bz(BzImageError::NotLoadedHigh)
    );
    assert_eq!(
        err(BzHeader {
            xloadflags: 2,
            ..d()
        }),
        bz(BzImageError::No64BitEntry)
    );
    let no_kernel = bzimage_with(&d(), &[]);
    assert_eq!(
        load(&mem, &linux_request(&no_kernel, "", &[])).unwrap_err(),
        bz(BzImageError::NoProtectedModeKernel {
            setup: 1024,
            file: 1024
        })
    );
    let short = bzimage_with(&d(), &[0xF4; 0x200]);
    assert_eq!(
        load(&mem, &linux_request(&short, "", &[])).unwrap_err(),
        bz(BzImageError::NoStartup64(0x200))
    );
    let truncated = &bzimage()[..0x210];
    assert_eq!(
        load(&mem, &linux_request(truncated, "", &[])).unwrap_err(),
        bz(BzImageError::HeaderTruncated)
    );
    // init_size beyond RAM: the whole decompression area must fit.
    assert_eq!(
        err(BzHeader {
            init_size: 0x800_0000,
            ..d()
        }),
        LoaderError::OutOfRam {
            what: "kernel segment",
            addr: 0x20_0000,
            len: 0x800_0000
        }
    );
}

#[test]
fn linux_request_errors_are_named() {
    let mem = ram(64 * MIB);
    let image = bzimage();
    let long = "x".repeat(256);
    assert_eq!(
        load(&mem, &linux_request(&image, &long, &[])).unwrap_err(),
        LoaderError::CmdlineTooLong { len: 256, max: 255 }
    );
    assert_eq!(
        load(&mem, &linux_request(&pvh_elf64(), "a\0b", &[])).unwrap_err(),
        LoaderError::CmdlineHasNul
    );
    let two: [&[u8]; 2] = [&[1], &[2]];
    assert_eq!(
        load(&mem, &linux_request(&image, "", &two)).unwrap_err(),
        LoaderError::TooManyModules { count: 2, max: 1 }
    );
    let big_initrd = vec![0u8; 64 * MIB as usize];
    assert!(matches!(
        load(&mem, &linux_request(&pvh_elf64(), "", &[&big_initrd])).unwrap_err(),
        LoaderError::OutOfRam { what: "module", .. }
    ));
}

fn load_any(mem: &GuestRam, image: &[u8]) {
    if let Ok(loaded) = load_with(mem, &linux_request(image, "a", &[&[1, 2, 3]]), &platform()) {
        assert!(loaded.boot.rip <= u64::from(u32::MAX), "{loaded:?}");
        assert_eq!(loaded.info_addr, INFO_BASE);
    }
}

#[test]
fn every_truncation_of_linux_images_fails_cleanly() {
    let mem = ram(64 * MIB);
    for image in [pvh_elf64(), bzimage()] {
        for len in 0..image.len() {
            load_any(&mem, &image[..len]);
        }
    }
}

proptest! {
    #[test]
    fn random_byte_flips_of_linux_images_never_panic(
        pvh in any::<bool>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mem = ram(64 * MIB);
        let mut image = if pvh { pvh_elf64() } else { bzimage() };
        for (at, value) in flips {
            let n = image.len();
            image[at % n] = value;
        }
        load_any(&mem, &image);
    }
}
