//! The ioctls irqvm wraps itself (kvm-ioctls 0.25 lacks them), against the real KVM.

use irqvm::kvm::{create_vm, inject_interrupt, open_kvm, set_signal_mask, KvmError};

/// KVM_INTERRUPT queues a vector on a VM without an in-kernel LAPIC (the `user` backend's case),
/// and is refused (ENXIO) when KVM owns the LAPIC.
#[test]
fn kvm_interrupt_works_only_without_an_in_kernel_lapic() {
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    inject_interrupt(&vcpu, 0x20).unwrap();

    let vm = create_vm(&kvm).unwrap();
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    match inject_interrupt(&vcpu, 0x20) {
        Err(KvmError::Ioctl { source, .. }) => assert_eq!(source.errno(), libc::ENXIO),
        other => panic!("expected ENXIO, got {other:?}"),
    }
}

/// KVM_SET_SIGNAL_MASK accepts our 8-byte kernel sigset, and the mask can be removed again.
#[test]
fn kvm_set_signal_mask_accepts_a_mask_and_its_removal() {
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // SAFETY: sigemptyset/sigaddset initialise and modify a local sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    };
    set_signal_mask(&vcpu, Some(&set)).unwrap();
    set_signal_mask(&vcpu, None).unwrap();
}

/// The XSAVE area carries what KVM_GET_FPU cannot: AVX's upper YMM halves (and XCR0 through
/// KVM_GET_XCRS). A vCPU's state with YMM values and XCR0 = x87|SSE|AVX, put there with
/// KVM_SET_XSAVE and KVM_SET_XCRS, is read by the snapshot's `capture` and written into a
/// fresh vCPU of another VM by `apply_registers`: the fresh vCPU reads back the same YMM bytes
/// and XCR0, which it does not have before (so a restore without the area would lose them).
/// This host's guests cannot run VEX instructions (docs/kvm-facts.md), so no guest can check it.
#[test]
fn the_xsave_area_carries_ymm_and_xcr0_to_another_vcpu() {
    use irqvm::snapshot::cpu::{apply_registers, capture, CpuCaps};
    use irqvm::snapshot::xstate::{XsaveHost, XMM};
    const YMM_HI: std::ops::Range<usize> = 576..832;
    let kvm = open_kvm().unwrap();
    let supported = irqvm::cpuid::supported_cpuid(&kvm).unwrap();
    let vcpu_of = |vm: &kvm_ioctls::VmFd| {
        let vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_cpuid2(&supported).unwrap();
        vcpu
    };
    let source_vm = create_vm(&kvm).unwrap();
    let host = XsaveHost::probe(&kvm, &source_vm, &supported);
    assert!(host.size >= 4096, "KVM_CAP_XSAVE here");
    if host.supported_xcr0 & 0b111 != 0b111 {
        panic!(
            "this host's KVM offers no AVX state (XCR0 {:#x})",
            host.supported_xcr0
        );
    }
    let caps = CpuCaps {
        xcrs: true,
        xsave: host,
    };
    let source = vcpu_of(&source_vm);
    let mut xcrs = source.get_xcrs().unwrap();
    xcrs.nr_xcrs = 1;
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = 0b111;
    source.set_xcrs(&xcrs).unwrap();
    let mut area = irqvm::snapshot::xstate::read(&source, host)
        .unwrap()
        .unwrap();
    for (i, b) in area.0[XMM].iter_mut().enumerate() {
        *b = i as u8 | 1;
    }
    for (i, b) in area.0[YMM_HI].iter_mut().enumerate() {
        *b = (i as u8) ^ 0xA5;
    }
    area.0[512] |= 0b110; // XSTATE_BV: SSE and AVX hold state
    irqvm::snapshot::xstate::write(&source, &area, host).unwrap();

    let saved = capture(&source, &[], caps).unwrap();
    let saved_area = saved.xsave.clone().unwrap();
    assert_eq!(saved_area.0[YMM_HI], area.0[YMM_HI]);

    let target_vm = create_vm(&kvm).unwrap();
    let target = vcpu_of(&target_vm);
    let fresh = irqvm::snapshot::xstate::read(&target, host)
        .unwrap()
        .unwrap();
    assert_ne!(
        fresh.0[YMM_HI], area.0[YMM_HI],
        "a fresh vCPU has none of it"
    );
    assert_eq!(target.get_xcrs().unwrap().xcrs[0].value, 1);
    let apic_base = saved.sregs.apic_base;
    apply_registers(&target, &saved, apic_base, caps).unwrap();
    let back = irqvm::snapshot::xstate::read(&target, host)
        .unwrap()
        .unwrap();
    assert_eq!(back.0[YMM_HI], area.0[YMM_HI], "YMM upper halves");
    assert_eq!(back.0[XMM], area.0[XMM], "XMM registers");
    assert_eq!(back.xstate_bv() & 0b110, 0b110);
    assert_eq!(target.get_xcrs().unwrap().xcrs[0].value, 0b111, "XCR0");
    assert_eq!(&target.get_fpu().unwrap().xmm[1][..], &area.0[176..192]);
}

