//! Property tests (proptest, a bounded number of cases per `cargo test`) of what a hostile
//! peer controls: the frame decoder and the listening side of the handshake. Each property
//! holds for every generated input: no panic, no hang, and nothing accepted that should not be.

use proptest::prelude::*;

use super::codec::{
    decode_payload, encode_frame, read_frame, Frame, FrameError, Request, Response,
};
use super::handshake::{server_hello, Refused};
use super::test_peers as peers;
use crate::cluster::auth::{FrameMac, KeyRing, Transcript, NONCE_BYTES};

/// Cases per property: enough to find shallow bugs in `cargo test`, cheap enough to run there.
const CASES: u32 = 64;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn keys() -> KeyRing {
    KeyRing::parse(&"ab".repeat(32), std::path::Path::new("k")).expect("keys")
}

/// Some valid frames to mutate: the decoder must survive near-misses, not only noise.
fn valid_frames() -> Vec<Vec<u8>> {
    let reqs = [
        Request::Hello {
            magic: "kube-vip-raft".into(),
            version: 2,
            from: 1,
            to: 2,
            nonce: Some("00".repeat(NONCE_BYTES)),
        },
        Request::Auth {
            proof: "11".repeat(32),
        },
        Request::Handover { from: 1 },
        Request::PreVote {
            last_log_index: Some(u64::MAX),
        },
        Request::Members(crate::cluster::membership::Change::Add {
            id: "server4".into(),
            address: "10.0.0.4:10000".parse().unwrap(),
        }),
        Request::Members(crate::cluster::membership::Change::Remove {
            id: "server1".into(),
        }),
    ];
    reqs.into_iter()
        .map(|body| encode_frame(&Frame { id: 7, body }, &mut FrameMac::none()).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Any byte stream: the reader returns frames, a clean end or an error, never panics, and
    /// never allocates for a length prefix over the limit.
    #[test]
    fn reader_survives_any_stream(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        rt().block_on(async {
            let mut r = &bytes[..];
            for _ in 0..8 {
                match read_frame::<_, Frame<Request>>(&mut r, &mut FrameMac::none()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        });
    }

    /// Valid frames with bytes flipped, cut or appended decode or fail cleanly.
    #[test]
    fn decoder_survives_mutated_frames(which in 0usize..4, at in any::<prop::sample::Index>(),
                                       byte in any::<u8>(), cut in any::<bool>()) {
        let mut f = valid_frames().swap_remove(which);
        let i = at.index(f.len());
        if cut { f.truncate(i) } else { f[i] = byte }
        let _ = decode_payload::<Frame<Request>>(&f[4.min(f.len())..], &mut FrameMac::none());
        let _ = decode_payload::<Frame<Response>>(&f[4.min(f.len())..], &mut FrameMac::none());
    }

    /// A keyed frame with any single byte changed, or any cut, fails its tag.
    #[test]
    fn tagged_frames_refuse_any_change(payload in proptest::collection::vec(any::<u8>(), 0..256),
                                       at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let t = Transcript { nonce_c: [1; NONCE_BYTES], nonce_s: [2; NONCE_BYTES], from: 1, to: 2 };
        let k = keys();
        let mut sealed = payload.clone();
        t.dialer_frames(k.own()).seal(&mut sealed);
        let mut changed = sealed.clone();
        let i = at.index(changed.len());
        changed[i] ^= flip;
        prop_assert!(t.dialer_frames(k.own()).open(&changed).is_err());
        prop_assert!(t.dialer_frames(k.own()).open(&sealed[..i]).is_err());
        prop_assert_eq!(t.dialer_frames(k.own()).open(&sealed).ok(), Some(&payload[..]));
    }

    /// The listening side of the handshake, fed any bytes (alone or after a valid keyed
    /// Hello), refuses without panicking or hanging, and never accepts without a proof.
    #[test]
    fn handshake_refuses_garbage(prefix in any::<bool>(),
                                 junk in proptest::collection::vec(any::<u8>(), 0..256)) {
        let result = rt().block_on(async {
            let mut input = if prefix { valid_frames().swap_remove(0) } else { Vec::new() };
            input.extend_from_slice(&junk);
            let mut rd = &input[..];
            let mut wr = Vec::new();
            let k = keys();
            server_hello(&mut rd, &mut wr, "127.0.0.1:9".parse().unwrap(), 2, &peers(), Some(&k)).await
        });
        prop_assert!(result.is_err());
        if let Err(Refused::Answered(r) | Refused::Auth(r) | Refused::Silent(r)) = &result {
            prop_assert!(r.len() < 600, "log text not bounded: {} bytes", r.len());
        }
    }
}

#[test]
fn frame_error_texts_are_bounded() {
    // The refusal reasons the handshake logs come from FrameError texts, clipped at the source.
    let e = FrameError::Decode(super::codec::clip(&"x".repeat(1 << 20)));
    assert!(e.to_string().len() < 600);
}
