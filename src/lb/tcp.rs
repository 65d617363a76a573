//! The `tcp` load balancer: accept, pick a backend, move bytes both ways.
//!
//! Each direction picks its path per read. A short read (under [`SMALL_READ`], the usual
//! request or answer) goes through a per-thread buffer: recv + send, the cheapest way to move
//! a few hundred bytes. A read that fills that buffer means more is queued, and the direction
//! switches to splice(2) through a kernel pipe (socket → pipe → socket, never through user
//! space) until a read comes back short again. Bulk transfers thus cost no copies in and out of
//! the process, short connections no pipe work, and no connection holds a user-space buffer
//! while idle. Pipes come from a small pool; without one (descriptors exhausted) bulk data
//! stays on the buffer path.
//!
//! Half-close is kept: when one side shuts down its write half, the other side's write half is
//! shut down and the opposite direction keeps flowing until it ends too. Every connection task
//! lives in the listener's `JoinSet`, so stopping the listener aborts them all: nothing outlives
//! it, which matters when the VIP moves away and these sockets can no longer be answered.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use log::{debug, warn};
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::sys::socket::{recv, send, shutdown, MsgFlags, Shutdown as How};
use nix::unistd::{pipe2, write};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::backends::{Backends, Counts, HandshakeAck};
use super::{limits, Admission};
use crate::metrics::BackendMetrics;
use crate::shutdown::Shutdown;

/// Reads of up to this many bytes go through the thread's buffer; a read that fills it switches its
/// direction to splice. Around 16 KiB two copies and two splices cost about the same; one TLS
/// record (the unit of most API traffic) fits.
pub const SMALL_READ: usize = 16 * 1024;

/// How long a proxied connection lives before keepalive and `TCP_USER_TIMEOUT` are set on its
/// backend socket (the client's socket has them from the listener). Both only matter after
/// tens of seconds (keepalive's first probe comes after 30 s idle, the user timeout is 30 s),
/// so setting them a second late changes nothing, and the short connections that make up a
/// connection flood end before and never pay the five syscalls.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Most bytes asked of one splice into a pipe; the kernel stops at what the pipe holds
/// (64 KiB by default), so this only says "as much as fits".
const SPLICE_MAX: usize = 1 << 20;

/// Accepts clients until `shutdown` fires, then aborts every open connection.
pub async fn serve(
    listener: TcpListener,
    backends: Arc<Backends>,
    limit: Arc<Semaphore>,
    shutdown: Shutdown,
) {
    super::accept_loop(listener, limit, shutdown, move |client, peer, admission| {
        proxy(client, peer, backends.clone(), admission)
    })
    .await;
}

/// Proxies one client. TCP_NODELAY, keepalive and `TCP_USER_TIMEOUT` are already set: accepted
/// sockets inherit them from the listener (see `lb::listen`); the backend socket gets the last
/// two after [`SETTLE`]. Ends early, closing both sides, when the backend is marked down (with
/// `onMarkedDown: close`), so the client reconnects to a healthy one, or when the backend sends
/// nothing within `firstByteTimeoutMs` of the client's first bytes (see [`guard`]).
async fn proxy(
    client: TcpStream,
    peer: SocketAddr,
    backends: Arc<Backends>,
    _admission: Admission,
) {
    let connecting = Instant::now();
    // A client that speaks first (TLS, HTTP: every API client) has usually sent its first bytes
    // by the time it is accepted. Taken now, they go to the backend the moment its connect is
    // done, carrying the handshake's last ACK (one packet fewer), and the client side skips a
    // wait for readiness. With nothing there yet (or a protocol where the server speaks
    // first), the connection is proxied as it comes.
    let early = match early_bytes(&client) {
        Ok(e) => e,
        Err(e) => {
            debug!("{peer}: {e} before its first bytes");
            return;
        }
    };
    let ack = if early.is_some() {
        HandshakeAck::WithData
    } else {
        HandshakeAck::Alone
    };
    let (server, mut lease) = match backends.connect(ack).await {
        Ok(s) => s,
        Err(e) => {
            // Closing at once tells the client to retry elsewhere; holding it open helps nobody.
            warn!("closing client {peer}: {e}");
            return;
        }
    };
    let backend = lease.addr();
    debug!("{peer} -> {backend}");
    // An atomic only because the future must be Send; both directions run in this one task.
    let one_done = AtomicBool::new(false);
    let first = FirstBytes::default();
    // Bytes moved each way, counted by each direction as it goes and reported when this
    // function ends in any way (an error, a down mark, or the listener aborting it).
    let mut moved = Moved {
        up: 0,
        down: 0,
        metrics: backends.metrics(lease.index()),
    };
    let both = async {
        tokio::try_join!(
            pump(
                &client,
                &server,
                &one_done,
                &mut moved.up,
                &first.client,
                true,
                early,
            ),
            pump(
                &server,
                &client,
                &one_done,
                &mut moved.down,
                &first.backend,
                false,
                None,
            )
        )
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => debug!("{peer} -> {backend} closed"),
            Err(e) if is_disconnect(&e) => debug!("{peer} -> {backend} reset: {e}"),
            Err(e) => warn!("{peer} -> {backend}: {e}"),
        },
        _ = lease.marked_down() => {
            debug!("{peer} -> {backend}: backend marked down, closing");
        }
        silent = guard(&server, &first, backends.first_byte_timeout()) => {
            // Closing tells the client to retry; the backend cools down, so the retry goes
            // elsewhere.
            backends.failed(
                lease.index(),
                format_args!(
                    "no answer {} ms after a client's first bytes (firstByteTimeoutMs)",
                    silent.as_millis()
                ),
                "closing that client, new ones go elsewhere",
                connecting,
                Counts::OncePerCooldown,
            );
        }
    }
    debug!(
        "{peer} -> {backend}: {} bytes up, {} down",
        moved.up, moved.down
    );
}

