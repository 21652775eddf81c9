//! KVM's paravirtual EOI in `user` mode (Linux Documentation/virt/kvm/x86/msr.rst,
//! MSR_KVM_PV_EOI_EN; CPUID 0x40000001 EAX bit 6, `crate::cpuid`).
//!
//! The guest names a 4-byte word of its RAM with the MSR. While a run may retire the highest
//! in-service vector without an exit ([`irqchip::vcpu::VcpuInterrupts::arm_paravirtual_eoi`]),
//! the vCPU thread sets bit 0 of that word before KVM_RUN; a guest handler that finds it set
//! clears it with one instruction and skips its EOI write, which in `user` mode is an exit
//! (MMIO, or the filtered x2APIC EOI MSR). At the run's return the vCPU thread reads the word:
//! clear means the guest made that EOI, and the model makes it; still set, the thread clears
//! it, so that every EOI after this run is a register write again. So the flag is set only
//! while this vCPU is in KVM_RUN, and only this vCPU's thread writes it (the ABI's promise: the
//! guest needs no lock against the hypervisor). Linux uses it whenever KVM advertises it
//! (`kvm_guest_apic_eoi_write`), on every interrupt whose handler runs without an exit to its
//! EOI: a timer tick, a reschedule IPI.
//!
//! KVM keeps the MSR for `user` mode too (it accepts it without an in-kernel LAPIC and does
//! nothing with it): the MSR filter sends the guest's writes here, which checks them as KVM
//! does and copies an accepted value into KVM, so that the guest's RDMSR (not filtered),
//! snapshots and INIT (`reset`) see KVM's copy as in the other modes.

use irqchip::Vector;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::reset::write_msr;
use crate::kvm::KvmError;
use crate::memory::GuestRam;

/// MSR_KVM_PV_EOI_EN.
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4B56_4D04;
/// Bit 0 of the MSR (enabled) and of the guest's word (the EOI write may be skipped).
const ENABLED: u64 = 1;

/// One vCPU's paravirtual EOI state.
#[derive(Debug, Default)]
pub struct PvEoi {
    /// MSR_KVM_PV_EOI_EN as the guest last wrote it (or a restore or INIT set it).
    msr: u64,
    /// KVM's copy of the MSR is older than `msr` ([`Self::push_to_kvm`]).
    kvm_stale: bool,
    /// The run in progress may retire this vector through the guest's word: set right before
    /// KVM_RUN ([`Self::arm`]), taken at its return ([`Self::take_guest_eoi`]).
    armed: Option<Vector>,
}

impl PvEoi {
    /// The guest's word, while the guest has PV EOI enabled.
    fn word(&self) -> Option<GuestAddress> {
        (self.msr & ENABLED != 0).then_some(GuestAddress(self.msr & !ENABLED))
    }

    /// The guest writes MSR_KVM_PV_EOI_EN: false means #GP, as KVM answers
    /// (`kvm_lapic_set_pv_eoi`): an address part (bits 63:1) that is not 4-byte aligned, enabled
    /// or not, or an enabled word that is not guest RAM. Accepted, the value reaches KVM's copy
    /// before the next KVM_RUN or pause ([`Self::push_to_kvm`]).
    pub fn guest_write(&mut self, value: u64, ram: &GuestRam) -> bool {
        let address = value & !ENABLED;
        if address % 4 != 0 {
            return false;
        }
        if value & ENABLED != 0 && !ram.address_in_range(GuestAddress(address)) {
            return false;
        }
        self.msr = value;
        self.kvm_stale = true;
        true
    }

    /// KVM's copy, after a restore wrote it (KVM_SET_MSRS of the saved MSRs).
    pub fn restored(&mut self, msr: u64) {
        *self = Self {
            msr,
            ..Self::default()
        };
    }

    /// INIT clears the MSR (KVM's `kvm_lapic_reset`). `kvm_cleared`: the INIT's register writes
    /// cleared KVM's copy too (`reset::apply_init`); else it is cleared before the next entry.
    pub fn init(&mut self, kvm_cleared: bool) {
        let stale = self.kvm_stale || (self.msr != 0 && !kvm_cleared);
        *self = Self {
            kvm_stale: stale,
            ..Self::default()
        };
    }

