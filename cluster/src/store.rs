//! The Raft log, vote and snapshots in redb, and the state machine that applies commands.
//!
//! One implementation serves both modes: with a data dir, the file `<dir>/raft.redb`; without
//! one, redb's in-memory backend (a node that forgets everything when it stops). [`Store::open`]
//! gives the two halves openraft drives: the [`LogStore`] (log, vote, committed and purged log
//! ids) and the [`StateMachineStore`] (the [`ClusterState`] readers route by, and its snapshots).
//! Both halves share one redb database.
//!
//! # Layout in redb
//!
//! | table      | key             | value                                                |
//! |------------|-----------------|------------------------------------------------------|
//! | `log`      | index (`u64`)   | the [`Entry`](crate::types::Entry), postcard         |
//! | `meta`     | `"format"`      | the layout version (`u32`, postcard), see [`FORMAT`] |
//! | `meta`     | `"vote"`        | the [`Vote`](crate::types::Vote), postcard           |
//! | `meta`     | `"committed"`   | the last committed log id, postcard; absent if none  |
//! | `meta`     | `"last_purged"` | the last purged log id, postcard; absent if none     |
//! | `snapshot` | `"meta"`        | the [`SnapshotMeta`], postcard                       |
//! | `snapshot` | `"data"`        | the snapshot's [`ClusterState`], JSON                |
//!
//! Snapshot data is JSON because it travels to other nodes, which may run another version:
//! JSON tolerates a field added with a default, postcard does not. The two snapshot keys are
//! written in one transaction, so they always belong together.
//!
//! # Durability
//!
//! Every write is one redb transaction, committed (fsync'd on disk) before the call returns
//! or, for an append, before openraft is told the entries are flushed. The state machine is
//! not written on apply: after a restart it comes back from the stored snapshot, and openraft
//! re-applies the committed entries after it (the committed log id is saved for that). redb's
//! blocking calls run on tokio's blocking pool, so an fsync never stalls the Raft core's
//! runtime threads; only [`Store::open`] blocks in place, once, at startup.

mod log;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::backends::InMemoryBackend;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use self::log::LogStore;
pub use self::state::{
    apply_command, apply_request, routing_table, SnapshotBuilder, StateMachineStore,
};
use crate::types::{ClusterState, SnapshotMeta};

/// The name of the redb file inside the data dir.
pub const DATA_FILE: &str = "raft.redb";

/// The layout version this build writes and reads. A file of another version is refused at
/// open rather than misread. Version 2: log entries carry who asked for a change and when
/// (the audit trail).
pub const FORMAT: u32 = 2;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "meta";
const KEY_SNAPSHOT_DATA: &str = "data";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the store could not be opened or could not read or write its data.
///
/// Every variant is fatal for the node: at open it cannot start, and inside openraft the error
/// becomes a `StorageError`, on which openraft stops the Raft node rather than go on with a
/// store it cannot trust.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data dir `{}`: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// redb failed: I/O, a corrupt file, or the file is already open (another node process
    /// uses the same data dir).
    #[error("redb: {0}")]
    Db(#[from] redb::Error),
    #[error("cannot encode the {what}: {source}")]
    Encode {
        what: &'static str,
        source: BoxError,
    },
    #[error("cannot decode the stored {what}: {source}")]
    Decode {
        what: &'static str,
        source: BoxError,
    },
    /// The data was written by a build with another layout.
    #[error("the Raft data has layout version {found}; this build reads version {expected}")]
    Format { found: u32, expected: u32 },
    /// A blocking storage task panicked or was cancelled.
    #[error("a storage task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        })*
    };
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub use opmesh_actors::routing::DEFAULT_AUDIT_ENTRIES;

/// Opens the Raft storage of a node.
pub struct Store;

impl Store {
    /// Opens `<data_dir>/raft.redb` (creating the dir and the file if needed), or an empty
    /// in-memory database without a data dir, and returns its two halves. With a data dir
    /// the state machine starts from the stored snapshot: its applied log id, membership and
    /// state; openraft re-applies the committed entries after it.
    ///
    /// Blocks (file I/O); call it once, at startup. Fails with
    /// [`StoreError::Db`] if the file is already open (another process, or another open in
    /// this one).
    pub fn open(data_dir: Option<&Path>) -> Result<(LogStore, StateMachineStore), StoreError> {
        let db = match data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
                Database::create(dir.join(DATA_FILE))?
            }
            None => Database::builder().create_with_backend(InMemoryBackend::new())?,
        };
        init(&db)?;
        let restored = match load_snapshot(&db)? {
            Some((meta, data)) => Some((meta, decode_state(&data)?)),
            None => None,
        };
        let db = Arc::new(db);
        Ok((
            LogStore::new(Arc::clone(&db)),
            StateMachineStore::new(db, restored, DEFAULT_AUDIT_ENTRIES),
        ))
    }
}

