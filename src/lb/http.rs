//! The `http` load balancer: an HTTP/1.1 reverse proxy on hyper.
//!
//! Each request gets a backend from the same choice as the `tcp` proxy (health, `balance`), so a
//! dead backend is skipped before the request is sent (a connect failure never consumes the
//! request). Backend connections are pooled per backend and reused once their answer is over; a
//! pooled connection that turns out to be closing gives the request back for the next one.
//! Clients get [`HEADER_READ_TIMEOUT`] to send their headers, backends [`REQUEST_TIMEOUT`] to
//! answer. Requests
//! carry X-Forwarded-For (appended), X-Forwarded-Host and X-Forwarded-Proto; hop-by-hop headers
//! are dropped as RFC 9110 7.6.1 asks of a proxy.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::BackendMetrics;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::backends::{Backends, HandshakeAck, Timeouts};
use super::Admission;
use crate::shutdown::Shutdown;

/// Response body: a backend's streamed body, or our own short error text.
type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that belong to one hop and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Longest time a client may take to send a request's headers; hyper closes the connection
/// after it (also between requests of a kept-alive connection), so slow-header clients cannot
/// hold connections for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest time a backend may take to answer a request with its headers; then the client gets
/// 504. Long enough for slow API calls (kube-apiserver's own default request timeout is 60 s);
/// a streamed body (a watch) is not bounded once its headers came.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

/// Accepts clients until `shutdown` fires, then aborts every open connection.
pub async fn serve(
    listener: TcpListener,
    backends: Arc<Backends>,
    limit: Arc<Semaphore>,
    shutdown: Shutdown,
) {
    let pool = Arc::new(Pool::default());
    super::accept_loop(listener, limit, shutdown, move |client, peer, admission| {
        let backends = backends.clone();
        let pool = pool.clone();
        // TCP_NODELAY comes with the socket, inherited from the listener (see `lb::listen`).
        async move {
            let _admission: Admission = admission;
            let svc = hyper::service::service_fn(move |req| {
                forward(req, peer, backends.clone(), pool.clone())
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(client), svc)
                .await
            {
                debug!("http client {peer}: {e}");
            }
        }
    })
    .await;
}

/// Most idle backend connections kept per backend for reuse.
const POOL_MAX_IDLE: usize = 64;
/// An idle backend connection older than this is closed instead of reused: backends close idle
/// keep-alive connections after a while themselves, and a request sent on one that is being
/// closed is lost.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections to one backend, each with the time it became idle.
type Idle = Vec<(Instant, SendRequest<Incoming>)>;

/// Idle backend connections of one load balancer, per backend: a request reuses one instead of
/// a new connect and handshake.
#[derive(Default)]
struct Pool {
    /// Per backend, the idle connections and since when they are idle.
    idle: Mutex<HashMap<SocketAddr, Idle>>,
}

impl Pool {
    /// An idle connection to `addr` that can take a request now.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&addr)?;
        while let Some((since, s)) = list.pop() {
            if since.elapsed() < POOL_IDLE_TIMEOUT && s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    /// Keeps `sender` once its current answer is over (a watch's never is: then it is dropped
    /// with its connection).
    fn recycle(self: &Arc<Self>, addr: SocketAddr, mut sender: SendRequest<Incoming>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                if let Ok(mut idle) = pool.idle.lock() {
                    let list = idle.entry(addr).or_default();
                    if list.len() < POOL_MAX_IDLE {
                        list.push((Instant::now(), sender));
                    }
                }
            }
        });
    }
}

