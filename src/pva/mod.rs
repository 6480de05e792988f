//! PV Access on the shared port. A connection that stays silent through the
//! classification window is a PVA client, which waits for the server's
//! greeting. The PVA name server is not part of this build yet: such a
//! connection is logged and closed, so the client retries elsewhere.

use std::net::SocketAddr;
use tokio::net::TcpStream;
use tracing::warn;

pub async fn serve(stream: TcpStream, peer: SocketAddr) {
    warn!(
        target: "nameshim::pva::session",
        %peer,
        "PV Access client: not supported by this build yet, closing"
    );
    drop(stream);
}
