//! The C ABI of the IOC plugin (`ioc-plugin/nameshimApp/src/nameshim.h`):
//! start, stop and report on the relay inside an IOC process, for IOC
//! images that cannot add a process of their own.
//!
//! The relay is the one the binary runs (`ports::Bound`), on its own thread
//! with its own single-threaded runtime, as in wrapper mode
//! (`wrapper::beside`): a port that cannot be bound, a failure or a panic
//! is logged and the relay started again after a pause.
//!
//! Invariant: nothing here can stop, block or crash the IOC. No panic
//! crosses the boundary (each entry point catches it and returns
//! `NAMESHIM_E_PANIC`); `nameshim_stop` waits a bounded time; the options
//! are the command line's, minus the modes that need a process of their
//! own (`check`, `-- COMMAND`).

use crate::config::{Cli, Config};
use crate::relay::metrics::{Proto, METRICS};
use crate::wrapper::beside::{loud, panic_message, service_thread, RETRY_PAUSE};
use crate::{logging, ports};
use clap::Parser;
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

// Return codes, as in nameshim.h (a unit test checks that they agree).
pub const NAMESHIM_OK: c_int = 0;
/// `--help` or `--version` was printed; nothing was started.
pub const NAMESHIM_PRINTED: c_int = 1;
pub const NAMESHIM_E_OPTIONS: c_int = -1;
pub const NAMESHIM_E_RUNNING: c_int = -2;
pub const NAMESHIM_E_NOT_RUNNING: c_int = -3;
pub const NAMESHIM_E_THREAD: c_int = -4;
pub const NAMESHIM_E_TIMEOUT: c_int = -5;
pub const NAMESHIM_E_PANIC: c_int = -6;
pub const NAMESHIM_E_ARGUMENT: c_int = -7;

/// How long `nameshim_stop` waits for the relay thread. Dropping the
/// runtime closes every socket at once; this bound only guards the IOC's
/// shutdown against a relay stuck in a bug.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a retry pause looks for a stop request.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What `nameshim_status` reports (`nameshimStatus` in nameshim.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// 1 between a successful start and the next stop.
    pub running: c_int,
    /// The shared CA and PVA TCP port while it is bound, else 0.
    pub port: c_uint,
    pub ca_clients: i64,
    pub pva_clients: i64,
    pub ca_channels: i64,
    pub pva_channels: i64,
}

/// The relay thread and the means to end it.
struct Relay {
    stop: watch::Sender<bool>,
    /// Disconnected once the thread has ended: its sender is dropped with
    /// the thread's closure, however the thread ends.
    ended: mpsc::Receiver<()>,
    thread: JoinHandle<()>,
}

static RELAY: Mutex<Option<Relay>> = Mutex::new(None);
/// Read by `nameshim_status` without the lock, which a stop holds.
static RUNNING: AtomicBool = AtomicBool::new(false);
static PORT: AtomicU16 = AtomicU16::new(0);

/// Starts the relay with `options`, the command line's options as one
/// string, split as a shell would (quotes and backslashes). NULL or "" is
/// the defaults, read from the `NAMESHIM_*` variables as the binary does.
/// Returns `NAMESHIM_OK` once the relay thread runs (binding the port may
/// still fail; it is then logged and retried every 2 s).
///
/// # Safety
/// `options` is NULL or points to a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn nameshim_start(options: *const c_char) -> c_int {
    let text = if options.is_null() {
        Ok("")
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        unsafe { CStr::from_ptr(options) }.to_str()
    };
    guarded("nameshim_start", || match text {
        Ok(text) => start(text),
        Err(_) => {
            eprintln!("nameshim: options are not UTF-8");
            NAMESHIM_E_ARGUMENT
        }
    })
}

/// Stops the relay: returns once its runtime is dropped, every socket
/// closed and the thread joined, or `NAMESHIM_E_TIMEOUT` after 5 s.
#[no_mangle]
pub extern "C" fn nameshim_stop() -> c_int {
    guarded("nameshim_stop", stop)
}

