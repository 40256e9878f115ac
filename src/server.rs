//! The HTTP server loop: the router on hyper connections (HTTP/1.1 and h2c), set up for
//! streaming blobs to many clients with little memory, and for not being held up by clients
//! that stall.
//!
//! Limits (`[server]`): a connection must deliver a whole request head within
//! `header_read_timeout` (hyper's timer for every HTTP/1.1 request head; for the first request
//! of any connection, whatever the protocol, a deadline here, since the protocol sniffing
//! before hyper has no timeout of its own); a request body that sends nothing for
//! `body_idle_timeout` ends with an error, and so does a connection whose client leaves our
//! writes unread that long (silences only: a transfer that keeps moving is never cut); at
//! most `max_connections` connections are served at once, the next ones wait in the listen
//! backlog; at most `max_connections_per_client` of them from one client address, further
//! ones are closed at once.
//!
//! HTTP/2 (h2c and TLS with ALPN) is bounded the same way: at most
//! `http2_max_concurrent_streams` streams per connection, `http2_max_send_buffer` bytes queued
//! per stream beyond the client's window, and a connection with no open stream for
//! `http2_idle_timeout` is closed gracefully (GOAWAY; hyper has no such timeout of its own, so
//! each connection counts its open streams, see [`Streams`]) so idle connections that only
//! answer PINGs do not hold slots. The response bytes an HTTP/2 connection's streams hold at
//! once are bounded by `http2_max_concurrent_streams × http2_max_send_buffer` (see
//! [`SendBudget`]).
//!
//! TLS (`[server.tls]`, [`crate::tls`]): a TLS listener hands each accepted socket to its own
//! task, which runs the handshake (bounded by the same first-request deadline) and then serves
//! HTTP/1.1 or HTTP/2 (ALPN) on the TLS stream exactly as on a plain one; the socket under TLS
//! keeps the write idle limit. A verified client certificate goes on every request of its
//! connection as [`ClientCert`] (`auth::ClientCert`). A plain listener (`server.plain_listen`) can run beside it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::auth::ClientCert;
use crate::config::ServerConfig;

/// What hyper buffers per connection. Its default (~400 KiB) let it queue a second 256 KiB
/// body chunk behind one the client's socket has no room for yet: with many slow clients, most
/// of the server's memory. Request heads still fit with room to spare.
const MAX_BUF_SIZE: usize = 64 << 10;

/// HTTP/2 connections with no frames for this long are pinged; no answer within 20 s (hyper's
/// default) closes them.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// The connection limits from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_connections: usize,
    /// `0`: no cap.
    pub max_connections_per_client: usize,
    pub http2_max_concurrent_streams: u32,
    pub http2_max_send_buffer: usize,
    pub http2_idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &ServerConfig) -> Limits {
        Limits {
            header_read_timeout: c.header_read_timeout,
            body_idle_timeout: c.body_idle_timeout,
            max_connections: c.max_connections,
            max_connections_per_client: c.max_connections_per_client,
            http2_max_concurrent_streams: c.http2_max_concurrent_streams,
            http2_max_send_buffer: usize::try_from(c.http2_max_send_buffer.0).unwrap_or(usize::MAX),
            http2_idle_timeout: c.http2_idle_timeout,
        }
    }
}

/// A socket to accept connections on: plain HTTP, or TLS with the configuration
/// [`crate::tls::Tls`] holds (taken per connection, so a reload reaches new connections only).
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Listener {
    pub fn plain(tcp: TcpListener) -> Listener {
        Listener { tcp, tls: None }
    }

    pub fn tls(tcp: TcpListener, tls: Arc<crate::tls::Tls>) -> Listener {
        Listener { tcp, tls: Some(tls) }
    }
}

/// Serves `router` on `listener` (plain HTTP) until `shutdown` resolves; see [`serve_all`].
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
    serve_all(vec![Listener::plain(listener)], router, limits, shutdown).await
}

