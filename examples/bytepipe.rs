//! bytepipe: a minimal TCP forwarder, the baseline for relay benchmarks.
//!
//! Usage: bytepipe LISTEN_ADDR TARGET_ADDR
//!
//! Every accepted connection is paired with a new connection to TARGET_ADDR
//! and bytes are copied both ways until either side closes. It knows nothing
//! about the protocol; `scripts/bench` compares nameshim against it. Like the
//! shim, it runs on one thread and disables Nagle's algorithm on both sockets.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: {} LISTEN_ADDR TARGET_ADDR", args[0]);
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN_ADDR must be ADDR:PORT");
    let target: SocketAddr = args[2].parse().expect("TARGET_ADDR must be ADDR:PORT");

    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "bytepipe listening addr={} target={}",
        listener.local_addr()?,
        target
    );

    loop {
        let (mut client, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let mut server = match TcpStream::connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bytepipe: connect {target} for {peer}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            if let Err(e) = copy_bidirectional(&mut client, &mut server).await {
                eprintln!("bytepipe: {peer}: {e}");
            }
        });
    }
}
