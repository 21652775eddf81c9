//! Every way an image or request can be wrong gives the error that names it.

use super::*;
use crate::loader::elf;
use crate::loader::multiboot::find_header;

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
    assert_eq!(find_header(&h).unwrap(), None);
}

#[test]
fn header_beyond_8k_is_not_found_spec_3_1_1() {
    let mut image = vec![0u8; 8192];
    image.extend(multiboot_header(0, [0; 5]));
    assert_eq!(find_header(&image).unwrap(), None);
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
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::BadMultiboot(MultibootError::NoLoadInformation)
    );
}

#[test]
fn truncated_aout_fields_are_refused() {
    let mem = ram(8 * MIB);
    let image = multiboot_header(MBH_AOUT_KLUDGE, [0; 5]);
    assert_eq!(
        load(&mem, &request(&image[..20])).unwrap_err(),
        LoaderError::BadMultiboot(MultibootError::AddressFieldsTruncated)
    );
}

#[test]
fn aout_with_inconsistent_addresses_is_refused() {
    use MultibootError::*;
    let mem = ram(64 * MIB);
    let cases: [([u32; 5], LoaderError); 6] = [
        (
            [0x10_0000, 0x20_0000, 0, 0, 0x20_0000],
            HeaderBelowLoadAddr.into(),
        ),
        (
            [0x20_1000, 0x20_0000, 0, 0, 0x20_1000],
            LoadAddrBeforeFile.into(),
        ),
        (
            [0x20_0000, 0x20_0000, 0x30_0000, 0, 0x20_0000],
            LoadEndBeyondFile.into(),
        ),
        (
            [0x20_0000, 0x20_0000, 0x1F_0000, 0, 0x20_0000],
            LoadEndBelowLoadAddr.into(),
        ),
        (
            [0x20_0000, 0x20_0000, 0x20_0010, 0x20_0008, 0x20_0000],
            BssEndBelowLoadEnd.into(),
        ),
        (
            [0x20_0000, 0x20_0000, 0, 0, 0x90_0000],
            LoaderError::EntryOutsideImage(0x90_0000),
        ),
    ];
    for (fields, expected) in cases {
        let image = multiboot_header(MBH_AOUT_KLUDGE, fields);
        assert_eq!(
            load(&mem, &request(&image)).unwrap_err(),
            expected,
            "{fields:x?}"
        );
    }
}

#[test]
fn segment_outside_ram_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x4000_0000, 0x4000_0000, 0x4000_0000, &[0xF4], 0);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::OutOfRam {
            what: "kernel segment",
            addr: 0x4000_0000,
            len: 1
        }
    );
}

#[test]
fn segment_on_the_boot_area_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x8000, 0x8000, 0x8000, &[0xF4], 0);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OverlapsBootArea { addr: 0x8000, .. })
    ));
}

#[test]
fn raw_image_on_the_boot_area_is_refused() {
    let mem = ram(8 * MIB);
    let code = [0xF4];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x1_0000,
        entry: 0x1_0000,
        mode: CpuMode::Real,
    });
    assert!(matches!(
        load(&mem, &req),
        Err(LoaderError::OverlapsBootArea {
            what: "raw image",
            ..
        })
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
fn huge_elf64_segment_is_refused() {
    let mem = ram(8 * MIB);
    let mut image = elf64(0x20_0000, 0x20_0000, &[0xF4]);
    image[0x40 + 40..0x40 + 48].copy_from_slice(&(u64::MAX - 0x1000).to_le_bytes());
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::BadElf(ElfError::SegmentWraps)
    );
    image[0x40 + 40..0x40 + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OutOfRam { .. })
    ));
}

#[test]
fn overlapping_segments_are_refused_before_anything_is_written() {
    let mem = ram(8 * MIB);
    let (a, b) = ([0xAAu8; 0x100], [0xBBu8; 0x100]);
    let seg = |paddr, code| Seg {
        vaddr: paddr,
        paddr,
        code,
        bss: 0,
    };
    let image = elf32_segments(0x10_0000, &[seg(0x10_0000, &a), seg(0x10_0080, &b)]);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::OverlappingSegments {
            first: 0x10_0000,
            second: 0x10_0080
        }
    );
    assert_eq!(read_u32(&mem, 0x10_0000), 0, "nothing may be copied");
}

#[test]
fn refused_entry_writes_nothing() {
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
    assert_eq!(read_u32(&mem, 0x10_0000), 0);
    assert_eq!(read_u64(&mem, BOOT_GDT_ADDR + 8), 0);
}

