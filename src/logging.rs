//! Logging set-up: tracing to stderr, shared by the binary and the IOC
//! plugin.

use std::io::IsTerminal;

/// Installs the global tracing subscriber, writing to stderr. `filter` is
/// an `EnvFilter` directive ("info", "nameshim::relay=debug"); a bad one
/// falls back to "info". Only the first call in a process installs it: an
/// IOC may start the plugin many times, and a later call must neither
/// fail nor replace what the first one set.
pub fn init(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("nameshim: bad log filter '{filter}' ({e}); using 'info'");
        tracing_subscriber::EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Err only when a subscriber is already installed: keep that one.
    let _ = if json {
        // One JSON object per line, fields flattened, for log collectors.
        logs.json().flatten_event(true).try_init()
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}
