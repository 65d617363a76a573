//! Backend health: one small state per backend ([`Health`]), fed by active checks ([`Checker`])
//! and by failed connects of proxied clients (passive detection, see `backends`).
//!
//! A backend goes down after `fall` failures in a row and comes back after `rise` successes in a
//! row; each change is logged once. Checks run on every node, leader or not, for the agent's
//! whole life, so a node that takes the VIP already knows which backends are healthy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::config::{HealthCheck, HealthCheckType};

/// The outcome of one check or one proxied connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it counts as healthy.
    pub ok: bool,
    /// What happened, for log lines (`/readyz 500`, `connect: Connection refused`, ...).
    pub detail: String,
    /// When it ended.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
}

/// A change of a backend's state, returned by [`Health::record`] exactly once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The new state.
    pub up: bool,
    /// The results in a row that made it (`fall` or `rise`).
    pub streak: u32,
    /// How long the backend was in its previous state.
    pub after: Duration,
}

/// Health of one backend. Small and copyable out (see [`Health::snapshot`]) so that a metrics
/// module can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// Whether new connections may go to it.
    pub up: bool,
    /// Since when it is in that state.
    pub since: Instant,
    /// Successes in a row (0 after a failure).
    pub successes: u32,
    /// Failures in a row (0 after a success).
    pub failures: u32,
    /// The last check or failed connect.
    pub last: Option<Outcome>,
}

/// The shared, locked [`HealthState`] of a backend and the thresholds that move it.
#[derive(Debug)]
pub struct Health {
    /// The state; held only for a few field updates.
    state: Mutex<HealthState>,
    /// Successes in a row to come back.
    rise: u32,
    /// Failures in a row to go down.
    fall: u32,
}

impl Health {
    /// A backend assumed up until checks say otherwise (as HAProxy starts its servers): a node
    /// starting while its API servers are fine must not refuse the first clients.
    pub fn new(rise: u32, fall: u32) -> Health {
        Health {
            state: Mutex::new(HealthState {
                up: true,
                since: Instant::now(),
                successes: 0,
                failures: 0,
                last: None,
            }),
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Counts one result; returns the state change it caused, if any.
    pub fn record(&self, outcome: Outcome) -> Option<Change> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let at = outcome.at;
        let change = if outcome.ok {
            s.successes = s.successes.saturating_add(1);
            s.failures = 0;
            (!s.up && s.successes >= self.rise).then_some((true, s.successes))
        } else {
            s.failures = s.failures.saturating_add(1);
            s.successes = 0;
            (s.up && s.failures >= self.fall).then_some((false, s.failures))
        };
        s.last = Some(outcome);
        change.map(|(up, streak)| {
            let after = at.saturating_duration_since(s.since);
            s.up = up;
            s.since = at;
            Change { up, streak, after }
        })
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> HealthState {
        match self.state.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Runs one kind of check against backends.
#[derive(Debug)]
pub struct Checker {
    /// What to check.
    kind: HealthCheckType,
    /// Path to GET (http/https).
    path: String,
    /// Time between check starts.
    pub interval: Duration,
    /// Limit for one whole check.
    pub timeout: Duration,
    /// TLS settings (https), or why there are none (an unreadable caFile): then every check
    /// fails with that reason, which is what the operator must see.
    tls: Option<Result<Arc<ClientConfig>, String>>,
}

impl Checker {
    /// A checker for `hc` (defaults applied), or `None` for `type: none`.
    pub fn new(hc: &HealthCheck) -> Option<Checker> {
        if hc.kind == HealthCheckType::None {
            return None;
        }
        let tls = (hc.kind == HealthCheckType::Https)
            .then(|| super::tls::client_config(hc.ca_file.as_deref()));
        Some(Checker {
            kind: hc.kind,
            path: hc.path().to_string(),
            interval: Duration::from_millis(hc.interval_ms()),
            timeout: Duration::from_millis(hc.timeout_ms()),
            tls,
        })
    }

    /// One check of `addr`, bounded by the timeout.
    pub async fn check(&self, addr: SocketAddr, connect: &super::backends::Connector) -> Outcome {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.check_inner(addr, connect)).await
        {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{} timed out after {} ms",
                self.what(),
                self.timeout.as_millis()
            )),
        };
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Outcome {
            ok,
            detail,
            at: Instant::now(),
            took: started.elapsed(),
        }
    }

    /// What the check does, for messages.
    fn what(&self) -> String {
        match self.kind {
            HealthCheckType::Tcp | HealthCheckType::None => "connect".to_string(),
            HealthCheckType::Http | HealthCheckType::Https => self.path.clone(),
        }
    }

    async fn check_inner(
        &self,
        addr: SocketAddr,
        connect: &super::backends::Connector,
    ) -> Result<String, String> {
        let stream = connect
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match (&self.kind, &self.tls) {
            (HealthCheckType::Https, Some(Err(why))) => Err(why.clone()),
            (HealthCheckType::Https, Some(Ok(tls))) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.get(tls, addr).await
            }
            (HealthCheckType::Http, _) => self.get(stream, addr).await,
            _ => Ok("connect ok".to_string()),
        }
    }

    /// `GET path` on an open connection; Ok for a 2xx answer.
    async fn get<S>(&self, io: S, addr: SocketAddr) -> Result<String, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .map_err(|e| format!("{}: {e}", self.path))?;
        let req = Request::get(self.path.as_str())
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "kube-vip-health")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| format!("{}: {e}", self.path))?;
        // The connection is driven here, not in a task of its own: when the check ends (or
        // times out) everything is dropped and the socket closed.
        let send = sender.send_request(req);
        let mut send = std::pin::pin!(send);
        let resp = tokio::select! {
            r = &mut send => r,
            r = conn => match r {
                // A backend that answers and closes (`Connection: close`) ends the connection
                // in the same poll as it delivers the answer: take the answer.
                Ok(()) => send.await,
                Err(e) => return Err(format!("{}: {e}", self.path)),
            },
        }
        .map_err(|e| format!("{}: {e}", self.path))?;
        let status = resp.status();
        let text = format!("{} {}", self.path, status.as_u16());
        if status.is_success() {
            Ok(text)
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Err(format!(
                "{text} (the path needs credentials; kube-apiserver serves /readyz without)"
            ))
        } else {
            Err(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ok: bool) -> Outcome {
        Outcome {
            ok,
            detail: String::new(),
            at: Instant::now(),
            took: Duration::ZERO,
        }
    }

    #[test]
    fn fall_and_rise_change_state_once() {
        let h = Health::new(3, 2);
        assert_eq!(h.record(outcome(false)), None);
        let down = h.record(outcome(false)).expect("down after 2");
        assert!(!down.up && down.streak == 2);
        assert_eq!(h.record(outcome(false)), None, "logged once, not per check");
        assert_eq!(h.record(outcome(true)), None);
        assert_eq!(h.record(outcome(true)), None);
        let up = h.record(outcome(true)).expect("up after 3");
        assert!(up.up && up.streak == 3);
        assert_eq!(h.record(outcome(true)), None);
        assert!(h.snapshot().up);
    }

    #[test]
    fn alternating_results_never_flap() {
        // Up/down every check (a backend flapping faster than rise allows): one change at most.
        let h = Health::new(3, 2);
        let mut changes = 0;
        for i in 0..100 {
            let ok = (i / 2) % 2 == 0;
            changes += h.record(outcome(ok)).is_some() as u32;
        }
        assert_eq!(changes, 1);
        assert!(!h.snapshot().up);
    }
}