/// First byte of a TLS handshake record (RFC 8446, 5.1): what a ClientHello starts with.
const TLS_HANDSHAKE: u8 = 22;

/// When each side of a connection first sent something, for [`guard`].
#[derive(Default)]
struct FirstBytes {
    /// When the client's first bytes were read, if they were a TLS handshake record: only then
    /// is an answer owed (a TLS server must answer a ClientHello; in other protocols the server
    /// may listen without a word, as an upload's receiver does).
    client: OnceLock<Instant>,
    /// When the backend's first bytes were read.
    backend: OnceLock<Instant>,
}

/// Watches one connection from its connect on, and completes only if the backend sent nothing
/// for `bound` after the client's first bytes (returning how long that is): passive
/// detection of a backend that accepts connections but never answers (a hung process whose
/// kernel still completes handshakes; `tcp` checks pass it). Only TLS connections count (the
/// client's first bytes a handshake record: kube-apiserver's traffic), and only the FIRST byte:
/// once the backend has said anything, silence is legitimate (a watch may stay quiet for
/// minutes, and a client's HTTP/2 WINDOW_UPDATE needs no answer), and a client that has sent
/// nothing, or not TLS, is owed nothing. Also sets keepalive and `TCP_USER_TIMEOUT` on the backend socket once
/// the connection has lived [`SETTLE`]. Costs one timer per connection, cancelled when the
/// connection ends; nothing per byte.
async fn guard(server: &TcpStream, first: &FirstBytes, bound: Option<Duration>) -> Duration {
    let settled = Instant::now() + SETTLE;
    let mut timeouts_set = false;
    loop {
        let now = Instant::now();
        if !timeouts_set && now >= settled {
            if let Err(e) = limits::set_tcp_timeouts(server) {
                debug!("cannot set keepalive on a backend socket: {e}");
            }
            timeouts_set = true;
        }
        let silence_ends = match (bound, first.backend.get(), first.client.get()) {
            (Some(bound), None, Some(&sent)) => {
                let silent = now.saturating_duration_since(sent);
                if silent >= bound {
                    return silent;
                }
                Some(sent + bound)
            }
            // The client has said nothing yet: look again a bound from now.
            (Some(bound), None, None) => Some(now + bound),
            _ => None,
        };
        let wake = match (timeouts_set, silence_ends) {
            (true, None) => return std::future::pending().await,
            (true, Some(t)) => t,
            (false, None) => settled,
            (false, Some(t)) => t.min(settled),
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// Bytes one connection moved, added to its backend's counters when dropped.
struct Moved<'a> {
    /// From the client to the backend.
    up: u64,
    /// From the backend to the client.
    down: u64,
    /// The backend's metrics.
    metrics: &'a BackendMetrics,
}

impl Drop for Moved<'_> {
    fn drop(&mut self) {
        self.metrics.bytes(self.up, self.down);
    }
}

/// Both ends of a kernel pipe that carries one direction of one connection.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its two descriptors in the proxy's budget.
    _fds: OwnedSemaphorePermit,
}

