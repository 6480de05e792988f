//! nameshim as a library: the modules behind the `nameshim` binary
//! (src/main.rs) and, with the `ioc-plugin` feature, the C ABI that runs
//! the same relay inside an IOC process (`ffi`, used by `ioc-plugin/`).
//!
//! Only what the binary and the C ABI need is public; the protocol and
//! transport modules stay internal.

mod access;
mod ca;
pub mod check;
pub mod config;
pub mod fdlimit;
pub mod logging;
mod ports;
mod pva;
mod relay;
mod resolve;
mod session;
pub mod wrapper;

#[cfg(feature = "ioc-plugin")]
pub mod ffi;

pub use ports::serve_all;

/// Waits until what is queued towards clients is written, for at most
/// `within`; says whether it all was (a shutdown's last step).
pub async fn flush_client_queues(within: std::time::Duration) -> bool {
    relay::outbox::UNWRITTEN_TO_CLIENTS
        .written_within(within)
        .await
}
