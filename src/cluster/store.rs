//! Persistent Raft storage (openraft storage-v2): log + vote, and a trivial state machine.
//!
//! Files in the state directory:
//!
//! | file               | content                                         | written by            |
//! |--------------------|-------------------------------------------------|-----------------------|
//! | [`VOTE_FILE`]      | the hard state (term, voted-for, committed)     | temp + fsync + rename |
//! | [`LOG_FILE`]       | JSON lines, one `Entry` per line                | append + fdatasync    |
//! | [`LOG_META_FILE`]  | last purged log id, last committed log id       | temp + fsync + rename |
//! | [`SNAPSHOT_FILE`]  | last snapshot (membership + last applied)       | temp + fsync + rename |
//!
//! Truncate and purge rewrite [`LOG_FILE`] through a temp file and a rename, so
//! a crash leaves either the old or the new log, never a mix.
//!
//! Every write and fsync runs on tokio's blocking pool ([`on_disk`]), never on an async
//! worker: an fsync can take tens of milliseconds on a busy disk, and a worker blocked that
//! long stalls heartbeats and the VIP lease timer (a 120 ms election timeout). openraft calls
//! the storage methods one at a time and awaits each, so the writes stay serialized and durable
//! before the call returns (or the append callback fires); the in-memory copy, which readers
//! use, is updated only after its write succeeded, and its lock is never held across a write.
//!
//! Loading checks terms and log indexes against [`bounds`] as well: a vote or entry beyond
//! them was written by a forged message before those checks existed, and would make openraft
//! overflow (and abort) at the next election, on every restart; better to stop with an error
//! naming the file.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use super::bounds::{self, OutOfBounds};
use super::types::{Node, NodeId, TypeConfig};

/// Hard state: the last vote this node granted or holds. Must survive restarts,
/// otherwise a restarted node could vote twice in one term (two leaders, two VIPs).
pub const VOTE_FILE: &str = "vote.json";
/// Append-only log, one JSON-encoded entry per line.
pub const LOG_FILE: &str = "log.jsonl";
/// Purge/commit pointers of the log.
pub const LOG_META_FILE: &str = "log-meta.json";
/// The last snapshot of the state machine.
pub const SNAPSHOT_FILE: &str = "snapshot.json";

/// Error while opening the state directory. Always names the offending file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `create`, ...).
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying OS error.
        source: io::Error,
    },
    /// The file exists but its content is not valid state.
    #[error("corrupt state file {}: {reason}", path.display())]
    Corrupt {
        /// The corrupt file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and decodes a JSON file; `Ok(None)` if it does not exist.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Replaces `dir/name` atomically and durably: write a temp file, fsync it,
/// rename it over the target, fsync the directory (so the rename itself survives
/// a power cut).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn write_json_atomic<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    write_atomic(dir, name, &bytes)
}

/// Runs file IO (writes, fsyncs) on tokio's blocking pool and waits for it.
async fn on_disk<T: Send + 'static>(
    io: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(io)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("storage task failed: {e}"))))
}

/// A state file's terms and log indexes out of [`bounds`]: corruption, naming the file.
fn out_of_bounds(path: &Path) -> impl FnOnce(OutOfBounds) -> StoreError + '_ {
    move |e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "{e}; openraft would overflow on it. It can only come from a forged message accepted \
             before this check existed: stop this node, move its state directory away and \
             restart it (it rejoins from the leader)"
        ),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps half-updated in a way
    // that matters more than the panic itself; keep serving rather than cascade.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Pointers persisted next to the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LogMeta {
    /// Every entry up to and including this id has been purged.
    last_purged: Option<LogId<NodeId>>,
    /// Last known committed entry (lets a restarted node re-apply without a leader).
    committed: Option<LogId<NodeId>>,
}

/// The in-memory copy of the log and vote: what readers see. Its lock is held only briefly,
/// never across file IO.
struct LogInner {
    vote: Option<Vote<NodeId>>,
    meta: LogMeta,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The files; used only on the blocking pool ([`on_disk`]).
struct LogFiles {
    dir: PathBuf,
    /// Open in append mode; replaced after every rewrite of the log.
    log_file: File,
}

impl LogFiles {
    /// Replaces the whole log file with `buf` (after truncate/purge).
    fn rewrite_log(&mut self, buf: &[u8]) -> io::Result<()> {
        write_atomic(&self.dir, LOG_FILE, buf)?;
        self.log_file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        Ok(())
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        self.log_file.write_all(buf)?;
        // fdatasync: the file length changes, so the size metadata is flushed too.
        self.log_file.sync_data()
    }
}

fn encode_entries<'a>(
    entries: impl IntoIterator<Item = &'a Entry<TypeConfig>>,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut buf, e).map_err(io::Error::other)?;
        buf.push(b'\n');
    }
    Ok(buf)
}

