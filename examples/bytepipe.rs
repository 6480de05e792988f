//! bytepipe: a minimal TCP forwarder, the baseline for relay benchmarks.
//!
//! Usage: bytepipe LISTEN_ADDR TARGET_ADDR [BUF_BYTES]
//!
//! Every accepted connection is paired with a new connection to TARGET_ADDR
//! and bytes are copied both ways until either side closes. It knows nothing
//! about the protocol; `scripts/bench` and `scripts/bench-pva` compare
//! nameshim against it. Like the shim, it runs on one thread and disables
//! Nagle's algorithm on both sockets. BUF_BYTES is the copy buffer of each
//! direction (tokio's default, 8 KiB, when absent): one read and one write
//! per buffer, which bounds a bulk transfer's rate.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional_with_sizes;
use tokio::net::{TcpListener, TcpStream};

/// tokio's own default for `copy_bidirectional`.
const DEFAULT_BUF: usize = 8 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 && args.len() != 4 {
        eprintln!("usage: {} LISTEN_ADDR TARGET_ADDR [BUF_BYTES]", args[0]);
        std::process::exit(2);
    }
    let listen: SocketAddr = args[1].parse().expect("LISTEN_ADDR must be ADDR:PORT");
    let target: SocketAddr = args[2].parse().expect("TARGET_ADDR must be ADDR:PORT");
    let buf: usize = match args.get(3) {
        Some(s) => s.parse().expect("BUF_BYTES must be a positive integer"),
        None => DEFAULT_BUF,
    }
    .max(1);

    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "bytepipe listening addr={} target={} buf={}",
        listener.local_addr()?,
        target,
        buf
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
            if let Err(e) = copy_bidirectional_with_sizes(&mut client, &mut server, buf, buf).await
            {
                eprintln!("bytepipe: {peer}: {e}");
            }
        });
    }
}