/// Serves `router` on every listener until `shutdown` resolves, then stops accepting and
/// returns once every open connection has finished its requests. `max_connections` counts the
/// connections of all listeners together, and so does `max_connections_per_client`. A TLS
/// handshake runs in the connection's own task, inside the first-request deadline
/// (`header_read_timeout`): a client that connects and never completes its handshake holds
/// one slot until then, and never the accept loop.
pub async fn serve_all(listeners: Vec<Listener>, router: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_BUF_SIZE).timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_send_buf_size(limits.http2_max_send_buffer);
    let builder = Arc::new(builder);
    // Graceful shutdown: every connection watches `stop`; the slots all back means all ended.
    let (stop, stopped) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = Arc::new(PerClient::new(limits.max_connections_per_client));
    let mut next = 0usize;
    tokio::pin!(shutdown);
    loop {
        // A free slot first: past the limit, new connections wait in the kernel's backlog and
        // the established ones carry on undisturbed.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (i, accepted) = tokio::select! {
            a = accept_any(&listeners, next) => a,
            _ = &mut shutdown => break,
        };
        // The next accept polls the listener after this one first: none starves the others.
        next = i + 1;
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let client_slot = match per_client.admit(peer.ip()) {
            Ok(s) => s,
            Err(open) => {
                per_client.refused(peer.ip(), open);
                drop((stream, slot));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builder: builder.clone(),
            router: router.clone(),
            stop: stopped.clone(),
            client: crate::limits::ClientAddr::new(peer.ip()),
            limits,
            // The first request's deadline runs from the accept: the handshake is inside it.
            deadline: Instant::now() + limits.header_read_timeout,
        };
        let io = WriteIdle::new(stream, limits.body_idle_timeout);
        match &listeners[i].tls {
            None => {
                tokio::spawn(async move {
                    let _slots = (slot, client_slot);
                    conn.serve(io, None, false).await
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                tokio::spawn(async move {
                    let _slots = (slot, client_slot);
                    let stream = match tokio::time::timeout_at(conn.deadline, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer.ip(), error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(
                                client = %peer.ip(),
                                "no TLS handshake within {:?} (server.header_read_timeout); closing the connection",
                                limits.header_read_timeout
                            );
                            return;
                        }
                    };
                    let cert = crate::tls::peer_subject(stream.get_ref().1).map(|subject| ClientCert { subject });
                    if let Some(c) = &cert {
                        tracing::debug!(client = %peer.ip(), client_cert = %c.subject, "TLS client certificate verified");
                    }
                    conn.serve(stream, cert, true).await
                });
            }
        }
    }
    drop(listeners);
    let _ = stop.send(true);
    // Every connection holds a slot until its task ends.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// Open connections per client address (`server.max_connections_per_client`).
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
    /// When a refusal was last logged (ms since `epoch`): at most one warning per 10 s.
    last_warned: AtomicU64,
    epoch: std::time::Instant,
}

/// One connection counted for its client address; uncounted when dropped.
struct ClientSlot {
    per: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn new(max: usize) -> PerClient {
        PerClient { max, open: Mutex::default(), last_warned: AtomicU64::new(0), epoch: std::time::Instant::now() }
    }

