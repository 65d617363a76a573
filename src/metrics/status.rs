//! `kube-vip status` and `kube-vip members`: the agent answers on a unix socket in `stateDir`,
//! the command prints.
//!
//! The protocol is one JSON object per line each way: a [`Request`] (a command enum) and a
//! [`Reply`]. A membership change may take longer than [`EXCHANGE_TIMEOUT`] (a new node
//! catches up, a leader hands over): it runs under [`CHANGE_TIMEOUT`] instead. The socket is the agent's
//! administrative door, so it is root's only: mode 0600, and a connection from any other user
//! is refused by its peer credentials as well. Every exchange runs under [`EXCHANGE_TIMEOUT`],
//! lines are capped at [`MAX_LINE`], and [`MAX_CLIENTS`] are served at once.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::codec::{Framed, LinesCodec};

use super::Metrics;
use crate::agent::Role;
pub use crate::cluster::membership::CHANGE_TIMEOUT;
use crate::cluster::membership::{Admin, Change, ChangeError, Members};
use crate::shutdown::Shutdown;

/// The socket's file name inside `stateDir`.
pub const SOCKET_NAME: &str = "kube-vip.sock";
/// Longest request or reply line. A status reply is a few hundred bytes per peer and backend.
pub const MAX_LINE: usize = 64 * 1024;
/// How long one connection may take, from connect to the last reply.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 4;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    /// This node's view: role, term, leader, VIP, peers, backends.
    Status,
    /// `members list`: the membership as this node's log has it.
    Members,
    /// `members add/remove`: made at the leader (the agent forwards it there).
    Change {
        /// What to change.
        change: Change,
    },
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// The answer to [`Request::Status`].
    Status(Box<Status>),
    /// The answer to [`Request::Members`].
    Members(Members),
    /// The answer to [`Request::Change`]: what was done.
    Changed(String),
    /// The request could not be served; the text says why.
    Error(String),
}

/// One node's view of the cluster, as `status` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// kube-vip version of the agent.
    pub version: String,
    /// `clustered` or `single node`.
    pub mode: String,
    /// This node's peer id (`this node` in single-node mode).
    pub node: String,
    /// `leader` (holds or may hold the VIP), `lapsed` (Raft leader without a lease),
    /// `follower`, or `starting`.
    pub role: String,
    /// The Raft term (absent in single-node mode).
    pub term: Option<u64>,
    /// The Raft leader this node knows of, as `id (address)`.
    pub leader: Option<String>,
    /// The VIP.
    pub vip: String,
    /// Whether the VIP is on this node's interface.
    pub vip_bound: bool,
    /// Who holds the VIP as far as this node can tell.
    pub vip_holder: String,
    /// `/readyz`'s verdict: `ok` or why not.
    pub ready: String,
    /// The other peers and what our connection to each last did.
    pub peers: Vec<PeerStatus>,
    /// Every load balancer's backends and their health (empty without load balancers).
    pub backends: Vec<BackendStatus>,
}

/// One remote peer in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its id.
    pub id: String,
    /// Its Raft address.
    pub address: String,
    /// `reachable`, `unreachable`, or `not contacted` (a follower talks to peers only to vote).
    pub state: String,
}

/// One backend in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Load balancer name.
    pub lb: String,
    /// `address:port`.
    pub backend: String,
    /// `up` or `down`.
    pub state: String,
    /// How long it has been in that state, in ms.
    pub for_ms: u64,
    /// Whether the last check (or failed proxied connect) passed; absent before the first.
    pub last_check_ok: Option<bool>,
    /// What the last check found (`/readyz 200`, `connect: Connection refused`, `none yet`).
    pub last_check: String,
    /// How long ago the last check ended, in ms; absent before the first.
    pub last_check_ago_ms: Option<u64>,
}

