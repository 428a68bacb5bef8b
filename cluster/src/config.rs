//! The one configuration of a node's cluster layer: who it is, where it listens, how it
//! finds the cluster, how fast it detects failures, how many nodes vote, and how its
//! links batch and reconnect.
//!
//! The binary builds a [`ClusterConfig`] from its validated settings; tests and embedders
//! start from [`ClusterConfig::new`] and change what they need. [`Cluster::start`] hands
//! it to [`Transport::start`], which checks the link settings
//! ([`ClusterConfig::validate_links`]) before binding.
//!
//! The link settings are flat fields beside the others (`max_frame`, `flush_bytes`,
//! `linger`, `reconnect_min`, `reconnect_max`, `handshake_timeout`,
//! `max_pending_handshakes`), as the binary's
//! `[cluster]` section lists the ones it exposes, so one struct literal maps one to the
//! other; the others take the `DEFAULT_*` constants.
//!
//! [`Cluster::start`]: crate::Cluster::start
//! [`Transport::start`]: crate::transport::Transport::start

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use opmesh_actors::OpType;

use crate::formation::SeedBootstrap;
use crate::secret::Secret;

/// Everything a node needs to take part in a cluster. Its `Debug` never shows the secret.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name (`--node-id`).
    pub node: String,
    /// Connections from another cluster are refused.
    pub cluster_id: String,
    /// The shared secret both ends of a link prove they hold; this node dials with it.
    pub secret: Secret,
    /// The secret the cluster is rotating away from: also accepted from a dialer, and
    /// dialed with when a peer refuses `secret` (see the README's rotation procedure).
    pub previous_secret: Option<Secret>,
    /// Where the cluster port listens; port 0 takes any free port.
    pub listen: SocketAddr,
    /// The address other nodes dial; empty = the bound listen address.
    pub advertise: String,
    /// This node's HTTP api, as other nodes and users should reach it.
    pub http_addr: String,
    /// Seed cluster addresses; empty = bootstrap a cluster of one when there is no state.
    pub join: Vec<String>,
    /// With seeds and no state: only join them (the default), or bootstrap a new cluster
    /// when none of them belongs to one (see [`crate::formation`]).
    pub bootstrap: SeedBootstrap,
    /// Raft log, vote and snapshots; `None` = in memory.
    pub data_dir: Option<PathBuf>,
    /// The operation types this node serves.
    pub serves: Vec<OpType>,
    /// How often each node pings every other.
    pub heartbeat: Duration,
    /// Silence after which the leader marks a node down.
    pub down_after: Duration,
    /// How long a write waits for its commit before failing.
    pub write_timeout: Duration,
    /// The most bytes of replies kept per peer until it acknowledges them
    /// (`cluster.reply_buffer_bytes`); past it the oldest are dropped and counted.
    pub reply_buffer_bytes: usize,
    /// Back-pressure: a queue of this node's over `flow_high` of its capacity makes its
    /// type overloaded, told to the other nodes in heartbeats, until the queue is under
    /// `flow_low` (`flow.high`, `flow.low`; fractions, `0 <= low < high <= 1`).
    pub flow_high: f64,
    pub flow_low: f64,
    /// How long each step of a leave's hand-off (marking this node leaving; its removal
    /// from the registry and the Raft group) may take before the node gives up on it and
    /// exits anyway (`cluster.leave_timeout_ms`): a leave never waits for a quorum
    /// without a deadline.
    pub leave_timeout: Duration,
    /// How many committed changes the audit trail keeps (`cluster.audit_entries`).
    pub audit_entries: usize,
    /// Raft's shortest election timeout; the longest is twice it.
    pub election_timeout: Duration,
    /// How many nodes vote in Raft; the others are learners.
    pub voters: Voters,
    /// A link writer writes once this much is encoded, without waiting for more.
    /// Default 64 KiB; 1..=[`MAX_FLUSH_BYTES`](Self::MAX_FLUSH_BYTES).
    pub flush_bytes: usize,
    /// Zero (the default): a link writer writes as soon as it runs. More: it waits this
    /// long after the first message to coalesce more into the same write.
    pub linger: Duration,
    /// The largest frame body sent or accepted. Default 16 MiB; at most
    /// [`MAX_MAX_FRAME`](Self::MAX_MAX_FRAME).
    pub max_frame: usize,
    /// Backoff between connection attempts to a peer: from `reconnect_min` (default
    /// 50 ms), doubling, up to `reconnect_max` (default 1 s), with jitter.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The most bytes of operations and replies a link's outbox holds unsent
    /// (`cluster.link_buffer_bytes`, estimated by [`Message::size_hint`]); `send`
    /// refuses more with [`SendError::Full`]. Its fill against `flow_high`/`flow_low`
    /// marks the link congested (see [`crate::flow`]). Default 64 MiB.
    ///
    /// [`Message::size_hint`]: crate::codec::Message::size_hint
    /// [`SendError::Full`]: crate::transport::SendError::Full
    pub link_buffer_bytes: usize,
    /// Bound on connecting plus the whole handshake, both ways. Default 2 s.
    pub handshake_timeout: Duration,
    /// Inbound connections that may be in the handshake at once (not proven yet); more
    /// are refused at once. Default 64; 1..=[`MAX_PENDING_HANDSHAKES`](Self::MAX_PENDING_HANDSHAKES).
    pub max_pending_handshakes: usize,
    /// Runtimes the links run on, so that what a link delivers is handled on that thread:
    /// the binary passes its api's workers, where the shards run. Lane `i` of each peer
    /// (its writer here, the reader of the peer's lane `i`) runs on runtime `i`; with one
    /// lane, a peer's links run on one runtime chosen by its name. Empty (the default):
    /// the runtime that starts the transport.
    pub link_runtimes: Vec<tokio::runtime::Handle>,
    /// How many connections this node opens to each peer (`cluster.lanes`), each with
    /// its own outbox and writer: one peer's traffic then spreads over as many threads.
    /// 0 (the default): one per link runtime, or 1 without any. At most
    /// [`MAX_LANES`](Self::MAX_LANES). `link_buffer_bytes` is shared evenly among them.
    pub lanes: usize,
}

