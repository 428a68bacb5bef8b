//! The Raft log and vote: openraft's [`RaftLogStorage`] over redb.
//!
//! Entries live in the `log` table keyed by their index, each encoded with postcard; the
//! vote, the committed log id and the last purged log id live in the `meta` table (see the
//! parent module for the whole layout). Each call is one redb transaction, committed before
//! it returns; an append tells openraft its entries are flushed only after the commit.
//! Calls come one at a time from the Raft core (`&mut self`), which keeps writes in order;
//! replication tasks read through clones of the same store, each read in its own redb read
//! transaction, which sees a consistent log while a write goes on.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, StorageError, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable};

use super::{
    blocking, decode, encode, StoreError, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOG, META,
};
use crate::types::{Entry, LogId, RaftId, TypeConfig, Vote};

/// The Raft log and vote of one node. Cloning gives another handle on the same database
/// (openraft's log readers are such clones).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    pub(super) fn new(db: Arc<Database>) -> Self {
        LogStore { db }
    }

    async fn read_meta<T>(&self, key: &'static str) -> Result<Option<T>, StoreError>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        blocking(&self.db, move |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(META)?;
            let value = table.get(key)?;
            value.map(|v| decode(key, v.value())).transpose()
        })
        .await
    }

    /// Sets `key` to `value`, or removes it for `None`.
    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        let encoded = value.map(|v| encode(key, v)).transpose()?;
        blocking(&self.db, move |db| {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(META)?;
                match &encoded {
                    Some(bytes) => table.insert(key, bytes.as_slice())?,
                    None => table.remove(key)?,
                };
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

/// `[start, end)` of a range of log indexes; `end` is `None` for an unbounded range.
fn index_bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => i.checked_add(1),
        Bound::Excluded(i) => Some(*i),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<RaftId>> {
        let (start, end) = index_bounds(&range);
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        blocking(&self.db, move |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(LOG)?;
            let rows = match end {
                Some(end) => table.range(start..end)?,
                None => table.range(start..)?,
            };
            rows.map(|row| {
                let (_, value) = row?;
                decode("log entry", value.value())
            })
            .collect()
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<RaftId>> {
        blocking(&self.db, |db| {
            let tx = db.begin_read()?;
            let last_purged: Option<LogId> = match tx.open_table(META)?.get(KEY_LAST_PURGED)? {
                Some(v) => Some(decode("last purged log id", v.value())?),
                None => None,
            };
            let last = match tx.open_table(LOG)?.last()? {
                Some((_, v)) => Some(decode::<Entry>("log entry", v.value())?.log_id),
                None => None,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last.or(last_purged),
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError<RaftId>> {
        self.write_meta(KEY_VOTE, Some(vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError<RaftId>> {
        self.read_meta(KEY_VOTE)
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId>,
    ) -> Result<(), StorageError<RaftId>> {
        self.write_meta(KEY_COMMITTED, committed.as_ref())
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<RaftId>> {
        self.read_meta(KEY_COMMITTED)
            .await
            .map_err(|e| StorageIOError::read(&e).into())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode("log entry", &e)?)))
            .collect::<Result<Vec<_>, StoreError>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        blocking(&self.db, move |db| {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(LOG)?;
                for (index, bytes) in &rows {
                    table.insert(index, bytes.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<RaftId>> {
        tracing::debug!(since = %log_id, "truncating the Raft log");
        blocking(&self.db, move |db| {
            let tx = db.begin_write()?;
            tx.open_table(LOG)?
                .retain_in(log_id.index.., |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<RaftId>> {
        tracing::debug!(upto = %log_id, "purging the Raft log");
        let encoded =
            encode("last purged log id", &log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        blocking(&self.db, move |db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?
                .insert(KEY_LAST_PURGED, encoded.as_slice())?;
            tx.open_table(LOG)?
                .retain_in(..=log_id.index, |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use super::index_bounds;

    #[test]
    fn index_bounds_are_half_open() {
        assert_eq!(index_bounds(&(3..7)), (3, Some(7)));
        assert_eq!(index_bounds(&(3..=7)), (3, Some(8)));
        assert_eq!(index_bounds(&(..)), (0, None));
        assert_eq!(index_bounds(&(5..)), (5, None));
        assert_eq!(index_bounds(&(..=u64::MAX)), (0, None));
    }
}
