use super::*;

/// Guest memory as one flat, identity-mapped range, with holes that refuse every access.
struct Flat {
    bytes: Vec<u8>,
    holes: Vec<std::ops::Range<u64>>,
    fetches_only_below: Option<u64>,
    /// User pages under SMAP: a read gets through only with AC.
    smap_user: Option<std::ops::Range<u64>>,
}

impl Flat {
    fn new() -> Self {
        Self {
            bytes: vec![0; 0x20000],
            holes: Vec::new(),
            fetches_only_below: None,
            smap_user: None,
        }
    }

    fn put(&mut self, at: u64, data: &[u8]) {
        self.bytes[at as usize..at as usize + data.len()].copy_from_slice(data);
    }

    fn put_qwords(&mut self, at: u64, qwords: &[u64]) {
        for (i, q) in qwords.iter().enumerate() {
            self.put(at + 8 * i as u64, &q.to_le_bytes());
        }
    }
}

impl Memory for Flat {
    fn read(&mut self, at: u64, out: &mut [u8], access: Access) -> bool {
        let Some(end) = at.checked_add(out.len() as u64) else {
            return false;
        };
        if end > self.bytes.len() as u64 || self.holes.iter().any(|h| h.start < end && at < h.end) {
            return false;
        }
        if access == Access::Fetch && self.fetches_only_below.is_some_and(|limit| end > limit) {
            return false;
        }
        let user = self
            .smap_user
            .as_ref()
            .is_some_and(|u| u.start < end && at < u.end);
        if user && access == (Access::Read { ac: false }) {
            return false;
        }
        out.copy_from_slice(&self.bytes[at as usize..end as usize]);
        true
    }
}

const STUB: u64 = 0x2000;
const GDT: u64 = 0x3000;
const RETURN_RIP: u64 = 0x5000;
const INTERRUPTED_RSP: u64 = 0x1_8000;
const FRAME: u64 = INTERRUPTED_RSP - 40;

/// The guest library's interrupt stub after its call returns: POP r15 ... r8, rbp, rdi, rsi,
/// rdx, rcx, rbx, rax; ADD RSP, 16 (vector and error code); IRETQ.
const STUB_EPILOGUE: &[u8] = &[
    0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x41, 0x5b, 0x41, 0x5a, 0x41, 0x59, 0x41, 0x58,
    0x5d, 0x5f, 0x5e, 0x5a, 0x59, 0x5b, 0x58, 0x48, 0x83, 0xc4, 0x10, 0x48, 0xcf,
];

/// The values the stub restores, in its pop order (r15 first).
const SAVED: [u64; 15] = [
    0xF15, 0xF14, 0xF13, 0xF12, 0xF11, 0xF10, 0xF09, 0xF08, 0xB9, 0xD1, 0x51, 0xD8, 0xC8, 0xB8,
    0xA8,
];

fn code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: 0x08,
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn stack_segment() -> kvm_segment {
    kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code_segment()
    }
}

fn target() -> Target {
    Target {
        frame: FRAME,
        rip: RETURN_RIP,
        rsp: INTERRUPTED_RSP,
        cs: code_segment(),
        ss: stack_segment(),
        gdt_base: GDT,
        gdt_limit: 0x17,
    }
}

/// A handler about to RET into the stub, the stack as the stub and the injection left it.
fn handler_at_ret(image: u64) -> (Flat, kvm_regs) {
    let mut mem = Flat::new();
    mem.put(0x1000, &[0xc3]);
    mem.put(STUB, STUB_EPILOGUE);
    mem.put_qwords(GDT, &[0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]);
    mem.put_qwords(FRAME, &[RETURN_RIP, 0x08, image, INTERRUPTED_RSP, 0x10]);
    mem.put_qwords(FRAME - 16, &[0x70, 0]);
    let saved_at = FRAME - 16 - 8 * SAVED.len() as u64;
    mem.put_qwords(saved_at, &SAVED);
    mem.put_qwords(saved_at - 8, &[STUB]);
    let regs = kvm_regs {
        rip: 0x1000,
        rsp: saved_at - 8,
        rflags: 0x46, // IF clear in the handler; ZF, PF from its last compare
        rax: 1,
        rcx: 2,
        r15: 3,
        ..Default::default()
    };
    (mem, regs)
}

