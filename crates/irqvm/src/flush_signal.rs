//! The flush signal: a KVM_RUN that passes through KVM's `vcpu_run` loop without entering the
//! guest, for the pause's timer flush (`backend::kvm_timer`).
//!
//! A pause must make KVM inject a LAPIC timer expiry it holds in `lapic_timer.pending`, which
//! only a pass through `vcpu_run`'s loop does. Entering the guest for that (and waiting for the
//! pauser's next kick) lost interrupts here: with the timer's vector in KVM's IRR at the start of
//! such a flush, KVM took it out of IRR for injection, reported the injection completed
//! (KVM_GET_VCPU_EVENTS: `interrupt.injected` 0, `nr` the vector) and yet the guest state read
//! afterwards showed no delivery (its handler never ran, RIP still in the interrupted loop), so
//! the snapshot had the interrupt nowhere (docs/kvm-facts.md). A KVM_RUN that starts with a
//! signal pending never enters the guest: `vcpu_enter_guest` sees the exit request before the
//! entry (cancelling an injection it began, which KVM keeps as `interrupt.injected` 1 for
//! KVM_GET_VCPU_EVENTS and the next entry), the loop injects the held timer expiry into IRR and
//! returns EINTR with KVM_EXIT_INTR. So the guest does not run during a pause at all.
//!
//! The signal ([`flush_signal`], the real-time signal after the kick's) is blocked in every vCPU
//! thread and unblocked only inside KVM_RUN (KVM_SET_SIGNAL_MASK), so the thread can make it
//! pending for itself ([`raise`]) without it being delivered in userspace. KVM restores the
//! thread's mask before KVM_RUN returns, so it stays pending afterwards and [`take`] consumes it.
//! Its handler does nothing; it exists only so that a stray delivery cannot end the process
//! (a real-time signal's default action).

use std::sync::Once;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::kvm::{set_signal_mask, KvmError};

/// The signal a vCPU thread raises for itself before a flushing KVM_RUN.
pub fn flush_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn on_flush(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

static INSTALL: Once = Once::new();

/// Installs the flush signal's (empty) handler for the process (idempotent).
pub fn install_flush_handler() -> Result<(), std::io::Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(flush_signal(), on_flush)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A signal set holding only the flush signal.
fn flush_set() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset initialise and modify a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, flush_signal());
        set
    }
}

/// On the vCPU thread, before its loop: blocks the flush signal in the thread and gives KVM_RUN
/// the thread's previous mask, in which it is not blocked (every other signal, the kick's
/// included, is treated inside KVM_RUN exactly as before).
pub fn arm(vcpu: &VcpuFd) -> Result<(), KvmError> {
    let set = flush_set();
    // SAFETY: a zeroed sigset_t is a valid output buffer for pthread_sigmask.
    let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid and live for the call; the change applies to this thread only.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
    // SAFETY: `previous` was filled in by pthread_sigmask; sigdelset only clears one bit.
    unsafe { libc::sigdelset(&mut previous, flush_signal()) };
    set_signal_mask(vcpu, Some(&previous))?;
    ARMED.with(|armed| armed.set(true));
    Ok(())
}

thread_local! {
    /// [`arm`] succeeded on this thread.
    static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True on a vCPU thread whose KVM_RUN can pass KVM's loop without entering the guest ([`arm`]
/// succeeded on it).
pub fn armed() -> bool {
    ARMED.with(std::cell::Cell::get)
}

/// Makes the flush signal pending on the calling (vCPU) thread; [`arm`] must have run on it.
pub fn raise() {
    // SAFETY: signals the calling thread, which blocks the signal (so it is only made pending).
    unsafe { libc::pthread_kill(libc::pthread_self(), flush_signal()) };
}

/// Consumes every pending instance of the flush signal on the calling thread (real-time signals
/// queue), so that the next KVM_RUN enters the guest again.
pub fn take() {
    let set = flush_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are valid for the call; a null siginfo pointer is allowed.
    while unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) } == flush_signal() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_flush() -> bool {
        // SAFETY: sigpending fills a local sigset_t; sigismember reads it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigpending(&mut set);
            libc::sigismember(&set, flush_signal()) == 1
        }
    }

    /// On a thread that blocks it, a raised flush signal stays pending until taken, every
    /// queued instance at once.
    #[test]
    fn a_raised_flush_stays_pending_until_taken() {
        install_flush_handler().unwrap();
        std::thread::spawn(|| {
            let set = flush_set();
            // SAFETY: blocks the signal in this test thread only.
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            assert!(!pending_flush());
            raise();
            raise();
            assert!(pending_flush());
            take();
            assert!(!pending_flush());
        })
        .join()
        .unwrap();
    }
}