impl ClusterConfig {
    pub const DEFAULT_FLUSH_BYTES: usize = 64 * 1024;
    pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
    pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(50);
    pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(1);
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 64;
    /// A record on a link holds what one write coalesced: less than `flush_bytes`, then
    /// one more frame. A reader accepts records of one frame and this much more, so
    /// `flush_bytes` may not exceed it.
    pub const MAX_FLUSH_BYTES: usize = 16 * 1024 * 1024;
    /// Keeps a record (one frame, `MAX_FLUSH_BYTES` more and its tag) within its `u32`
    /// length prefix.
    pub const MAX_MAX_FRAME: usize = 2 * 1024 * 1024 * 1024 - 1;
    pub const MAX_PENDING_HANDSHAKES: usize = 65_536;
    pub const MAX_LANES: usize = 256;
    /// The range of `link_buffer_bytes`: 64 KiB to 4095 MiB.
    pub const MIN_LINK_BUFFER: usize = 64 * 1024;
    pub const MAX_LINK_BUFFER: usize = 4095 * 1024 * 1024;

    /// Defaults for tests and embedders: loopback, port 0, in memory, three voters.
    pub fn new(node: &str, secret: impl Into<Secret>) -> Self {
        ClusterConfig {
            node: node.to_owned(),
            cluster_id: "opmesh".into(),
            secret: secret.into(),
            previous_secret: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: String::new(),
            http_addr: String::new(),
            join: Vec::new(),
            bootstrap: SeedBootstrap::Never,
            data_dir: None,
            serves: Vec::new(),
            heartbeat: Duration::from_millis(100),
            down_after: Duration::from_millis(1000),
            write_timeout: Duration::from_secs(3),
            reply_buffer_bytes: 64 << 20,
            link_buffer_bytes: 64 << 20,
            flow_high: 0.8,
            flow_low: 0.2,
            leave_timeout: Duration::from_secs(5),
            audit_entries: crate::store::DEFAULT_AUDIT_ENTRIES,
            election_timeout: Duration::from_millis(200),
            voters: Voters::Three,
            flush_bytes: Self::DEFAULT_FLUSH_BYTES,
            linger: Duration::ZERO,
            max_frame: Self::DEFAULT_MAX_FRAME,
            reconnect_min: Self::DEFAULT_RECONNECT_MIN,
            reconnect_max: Self::DEFAULT_RECONNECT_MAX,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: Self::DEFAULT_MAX_PENDING_HANDSHAKES,
            link_runtimes: Vec::new(),
            lanes: 0,
        }
    }

