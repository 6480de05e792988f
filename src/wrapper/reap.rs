//! Reaping: the one place that calls waitpid.
//!
//! The shim reaps every child it has: the command, and each orphan that the
//! kernel re-parents to it (as PID 1, or as a child subreaper). Nothing else
//! in the process waits for children (std's `Child::wait` is never called
//! and tokio's process driver is not built), so no status is ever stolen.

use nix::unistd::Pid;

/// What a round of reaping found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// The command is still running (orphans may have been reaped).
    Running,
    /// The command has exited; the shim's exit code follows from it.
    CommandExited(i32),
    /// No child is left at all, yet the command's status was never seen.
    Lost,
}

/// Reaps every child that has exited, without blocking.
pub fn reap_all(command: Pid) -> Reaped {
    let mut found = Reaped::Running;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer. Raw libc rather than nix:
        // nix reports a child killed by a real-time signal as an error,
        // after the kernel has already released its status.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return found,
            -1 => {
                let errno = nix::errno::Errno::last();
                if errno == nix::errno::Errno::EINTR {
                    continue;
                }
                // ECHILD: nothing left to wait for.
                return match found {
                    Reaped::Running => Reaped::Lost,
                    exited => exited,
                };
            }
            pid if pid == command.as_raw() => {
                if let Some(code) = exit_code(status) {
                    tracing::debug!(target: "nameshim::wrapper", pid, status, "command reaped");
                    found = Reaped::CommandExited(code);
                }
            }
            pid => tracing::trace!(target: "nameshim::wrapper", pid, status, "orphan reaped"),
        }
    }
}

/// The shell's convention: the exit status, or 128+N when signal N killed
/// the process. None for states that are not an end (stopped, continued).
pub fn exit_code(status: libc::c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Raw statuses as Linux encodes them (see <bits/waitstatus.h>): exit
    // code in bits 8-15; terminating signal in bits 0-6, core flag 0x80.
    fn exited(code: i32) -> i32 {
        code << 8
    }

    #[test]
    fn normal_exit_gives_its_code() {
        assert_eq!(exit_code(exited(0)), Some(0));
        assert_eq!(exit_code(exited(3)), Some(3));
        assert_eq!(exit_code(exited(255)), Some(255));
    }

    #[test]
    fn death_by_signal_gives_128_plus_signal() {
        assert_eq!(exit_code(libc::SIGTERM), Some(143));
        assert_eq!(exit_code(libc::SIGKILL), Some(137));
        // A core dump does not change the code.
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), Some(139));
        // Real-time signals too (nix's decoder rejects them).
        assert_eq!(
            exit_code(libc::SIGRTMIN() + 1),
            Some(128 + libc::SIGRTMIN() + 1)
        );
    }

    #[test]
    fn stopped_or_continued_is_not_an_exit() {
        let stopped = (libc::SIGSTOP << 8) | 0x7f;
        assert_eq!(exit_code(stopped), None);
        assert_eq!(exit_code(0xffff), None); // continued
    }
}