impl Metrics {
    /// This node's status, from the same state the metrics and health endpoints read.
    pub fn status(&self, vip: String) -> Status {
        let ready = match self.ready() {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        };
        let bound = self.vip_bound.get() == 1;
        let term = u64::try_from(self.raft_term.get()).ok();
        let backends = self.backend_status();
        let s = self.state();
        let name = |a: &SocketAddr| s.peers.get(a).cloned().unwrap_or_else(|| a.to_string());
        let leader = s.leader.map(|a| format!("{} ({a})", name(&a)));
        let me = s.local.clone().unwrap_or_else(|| "this node".into());
        let leader_is_me = s
            .leader
            .is_some_and(|a| s.local.as_ref() == Some(&name(&a)));
        let vip_holder = if bound {
            match &s.local {
                Some(id) => format!("this node ({id})"),
                None => "this node".into(),
            }
        } else if s.single_node {
            "nobody (this node should; see its log)".into()
        } else {
            match s.leader {
                Some(_) if leader_is_me => "nobody: this node leads but has not bound it".into(),
                Some(a) => format!("{} (the leader)", name(&a)),
                None => "unknown: no leader known".into(),
            }
        };
        let peers = s
            .peers
            .iter()
            .filter(|(_, id)| Some(*id) != s.local.as_ref())
            .map(|(a, id)| PeerStatus {
                id: id.clone(),
                address: a.to_string(),
                state: match s.reachable.get(id) {
                    Some(true) => "reachable",
                    Some(false) => "unreachable",
                    None => "not contacted",
                }
                .into(),
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: if s.single_node {
                "single node"
            } else {
                "clustered"
            }
            .into(),
            node: me,
            role: match s.role {
                None => "starting",
                Some(Role::Leader) => "leader",
                Some(Role::Lapsed) => "lapsed",
                Some(Role::Follower) => "follower",
            }
            .into(),
            term: (!s.single_node).then_some(term).flatten(),
            leader: if s.single_node { None } else { leader },
            vip,
            vip_bound: bound,
            vip_holder,
            ready,
            peers,
            backends,
        }
    }
}

/// The clustered agent's membership driver, once its cluster runs (none in single-node mode).
static ADMIN: OnceLock<Admin> = OnceLock::new();

/// Hands the socket the cluster's membership driver (once, when the cluster has started).
pub fn set_admin(admin: Admin) {
    let _ = ADMIN.set(admin);
}

/// Where the socket lives for a given `stateDir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Opens the socket (replacing one left by an earlier run), root-only. The directory is
/// created if missing (single-node mode has no Raft state to create it).
pub fn listen(state_dir: &Path) -> std::io::Result<UnixListener> {
    std::fs::create_dir_all(state_dir)?;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => debug!("removed an old status socket at {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Answers clients until `shutdown`; then removes the socket file.
pub async fn serve(listener: UnixListener, vip: String, mut shutdown: Shutdown) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    if let Some(p) = &path {
        info!("answering `kube-vip status` on {}", p.display());
    }
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let vip: Arc<str> = vip.into();
    loop {
        let (stream, permit) = tokio::select! {
            _ = shutdown.recv() => break,
            a = listener.accept() => match (a, slots.clone().try_acquire_owned()) {
                (Ok((s, _)), Ok(p)) => (s, p),
                (Ok(_), Err(_)) => {
                    debug!("status socket: {MAX_CLIENTS} clients already; closing a new one");
                    continue;
                }
                (Err(e), _) => {
                    warn!("status socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let vip = vip.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Each read and write has its own limit; a change its own (see `serve_client`).
            if let Err(e) = serve_client(stream, &vip).await {
                debug!("status client: {e}");
            }
        });
    }
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

/// Why a client connection ended badly.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Line(#[from] tokio_util::codec::LinesCodecError),
    #[error("cannot encode reply: {0}")]
    Json(#[from] serde_json::Error),
    #[error("timed out")]
    Timeout,
}

async fn serve_client(stream: UnixStream, vip: &str) -> Result<(), ClientError> {
    let uid = stream.peer_cred()?.uid();
    let me = nix::unistd::geteuid().as_raw();
    let mut lines = Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE));
    if uid != 0 && uid != me {
        let refusal = Reply::Error(format!("uid {uid} may not ask; run as root"));
        within(
            EXCHANGE_TIMEOUT,
            lines.send(serde_json::to_string(&refusal)?),
        )
        .await??;
        return Ok(());
    }
    while let Some(line) = within(EXCHANGE_TIMEOUT, lines.next()).await? {
        let reply = match serde_json::from_str::<Request>(&line?) {
            Ok(Request::Status) => Reply::Status(Box::new(super::get().status(vip.to_string()))),
            Ok(Request::Members) => match ADMIN.get() {
                None => Reply::Error(NO_CLUSTER.into()),
                Some(a) => match a.list() {
                    Ok(m) => Reply::Members(m),
                    Err(e) => Reply::Error(e),
                },
            },
            Ok(Request::Change { change }) => match ADMIN.get() {
                None => Reply::Error(NO_CLUSTER.into()),
                Some(a) => {
                    info!("members: asked for {change:?} on the status socket");
                    match tokio::time::timeout(CHANGE_TIMEOUT, a.change(change)).await {
                        Ok(Ok(done)) => Reply::Changed(done),
                        Ok(Err(ChangeError::Refused(e) | ChangeError::Retry(e))) => Reply::Error(e),
                        Err(_) => Reply::Error(format!(
                            "no answer within {CHANGE_TIMEOUT:?}: check `kube-vip members list`"
                        )),
                    }
                }
            },
            Err(e) => Reply::Error(format!("unknown request: {e}")),
        };
        within(EXCHANGE_TIMEOUT, lines.send(serde_json::to_string(&reply)?)).await??;
    }
    Ok(())
}

/// `f` under a time limit.
async fn within<F: std::future::Future>(limit: Duration, f: F) -> Result<F::Output, ClientError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| ClientError::Timeout)
}

/// Why a membership command gets nothing on a node without a cluster.
const NO_CLUSTER: &str =
    "this agent runs without a cluster (singleNode, or still starting): no membership to show or change";

/// Why `kube-vip status` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// No socket, or nobody listening on it.
    #[error("no kube-vip agent is running with stateDir {dir} (nothing answers on {path}); start one with `kube-vip start -c CONFIG`")]
    NoAgent {
        /// The state directory.
        dir: String,
        /// The socket.
        path: String,
    },
    /// The socket is root's.
    #[error("permission denied on {0}: run kube-vip status as root")]
    Denied(String),
    /// The exchange failed.
    #[error("asking the agent on {path}: {why}")]
    Exchange {
        /// The socket.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The agent refused.
    #[error("the agent says: {0}")]
    Refused(String),
}

/// Asks the agent whose `stateDir` is `state_dir` one request, under [`EXCHANGE_TIMEOUT`]
/// ([`CHANGE_TIMEOUT`] for a change). Blocking: the command runs without a runtime.
pub fn ask(state_dir: &Path, req: &Request) -> Result<Reply, AskError> {
    let limit = match req {
        Request::Change { .. } => CHANGE_TIMEOUT + EXCHANGE_TIMEOUT,
        Request::Status | Request::Members => EXCHANGE_TIMEOUT,
    };
    let path = socket_path(state_dir);
    let shown = path.display().to_string();
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => AskError::NoAgent {
            dir: state_dir.display().to_string(),
            path: shown.clone(),
        },
        std::io::ErrorKind::PermissionDenied => AskError::Denied(shown.clone()),
        _ => AskError::Exchange {
            path: shown.clone(),
            why: e.to_string(),
        },
    })?;
    let fail = |why: String| AskError::Exchange {
        path: shown.clone(),
        why,
    };
    let exchange = || -> Result<String, String> {
        stream
            .set_read_timeout(Some(limit))
            .and_then(|()| stream.set_write_timeout(Some(EXCHANGE_TIMEOUT)))
            .map_err(|e| e.to_string())?;
        let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
        line.push('\n');
        (&stream)
            .write_all(line.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        BufReader::new((&stream).take_limited())
            .read_line(&mut answer)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no answer within {limit:?}")
                }
                _ => e.to_string(),
            })?;
        if answer.is_empty() {
            return Err("the agent closed the connection without answering".into());
        }
        Ok(answer)
    };
    let answer = exchange().map_err(fail)?;
    match serde_json::from_str::<Reply>(&answer) {
        Ok(Reply::Error(e)) => Err(AskError::Refused(e)),
        Ok(r) => Ok(r),
        Err(e) => Err(fail(format!("unreadable answer: {e}"))),
    }
}

