//! Shared-key authentication of the peer channel (`peerKeyFile`).
//!
//! The key file holds one or more keys, one per line (each at least [`MIN_KEY_BYTES`] random
//! bytes, as hex or base64; blank lines and `#` comments are skipped). The first key
//! authenticates what this node sends; any listed key is accepted from peers, so keys rotate
//! with no downtime: add the new key second everywhere, then first everywhere, then drop the
//! old one.
//!
//! # Handshake (protocol version [`KEYED_VERSION`])
//!
//! ```text
//! dialer                                     listener
//!   Hello {from, to, nonce_c}            →
//!                                        ←   HelloAck {node, nonce_s, proof_s}
//!   Auth {proof_c}                       →
//!                                        ←   AuthOk            (first authenticated frame)
//! proof_x = HMAC-SHA256(signing key of x, label_x ‖ nonce_c ‖ nonce_s ‖ from ‖ to)
//! ```
//!
//! Both nonces are fresh from the OS's random source for every connection, so a recorded
//! proof is worth nothing on another connection; the labels differ per side, so a proof
//! cannot be reflected. Each side checks the other's proof against every accepted key
//! (constant-time comparison, `Mac::verify_slice`) and learns which key the peer signs with.
//!
//! # Frames
//!
//! After the handshake every frame carries a tag: `HMAC-SHA256(session key, seq ‖ payload)`,
//! where `seq` counts the frames of that direction from 0, and each direction has its own
//! session key, `HMAC(sender's key, direction label ‖ nonce_c ‖ nonce_s ‖ from ‖ to)`. A frame
//! injected, altered, reordered, replayed (within or across connections) fails its tag, and the
//! connection is closed.
//!
//! Key material never reaches a log line or `check`: [`Key`]'s `Debug` prints nothing of it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;

use super::types::NodeId;

/// Shortest key accepted, in bytes: 256 bits, the HMAC-SHA256 block of security.
pub const MIN_KEY_BYTES: usize = 32;
/// Bytes of each handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of a frame tag (full HMAC-SHA256 output).
pub const TAG_BYTES: usize = 32;
/// Protocol version of the keyed handshake (the unkeyed one stays version 1, unchanged).
pub const KEYED_VERSION: u32 = 2;

/// Label of the dialer's proof.
const CLIENT_PROOF: &[u8] = b"kube-vip peer auth v2: dialer proof";
/// Label of the listener's proof.
const SERVER_PROOF: &[u8] = b"kube-vip peer auth v2: listener proof";
/// Label of the dialer → listener session key.
const CLIENT_TO_SERVER: &[u8] = b"kube-vip peer auth v2: dialer to listener";
/// Label of the listener → dialer session key.
const SERVER_TO_CLIENT: &[u8] = b"kube-vip peer auth v2: listener to dialer";

type HmacSha256 = Hmac<Sha256>;

/// One key. Its `Debug` shows only the length: key material never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length: new_from_slice cannot fail for it.
        <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

/// The keys of `peerKeyFile`: the first signs, all are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    keys: Vec<Key>,
}

/// Why a key file cannot be used. Names the file, never shows a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Missing or unreadable.
    #[error("peerKeyFile {}: cannot read: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No key in it.
    #[error("peerKeyFile {}: no key in the file (one key per line, hex or base64, at least {MIN_KEY_BYTES} bytes; `kube-vip sample key` makes one)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A line that is neither hex nor base64.
    #[error("peerKeyFile {} line {line}: not a hex or base64 key", path.display())]
    Undecodable {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
    /// A key shorter than [`MIN_KEY_BYTES`].
    #[error("peerKeyFile {} line {line}: key is {bytes} bytes, at least {MIN_KEY_BYTES} needed (`kube-vip sample key` makes one)", path.display())]
    Short {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Its length.
        bytes: usize,
    },
}

