//! Peer connections over TCP.
//!
//! Each node dials every peer and sends only on the connection it dialed; it receives on the
//! connections its peers dialed. A dialed connection carries the frames of every shard,
//! batched per write, from one queue per peer bounded in bytes ([`PEER_QUEUE_BYTES_MAX`]);
//! while the peer is not connected nothing is queued for it, so a dead or slow peer never
//! grows memory: its messages are refused, and raft-rs is told it is unreachable. A lost
//! connection is dialed again with backoff ([`DIAL_BACKOFF_MAX`]).
//!
//! Every connection starts with the handshake (`handshake`); nothing on it is decoded before
//! it succeeds. After it, a frame over [`super::FRAME_BYTES_MAX`] or one that does not decode
//! cuts the connection off; so does a peer silent for [`PEER_SILENCE`] (peers ping every
//! [`PING_INTERVAL`]). Refusals are logged and counted, and never disturb the node.
//!
//! A peer's requests carried out here are bounded in number ([`PEER_REQUESTS_MAX`]) and in
//! bytes of their bodies ([`PEER_REQUEST_BYTES_MAX`]); past either, a request is answered
//! `Busy` unheard, and its caller answers its own caller "overloaded, retry". Each request
//! says how long its caller waits; the work is dropped when that time is up, answered or not.

use super::handshake::{
    self, hex, About, Hello, Identity, Refusal, CHALLENGE_BYTES, HELLO_BYTES, PROOF_BYTES,
};
use super::{Frame, FrameError, Lead, Transport, FRAME_BYTES_MAX};
use oneid_protocol::num::Millis;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

/// Most bytes of frames waiting for one peer's connection.
pub const PEER_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most requests of one peer carried out here at once.
pub const PEER_REQUESTS_MAX: usize = 512;
/// Most bytes of one peer's request bodies carried out here at once (any one frame fits).
pub const PEER_REQUEST_BYTES_MAX: usize = FRAME_BYTES_MAX;
/// The longest a request's work is kept, whatever its caller says it waits.
pub const REQUEST_WITHIN_MAX: Duration = Duration::from_secs(60);
/// Most bytes one write to a peer gathers from its queue.
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// The read buffer of an accepted connection (frames larger than it are read through it).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How often a node pings each peer.
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// A peer heard from within this long is up.
pub const UP_WINDOW: Duration = Duration::from_secs(2);
/// A connection silent this long (no frame, not even a ping) is closed.
pub const PEER_SILENCE: Duration = Duration::from_secs(10);
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before dialing a peer again, doubled up to [`DIAL_BACKOFF_MAX`].
const DIAL_BACKOFF: Duration = Duration::from_millis(100);
/// After a failed accept (out of descriptors, say), the pause before the next: a full
/// descriptor table must not spin the accept loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most connections accepted at once, handshaking or not (peers hold one each; the rest is
/// room for reconnects and for strangers, each of which has `HANDSHAKE_TIMEOUT`).
const ACCEPTED_MAX: usize = 64;

/// What a node does with what its peers send.
pub trait Inbound: Send + Sync + 'static {
    /// Raft messages of one shard from peer `from` (authenticated).
    fn raft(&self, from: u64, shard: u32, messages: Vec<Vec<u8>>);
    /// A request from `from`; answers its response body.
    /// A request from `from`, whose caller waits until `deadline`; answers its response body.
    fn request(
        &self,
        from: u64,
        body: Vec<u8>,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
    /// The shards this node leads, for its pings.
    fn leads(&self) -> Vec<Lead>;
    /// A ping from `from`, with the shards it leads and its wall clock.
    fn ping(&self, from: u64, leads: Vec<Lead>, wall: Millis);
}

/// Why a request to a peer got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("node {0} is not connected")]
    Unreachable(u64),
    #[error("node {0} did not answer in time")]
    Timeout(u64),
    #[error(
        "node {0} refused the request: this node has as many requests in flight there as it may"
    )]
    Busy(u64),
}