#[test]
fn the_stub_s_restores_and_iretq_give_the_interrupted_registers() {
    let (mut mem, regs) = handler_at_ret(0x202);
    let after = finish(&regs, &target(), &mut mem).unwrap();
    let got = [
        after.r15, after.r14, after.r13, after.r12, after.r11, after.r10, after.r9, after.r8,
        after.rbp, after.rdi, after.rsi, after.rdx, after.rcx, after.rbx, after.rax,
    ];
    assert_eq!(got, SAVED);
    assert_eq!(after.rip, RETURN_RIP);
    assert_eq!(after.rsp, INTERRUPTED_RSP);
    assert_eq!(after.rflags, 0x202, "the image, not the ADD's flags");
}

#[test]
fn a_frame_that_returns_elsewhere_is_not_taken() {
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME, &[RETURN_RIP + 1]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::OtherFrame { rsp: FRAME })
    );
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME + 8, &[0x18]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::OtherFrame { rsp: FRAME })
    );
}

#[test]
fn an_iretq_at_another_stack_slot_is_not_the_target_s() {
    // The stub entered one POP late: its IRETQ comes 8 bytes above the frame.
    let (mut mem, mut regs) = handler_at_ret(0x202);
    regs.rsp += 16;
    regs.rip = STUB;
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::OtherFrame { rsp: FRAME + 8 })
    );
}

#[test]
fn flags_images_that_load_more_than_plain_flags_are_left_to_the_guest() {
    for image in [
        0x302,
        0x4202,
        0x1_0202,
        0x2_0202,
        0x8202,
        0x0002,
        1 << 22 | 0x202,
    ] {
        let (mut mem, regs) = handler_at_ret(image);
        assert_eq!(
            finish(&regs, &target(), &mut mem),
            Err(Stop::Flags { image }),
            "{image:#x}"
        );
    }
    // IOPL, AC, ID, DF and the arithmetic flags go through as they are.
    let image = 0x3000 | (1 << 18) | (1 << 21) | 0xCD7 | 0x200;
    let (mut mem, regs) = handler_at_ret(image);
    assert_eq!(
        finish(&regs, &target(), &mut mem).unwrap().rflags,
        image | 2
    );
}

#[test]
fn nt_set_in_the_handler_makes_the_iret_a_task_return() {
    let (mut mem, mut regs) = handler_at_ret(0x202);
    regs.rflags |= RFLAGS_NT;
    assert!(matches!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Flags { .. })
    ));
}

#[test]
fn an_instruction_that_writes_memory_stops_the_attempt_where_it_is() {
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put(STUB + 4, &[0x48, 0x89, 0x18]); // mov [rax], rbx
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unsupported {
            rip: STUB + 4,
            opcode: 0x48
        })
    );
    // A legacy prefix is not decoded either (a 16-bit POP would take 2 bytes).
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put(STUB, &[0x66, 0x58]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unsupported {
            rip: STUB,
            opcode: 0x66
        })
    );
}

#[test]
fn unreadable_stack_code_or_descriptor_stops_the_attempt() {
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.holes.push(FRAME + 16..FRAME + 24);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unreadable { at: FRAME + 16 })
    );
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.holes.push(STUB..STUB + 1);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unreadable { at: STUB })
    );
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.holes.push(GDT + 8..GDT + 16);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Descriptor { selector: 8 })
    );
}

#[test]
fn an_instruction_running_into_a_page_it_may_not_fetch_stops_there() {
    // `add rsp, 16` split after its ModRM byte: the imm8 lies in the next page.
    let mut mem = Flat::new();
    let at = 0x3FFD;
    mem.put(at, &[0x48, 0x83, 0xc4, 0x10]);
    mem.fetches_only_below = Some(0x4000);
    let regs = kvm_regs {
        rip: at,
        rsp: 0x8000,
        ..Default::default()
    };
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unreadable { at: 0x4000 })
    );
    // One that ends before the page runs.
    mem.put(0x3FFE, &[0x5b, 0xeb]); // pop rbx; then a jmp cut at the page end
    let regs = kvm_regs {
        rip: 0x3FFE,
        rsp: 0x8000,
        ..Default::default()
    };
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unreadable { at: 0x4000 })
    );
}