/// Creates the tables of a new database and checks the layout version of an existing one.
fn init(db: &Database) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        tx.open_table(LOG)?;
        tx.open_table(SNAPSHOT)?;
        let mut meta = tx.open_table(META)?;
        let found = match meta.get(KEY_FORMAT)? {
            Some(v) => Some(decode::<u32>("layout version", v.value())?),
            None => None,
        };
        match found {
            Some(found) if found != FORMAT => {
                return Err(StoreError::Format {
                    found,
                    expected: FORMAT,
                })
            }
            Some(_) => {}
            None => {
                meta.insert(KEY_FORMAT, encode("layout version", &FORMAT)?.as_slice())?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Runs redb's blocking work on tokio's blocking pool.
async fn blocking<T, F>(db: &Arc<Database>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
{
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || f(&db)).await?
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| StoreError::Encode {
        what,
        source: e.into(),
    })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Decode {
        what,
        source: e.into(),
    })
}

fn encode_state(state: &ClusterState) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(state).map_err(|e| StoreError::Encode {
        what: "snapshot data",
        source: e.into(),
    })
}

fn decode_state(bytes: &[u8]) -> Result<ClusterState, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        what: "snapshot data",
        source: e.into(),
    })
}

/// The stored snapshot, if any: its meta and its data.
fn load_snapshot(db: &Database) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StoreError> {
    let tx = db.begin_read()?;
    let table = tx.open_table(SNAPSHOT)?;
    let (Some(meta), Some(data)) = (table.get(KEY_SNAPSHOT_META)?, table.get(KEY_SNAPSHOT_DATA)?)
    else {
        return Ok(None);
    };
    let meta = decode("snapshot meta", meta.value())?;
    Ok(Some((meta, data.value().to_vec())))
}

