//! The multiboot info block (spec §3.3), field by field.

use super::*;
use crate::loader::layout::{memory_map, MapEntry, RangeKind};
use crate::loader::multiboot::info::{MBI_CMDLINE, MBI_MEMORY, MBI_MMAP, MBI_MODS};
use crate::memory::HIGH_RAM_START;

#[test]
fn info_block_memory_fields_spec_3_3() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let info = load(&mem, &request(&image)).unwrap().info_addr;
    assert_eq!(info, INFO_BASE);
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
    assert_eq!(
        map.last().unwrap(),
        &MapEntry {
            base: HIGH_RAM_START,
            len: 64 * MIB,
            kind: RangeKind::Ram
        }
    );
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
fn two_modules_follow_each_other_page_aligned() {
    let mem = ram(64 * MIB);
    let image = multiboot_elf32();
    let (a, b) = (vec![1u8; 5000], vec![2u8; 10]);
    let mut req = request(&image);
    for (data, name) in [(&a, "a"), (&b, "b")] {
        req.modules.push(Module {
            data,
            cmdline: name.into(),
        });
    }
    let info = load(&mem, &req).unwrap().info_addr;
    assert_eq!(read_u32(&mem, info + 20), 2);
    let mods = u64::from(read_u32(&mem, info + 24));
    let (a_start, a_end) = (read_u32(&mem, mods), read_u32(&mem, mods + 4));
    let b_start = read_u32(&mem, mods + 16);
    assert_eq!(a_end - a_start, 5000);
    assert_eq!(b_start, a_end.next_multiple_of(4096));
    assert_eq!(read_cstr(&mem, u64::from(read_u32(&mem, mods + 24))), "b");
}
