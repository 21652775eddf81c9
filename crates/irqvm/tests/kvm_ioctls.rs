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

/// KVM's dirty page log works here (docs/kvm-facts.md, "Dirty page log"): a slot registered with
/// KVM_MEM_LOG_DIRTY_PAGES reports in KVM_GET_DIRTY_LOG exactly the page a guest store hit, the
/// read clears the log, and a page the guest only read is not reported. Live migration
/// (`irqvm::migrate`) relies on it.
#[test]
fn kvm_dirty_log_reports_guest_writes_once() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    const SIZE: u64 = 64 << 10;
    let kvm = open_kvm().unwrap();
    let vm = create_vm(&kvm).unwrap();
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
    // Real mode at 0x1000: mov al, [0x7000]; mov byte [0x5000], 1; hlt.
    let code = [0xA0, 0x00, 0x70, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4];
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: SIZE,
        userspace_addr: host as u64,
    };
    // SAFETY: `mem` maps SIZE bytes at `host` and outlives `vm` (dropped after it).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
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