    /// Counts one more connection from `ip`, or `Err(open)` when it has the most it may.
    /// `Ok(None)`: no cap.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, usize> {
        if self.max == 0 {
            return Ok(None);
        }
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap();
        let n = open.entry(ip).or_default();
        if *n >= self.max {
            return Err(*n);
        }
        *n += 1;
        Ok(Some(ClientSlot { per: self.clone(), ip }))
    }

    fn refused(&self, ip: IpAddr, open: usize) {
        let now = self.epoch.elapsed().as_millis() as u64 + 10_000;
        let last = self.last_warned.load(Ordering::Relaxed);
        if now >= last + 10_000
            && self.last_warned.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(
                client = %ip.to_canonical(),
                open,
                "a connection was refused: its address has {open} open (server.max_connections_per_client; \
                 clients behind a load balancer or NAT share one address); further refusals within 10 s are not logged"
            );
        } else {
            tracing::debug!(client = %ip.to_canonical(), open, "connection refused (server.max_connections_per_client)");
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.per.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The open streams (requests whose response has not ended) of one connection, for the
/// HTTP/2 idle timeout.
struct Streams {
    /// (open streams, when that last changed)
    state: Mutex<(usize, Instant)>,
    changed: Notify,
    /// The connection speaks HTTP/2 (its requests say so).
    h2: AtomicBool,
}

/// One open stream; closed when dropped (with the response body, or the handler's future if
/// the request was cancelled).
struct StreamGuard(Arc<Streams>);

impl Streams {
    fn new() -> Streams {
        Streams { state: Mutex::new((0, Instant::now())), changed: Notify::new(), h2: AtomicBool::new(false) }
    }

    fn open(self: &Arc<Self>) -> StreamGuard {
        self.change(|n| n + 1);
        StreamGuard(self.clone())
    }

    fn change(&self, f: impl FnOnce(usize) -> usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *st = (f(st.0), Instant::now());
        drop(st);
        self.changed.notify_waiters();
    }

    /// Resolves once no stream has been open for `after`.
    async fn idle(&self, after: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (open, since) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
            if open > 0 {
                changed.await;
                continue;
            }
            let at = since + after;
            if Instant::now() >= at {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = changed => {}
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.change(|n| n.saturating_sub(1));
    }
}

/// Most of the send budget one chunk is charged (the store reads 256 KiB at a time); a larger
/// chunk is charged this much.
const BUDGET_UNIT: u32 = 256 << 10;

/// The response bytes all streams of one HTTP/2 connection may hold at once (polled from their
/// bodies, not yet written to the socket): `http2_max_concurrent_streams ×
/// http2_max_send_buffer`. hyper reads a stream's next chunk as soon as it handed the previous
/// one to h2, whatever the client's window, so without this every stream a client leaves
/// unread holds two read chunks; with it, a connection holds at most the budget. A stream
/// that waits for its share longer than `body_idle_timeout` (the others left unread that
/// long) ends with an error.
struct SendBudget {
    permits: Arc<Semaphore>,
    total: u32,
    wait: Duration,
}

impl SendBudget {
    fn new(limits: &Limits) -> SendBudget {
        let total = (limits.http2_max_concurrent_streams as usize)
            .saturating_mul(limits.http2_max_send_buffer)
            .clamp(1, (u32::MAX as usize).min(Semaphore::MAX_PERMITS)) as u32;
        SendBudget { permits: Arc::new(Semaphore::new(total as usize)), total, wait: limits.body_idle_timeout }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

/// The response body of an HTTP/2 stream: keeps the stream counted open until it is dropped,
/// and polls the handler's body only with a share of the connection's [`SendBudget`] in
/// hand. The share goes with the chunk (`Bytes::from_owner`) and comes back when h2 drops
/// it: written to the socket, or the stream reset.
struct H2Body {
    inner: Body,
    budget: Arc<SendBudget>,
    permit: Option<OwnedSemaphorePermit>,
    acquiring: Option<Acquire>,
    timer: Option<Pin<Box<Sleep>>>,
    _stream: StreamGuard,
}

impl H2Body {
    fn new(inner: Body, budget: Arc<SendBudget>, stream: StreamGuard) -> H2Body {
        H2Body { inner, budget, permit: None, acquiring: None, timer: None, _stream: stream }
    }
}

/// A chunk and its share of the send budget.
struct Charged {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl http_body::Body for H2Body {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.permit.is_none() && !this.inner.is_end_stream() {
            let unit = this.budget.total.min(BUDGET_UNIT);
            let permits = this.budget.permits.clone();
            let acquiring = this.acquiring.get_or_insert_with(|| Box::pin(permits.acquire_many_owned(unit)));
            match acquiring.as_mut().poll(cx) {
                Poll::Ready(Ok(p)) => {
                    (this.acquiring, this.timer) = (None, None);
                    this.permit = Some(p);
                }
                Poll::Ready(Err(_)) => unreachable!("the send budget's semaphore is never closed"),
                Poll::Pending => {
                    let wait = this.budget.wait;
                    let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                    ready!(timer.as_mut().poll(cx));
                    return Poll::Ready(Some(Err(axum::Error::new(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the other streams of this HTTP/2 connection held its send budget for {wait:?} \
                             (server.body_idle_timeout)"
                        ),
                    )))));
                }
            }
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            // The end, or an error: the share goes back.
            this.permit = None;
            return Poll::Ready(frame);
        };
        match frame.into_data() {
            Ok(data) if !data.is_empty() => {
                let Some(mut permit) = this.permit.take() else { return Poll::Ready(Some(Ok(Frame::data(data)))) };
                // A smaller chunk gives the rest of its share back at once.
                let charge = data.len().min(permit.num_permits());
                drop(permit.split(permit.num_permits() - charge));
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(Charged { data, _permit: permit })))))
            }
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The next connection of any listener, polling from `first` on: (listener index, result).
fn accept_any(
    listeners: &[Listener],
    first: usize,
) -> impl Future<Output = (usize, io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>)> + '_ {
    std::future::poll_fn(move |cx| {
        let n = listeners.len();
        for k in 0..n {
            let i = (first + k) % n;
            if let Poll::Ready(r) = listeners[i].tcp.poll_accept(cx) {
                return Poll::Ready((i, r));
            }
        }
        Poll::Pending
    })
}