#[test]
fn a_descriptor_that_differs_from_the_loaded_segment_is_not_reloaded() {
    let (mut mem, regs) = handler_at_ret(0x202);
    // The GDT's code descriptor has DPL 3 now: the IRETQ would reload something else.
    mem.put_qwords(GDT + 8, &[0x00AF_FB00_0000_FFFF]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Descriptor { selector: 8 })
    );
    // Not yet marked accessed: the IRETQ would write the bit.
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(GDT + 16, &[0x00CF_9200_0000_FFFF]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Descriptor { selector: 0x10 })
    );
    // Past the GDT's limit.
    let (mut mem, regs) = handler_at_ret(0x202);
    let t = Target {
        gdt_limit: 0x0F,
        ..target()
    };
    assert_eq!(
        finish(&regs, &t, &mut mem),
        Err(Stop::Descriptor { selector: 0x10 })
    );
}

#[test]
fn a_null_stack_segment_returns_as_it_was() {
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME + 32, &[0]);
    let t = Target {
        ss: kvm_segment {
            selector: 0,
            unusable: 1,
            ..stack_segment()
        },
        ..target()
    };
    assert_eq!(finish(&regs, &t, &mut mem).unwrap().rip, RETURN_RIP);
}

#[test]
fn jumps_nops_lea_and_rep_ret_on_the_way_out() {
    let mut mem = Flat::new();
    mem.put_qwords(GDT, &[0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]);
    mem.put_qwords(FRAME, &[RETURN_RIP, 0x08, 0x246, INTERRUPTED_RSP, 0x10]);
    // 0x1000: nop; jmp +2 (over two junk bytes); lea rsp, [rsp+0x18]; jmp rel32 to 0x1100
    mem.put(
        0x1000,
        &[
            0x90, 0xeb, 0x02, 0x0f, 0x0b, 0x48, 0x8d, 0x64, 0x24, 0x18, 0xe9, 0xf1, 0x00, 0x00,
            0x00,
        ],
    );
    // 0x1100: pop rsi; rep ret (to 0x1200)
    mem.put(0x1100, &[0x5e, 0xf3, 0xc3]);
    // 0x1200: lea rcx, [rsp-8] (disp32); iretq
    mem.put(
        0x1200,
        &[0x48, 0x8d, 0x8c, 0x24, 0xf8, 0xff, 0xff, 0xff, 0x48, 0xcf],
    );
    let rsp = FRAME - 0x18 - 16;
    mem.put_qwords(FRAME - 16, &[0x51, 0x1200]);
    let regs = kvm_regs {
        rip: 0x1000,
        rsp,
        ..Default::default()
    };
    let after = finish(&regs, &target(), &mut mem).unwrap();
    assert_eq!(after.rsi, 0x51);
    assert_eq!(after.rcx, FRAME - 8);
    assert_eq!(
        (after.rip, after.rsp, after.rflags),
        (RETURN_RIP, INTERRUPTED_RSP, 0x246)
    );
}

#[test]
fn pop_rsp_loads_the_value_read() {
    let (mut mem, mut regs) = handler_at_ret(0x202);
    // pop rsp, then the stub's IRETQ from where the popped value points.
    mem.put(0x1000, &[0x5c, 0x48, 0xcf]);
    mem.put_qwords(regs.rsp, &[FRAME]);
    regs.rip = 0x1000;
    assert_eq!(finish(&regs, &target(), &mut mem).unwrap().rip, RETURN_RIP);
}

#[test]
fn a_loop_without_an_iretq_ends_after_the_budget() {
    let (mut mem, mut regs) = handler_at_ret(0x202);
    mem.put(0x1000, &[0xeb, 0xfe]);
    regs.rip = 0x1000;
    assert_eq!(finish(&regs, &target(), &mut mem), Err(Stop::TooLong));
}

#[test]
fn a_return_to_a_non_canonical_address_is_the_guest_s_own_fault() {
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(regs.rsp, &[0x0000_8000_0000_0000]);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::NonCanonical { rip: 0x1000 })
    );
}

