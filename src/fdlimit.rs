//! The shim's own limit on open files, raised at start to the hard limit.
//!
//! A client connection takes one descriptor, plus one for each server it
//! uses, so the usual soft limit of 1024 would stop the shim near 500
//! clients whatever `--max-clients` says. Servers and runtimes that expect
//! many connections raise it the same way. The command the wrapper starts
//! gets the original soft limit back: a program that uses `select()` cannot
//! take a descriptor above 1023 (`FD_SETSIZE`), and it never asked for more.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit before it was raised; 0 if it was not.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(0);

/// The soft limit on open files, before and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub from: u64,
    pub to: u64,
}

/// Raises the soft limit on open files to the hard limit; `None` if it
/// already was there.
pub fn raise_to_hard() -> io::Result<Option<Raised>> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(None);
    }
    let from = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    ORIGINAL_SOFT.store(from, Ordering::Relaxed);
    Ok(Some(Raised {
        from,
        to: limit.rlim_max,
    }))
}

/// Gives a command about to be exec'd the soft limit the shim started
/// with. Called between fork and exec: it makes async-signal-safe calls
/// only, and a failure leaves the command the shim's limit, which is no
/// reason not to start it.
pub fn restore_for_exec() {
    let original = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if original == 0 {
        return;
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as in `raise_to_hard`; both calls are plain system calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = original;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soft_and_hard() -> (u64, u64) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise_to_hard`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        (limit.rlim_cur, limit.rlim_max)
    }

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let (soft, hard) = soft_and_hard();
        let raised = raise_to_hard().unwrap();
        assert_eq!(soft_and_hard(), (hard, hard));
        if soft < hard {
            assert_eq!(
                raised,
                Some(Raised {
                    from: soft,
                    to: hard
                })
            );
        } else {
            assert_eq!(raised, None);
        }
    }
}
