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