/// Where this node is and whom it talks to.
pub struct TcpConfig {
    pub me: u64,
    pub listen: SocketAddr,
    pub peers: Vec<(u64, SocketAddr)>,
    pub secret: Vec<u8>,
    pub cluster: [u8; 16],
    pub state_format: u32,
    /// This node's identity, and whether it holds an initialized cluster.
    pub identity: Identity,
    pub initialized: bool,
    /// The identities this node knows for its peers.
    pub known: BTreeMap<u64, Identity>,
    /// Records (durably) the identity of a peer seen for the first time.
    pub learn: Box<dyn Fn(u64, Identity) + Send + Sync>,
}

/// A frame on its way, holding its share of the peer's queue budget.
struct Outgoing {
    bytes: Vec<u8>,
    _budget: Budget,
}

/// A frame's share of its peer's queue budget, given back when the frame is written (or
/// dropped with its connection); then [`Quiet`] is told.
struct Budget {
    permit: Option<OwnedSemaphorePermit>,
    quiet: Arc<Quiet>,
}

impl Drop for Budget {
    fn drop(&mut self) {
        // The permit first: whoever is woken must find it returned.
        drop(self.permit.take());
        self.quiet.poke();
    }
}

/// Wakes [`Tcp::drain`] when the node may have gone quiet (a peer's request answered, a
/// queued frame written): only while it drains, so the hot path pays one atomic load.
#[derive(Default)]
struct Quiet {
    draining: AtomicBool,
    changed: Notify,
}

impl Quiet {
    fn poke(&self) {
        if self.draining.load(Ordering::SeqCst) {
            self.changed.notify_waiters();
        }
    }
}

/// Queues `bytes` for a peer within its budget; false if the budget (or the queue) is full.
fn enqueue(
    queue: &mpsc::UnboundedSender<Outgoing>,
    budget: &Arc<Semaphore>,
    quiet: &Arc<Quiet>,
    bytes: Vec<u8>,
) -> bool {
    let Ok(permit) = Arc::clone(budget).try_acquire_many_owned(bytes.len() as u32) else {
        return false;
    };
    let budget = Budget {
        permit: Some(permit),
        quiet: Arc::clone(quiet),
    };
    queue
        .send(Outgoing {
            bytes,
            _budget: budget,
        })
        .is_ok()
}

struct Peer {
    addr: SocketAddr,
    queue: mpsc::UnboundedSender<Outgoing>,
    budget: Arc<Semaphore>,
    /// Whether its dialed connection is up (frames are refused while it is not).
    connected: AtomicBool,
    /// Milliseconds after `Tcp::started` of the last frame from it (0: none yet).
    last_seen_ms: AtomicU64,
    frames_sent: AtomicU64,
    frames_dropped: AtomicU64,
    /// Its requests carried out here: their number, and the bytes of their bodies.
    requests: Arc<Semaphore>,
    request_bytes: Arc<Semaphore>,
    /// Its requests answered `Busy`, and those whose caller's time was up before the answer.
    requests_refused: AtomicU64,
    requests_expired: Arc<AtomicU64>,
}

/// A per-peer counter family: its name, its help, and the counter of a peer.
type PeerCounter = (&'static str, &'static str, fn(&Peer) -> &AtomicU64);

/// The per-peer counters `/metrics` shows.
const PEER_COUNTERS: [PeerCounter; 4] = [
    (
        "oneid_peer_frames_sent_total",
        "Frames written to the peer.",
        |peer| &peer.frames_sent,
    ),
    (
        "oneid_peer_frames_dropped_total",
        "Frames not sent: the peer was not connected, or its queue was full.",
        |peer| &peer.frames_dropped,
    ),
    (
        "oneid_peer_requests_refused_total",
        "The peer's requests answered busy: it had as many (or as many bytes) in flight here as allowed.",
        |peer| &peer.requests_refused,
    ),
    (
        "oneid_peer_requests_expired_total",
        "The peer's requests dropped here because their caller's time was up.",
        |peer| &peer.requests_expired,
    ),
];

/// A call waiting for its answer: the peer asked, and where the answer goes.
type Waiting = (u64, oneshot::Sender<Result<Vec<u8>, CallError>>);

