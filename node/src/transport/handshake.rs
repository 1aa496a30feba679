//! The peer handshake: both sides prove they know the cluster secret without sending it, and
//! name who they are, before anything else on the connection is decoded.
//!
//! Every message has a fixed layout read byte by byte (nothing goes through postcard or
//! protobuf until the handshake succeeds):
//!
//! 1. dialer → listener, `HELLO_BYTES`: magic `ONEIDP05`, cluster id (16), the dialer's node
//!    id (8), the node id it means to reach (8), its state format (4), an [`About`] of the
//!    dialer (33), a fresh nonce (32);
//! 2. listener → dialer, `CHALLENGE_BYTES`: magic, the listener's nonce (32), an [`About`] of
//!    the listener (33), and HMAC-SHA256(secret, "listener" ‖ hello ‖ nonce ‖ about): proof
//!    it knows the secret;
//! 3. dialer → listener, `PROOF_BYTES`: HMAC-SHA256(secret, "dialer" ‖ hello ‖ the listener's
//!    nonce ‖ the listener's about).
//!
//! Fresh nonces on both sides make every proof good for one connection only. A listener
//! refuses (and says why, for its log and metrics) a hello of another cluster, another state
//! format, an unknown node, a node that is not the one it is, a wrong proof, and a node whose
//! identity is not the one it knows for that id (its data directory was replaced: a wiped
//! disk must never vote as the replica it was). The listener's answer still names the identity
//! it knows for the dialer, so a node started on an empty directory learns why it is refused.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The peer protocol's name and version: a node refuses a peer that speaks another (version 3
/// added request deadlines and `Busy` answers, so a release that changes it is upgraded by
/// stopping every node first; version 6 added unbind follow-ups to what proposals answer).
const MAGIC: &[u8; 8] = b"ONEIDP06";
pub const ABOUT_BYTES: usize = 16 + 1 + 16;
pub const HELLO_BYTES: usize = 8 + 16 + 8 + 8 + 4 + ABOUT_BYTES + 32;
pub const CHALLENGE_BYTES: usize = 8 + 32 + ABOUT_BYTES + 32;
pub const PROOF_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// A node's random identity, recorded in its data directory at first start.
pub type Identity = [u8; 16];

/// An identity as operators see it, 32 hex digits.
pub fn hex(identity: &Identity) -> String {
    format!("{:032x}", u128::from_be_bytes(*identity))
}

/// What one side says of itself, and of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct About {
    /// Its identity.
    pub identity: Identity,
    /// Whether it holds an initialized cluster (it created its replicas).
    pub initialized: bool,
    /// The identity it knows for the other side, if it knows one.
    pub knows_you: Option<Identity>,
}

/// What a node on an empty data directory may do, from what its peers answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// Every peer answered, each empty too or knowing this node's identity: create replicas.
    Create,
    /// These peers have not answered yet.
    Wait(Vec<u64>),
    /// A peer holds an initialized cluster and does not know this node by its identity (the
    /// message says which, and what to do).
    Refused(String),
}

/// Whether a node on an empty data directory, of identity `identity`, may create its
/// replicas, given each peer's answer (`answers`, by node id) and the peers listed. Any
/// initialized peer that does not know this identity means this directory is not the one the
/// cluster knows (a wiped or replaced disk): creating replicas would let it vote as a
/// replica whose log it lost.
pub fn may_join(
    identity: Identity,
    answers: &std::collections::BTreeMap<u64, About>,
    peers: impl Iterator<Item = u64>,
) -> Join {
    for (peer, about) in answers {
        if about.initialized && about.knows_you != Some(identity) {
            let how = match about.knows_you {
                Some(known) => format!("knows this node by another identity ({})", hex(&known)),
                None => "does not know this node".to_string(),
            };
            return Join::Refused(format!(
                "this node's data directory is empty (identity {}), but node {peer} holds an initialized cluster and {how}: this is not the data directory the cluster knows for this node (a wiped or replaced disk?). Starting on it would let a node that lost its log vote as the replica it was, so it does not start. Restore this node's data directory, or (once membership changes exist) remove the node from the cluster and add it back",
                hex(&identity)
            ));
        }
    }
    let missing: Vec<u64> = peers.filter(|p| !answers.contains_key(p)).collect();
    if missing.is_empty() {
        Join::Create
    } else {
        Join::Wait(missing)
    }
}