/// Empty pipes from finished connections. Making a pipe and closing it again costs three
/// syscalls and a kernel allocation, so pipes are reused (HAProxy keeps a pool for the same
/// reason).
static PIPE_POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// At most this many idle pipes (two descriptors each) are kept for reuse.
const PIPE_POOL_MAX: usize = 64;

impl Pipe {
    /// A pipe from the pool, or a new one if the descriptor budget allows.
    fn get() -> io::Result<Pipe> {
        if let Some(p) = PIPE_POOL.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(p);
        }
        let fds = limits::try_reserve_fds(2).ok_or(io::Error::from(io::ErrorKind::OutOfMemory))?;
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Pipe {
            read,
            write,
            _fds: fds,
        })
    }

    /// Returns a pipe to the pool. Only for a pipe known to be empty: one left holding bytes
    /// (a direction that ended in an error) must be dropped instead, which closes it.
    fn recycle(self) {
        if let Ok(mut pool) = PIPE_POOL.lock() {
            if pool.len() < PIPE_POOL_MAX {
                pool.push(self);
            }
        }
    }
}

/// What one read did: `read` bytes came from the source; `parked` of them wait in the pipe and
/// `spill` holds any that found no room there; the rest were sent already.
struct Read {
    read: usize,
    /// The bytes start like a TLS handshake record (content type 22, version 3.x).
    tls_record: bool,
    parked: usize,
    spill: Vec<u8>,
}