    /// The connections to open to each peer: `lanes`, or one per link runtime when it is
    /// 0 (1 without any).
    pub fn lane_count(&self) -> usize {
        match self.lanes {
            0 => self.link_runtimes.len().clamp(1, Self::MAX_LANES),
            n => n.min(Self::MAX_LANES),
        }
    }

    /// The secrets a dialer's proof is checked against: the current one, then the
    /// previous one when set.
    pub fn accepted_secrets(&self) -> impl Iterator<Item = &Secret> {
        std::iter::once(&self.secret).chain(self.previous_secret.as_ref())
    }

    /// Checks the link settings; the first one out of its range is named.
    pub fn validate_links(&self) -> Result<(), LinkConfigError> {
        if self.max_frame == 0 || self.max_frame > Self::MAX_MAX_FRAME {
            return Err(LinkConfigError::MaxFrame(self.max_frame));
        }
        if self.flush_bytes == 0 || self.flush_bytes > Self::MAX_FLUSH_BYTES {
            return Err(LinkConfigError::FlushBytes(self.flush_bytes));
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return Err(LinkConfigError::Reconnect {
                min: self.reconnect_min,
                max: self.reconnect_max,
            });
        }
        if self.handshake_timeout.is_zero() {
            return Err(LinkConfigError::HandshakeTimeout);
        }
        if !(Self::MIN_LINK_BUFFER..=Self::MAX_LINK_BUFFER).contains(&self.link_buffer_bytes) {
            return Err(LinkConfigError::LinkBuffer(self.link_buffer_bytes));
        }
        if self.max_pending_handshakes == 0
            || self.max_pending_handshakes > Self::MAX_PENDING_HANDSHAKES
        {
            return Err(LinkConfigError::MaxPendingHandshakes(
                self.max_pending_handshakes,
            ));
        }
        if self.lanes > Self::MAX_LANES {
            return Err(LinkConfigError::Lanes(self.lanes));
        }
        Ok(())
    }
}

/// A link setting out of its range. The message names the field and the allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkConfigError {
    #[error("max_frame must be 1..={max} bytes, got {0}", max = ClusterConfig::MAX_MAX_FRAME)]
    MaxFrame(usize),
    #[error("flush_bytes must be 1..={max} bytes, got {0}", max = ClusterConfig::MAX_FLUSH_BYTES)]
    FlushBytes(usize),
    #[error("reconnect_min must be above zero and at most reconnect_max ({max:?}), got {min:?}")]
    Reconnect { min: Duration, max: Duration },
    #[error("handshake_timeout must be above zero")]
    HandshakeTimeout,
    #[error(
        "link_buffer_bytes must be {min}..={max} bytes, got {0}",
        min = ClusterConfig::MIN_LINK_BUFFER,
        max = ClusterConfig::MAX_LINK_BUFFER
    )]
    LinkBuffer(usize),
    #[error(
        "max_pending_handshakes must be 1..={max}, got {0}",
        max = ClusterConfig::MAX_PENDING_HANDSHAKES
    )]
    MaxPendingHandshakes(usize),
    #[error("lanes must be 0 (one per link runtime) ..={max}, got {0}", max = ClusterConfig::MAX_LANES)]
    Lanes(usize),
}

/// How many nodes vote in Raft: one, three or five (an odd number, so a majority is
/// always well defined; more would slow every commit for no safety a user needs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Voters {
    One,
    #[default]
    Three,
    Five,
}