impl KeyRing {
    /// Reads a key file; the second value is a warning to log (e.g. the file is readable by
    /// others than its owner).
    pub fn load(path: &Path) -> Result<(KeyRing, Option<String>), KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        let ring = KeyRing::parse(&text, path)?;
        let warning = std::fs::metadata(path).ok().and_then(|m| {
            use std::os::unix::fs::PermissionsExt;
            let mode = m.permissions().mode() & 0o777;
            (mode & 0o077 != 0).then(|| {
                format!(
                    "peerKeyFile {} is readable by others than its owner (mode {mode:o}); chmod 600 it",
                    path.display()
                )
            })
        });
        Ok((ring, warning))
    }

    /// Parses the text of a key file; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<KeyRing, KeyError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = decode_key(line).ok_or_else(|| KeyError::Undecodable {
                path: path.to_path_buf(),
                line: n + 1,
            })?;
            if bytes.len() < MIN_KEY_BYTES {
                return Err(KeyError::Short {
                    path: path.to_path_buf(),
                    line: n + 1,
                    bytes: bytes.len(),
                });
            }
            keys.push(Key(bytes));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(KeyRing { keys })
    }

    /// How many keys are accepted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key this node signs with.
    fn signing(&self) -> &Key {
        &self.keys[0]
    }
}

/// The keys in use, replaceable while the node runs: SIGHUP re-reads `peerKeyFile`, so a
/// rotation step needs no restart (and so no leader change). Each new connection takes the
/// keys current when it starts; established connections keep their session keys until they
/// close.
#[derive(Debug)]
pub struct SharedKeys(RwLock<Arc<KeyRing>>);

impl SharedKeys {
    /// Shares `keys`.
    pub fn new(keys: KeyRing) -> Arc<SharedKeys> {
        Arc::new(SharedKeys(RwLock::new(Arc::new(keys))))
    }

    /// The keys for a connection starting now.
    pub fn current(&self) -> Arc<KeyRing> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the keys for connections started from now on.
    pub fn replace(&self, keys: KeyRing) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }
}

/// Hex (even length) or base64 (standard alphabet, padded or not).
fn decode_key(s: &str) -> Option<Vec<u8>> {
    if s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
            .collect();
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s))
        .ok()
}

/// A fresh key for `kube-vip sample key`: 32 bytes from the OS's random source, as hex.
pub fn sample_key() -> String {
    let mut k = [0u8; MIN_KEY_BYTES];
    OsRng.fill_bytes(&mut k);
    hex(&k)
}

/// A fresh handshake nonce from the OS's random source.
pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut n);
    n
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lower- or upper-case hex of exactly `N` bytes.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let v = decode_key(s)?;
    v.try_into().ok()
}

/// What both sides of one connection bind their proofs and session keys to.
#[derive(Debug, Clone, Copy)]
pub struct Transcript {
    /// The dialer's nonce.
    pub nonce_c: [u8; NONCE_BYTES],
    /// The listener's nonce.
    pub nonce_s: [u8; NONCE_BYTES],
    /// Node id of the dialer.
    pub from: NodeId,
    /// Node id of the listener.
    pub to: NodeId,
}

impl Transcript {
    fn mac(&self, key: &Key, label: &[u8]) -> HmacSha256 {
        let mut m = key.mac();
        m.update(label);
        m.update(&self.nonce_c);
        m.update(&self.nonce_s);
        m.update(&self.from.to_be_bytes());
        m.update(&self.to.to_be_bytes());
        m
    }

    /// The listener's proof, made with our signing key.
    pub fn server_proof(&self, ring: &KeyRing) -> [u8; TAG_BYTES] {
        self.mac(ring.signing(), SERVER_PROOF)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The dialer's proof, made with our signing key.
    pub fn client_proof(&self, ring: &KeyRing) -> [u8; TAG_BYTES] {
        self.mac(ring.signing(), CLIENT_PROOF)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The accepted key that made `proof` as the listener's, if any (constant-time compare).
    pub fn check_server_proof<'a>(&self, ring: &'a KeyRing, proof: &[u8]) -> Option<&'a Key> {
        ring.keys
            .iter()
            .find(|k| self.mac(k, SERVER_PROOF).verify_slice(proof).is_ok())
    }

