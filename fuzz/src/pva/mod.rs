//! The main crate's PVA codecs, compiled in by path.
#[path = "../../../src/pva/translate.rs"]
pub mod translate;
#[path = "../../../src/pva/types.rs"]
pub mod types;
#[path = "../../../src/pva/wire.rs"]
pub mod wire;