/// The node's peer connections.
pub struct Tcp {
    me: u64,
    peers: BTreeMap<u64, Peer>,
    secret: Vec<u8>,
    cluster: [u8; 16],
    state_format: u32,
    started: Instant,
    /// Calls waiting for their answer, by id.
    calls: Mutex<BTreeMap<u64, Waiting>>,
    next_call: AtomicU64,
    /// Peers' requests being carried out here.
    serving: Arc<AtomicUsize>,
    /// Tells a drain that requests were answered or frames written.
    quiet: Arc<Quiet>,
    inbound: Arc<dyn Inbound>,
    identity: Identity,
    initialized: AtomicBool,
    known: Mutex<BTreeMap<u64, Identity>>,
    learn: Box<dyn Fn(u64, Identity) + Send + Sync>,
    /// What each peer said of itself when this node last dialed it.
    answers: Mutex<BTreeMap<u64, About>>,
    refused_handshakes: [AtomicU64; 7],
    refused_frames: [AtomicU64; 2],
}

const REFUSALS: [Refusal; 7] = [
    Refusal::Magic,
    Refusal::Cluster,
    Refusal::Format,
    Refusal::UnknownNode,
    Refusal::WrongNode,
    Refusal::Proof,
    Refusal::Identity,
];

impl Tcp {
    /// Binds the peer address and starts the connections. Runs on the current tokio runtime.
    pub async fn start(config: TcpConfig, inbound: Arc<dyn Inbound>) -> std::io::Result<Arc<Tcp>> {
        let listener = TcpListener::bind(config.listen).await?;
        let mut receivers = Vec::new();
        let peers = config
            .peers
            .iter()
            .map(|&(id, addr)| {
                let (queue, receiver) = mpsc::unbounded_channel();
                receivers.push((id, receiver));
                let peer = Peer {
                    addr,
                    queue,
                    budget: Arc::new(Semaphore::new(PEER_QUEUE_BYTES_MAX)),
                    connected: AtomicBool::new(false),
                    last_seen_ms: AtomicU64::new(0),
                    frames_sent: AtomicU64::new(0),
                    frames_dropped: AtomicU64::new(0),
                    requests: Arc::new(Semaphore::new(PEER_REQUESTS_MAX)),
                    request_bytes: Arc::new(Semaphore::new(PEER_REQUEST_BYTES_MAX)),
                    requests_refused: AtomicU64::new(0),
                    requests_expired: Arc::default(),
                };
                (id, peer)
            })
            .collect();
        let tcp = Arc::new(Tcp {
            me: config.me,
            peers,
            secret: config.secret,
            cluster: config.cluster,
            state_format: config.state_format,
            started: Instant::now(),
            calls: Mutex::new(BTreeMap::new()),
            serving: Arc::new(AtomicUsize::new(0)),
            quiet: Arc::default(),
            next_call: AtomicU64::new(1),
            inbound,
            identity: config.identity,
            initialized: AtomicBool::new(config.initialized),
            known: Mutex::new(config.known),
            learn: config.learn,
            answers: Mutex::new(BTreeMap::new()),
            refused_handshakes: Default::default(),
            refused_frames: Default::default(),
        });
        tokio::spawn(
            Arc::clone(&tcp)
                .accept(listener)
                .instrument(tracing::info_span!("peers", listen = %config.listen)),
        );
        for (id, receiver) in receivers {
            // Every line a connection to a peer logs names the peer.
            let span = tracing::info_span!("peer", peer = id, dialed = true);
            tokio::spawn(Arc::clone(&tcp).dial(id, receiver).instrument(span));
        }
        tokio::spawn(Arc::clone(&tcp).ping());
        Ok(tcp)
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether a frame from `node` arrived within [`UP_WINDOW`].
    pub fn up(&self, node: u64) -> bool {
        self.peers.get(&node).is_some_and(|peer| {
            let seen = peer.last_seen_ms.load(Ordering::Relaxed);
            seen > 0 && self.elapsed_ms().saturating_sub(seen) <= UP_WINDOW.as_millis() as u64
        })
    }

    /// Queues a frame for a connected peer; false if it cannot go now.
    fn send(&self, to: u64, frame: &Frame) -> bool {
        let Some(peer) = self.peers.get(&to) else {
            return false;
        };
        if !peer.connected.load(Ordering::Relaxed) {
            peer.frames_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut bytes = Vec::new();
        frame.encode_into(&mut bytes);
        if bytes.len() - 4 > FRAME_BYTES_MAX {
            // The peer would cut the connection off: dropped, and the replica told the peer
            // is unreachable (raft-rs then probes it with one bounded append at a time).
            tracing::error!(
                peer = to,
                bytes = bytes.len(),
                "a frame over the limit not sent"
            );
            peer.frames_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let sent = enqueue(&peer.queue, &peer.budget, &self.quiet, bytes);
        if !sent {
            peer.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Sends a request to `to` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        to: u64,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.calls
            .lock()
            .expect("calls lock")
            .insert(id, (to, reply));
        let within_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        if !self.send(
            to,
            &Frame::Request {
                id,
                body,
                within_ms,
            },
        ) {
            self.calls.lock().expect("calls lock").remove(&id);
            return Err(CallError::Unreachable(to));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => answer,
            // The connection it went out on was lost: the peer may be gone.
            Ok(Err(_)) => Err(CallError::Unreachable(to)),
            Err(_) => {
                self.calls.lock().expect("calls lock").remove(&id);
                Err(CallError::Timeout(to))
            }
        }
    }

    /// The connection to `to` was lost: its calls are answered `Unreachable` now (the caller
    /// may try elsewhere) rather than at their timeout.
    fn fail_calls(&self, to: u64) {
        self.calls
            .lock()
            .expect("calls lock")
            .retain(|_, (peer, _)| *peer != to);
    }

    /// Before the node stops: waits until the peers' requests being carried out here are
    /// answered and every answer has been written, at most `max`.
    pub async fn drain(&self, max: Duration) {
        let deadline = tokio::time::Instant::now() + max;
        let idle = || {
            self.serving.load(Ordering::SeqCst) == 0
                && self
                    .peers
                    .values()
                    .all(|p| p.budget.available_permits() == PEER_QUEUE_BYTES_MAX)
        };
        self.quiet.draining.store(true, Ordering::SeqCst);
        loop {
            // Registered before the check, so a change between the two still wakes it.
            let changed = self.quiet.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if idle() || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }

    /// Keeps a connection to peer `id`, sending what its queue holds.
    async fn dial(self: Arc<Self>, id: u64, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
        let peer = &self.peers[&id];
        let mut backoff = DIAL_BACKOFF;
        let mut failures = 0u32;
        loop {
            match self.connect(id, peer.addr).await {
                Ok(stream) => {
                    if failures > 0 {
                        tracing::info!(peer = id, "connected to peer");
                    }
                    failures = 0;
                    backoff = DIAL_BACKOFF;
                    peer.connected.store(true, Ordering::Relaxed);
                    let error = self.write_loop(peer, stream, &mut queue).await;
                    peer.connected.store(false, Ordering::Relaxed);
                    // What waited for the lost connection is stale by the next one.
                    while queue.try_recv().is_ok() {}
                    self.fail_calls(id);
                    tracing::warn!(peer = id, %error, "connection to peer lost");
                }
                Err(error) => {
                    // Said once, then every 30th try, while a peer stays unreachable.
                    if failures.is_multiple_of(30) {
                        tracing::warn!(peer = id, addr = %peer.addr, %error, "peer unreachable");
                    }
                    failures += 1;
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
        }
    }

    /// Dials and handshakes as the dialer.
    async fn connect(&self, id: u64, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let mut stream = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "dial timed out"))??;
        stream.set_nodelay(true)?;
        let hello = Hello {
            cluster: self.cluster,
            from: self.me,
            to: id,
            state_format: self.state_format,
            about: self.about(id),
            nonce: rand::random(),
        }
        .encode();
        let exchange = async {
            stream.write_all(&hello).await?;
            let mut challenge = [0u8; CHALLENGE_BYTES];
            stream.read_exact(&mut challenge).await?;
            let (nonce, theirs, listener_proof) = handshake::read_challenge(&challenge)
                .map_err(|r| std::io::Error::other(r.to_string()))?;
            handshake::verify(
                &self.secret,
                "listener",
                &hello,
                &nonce,
                &theirs,
                &listener_proof,
            )
            .map_err(|_| std::io::Error::other("the peer does not know the cluster secret"))?;
            if theirs.knows_you.is_some_and(|known| known != self.identity) {
                // What it says is kept (a node on an empty directory learns why it is refused).
                self.answers
                    .lock()
                    .expect("answers lock")
                    .insert(id, theirs);
                return Err(std::io::Error::other(
                    "the peer knows this node by another identity: this data directory is not the one the cluster knows",
                ));
            }
            self.check_identity(id, &theirs)
                .map_err(|r| std::io::Error::other(r.to_string()))?;
            let proof = handshake::proof(&self.secret, "dialer", &hello, &nonce, &theirs);
            stream.write_all(&proof).await?;
            // Kept once its identity is known here and recorded: a node that bootstraps on
            // these answers knows every peer's identity first.
            self.answers
                .lock()
                .expect("answers lock")
                .insert(id, theirs);
            std::io::Result::Ok(())
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")
            })??;
        Ok(stream)
    }

    /// Writes queued frames, several per write, until the connection fails.
    async fn write_loop(
        &self,
        peer: &Peer,
        mut stream: TcpStream,
        queue: &mut mpsc::UnboundedReceiver<Outgoing>,
    ) -> std::io::Error {
        let mut buffer = Vec::with_capacity(WRITE_BATCH_BYTES_MAX);
        loop {
            let Some(first) = queue.recv().await else {
                return std::io::Error::other("the node is stopping");
            };
            let mut frames = vec![first];
            let mut bytes = frames[0].bytes.len();
            while bytes < WRITE_BATCH_BYTES_MAX {
                match queue.try_recv() {
                    Ok(next) => {
                        bytes += next.bytes.len();
                        frames.push(next);
                    }
                    Err(_) => break,
                }
            }
            buffer.clear();
            for frame in &frames {
                buffer.extend_from_slice(&frame.bytes);
            }
            if let Err(error) = stream.write_all(&buffer).await {
                return error;
            }
            peer.frames_sent
                .fetch_add(frames.len() as u64, Ordering::Relaxed);
        }
    }

    async fn accept(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(ACCEPTED_MAX));
        loop {
            let slot = Arc::clone(&slots)
                .acquire_owned()
                .await
                .expect("never closed");
            let (stream, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a peer connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let tcp = Arc::clone(&self);
            let span = tracing::info_span!("peer", %addr, dialed = false);
            tokio::spawn(
                async move {
                    tcp.serve(stream, addr).await;
                    drop(slot);
                }
                .instrument(span),
            );
        }
    }

    /// Handshakes as the listener, then reads frames until the connection ends.
    async fn serve(&self, mut stream: TcpStream, addr: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let from = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.listen(&mut stream)).await {
            Ok(Ok(from)) => from,
            Ok(Err(Some(refusal))) => {
                let i = REFUSALS.iter().position(|r| *r == refusal).expect("listed");
                self.refused_handshakes[i].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%addr, reason = %refusal, "peer connection refused");
                return;
            }
            Ok(Err(None)) | Err(_) => {
                tracing::debug!(%addr, "peer connection closed during the handshake");
                return;
            }
        };
        let peer = &self.peers[&from];
        // Frames come batched per write: one read takes in many.
        let mut stream = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        loop {
            let frame = match self.read_frame(&mut stream).await {
                Ok(frame) => frame,
                Err(Some(error)) => {
                    let i = usize::from(matches!(error, FrameError::Malformed));
                    self.refused_frames[i].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = from, %error, "peer connection cut off");
                    return;
                }
                Err(None) => return,
            };
            peer.last_seen_ms
                .store(self.elapsed_ms().max(1), Ordering::Relaxed);
            self.dispatch(from, frame);
        }
    }

    /// The listener's side of the handshake: the peer's node id, or why it was refused
    /// (`None`: the connection ended or timed out).
    async fn listen(&self, stream: &mut TcpStream) -> Result<u64, Option<Refusal>> {
        let mut hello = [0u8; HELLO_BYTES];
        stream.read_exact(&mut hello).await.map_err(|_| None)?;
        let decoded = Hello::decode(&hello).map_err(Some)?;
        decoded
            .check(&self.cluster, self.me, self.state_format, |id| {
                self.peers.contains_key(&id)
            })
            .map_err(Some)?;
        let nonce: [u8; 32] = rand::random();
        let about = self.about(decoded.from);
        let proof = handshake::proof(&self.secret, "listener", &hello, &nonce, &about);
        stream
            .write_all(&handshake::challenge(&nonce, &about, &proof))
            .await
            .map_err(|_| None)?;
        let mut claimed = [0u8; PROOF_BYTES];
        stream.read_exact(&mut claimed).await.map_err(|_| None)?;
        handshake::verify(&self.secret, "dialer", &hello, &nonce, &about, &claimed)
            .map_err(Some)?;
        self.check_identity(decoded.from, &decoded.about)
            .map_err(Some)?;
        Ok(decoded.from)
    }

    /// What this node says of itself to `peer`.
    fn about(&self, peer: u64) -> About {
        About {
            identity: self.identity,
            initialized: self.initialized.load(Ordering::SeqCst),
            knows_you: self.known.lock().expect("known lock").get(&peer).copied(),
        }
    }

    /// A proven peer's identity, as it says of itself in `about`. Refused if it is not the one
    /// known for its id, unless this node holds no cluster yet (nothing depends on a peer's
    /// identity before the bootstrap: a peer that restarted on a new directory meanwhile is
    /// known by its new one). One not known is recorded, except by a node that holds a
    /// cluster from a peer that holds none (a wiped node on its way out must not take the
    /// place of the directory the cluster knows).
    fn check_identity(&self, peer: u64, about: &About) -> Result<(), Refusal> {
        let identity = about.identity;
        let initialized = self.initialized.load(Ordering::SeqCst);
        let known = self.known.lock().expect("known lock").get(&peer).copied();
        match known {
            Some(known) if known == identity => return Ok(()),
            Some(known) if initialized => {
                tracing::error!(peer, presented = %hex(&identity), known = %hex(&known),
                    "a peer presents another identity than the one this node knows for it: its data directory was replaced; refused");
                return Err(Refusal::Identity);
            }
            None if initialized && !about.initialized => {
                tracing::warn!(peer, presented = %hex(&identity),
                    "a peer this node holds no identity for starts on an empty directory while this node holds the cluster; refused");
                return Err(Refusal::Identity);
            }
            _ => {}
        }
        // Recorded durably before anything is told of it.
        (self.learn)(peer, identity);
        self.known
            .lock()
            .expect("known lock")
            .insert(peer, identity);
        tracing::info!(peer, identity = %hex(&identity), "a peer's identity recorded");
        Ok(())
    }

    /// This node holds an initialized cluster from now on (it created its replicas).
    pub fn set_initialized(&self) {
        self.initialized.store(true, Ordering::SeqCst);
    }

    /// The node ids of the peers.
    pub fn peer_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.peers.keys().copied()
    }

