//! Starting the wrapped command, and sending it signals.
//!
//! The child inherits stdin, stdout, stderr and the controlling terminal.
//! When the shim owns the terminal's foreground (PID 1 of a container
//! started with a tty), the child gets its own process group and becomes
//! the terminal's foreground group: it can read the console (no SIGTTIN
//! stop), and Ctrl-C typed at `podman attach` reaches it once, straight
//! from the terminal, instead of twice (once from the terminal, once
//! forwarded).

use super::signals;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{self, IsTerminal};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Where the child runs with respect to process groups and the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobControl {
    /// The child leads a new process group.
    pub own_group: bool,
    /// That group becomes the terminal's foreground group.
    pub take_terminal: bool,
}

impl JobControl {
    /// `signal_group` needs a group of the child's own: signalling the
    /// shim's group would send every forwarded signal back to the shim.
    /// The terminal is taken only from a foreground shim; a shim started
    /// in the background of a shell must not steal the shell's terminal.
    pub fn decide(stdin_is_tty: bool, shim_in_foreground: bool, signal_group: bool) -> JobControl {
        let take_terminal = stdin_is_tty && shim_in_foreground;
        JobControl {
            own_group: take_terminal || signal_group,
            take_terminal,
        }
    }

    /// The decision for this process's stdin.
    pub fn for_stdin(signal_group: bool) -> JobControl {
        let tty = io::stdin().is_terminal();
        // SAFETY: plain queries; tcgetpgrp fails with -1 when stdin is not
        // our controlling terminal, which then counts as background.
        let foreground = tty && unsafe { libc::tcgetpgrp(libc::STDIN_FILENO) == libc::getpgrp() };
        JobControl::decide(tty, foreground, signal_group)
    }
}

/// The running command.
pub struct Child {
    pub pid: Pid,
    /// Whom forwarded signals go to: the pid, or the negated group id.
    target: Pid,
}

impl Child {
    /// Starts `command`. Returns once the command has been exec'd, or with
    /// the error that prevented it (std reports exec errors from the child).
    pub fn spawn(command: &[OsString], job: JobControl, signal_group: bool) -> io::Result<Child> {
        let Some((program, args)) = command.split_first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no command given",
            ));
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe calls; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if job.own_group && libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // Done in the child, before exec, so the command never runs
                // a moment in the background. SIGTTOU is still ignored here.
                // A failure (terminal gone) leaves a command that can still
                // run, so it is not fatal.
                if job.take_terminal {
                    libc::tcsetpgrp(libc::STDIN_FILENO, libc::getpgrp());
                }
                crate::fdlimit::restore_for_exec();
                signals::reset_for_exec()
            });
        }
        let child = cmd.spawn()?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        // `child` is dropped without waiting: reaping belongs to reap.rs.
        drop(child);
        let target = if signal_group && job.own_group {
            Pid::from_raw(-pid.as_raw())
        } else {
            pid
        };
        Ok(Child { pid, target })
    }

    /// Sends `signal` to the command (or its group). A command that has
    /// just exited is not an error worth more than a debug line.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        kill(self.target, signal)
    }

    pub fn signals_group(&self) -> bool {
        self.target != self.pid
    }
}

/// The shell's convention for a command that could not be started:
/// 127 when it was not found, 126 when it was found but could not run.
pub fn exec_failure_code(error: &io::Error) -> i32 {
    match error.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => 127,
        _ => 126,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_terminal_gives_the_child_its_own_foreground_group() {
        let job = JobControl::decide(true, true, false);
        assert_eq!(
            job,
            JobControl {
                own_group: true,
                take_terminal: true
            }
        );
    }

    #[test]
    fn no_terminal_keeps_the_child_in_the_shim_group() {
        let job = JobControl::decide(false, false, false);
        assert!(!job.own_group && !job.take_terminal);
    }

    #[test]
    fn background_shim_never_takes_the_terminal() {
        let job = JobControl::decide(true, false, false);
        assert!(!job.own_group && !job.take_terminal);
    }

    #[test]
    fn signal_group_always_gets_a_group_of_its_own() {
        assert!(JobControl::decide(false, false, true).own_group);
        assert!(!JobControl::decide(false, false, true).take_terminal);
        assert!(JobControl::decide(true, true, true).take_terminal);
    }

    #[test]
    fn missing_command_is_127_and_unrunnable_is_126() {
        let code = |errno| exec_failure_code(&io::Error::from_raw_os_error(errno));
        assert_eq!(code(libc::ENOENT), 127);
        assert_eq!(code(libc::ENOTDIR), 127);
        assert_eq!(code(libc::EACCES), 126);
        assert_eq!(code(libc::ENOEXEC), 126);
        assert_eq!(exec_failure_code(&io::Error::other("odd")), 126);
    }
}