/// Fills `*status`. Never blocks.
///
/// # Safety
/// `status` is NULL (`NAMESHIM_E_ARGUMENT`) or points to a `nameshimStatus`.
#[no_mangle]
pub unsafe extern "C" fn nameshim_status(status: *mut Status) -> c_int {
    if status.is_null() {
        return NAMESHIM_E_ARGUMENT;
    }
    guarded("nameshim_status", || {
        // SAFETY: checked non-null; the caller passes a valid pointer.
        unsafe { status.write(current_status()) };
        NAMESHIM_OK
    })
}

/// Runs an entry point; a panic is logged and becomes `NAMESHIM_E_PANIC`.
fn guarded(what: &str, call: impl FnOnce() -> c_int) -> c_int {
    match panic::catch_unwind(AssertUnwindSafe(call)) {
        Ok(code) => code,
        Err(panic) => {
            error!(target: "nameshim::ffi", cause = panic_message(&*panic), "{what} panicked");
            NAMESHIM_E_PANIC
        }
    }
}

fn current_status() -> Status {
    Status {
        running: c_int::from(RUNNING.load(Ordering::Relaxed)),
        port: c_uint::from(PORT.load(Ordering::Relaxed)),
        ca_clients: METRICS.clients.get(Proto::Ca),
        pva_clients: METRICS.clients.get(Proto::Pva),
        ca_channels: METRICS.channels.get(Proto::Ca),
        pva_channels: METRICS.channels.get(Proto::Pva),
    }
}

fn relay_slot() -> MutexGuard<'static, Option<Relay>> {
    // A panic while holding the lock leaves a usable Option behind.
    RELAY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn start(options: &str) -> c_int {
    let cli = match parse_options(options) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    logging::init(&cli.log, cli.log_format == "json");
    let config = Config::from_cli(&cli);
    let mut slot = relay_slot();
    if slot.is_some() {
        warn!(target: "nameshim::ffi", "already running; stop it first");
        return NAMESHIM_E_RUNNING;
    }
    let (stop, stop_seen) = watch::channel(false);
    let (ended_tx, ended) = mpsc::channel::<()>();
    let spawned = service_thread("nameshim").spawn(move || {
        let _ended = ended_tx;
        run_relay(&config, stop_seen);
    });
    match spawned {
        Ok(thread) => {
            *slot = Some(Relay {
                stop,
                ended,
                thread,
            });
            RUNNING.store(true, Ordering::Relaxed);
            NAMESHIM_OK
        }
        Err(e) => {
            error!(target: "nameshim::ffi", cause = %e, "cannot start the relay thread; the IOC runs without it");
            NAMESHIM_E_THREAD
        }
    }
}

/// The command line's parsing, on `options` split like a shell would.
fn parse_options(options: &str) -> Result<Cli, c_int> {
    let words = split_words(options).map_err(|e| {
        eprintln!("nameshim: {e} in options \"{options}\"");
        NAMESHIM_E_OPTIONS
    })?;
    let cli = match Cli::try_parse_from(std::iter::once("nameshim".to_owned()).chain(words)) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout, errors to stderr, as in the binary.
            let _ = e.print();
            return Err(if e.use_stderr() {
                NAMESHIM_E_OPTIONS
            } else {
                NAMESHIM_PRINTED
            });
        }
    };
    if cli.subcommand.is_some() || !cli.command.is_empty() {
        eprintln!("nameshim: inside an IOC only the relay runs: no `check`, no `-- COMMAND`");
        return Err(NAMESHIM_E_OPTIONS);
    }
    Ok(cli)
}

fn stop() -> c_int {
    let mut slot = relay_slot();
    let Some(relay) = slot.take() else {
        return NAMESHIM_E_NOT_RUNNING;
    };
    RUNNING.store(false, Ordering::Relaxed);
    let asked = Instant::now();
    // Err: the thread has already ended and dropped its receiver.
    let _ = relay.stop.send(true);
    match relay.ended.recv_timeout(STOP_TIMEOUT) {
        Err(mpsc::RecvTimeoutError::Timeout) => {
            error!(
                target: "nameshim::ffi",
                timeout = ?STOP_TIMEOUT,
                "the relay did not stop in time; leaving its thread behind"
            );
            NAMESHIM_E_TIMEOUT
        }
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            // Ended: the join returns at once (Err only if it panicked,
            // which run_relay catches).
            let _ = relay.thread.join();
            info!(target: "nameshim::ffi", elapsed = ?asked.elapsed(), "stopped; every socket closed");
            NAMESHIM_OK
        }
    }
}

