//! The main crate's CA codec, compiled in by path.
#[path = "../../../src/ca/wire.rs"]
pub mod wire;