impl Voters {
    pub const fn get(self) -> usize {
        match self {
            Voters::One => 1,
            Voters::Three => 3,
            Voters::Five => 5,
        }
    }
}

/// A voter count other than 1, 3 or 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("voters must be 1, 3 or 5, got {0}")]
pub struct VotersError(pub usize);

impl TryFrom<usize> for Voters {
    type Error = VotersError;

    fn try_from(n: usize) -> Result<Self, Self::Error> {
        match n {
            1 => Ok(Voters::One),
            3 => Ok(Voters::Three),
            5 => Ok(Voters::Five),
            n => Err(VotersError(n)),
        }
    }
}

impl From<Voters> for usize {
    fn from(v: Voters) -> usize {
        v.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voters_are_one_three_or_five() {
        for v in [Voters::One, Voters::Three, Voters::Five] {
            assert_eq!(Voters::try_from(v.get()), Ok(v));
        }
        for n in [0, 2, 4, 6, 7] {
            let e = Voters::try_from(n).unwrap_err();
            assert_eq!(e.to_string(), format!("voters must be 1, 3 or 5, got {n}"));
        }
    }

    #[test]
    fn an_invalid_link_setting_is_named() {
        let mut c = ClusterConfig::new("a", b"s");
        assert_eq!(c.validate_links(), Ok(()));
        c.max_frame = u32::MAX as usize + 1;
        assert!(c
            .validate_links()
            .unwrap_err()
            .to_string()
            .contains("max_frame"));
        let mut c = ClusterConfig::new("a", b"s");
        c.reconnect_min = Duration::from_secs(3);
        let e = c.validate_links().unwrap_err();
        assert!(e.to_string().contains("reconnect_min"), "{e}");
        let mut c = ClusterConfig::new("a", b"s");
        c.flush_bytes = 0;
        assert_eq!(c.validate_links(), Err(LinkConfigError::FlushBytes(0)));
        c.flush_bytes = ClusterConfig::MAX_FLUSH_BYTES + 1;
        assert!(c
            .validate_links()
            .unwrap_err()
            .to_string()
            .contains("flush_bytes must be 1..=16777216"));
        let mut c = ClusterConfig::new("a", b"s");
        c.max_pending_handshakes = 0;
        assert_eq!(
            c.validate_links(),
            Err(LinkConfigError::MaxPendingHandshakes(0))
        );
        let mut c = ClusterConfig::new("a", b"s");
        c.handshake_timeout = Duration::ZERO;
        assert_eq!(c.validate_links(), Err(LinkConfigError::HandshakeTimeout));
        let mut c = ClusterConfig::new("a", b"s");
        c.lanes = ClusterConfig::MAX_LANES + 1;
        let e = c.validate_links().unwrap_err();
        assert!(e.to_string().contains("lanes must be 0"), "{e}");
    }

    #[test]
    fn lanes_default_to_one_per_link_runtime() {
        let mut c = ClusterConfig::new("a", b"s");
        assert_eq!(c.lane_count(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        c.link_runtimes = vec![rt.handle().clone(); 3];
        assert_eq!(c.lane_count(), 3);
        c.lanes = 2;
        assert_eq!(c.lane_count(), 2);
    }

    #[test]
    fn debug_never_shows_the_secrets() {
        let mut c = ClusterConfig::new("a", b"the cluster secret");
        c.previous_secret = Some(Secret::from("the old secret"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("the cluster secret"), "{shown}");
        assert!(!shown.contains("the old secret"), "{shown}");
        assert!(
            shown.contains("previous_secret: Some(\"<redacted>\")"),
            "{shown}"
        );
    }

    #[test]
    fn the_previous_secret_is_accepted_after_the_current_one() {
        let mut c = ClusterConfig::new("a", b"new");
        let only: Vec<_> = c.accepted_secrets().map(Secret::expose).collect();
        assert_eq!(only, [b"new"]);
        c.previous_secret = Some(Secret::from("old"));
        let both: Vec<_> = c.accepted_secrets().map(Secret::expose).collect();
        assert_eq!(both, [&b"new"[..], b"old"]);
    }
}