impl About {
    fn encode_into(&self, out: &mut [u8]) {
        out[..16].copy_from_slice(&self.identity);
        out[16] = u8::from(self.initialized);
        out[17..33].copy_from_slice(&self.knows_you.unwrap_or_default());
    }

    fn decode(bytes: &[u8]) -> Result<About, Refusal> {
        let known: Identity = bytes[17..33].try_into().expect("16");
        Ok(About {
            identity: bytes[..16].try_into().expect("16"),
            initialized: match bytes[16] {
                0 => false,
                1 => true,
                _ => return Err(Refusal::Magic),
            },
            knows_you: (known != Identity::default()).then_some(known),
        })
    }
}

/// Who is on each end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub cluster: [u8; 16],
    pub from: u64,
    pub to: u64,
    pub state_format: u32,
    pub about: About,
    pub nonce: [u8; 32],
}

/// Why a handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a OneID peer, or one of a release with another peer protocol (bad magic)")]
    Magic,
    #[error("another cluster")]
    Cluster,
    #[error("another state format")]
    Format,
    #[error("an unknown node")]
    UnknownNode,
    #[error("meant for another node")]
    WrongNode,
    #[error("a wrong proof of the secret")]
    Proof,
    #[error(
        "another identity than the one known for its node id (its data directory was replaced)"
    )]
    Identity,
}

impl Refusal {
    /// The metric label of this refusal.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Magic => "magic",
            Refusal::Cluster => "cluster",
            Refusal::Format => "format",
            Refusal::UnknownNode => "unknown_node",
            Refusal::WrongNode => "wrong_node",
            Refusal::Proof => "proof",
            Refusal::Identity => "identity",
        }
    }
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..8].copy_from_slice(MAGIC);
        out[8..24].copy_from_slice(&self.cluster);
        out[24..32].copy_from_slice(&self.from.to_be_bytes());
        out[32..40].copy_from_slice(&self.to.to_be_bytes());
        out[40..44].copy_from_slice(&self.state_format.to_be_bytes());
        self.about.encode_into(&mut out[44..44 + ABOUT_BYTES]);
        out[44 + ABOUT_BYTES..].copy_from_slice(&self.nonce);
        out
    }

    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, Refusal> {
        if &bytes[..8] != MAGIC {
            return Err(Refusal::Magic);
        }
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
        Ok(Hello {
            cluster: bytes[8..24].try_into().expect("16"),
            from: u64_at(24),
            to: u64_at(32),
            state_format: u32::from_be_bytes(bytes[40..44].try_into().expect("4")),
            about: About::decode(&bytes[44..44 + ABOUT_BYTES])?,
            nonce: bytes[44 + ABOUT_BYTES..].try_into().expect("32"),
        })
    }

    /// What the listener checks of a hello before it answers it.
    pub fn check(
        &self,
        cluster: &[u8; 16],
        me: u64,
        state_format: u32,
        known: impl Fn(u64) -> bool,
    ) -> Result<(), Refusal> {
        if &self.cluster != cluster {
            return Err(Refusal::Cluster);
        }
        if self.state_format != state_format {
            return Err(Refusal::Format);
        }
        if self.from == me || !known(self.from) {
            return Err(Refusal::UnknownNode);
        }
        if self.to != me {
            return Err(Refusal::WrongNode);
        }
        Ok(())
    }
}

/// A proof that whoever made it knows `secret`, bound to `role`, the hello, the other side's
/// nonce and what the listener said of itself.
pub fn proof(
    secret: &[u8],
    role: &str,
    hello: &[u8; HELLO_BYTES],
    nonce: &[u8; 32],
    about: &About,
) -> [u8; 32] {
    mac(secret, role, hello, nonce, about)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a proof in constant time.
pub fn verify(
    secret: &[u8],
    role: &str,
    hello: &[u8; HELLO_BYTES],
    nonce: &[u8; 32],
    about: &About,
    claimed: &[u8; 32],
) -> Result<(), Refusal> {
    mac(secret, role, hello, nonce, about)
        .verify_slice(claimed)
        .map_err(|_| Refusal::Proof)
}

fn mac(secret: &[u8], role: &str, hello: &[u8], nonce: &[u8], about: &About) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any size");
    let mut about_bytes = [0u8; ABOUT_BYTES];
    about.encode_into(&mut about_bytes);
    mac.update(role.as_bytes());
    mac.update(hello);
    mac.update(nonce);
    mac.update(&about_bytes);
    mac
}

