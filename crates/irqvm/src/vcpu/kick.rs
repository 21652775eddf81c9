//! The kick: forcing a vCPU thread out of KVM_RUN (seed 001), race-free.
//!
//! Mechanism: a real-time signal ([`kick_signal`]) sent to the vCPU thread with `pthread_kill`.
//! Its handler stores 1 into `kvm_run.immediate_exit` of the vCPU that thread runs, found
//! through a thread-local pointer. The vCPU loop clears `immediate_exit` after KVM_RUN returns
//! EINTR.
//!
//! Why no kick is lost. The kicker always publishes its request first (stop flag, posted
//! interrupt, ping generation: a Release store or a lock) and signals second. The vCPU thread
//! checks its requests before every KVM_RUN and, after an EINTR return, clears `immediate_exit`
//! *before* checking them again. Wherever the signal lands on the vCPU thread:
//!
//! 1. before the request check: the check sees the request (published before the signal);
//!    `immediate_exit` stays 1 until the next EINTR return, costing one spurious return;
//! 2. between the check and the KVM_RUN ioctl: `immediate_exit` is 1, so KVM_RUN returns EINTR
//!    without entering the guest, and the next check sees the request;
//! 3. inside KVM_RUN, in or out of guest mode: the pending signal makes KVM leave with EINTR
//!    (KVM tests `signal_pending` before each entry, with interrupts off); the handler runs on
//!    the way out and sets `immediate_exit`, which the loop then clears;
//! 4. after KVM_RUN returned (normal exit): `immediate_exit` is 1, case 2 applies to the next
//!    KVM_RUN.
//!
//! The clear happens only after an EINTR return and is followed by a request check, so clearing
//! can never swallow a kick whose request has not been seen. A handler that does nothing would
//! lose kicks in case 2 (the signal is consumed before the ioctl starts): measured 121 lost of
//! 300 in `kvm-facts.md`.
//!
//! Async-signal safety: the handler reads a const-initialised thread-local `Cell` (no lazy
//! initialisation, no allocation, no destructor registration) and does one atomic byte store.
//! The pointer is set before the thread becomes kickable and reset before the `VcpuFd` (whose
//! mmap holds `kvm_run`) is dropped; as the handler runs on the same thread, it sees either a
//! valid pointer or null.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, Once};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// `&kvm_run.immediate_exit` of the vCPU this thread runs, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

/// The real-time signal used for kicks (the first one glibc leaves to applications).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let target = IMMEDIATE_EXIT
        .try_with(Cell::get)
        .unwrap_or(ptr::null_mut());
    if !target.is_null() {
        // SAFETY: a non-null pointer is `&kvm_run.immediate_exit` of the VcpuFd this thread owns,
        // live until `KickRegistration::drop` resets the pointer on this same thread (see the
        // module docs). The byte is shared with the kernel and written atomically.
        unsafe { AtomicU8::from_ptr(target) }.store(1, Ordering::SeqCst);
    }
}

static INSTALL: Once = Once::new();

/// Installs the kick signal handler for the process (idempotent).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// `kvm_run.immediate_exit` of one vCPU, accessed atomically (the kick handler writes it).
#[derive(Clone, Copy, Debug)]
pub struct ImmediateExit(*mut u8);

impl ImmediateExit {
    /// # Safety
    /// `ptr` must point at `immediate_exit` inside a live `kvm_run` mapping that outlives every
    /// use of the returned value.
    pub unsafe fn new(ptr: *mut u8) -> Self {
        Self(ptr)
    }

    pub fn clear(&self) {
        // SAFETY: guaranteed live by the contract of `new`.
        unsafe { AtomicU8::from_ptr(self.0) }.store(0, Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        // SAFETY: guaranteed live by the contract of `new`.
        unsafe { AtomicU8::from_ptr(self.0) }.load(Ordering::SeqCst) != 0
    }
}

/// The kickable identity of one vCPU thread, shared with every thread that may kick it.
#[derive(Debug, Default)]
pub struct KickTarget {
    /// The vCPU thread while it runs its loop; `None` before and after. Sending under the lock
    /// means a signal never goes to a thread that has left its loop.
    thread: Mutex<Option<libc::pthread_t>>,
    sent: AtomicU64,
}

impl KickTarget {
    /// Forces the vCPU out of KVM_RUN (or makes its next KVM_RUN return at once). Publish the
    /// request before calling. Returns false if the thread is not in its loop (then it will see
    /// the request when it starts, or has stopped).
    pub fn kick(&self) -> bool {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        let Some(thread) = *thread else {
            return false;
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `thread` is a live thread: it unregisters (under this lock) before exiting.
        let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
        rc == 0
    }

    /// Kicks sent so far.
    pub fn kicks_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Makes the calling thread the kick target, with `immediate_exit` as the byte the handler
    /// sets. Kicks reach it until the returned guard drops.
    pub fn register(&self, immediate_exit: ImmediateExit) -> KickRegistration<'_> {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit.0));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
        KickRegistration { target: self }
    }
}

/// While alive, the current thread receives kicks for its [`KickTarget`].
pub struct KickRegistration<'a> {
    target: &'a KickTarget,
}

impl Drop for KickRegistration<'_> {
    fn drop(&mut self) {
        // Order: stop new signals first, then forget the pointer. A signal already in flight
        // runs its handler on this thread either before the reset (valid pointer) or after
        // (null): never on freed memory.
        *self.target.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
        IMMEDIATE_EXIT.with(|c| c.set(ptr::null_mut()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// The handler sets the registered byte on the registered thread only; after the
    /// registration is dropped kicks are refused.
    #[test]
    fn handler_sets_the_registered_byte() {
        install_kick_handler().unwrap();
        let target = Arc::new(KickTarget::default());
        let byte = Arc::new(AtomicU8::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (target, byte, ready, done) =
                (target.clone(), byte.clone(), ready.clone(), done.clone());
            std::thread::spawn(move || {
                // SAFETY: `byte` outlives the registration (both live in this closure).
                let ie = unsafe { ImmediateExit::new(byte.as_ptr()) };
                let reg = target.register(ie);
                ready.store(true, Ordering::SeqCst);
                let start = Instant::now();
                while byte.load(Ordering::SeqCst) == 0 && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(reg);
                done.store(true, Ordering::SeqCst);
            })
        };
        while !ready.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        assert!(target.kick());
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(byte.load(Ordering::SeqCst), 1);
        assert!(!target.kick(), "no kicks after unregistering");
        assert_eq!(target.kicks_sent(), 1);
    }
}