/// A reader that stops after [`MAX_LINE`] bytes, so a broken agent cannot make the client
/// read forever.
trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(MAX_LINE as u64)
    }
}
impl<R: std::io::Read> TakeLimited for R {}

/// The table `kube-vip status` prints.
pub fn table(s: &Status) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: &str| out.push_str(&format!("{k:<10} {v}\n"));
    row(
        "node",
        &format!("{} ({}, kube-vip {})", s.node, s.mode, s.version),
    );
    row("role", &s.role);
    if let Some(t) = s.term {
        row("term", &t.to_string());
    }
    if s.mode != "single node" {
        row("leader", s.leader.as_deref().unwrap_or("none known"));
    }
    let bound = if s.vip_bound {
        "bound here"
    } else {
        "not here"
    };
    row(
        "vip",
        &format!("{} ({bound}); held by {}", s.vip, s.vip_holder),
    );
    row("ready", &s.ready);
    if !s.peers.is_empty() {
        let up = s.peers.iter().filter(|p| p.state == "reachable").count();
        row("peers", &format!("{up}/{} reachable", s.peers.len()));
        for p in &s.peers {
            row("", &format!("{:<12} {:<22} {}", p.id, p.address, p.state));
        }
    }
    if s.backends.is_empty() {
        row("backends", "none (no loadBalancers configured)");
    } else {
        let up = s.backends.iter().filter(|b| b.state == "up").count();
        row("backends", &format!("{up}/{} up", s.backends.len()));
        for b in &s.backends {
            let last = match (b.last_check_ok, b.last_check_ago_ms) {
                (Some(ok), Some(ago)) => format!(
                    "last check {} ago {}: {}",
                    secs(ago),
                    if ok { "passed" } else { "failed" },
                    b.last_check
                ),
                _ => "not checked yet".to_string(),
            };
            row(
                "",
                &format!(
                    "{:<12} {:<22} {:<4} for {:<8} {last}",
                    b.lb,
                    b.backend,
                    b.state,
                    secs(b.for_ms)
                ),
            );
        }
    }
    out
}