#[test]
fn add_sets_the_arithmetic_flags_as_the_sdm_defines_them() {
    let (cf, pf, af, zf, sf, of) = (0x1, 0x4, 0x10, 0x40, 0x80, 0x800);
    assert_eq!(add_flags(u64::MAX, 1, 0), cf | pf | af | zf);
    let max = i64::MAX as u64;
    assert_eq!(add_flags(max, 1, max + 1), pf | af | sf | of);
    assert_eq!(add_flags(0x10, 0x10, 0x20), 0);
    assert_eq!(add_flags(0x1, 0x2, 0x3), pf);
    // ADD through the decoder: the flags it leaves are the ones computed.
    let mut mem = Flat::new();
    mem.put(
        0x1000,
        &[0x49, 0x81, 0xc0, 0x01, 0x00, 0x00, 0x00, 0xeb, 0xfe],
    ); // add r8, 1; jmp $
    let regs = kvm_regs {
        rip: 0x1000,
        r8: u64::MAX,
        rflags: 0x2 | 0x800,
        ..Default::default()
    };
    let mut cpu = Cpu { regs };
    assert_eq!(cpu.execute(&target(), &mut mem), Ok(None));
    assert_eq!(cpu.regs.r8, 0);
    assert_eq!(cpu.regs.rflags, 0x2 | cf | pf | af | zf);
    assert_eq!(cpu.regs.rip, 0x1007);
}

#[test]
fn smap_guards_the_descriptor_read_whatever_ac_says() {
    // The stack on a user page is read with the handler's AC; the GDT read is an implicit
    // supervisor access, which SMAP refuses on a user page even with AC set (SDM vol. 3 §4.6.1).
    let (mut mem, mut regs) = handler_at_ret(0x202);
    regs.rflags |= 1 << 18;
    mem.smap_user = Some(0x1_0000..0x2_0000);
    assert_eq!(finish(&regs, &target(), &mut mem).unwrap().rip, RETURN_RIP);
    mem.smap_user = Some(GDT..GDT + 0x1000);
    assert_eq!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Descriptor { selector: 8 })
    );
    regs.rflags &= !(1 << 18);
    mem.smap_user = Some(0x1_0000..0x2_0000);
    assert!(matches!(
        finish(&regs, &target(), &mut mem),
        Err(Stop::Unreadable { .. })
    ));
}

#[test]
fn a_stack_selector_with_rpl_or_a_null_code_selector_is_not_returned_to() {
    // SS = 0x13 (RPL 3) at CPL 0, as a SYSCALL with such a STAR leaves it: the IRETQ takes #GP.
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME + 32, &[0x13]);
    let t = Target {
        ss: kvm_segment {
            selector: 0x13,
            ..stack_segment()
        },
        ..target()
    };
    assert_eq!(
        finish(&regs, &t, &mut mem),
        Err(Stop::Descriptor { selector: 0x13 })
    );
    // A null SS with RPL 1.
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME + 32, &[0x1]);
    let t = Target {
        ss: kvm_segment {
            selector: 0x1,
            unusable: 1,
            ..stack_segment()
        },
        ..target()
    };
    assert!(finish(&regs, &t, &mut mem).is_err());
    // A null CS.
    let (mut mem, regs) = handler_at_ret(0x202);
    mem.put_qwords(FRAME + 8, &[0]);
    let t = Target {
        cs: kvm_segment {
            selector: 0,
            unusable: 1,
            ..code_segment()
        },
        ..target()
    };
    assert_eq!(
        finish(&regs, &t, &mut mem),
        Err(Stop::Descriptor { selector: 0 })
    );
}

#[test]
fn a_descriptor_ending_at_the_gdt_limit_is_inside_it() {
    let (mut mem, regs) = handler_at_ret(0x202);
    let t = Target {
        gdt_limit: 0x17,
        ..target()
    };
    assert_eq!(finish(&regs, &t, &mut mem).unwrap().rip, RETURN_RIP);
    let t = Target {
        gdt_limit: 0x16,
        ..target()
    };
    assert_eq!(
        finish(&regs, &t, &mut mem),
        Err(Stop::Descriptor { selector: 0x10 })
    );
}

