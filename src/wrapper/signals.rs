//! The signals the wrapper owns.
//!
//! Invariant: the forwarded signals and SIGCHLD are blocked in every thread
//! of the shim, and only the wrapper loop takes them, synchronously, with
//! `sigtimedwait` on the main thread. No handler ever runs, so no other
//! thread (the relay's runtime) can see or swallow them. The block must
//! happen before any thread exists, because threads inherit the mask of
//! their creator. The child gets an empty mask and default dispositions
//! back before exec.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::io;
use std::time::Duration;

/// Passed on to the command as they arrive. SIGTERM (stop), SIGINT and
/// SIGQUIT (console interrupts), SIGHUP (reload or hang-up), SIGUSR1/2 and
/// SIGWINCH (a resized console) are what runtimes and users send to an IOC.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// The blocked set, and the way to wait for one of its signals.
pub struct Signals {
    set: SigSet,
}

impl Signals {
    /// Blocks the forwarded signals and SIGCHLD in the calling thread; every
    /// thread started afterwards inherits the block.
    pub fn block() -> nix::Result<Signals> {
        let mut set = SigSet::empty();
        for signal in FORWARDED {
            set.add(signal);
        }
        set.add(Signal::SIGCHLD);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        Ok(Signals { set })
    }

    /// The next pending signal of the set, or None after `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        let timeout = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9, so it fits a c_long of any width.
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: both pointers refer to live, initialised values; the
        // siginfo output is optional and left null.
        let number =
            unsafe { libc::sigtimedwait(self.set.as_ref(), std::ptr::null_mut(), &timeout) };
        // -1 is EAGAIN (timed out) or EINTR (a stop/continue): nothing to do.
        Signal::try_from(number).ok()
    }
}

/// Lets the shim write its log to a terminal that the command owns (even
/// with `stty tostop`) and hand the terminal over, without being stopped
/// by SIGTTOU. The shim never reads the terminal, so SIGTTIN is moot, but
/// ignoring it keeps a stray read from stopping PID 1.
pub fn ignore_terminal_stops() {
    for signal in [libc::SIGTTOU, libc::SIGTTIN] {
        // SAFETY: installs SIG_IGN, no handler code is involved.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
}

/// Undoes the shim's signal set-up in the child, between fork and exec.
/// Only async-signal-safe calls: the parent may have other threads.
pub fn reset_for_exec() -> io::Result<()> {
    // Ignored dispositions survive exec; handled ones do not exist here.
    // SIGPIPE: the Rust runtime ignores it, an IOC expects the default.
    for signal in [libc::SIGTTOU, libc::SIGTTIN, libc::SIGPIPE] {
        // SAFETY: restores SIG_DFL; async-signal-safe.
        if unsafe { libc::signal(signal, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: an empty set built on the stack; sigprocmask is
    // async-signal-safe and the child has a single thread.
    unsafe {
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(empty.as_mut_ptr());
        if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
