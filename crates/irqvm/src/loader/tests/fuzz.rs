//! Fuzz-style properties: whatever bytes arrive, `load` returns (no panic, no unbounded
//! allocation), and an image it accepts lies inside RAM, off the boot area, with an entry point
//! the start mode can reach.

use proptest::prelude::*;

use super::*;
use crate::loader::layout::in_ram;

/// Loads `image` and checks what an accepted image must satisfy.
fn load_and_check(mem: &GuestRam, image: &[u8]) {
    let Ok(loaded) = load(mem, &request(image)) else {
        return;
    };
    // Below the boot area (the real-mode IVT page) or above it, never on it.
    let end = loaded.kernel_end;
    assert!(end <= BOOT_GDT_ADDR || end >= BOOT_STACK_TOP, "{loaded:?}");
    assert_eq!(read_u64(mem, BOOT_GDT_ADDR + 8), BOOT_GDT[1]);
    assert!(in_ram(mem, loaded.kernel_end - 1, 1), "{loaded:?}");
    assert!(loaded.boot.rip <= u64::from(u32::MAX), "{loaded:?}");
    assert_eq!(loaded.info_addr, INFO_BASE);
    assert_eq!(loaded.boot.rsp, BOOT_STACK_TOP);
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
            load_and_check(&mem, &image[..len]);
        }
        load(&mem, &request(&image)).unwrap();
    }
}

/// An ELF32 header followed by `phnum` program headers whose every field is arbitrary.
fn elf32_with_program_headers(entry: u32, phdrs: &[[u32; 8]], tail: &[u8]) -> Vec<u8> {
    let mut image = elf32(entry, 0x10_0000, 0x10_0000, &[], 0);
    image.truncate(ELF32_EHSIZE);
    image[44..46].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
    for ph in phdrs {
        for field in ph {
            image.extend_from_slice(&field.to_le_bytes());
        }
    }
    image.extend_from_slice(tail);
    image
}

/// A program header: mostly a plausible PT_LOAD (data in the file, placed near 1 MiB so that
/// segments sometimes overlap, memory size at least the file size), sometimes anything at all.
fn program_header() -> impl Strategy<Value = [u32; 8]> {
    let near = prop_oneof![3 => 0x10_0000u32..0x10_0800, 1 => any::<u32>()];
    let small = prop_oneof![7 => 0u32..0x100, 1 => any::<u32>()];
    (
        prop_oneof![7 => Just(1u32), 1 => any::<u32>()],
        small.clone(),
        near,
        small.clone(),
        small,
        any::<[u32; 2]>(),
    )
        .prop_map(|(p_type, offset, addr, filesz, extra, [flags, align])| {
            let memsz = filesz.saturating_add(extra);
            [p_type, offset, addr, addr, filesz, memsz, flags, align]
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mem = ram(4 * MIB);
        load_and_check(&mem, &bytes);
    }

    /// Random bytes behind a valid ELF identification, so the header reader itself is fuzzed.
    #[test]
    fn random_elf_headers_never_panic(
        class in 1u8..=2,
        rest in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mem = ram(4 * MIB);
        let mut image = vec![0x7F, b'E', b'L', b'F', class, 1, 1];
        image.extend(rest);
        load_and_check(&mem, &image);
    }

    /// Arbitrary program headers; the entry point is usually the first segment's start, so
    /// that images get past the entry check and reach placement.
    #[test]
    fn random_program_headers_never_panic(
        entry in prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)],
        phdrs in proptest::collection::vec(program_header(), 1..6),
        tail in proptest::collection::vec(any::<u8>(), 256..768),
    ) {
        let mem = ram(4 * MIB);
        let entry = entry.unwrap_or(phdrs[0][3]);
        load_and_check(&mem, &elf32_with_program_headers(entry, &phdrs, &tail));
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
        load_and_check(&mem, &image);
    }

    #[test]
    fn random_aout_fields_never_panic(fields in any::<[u32; 5]>(), pad in 0usize..64) {
        let mem = ram(4 * MIB);
        let mut image = vec![0u8; pad * 4];
        image.extend(multiboot_header(MBH_AOUT_KLUDGE, fields));
        image.extend_from_slice(&[0xF4; 64]);
        load_and_check(&mem, &image);
    }

    /// Raw images at any address and entry, in any mode.
    #[test]
    fn random_raw_placements_never_panic(
        load_addr in prop_oneof![0u64..0x40_0000, any::<u64>()],
        entry in prop_oneof![0u64..0x40_0000, any::<u64>()],
        mode in prop_oneof![Just(CpuMode::Real), Just(CpuMode::Protected32), Just(CpuMode::Long64)],
        len in 1usize..64,
    ) {
        let mem = ram(4 * MIB);
        let code = vec![0xF4; len];
        let mut req = request(&code);
        req.raw = Some(RawImage { load_addr, entry, mode });
        if let Ok(loaded) = load(&mem, &req) {
            prop_assert!(in_ram(&mem, load_addr, len as u64));
            prop_assert_eq!(loaded.kernel_end, load_addr + len as u64);
        }
    }
}
