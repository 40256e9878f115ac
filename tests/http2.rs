//! HTTP/2 (h2c, prior knowledge on the plain listener) is bounded like HTTP/1.1, and one
//! client address cannot take every connection (issue #23, defect 3):
//! `server.http2_idle_timeout` closes a connection with no open stream, so idle h2c
//! connections do not hold `max_connections` slots; `server.http2_max_concurrent_streams` and
//! `server.http2_max_send_buffer` bound what unread streams cost (RSS of the real process);
//! `server.max_connections_per_client` refuses one address's connections past the cap. Real
//! parts on loopback: the `stevedore` binary, the `h2` crate as the client.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::data;
use common::http::{client, client_from, client_with_timeout};
use common::stevedore::Stevedore;

/// A local registry (no upstream) with these `[server]` lines.
fn server(lines: &str) -> Stevedore {
    Stevedore::builder()
        .config(&format!("[proxy]\ndefault_upstream = \"\"\n\n[server]\n{lines}\n"))
        .rust_log("warn,stevedore=debug")
        .start()
}

/// An h2c connection: the request handle and the task driving the connection (it ends when
/// the server closes the connection).
struct H2 {
    send: h2::client::SendRequest<Bytes>,
    conn: tokio::task::JoinHandle<Instant>,
}

/// Opens an h2c connection to `sd` with the h2 client's default windows except the
/// connection's (`conn_window`), and keeps it driven (PINGs answered) until the server closes it.
async fn h2c(sd: &Stevedore, conn_window: Option<u32>) -> H2 {
    let tcp = TcpStream::connect(("127.0.0.1", sd.port())).await.expect("connect");
    let mut b = h2::client::Builder::new();
    if let Some(w) = conn_window {
        b.initial_connection_window_size(w);
    }
    let (send, conn) = tokio::time::timeout(Duration::from_secs(10), b.handshake::<_, Bytes>(tcp))
        .await
        .expect("h2 handshake within 10 s")
        .expect("h2 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    H2 { send, conn }
}

fn get(sd: &Stevedore, path: &str) -> http::Request<()> {
    http::Request::builder().method("GET").uri(sd.url(path)).body(()).unwrap()
}

/// One GET on `c`, read to its end: (status, body).
async fn h2_get(c: &mut H2, sd: &Stevedore, path: &str) -> (u16, Vec<u8>) {
    let send = tokio::time::timeout(Duration::from_secs(10), c.send.clone().ready())
        .await
        .expect("h2 ready within 10 s")
        .expect("h2 ready");
    let mut send = send;
    let (resp, _) = send.send_request(get(sd, path), true).expect("h2 request");
    let resp =
        tokio::time::timeout(Duration::from_secs(10), resp).await.expect("h2 response head").expect("h2 response");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data()).await.expect("h2 body") {
        let chunk = chunk.expect("h2 body chunk");
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    (status, out)
}

/// VmRSS of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// With `max_connections = 4`, four h2c connections that each made one request and then
/// only answer PINGs are closed (GOAWAY) after `http2_idle_timeout`, and a fifth client is
/// served then instead of waiting in the backlog for as long as they stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connections_do_not_hold_slots_past_the_idle_timeout() {
    let sd = server("max_connections = 4\nhttp2_idle_timeout = \"2s\"");
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut c = h2c(&sd, None).await;
        let (status, _) = h2_get(&mut c, &sd, "/v2/").await;
        assert_eq!(status, 200, "h2c connection {i}: GET /v2/");
        conns.push(c);
    }
    let opened = Instant::now();
    // The fifth client (HTTP/1.1) waits for a slot: served once the idle ones are closed.
    let r = client_with_timeout(Duration::from_secs(20)).get(sd.url("/v2/")).send().await;
    let waited = opened.elapsed();
    let r = r.unwrap_or_else(|e| {
        panic!("the fifth client was not served within 20 s while 4 idle h2c connections held every slot: {e}")
    });
    assert_eq!(r.status(), 200, "the fifth client");
    assert!(waited < Duration::from_secs(8), "the fifth client waited {waited:?} (idle timeout 2 s)");
    for (i, c) in conns.into_iter().enumerate() {
        let closed = tokio::time::timeout(Duration::from_secs(10), c.conn)
            .await
            .unwrap_or_else(|_| panic!("idle h2c connection {i} still open 10 s after the idle timeout"))
            .unwrap();
        let after = closed - opened;
        assert!(
            after >= Duration::from_millis(1500),
            "h2c connection {i} closed after {after:?}, before the idle timeout"
        );
    }
}

