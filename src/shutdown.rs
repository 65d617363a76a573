//! A shutdown signal that many tasks can wait on.

use tokio::sync::watch;

/// Fires once, for every clone. Made from a [`watch`] channel whose value turns `true`.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Turns `true` when shutdown is asked for; cannot lag: only one change is ever sent.
    rx: watch::Receiver<bool>,
}

/// The sending side; dropping it also counts as shutdown, so a lost owner never leaves tasks
/// running forever.
#[derive(Debug)]
pub struct Trigger {
    /// The channel's sender.
    tx: watch::Sender<bool>,
}

/// A new trigger and its signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    /// Fires the signal.
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }
}

impl Shutdown {
    /// Waits until shutdown is asked for (returns at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the trigger was dropped: treat it as shutdown too.
        let _ = self.rx.wait_for(|&fired| fired).await;
    }
}
