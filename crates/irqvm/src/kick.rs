//! The kick: forcing a vCPU thread out of KVM_RUN (seed 001), race-free.
//!
//! Mechanism: a real-time signal ([`kick_signal`]) sent to the vCPU thread with `pthread_kill`.
//! Its handler stores 1 into `kvm_run.immediate_exit` of the vCPU that thread runs, found
//! through a thread-local pointer. The vCPU loop clears `immediate_exit` after KVM_RUN returns
//! EINTR.
//!
//! Why no kick is lost. The kicker always publishes its request first (stop flag, posted
//! interrupt, ping generation: a Release store or a lock) and signals second. The vCPU thread
//! clears `immediate_exit` at the top of its loop and *then* checks its requests (stop, pings, the
//! backend's `before_entry`, which drains the posting inbox) before every KVM_RUN. Wherever the
//! signal lands on the vCPU thread:
//!
//! 1. before the clear (including right after a normal KVM_RUN return): the check that
//!    follows the clear sees the request (published before the signal);
//! 2. between the clear and the KVM_RUN ioctl: the check sees the request if it comes after the
//!    signal, and in any case `immediate_exit` is 1, so KVM_RUN returns EINTR without entering the
//!    guest and the next iteration's check sees it;
//! 3. inside KVM_RUN, in or out of guest mode: the pending signal makes KVM leave with EINTR
//!    (KVM tests `signal_pending` before each entry, with interrupts off); the handler runs on
//!    the way out and sets `immediate_exit`, and the next iteration clears it, then checks.
//!
//! Every clear is followed by a request check, so clearing can never swallow a kick whose
//! request has not been seen. (Clearing at the top of every iteration, not only after an EINTR
//! return, is what lets a vCPU thread kick itself for free: a post to itself while it handles an
//! exit sets `immediate_exit` directly, and the clear before the drain takes it back, so the
//! next KVM_RUN enters the guest instead of returning EINTR at once.) A handler that does nothing would
//! lose kicks in case 2 (the signal is consumed before the ioctl starts): measured 121 lost of
//! 300 in `docs/kvm-facts.md`.
//!
//! Async-signal safety: the handler reads a const-initialised thread-local `Cell` (no lazy
//! initialisation, no allocation, no destructor registration) and does one atomic byte store.
//! The pointer is set before the thread becomes kickable and reset before the `VcpuFd` (whose
//! mmap holds `kvm_run`) is dropped; as the handler runs on the same thread, it sees either a
//! valid pointer or null.

use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Once;

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
        // A non-null pointer is `&kvm_run.immediate_exit` of the VcpuFd this thread owns, live
        // until `KickRegistration::drop` resets the pointer on this same thread (module docs).
        // SAFETY: so it is live here; the byte is shared with the kernel and written atomically.
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
    /// The caller's SAFETY obligation: `ptr` points at `immediate_exit` inside a live `kvm_run`
    /// mapping that outlives every use of the returned value.
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
///
/// Lock-free: a kick is two atomic RMWs and, unless the kicker is the vCPU thread itself, one
/// `pthread_kill`. `thread` holds the registered `pthread_t` (0 = none); `in_flight` counts kickers
/// between reading `thread` and returning from `pthread_kill`. Unregistering stores 0 and then
/// waits for `in_flight` to drain, so no signal is sent to a thread that has left its loop. Both
/// sides write one location and then read the other (SeqCst), the Dekker pattern: either the
/// kicker sees 0, or the unregistering thread sees the kicker in flight and waits for it.
#[derive(Debug, Default)]
pub struct KickTarget {
    thread: AtomicU64,
    in_flight: AtomicU32,
    sent: AtomicU64,
}

thread_local! {
    /// The `KickTarget` registered by this thread (a vCPU thread), or null.
    static CURRENT_TARGET: Cell<*const KickTarget> = const { Cell::new(ptr::null()) };
}

impl KickTarget {
    /// Forces the vCPU out of KVM_RUN (or makes its next KVM_RUN return at once). Publish the
    /// request before calling. Returns false if the thread is not in its loop (then it will see
    /// the request when it starts, or has stopped).
    ///
    /// A vCPU thread kicking itself (a self-IPI, a device it emulates interrupting it) is outside
    /// KVM_RUN: it sets its own `immediate_exit`, what the signal handler would do, without the
    /// signal. The loop then sees the request at its next check (see `VcpuThread::run_loop`).
    pub fn kick(&self) -> bool {
        if CURRENT_TARGET.with(Cell::get) == ptr::from_ref(self) {
            set_own_immediate_exit();
            self.sent.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let thread = self.thread.load(Ordering::SeqCst);
        let sent = thread != 0 && {
            self.sent.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a non-zero value is a live thread: it unregisters (stores 0) and then waits
            // for `in_flight` to drop to 0 before it can exit (see the type's documentation).
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) == 0 }
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        sent
    }

    /// Kicks sent so far.
    pub fn kicks_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Makes the calling thread the kick target, with `immediate_exit` as the byte the handler
    /// sets. Kicks reach it until the returned guard drops.
    pub fn register(&self, immediate_exit: ImmediateExit) -> KickRegistration<'_> {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit.0));
        CURRENT_TARGET.with(|c| c.set(ptr::from_ref(self)));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.thread.store(me as u64, Ordering::SeqCst);
        KickRegistration { target: self }
    }
}

