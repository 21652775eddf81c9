//! The one place irqvm calls KVM_SET_GUEST_DEBUG.
//!
//! KVM_SET_GUEST_DEBUG replaces a vCPU's whole guest-debug state (control flags and the
//! debug registers KVM loads instead of the guest's), but two parts of irqvm want something
//! from it at the same time: the exact-boundaries [`Stepper`](crate::backend::step::Stepper)
//! (single-stepping, or execute breakpoints in DR0-DR2: at an IRETQ's return address, or where
//! an IF-clear stretch of code can end) and the SYSCALL watch of [`crate::emulate::syscall`]
//! (an execute breakpoint in DR3 at the guest's page-fault handler, and one single step to get
//! past it). Each states what it wants here; `apply` composes the two into one
//! `kvm_guest_debug` and issues the ioctl when the result changes.
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

/// DR7 Ln (bit 2n): the local enable of breakpoint n; R/Wn = LENn = 0 make it an execute
/// breakpoint (SDM vol. 3 §18.2.4).
const fn dr7_local(n: usize) -> u64 {
    1 << (2 * n)
}
const DR3: usize = 3;
const DR7: usize = 7;

/// Up to three execute breakpoints at linear addresses: the stepper's, in DR0-DR2 (the
/// watch's one is DR3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaks {
    at: [u64; Breaks::MAX],
    len: u8,
}

impl Breaks {
    /// DR0-DR2.
    pub const MAX: usize = 3;

    /// One breakpoint.
    pub fn one(at: u64) -> Self {
        Self {
            at: [at, 0, 0],
            len: 1,
        }
    }

    /// One to [`Self::MAX`] breakpoints; `None` for none or more.
    pub fn new(at: &[u64]) -> Option<Self> {
        if at.is_empty() || at.len() > Self::MAX {
            return None;
        }
        let mut breaks = Self {
            at: [0; Self::MAX],
            len: at.len() as u8,
        };
        breaks.at[..at.len()].copy_from_slice(at);
        Some(breaks)
    }

    pub fn addresses(&self) -> &[u64] {
        &self.at[..usize::from(self.len)]
    }

    /// The address, if this is a single breakpoint.
    pub fn single(&self) -> Option<u64> {
        (self.len == 1).then_some(self.at[0])
    }
}

/// What one user of guest debugging asks KVM for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Want {
    #[default]
    Nothing,
    /// KVM_GUESTDBG_SINGLESTEP: exit after the next instruction.
    Step,
    /// Execute breakpoints at these linear addresses: exit before such an instruction runs
    /// (the watch uses one).
    Break(Breaks),
}

#[derive(Default)]
struct State {
    /// The vCPU fd the state belongs to.
    fd: Option<RawFd>,
    stepper: Want,
    watch: Want,
    /// What KVM holds now: control, DR0-DR3 and DR7 (`None`: never set by irqvm).
    applied: Option<(u32, [u64; 4], u64)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::default();
}

/// The Stepper's part (DR0-DR2 for its breakpoints).
pub fn set_stepper(vcpu: &VcpuFd, want: Want) -> Result<(), kvm_ioctls::Error> {
    update(vcpu, |s| s.stepper = want)
}

/// The SYSCALL watch's part (DR3 for its breakpoint: the first of a [`Want::Break`]).
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
    let mut addresses = [0; 4];
    addresses.copy_from_slice(&dbg.arch.debugreg[..4]);
    let key = (dbg.control, addresses, dbg.arch.debugreg[DR7]);
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
    if let Want::Break(breaks) = stepper {
        for (n, &at) in breaks.addresses().iter().enumerate() {
            dbg.arch.debugreg[n] = at;
            dbg.arch.debugreg[DR7] |= dr7_local(n);
        }
    }
    if let Want::Break(breaks) = watch {
        dbg.arch.debugreg[DR3] = breaks.addresses()[0];
        dbg.arch.debugreg[DR7] |= dr7_local(DR3);
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
        let dbg = compose(
            Want::Break(Breaks::one(0x1000)),
            Want::Break(Breaks::one(0x2000)),
        );
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            "no stepping"
        );
        assert_eq!(dbg.arch.debugreg[0], 0x1000);
        assert_eq!(dbg.arch.debugreg[3], 0x2000);
        assert_eq!(dbg.arch.debugreg[7], dr7_local(0) | dr7_local(3));
    }

    #[test]
    fn the_stepper_may_use_three_breakpoints() {
        let breaks = Breaks::new(&[0x1000, 0x1100, 0x1200]).unwrap();
        let dbg = compose(Want::Break(breaks), Want::Break(Breaks::one(0x2000)));
        assert_eq!(dbg.arch.debugreg[..4], [0x1000, 0x1100, 0x1200, 0x2000]);
        assert_eq!(
            dbg.arch.debugreg[7], 0b0101_0101,
            "L0-L3, execute, length 1"
        );
        assert!(Breaks::new(&[]).is_none());
        assert!(Breaks::new(&[1, 2, 3, 4]).is_none(), "DR3 is the watch's");
        assert_eq!(breaks.single(), None);
        assert_eq!(Breaks::one(7).single(), Some(7));
    }

    #[test]
    fn a_step_of_either_keeps_the_others_breakpoint() {
        let dbg = compose(Want::Step, Want::Break(Breaks::one(0x2000)));
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(dbg.arch.debugreg[3], 0x2000);
        assert_eq!(dbg.arch.debugreg[7], dr7_local(3));
        let dbg = compose(Want::Break(Breaks::one(0x1000)), Want::Step);
        assert_eq!(
            dbg.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(dbg.arch.debugreg[7], dr7_local(0));
        let dbg = compose(Want::Nothing, Want::Step);
        assert_eq!(dbg.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
    }
}