/// Stores a snapshot in place of the current one, unless the current one covers more of the
/// log (a snapshot built from an older view that finished after a newer one was installed).
/// Returns whether it was stored.
fn save_snapshot(db: &Database, meta: &SnapshotMeta, data: &[u8]) -> Result<bool, StoreError> {
    let encoded = encode("snapshot meta", meta)?;
    let tx = db.begin_write()?;
    {
        let mut table = tx.open_table(SNAPSHOT)?;
        let current: Option<SnapshotMeta> = match table.get(KEY_SNAPSHOT_META)? {
            Some(v) => Some(decode("snapshot meta", v.value())?),
            None => None,
        };
        if current.is_some_and(|c| c.last_log_id > meta.last_log_id) {
            return Ok(false);
        }
        table.insert(KEY_SNAPSHOT_META, encoded.as_slice())?;
        table.insert(KEY_SNAPSHOT_DATA, data)?;
    }
    tx.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::storage::{
        RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
    };
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{CommittedLeaderId, EntryPayload, Membership, StorageError, StorageIOError};
    use opmesh_actors::{Route, Strategy};
    use tempfile::TempDir;

    use super::*;
    use crate::types::{
        raft_id, Command, Entry, LogId, Member, NodeRecord, NodeStatus, RaftId, Request,
        StoredMembership, TypeConfig, Vote,
    };

    struct InMemory;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore> for InMemory {
        async fn build(&self) -> Result<((), LogStore, StateMachineStore), StorageError<RaftId>> {
            let (log, sm) = Store::open(None).map_err(|e| StorageIOError::write(&e))?;
            Ok(((), log, sm))
        }
    }

    struct OnDisk;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for OnDisk {
        async fn build(
            &self,
        ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<RaftId>> {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let (log, sm) = Store::open(Some(dir.path())).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn conformance_in_memory() {
        Suite::test_all(InMemory).expect("the in-memory store passes openraft's suite");
    }

    #[test]
    fn conformance_on_disk() {
        Suite::test_all(OnDisk).expect("the on-disk store passes openraft's suite");
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload,
        }
    }

    fn command(term: u64, index: u64, cmd: Command) -> Entry {
        entry(
            term,
            index,
            EntryPayload::Normal(Request::new(cmd, "node:a")),
        )
    }

    fn membership(voters: &[RaftId]) -> Membership<RaftId, Member> {
        let nodes: BTreeMap<RaftId, Member> = voters
            .iter()
            .map(|id| {
                let member = Member {
                    name: format!("n{id}"),
                    cluster_addr: format!("127.0.0.1:{}", 7000 + id),
                    http_addr: format!("127.0.0.1:{}", 8000 + id),
                };
                (*id, member)
            })
            .collect();
        Membership::new(vec![voters.iter().copied().collect::<BTreeSet<_>>()], nodes)
    }

    fn joined(name: &str) -> Command {
        Command::NodeJoined(NodeRecord {
            name: name.into(),
            raft_id: raft_id(name),
            cluster_addr: format!("{name}:7000"),
            http_addr: format!("{name}:8000"),
            serves: vec!["resize".into()],
            status: NodeStatus::Down,
        })
    }

    /// Every payload kind and every piece of metadata survives postcard, which has no
    /// self-description to fall back on.
    #[test]
    fn openraft_types_round_trip_through_postcard() {
        let entries = [
            entry(1, 1, EntryPayload::Blank),
            entry(1, 2, EntryPayload::Membership(membership(&[1, 2, 3]))),
            command(1, 3, joined("a")),
            command(
                2,
                4,
                Command::SetRoute {
                    op_type: "resize".into(),
                    route: Route {
                        strategy: Strategy::Pinned,
                        nodes: vec!["a".into()],
                    },
                },
            ),
            command(
                2,
                5,
                Command::SetStatus {
                    name: "a".into(),
                    status: NodeStatus::Leaving,
                },
            ),
            command(2, 6, Command::NodeLeft { name: "a".into() }),
            command(
                2,
                7,
                Command::RemoveRoute {
                    op_type: "resize".into(),
                },
            ),
        ];
        for e in &entries {
            let back: Entry = decode("entry", &encode("entry", e).unwrap()).unwrap();
            assert_eq!(&back, e);
        }
        let mut vote = Vote::new(3, 2);
        vote.commit();
        let back: Vote = decode("vote", &encode("vote", &vote).unwrap()).unwrap();
        assert_eq!(back, vote);
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(2, 7)),
            last_membership: StoredMembership::new(Some(log_id(1, 2)), membership(&[1, 2])),
            snapshot_id: "x".into(),
        };
        let back: SnapshotMeta = decode("meta", &encode("meta", &meta).unwrap()).unwrap();
        assert_eq!(back, meta);
    }

    /// A node with a data dir comes back with its vote, its log (purged part gone), its
    /// committed log id and its last snapshot; re-applying the committed entries after the
    /// snapshot gives the state it had.
    #[tokio::test]
    async fn a_restarted_node_keeps_vote_log_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new(3, 1);
        let first = vec![
            entry(1, 1, EntryPayload::Membership(membership(&[1]))),
            command(1, 2, joined("a")),
            command(
                1,
                3,
                Command::SetRoute {
                    op_type: "resize".into(),
                    route: Route {
                        strategy: Strategy::RoundRobin,
                        nodes: vec!["a".into()],
                    },
                },
            ),
        ];
        let later = vec![
            command(2, 4, joined("b")),
            command(
                2,
                5,
                Command::SetStatus {
                    name: "a".into(),
                    status: NodeStatus::Down,
                },
            ),
        ];

        let (snapshot_meta, at_snapshot, before_stop) = {
            let (mut log, mut sm) = Store::open(Some(dir.path())).unwrap();
            log.save_vote(&vote).await.unwrap();
            log.blocking_append(first.clone()).await.unwrap();
            sm.apply(first.clone()).await.unwrap();
            let snapshot = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            let at_snapshot = ClusterState::clone(&sm.state().load());
            log.purge(log_id(1, 1)).await.unwrap();
            log.blocking_append(later.clone()).await.unwrap();
            sm.apply(later.clone()).await.unwrap();
            log.save_committed(Some(log_id(2, 5))).await.unwrap();
            let before_stop = ClusterState::clone(&sm.state().load());
            (snapshot.meta, at_snapshot, before_stop)
        };
        assert_eq!(before_stop.version, 4);

        let (mut log, mut sm) = Store::open(Some(dir.path())).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 5)));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(state.last_log_id, Some(log_id(2, 5)));
        let stored = log.try_get_log_entries(0..100).await.unwrap();
        let expected: Vec<Entry> = first[1..].iter().chain(&later).cloned().collect();
        assert_eq!(stored, expected);

        let (applied, members) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 3)));
        assert_eq!(members, snapshot_meta.last_membership);
        assert_eq!(**sm.state().load(), at_snapshot);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snapshot_meta);

        sm.apply(later).await.unwrap();
        assert_eq!(**sm.state().load(), before_stop);
    }

    #[tokio::test]
    async fn truncate_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, _sm) = Store::open(Some(dir.path())).unwrap();
            let entries: Vec<Entry> = (1..=5).map(|i| entry(1, i, EntryPayload::Blank)).collect();
            log.blocking_append(entries).await.unwrap();
            log.truncate(log_id(1, 3)).await.unwrap();
        }
        let (mut log, _sm) = Store::open(Some(dir.path())).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 2)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap().len(), 2);
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(Some(dir.path())).unwrap();
        assert!(matches!(
            Store::open(Some(dir.path())),
            Err(StoreError::Db(_))
        ));
    }

    #[test]
    fn a_file_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(Some(dir.path())).unwrap());
        {
            let db = Database::create(dir.path().join(DATA_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(KEY_FORMAT, encode("v", &(FORMAT + 1)).unwrap().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        match Store::open(Some(dir.path())) {
            Err(StoreError::Format { found, expected }) => {
                assert_eq!((found, expected), (FORMAT + 1, FORMAT));
            }
            Err(e) => panic!("expected a format error, got {e}"),
            Ok(_) => panic!("expected a format error, the store opened"),
        }
    }
}