/// How one attempt to serve ended.
enum Attempt {
    Stopped,
    Failed(String),
}

/// The relay thread: serves until stopped, starting again after a pause
/// whenever an attempt fails or panics, as wrapper mode does.
fn run_relay(config: &Config, mut stop: watch::Receiver<bool>) {
    let mut last = String::new();
    // Attempts in a row that failed the same way as the one before.
    let mut same = 0u32;
    loop {
        let attempt = panic::catch_unwind(AssertUnwindSafe(|| serve_once(config, &mut stop)));
        PORT.store(0, Ordering::Relaxed);
        let failure = match attempt {
            Ok(Attempt::Stopped) => return,
            Ok(Attempt::Failed(failure)) => failure,
            Err(panic) => format!("the relay panicked: {}", panic_message(&*panic)),
        };
        same = if failure == last { same + 1 } else { 0 };
        if loud(same) {
            error!(
                target: "nameshim::ffi",
                cause = %failure,
                "not serving; the IOC keeps running; retrying every {}s",
                RETRY_PAUSE.as_secs()
            );
        } else {
            debug!(target: "nameshim::ffi", cause = %failure, "still not serving");
        }
        last = failure;
        if pause_until_stopped(&stop, RETRY_PAUSE) {
            return;
        }
    }
}

/// One attempt, in a runtime of its own: dropping it at the end closes
/// every socket the attempt opened and ends every task it spawned.
fn serve_once(config: &Config, stop: &mut watch::Receiver<bool>) -> Attempt {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Attempt::Failed(format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        tokio::select! {
            served = serve(config) => Attempt::Failed(match served {
                Ok(()) => "the relay stopped".to_owned(),
                Err(e) => e.to_string(),
            }),
            // Err: the sender is gone, which also means stop.
            _ = stop.wait_for(|stopped| *stopped) => Attempt::Stopped,
        }
    })
}

async fn serve(config: &Config) -> io::Result<()> {
    let bound = ports::Bound::bind(config)?;
    PORT.store(bound.port()?, Ordering::Relaxed);
    bound.serve(config).await
}

/// Sleeps `pause`, or less if a stop comes; true if it did.
fn pause_until_stopped(stop: &watch::Receiver<bool>, pause: Duration) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if *stop.borrow() || stop.has_changed().is_err() {
            return true;
        }
        std::thread::sleep(STOP_POLL);
    }
    *stop.borrow()
}