/// Moves everything `src` sends to `dst` until `src` ends its side, then shuts down `dst`'s
/// write half (the other direction is left alone). Notes in `first` when `src` first sent
/// something (with `first_must_be_tls`, only if that was a TLS handshake record). Adds the bytes moved to `total` as they are sent (what recv, send and splice return; nothing per byte). `one_done` is shared
/// by the two directions of a connection: the direction that ends second skips the shutdown,
/// since both sockets are closed right after, and a close sends the FIN just the same (the
/// socket holds no unread data: the other direction has read it to its end).
///
/// `early`: bytes already read from `src` (see [`early_bytes`]), sent first; they count as
/// its first bytes, noted when they are sent (after the connect, so a slow connect does not
/// eat into the backend's time to answer).
///
/// Every read waits until the bytes of the previous one are all sent, so the pipe is empty
/// whenever something reads into it: an EAGAIN from a splice into the pipe always means "the
/// socket has nothing yet" (never "the pipe is full"), which keeps tokio's readiness honest,
/// and a pipe left at the end is empty and can be reused.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    one_done: &AtomicBool,
    total: &mut u64,
    first: &OnceLock<Instant>,
    first_must_be_tls: bool,
    early: Option<Vec<u8>>,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut pipe: Option<Pipe> = None;
    let mut bulk = false;
    let mut seen = false;
    // Owned, and dropped once sent: a long-lived connection keeps no buffer.
    if let Some(bytes) = early {
        seen = true;
        if is_tls_record(&bytes) || !first_must_be_tls {
            let _ = first.set(Instant::now());
        }
        send_all(dst, &bytes, total).await?;
    }
    loop {
        let r = match (&pipe, bulk) {
            (Some(p), true) => {
                let n = src
                    .async_io(Interest::READABLE, || {
                        Ok(splice(src, None, &p.write, None, SPLICE_MAX, flags)?)
                    })
                    .await?;
                Read {
                    read: n,
                    tls_record: false,
                    parked: n,
                    spill: Vec::new(),
                }
            }
            _ => {
                // READ_CLOSED: `src` has sent its FIN, so after the bytes queued now only the
                // end of the stream can follow (see `relay_small`).
                let ends = src.ready(Interest::READABLE).await?.is_read_closed();
                match relay_small(src, dst, &mut pipe, ends) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        if r.read == 0 {
            if !first_must_be_tls {
                // A close is an answer too (a TLS server closes on a hello it rejects).
                let _ = first.set(Instant::now());
            }
            break; // EOF from src
        }
        if !seen {
            seen = true;
            if r.tls_record || !first_must_be_tls {
                let _ = first.set(Instant::now());
            }
        }
        *total += (r.read - r.parked - r.spill.len()) as u64;
        bulk = r.read >= SMALL_READ;
        if bulk && pipe.is_none() {
            pipe = Pipe::get().ok();
        }
        let mut left = r.parked;
        while left > 0 {
            let p = pipe.as_ref().ok_or(io::ErrorKind::NotFound)?;
            let sent = dst
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&p.read, None, dst, None, left, flags)?)
                })
                .await?;
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= sent;
            *total += sent as u64;
        }
        send_all(dst, &r.spill, total).await?;
    }
    if let Some(p) = pipe {
        p.recycle();
    }
    if one_done.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    match shutdown(dst.as_raw_fd(), How::Write) {
        // The peer may be gone already; the other direction will see that itself.
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sends all of `bytes` to `dst`, waiting for room as needed; adds what was sent to `total`.
async fn send_all(dst: &TcpStream, mut bytes: &[u8], total: &mut u64) -> io::Result<()> {
    while !bytes.is_empty() {
        dst.writable().await?;
        match dst.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(sent) => {
                bytes = &bytes[sent..];
                *total += sent as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The bytes `client` has sent so far (up to [`SMALL_READ`]), if any: one recv that does not
/// wait. None if nothing is there yet, and also at the end of the stream (a client that closed
/// without a word: the proxy meets that end again, as it would have). An error (a reset) ends
/// the connection.
fn early_bytes(client: &TcpStream) -> io::Result<Option<Vec<u8>>> {
    SMALL_BUF.with(|buf| {
        let buf = &mut buf.borrow_mut()[..];
        match recv(client.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(e) => Err(e.into()),
        }
    })
}

/// Whether `bytes` start with a whole TLS handshake record (5-byte header and its length): a
/// client that sends half a hello gets no answer from a healthy server either, and must not be
/// able to cool backends down.
fn is_tls_record(bytes: &[u8]) -> bool {
    bytes.len() >= 5
        && bytes[0] == TLS_HANDSHAKE
        && bytes[1] == 3
        && bytes.len() >= 5 + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]))
}

/// One read of at most [`SMALL_READ`] bytes into the thread's buffer (so it is not kept in
/// the connection's state), sent on at once as far as `dst` takes it. What `dst` cannot take
/// now is parked in the (empty) pipe, made if there is none, or else returned as spill.
///
/// `src_ended`: `src` has already sent its FIN. If this read then empties the socket, these
/// are its last bytes and a shutdown (or close) of `dst` follows at once, so they are sent with
/// MSG_MORE: the kernel holds the segment for that FIN and sends both in one packet, as
/// HAProxy does. A short answer from a `Connection: close` server or a TLS alert and close
/// then costs one packet (and the client one ACK) fewer.
fn relay_small(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Option<Pipe>,
    src_ended: bool,
) -> io::Result<Read> {
    SMALL_BUF.with(|buf| relay_small_in(&mut buf.borrow_mut()[..], src, dst, pipe, src_ended))
}

thread_local! {
    /// The buffer of [`relay_small`], one per thread: a fresh one on the stack would be zeroed
    /// for every read, 16 KiB of memset for a request of a few hundred bytes.
    static SMALL_BUF: RefCell<Box<[u8; SMALL_READ]>> = RefCell::new(Box::new([0; SMALL_READ]));
}

fn relay_small_in(
    buf: &mut [u8],
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &mut Option<Pipe>,
    src_ended: bool,
) -> io::Result<Read> {
    let mut got = 0;
    let n = match src.try_io(Interest::READABLE, || {
        got = recv(src.as_raw_fd(), &mut *buf, MsgFlags::empty())?;
        // A read that did not fill the buffer emptied the socket: saying WouldBlock here makes
        // tokio drop the readiness (unless an event came in meanwhile), which saves the read
        // that would only return EAGAIN. tokio's own AsyncRead does the same.
        if got > 0 && got < SMALL_READ {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    }) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
        other => other?,
    };
    if n == 0 {
        return Ok(Read {
            read: 0,
            tls_record: false,
            parked: 0,
            spill: Vec::new(),
        });
    }
    let tls_record = is_tls_record(&buf[..n]);
    let flags = if src_ended && n < SMALL_READ {
        MsgFlags::MSG_NOSIGNAL | MsgFlags::from_bits_retain(nix::libc::MSG_MORE)
    } else {
        MsgFlags::MSG_NOSIGNAL
    };
    let sent = match dst.try_io(Interest::WRITABLE, || {
        Ok(send(dst.as_raw_fd(), &buf[..n], flags)?)
    }) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    let rest = &buf[sent..n];
    if rest.is_empty() {
        return Ok(Read {
            read: n,
            tls_record,
            parked: 0,
            spill: Vec::new(),
        });
    }
    if pipe.is_none() {
        *pipe = Pipe::get().ok();
    }
    // An empty pipe normally holds 64 KiB, more than one small read, so the write takes all of
    // it; a pipe shrunk by the per-user pipe limit may take less, the rest is spilled.
    let parked = match pipe {
        Some(p) => match write(&p.write, rest) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => 0,
            Err(e) => return Err(e.into()),
        },
        None => 0,
    };
    Ok(Read {
        read: n,
        tls_record,
        parked,
        spill: rest[parked..].to_vec(),
    })
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    use crate::config::{LbType, LoadBalancer};
    use crate::lb::testutil::{backend_listener, free_port, lb_config, spawn_backend, start};
    use crate::lb::RunningLb;

    /// Bytes sent each way in the bulk test: far more than socket buffers and pipes hold, so
    /// both the buffer and the splice path, partial writes and waits for room all happen.
    const BULK: usize = 8 << 20;

    /// Deterministic bytes that differ per position and per stream (`seed`), so a lost,
    /// doubled or reordered chunk shows up as a mismatch.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `data` in chunks of changing size (a few bytes up to 200 KiB) so that the proxy
    /// sees short reads and full ones, and switches between its paths many times.
    async fn write_varied(s: &mut (impl AsyncWriteExt + Unpin), data: &[u8]) {
        let sizes = [1, 300, 16 * 1024 - 1, 16 * 1024, 70_000, 200 * 1024, 5];
        let mut off = 0;
        for &n in sizes.iter().cycle() {
            if off == data.len() {
                break;
            }
            let end = (off + n).min(data.len());
            s.write_all(&data[off..end]).await.expect("write");
            off = end;
            if n == 5 {
                // Let the proxy drain to an empty socket now and then.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Reads until EOF, slowly at first so the proxy's writes fill the socket and must wait.
    async fn read_to_eof(s: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() < 2 << 20 {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }

    /// The `test` load balancer on a free port, forwarding to `backend`.
    fn tcp_lb(backend: SocketAddr) -> LoadBalancer {
        LoadBalancer {
            connect_timeout_ms: Some(1000),
            ..lb_config("test", LbType::Tcp, free_port(), &[backend])
        }
    }

    async fn start_lb(backend: SocketAddr) -> (RunningLb, SocketAddr) {
        start(&tcp_lb(backend)).await
    }

    /// 8 MB each way at the same time, byte-exact, with half-close: the client shuts down its
    /// write half after its 8 MB; the backend must see exactly that much and then EOF while it
    /// is still sending, and only then sends a trailer and closes; the client must get all of
    /// it and then EOF.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_both_ways_with_half_close() {
        let up = pattern(1, BULK);
        let down = pattern(2, BULK);
        let backend = backend_listener();
        let backend_addr = backend.local_addr().expect("addr");
        let (up2, down2) = (up.clone(), down.clone());
        let server = tokio::spawn(async move {
            let (s, _) = backend.accept().await.expect("accept");
            let (mut r, mut w) = s.into_split();
            let reader = tokio::spawn(async move { read_to_eof(&mut r).await });
            write_varied(&mut w, &down2).await;
            let got = reader.await.expect("reader");
            assert!(
                got == up2,
                "upstream bytes differ ({} of {})",
                got.len(),
                BULK
            );
            // The client's EOF arrived while this side could still send: half-close kept.
            w.write_all(b"trailer").await.expect("trailer");
            w.shutdown().await.expect("shutdown");
        });

        let (lb, addr) = start_lb(backend_addr).await;
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut r, mut w) = client.into_split();
        let reader = tokio::spawn(async move { read_to_eof(&mut r).await });
        write_varied(&mut w, &up).await;
        w.shutdown().await.expect("shutdown");
        let got = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("downstream finishes")
            .expect("reader");
        server.await.expect("backend");
        assert_eq!(got.len(), BULK + b"trailer".len());
        assert!(got[..BULK] == down[..], "downstream bytes differ");
        assert_eq!(&got[BULK..], b"trailer");
        lb.stop().await;
        // Every byte counted once, each way (splice and buffer paths alike).
        use crate::metrics::backend_sample;
        let sent = backend_sample("backend_sent_bytes_total", "test", backend_addr);
        let received = backend_sample("backend_received_bytes_total", "test", backend_addr);
        assert_eq!(sent, Some(BULK as f64));
        assert_eq!(received, Some((BULK + b"trailer".len()) as f64));
        let conns = backend_sample("backend_connections_total", "test", backend_addr);
        assert_eq!(conns, Some(1.0));
    }

    /// Short reads towards a client that does not read yet: once the proxy's send buffer is
    /// full its writes come up short or not at all, so the rest of a short read is parked in
    /// the pipe and sent from there when the client makes room. Byte-exact, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_reads_into_a_full_socket() {
        /// Below [`SMALL_READ`](super::SMALL_READ), so the proxy's reads are short.
        const BURST: usize = 16_000;
        /// Twice what a send buffer may grow to (`tcp_wmem` max, 4 MiB by default).
        const TOTAL: usize = 8 << 20;
        /// The client starts reading once this much is sent: the proxy's send buffer is full.
        const READ_AFTER: usize = 6 << 20;
        let down = pattern(4, TOTAL);
        let backend = backend_listener();
        let backend_addr = backend.local_addr().expect("addr");
        let down2 = down.clone();
        let (filled_tx, filled_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.expect("accept");
            let mut filled = Some(filled_tx);
            for (i, burst) in down2.chunks(BURST).enumerate() {
                s.write_all(burst).await.expect("write");
                if i * BURST >= READ_AFTER {
                    if let Some(tx) = filled.take() {
                        let _ = tx.send(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            s.shutdown().await.expect("shutdown");
        });
        let (lb, addr) = start_lb(backend_addr).await;
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut client = sock.connect(addr).await.expect("connect");
        // Not reading while the bursts pile up in the proxy's send buffer.
        filled_rx.await.expect("backend sent");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got))
            .await
            .expect("all data within 30 s")
            .expect("read");
        server.await.expect("backend");
        assert_eq!(got.len(), TOTAL);
        assert!(got == down, "bytes differ");
        lb.stop().await;
    }

    /// Many short exchanges at once (the connection-rate case): every one gets its own answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_short_connections() {
        let backend_addr = spawn_backend(|mut s| async move {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let mut answer = b"re:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = s.write_all(&answer).await;
        });
        let (lb, addr) = start_lb(backend_addr).await;
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            clients.spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                let msg = format!("hello {i}");
                s.write_all(msg.as_bytes()).await.expect("write");
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.expect("read");
                assert_eq!(got, format!("re:{msg}").into_bytes());
            });
        }
        while let Some(r) = clients.join_next().await {
            r.expect("client");
        }
        lb.stop().await;
    }

    /// Passive detection: a backend that accepts but never answers a client's TLS hello loses
    /// the connection after `firstByteTimeoutMs` and counts a failure; one that answered once
    /// may then stay silent (a watch) for as long as it likes, and a client that is not TLS
    /// (an upload) is owed no answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_backend_is_cut_after_first_byte_timeout() {
        use crate::metrics::backend_sample;
        // "GET": answer once, then read on in silence (a watch); anything else: read and never
        // answer (a hung server, or an upload's receiver).
        let backend_addr = spawn_backend(|mut s| async move {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap_or(0);
            if buf[..n].starts_with(b"GET") {
                let _ = s.write_all(b"hello").await;
            }
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let config = LoadBalancer {
            name: "silent".into(),
            first_byte_timeout_ms: Some(300),
            ..tcp_lb(backend_addr)
        };
        let (lb, addr) = start(&config).await;

        let started = tokio::time::Instant::now();
        let mut mute = TcpStream::connect(addr).await.expect("connect");
        // Half a hello (the record says 5 bytes, 2 come): no answer owed, no failure.
        let mut half = TcpStream::connect(addr).await.expect("connect");
        half.write_all(&[22, 3, 1, 0, 5, 1, 0])
            .await
            .expect("write");
        // A whole TLS record (handshake, TLS 1.0 record version, 5 bytes of hello).
        mute.write_all(&[22, 3, 1, 0, 5, 1, 0, 0, 1, 0])
            .await
            .expect("write");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), mute.read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(matches!(n, Ok(0) | Err(_)), "got an answer: {n:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "closed after {took:?}, want about 300 ms"
        );
        let failures = backend_sample("backend_connect_failures_total", "silent", backend_addr);
        assert_eq!(failures, Some(1.0), "only the whole hello counts");
        drop(half);

        // Answered once, then silent for far longer than the bound: kept open.
        let mut watch = TcpStream::connect(addr).await.expect("connect");
        watch.write_all(b"GET /watch").await.expect("write");
        let n = watch.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        watch.write_all(b"window update").await.expect("write");
        let quiet = tokio::time::timeout(Duration::from_millis(1200), watch.read(&mut buf)).await;
        assert!(quiet.is_err(), "watch ended: {quiet:?}");
        // Not TLS: a server may listen without a word (an upload's receiver): kept open.
        let mut upload = TcpStream::connect(addr).await.expect("connect");
        upload.write_all(b"upload data").await.expect("write");
        let quiet = tokio::time::timeout(Duration::from_millis(800), upload.read(&mut buf)).await;
        assert!(quiet.is_err(), "upload closed: {quiet:?}");
        // A client that has sent nothing is owed nothing: kept open too.
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        let quiet = tokio::time::timeout(Duration::from_millis(800), idle.read(&mut buf)).await;
        assert!(quiet.is_err(), "idle client closed: {quiet:?}");
        let failures = backend_sample("backend_connect_failures_total", "silent", backend_addr);
        assert_eq!(failures, Some(1.0));
        lb.stop().await;
    }

    /// Stopping closes the listener and every proxied connection, also ones in mid-transfer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_closes_listener_and_connections() {
        let backend = backend_listener();
        let backend_addr = backend.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            // Accepts and keeps the connection open, never answering.
            let (mut s, _) = backend.accept().await.expect("accept");
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        });
        let (lb, addr) = start_lb(backend_addr).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        // Enough to leave bytes in flight (and in a pipe) when the stop comes.
        client.write_all(&pattern(3, 1 << 20)).await.expect("write");
        tokio::time::timeout(Duration::from_secs(5), lb.stop())
            .await
            .expect("stop finishes");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("client sees the close");
        assert!(matches!(n, Ok(0) | Err(_)), "connection still open: {n:?}");
        // The backend side was closed too.
        tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("backend sees the close")
            .expect("backend task");
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    /// A protocol where the server speaks first (SMTP, MySQL): the client has sent nothing when
    /// it is accepted, so the proxy must connect at once and relay the greeting, not wait for
    /// the client's first bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_speaks_first() {
        let backend = backend_listener();
        let backend_addr = backend.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.expect("accept");
            s.write_all(b"220 hello\r\n").await.expect("greeting");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(&buf[..n]).await.expect("echo");
        });
        let (lb, addr) = start_lb(backend_addr).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut greeting))
            .await
            .expect("the greeting comes before the client says anything")
            .expect("read");
        assert_eq!(&greeting, b"220 hello\r\n");
        client.write_all(b"QUIT").await.expect("write");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"QUIT");
        lb.stop().await;
    }

    /// A client whose bytes and end of stream are all there before the proxy accepts it (it
    /// waited in the backlog behind `maxConnections: 1`), so they are read at once, before the
    /// backend connect: the backend gets every byte once, then the end, its answer comes
    /// back, and the bytes are counted once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_bytes_and_end_before_accept() {
        use crate::metrics::backend_sample;
        let backend = backend_listener();
        let backend_addr = backend.local_addr().expect("addr");
        let (accepted, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                let _ = accepted.send(());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.expect("read");
                    let answer = format!("got {}", got.len());
                    s.write_all(answer.as_bytes()).await.expect("answer");
                });
            }
        });
        let (lb, addr) = start(&LoadBalancer {
            max_connections: Some(1),
            ..tcp_lb(backend_addr)
        })
        .await;
        // The first client takes the one slot...
        let mut first = TcpStream::connect(addr).await.expect("connect");
        first.write_all(b"a").await.expect("write");
        accepted_rx.recv().await.expect("first accepted");
        // ...so the second waits in the backlog with everything it will ever send.
        let mut second = TcpStream::connect(addr).await.expect("connect");
        second.write_all(&[7u8; 3000]).await.expect("write");
        second.shutdown().await.expect("shutdown");
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"got 1");
        drop(first);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut got))
            .await
            .expect("the second client is answered")
            .expect("read");
        assert_eq!(got, b"got 3000");
        lb.stop().await;
        let sent = backend_sample("backend_sent_bytes_total", "test", backend_addr);
        assert_eq!(sent, Some(3001.0));
    }
}