/// Encodings next to the ones run, which mean something else: each must stop the attempt at its
/// first byte rather than run as its neighbour.
#[test]
fn look_alike_encodings_are_not_run() {
    let cases: &[&[u8]] = &[
        &[0x41, 0x90],                   // XCHG r8, rax, not NOP
        &[0xcf],                         // IRETD: a 32-bit frame
        &[0x83, 0xc4, 0x10],             // ADD esp, 16: zeroes RSP's upper half
        &[0x48, 0x83, 0xc8, 0x10],       // OR rax, 16 (/1)
        &[0x48, 0x83, 0x04, 0x24, 0x10], // ADD [rsp], 16: a store
        &[0x48, 0x8d, 0x24, 0x24],       // LEA rsp, [rsp] with mod 0
        &[0x49, 0x8d, 0x64, 0x24, 0x08], // LEA rsp, [r12+8] (REX.B)
        &[0x4a, 0x8d, 0x64, 0x24, 0x08], // LEA with REX.X
        &[0x48, 0xc3],                   // RET with REX.W
        &[0x66, 0xc3],                   // RET with an operand-size prefix
        &[0x48, 0xe9, 0, 0, 0, 0],       // JMP with REX
        &[0xc2, 0x08, 0x00],             // RET imm16
        &[0x8f, 0xc0],                   // POP r/m64
    ];
    for code in cases {
        let mut mem = Flat::new();
        mem.put(0x1000, code);
        let regs = kvm_regs {
            rip: 0x1000,
            rsp: 0x8000,
            ..Default::default()
        };
        assert_eq!(
            finish(&regs, &target(), &mut mem),
            Err(Stop::Unsupported {
                rip: 0x1000,
                opcode: code[0]
            }),
            "{code:02x?}"
        );
    }
}

#[test]
fn add_rsp_with_a_negative_imm32_moves_it_down() {
    let mut mem = Flat::new();
    mem.put(
        0x1000,
        &[0x48, 0x81, 0xc4, 0xf0, 0xff, 0xff, 0xff, 0xeb, 0xfe],
    );
    let regs = kvm_regs {
        rip: 0x1000,
        rsp: 0x8000,
        ..Default::default()
    };
    let mut cpu = Cpu { regs };
    assert_eq!(cpu.execute(&target(), &mut mem), Ok(None));
    assert_eq!((cpu.regs.rsp, cpu.regs.rip), (0x7FF0, 0x1007));
}

#[test]
fn code_at_the_top_of_the_address_space_is_fetched_without_overflow() {
    // Memory where every address reads as NOPs, the top page included.
    struct Nops;
    impl Memory for Nops {
        fn read(&mut self, at: u64, out: &mut [u8], _: Access) -> bool {
            out.fill(0x90);
            at.checked_add(out.len() as u64 - 1).is_some()
        }
    }
    // `add rsp, 16` in the last 3 bytes: its imm8 would lie past 2^64.
    struct Top;
    impl Memory for Top {
        fn read(&mut self, at: u64, out: &mut [u8], _: Access) -> bool {
            if at.checked_add(out.len() as u64 - 1).is_none() {
                return false;
            }
            for (i, b) in out.iter_mut().enumerate() {
                *b = match at.wrapping_add(i as u64).wrapping_neg() {
                    3 => 0x48,
                    2 => 0x83,
                    1 => 0xc4,
                    _ => 0x90,
                };
            }
            true
        }
    }
    let regs = kvm_regs {
        rip: 0xFFFF_FFFF_FFFF_FFF8,
        rsp: 0x8000,
        ..Default::default()
    };
    let mut cpu = Cpu { regs };
    assert_eq!(cpu.execute(&target(), &mut Nops), Ok(None));
    assert_eq!(cpu.regs.rip, 0xFFFF_FFFF_FFFF_FFF9);
    let regs = kvm_regs {
        rip: 0xFFFF_FFFF_FFFF_FFFD,
        ..regs
    };
    // The first byte it could not fetch is 2^64, reported as the address wraps.
    assert_eq!(
        finish(&regs, &target(), &mut Top),
        Err(Stop::Unreadable { at: 0 })
    );
}