/// Loads the log file: entries after `last_purged`, in order, without holes.
///
/// A last line without its newline is a torn write from a crash in the middle
/// of `append`; it was never acknowledged (the callback fires after fsync), so
/// it is dropped and the file cut back to the last complete line.
fn load_log(
    path: &Path,
    last_purged: Option<LogId<NodeId>>,
) -> Result<BTreeMap<u64, Entry<TypeConfig>>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    if complete < bytes.len() {
        log::warn!(
            "dropping {} bytes of an unfinished last entry in {}",
            bytes.len() - complete,
            path.display()
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        f.set_len(complete as u64)
            .and_then(|_| f.sync_all())
            .map_err(io_err("truncate", path))?;
    }
    let mut entries = BTreeMap::new();
    let mut expected = last_purged.map(|l| l.index + 1);
    for (lineno, line) in bytes[..complete].split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", lineno + 1),
        };
        let entry: Entry<TypeConfig> =
            serde_json::from_slice(line).map_err(|e| corrupt(e.to_string()))?;
        bounds::ABSOLUTE
            .log_id("entry", &Some(entry.log_id))
            .map_err(|e| out_of_bounds(path)(OutOfBounds(format!("line {}: {e}", lineno + 1))))?;
        let index = entry.log_id.index;
        if last_purged.is_some_and(|p| index <= p.index) {
            // Purge pointer was saved but the rewrite did not happen before a crash.
            continue;
        }
        if let Some(exp) = expected {
            if index != exp {
                return Err(corrupt(format!("expected index {exp}, found {index}")));
            }
        }
        expected = Some(index + 1);
        entries.insert(index, entry);
    }
    Ok(entries)
}

/// Raft log and vote store, persisted in the state directory.
///
/// Cheap to clone: clones share the same state (the clone is used as the log reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    files: Arc<Mutex<LogFiles>>,
}

impl LogStore {
    /// Opens (or creates) the log and vote in `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let vote_path = dir.join(VOTE_FILE);
        let vote = read_json::<Vote<NodeId>>(&vote_path)?;
        if let Some(v) = &vote {
            bounds::ABSOLUTE
                .vote("vote", v)
                .map_err(out_of_bounds(&vote_path))?;
        }
        let meta_path = dir.join(LOG_META_FILE);
        let meta = read_json::<LogMeta>(&meta_path)?.unwrap_or_default();
        bounds::ABSOLUTE
            .log_id("last_purged", &meta.last_purged)
            .and_then(|()| bounds::ABSOLUTE.log_id("committed", &meta.committed))
            .map_err(out_of_bounds(&meta_path))?;
        let log_path = dir.join(LOG_FILE);
        let entries = load_log(&log_path, meta.last_purged)?;
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        Ok(LogStore {
            inner: Arc::new(Mutex::new(LogInner {
                vote,
                meta,
                entries,
            })),
            files: Arc::new(Mutex::new(LogFiles {
                dir: dir.to_path_buf(),
                log_file,
            })),
        })
    }

    /// True if nothing was ever persisted: no vote, no log, nothing purged.
    pub fn is_fresh(&self) -> bool {
        let g = lock(&self.inner);
        g.vote.is_none() && g.entries.is_empty() && g.meta.last_purged.is_none()
    }

    /// The vote as persisted (for tests and diagnostics).
    #[cfg(test)]
    pub fn vote(&self) -> Option<Vote<NodeId>> {
        lock(&self.inner).vote
    }

    /// If the persisted vote is `me`'s own *committed* (leader) vote, present it
    /// to openraft as uncommitted. Returns true if it did.
    ///
    /// Why: openraft 0.9 restores a node whose saved vote is its own committed
    /// vote straight into `Leader` state at startup (`Engine::startup`), even if
    /// the rest of the cluster elected someone else meanwhile. For a VIP agent
    /// that is a false "I am leader" until the first heartbeat is rejected.
    /// Dropping the `committed` flag keeps the term and the voted-for node — so
    /// this node still refuses any other candidate in that term — and only gives
    /// up the leadership, which is always safe. openraft does the same with
    /// votes it learns from vote responses (`Engine::handle_vote_resp`).
    /// Only the in-memory copy changes; the file is rewritten by the next
    /// `save_vote`.
    pub fn demote_own_leader_vote(&self, me: NodeId) -> bool {
        let mut g = lock(&self.inner);
        match g.vote.as_mut() {
            Some(v) if v.committed && v.leader_id().voted_for() == Some(me) => {
                v.committed = false;
                true
            }
            _ => false,
        }
    }

    /// Writes `meta` to [`LOG_META_FILE`] (on the blocking pool).
    async fn write_meta(&self, meta: LogMeta) -> io::Result<()> {
        let files = self.files.clone();
        on_disk(move || write_json_atomic(&lock(&files).dir, LOG_META_FILE, &meta)).await
    }

    /// Replaces the log file with `entries` (on the blocking pool).
    async fn rewrite_log(&self, entries: &BTreeMap<u64, Entry<TypeConfig>>) -> io::Result<()> {
        let buf = encode_entries(entries.values())?;
        let files = self.files.clone();
        on_disk(move || lock(&files).rewrite_log(&buf)).await
    }
}