/// KVM's dirty page log works here (docs/kvm-facts.md, "Dirty page log"): a slot registered with
/// KVM_MEM_LOG_DIRTY_PAGES reports in KVM_GET_DIRTY_LOG exactly the page a guest store hit, the
/// read clears the log, and a page the guest only read is not reported. Live migration
/// (`irqvm::migrate`) relies on it.
/// 64 KiB of guest RAM at 0 for the real-mode tests.
const REAL_MODE_RAM: u64 = 64 << 10;

/// A VM with [`REAL_MODE_RAM`] at guest address 0 (memory slot flags `slot_flags`) and one vCPU
/// in real mode at 0x1000 with CS and DS base 0, where `code` is placed: a real-mode IP is then a
/// linear and a physical address. The fields drop in order: the vCPU, the VM, then the memory
/// the VM maps.
struct RealMode {
    vcpu: kvm_ioctls::VcpuFd,
    vm: kvm_ioctls::VmFd,
    mem: vm_memory::GuestMemoryMmap,
}

fn real_mode_at_0x1000(code: &[u8], slot_flags: u32) -> RealMode {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REAL_MODE_RAM as usize)]).unwrap();
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: slot_flags,
        guest_phys_addr: 0,
        memory_size: REAL_MODE_RAM,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps REAL_MODE_RAM bytes at `host` and is dropped after `vm` (RealMode's
    // field order).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    RealMode { vcpu, vm, mem }
}

#[test]
fn kvm_dirty_log_reports_guest_writes_once() {
    const SIZE: u64 = REAL_MODE_RAM;
    // mov al, [0x7000]; mov byte [0x5000], 1; hlt.
    let code = [0xA0, 0x00, 0x70, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4];
    let RealMode { mut vcpu, vm, mem } =
        real_mode_at_0x1000(&code, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES);
    assert!(vm
        .get_dirty_log(0, SIZE as usize)
        .unwrap()
        .iter()
        .all(|&w| w == 0));
    match vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::Hlt => {}
        other => panic!("unexpected exit {other:?}"),
    }
    let log = vm.get_dirty_log(0, SIZE as usize).unwrap();
    let dirty: Vec<usize> = (0..(SIZE / 4096) as usize)
        .filter(|&page| log[page / 64] & (1 << (page % 64)) != 0)
        .collect();
    assert_eq!(
        dirty,
        vec![5],
        "the stored page, not the code page nor the read one"
    );
    assert!(
        vm.get_dirty_log(0, SIZE as usize)
            .unwrap()
            .iter()
            .all(|&w| w == 0),
        "read clears"
    );
    drop(vcpu);
    drop(vm);
    drop(mem);
}

/// KVM_GET_DEBUGREGS reports the guest's own DR7 while the VMM's guest debugging (execute
/// breakpoints, KVM_GUESTDBG_USE_HW_BP) is on: the exact-boundaries Stepper, which refuses to
/// step a guest whose DR7 enables a breakpoint, still sees the guest's DR7 while the SYSCALL
/// watch (`emulate::syscall`) holds DR3 and while its own runs hold DR0-DR2, and a guest's own
/// debug registers are kept.
#[test]
fn guest_debug_breakpoints_do_not_show_in_the_guests_dr7() {
    use irqvm::guest_debug::{set_stepper, set_watch, Breaks, Want};
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let before = vcpu.get_debug_regs().unwrap();
    set_watch(&vcpu, Want::Break(Breaks::one(0x10_0240))).unwrap();
    let during = vcpu.get_debug_regs().unwrap();
    assert_eq!(
        during.dr7, before.dr7,
        "the guest's DR7 while DR3 is the VMM's"
    );
    assert_eq!(during.db, before.db, "the guest's DR0-DR3");
    let three = Breaks::new(&[0x10_0100, 0x10_0180, 0x10_01c0]).unwrap();
    set_stepper(&vcpu, Want::Break(three)).unwrap();
    let during = vcpu.get_debug_regs().unwrap();
    assert_eq!(
        (during.dr7, during.db),
        (before.dr7, before.db),
        "the guest's DR0-DR3 and DR7 while all four are the VMM's"
    );
    set_stepper(&vcpu, Want::Nothing).unwrap();
    set_watch(&vcpu, Want::Nothing).unwrap();
    assert_eq!(vcpu.get_debug_regs().unwrap().dr7, before.dr7);
}

