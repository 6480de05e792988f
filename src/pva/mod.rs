//! PV Access: the server and name-server side of a client connection, the
//! UDP search relay towards the local servers, and the channel relay.
//! A connection that stays silent through the classification window is a
//! PVA client, which waits for the server's greeting.

pub mod backend;
pub mod search;
pub mod session;
pub mod translate;
pub mod types;
pub mod wire;