    /// The accepted key that made `proof` as the dialer's, if any (constant-time compare).
    pub fn check_client_proof<'a>(&self, ring: &'a KeyRing, proof: &[u8]) -> Option<&'a Key> {
        ring.keys
            .iter()
            .find(|k| self.mac(k, CLIENT_PROOF).verify_slice(proof).is_ok())
    }

    /// Frame authentication for what the dialer sends, keyed by the dialer's signing key.
    pub fn dialer_frames(&self, dialer_key: &Key) -> FrameMac {
        FrameMac::new(self.session_key(dialer_key, CLIENT_TO_SERVER))
    }

    /// Frame authentication for what the listener sends, keyed by the listener's signing key.
    pub fn listener_frames(&self, listener_key: &Key) -> FrameMac {
        FrameMac::new(self.session_key(listener_key, SERVER_TO_CLIENT))
    }

    fn session_key(&self, key: &Key, label: &[u8]) -> Key {
        Key(self.mac(key, label).finalize().into_bytes().to_vec())
    }
}

impl KeyRing {
    /// Our own signing key (for the session key of what we send).
    pub fn own(&self) -> &Key {
        self.signing()
    }
}

/// Authentication of one direction of a connection: a session key and the next sequence
/// number. Without a key ([`FrameMac::none`]) frames travel as they are.
#[derive(Debug, Clone)]
pub struct FrameMac {
    mac: Option<HmacSha256>,
    seq: u64,
}

/// A frame whose tag is missing or wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "frame authentication failed (wrong key, or a frame injected, altered, reordered or replayed)"
)]
pub struct BadTag;

impl FrameMac {
    /// No authentication (no `peerKeyFile`).
    pub fn none() -> FrameMac {
        FrameMac { mac: None, seq: 0 }
    }

    fn new(key: Key) -> FrameMac {
        FrameMac {
            mac: Some(key.mac()),
            seq: 0,
        }
    }

    /// Bytes this adds to each frame.
    pub fn overhead(&self) -> usize {
        if self.mac.is_some() {
            TAG_BYTES
        } else {
            0
        }
    }

    fn tag(&self, payload: &[u8]) -> Option<HmacSha256> {
        self.mac.clone().map(|mut m| {
            m.update(&self.seq.to_be_bytes());
            m.update(payload);
            m
        })
    }

    /// Appends the tag of the next frame to `payload`.
    pub fn seal(&mut self, payload: &mut Vec<u8>) {
        if let Some(m) = self.tag(payload) {
            payload.extend_from_slice(&m.finalize().into_bytes());
            self.seq += 1;
        }
    }