/// Each of the stepper's three execute breakpoints (DR0-DR2, `guest_debug::Breaks`) stops the guest
/// right before its instruction (KVM_EXIT_DEBUG with RIP at the address) and the first one reached
/// wins: the stepper's runs over an IF-clear stretch (`backend::stretch`) rely on it. Real mode,
/// CS base 0, so an IP is a linear address; four NOPs then HLT at 0x1000, breakpoints at the second,
/// third and fourth NOP, taken off one by one as they are hit.
#[test]
fn each_of_three_execute_breakpoints_stops_before_its_instruction() {
    use irqvm::guest_debug::{set_stepper, Breaks, Want};
    let RealMode { mut vcpu, vm, mem } = real_mode_at_0x1000(&[0x90, 0x90, 0x90, 0x90, 0xF4], 0);
    // DR0 gets the last NOP, DR2 the first one reached.
    let mut left = vec![0x1003, 0x1002, 0x1001];
    while let Some(&first) = left.last() {
        set_stepper(&vcpu, Want::Break(Breaks::new(&left).unwrap())).unwrap();
        match vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::Debug(_) => {}
            other => panic!("unexpected exit {other:?} with breakpoints at {left:x?}"),
        }
        assert_eq!(vcpu.get_regs().unwrap().rip, first, "stopped before it");
        left.pop();
    }
    set_stepper(&vcpu, Want::Nothing).unwrap();
    match vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::Hlt => {}
        other => panic!("unexpected exit {other:?} after the breakpoints"),
    }
    assert_eq!(vcpu.get_regs().unwrap().rip, 0x1005, "past the HLT");
    drop(vcpu);
    drop(vm);
    drop(mem);
}

/// Registers handed over through `kvm_run`'s synced registers (KVM_CAP_SYNC_REGS, marked dirty)
/// are applied by the next KVM_RUN even when it returns at once for `immediate_exit`, before it
/// checks that flag: the `user` backend relies on it when it writes a SIPI's CS and RIP that way
/// (`backend::user::reset::stage_sipi`), and a KVM_GET_REGS afterwards reads the new values.
#[test]
fn synced_registers_are_applied_by_a_kvm_run_that_returns_at_once() {
    use kvm_ioctls::SyncReg;
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let fields = kvm.check_extension_int(kvm_ioctls::Cap::SyncRegs) as u32;
    let wanted = kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_SREGS;
    assert_eq!(
        fields & wanted,
        wanted,
        "KVM_CAP_SYNC_REGS is {fields:#x} here"
    );
    let mut sregs = vcpu.get_sregs().unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    sregs.cs.selector = 0x0800;
    sregs.cs.base = 0x8000;
    regs.rip = 0x42;
    regs.rbx = 0x1234_5678;
    let synced = vcpu.sync_regs_mut();
    synced.sregs = sregs;
    synced.regs = regs;
    vcpu.set_sync_dirty_reg(SyncReg::Register);
    vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
    vcpu.get_kvm_run().immediate_exit = 1;
    let ran = vcpu.run().map(|_| ()).map_err(|e| e.errno());
    assert_eq!(ran, Err(libc::EINTR));
    assert_eq!(
        vcpu.get_kvm_run().kvm_dirty_regs,
        0,
        "KVM took the dirty bits"
    );
    let (sregs, regs) = (vcpu.get_sregs().unwrap(), vcpu.get_regs().unwrap());
    assert_eq!((sregs.cs.selector, sregs.cs.base), (0x0800, 0x8000));
    assert_eq!((regs.rip, regs.rbx), (0x42, 0x1234_5678));
}

/// `user` mode puts a guest's IA32_APIC_BASE change into KVM's copy through the system
/// registers KVM copied into `kvm_run` at the exit (`reset::stage_apic_base`, issue 13) instead of
/// KVM_SET_MSRS: the next KVM_RUN (here one that returns at once) must make it what KVM answers
/// for MSR 0x1B and what it derives CPUID.1:EDX[9] (APIC present) from, and leave the rest of the
/// system registers as they were.
#[test]
fn a_synced_apic_base_is_kvms_msr_and_cpuid_bit_after_the_next_kvm_run() {
    use kvm_ioctls::SyncReg;
    const APIC_BASE: u32 = 0x1B;
    const EN: u64 = 1 << 11;
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let run_at_once = |vcpu: &mut kvm_ioctls::VcpuFd| {
        vcpu.get_kvm_run().immediate_exit = 1;
        let ran = vcpu.run().map(|_| ()).map_err(|e| e.errno());
        vcpu.get_kvm_run().immediate_exit = 0;
        assert_eq!(ran, Err(libc::EINTR));
    };
    let msr = |vcpu: &kvm_ioctls::VcpuFd| {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: APIC_BASE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    };
    let apic_bit = |vcpu: &kvm_ioctls::VcpuFd| {
        let cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        leaf1.edx & (1 << 9) != 0
    };
    vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
    run_at_once(&mut vcpu);
    let before = vcpu.sync_regs().sregs;
    assert_eq!(
        before.apic_base,
        msr(&vcpu),
        "KVM copied its IA32_APIC_BASE out"
    );
    assert!(before.apic_base & EN != 0 && apic_bit(&vcpu));

    let disabled = before.apic_base & !EN;
    vcpu.sync_regs_mut().sregs.apic_base = disabled;
    vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
    run_at_once(&mut vcpu);
    assert_eq!(
        vcpu.get_kvm_run().kvm_dirty_regs,
        0,
        "KVM took the dirty bit"
    );
    assert_eq!(msr(&vcpu), disabled);
    assert!(!apic_bit(&vcpu), "CPUID.1:EDX[9] follows EN");
    let after = vcpu.get_sregs().unwrap();
    assert_eq!(after.apic_base, disabled);
    assert_eq!(
        (after.cs.selector, after.cs.base, after.cr0, after.efer),
        (before.cs.selector, before.cs.base, before.cr0, before.efer)
    );
}