/// The listener's answer: magic, its nonce, what it says of itself, its proof.
pub fn challenge(nonce: &[u8; 32], about: &About, proof: &[u8; 32]) -> [u8; CHALLENGE_BYTES] {
    let mut out = [0u8; CHALLENGE_BYTES];
    out[..8].copy_from_slice(MAGIC);
    out[8..40].copy_from_slice(nonce);
    about.encode_into(&mut out[40..40 + ABOUT_BYTES]);
    out[40 + ABOUT_BYTES..].copy_from_slice(proof);
    out
}

/// The nonce, the listener's about and its proof of a challenge.
pub fn read_challenge(
    bytes: &[u8; CHALLENGE_BYTES],
) -> Result<([u8; 32], About, [u8; 32]), Refusal> {
    if &bytes[..8] != MAGIC {
        return Err(Refusal::Magic);
    }
    Ok((
        bytes[8..40].try_into().expect("32"),
        About::decode(&bytes[40..40 + ABOUT_BYTES])?,
        bytes[40 + ABOUT_BYTES..].try_into().expect("32"),
    ))
}

/// The cluster id of the record (32 hex digits) as the handshake carries it.
pub fn cluster_bytes(id: &str) -> [u8; 16] {
    u128::from_str_radix(id, 16)
        .expect("cluster ids are 32 hex digits")
        .to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            cluster: [7; 16],
            from: 2,
            to: 1,
            state_format: 5,
            about: ABOUT,
            nonce: [9; 32],
        }
    }

    const ABOUT: About = About {
        identity: [3; 16],
        initialized: true,
        knows_you: None,
    };

    #[test]
    fn a_hello_round_trips_and_is_checked_field_by_field() {
        let h = hello();
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut bytes = h.encode();
        bytes[0] = b'X';
        assert_eq!(Hello::decode(&bytes), Err(Refusal::Magic));
        let known = |id| id == 2 || id == 3;
        assert_eq!(h.check(&[7; 16], 1, 5, known), Ok(()));
        assert_eq!(h.check(&[8; 16], 1, 5, known), Err(Refusal::Cluster));
        assert_eq!(h.check(&[7; 16], 1, 4, known), Err(Refusal::Format));
        assert_eq!(h.check(&[7; 16], 3, 5, known), Err(Refusal::WrongNode));
        assert_eq!(
            h.check(&[7; 16], 1, 5, |id| id == 3),
            Err(Refusal::UnknownNode)
        );
    }

    #[test]
    fn proofs_need_the_secret_the_role_and_the_nonce() {
        let hello = hello().encode();
        let secret = b"a secret of sixteen bytes";
        let p = proof(secret, "dialer", &hello, &[1; 32], &ABOUT);
        assert_eq!(
            verify(secret, "dialer", &hello, &[1; 32], &ABOUT, &p),
            Ok(())
        );
        assert_eq!(
            verify(b"another secret!!", "dialer", &hello, &[1; 32], &ABOUT, &p),
            Err(Refusal::Proof)
        );
        assert_eq!(
            verify(secret, "listener", &hello, &[1; 32], &ABOUT, &p),
            Err(Refusal::Proof)
        );
        assert_eq!(
            verify(secret, "dialer", &hello, &[2; 32], &ABOUT, &p),
            Err(Refusal::Proof)
        );
        let other = About {
            knows_you: Some([4; 16]),
            ..ABOUT
        };
        assert_eq!(
            verify(secret, "dialer", &hello, &[1; 32], &other, &p),
            Err(Refusal::Proof)
        );
    }

    #[test]
    fn a_challenge_round_trips() {
        let about = About {
            identity: [5; 16],
            initialized: false,
            knows_you: Some([6; 16]),
        };
        let bytes = challenge(&[1; 32], &about, &[2; 32]);
        assert_eq!(read_challenge(&bytes), Ok(([1; 32], about, [2; 32])));
        let mut hello = hello();
        hello.about = about;
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
    }
}