    /// What each peer said of itself when this node last dialed it.
    pub fn answers(&self) -> BTreeMap<u64, About> {
        self.answers.lock().expect("answers lock").clone()
    }

    /// The next frame; `Err(None)` when the connection ended or went silent.
    async fn read_frame(
        &self,
        stream: &mut (impl AsyncRead + Unpin),
    ) -> Result<Frame, Option<FrameError>> {
        let mut prefix = [0u8; 4];
        tokio::time::timeout(PEER_SILENCE, stream.read_exact(&mut prefix))
            .await
            .map_err(|_| None)?
            .map_err(|_| None)?;
        let length = Frame::length(prefix).map_err(Some)?;
        let mut body = vec![0u8; length];
        tokio::time::timeout(PEER_SILENCE, stream.read_exact(&mut body))
            .await
            .map_err(|_| None)?
            .map_err(|_| None)?;
        Frame::decode(&body).map_err(Some)
    }

    fn dispatch(&self, from: u64, frame: Frame) {
        match frame {
            Frame::Raft { shard, messages } => self.inbound.raft(from, shard, messages),
            Frame::Ping { leads, wall } => self.inbound.ping(from, leads, wall),
            Frame::Request {
                id,
                body,
                within_ms,
            } => self.serve_request(from, id, body, within_ms),
            Frame::Response { id, body } => self.answered(id, Ok(body)),
            Frame::Busy { id } => self.answered(id, Err(CallError::Busy(from))),
        }
    }