/// One accepted connection, before its protocol is known.
struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    /// Becomes `true` at shutdown: the connection finishes its requests and closes.
    stop: watch::Receiver<bool>,
    client: crate::limits::ClientAddr,
    limits: Limits,
    deadline: Instant,
}

impl Conn {
    /// Serves HTTP/1.1 or HTTP/2 on `io` (plain, or TLS after its handshake); every request
    /// carries the client's address and, when it presented one, its certificate. Closed if no
    /// complete request head arrived by the deadline; an HTTP/2 connection is closed
    /// gracefully once no stream has been open for `http2_idle_timeout`.
    async fn serve<I>(self, io: I, cert: Option<ClientCert>, secure: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let first_request = Arc::new(Notify::new());
        let streams = Arc::new(Streams::new());
        let service = {
            let (router, first_request, idle) = (self.router, first_request.clone(), self.limits.body_idle_timeout);
            let (client, streams) = (self.client, streams.clone());
            let budget = Arc::new(SendBudget::new(&self.limits));
            hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                let stream = (req.version() == hyper::Version::HTTP_2).then(|| {
                    streams.h2.store(true, Ordering::Relaxed);
                    streams.open()
                });
                first_request.notify_one();
                req.extensions_mut().insert(client);
                if secure {
                    req.extensions_mut().insert(crate::auth::Secure);
                }
                if let Some(cert) = &cert {
                    req.extensions_mut().insert(cert.clone());
                }
                let resp = router.clone().oneshot(req.map(|b| Body::new(IdleBody::new(b, idle))));
                let budget = budget.clone();
                async move {
                    let resp = resp.await?;
                    Ok::<_, std::convert::Infallible>(match stream {
                        Some(s) => resp.map(|inner| Body::new(H2Body::new(inner, budget, s))),
                        None => resp,
                    })
                }
            })
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), service).into_owned();
        tokio::pin!(conn);
        let mut stop = self.stop;
        tokio::select! {
            res = conn.as_mut() => return log_end(res),
            _ = first_request.notified() => {}
            _ = stopping(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                return log_end(conn.await);
            }
            _ = tokio::time::sleep_until(self.deadline) => {
                tracing::debug!(
                    "no complete request head within {:?}; closing the connection",
                    self.limits.header_read_timeout
                );
                return;
            }
        }
        let idle_timeout = self.limits.http2_idle_timeout;
        let mut closing = false;
        loop {
            tokio::select! {
                res = conn.as_mut() => return log_end(res),
                _ = stopping(&mut stop), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = streams.idle(idle_timeout), if !closing && streams.h2.load(Ordering::Relaxed) => {
                    tracing::debug!(
                        client = %self.client.0,
                        "no HTTP/2 stream open for {idle_timeout:?} (server.http2_idle_timeout); closing the connection"
                    );
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Resolves at shutdown (or if the server loop is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

fn log_end(res: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = res {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// A request body that fails when the client sends nothing for `idle` while the handler is
/// waiting for it. Only silence counts: the timer runs while a poll is pending and is reset
/// by every frame.
struct IdleBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleBody {
    fn new(inner: Incoming, idle: Duration) -> IdleBody {
        IdleBody { inner, idle, timer: None, armed: false }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client sent nothing for {:?} (server.body_idle_timeout)", this.idle),
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail once the client has left them unread (the socket buffer
/// full) for `idle`. Reads pass straight through; only a write that cannot make progress
/// starts the timer, and any progress resets it.
struct WriteIdle<T> {
    io: T,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<T> WriteIdle<T> {
    fn new(io: T, idle: Duration) -> WriteIdle<T> {
        WriteIdle { io, idle, timer: None, armed: false }
    }

    /// After a write poll: progress disarms the timer; `Pending` arms it and fails the write
    /// once it fires.
    fn watch<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.idle;
                let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.armed {
                    timer.as_mut().reset(deadline);
                    self.armed = true;
                }
                ready!(timer.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {:?} (server.body_idle_timeout)", self.idle),
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteIdle<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteIdle<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Requests of a TLS connection carry the verified client certificate's subject (and the
    /// client's address); a connection without one carries none.
    #[tokio::test]
    async fn tls_requests_carry_the_client_certificate() {
        use crate::tls::tests::{ca, leaf};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let (server_ca, client_ca) = (ca("server CA"), ca("client CA"));
        let (cert, key) = leaf(&server_ca, Some("127.0.0.1"), &["127.0.0.1"]);
        let (ccert, ckey) = leaf(&client_ca, Some("alice.ci"), &[]);
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cfg = crate::config::TlsConfig {
            cert: write("s.pem", &cert),
            key: write("s.key", &key),
            client_ca: Some(write("ca.pem", &client_ca.pem())),
            client_auth: None,
            reload_interval: Duration::ZERO,
        };
        let tls = crate::tls::Tls::new(&cfg).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let router = Router::new().route(
            "/who",
            axum::routing::get(|req: axum::extract::Request| async move {
                let cert = req.extensions().get::<ClientCert>().map(|c| c.subject.clone());
                let addr = req.extensions().get::<crate::limits::ClientAddr>().map(|a| a.0.to_string());
                format!("{} from {}", cert.unwrap_or_else(|| "nobody".into()), addr.unwrap_or_default())
            }),
        );
        let limits = Limits {
            header_read_timeout: Duration::from_secs(5),
            body_idle_timeout: Duration::from_secs(5),
            max_connections: 16,
            max_connections_per_client: 0,
            http2_max_concurrent_streams: 64,
            http2_max_send_buffer: 64 << 10,
            http2_idle_timeout: Duration::from_secs(60),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_all(vec![Listener::tls(tcp, tls)], router, limits, async {
            let _ = stopped.await;
        }));
        let roots = reqwest::Certificate::from_pem_bundle(server_ca.pem().as_bytes()).unwrap();
        let url = format!("https://127.0.0.1:{port}/who");
        let with = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only(roots.clone())
            .identity(reqwest::Identity::from_pem(format!("{ccert}{ckey}").as_bytes()).unwrap())
            .build()
            .unwrap();
        let resp = with.get(&url).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.text().await.unwrap(), "alice.ci from 127.0.0.1");
        let without = reqwest::Client::builder().no_proxy().tls_certs_only(roots).build().unwrap();
        assert_eq!(without.get(&url).send().await.unwrap().text().await.unwrap(), "nobody from 127.0.0.1");
        let _ = stop.send(());
        drop((with, without));
        tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
    }

    /// A write the peer never reads fails after the idle time; one that keeps moving does not.
    #[tokio::test]
    async fn stalled_writes_time_out() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = WriteIdle::new(a, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let chunk = vec![7u8; 512];
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = w.write_all(&chunk).await {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("a stalled write must fail");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200) && started.elapsed() < Duration::from_secs(5));
        // A reader that drains slowly (each read well within the idle time) is never cut.
        let (a, mut b2) = tokio::io::duplex(1024);
        let mut w = WriteIdle::new(a, Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 512];
            let mut n = 0;
            while n < 20 * 512 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n += b2.read(&mut buf).await.unwrap();
            }
            n
        });
        for _ in 0..20 {
            w.write_all(&chunk).await.expect("a moving write is never cut");
        }
        assert_eq!(reader.await.unwrap(), 20 * 512);
        drop(b.shutdown().await);
    }
}
