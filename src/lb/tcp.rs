//! The `tcp` load balancer: accept, pick a backend, copy bytes both ways.
//!
//! Half-close is kept: when one side shuts down its write half, the other side's write half is
//! shut down and the opposite direction keeps flowing until it ends too. Every connection task
//! lives in the listener's `JoinSet`, so stopping the listener aborts them all: nothing outlives
//! it, which matters when the VIP moves away and these sockets can no longer be answered.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use log::{debug, warn};
use tokio::io::copy_bidirectional_with_sizes;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::backends::Backends;
use crate::shutdown::Shutdown;

/// Copy buffer per direction. 64 KiB moves a full TCP window per syscall on a LAN;
/// 8 KiB (tokio's default) costs 8× the syscalls for bulk transfers like etcd snapshots.
pub const COPY_BUFFER: usize = 64 * 1024;

/// Accepts clients until `shutdown` fires, then aborts every open connection.
pub async fn serve(listener: TcpListener, backends: Arc<Backends>, mut shutdown: Shutdown) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            // Reap finished tasks so the set does not grow with every connection ever made.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    conns.spawn(proxy(client, peer, backends.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning on the error.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

async fn proxy(mut client: TcpStream, peer: SocketAddr, backends: Arc<Backends>) {
    let _ = client.set_nodelay(true);
    let (mut server, backend) = match backends.connect().await {
        Ok(s) => s,
        Err(e) => {
            // Closing at once tells the client to retry elsewhere; holding it open helps nobody.
            warn!("closing client {peer}: {e}");
            return;
        }
    };
    debug!("{peer} -> {backend}");
    match copy_bidirectional_with_sizes(&mut client, &mut server, COPY_BUFFER, COPY_BUFFER).await {
        Ok((up, down)) => debug!("{peer} -> {backend} closed ({up} bytes up, {down} down)"),
        Err(e) if is_disconnect(&e) => debug!("{peer} -> {backend} reset: {e}"),
        Err(e) => warn!("{peer} -> {backend}: {e}"),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}
