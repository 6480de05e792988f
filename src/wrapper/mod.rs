//! The PID-1 wrapper: `nameshim [OPTIONS] -- COMMAND [ARGS...]`.
//!
//! The shim starts COMMAND (the IOC) as its child and is a correct init for
//! it, while the relay serves the port on a thread beside it. `run` is a
//! straight list of steps: block signals, become a reaper, start the
//! command, start the relay, then loop { wait for a signal and forward it;
//! reap every zombie; stop when the command has exited }.
//!
//! Invariant: only the command's exit ends the wrapper. This module is the
//! only place for fork, exec, waitpid and signal masks.

pub(crate) mod beside;
mod child;
mod reap;
mod signals;

use child::{Child, JobControl};
use nix::sys::signal::Signal;
use reap::Reaped;
use signals::Signals;
use std::ffi::OsString;
use std::io;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Longest sleep of the loop without a signal. SIGCHLD wakes it for every
/// exit; the periodic reap only guards against a missed wake-up.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// What the command line asked of the wrapper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub command: Vec<OsString>,
    /// Time from the first SIGTERM to SIGKILL.
    pub grace: Duration,
    /// Signal the command's process group rather than its pid.
    pub signal_group: bool,
}

/// Runs the command to its end and returns the exit code the shim must
/// exit with. `service` (the relay) runs on its own thread meanwhile and is
/// restarted whenever it fails. No thread may exist before this is called:
/// they would not inherit the blocked signals.
pub fn run<F>(options: &Options, service: F) -> i32
where
    F: FnMut() -> io::Result<()> + Send + 'static,
{
    let signals = match Signals::block() {
        Ok(signals) => signals,
        Err(e) => {
            error!(target: "nameshim::wrapper", cause = %e, "cannot block signals; not starting the command");
            return 1;
        }
    };
    signals::ignore_terminal_stops();
    become_reaper();
    let job = JobControl::for_stdin(options.signal_group);
    let child = match Child::spawn(&options.command, job, options.signal_group) {
        Ok(child) => child,
        Err(e) => {
            let code = child::exec_failure_code(&e);
            error!(target: "nameshim::wrapper", command = ?options.command, cause = %e, code, "cannot start the command");
            return code;
        }
    };
    info!(
        target: "nameshim::wrapper",
        pid = child.pid.as_raw(),
        command = ?options.command,
        own_group = job.own_group,
        terminal = job.take_terminal,
        signal_group = child.signals_group(),
        "command started"
    );
    beside::start("relay", service);
    supervise(&signals, &child, options.grace)
}

/// As PID 1 the kernel already gives us every orphan of the namespace;
/// elsewhere (a container without a PID namespace, a shell) the subreaper
/// flag brings the command's orphans to us instead of to the real init.
fn become_reaper() {
    if std::process::id() == 1 {
        return;
    }
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => debug!(target: "nameshim::wrapper", "not PID 1: registered as child subreaper"),
        Err(e) => warn!(
            target: "nameshim::wrapper",
            cause = %e,
            "not PID 1 and cannot become a child subreaper: orphans of the command go to the real init"
        ),
    }
}

/// The loop: forward signals, reap, end with the command.
fn supervise(signals: &Signals, child: &Child, grace: Duration) -> i32 {
    let mut kill_at: Option<Instant> = None;
    loop {
        let wait = kill_at.map_or(IDLE_WAIT, |at| {
            at.saturating_duration_since(Instant::now()).min(IDLE_WAIT)
        });
        match signals.wait(wait) {
            None | Some(Signal::SIGCHLD) => {}
            Some(signal) => {
                forward(child, signal);
                if signal == Signal::SIGTERM && kill_at.is_none() {
                    kill_at = Some(Instant::now() + grace);
                }
            }
        }
        match reap::reap_all(child.pid) {
            Reaped::Running => {}
            Reaped::CommandExited(code) => {
                info!(target: "nameshim::wrapper", code, "command exited; exiting with its code");
                return code;
            }
            Reaped::Lost => {
                error!(target: "nameshim::wrapper", "the command is gone and its exit status was lost");
                return 1;
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            warn!(
                target: "nameshim::wrapper",
                grace = ?grace,
                "command still running after the grace period since SIGTERM: sending SIGKILL"
            );
            forward(child, Signal::SIGKILL);
            // Once is enough; a new SIGTERM starts a new grace period.
            kill_at = None;
        }
    }
}

fn forward(child: &Child, signal: Signal) {
    match child.signal(signal) {
        Ok(()) => debug!(target: "nameshim::wrapper", %signal, "forwarded"),
        // ESRCH: the command has exited and is about to be reaped.
        Err(e) => debug!(target: "nameshim::wrapper", %signal, cause = %e, "not forwarded"),
    }
}