async fn forward(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    backends: Arc<Backends>,
    pool: Arc<Pool>,
) -> Result<Response<Body>, Infallible> {
    add_forwarding_headers(req.headers_mut(), peer);
    let order = backends.order();
    // A pooled connection to the first choice, if there is one: no connect, no handshake.
    if let Some(&first) = order.first() {
        let addr = backends.addr(first);
        while let Some(mut sender) = pool.take(addr) {
            match tokio::time::timeout(REQUEST_TIMEOUT, sender.try_send_request(req)).await {
                Err(_) => return Ok(timed_out(peer, addr)),
                Ok(Ok(resp)) => {
                    pool.recycle(addr, sender);
                    return Ok(relay(resp));
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Not sent (the connection was closing): try the next one.
                    Some(r) => req = r,
                    None => {
                        warn!("http request from {peer} to {addr}: {}", e.error());
                        return Ok(error_response(StatusCode::BAD_GATEWAY, "backend failed\n"));
                    }
                },
            }
        }
    }
    let (stream, mut lease) = match backends
        .connect_in(order, Timeouts::Now, HandshakeAck::Alone)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            warn!("http request from {peer}: {e}");
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "no backend available\n",
            ));
        }
    };
    let backend = lease.addr();
    let stream = Counted::new(stream, lease.metrics().clone());
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            warn!("http handshake with {backend}: {e}");
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "backend handshake failed\n",
            ));
        }
    };
    // Drives the backend connection for as long as a request or the pool uses it, or until the
    // backend is marked down (`onMarkedDown: close`): a streamed answer then ends.
    tokio::spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r {
                debug!("backend {backend}: {e}");
            },
            _ = lease.marked_down() => debug!("backend {backend} marked down: closing a connection to it"),
        }
    });
    match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await {
        Err(_) => Ok(timed_out(peer, backend)),
        Ok(Ok(resp)) => {
            pool.recycle(backend, sender);
            Ok(relay(resp))
        }
        Ok(Err(e)) => {
            warn!("http request from {peer} to {backend}: {e}");
            Ok(error_response(StatusCode::BAD_GATEWAY, "backend failed\n"))
        }
    }
}

/// A backend connection that counts the bytes it carries into its backend's metrics: tallied
/// per read and write in two plain fields, added to the counters once, when it closes.
struct Counted {
    /// The connection.
    inner: TcpStream,
    /// Bytes written to the backend.
    sent: u64,
    /// Bytes read from the backend.
    received: u64,
    /// Where the tallies go.
    metrics: BackendMetrics,
}

impl Counted {
    fn new(inner: TcpStream, metrics: BackendMetrics) -> Counted {
        Counted {
            inner,
            sent: 0,
            received: 0,
            metrics,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.bytes(self.sent, self.received);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.received += (buf.filled().len() - before) as u64;
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.sent += n as u64;
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.sent += n as u64;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A backend's answer, as sent on to the client.
fn relay(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// The answer when a backend sent no answer headers within [`REQUEST_TIMEOUT`].
fn timed_out(peer: SocketAddr, backend: SocketAddr) -> Response<Body> {
    warn!(
        "http request from {peer} to {backend}: no answer within {} s",
        REQUEST_TIMEOUT.as_secs()
    );
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "backend did not answer in time\n",
    )
}

/// Sets the X-Forwarded-* headers and removes hop-by-hop ones from a request.
fn add_forwarding_headers(h: &mut HeaderMap, peer: SocketAddr) {
    strip_hop_by_hop(h);
    let client_ip = peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert("x-forwarded-host", host);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    h.remove("keep-alive");
}

fn error_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LbType;
    use crate::lb::testutil::{free_port, lb_config, spawn_backend, start};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sequential requests through the `http` load balancer reuse one backend connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backend_connections_are_pooled() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let backend_addr = spawn_backend(move |s| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hi"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            }
        });
        let config = lb_config("web", LbType::Http, free_port(), &[backend_addr]);
        let (lb, addr) = start(&config).await;
        for _ in 0..5 {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.expect("read");
            assert!(got.ends_with(b"hi"), "{}", String::from_utf8_lossy(&got));
            // The pool takes the connection back once the answer is over.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        lb.stop().await;
        // One backend connection carried the five requests; its bytes are counted when it
        // closes, which the stopped listener's pool makes happen.
        use crate::metrics::backend_sample;
        let get = |m: &str| backend_sample(m, "web", backend_addr).unwrap_or(-1.0);
        assert_eq!(get("backend_connections_total"), 1.0);
        for _ in 0..100 {
            if get("backend_received_bytes_total") > 0.0 && get("backend_active_connections") == 0.0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Five requests with their forwarding headers, five answers ending in "hi".
        assert!(get("backend_sent_bytes_total") > 5.0 * 40.0);
        assert!(get("backend_received_bytes_total") > 5.0 * 40.0);
        assert_eq!(get("backend_active_connections"), 0.0);
    }

    #[test]
    fn forwarding_headers_append_and_strip() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("api.example:6443"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.9"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        add_forwarding_headers(&mut h, "192.0.2.7:5555".parse().expect("addr"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "api.example:6443");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
    }
}
