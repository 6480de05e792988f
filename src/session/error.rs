//! Why a client connection was closed.

use crate::relay::framing::ReadError;
use crate::relay::metrics::{BadInput, Refusal, METRICS};
use crate::relay::outbox::{Closed, ControlError};
use std::fmt;
use std::time::Duration;

#[derive(Debug)]
pub enum SessionError {
    /// Reading the client failed: bad framing, a deadline, or the socket.
    Read(ReadError),
    /// The client broke its protocol; the protocol's own error says how.
    Protocol(Box<dyn std::error::Error + Send + Sync>),
    /// The client did not finish the handshake in time.
    NotValidated(Duration),
    TooManyChannels(usize),
    TooManyChannelsInAll(usize),
    /// A message the shim makes itself could not be queued.
    Refused(ControlError),
    ClientGone,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Read(e) => write!(f, "{e}"),
            SessionError::Protocol(e) => write!(f, "{e}"),
            SessionError::NotValidated(d) => {
                write!(f, "client did not validate the connection within {d:?}")
            }
            SessionError::TooManyChannels(n) => write!(f, "client exceeds {n} channels"),
            SessionError::TooManyChannelsInAll(n) => {
                write!(f, "all clients together would exceed {n} channels")
            }
            SessionError::Refused(e) => write!(f, "{e}"),
            SessionError::ClientGone => write!(f, "client connection closed"),
        }
    }
}

impl SessionError {
    /// Counts a close for bad input or a limit in the metrics.
    pub fn count(&self) {
        match self {
            SessionError::Read(e) => e.bad_input().into_iter().for_each(|k| METRICS.bad_input(k)),
            SessionError::Protocol(_) => METRICS.bad_input(BadInput::Protocol),
            SessionError::NotValidated(_) => METRICS.bad_input(BadInput::Timeout),
            SessionError::TooManyChannels(_) => METRICS.refused(Refusal::ChannelsPerClient),
            SessionError::TooManyChannelsInAll(_) => METRICS.refused(Refusal::ChannelsInAll),
            SessionError::Refused(_) => METRICS.bad_input(BadInput::TooLarge),
            SessionError::ClientGone => {}
        }
    }

    /// Whether the client simply went away, rather than being closed.
    pub fn is_client_gone(&self) -> bool {
        matches!(self, SessionError::ClientGone)
    }
}

impl From<Closed> for SessionError {
    fn from(_: Closed) -> Self {
        SessionError::ClientGone
    }
}

impl From<ControlError> for SessionError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Closed => SessionError::ClientGone,
            e => SessionError::Refused(e),
        }
    }
}