/// Each header field broken on its own, and the error that names it.
#[test]
fn elf_header_errors_are_named() {
    use ElfError::*;
    let good = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4], 0);
    let with = |at: usize, bytes: &[u8]| {
        let mut image = good.clone();
        image[at..at + bytes.len()].copy_from_slice(bytes);
        image
    };
    let ph = ELF32_EHSIZE;
    let mut filesz_gt_memsz = with(ph + 16, &2u32.to_le_bytes());
    filesz_gt_memsz.push(0xF4);
    let cases = [
        (good[..40].to_vec(), HeaderTruncated),
        (good[..5].to_vec(), HeaderTruncated),
        (with(0, b"\x7fELG"), NoMagic),
        (with(4, &[3]), UnknownClass(3)),
        (with(5, &[2]), NotLittleEndian),
        (with(6, &[0]), UnsupportedVersion),
        (with(16, &[3]), NotExecutable(3)),
        (with(18, &[40]), NotI386(40)),
        (with(42, &[40]), ProgramHeaderSize(40)),
        (with(44, &[0]), NoProgramHeaders),
        (
            with(28, &0xFFFF_FFF0u32.to_le_bytes()),
            ProgramHeadersOutsideFile,
        ),
        (with(44, &[2]), ProgramHeadersOutsideFile),
        (filesz_gt_memsz, FileSizeExceedsMemSize),
        (with(ph + 20, &0u32.to_le_bytes()), NoLoadableSegment),
        (with(ph, &4u32.to_le_bytes()), NoLoadableSegment), // PT_NOTE only
        (
            with(ph + 16, &[0x00, 0x10, 0, 0, 0x00, 0x10, 0, 0]),
            SegmentDataOutsideFile,
        ),
        (
            with(ph + 4, &0xFFFF_FFF0u32.to_le_bytes()),
            SegmentDataOutsideFile,
        ),
    ];
    for (i, (image, expected)) in cases.into_iter().enumerate() {
        assert_eq!(elf::parse(&image).unwrap_err(), expected, "case {i}");
    }
}

#[test]
fn elf32_paddr_plus_memsz_past_4g_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0xFFFF_FF00, 0xFFFF_FF00, 0xFFFF_FF00, &[0xF4; 4], 0x1000);
    assert!(matches!(
        load(&mem, &request(&image)),
        Err(LoaderError::OutOfRam { .. })
    ));
}

#[test]
fn elf64_header_errors_are_named() {
    let good = elf64(0x20_0000, 0x20_0000, &[0xF4]);
    let mut wrong_machine = good.clone();
    wrong_machine[18] = 3; // i386 in an ELF64 file
    assert_eq!(
        elf::parse(&wrong_machine).unwrap_err(),
        ElfError::NotX86_64(3)
    );
    let mut small_phdrs = good.clone();
    small_phdrs[54] = 32; // ELF32 entry size in an ELF64 file
    assert_eq!(
        elf::parse(&small_phdrs).unwrap_err(),
        ElfError::ProgramHeaderSize(32)
    );
}

#[test]
fn too_many_program_headers_are_refused() {
    let n = elf::MAX_PHNUM + 1;
    let mut image = elf32(0x10_0000, 0x10_0000, 0x10_0000, &[0xF4], 0);
    image.resize(ELF32_EHSIZE + n * ELF32_PHENTSIZE, 0);
    image[44..46].copy_from_slice(&(n as u16).to_le_bytes());
    assert_eq!(
        elf::parse(&image).unwrap_err(),
        ElfError::TooManyProgramHeaders {
            count: n,
            max: elf::MAX_PHNUM
        }
    );
}

#[test]
fn elf_entry_outside_segments_is_refused() {
    let mem = ram(8 * MIB);
    let image = elf32(0x50_0000, 0x10_0000, 0x10_0000, &[0xF4], 0);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::EntryOutsideImage(0x50_0000)
    );
    let image = elf64(0x50_0000, 0x20_0000, &[0xF4]);
    assert_eq!(
        load(&mem, &request(&image)).unwrap_err(),
        LoaderError::EntryOutsideImage(0x50_0000)
    );
}

#[test]
fn raw_real_mode_entry_must_be_below_1m() {
    let mem = ram(8 * MIB);
    let code = [0xF4];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x9_F000,
        entry: 0x10_0000,
        mode: CpuMode::Real,
    });
    assert_eq!(
        load(&mem, &req).unwrap_err(),
        LoaderError::RealModeEntry(0x10_0000)
    );
}

#[test]
fn raw_protected_entry_above_4g_is_refused() {
    let mem = ram(8 * MIB);
    let code = [0xF4];
    let mut req = request(&code);
    req.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 1 << 32,
        mode: CpuMode::Protected32,
    });
    assert_eq!(
        load(&mem, &req).unwrap_err(),
        LoaderError::EntryAbove4G(1 << 32)
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
fn oversized_command_line_is_refused() {
    let mem = ram(8 * MIB);
    let image = multiboot_elf32();
    let mut req = request(&image);
    req.cmdline = "x".repeat(1 << 20);
    assert_eq!(load(&mem, &req).unwrap_err(), LoaderError::BootInfoTooLarge);
}

#[test]
fn errors_name_the_problem_in_words() {
    let text = LoaderError::BadElf(ElfError::NotI386(40)).to_string();
    assert_eq!(
        text,
        "malformed ELF image: ELF32 image is not for i386 (e_machine 40)"
    );
    let text = LoaderError::OverlappingSegments {
        first: 0x10_0000,
        second: 0x10_0080,
    }
    .to_string();
    assert!(
        text.contains("0x100000") && text.contains("0x100080"),
        "{text}"
    );
}