/// Milliseconds as a short human duration: `0.4 s`, `12 s`, `3 min`, `5 h`.
fn secs(ms: u64) -> String {
    match ms {
        0..10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        10_000..120_000 => format!("{} s", ms / 1000),
        120_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{} h", ms / 3_600_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_are_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).expect("json"),
            r#"{"command":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Request::Members).expect("json"),
            r#"{"command":"members"}"#
        );
        let change = r#"{"command":"change","change":{"op":"add","id":"server4","address":"10.0.0.4:10000"}}"#;
        assert_eq!(
            serde_json::from_str::<Request>(change).expect("change"),
            Request::Change {
                change: Change::Add {
                    id: "server4".into(),
                    address: "10.0.0.4:10000".parse().expect("addr"),
                }
            }
        );
        // An unknown change or an address that is not ip:port is refused at the door.
        assert!(serde_json::from_str::<Request>(
            r#"{"command":"change","change":{"op":"wipe","id":"server4"}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"command":"change","change":{"op":"add","id":"s","address":"nowhere"}}"#
        )
        .is_err());
        let e = serde_json::to_string(&Reply::Error("x".into())).expect("json");
        assert_eq!(e, r#"{"error":"x"}"#);
    }

    #[tokio::test]
    async fn asks_and_answers_over_the_socket() {
        let dir = std::env::temp_dir().join(format!("kube-vip-status-test-{}", std::process::id()));
        let l = listen(&dir).expect("listen");
        let mode = std::fs::metadata(socket_path(&dir))
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(serve(l, "10.0.0.100".into(), shutdown));
        let d = dir.clone();
        let reply = tokio::task::spawn_blocking(move || ask(&d, &Request::Status))
            .await
            .expect("join")
            .expect("reply");
        let Reply::Status(s) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(s.vip, "10.0.0.100");
        assert!(table(&s).contains("10.0.0.100"));
        // Garbage gets an error line, not a hang or a crash.
        let mut raw = UnixStream::connect(socket_path(&dir))
            .await
            .expect("connect");
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        raw.write_all(b"\xff{not json\n").await.expect("write");
        let mut line = String::new();
        tokio::io::BufReader::new(&mut raw)
            .read_line(&mut line)
            .await
            .ok();
        assert!(line.is_empty() || line.contains("error"), "{line}");
        // An endless line is cut off at MAX_LINE: the connection ends, the agent goes on.
        let mut raw = UnixStream::connect(socket_path(&dir))
            .await
            .expect("connect");
        let big = vec![b'x'; MAX_LINE + 10];
        let _ = raw.write_all(&big).await;
        let mut rest = Vec::new();
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(EXCHANGE_TIMEOUT * 2, raw.read_to_end(&mut rest)).await;
        assert!(n.is_ok(), "the agent must close an oversized request");
        let d = dir.clone();
        let again = tokio::task::spawn_blocking(move || ask(&d, &Request::Status))
            .await
            .expect("join");
        assert!(again.is_ok(), "still answering after garbage: {again:?}");
        trigger.fire();
        server.await.expect("server");
        assert!(!socket_path(&dir).exists(), "socket removed on shutdown");
        let e = ask(&dir, &Request::Status).expect_err("no agent");
        assert!(
            e.to_string().contains("no kube-vip agent is running"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