    /// Carries out a peer's request within the peer's limits (else answers `Busy` at once),
    /// and drops it when its caller's time is up.
    fn serve_request(&self, from: u64, id: u64, body: Vec<u8>, within_ms: u32) {
        let peer = &self.peers[&from];
        let held = u32::try_from(body.len())
            .ok()
            .and_then(|bytes| {
                Arc::clone(&peer.request_bytes)
                    .try_acquire_many_owned(bytes)
                    .ok()
            })
            .zip(Arc::clone(&peer.requests).try_acquire_owned().ok());
        let Some(held) = held else {
            peer.requests_refused.fetch_add(1, Ordering::Relaxed);
            self.send(from, &Frame::Busy { id });
            return;
        };
        let within = Duration::from_millis(u64::from(within_ms)).min(REQUEST_WITHIN_MAX);
        let deadline = Instant::now() + within;
        let answer = self.inbound.request(from, body, deadline);
        let peers = self.peer_sender(from);
        self.serving.fetch_add(1, Ordering::SeqCst);
        let (serving, quiet) = (Arc::clone(&self.serving), Arc::clone(&self.quiet));
        let expired = Arc::clone(&peer.requests_expired);
        tokio::spawn(async move {
            match tokio::time::timeout_at(deadline.into(), answer).await {
                Ok(body) => {
                    if let Some(send) = peers {
                        send(Frame::Response { id, body });
                    }
                }
                // Its caller gave up: the work is dropped, and nothing is sent.
                Err(_) => {
                    expired.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(held);
            serving.fetch_sub(1, Ordering::SeqCst);
            quiet.poke();
        });
    }

    /// A call's answer (or refusal) arrived.
    fn answered(&self, id: u64, answer: Result<Vec<u8>, CallError>) {
        if let Some((_, reply)) = self.calls.lock().expect("calls lock").remove(&id) {
            let _ = reply.send(answer);
        }
    }

    /// A function that queues a frame for `to` (for answers sent from other tasks).
    fn peer_sender(&self, to: u64) -> Option<Box<dyn Fn(Frame) + Send>> {
        let peer = self.peers.get(&to)?;
        let (queue, budget) = (peer.queue.clone(), Arc::clone(&peer.budget));
        let quiet = Arc::clone(&self.quiet);
        Some(Box::new(move |frame: Frame| {
            let mut bytes = Vec::new();
            frame.encode_into(&mut bytes);
            // A full budget drops the answer: its caller times out and asks another replica.
            enqueue(&queue, &budget, &quiet, bytes);
        }))
    }

    async fn ping(self: Arc<Self>) {
        let mut interval = tokio::time::interval(PING_INTERVAL);
        loop {
            interval.tick().await;
            let leads = self.inbound.leads();
            for &id in self.peers.keys() {
                self.send(
                    id,
                    &Frame::Ping {
                        leads: leads.clone(),
                        wall: crate::clock::wall_now(),
                    },
                );
            }
        }
    }

    /// Prometheus text for the peers: up, frames sent and dropped per peer, refusals.
    pub fn render_metrics(&self, out: &mut String) {
        crate::metrics::family(
            out,
            "oneid_peer_up",
            "gauge",
            "1 if a frame from the peer arrived within 2 s.",
        );
        for &id in self.peers.keys() {
            let _ = writeln!(
                out,
                "oneid_peer_up{{peer=\"{id}\"}} {}",
                u8::from(self.up(id))
            );
        }
        for (name, help, counter) in PEER_COUNTERS {
            crate::metrics::family(out, name, "counter", help);
            for (id, peer) in &self.peers {
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{id}\"}} {}",
                    counter(peer).load(Ordering::Relaxed)
                );
            }
        }
        crate::metrics::family(
            out,
            "oneid_peer_handshakes_refused_total",
            "counter",
            "Peer connections refused during the handshake, by reason.",
        );
        for (refusal, count) in REFUSALS.iter().zip(&self.refused_handshakes) {
            let _ = writeln!(
                out,
                "oneid_peer_handshakes_refused_total{{reason=\"{}\"}} {}",
                refusal.label(),
                count.load(Ordering::Relaxed)
            );
        }
        crate::metrics::family(
            out,
            "oneid_peer_frames_refused_total",
            "counter",
            "Peer connections cut off for a bad frame, by reason.",
        );
        let kinds = [FrameError::Oversized(0), FrameError::Malformed];
        for (kind, count) in kinds.iter().zip(&self.refused_frames) {
            let _ = writeln!(
                out,
                "oneid_peer_frames_refused_total{{reason=\"{}\"}} {}",
                kind.label(),
                count.load(Ordering::Relaxed)
            );
        }
    }
}

impl Transport for Tcp {
    fn send_raft(&self, to: u64, shard: u32, messages: Vec<Vec<u8>>) -> bool {
        self.send(to, &Frame::Raft { shard, messages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a request of `b"echo"` with its body at once; holds any other unanswered.
    struct Holding;

    impl Inbound for Holding {
        fn raft(&self, _: u64, _: u32, _: Vec<Vec<u8>>) {}

        fn request(
            &self,
            _: u64,
            body: Vec<u8>,
            _: Instant,
        ) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
            Box::pin(async move {
                if body != b"echo" {
                    std::future::pending::<()>().await;
                }
                body
            })
        }

        fn leads(&self) -> Vec<Lead> {
            Vec::new()
        }

        fn ping(&self, _: u64, _: Vec<Lead>, _: Millis) {}
    }

    fn free_addr() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.local_addr().expect("an address")
    }

    /// Two connected nodes, 1 and 2.
    async fn pair() -> (Arc<Tcp>, Arc<Tcp>) {
        let addrs = [free_addr(), free_addr()];
        let start = |me: u64| {
            let peer = 3 - me;
            let config = TcpConfig {
                me,
                listen: addrs[me as usize - 1],
                peers: vec![(peer, addrs[peer as usize - 1])],
                secret: b"a secret of sixteen bytes".to_vec(),
                cluster: [7; 16],
                state_format: 1,
                identity: [me as u8; 16],
                initialized: true,
                known: BTreeMap::from([(peer, [peer as u8; 16])]),
                learn: Box::new(|_, _| {}),
            };
            Tcp::start(config, Arc::new(Holding))
        };
        let (one, two) = (
            start(1).await.expect("starts"),
            start(2).await.expect("starts"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(one.up(2) && two.up(1)) {
            assert!(Instant::now() < deadline, "the nodes never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (one, two)
    }

    #[tokio::test]
    async fn a_peers_requests_are_bounded_in_number_and_dropped_when_their_caller_gives_up() {
        let (one, two) = pair().await;
        let within = Duration::from_secs(2);
        let held: Vec<_> = (0..PEER_REQUESTS_MAX)
            .map(|_| {
                let one = Arc::clone(&one);
                tokio::spawn(async move { one.call(2, b"hold".to_vec(), within).await })
            })
            .collect();
        let serving = Instant::now() + Duration::from_secs(5);
        while two.serving.load(Ordering::SeqCst) < PEER_REQUESTS_MAX {
            assert!(Instant::now() < serving, "the held requests never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One more is refused at once, unheard: the caller need not wait out its time.
        let asked = Instant::now();
        let refused = one.call(2, b"echo".to_vec(), within).await;
        assert_eq!(refused, Err(CallError::Busy(2)));
        assert!(asked.elapsed() < within);
        assert_eq!(two.peers[&1].requests_refused.load(Ordering::Relaxed), 1);
        for call in held {
            assert_eq!(call.await.expect("joins"), Err(CallError::Timeout(2)));
        }
        // Their callers gave up: the work is dropped there, and the peer may ask again.
        let dropped = Instant::now() + Duration::from_secs(5);
        while two.serving.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < dropped,
                "the held requests were never dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let expired = two.peers[&1].requests_expired.load(Ordering::Relaxed);
        assert_eq!(expired, PEER_REQUESTS_MAX as u64);
        assert_eq!(
            one.call(2, b"echo".to_vec(), within).await,
            Ok(b"echo".to_vec())
        );
    }

    #[tokio::test]
    async fn a_peers_requests_are_bounded_in_bytes() {
        let (one, two) = pair().await;
        let within = Duration::from_secs(60);
        let big = vec![1u8; PEER_REQUEST_BYTES_MAX / 2 + 1];
        let first = {
            let (one, big) = (Arc::clone(&one), big.clone());
            tokio::spawn(async move { one.call(2, big, within).await })
        };
        // Generous: a frame this large crosses loopback slowly in a debug build on a loaded
        // machine.
        let serving = Instant::now() + Duration::from_secs(60);
        while two.serving.load(Ordering::SeqCst) < 1 {
            assert!(Instant::now() < serving, "the first request never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(one.call(2, big, within).await, Err(CallError::Busy(2)));
        // Small ones still fit beside it.
        assert_eq!(
            one.call(2, b"echo".to_vec(), within).await,
            Ok(b"echo".to_vec())
        );
        first.abort();
    }
}