/// Kicks the calling vCPU thread itself, without a signal: its next KVM_RUN returns at once
/// (after completing a pending MMIO/PIO read), unless the top of its loop clears it first. A
/// no-op on a thread that is not a registered vCPU thread.
pub fn kick_self() {
    set_own_immediate_exit();
}

/// What the kick handler does, done by the vCPU thread to itself.
fn set_own_immediate_exit() {
    let target = IMMEDIATE_EXIT.with(Cell::get);
    if !target.is_null() {
        // SAFETY: as in `on_kick`: the registered byte of the VcpuFd this thread owns.
        unsafe { AtomicU8::from_ptr(target) }.store(1, Ordering::SeqCst);
    }
}

/// While alive, the current thread receives kicks for its [`KickTarget`].
pub struct KickRegistration<'a> {
    target: &'a KickTarget,
}

impl Drop for KickRegistration<'_> {
    fn drop(&mut self) {
        // Order: stop new signals first (and wait for kickers already past the check), then
        // forget the pointer. A signal already in flight runs its handler on this thread either
        // before the reset (valid pointer) or after (null): never on freed memory.
        self.target.thread.store(0, Ordering::SeqCst);
        while self.target.in_flight.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        CURRENT_TARGET.with(|c| c.set(ptr::null()));
        IMMEDIATE_EXIT.with(|c| c.set(ptr::null_mut()));
    }
}

/// A one-shot POSIX timer that kicks the thread that created it (a vCPU thread kicking itself
/// later): on expiry the kernel sends the kick signal to that thread alone (`SIGEV_THREAD_ID`), so
/// the handler sets its `immediate_exit` exactly as a kick from another thread would. Arming and
/// disarming are one `timer_settime` each, from the owning thread; POSIX timers are hrtimers
/// without timer slack, so the kick comes on time.
#[derive(Debug)]
pub struct KickTimer {
    id: libc::timer_t,
}

// SAFETY: a timer id is a process-wide handle; the timer itself always signals the thread that
// created it, whichever thread arms it.
unsafe impl Send for KickTimer {}

impl KickTimer {
    /// A disarmed timer that kicks the calling thread.
    pub fn for_current_thread() -> std::io::Result<Self> {
        // SAFETY: sigevent is a plain C struct for which all-zeroes is a valid value.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = ptr::null_mut();
        // SAFETY: both pointers are valid for the call; the return value is checked.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { id })
    }

    /// Kicks the owning thread `after` from now (replacing any earlier arming).
    pub fn arm(&self, after: std::time::Duration) {
        let secs = after.as_secs().min(i32::MAX as u64) as libc::time_t;
        // A zero it_value would disarm: at least 1 ns.
        let nanos = if secs == 0 {
            after.subsec_nanos().max(1)
        } else {
            after.subsec_nanos()
        };
        self.set(libc::timespec {
            tv_sec: secs,
            tv_nsec: libc::c_long::from(nanos as i32),
        });
    }

    pub fn disarm(&self) {
        self.set(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        });
    }

    fn set(&self, value: libc::timespec) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `self.id` is a live timer (deleted only in Drop); `spec` is valid for the call.
        // It cannot fail for a valid id and timespec.
        unsafe { libc::timer_settime(self.id, 0, &spec, ptr::null_mut()) };
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
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

    /// A vCPU thread kicking its own target sets its own byte directly (no signal needed, and
    /// it works with the signal blocked); `kick_self` does the same. Another target's kick from
    /// that thread is not mistaken for a self-kick.
    #[test]
    fn self_kick_sets_own_byte_without_a_signal() {
        std::thread::spawn(|| {
            let target = KickTarget::default();
            let other = KickTarget::default();
            let byte = AtomicU8::new(0);
            // SAFETY: `byte` outlives the registration (both live in this closure).
            let ie = unsafe { ImmediateExit::new(byte.as_ptr()) };
            let reg = target.register(ie);
            assert!(!other.kick(), "an unregistered target is not this thread");
            assert_eq!(byte.load(Ordering::SeqCst), 0);
            assert!(target.kick());
            assert_eq!(byte.load(Ordering::SeqCst), 1);
            assert_eq!(target.kicks_sent(), 1);
            ie.clear();
            kick_self();
            assert!(ie.is_set());
            drop(reg);
            ie.clear();
            kick_self();
            assert!(!ie.is_set(), "no self-kick after unregistering");
        })
        .join()
        .unwrap();
    }

    /// A KickTimer signals the thread that created it: its handler sets that thread's byte.
    #[test]
    fn kick_timer_kicks_its_thread() {
        install_kick_handler().unwrap();
        std::thread::spawn(|| {
            let target = KickTarget::default();
            let byte = AtomicU8::new(0);
            // SAFETY: `byte` outlives the registration and the timer (all live in this closure).
            let ie = unsafe { ImmediateExit::new(byte.as_ptr()) };
            let reg = target.register(ie);
            let timer = KickTimer::for_current_thread().unwrap();
            timer.arm(Duration::from_millis(1));
            let start = Instant::now();
            while !ie.is_set() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(ie.is_set());
            ie.clear();
            timer.arm(Duration::from_secs(3600));
            timer.disarm();
            drop(timer);
            drop(reg);
        })
        .join()
        .unwrap();
    }
}