/// A connection with a stream open is never idle: a blob read slowly (a pause of three idle
/// timeouts in the middle) arrives whole over one h2c connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_with_an_open_stream_is_not_closed_as_idle() {
    let sd = server("http2_idle_timeout = \"1s\"");
    let blob = data::bytes(8801, 2 << 20);
    let d = sd.registry().push_blob("h2/slow", &blob).await;
    let c = h2c(&sd, None).await;
    let mut send = c.send.clone().ready().await.expect("h2 ready");
    let (resp, _) = send.send_request(get(&sd, &format!("/v2/h2/slow/blobs/{d}")), true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut paused = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), body.data()).await.expect("body") {
        let chunk = chunk.unwrap_or_else(|e| panic!("the stream broke after {} bytes: {e}", got.len()));
        got.extend_from_slice(&chunk);
        if !paused && got.len() >= 64 << 10 {
            // Nothing read for 3 s: the server's window is used up, the stream stays open.
            tokio::time::sleep(Duration::from_secs(3)).await;
            paused = true;
        }
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    assert_eq!(got.len(), blob.len(), "bytes over the slowly read stream");
    assert_eq!(data::sha256(&got), d);
    assert!(!c.conn.is_finished(), "the connection was closed right after its stream ended");
}

/// Three h2c connections each open as many streams of a 64 MiB blob as the server lets them
/// (up to 200) and leave them unread (the client's windows stay used up) for 10 s: the
/// server's RSS grows by at most 32 MiB, and it goes on serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_h2c_streams_are_bounded_in_memory() {
    let sd = server("");
    let blob = data::bytes(8802, 64 << 20);
    let d = sd.registry().push_blob("h2/big", &blob).await;
    drop(blob);
    let path = format!("/v2/h2/big/blobs/{d}");
    // Warm: one whole read over h2c.
    let mut warm = h2c(&sd, None).await;
    let (status, got) = h2_get(&mut warm, &sd, &path).await;
    assert_eq!((status, got.len()), (200, 64 << 20), "a warm-up GET over h2c");
    drop((got, warm));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss(sd.pid());

    let mut held = Vec::new();
    let mut conns = Vec::new();
    let mut requested = Vec::new();
    for _ in 0..3 {
        // A large connection window: every stream may be sent its first 64 KiB window.
        let mut c = h2c(&sd, Some(1 << 30)).await;
        // One exchange first: the server's SETTINGS (its stream limit) are in force.
        let (status, _) = h2_get(&mut c, &sd, "/v2/").await;
        assert_eq!(status, 200);
        let mut n = 0;
        for _ in 0..200 {
            // Past the server's stream limit the client queues the request.
            let Ok(Ok(mut send)) = tokio::time::timeout(Duration::from_secs(2), c.send.clone().ready()).await else {
                break;
            };
            let Ok((resp, _)) = send.send_request(get(&sd, &path), true) else { break };
            held.push(resp);
            n += 1;
        }
        requested.push(n);
        // The connection task keeps running (the client reads frames, answers PINGs); only
        // the streams' bodies stay unread.
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = rss(sd.pid());
    let mut answered = 0;
    for r in held.iter_mut() {
        if matches!(futures::FutureExt::now_or_never(r), Some(Ok(_))) {
            answered += 1;
        }
    }
    eprintln!("RSS {} -> {} MiB, {answered} streams answered of {requested:?}", before >> 20, after >> 20);
    assert_eq!(answered, 3 * 64, "streams answered (http2_max_concurrent_streams = 64 per connection)");
    let grew = after.saturating_sub(before);
    assert!(
        grew <= 32 << 20,
        "RSS grew by {} MiB ({} → {} MiB) with {answered} unread h2c streams of a 64 MiB blob ({requested:?} requested)",
        grew >> 20,
        before >> 20,
        after >> 20
    );
    // Others are still served.
    let r = client().get(sd.url("/v2/")).send().await.expect("another client");
    assert_eq!(r.status(), 200);
    drop((held, conns));
}

/// `max_connections_per_client = 3`: a fourth connection from the same address is refused
/// (closed without an answer) while three are open; another address is served; once one of
/// the three closes, the address is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_client_cap_are_refused() {
    let sd = server("max_connections_per_client = 3");
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", sd.port())).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await.expect("answer").unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200", "connection {i}");
        open.push(s);
    }
    let mut fourth = TcpStream::connect(("127.0.0.1", sd.port())).await.unwrap();
    let _ = fourth.write_all(b"GET /v2/ HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut buf)).await;
    match read {
        Err(_) => panic!("a fourth connection from one address was neither answered nor closed within 5 s"),
        Ok(_) => assert!(
            buf.is_empty(),
            "a fourth connection from one address (cap 3) was served: {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        ),
    }
    // Another address is not affected.
    let r = client_from("127.0.0.2").get(sd.url("/v2/")).send().await.expect("a client from 127.0.0.2");
    assert_eq!(r.status(), 200, "another address");
    // One of the three closes: the address gets a connection again.
    drop(open.pop());
    let start = Instant::now();
    loop {
        // A fresh client each time: a refused connection is not reused.
        let r = client().get(sd.url("/v2/")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the address was not served again after one of its connections closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
