//! The HTTP endpoint on `metricsAddress`: `/metrics`, `/healthz`, `/readyz`, GET only.
//!
//! It runs as its own small task beside the agent and never blocks it: every answer comes from
//! atomics and one short lock. Anyone who can reach the port may ask (like kube-vip's own
//! `:2112`), so the server bounds what a client can cost: [`MAX_PER_CLIENT`] connections per
//! client address, [`MAX_CONNECTIONS`] for all remote clients together, each closed after one
//! request or [`CONNECTION_TIMEOUT`], whichever comes first. Loopback has its own share, so
//! kubelet's probe on 127.0.0.1 is answered whatever remote clients do.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

use crate::config::MetricsListen;
use crate::shutdown::Shutdown;

/// Connections from remote clients served at once; more are closed at once. A scraper or two
/// need two.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections one client address may have open; loopback clients (kubelet's probe) get
/// theirs on top of [`MAX_CONNECTIONS`], so no remote client can starve the liveness probe.
pub const MAX_PER_CLIENT: usize = 4;
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
    let slots = Arc::new(Slots::default());
    loop {
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
        // Never queue: a client over its share is closed at once, so the ones within theirs
        // (kubelet's probe on loopback above all) never wait behind it.
        let Some(slot) = Slots::take(&slots, client_key(peer.ip())) else {
            debug!("metrics client {peer}: over its connection limit; closed");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
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

/// The address a client is counted under: IPv4 clients of the `[::]` socket arrive as
/// `::ffff:a.b.c.d`, and every loopback address is one local client (127.0.0.0/8 holds 16
/// million of them).
fn client_key(ip: IpAddr) -> IpAddr {
    let ip = ip.to_canonical();
    if ip.is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ip
    }
}

/// Open connections, by client address (see [`client_key`]). Loopback clients (kubelet's probe in the sample
/// manifest) are counted apart from the rest, so remote clients cannot use up their share.
#[derive(Debug, Default)]
struct Slots {
    /// Connections open per client address.
    by_ip: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

/// One open connection; gives its slot back when dropped.
struct Slot {
    /// Where it is counted.
    slots: Arc<Slots>,
    /// The client's address.
    ip: IpAddr,
}

impl Slots {
    /// A slot for a new connection from `ip`, or `None` if that client, or the remote clients
    /// together, already have their [`MAX_PER_CLIENT`] / [`MAX_CONNECTIONS`].
    fn take(slots: &Arc<Slots>, ip: IpAddr) -> Option<Slot> {
        let mut m = slots.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let remote: usize = m
            .iter()
            .filter(|(a, _)| !a.is_loopback())
            .map(|(_, n)| n)
            .sum();
        let mine = m.get(&ip).copied().unwrap_or(0);
        if mine >= MAX_PER_CLIENT || (!ip.is_loopback() && remote >= MAX_CONNECTIONS) {
            return None;
        }
        m.insert(ip, mine + 1);
        Some(Slot {
            slots: slots.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.slots.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
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

    #[test]
    fn slots_per_client_and_loopback_apart() {
        let slots = Arc::new(Slots::default());
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let one: Vec<_> = (0..MAX_PER_CLIENT)
            .map(|_| Slots::take(&slots, ip("10.0.0.1")).expect("within share"))
            .collect();
        assert!(
            Slots::take(&slots, ip("10.0.0.1")).is_none(),
            "over its share"
        );
        let others: Vec<_> = (0..MAX_CONNECTIONS - MAX_PER_CLIENT)
            .map(|i| Slots::take(&slots, ip(&format!("10.0.1.{}", i % 200))).expect("room"))
            .collect();
        assert!(
            Slots::take(&slots, ip("10.0.2.1")).is_none(),
            "remote clients full"
        );
        let lo = Slots::take(&slots, client_key(ip("::ffff:127.0.0.1")));
        assert!(lo.is_some(), "loopback has its own share");
        let more: Vec<_> = (2..=MAX_PER_CLIENT)
            .map(|i| Slots::take(&slots, client_key(ip(&format!("127.0.0.{i}")))).expect("lo"))
            .collect();
        assert!(
            Slots::take(&slots, client_key(ip("127.9.9.9"))).is_none(),
            "all of 127/8 is one client"
        );
        drop(more);
        drop(one);
        assert!(
            Slots::take(&slots, ip("10.0.2.1")).is_some(),
            "slots come back"
        );
        drop(others);
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
