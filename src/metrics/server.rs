//! The HTTP endpoint on `metricsAddress`: `/metrics`, `/healthz`, `/readyz`, GET only.
//!
//! It runs as its own small task beside the agent and never blocks it: every answer comes from
//! atomics and one short lock. Anyone who can reach the port may ask (like kube-vip's own
//! `:2112`), so the server bounds what a client can cost: [`MAX_CONNECTIONS`] at once, each
//! closed after one request or [`CONNECTION_TIMEOUT`], whichever comes first.

use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::MetricsListen;
use crate::shutdown::Shutdown;

/// Connections served at once; more wait in the kernel's backlog. A scraper or two and a
/// kubelet need three.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest a connection may take, request and answer together: a slow or silent client
/// holds a slot no longer than this.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Content type of the Prometheus text format 0.0.4 (what `promtool check metrics` reads).
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics 1.0 (what a Prometheus server asks for first).
const OPENMETRICS_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on metricsAddress {addr}: {source} (set metricsAddress to another port, or \"\" to turn it off)")]
pub struct BindError {
    /// What was asked for.
    addr: String,
    /// Why it failed.
    source: std::io::Error,
}

/// Binds the endpoint's socket; done before the agent starts so a taken port is a clear
/// start-up error, not a silently missing endpoint.
pub async fn bind(at: MetricsListen) -> Result<TcpListener, BindError> {
    let result = match at {
        // `[::]` takes IPv4 too (v6only is off by default on Linux); a host without IPv6
        // refuses it, so fall back to IPv4 alone.
        MetricsListen::Any(port) => match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await {
            Ok(l) => Ok(l),
            Err(_) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await,
        },
        MetricsListen::At(a) => TcpListener::bind(a).await,
    };
    result.map_err(|source| BindError {
        addr: match at {
            MetricsListen::Any(p) => format!(":{p}"),
            MetricsListen::At(a) => a.to_string(),
        },
        source,
    })
}

/// Serves the endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, mut shutdown: Shutdown) {
    if let Ok(a) = listener.local_addr() {
        info!("serving /metrics, /healthz and /readyz on {a}");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.recv() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: pause rather than spin.
                    warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer));
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics client {peer}: {e}"),
                Err(_) => debug!("metrics client {peer}: timed out"),
            }
        });
    }
}

/// One request, one answer.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()));
    }
    let m = super::get();
    Ok(match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            match m.encode(openmetrics) {
                Ok(body) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    let ct = if openmetrics {
                        OPENMETRICS_FORMAT
                    } else {
                        TEXT_FORMAT
                    };
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                    r
                }
                Err(_) => plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode metrics\n".into(),
                ),
            }
        }
        "/healthz" => verdict(m.live()),
        "/readyz" => verdict(m.ready()),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    })
}

fn verdict(v: Result<(), String>) -> Response<Full<Bytes>> {
    match v {
        Ok(()) => plain(StatusCode::OK, "ok\n".into()),
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

fn plain(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Encodes the registry as OpenMetrics 1.0, or as the Prometheus text format 0.0.4.
///
/// prometheus-client writes OpenMetrics only. The two differ, for what we register, in three
/// places, which the 0.0.4 form rewrites: a counter's `# TYPE`/`# HELP` name carries the
/// `_total` its samples have, there are no `# UNIT` lines, and no `# EOF`.
pub fn encode(registry: &Registry, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut om = String::new();
    prometheus_client::encoding::text::encode(&mut om, registry)?;
    if openmetrics {
        return Ok(om);
    }
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# TYPE ", "# HELP "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(p, rest)| Some((p, rest.split_once(' ')?))) {
            Some((p, (name, tail))) if counters.contains(name) => {
                out.push_str(&format!("{p}{name}_total {tail}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, raw: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_refuses_the_rest() {
        let l = bind(MetricsListen::At("127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (_trigger, shutdown) = crate::shutdown::channel();
        tokio::spawn(serve(l, shutdown));
        let text = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("version=0.0.4"), "{text}");
        assert!(
            text.contains("# TYPE kube_vip_vip_takes_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let om = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
        )
        .await;
        assert!(om.contains("# TYPE kube_vip_vip_takes counter"), "{om}");
        assert!(om.trim_end().ends_with("# EOF"), "{om}");
        let h = get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        let p = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(p.starts_with("HTTP/1.1 405"), "{p}");
        let n = get(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(n.starts_with("HTTP/1.1 404"), "{n}");
        let junk = get(addr, "\x00\x01garbage\r\n\r\n").await;
        assert!(
            junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
            "{junk}"
        );
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let l = bind(MetricsListen::At("127.0.0.1:0".parse().expect("addr")))
            .await
            .expect("bind");
        let taken = l.local_addr().expect("addr");
        let e = bind(MetricsListen::At(taken)).await.expect_err("taken");
        assert!(e.to_string().contains("metricsAddress"), "{e}");
    }
}
