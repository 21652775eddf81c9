//! The one place irqvm calls KVM_SET_GUEST_DEBUG.
//!
//! KVM_SET_GUEST_DEBUG replaces a vCPU's whole guest-debug state (control flags and the
//! debug registers KVM loads instead of the guest's), but two parts of irqvm want something
//! from it at the same time: the exact-boundaries [`Stepper`](crate::backend::step::Stepper)
//! (single-stepping, or an execute breakpoint in DR0 at an IRETQ's return address) and the
//! SYSCALL watch of [`crate::emulate::syscall`] (an execute breakpoint in DR3 at the guest's
//! page-fault handler, and one single step to get past it). Each states what it wants here;
//! `apply` composes the two into one `kvm_guest_debug` and issues the ioctl when the result
//! changes. DR1 and DR2 are free.
//!
//! The state is per vCPU and lives in the vCPU's thread (each vCPU has its own thread, and
//! both users run only there); it also remembers which vCPU fd it was applied to, so a thread
//! that drives another vCPU starts from nothing.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;

/// DR7 L0 and L3: local enables of breakpoints 0 and 3; R/Wn = LENn = 0 make each an
/// execute breakpoint (SDM vol. 3 §18.2.4).
const DR7_L0: u64 = 1 << 0;
const DR7_L3: u64 = 1 << 6;
const DR0: usize = 0;
const DR3: usize = 3;
const DR7: usize = 7;

/// What one user of guest debugging asks KVM for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Want {
    #[default]
    Nothing,
    /// KVM_GUESTDBG_SINGLESTEP: exit after the next instruction.
    Step,
    /// An execute breakpoint at this linear address: exit before that instruction runs.
    Break(u64),
}

#[derive(Default)]
struct State {
    /// The vCPU fd the state belongs to.
    fd: Option<RawFd>,
    stepper: Want,
    watch: Want,
    /// What KVM holds now (`None`: never set by irqvm).
    applied: Option<(u32, u64, u64, u64)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// The Stepper's part (DR0 for its breakpoint).
pub fn set_stepper(vcpu: &VcpuFd, want: Want) -> Result<(), kvm_ioctls::Error> {
    update(vcpu, |s| s.stepper = want)
}

/// The SYSCALL watch's part (DR3 for its breakpoint).
pub fn set_watch(vcpu: &VcpuFd, want: Want) -> Result<(), kvm_ioctls::Error> {
    update(vcpu, |s| s.watch = want)
}

fn update(vcpu: &VcpuFd, change: impl FnOnce(&mut State)) -> Result<(), kvm_ioctls::Error> {
    STATE.with(|cell| {
        let mut state = cell.borrow_mut();
        if state.fd != Some(vcpu.as_raw_fd()) {
            *state = State {
                fd: Some(vcpu.as_raw_fd()),
                ..State::default()
            };
        }
        change(&mut state);
        apply(vcpu, &mut state)
    })
}

/// Composes both parts and issues KVM_SET_GUEST_DEBUG if the result differs from what KVM
/// holds. Turning everything off is one ioctl with control 0 (KVM then restores the guest's
/// own debug registers).
fn apply(vcpu: &VcpuFd, state: &mut State) -> Result<(), kvm_ioctls::Error> {
    let dbg = compose(state.stepper, state.watch);
    let key = (
        dbg.control,
        dbg.arch.debugreg[DR0],
        dbg.arch.debugreg[DR3],
        dbg.arch.debugreg[DR7],
    );
    let unchanged = state.applied == Some(key) || (state.applied.is_none() && dbg.control == 0);
    if unchanged {
        return Ok(());
    }
    vcpu.set_guest_debug(&dbg)?;
    state.applied = Some(key);
    Ok(())
}

fn compose(stepper: Want, watch: Want) -> kvm_guest_debug {
    let mut dbg = kvm_guest_debug::default();
    let step = stepper == Want::Step || watch == Want::Step;
    if let Want::Break(at) = stepper {
        dbg.arch.debugreg[DR0] = at;
        dbg.arch.debugreg[DR7] |= DR7_L0;
    }
    if let Want::Break(at) = watch {
        dbg.arch.debugreg[DR3] = at;
        dbg.arch.debugreg[DR7] |= DR7_L3;
    }
    if step {
        dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
    }
    if dbg.arch.debugreg[DR7] != 0 {
        dbg.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
    }
    dbg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_control_zero() {
        let dbg = compose(Want::Nothing, Want::Nothing);
        assert_eq!(dbg.control, 0);
        assert_eq!(dbg.arch.debugreg, [0; 8]);
    }

    #[test]
    fn the_stepper_owns_dr0_and_the_watch_dr3() {
        let dbg = compose(Want::Break(0x1000), Want::Break(0x2000));
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            "no stepping"
        );
        assert_eq!(dbg.arch.debugreg[0], 0x1000);
        assert_eq!(dbg.arch.debugreg[3], 0x2000);
        assert_eq!(dbg.arch.debugreg[7], DR7_L0 | DR7_L3);
    }

    #[test]
    fn a_step_of_either_keeps_the_others_breakpoint() {
        let dbg = compose(Want::Step, Want::Break(0x2000));
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(dbg.arch.debugreg[3], 0x2000);
        assert_eq!(dbg.arch.debugreg[7], DR7_L3);
        let dbg = compose(Want::Break(0x1000), Want::Step);
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(dbg.arch.debugreg[7], DR7_L0);
        let dbg = compose(Want::Nothing, Want::Step);
        assert_eq!(dbg.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
    }
}