    /// Copies an accepted guest write into KVM.
    pub fn push_to_kvm(&mut self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        if std::mem::take(&mut self.kvm_stale) {
            write_msr(vcpu, MSR_KVM_PV_EOI_EN, self.msr)?;
        }
        Ok(())
    }

    /// Right before KVM_RUN, with `vector` the one the model armed: sets bit 0 of the guest's
    /// word. False (nothing armed) when PV EOI is off or the word cannot be written; the guest
    /// then EOIs with a register write, which is always correct.
    pub fn arm(&mut self, vector: Vector, ram: &GuestRam) -> bool {
        let Some(word) = self.word() else {
            return false;
        };
        // KVM writes the word's low byte whole (1 here, 0 below).
        if ram.write_obj(1u8, word).is_err() {
            return false;
        }
        self.armed = Some(vector);
        true
    }

    /// True when a vector may be armed at all (the guest enabled PV EOI): asked before the
    /// model publishes anything for it.
    pub fn enabled(&self) -> bool {
        self.word().is_some()
    }

    /// At a KVM_RUN return (exit or EINTR, before the exit is handled): the vector the guest
    /// retired by clearing its word, which the model must now EOI; `None` when nothing was
    /// armed or the guest left the bit set, which is cleared here. A word that cannot be read
    /// counts as cleared, as in KVM (`pv_eoi_test_and_clr_pending`).
    pub fn take_guest_eoi(&mut self, ram: &GuestRam) -> Option<Vector> {
        let vector = self.armed.take()?;
        let word = self.word()?;
        match ram.read_obj::<u8>(word) {
            Ok(byte) if u64::from(byte) & ENABLED != 0 => {
                let _ = ram.write_obj(0u8, word);
                None
            }
            _ => Some(vector),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// KVM's checks (`kvm_lapic_set_pv_eoi`): the address part 4-byte aligned whether enabled
    /// or not, an enabled word in guest RAM.
    #[test]
    fn msr_writes_are_checked_as_kvm_checks_them() {
        let ram = ram();
        let mut pv = PvEoi::default();
        assert!(!pv.guest_write(0x1002, &ram), "bit 1 set, disabled");
        assert!(!pv.guest_write(0x1003, &ram), "bit 1 set, enabled");
        assert!(!pv.guest_write((2 << 20) | 1, &ram), "enabled past RAM");
        assert!(!pv.enabled());
        assert!(
            pv.guest_write(2 << 20, &ram),
            "disabled: any aligned address"
        );
        assert!(!pv.enabled());
        assert!(pv.guest_write(0x1001, &ram));
        assert!(pv.enabled());
        assert!(pv.kvm_stale);
    }

    /// Armed, the word's bit 0 is set for the run; the guest clearing it is its EOI, leaving it
    /// set is none (and the bit is cleared).
    #[test]
    fn the_word_is_set_for_the_run_and_read_back_at_its_return() {
        let ram = ram();
        let mut pv = PvEoi::default();
        assert!(!pv.arm(0x30, &ram), "not enabled");
        assert!(pv.guest_write(0x1001, &ram));
        assert!(pv.arm(0x30, &ram));
        assert_eq!(ram.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 1);
        assert_eq!(pv.take_guest_eoi(&ram), None, "the guest left it set");
        assert_eq!(ram.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert_eq!(pv.take_guest_eoi(&ram), None, "nothing armed");
        assert!(pv.arm(0x31, &ram));
        ram.write_obj(0u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(pv.take_guest_eoi(&ram), Some(0x31), "the guest's EOI");
        assert_eq!(pv.take_guest_eoi(&ram), None, "taken once");
    }

    /// INIT clears the MSR; KVM's copy needs a write only where the INIT did not clear it.
    #[test]
    fn init_clears_the_msr() {
        let ram = ram();
        let mut pv = PvEoi::default();
        assert!(pv.guest_write(0x1001, &ram));
        pv.kvm_stale = false;
        pv.init(true);
        assert!(!pv.enabled() && !pv.kvm_stale);
        assert!(pv.guest_write(0x1001, &ram));
        pv.kvm_stale = false;
        pv.init(false);
        assert!(!pv.enabled() && pv.kvm_stale);
    }
}