    /// Checks and strips the tag of the next frame; the payload without it.
    pub fn open<'a>(&mut self, frame: &'a [u8]) -> Result<&'a [u8], BadTag> {
        if self.mac.is_none() {
            return Ok(frame);
        }
        let cut = frame.len().checked_sub(TAG_BYTES).ok_or(BadTag)?;
        let (payload, tag) = frame.split_at(cut);
        let m = self.tag(payload).ok_or(BadTag)?;
        m.verify_slice(tag).map_err(|_| BadTag)?;
        self.seq += 1;
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[&str]) -> KeyRing {
        KeyRing::parse(&lines.join("\n"), Path::new("k")).expect("keys")
    }

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";
    const K2: &str = "0202020202020202020202020202020202020202020202020202020202020202";

    fn transcript() -> Transcript {
        Transcript {
            nonce_c: [1; NONCE_BYTES],
            nonce_s: [2; NONCE_BYTES],
            from: 10,
            to: 20,
        }
    }

    #[test]
    fn key_files_parse_hex_base64_comments_and_refuse_short_or_empty() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let r = ring(&["# rotation in progress", "", K1, &b64]);
        assert_eq!(r.len(), 2);
        let p = Path::new("/etc/kube-vip/peer.key");
        let short = KeyRing::parse("abcd", p).unwrap_err();
        assert!(matches!(short, KeyError::Short { bytes: 2, .. }), "{short}");
        assert!(short
            .to_string()
            .contains("peerKeyFile /etc/kube-vip/peer.key line 1"));
        assert!(matches!(
            KeyRing::parse("# nothing\n\n", p),
            Err(KeyError::Empty { .. })
        ));
        assert!(matches!(
            KeyRing::parse("not a key!", p),
            Err(KeyError::Undecodable { .. })
        ));
        // Errors and Debug never show key material.
        assert!(!format!("{r:?}").contains("0101"));
        let e = KeyRing::parse(&K1[..40], p).unwrap_err().to_string();
        assert!(!e.contains(&K1[..40]), "{e}");
    }

    #[test]
    fn shared_keys_swap_for_new_connections_only() {
        let shared = SharedKeys::new(ring(&[K1]));
        let before = shared.current();
        shared.replace(ring(&[K2, K1]));
        assert_eq!(
            before.len(),
            1,
            "a connection keeps the keys it started with"
        );
        assert_eq!(shared.current().len(), 2);
        assert_eq!(shared.current().own(), &ring(&[K2]).keys[0]);
    }

    #[test]
    fn sample_keys_are_fresh_and_long_enough() {
        let (a, b) = (sample_key(), sample_key());
        assert_ne!(a, b);
        assert_eq!(ring(&[&a]).len(), 1);
        assert_eq!(a.len(), 2 * MIN_KEY_BYTES);
    }

    #[test]
    fn proofs_need_an_accepted_key_and_do_not_reflect_or_replay() {
        let t = transcript();
        let (a, b, ab, ba) = (ring(&[K1]), ring(&[K2]), ring(&[K1, K2]), ring(&[K2, K1]));
        let p = t.client_proof(&a);
        assert!(t.check_client_proof(&a, &p).is_some());
        assert!(
            t.check_client_proof(&ab, &p).is_some(),
            "any listed key is accepted"
        );
        assert!(t.check_client_proof(&ba, &p).is_some());
        assert!(t.check_client_proof(&b, &p).is_none(), "wrong key");
        assert!(
            t.check_server_proof(&a, &p).is_none(),
            "a dialer proof is no listener proof"
        );
        let other = Transcript {
            nonce_s: [3; NONCE_BYTES],
            ..t
        };
        assert!(
            other.check_client_proof(&a, &p).is_none(),
            "replayed on another connection"
        );
        assert!(t.check_client_proof(&a, &p[..31]).is_none());
    }

    #[test]
    fn frames_are_bound_to_key_direction_and_sequence() {
        let t = transcript();
        let k = ring(&[K1]);
        let mut tx = t.dialer_frames(k.own());
        let mut rx = t.dialer_frames(k.own());
        let mut f1 = b"first".to_vec();
        let mut f2 = b"second".to_vec();
        tx.seal(&mut f1);
        tx.seal(&mut f2);
        // Reordered: the second frame first fails.
        assert_eq!(rx.clone().open(&f2), Err(BadTag));
        assert_eq!(rx.open(&f1), Ok(&b"first"[..]));
        // Replayed: the first frame again fails.
        assert_eq!(rx.clone().open(&f1), Err(BadTag));
        // Altered.
        let mut bad = f2.clone();
        bad[0] ^= 1;
        assert_eq!(rx.clone().open(&bad), Err(BadTag));
        assert_eq!(rx.open(&f2), Ok(&b"second"[..]));
        // The other direction's key does not open it.
        let mut f = b"x".to_vec();
        t.listener_frames(k.own()).seal(&mut f);
        assert_eq!(t.dialer_frames(k.own()).open(&f), Err(BadTag));
        // Too short to hold a tag.
        assert_eq!(t.dialer_frames(k.own()).open(b"short"), Err(BadTag));
        // No key: frames pass as they are.
        assert_eq!(FrameMac::none().open(b"plain"), Ok(&b"plain"[..]));
    }
}