fn log_range<RB: RangeBounds<u64>>(g: &LogInner, range: RB) -> Vec<Entry<TypeConfig>> {
    g.entries.range(range).map(|(_, e)| e.clone()).collect()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        Ok(log_range(&lock(&self.inner), range))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let g = lock(&self.inner);
        let last_purged_log_id = g.meta.last_purged;
        let last_log_id = g
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let (files, v) = (self.files.clone(), *vote);
        on_disk(move || write_json_atomic(&lock(&files).dir, VOTE_FILE, &v))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)))?;
        lock(&self.inner).vote = Some(v);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let mut meta = {
            let g = lock(&self.inner);
            if g.meta.committed == committed {
                return Ok(());
            }
            g.meta.clone()
        };
        meta.committed = committed;
        self.write_meta(meta)
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        lock(&self.inner).meta.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(lock(&self.inner).meta.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let res = match encode_entries(entries.iter()) {
            Ok(buf) => {
                let files = self.files.clone();
                on_disk(move || lock(&files).append(&buf)).await
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => {
                let mut g = lock(&self.inner);
                for e in entries {
                    g.entries.insert(e.log_id.index, e);
                }
                drop(g);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(AnyError::new(&e));
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut keep = lock(&self.inner).entries.clone();
        if keep.split_off(&log_id.index).is_empty() {
            return Ok(());
        }
        self.rewrite_log(&keep)
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        lock(&self.inner).entries = keep;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Pointer first: if we crash before the rewrite, `load_log` skips the
        // entries the pointer covers, so the result is the same.
        let (mut meta, mut entries) = {
            let g = lock(&self.inner);
            (g.meta.clone(), g.entries.clone())
        };
        meta.last_purged = Some(log_id);
        self.write_meta(meta)
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        lock(&self.inner).meta.last_purged = Some(log_id);
        let keep = entries.split_off(&(log_id.index + 1));
        self.rewrite_log(&keep)
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        lock(&self.inner).entries = keep;
        Ok(())
    }
}

/// Snapshot as persisted in [`SNAPSHOT_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// What a snapshot contains: the whole (empty) state machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotContent {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    snapshot: Option<StoredSnapshot>,
    /// Makes snapshot ids unique within a run.
    snapshot_seq: u64,
}

impl SmInner {
    /// Makes a snapshot that is already on disk the current one.
    fn install(&mut self, snap: StoredSnapshot) {
        self.last_applied = snap.meta.last_log_id;
        self.membership = snap.meta.last_membership.clone();
        self.snapshot = Some(snap);
    }
}

/// The state machine: no application data, only `last_applied` and the membership.
///
/// It is not persisted by itself: after a restart it starts from the last
/// snapshot and openraft re-applies the log up to the persisted commit index.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<SmInner>>,
    /// The state directory.
    dir: Arc<PathBuf>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, starting from the persisted snapshot if any.
    pub fn open(dir: &Path) -> Result<StateMachineStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let path = dir.join(SNAPSHOT_FILE);
        let snapshot = read_json::<StoredSnapshot>(&path)?;
        if let Some(s) = &snapshot {
            serde_json::from_slice::<SnapshotContent>(&s.data).map_err(|e| {
                StoreError::Corrupt {
                    path: path.clone(),
                    reason: format!("snapshot data: {e}"),
                }
            })?;
            bounds::ABSOLUTE
                .log_id("snapshot last_log_id", &s.meta.last_log_id)
                .and_then(|()| {
                    bounds::ABSOLUTE.log_id("snapshot membership", s.meta.last_membership.log_id())
                })
                .map_err(out_of_bounds(&path))?;
        }
        let (last_applied, membership) = snapshot
            .as_ref()
            .map(|s| (s.meta.last_log_id, s.meta.last_membership.clone()))
            .unwrap_or_default();
        Ok(StateMachineStore {
            dir: Arc::new(dir.to_path_buf()),
            inner: Arc::new(Mutex::new(SmInner {
                last_applied,
                membership,
                snapshot,
                snapshot_seq: 0,
            })),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let dir = self.dir.clone();
        let (meta, data) = {
            let mut g = lock(&self.inner);
            let content = SnapshotContent {
                last_applied: g.last_applied,
                membership: g.membership.clone(),
            };
            let data = serde_json::to_vec(&content)
                .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
            g.snapshot_seq += 1;
            let snapshot_id = match g.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, g.snapshot_seq),
                None => format!("none-{}", g.snapshot_seq),
            };
            let meta = SnapshotMeta {
                last_log_id: g.last_applied,
                last_membership: g.membership.clone(),
                snapshot_id,
            };
            (meta, data)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let stored =
            on_disk(move || write_json_atomic(&dir, SNAPSHOT_FILE, &stored).map(|()| stored))
                .await
                .map_err(|e| {
                    StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
                })?;
        // Only the stored snapshot changes: entries applied meanwhile stay applied.
        lock(&self.inner).snapshot = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let g = lock(&self.inner);
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut g = lock(&self.inner);
        let mut out = Vec::new();
        for e in entries {
            g.last_applied = Some(e.log_id);
            if let EntryPayload::Membership(m) = e.payload {
                g.membership = StoredMembership::new(Some(e.log_id), m);
            }
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        // Validate before replacing anything: a bad snapshot from the wire must
        // not overwrite a good one on disk.
        serde_json::from_slice::<SnapshotContent>(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let dir = self.dir.clone();
        let stored =
            on_disk(move || write_json_atomic(&dir, SNAPSHOT_FILE, &stored).map(|()| stored))
                .await
                .map_err(|e| {
                    StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
                })?;
        lock(&self.inner).install(stored);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let g = lock(&self.inner);
        Ok(g.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use openraft::raft::VoteRequest;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, Config, Membership, Raft};

    use super::*;
    use crate::cluster::transport::Network;

    /// A fresh, empty directory under the system temp dir.
    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("raft-cluster-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn log_id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    async fn indexes(store: &mut LogStore) -> Vec<u64> {
        store
            .try_get_log_entries(..)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect()
    }

    #[tokio::test]
    async fn vote_survives_reopen() {
        let dir = temp_dir("vote");
        let mut s = LogStore::open(&dir).unwrap();
        assert!(s.is_fresh());
        assert_eq!(s.read_vote().await.unwrap(), None);
        let v = Vote::new_committed(7, 42);
        s.save_vote(&v).await.unwrap();
        drop(s);
        let mut s = LogStore::open(&dir).unwrap();
        assert!(!s.is_fresh());
        assert_eq!(s.read_vote().await.unwrap(), Some(v));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A node restarted with its state never goes back on a vote: after
    /// granting leader id (term 5, node 3) it refuses (5, 2), (5, 4) and anything in
    /// an older term. Checked end to end through openraft.
    #[tokio::test]
    async fn restarted_node_does_not_vote_twice_in_a_term() {
        let dir = temp_dir("vote-twice");
        let config = Arc::new(Config::default().validate().unwrap());
        let start = || async {
            let ip = std::net::Ipv4Addr::LOCALHOST.into();
            let net = Network::new(1, ip, Arc::default(), Duration::from_millis(50), None);
            Raft::<TypeConfig>::new(
                1,
                config.clone(),
                net,
                LogStore::open(&dir).unwrap(),
                StateMachineStore::open(&dir).unwrap(),
            )
            .await
            .unwrap()
        };

        let raft = start().await;
        let r = raft
            .vote(VoteRequest::new(Vote::new(5, 3), None))
            .await
            .unwrap();
        assert!(r.vote_granted, "first vote in term 5 must be granted");
        raft.shutdown().await.unwrap();
        assert_eq!(LogStore::open(&dir).unwrap().vote(), Some(Vote::new(5, 3)));

        let raft = start().await;
        let r = raft
            .vote(VoteRequest::new(Vote::new(5, 2), None))
            .await
            .unwrap();
        assert!(
            !r.vote_granted,
            "second vote in term 5 granted after restart"
        );
        assert_eq!(r.vote, Vote::new(5, 3));
        let r = raft
            .vote(VoteRequest::new(Vote::new(5, 4), None))
            .await
            .unwrap();
        assert!(
            !r.vote_granted,
            "a higher node id in the same term is still a second vote"
        );
        let r = raft
            .vote(VoteRequest::new(Vote::new(4, 9), None))
            .await
            .unwrap();
        assert!(
            !r.vote_granted,
            "vote in an older term granted after restart"
        );
        let r = raft
            .vote(VoteRequest::new(Vote::new(5, 3), None))
            .await
            .unwrap();
        assert!(r.vote_granted, "re-granting the same candidate is fine");
        let r = raft
            .vote(VoteRequest::new(Vote::new(6, 2), None))
            .await
            .unwrap();
        assert!(r.vote_granted, "a higher term is a new vote");
        raft.shutdown().await.unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Classic Raft: one vote per term (`single-term-leader`). Two candidates of the same term
    /// are not ordered, so a node that voted for one refuses the other, before and after a
    /// restart (the vote is on disk). Fails if the feature is dropped from Cargo.toml.
    #[test]
    fn one_vote_per_term() {
        assert_eq!(Vote::new(5, 4).partial_cmp(&Vote::new(5, 3)), None);
        assert!(Vote::new(6, 1) > Vote::new(5, 4));
    }

    #[tokio::test]
    async fn demoted_leader_vote_still_blocks_lower_candidates() {
        let dir = temp_dir("demote");
        let mut s = LogStore::open(&dir).unwrap();
        s.save_vote(&Vote::new_committed(4, 5)).await.unwrap();
        drop(s);
        let mut s = LogStore::open(&dir).unwrap();
        assert!(
            !s.demote_own_leader_vote(2),
            "someone else's vote is left alone"
        );
        assert!(s.demote_own_leader_vote(5));
        let v = s.read_vote().await.unwrap().unwrap();
        assert_eq!(v, Vote::new(4, 5));
        // openraft grants a request only if `req.vote >= my_vote` (a partial order).
        let grantable = |req: Vote<NodeId>| {
            matches!(
                req.partial_cmp(&v),
                Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
            )
        };
        assert!(!grantable(Vote::new(4, 1)));
        assert!(!grantable(Vote::new(3, 9)));
        assert!(grantable(Vote::new(4, 5)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn log_append_truncate_purge_survive_reopen() {
        let dir = temp_dir("log");
        let mut s = LogStore::open(&dir).unwrap();
        s.blocking_append((0..6).map(|i| blank(1, i)))
            .await
            .unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1, 2, 3, 4, 5]);
        drop(s);

        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1, 2, 3, 4, 5]);
        s.truncate(log_id(1, 4)).await.unwrap();
        drop(s);

        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1, 2, 3]);
        s.purge(log_id(1, 1)).await.unwrap();
        s.blocking_append([blank(2, 4)]).await.unwrap();
        s.save_committed(Some(log_id(2, 4))).await.unwrap();
        drop(s);

        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(indexes(&mut s).await, vec![2, 3, 4]);
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(st.last_log_id, Some(log_id(2, 4)));
        assert_eq!(s.read_committed().await.unwrap(), Some(log_id(2, 4)));

        // Purge everything: the last log id falls back to the purge pointer.
        s.purge(log_id(2, 4)).await.unwrap();
        drop(s);
        let mut s = LogStore::open(&dir).unwrap();
        assert!(indexes(&mut s).await.is_empty());
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id, Some(log_id(2, 4)));
        assert!(!s.is_fresh());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn torn_last_line_is_dropped() {
        let dir = temp_dir("torn");
        let mut s = LogStore::open(&dir).unwrap();
        s.blocking_append((0..2).map(|i| blank(1, i)))
            .await
            .unwrap();
        drop(s);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join(LOG_FILE))
            .unwrap();
        f.write_all(b"{\"log_id\":{\"leader_id\"").unwrap();
        drop(f);
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1]);
        // And appending after it yields a clean file.
        s.blocking_append([blank(1, 2)]).await.unwrap();
        drop(s);
        let mut s = LogStore::open(&dir).unwrap();
        assert_eq!(indexes(&mut s).await, vec![0, 1, 2]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_reported_with_their_path() {
        let dir = temp_dir("corrupt");
        fs::write(dir.join(VOTE_FILE), b"not json").unwrap();
        let err = LogStore::open(&dir).err().expect("corrupt vote accepted");
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if path.ends_with(VOTE_FILE)));
        assert!(err.to_string().contains(VOTE_FILE), "{err}");
        fs::remove_file(dir.join(VOTE_FILE)).unwrap();

        fs::write(dir.join(LOG_FILE), b"{\"garbage\":1}\n").unwrap();
        let err = LogStore::open(&dir).err().expect("corrupt log accepted");
        assert!(err.to_string().contains(LOG_FILE), "{err}");
        assert!(err.to_string().contains("line 1"), "{err}");

        // A hole in the log is corruption too.
        let line = |i| {
            let mut l = serde_json::to_vec(&blank(1, i)).unwrap();
            l.push(b'\n');
            l
        };
        fs::write(dir.join(LOG_FILE), [line(0), line(2)].concat()).unwrap();
        let err = LogStore::open(&dir)
            .err()
            .expect("log with a hole accepted");
        assert!(err.to_string().contains("expected index 1"), "{err}");
        fs::remove_file(dir.join(LOG_FILE)).unwrap();

        fs::write(dir.join(SNAPSHOT_FILE), b"\x00\x01").unwrap();
        let err = StateMachineStore::open(&dir)
            .err()
            .expect("corrupt snapshot accepted");
        assert!(err.to_string().contains(SNAPSHOT_FILE), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A vote of term 2^64 - 1 (once accepted from a forged frame) would make openraft overflow
    /// at the next election, on every restart: loading refuses it, naming the file.
    #[test]
    fn terms_that_would_overflow_are_corruption() {
        let dir = temp_dir("overflow");
        let vote = serde_json::to_vec(&Vote::new_committed(u64::MAX, 2)).unwrap();
        fs::write(dir.join(VOTE_FILE), vote).unwrap();
        let err = LogStore::open(&dir)
            .err()
            .expect("overflowing vote accepted");
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if path.ends_with(VOTE_FILE)));
        assert!(err.to_string().contains("overflow"), "{err}");
        fs::remove_file(dir.join(VOTE_FILE)).unwrap();

        let mut line = serde_json::to_vec(&blank(u64::MAX, 0)).unwrap();
        line.push(b'\n');
        fs::write(dir.join(LOG_FILE), line).unwrap();
        let err = LogStore::open(&dir)
            .err()
            .expect("overflowing entry accepted");
        assert!(err.to_string().contains(LOG_FILE), "{err}");
        assert!(err.to_string().contains("line 1"), "{err}");
        fs::remove_file(dir.join(LOG_FILE)).unwrap();

        // Within the bounds, a high term still loads.
        let vote = serde_json::to_vec(&Vote::new(1 << 40, 2)).unwrap();
        fs::write(dir.join(VOTE_FILE), vote).unwrap();
        assert!(LogStore::open(&dir).is_ok());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn state_machine_snapshot_survives_reopen() {
        let dir = temp_dir("snapshot");
        let mut sm = StateMachineStore::open(&dir).unwrap();
        let nodes: BTreeMap<NodeId, Node> = [(1, Node::default()), (2, Node::default())].into();
        let membership = Membership::new(vec![nodes.keys().copied().collect()], nodes);
        sm.apply([
            Entry {
                log_id: log_id(0, 0),
                payload: EntryPayload::Membership(membership.clone()),
            },
            blank(1, 1),
        ])
        .await
        .unwrap();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1)));
        drop(sm);

        let mut sm = StateMachineStore::open(&dir).unwrap();
        let (applied, m) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 1)));
        assert_eq!(m.membership(), &membership);
        let cur = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta.snapshot_id, snap.meta.snapshot_id);

        // A garbage snapshot from the wire is refused and leaves the old one in place.
        let bad = Box::new(Cursor::new(b"garbage".to_vec()));
        assert!(sm.install_snapshot(&snap.meta, bad).await.is_err());
        let cur = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta.snapshot_id, snap.meta.snapshot_id);
        fs::remove_dir_all(&dir).unwrap();
    }
}
