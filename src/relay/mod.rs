//! The transport side: the one listener, protocol classification, framing,
//! bounded send queues, limits on clients and the check on local addresses.

pub mod discovery;
pub mod framing;
pub mod http;
pub mod limits;
pub mod listener;
pub mod localaddr;
pub mod metrics;
pub mod outbox;
pub mod rate;
pub mod stream;
pub mod upstream;
