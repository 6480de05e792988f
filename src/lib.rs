//! nameshim as a library: the modules behind the `nameshim` binary
//! (src/main.rs) and, with the `ioc-plugin` feature, the C ABI that runs
//! the same relay inside an IOC process (`ffi`, used by `ioc-plugin/`).
//!
//! Only what the binary and the C ABI need is public; the protocol and
//! transport modules stay internal.

mod ca;
pub mod check;
pub mod config;
pub mod logging;
mod ports;
mod pva;
mod relay;
mod resolve;
pub mod wrapper;

#[cfg(feature = "ioc-plugin")]
pub mod ffi;

pub use ports::serve_all;
