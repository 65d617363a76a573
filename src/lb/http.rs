//! The `http` load balancer: an HTTP/1.1 reverse proxy on hyper.
//!
//! Each request gets a backend from the same round-robin as the `tcp` proxy, so a dead backend is
//! skipped before the request is sent (a connect failure never consumes the request). Requests
//! carry X-Forwarded-For (appended), X-Forwarded-Host and X-Forwarded-Proto; hop-by-hop headers
//! are dropped as RFC 9110 7.6.1 asks of a proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::net::TcpListener;

use tokio::sync::Semaphore;

use super::backends::Backends;
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
    super::accept_loop(listener, limit, shutdown, move |client, peer, admission| {
        let backends = backends.clone();
        // TCP_NODELAY comes with the socket, inherited from the listener (see `lb::listen`).
        async move {
            let _admission: Admission = admission;
            let svc = hyper::service::service_fn(move |req| forward(req, peer, backends.clone()));
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

async fn forward(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    backends: Arc<Backends>,
) -> Result<Response<Body>, Infallible> {
    let (stream, mut lease) = match backends.connect().await {
        Ok(s) => s,
        Err(e) => {
            warn!("http request from {peer}: {e}");
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "no backend available\n",
            ));
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => {
            warn!("http handshake with {}: {e}", lease.addr());
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "backend handshake failed\n",
            ));
        }
    };
    let backend = lease.addr();
    // Drives the backend connection; it ends once the response body is read or dropped, or
    // when the backend is marked down (`onMarkedDown: close`): a streamed answer then ends.
    tokio::spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r {
                debug!("backend {backend}: {e}");
            },
            _ = lease.marked_down() => debug!("backend {backend} marked down: closing a request to it"),
        }
    });
    add_forwarding_headers(req.headers_mut(), peer);
    match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await {
        Err(_) => {
            warn!(
                "http request from {peer} to {backend}: no answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            );
            Ok(error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "backend did not answer in time\n",
            ))
        }
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Ok(Err(e)) => {
            warn!("http request from {peer} to {backend}: {e}");
            Ok(error_response(StatusCode::BAD_GATEWAY, "backend failed\n"))
        }
    }
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
