//! The limits on all clients together, seen from a CA client.

use super::session::{context_for_tests, serve};
use super::wire::{self, Command, Header, Message};
use crate::relay::limits::ChannelBudget;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::{TcpListener, UdpSocket};

/// A shim port whose sessions search a UDP port nobody answers, so
/// channels stay in their first state.
async fn shim(budget: Arc<ChannelBudget>) -> SocketAddr {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(silent_addr) = silent.local_addr().unwrap() else {
        unreachable!()
    };
    let ctx = context_for_tests(silent_addr, Duration::from_secs(60), budget);
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let _silent = silent;
        while let Ok((s, p)) = front.accept().await {
            tokio::spawn(serve(s, p, ctx.clone()));
        }
    });
    addr
}

/// A client that has sent VERSION and CREATE_CHAN for each cid.
async fn client_creating(addr: SocketAddr, cids: &[u32]) -> TcpStream {
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    wire::client_version(0, 13).encode(&mut out);
    for &cid in cids {
        Message::with_name(
            Header::new(Command::CreateChan, 0, 0, cid, 13),
            b"NOBODY:HAS:IT",
        )
        .encode(&mut out);
    }
    client.write_all(&out).await.unwrap();
    client
}

/// True if the shim closes the connection after its VERSION greeting.
async fn closed_by_the_shim(client: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got == 16,
            Ok(Ok(n)) => got += n,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn channels_beyond_the_total_close_the_client_like_max_channels() {
    let budget = ChannelBudget::new(3);
    let addr = shim(budget.clone()).await;
    let mut first = client_creating(addr, &[1, 2]).await;
    assert!(!closed_by_the_shim(&mut first).await);
    assert_eq!(budget.held(), 2);
    let mut second = client_creating(addr, &[1, 2]).await;
    assert!(
        closed_by_the_shim(&mut second).await,
        "the 4th channel in all closes its client"
    );
    assert_eq!(budget.held(), 2, "the closed client gave its channel back");
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        budget.held(),
        0,
        "a client that leaves gives its channels back"
    );
    let mut third = client_creating(addr, &[1, 2, 3]).await;
    assert!(!closed_by_the_shim(&mut third).await);
    assert_eq!(budget.held(), 3);
}
