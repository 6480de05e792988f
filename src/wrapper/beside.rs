//! The service that runs beside the command (the relay), on its own thread.
//!
//! Invariant: nothing the service does can end the process. Only the
//! command's exit ends the wrapper, so a service that cannot bind its port,
//! fails later or panics is logged and started again after a pause, for as
//! long as the command runs. The thread inherits the blocked signal set.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;
use tracing::{debug, error};

/// Pause between two attempts to start the service.
pub const RETRY_PAUSE: Duration = Duration::from_secs(2);
/// A failure that repeats is logged again at error level this often (in
/// attempts), and at debug level in between, so a port held for hours by
/// another process does not flood the IOC's console.
const REPEAT_EVERY: u32 = 30;
/// Stack of the service thread. A backstop, not a budget: recursion on
/// peer data is bounded where it happens (PVA type depth), but a stack
/// overflow aborts the whole process, IOC included, so the thread gets
/// more than the default 2 MiB. Untouched pages cost no memory.
const SERVICE_STACK_BYTES: usize = 16 * 1024 * 1024;

/// Starts `service` on a thread named `name`, restarting it whenever it
/// returns, fails or panics.
pub fn start<F>(name: &str, service: F)
where
    F: FnMut() -> io::Result<()> + Send + 'static,
{
    let thread_name = name.to_owned();
    let spawned = service_thread(&thread_name).spawn(move || keep_running(&thread_name, service));
    if let Err(e) = spawned {
        error!(
            target: "nameshim::wrapper",
            cause = %e,
            "cannot start the {name} thread; the command runs without it"
        );
    }
}

pub(crate) fn service_thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.to_owned())
        .stack_size(SERVICE_STACK_BYTES)
}

fn keep_running<F>(name: &str, mut service: F)
where
    F: FnMut() -> io::Result<()>,
{
    let mut last = String::new();
    // Attempts in a row that failed the same way as the one before.
    let mut same = 0u32;
    loop {
        let failure = match panic::catch_unwind(AssertUnwindSafe(&mut service)) {
            Ok(Ok(())) => format!("the {name} stopped"),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("the {name} panicked: {}", panic_message(&*panic)),
        };
        same = if failure == last { same + 1 } else { 0 };
        if loud(same) {
            error!(
                target: "nameshim::wrapper",
                cause = %failure,
                "{name} not serving; the command keeps running; retrying every {}s",
                RETRY_PAUSE.as_secs()
            );
        } else {
            debug!(target: "nameshim::wrapper", cause = %failure, "{name} still not serving");
        }
        last = failure;
        std::thread::sleep(RETRY_PAUSE);
    }
}

/// A new failure is always logged at error level, a repeated one now and then.
pub(crate) fn loud(same: u32) -> bool {
    same % REPEAT_EVERY == 0
}

pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failure_is_loud_once_a_minute() {
        let loud_attempts: Vec<u32> = (0..61).filter(|&n| loud(n)).collect();
        assert_eq!(loud_attempts, [0, 30, 60]);
        assert_eq!(REPEAT_EVERY * RETRY_PAUSE.as_secs() as u32, 60);
    }

    /// Recurses until `want` bytes of stack are in use below `top`.
    fn use_stack(top: usize, want: usize) -> usize {
        let frame = std::hint::black_box([0u8; 1024]);
        let used = top.saturating_sub(frame.as_ptr() as usize);
        if used >= want {
            used
        } else {
            use_stack(top, want) + usize::from(frame[0])
        }
    }

    // 8 MiB of stack would overflow the default 2 MiB thread stack, which
    // aborts the process (run with the old builder, this test binary dies).
    #[test]
    fn the_service_thread_has_a_large_stack() {
        let deep = service_thread("deep").spawn(|| {
            let top = 0u8;
            use_stack(std::ptr::addr_of!(top) as usize, 8 << 20)
        });
        assert!(deep.unwrap().join().unwrap() >= 8 << 20);
    }

    #[test]
    fn panic_messages_are_recovered() {
        let text = panic::catch_unwind(|| panic!("port {}", 5066)).unwrap_err();
        assert_eq!(panic_message(&*text), "port 5066");
        let fixed = panic::catch_unwind(|| panic!("fixed")).unwrap_err();
        assert_eq!(panic_message(&*fixed), "fixed");
    }
}