/// Splits `text` into words as a POSIX shell does, without expansions:
/// blanks separate words; '...' keeps everything literally; "..." keeps
/// everything but `\"` and `\\`; a backslash outside quotes keeps the next
/// character.
pub fn split_words(text: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '\'' => {
                let word = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated single quote"),
                    }
                }
            }
            '"' => {
                let word = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated double quote"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated double quote"),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("a backslash at the end"),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn words(text: &str) -> Vec<String> {
        split_words(text).unwrap()
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(words(""), Vec::<String>::new());
        assert_eq!(
            words("  --listen\t0.0.0.0:5075  "),
            ["--listen", "0.0.0.0:5075"]
        );
        assert_eq!(
            words("--log 'nameshim=debug,info'"),
            ["--log", "nameshim=debug,info"]
        );
        assert_eq!(words(r#"--log "a b" c"#), ["--log", "a b", "c"]);
        assert_eq!(words(r#"a\ b"#), ["a b"]);
        assert_eq!(words(r#""say \"hi\" \n""#), [r#"say "hi" \n"#]);
        assert_eq!(words("x'' ''"), ["x", ""]);
        assert_eq!(words("a'b'\"c\"d"), ["abcd"]);
    }

    #[test]
    fn unterminated_quotes_are_refused() {
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
        assert!(split_words("\"open\\").is_err());
        assert!(split_words("end\\").is_err());
    }

    #[test]
    fn options_are_the_command_lines() {
        let cli = parse_options("--listen 127.0.0.1:0 --no-http").unwrap();
        assert_eq!(cli.listen, "127.0.0.1:0".parse().unwrap());
        assert!(cli.no_http);
        assert_eq!(
            parse_options("--no-such-option").unwrap_err(),
            NAMESHIM_E_OPTIONS
        );
        assert_eq!(parse_options("--version").unwrap_err(), NAMESHIM_PRINTED);
    }

    #[test]
    fn modes_that_need_a_process_are_refused() {
        assert_eq!(parse_options("-- softIoc").unwrap_err(), NAMESHIM_E_OPTIONS);
        assert_eq!(
            parse_options("check 127.0.0.1:5075").unwrap_err(),
            NAMESHIM_E_OPTIONS
        );
    }

    #[test]
    fn null_pointers_are_refused() {
        assert_eq!(
            unsafe { nameshim_status(std::ptr::null_mut()) },
            NAMESHIM_E_ARGUMENT
        );
    }

    #[test]
    fn a_panic_becomes_an_error_code() {
        assert_eq!(guarded("test", || panic!("a bug")), NAMESHIM_E_PANIC);
    }

    /// The one test that runs the relay (the relay state is process-wide):
    /// start, refuse a second start, serve, stop closing the port, stop
    /// again, start again.
    #[test]
    fn start_serve_stop_and_start_again() {
        let options = CString::new("--listen 127.0.0.1:0 --ca-search-addr 127.0.0.1:9 --pva-search-addr 127.0.0.1:9 --server-source-addr 127.0.0.1").unwrap();
        assert_eq!(unsafe { nameshim_start(options.as_ptr()) }, NAMESHIM_OK);
        assert_eq!(
            unsafe { nameshim_start(options.as_ptr()) },
            NAMESHIM_E_RUNNING
        );
        let port = wait_for_port();
        let mut status = Status::default();
        assert_eq!(unsafe { nameshim_status(&mut status) }, NAMESHIM_OK);
        assert_eq!((status.running, status.port), (1, c_uint::from(port)));
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();

        let asked = Instant::now();
        assert_eq!(nameshim_stop(), NAMESHIM_OK);
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "stopped in {:?}",
            asked.elapsed()
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port closed"
        );
        drop(client);
        assert_eq!(current_status().port, 0);
        assert_eq!(current_status().running, 0);
        assert_eq!(nameshim_stop(), NAMESHIM_E_NOT_RUNNING);

        assert_eq!(unsafe { nameshim_start(options.as_ptr()) }, NAMESHIM_OK);
        wait_for_port();
        assert_eq!(nameshim_stop(), NAMESHIM_OK);
    }

    fn wait_for_port() -> u16 {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let port = PORT.load(Ordering::Relaxed);
            if port != 0 {
                return port;
            }
            assert!(Instant::now() < until, "no port bound in 5 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The header's codes are the library's.
    #[test]
    fn the_c_header_agrees_with_the_library() {
        let header = include_str!("../ioc-plugin/nameshimApp/src/nameshim.h");
        for (name, value) in [
            ("NAMESHIM_OK", NAMESHIM_OK),
            ("NAMESHIM_PRINTED", NAMESHIM_PRINTED),
            ("NAMESHIM_E_OPTIONS", NAMESHIM_E_OPTIONS),
            ("NAMESHIM_E_RUNNING", NAMESHIM_E_RUNNING),
            ("NAMESHIM_E_NOT_RUNNING", NAMESHIM_E_NOT_RUNNING),
            ("NAMESHIM_E_THREAD", NAMESHIM_E_THREAD),
            ("NAMESHIM_E_TIMEOUT", NAMESHIM_E_TIMEOUT),
            ("NAMESHIM_E_PANIC", NAMESHIM_E_PANIC),
            ("NAMESHIM_E_ARGUMENT", NAMESHIM_E_ARGUMENT),
        ] {
            let line = format!("#define {name} ({value})");
            assert!(header.contains(&line), "nameshim.h lacks `{line}`");
        }
        for function in ["nameshim_start(", "nameshim_stop(", "nameshim_status("] {
            assert!(header.contains(function), "nameshim.h lacks {function}");
        }
        for field in [
            "running;",
            "port;",
            "ca_clients;",
            "pva_clients;",
            "ca_channels;",
            "pva_channels;",
        ] {
            assert!(header.contains(field), "nameshim.h lacks the field {field}");
        }
    }
}
