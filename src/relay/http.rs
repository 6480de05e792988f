//! A minimal HTTP/1.x responder on the shared port, for health probes and
//! metric scrapes: `GET /healthz` and `GET /metrics` (and HEAD of both).
//!
//! Bounded like the protocol connections: the request head is read up to
//! [`MAX_REQUEST_HEAD`] bytes within the hello timeout, one response is
//! written with `Connection: close`, and the connection is closed. A
//! request body, pipelined requests and keep-alive are not served; curl,
//! Kubernetes httpGet probes and Prometheus all work with that.

use super::metrics::{BadInput, Refusal, METRICS};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::error::Elapsed;
use tracing::{debug, warn};

/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_HEAD: usize = 4096;

/// After the response, how long and how much the client's unread bytes
/// are drained before the close.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// Content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the responder needs to know about the relay.
pub struct State {
    /// The listener and both search relays are up.
    pub ready: bool,
}

/// Whether `head` holds a whole request head (ends in an empty line).
fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

/// The response to a complete request head, as bytes to write.
pub fn respond(head: &[u8], state: &State) -> Vec<u8> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return response(400, "Bad Request", "text/plain", "bad request line\n", true);
    };
    if !version.starts_with("HTTP/1.") {
        return response(400, "Bad Request", "text/plain", "HTTP/1.x only\n", true);
    }
    let with_body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => {
            return response(
                405,
                "Method Not Allowed",
                "text/plain",
                "GET or HEAD only\n",
                true,
            )
        }
    };
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/healthz" if state.ready => response(200, "OK", "text/plain", "ok\n", with_body),
        "/healthz" => response(
            503,
            "Service Unavailable",
            "text/plain",
            "starting\n",
            with_body,
        ),
        "/metrics" => response(
            200,
            "OK",
            METRICS_CONTENT_TYPE,
            &METRICS.render(),
            with_body,
        ),
        _ => response(
            404,
            "Not Found",
            "text/plain",
            "not found; try /healthz or /metrics\n",
            with_body,
        ),
    }
}

fn response(status: u16, reason: &str, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Why no whole request head was read.
enum HeadError {
    TooLarge,
    Closed,
}

/// Reads one request head within `timeout`, answers it and closes.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, timeout: Duration, state: State) {
    let read = tokio::time::timeout(timeout, read_head(&mut stream)).await;
    let Some(reply) = reply_to(read, peer, timeout, &state) else {
        return;
    };
    METRICS.http_requests.fetch_add(1, Ordering::Relaxed);
    let written = tokio::time::timeout(timeout, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        debug!(target: "nameshim::relay::http", %peer, "HTTP response not delivered");
        return;
    }
    drain_before_close(&mut stream).await;
}

/// Reads until the request head is whole, at most [`MAX_REQUEST_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head_complete(&head) {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(HeadError::TooLarge);
        }
        let room = (MAX_REQUEST_HEAD - head.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(head)
}

/// The response to what [`read_head`] gave within `timeout`; None when
/// there is nobody to answer (closed, or silent too long).
fn reply_to(
    read: Result<Result<Vec<u8>, HeadError>, Elapsed>,
    peer: SocketAddr,
    timeout: Duration,
    state: &State,
) -> Option<Vec<u8>> {
    match read {
        Ok(Ok(head)) => Some(respond(&head, state)),
        Ok(Err(HeadError::TooLarge)) => {
            METRICS.refused(Refusal::HttpRequestTooLarge);
            warn!(target: "nameshim::relay::http", %peer, "closing HTTP connection: request head over {MAX_REQUEST_HEAD} bytes");
            Some(response(
                431,
                "Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
                true,
            ))
        }
        Ok(Err(HeadError::Closed)) => {
            debug!(target: "nameshim::relay::http", %peer, "HTTP client closed before a whole request");
            None
        }
        Err(_) => {
            METRICS.bad_input(BadInput::Timeout);
            warn!(target: "nameshim::relay::http", %peer, "closing HTTP connection: no whole request within {timeout:?}");
            None
        }
    }
}

/// Closing with unread bytes (the rest of an oversized head) would send
/// a reset that can destroy the response before the client reads it:
/// read what is left, boundedly, until the client closes its side.
async fn drain_before_close(stream: &mut TcpStream) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: State = State { ready: true };

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn healthz_is_ok_once_ready_and_503_before() {
        let ok = text(respond(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", &READY));
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nok\n"), "{ok}");
        assert!(ok.contains("Content-Length: 3\r\n"));
        assert!(ok.contains("Connection: close\r\n"));
        let starting = text(respond(
            b"GET /healthz HTTP/1.0\r\n\r\n",
            &State { ready: false },
        ));
        assert!(starting.starts_with("HTTP/1.1 503 "), "{starting}");
    }

    #[test]
    fn metrics_are_served_as_prometheus_text_0_0_4() {
        let got = text(respond(
            b"GET /metrics HTTP/1.0\r\nAccept: */*\r\n\r\n",
            &READY,
        ));
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(body.contains("# TYPE nameshim_clients gauge\n"));
    }

    #[test]
    fn a_query_string_is_ignored() {
        let got = text(respond(b"GET /healthz?verbose=1 HTTP/1.1\r\n\r\n", &READY));
        assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    }

    #[test]
    fn head_gets_the_headers_without_a_body() {
        let got = text(respond(b"HEAD /healthz HTTP/1.1\r\n\r\n", &READY));
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(got.contains("Content-Length: 3\r\n"));
        assert!(got.ends_with("\r\n\r\n"), "{got}");
    }

    #[test]
    fn unknown_paths_are_404_and_other_methods_405() {
        let missing = text(respond(b"GET / HTTP/1.1\r\n\r\n", &READY));
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = text(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &READY));
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"));
    }

    #[test]
    fn malformed_request_lines_are_400() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /healthz\r\n\r\n",
            b"GET /healthz SPDY/3\r\n\r\n",
        ] {
            let got = text(respond(bad, &READY));
            assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
        }
    }

    #[test]
    fn a_head_is_complete_at_its_empty_line() {
        assert!(head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(head_complete(b"GET / HTTP/1.0\n\n"));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
    }

    async fn exchange(request: &[u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let served = tokio::spawn(serve(server, peer, Duration::from_secs(2), READY));
        client.write_all(request).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        served.await.unwrap();
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn one_response_then_close() {
        let got = exchange(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.ends_with("ok\n"));
    }

    #[tokio::test]
    async fn a_request_head_over_the_limit_is_refused_with_431() {
        let mut request = b"GET /healthz HTTP/1.1\r\nX-Long: ".to_vec();
        request.resize(MAX_REQUEST_HEAD + 100, b'a');
        let got = exchange(&request).await;
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
    }

    #[tokio::test]
    async fn a_silent_http_client_is_closed_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let served = tokio::spawn(serve(server, peer, Duration::from_millis(100), READY));
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(0))), "closed without a response");
        served.await.unwrap();
    }
}
