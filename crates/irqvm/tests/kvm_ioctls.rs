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
