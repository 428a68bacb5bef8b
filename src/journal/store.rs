//! The journal's file: `<data dir>/journal.redb`, one redb database of its own (the Raft
//! store keeps `raft.redb` beside it; the two never share a transaction).
//!
//! | table     | key                      | value                                   |
//! |-----------|--------------------------|-----------------------------------------|
//! | `entries` | operation id (`u128`)    | an [`Entry`](super::entry::Entry), encoded |
//! | `meta`    | `"format"`               | the layout version (`u32`), see [`FORMAT`] |
//!
//! [`JournalStore::commit`] writes a group of appends and removals in one transaction,
//! durable (fsync'd) before it returns. Every call blocks; the journal's writer thread
//! makes them.

use std::path::{Path, PathBuf};

use opmesh_actors::OpId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::JournalError;

/// The journal's file name inside the data dir.
pub const FILE: &str = "journal.redb";

/// The layout version this build writes and reads; a file of another is refused at
/// open rather than misread.
pub const FORMAT: u32 = 1;

const ENTRIES: TableDefinition<u128, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
const KEY_FORMAT: &str = "format";

/// The open journal file.
pub struct JournalStore {
    db: Database,
    path: PathBuf,
    /// Makes every commit fail while set: how the tests see a disk that refuses writes.
    #[cfg(test)]
    pub(super) fail_writes: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl JournalStore {
    /// Opens (or creates) the journal at `path`, creating its directory if needed, and
    /// checks its layout version. A file that is not a redb database, a damaged one, one
    /// of another layout, or one another process holds open is refused, naming the file.
    pub fn open(path: &Path) -> Result<JournalStore, JournalError> {
        let fail = |e: &dyn std::fmt::Display| JournalError::Open {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let db = Database::create(path).map_err(|e| fail(&e))?;
        let store = JournalStore {
            db,
            path: path.to_owned(),
            #[cfg(test)]
            fail_writes: Default::default(),
        };
        store.init().map_err(|e| match e {
            e @ JournalError::Format { .. } => e,
            other => fail(&other),
        })?;
        Ok(store)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn init(&self) -> Result<(), JournalError> {
        let tx = self.db.begin_write().map_err(write_error)?;
        {
            tx.open_table(ENTRIES).map_err(write_error)?;
            let mut meta = tx.open_table(META).map_err(write_error)?;
            let found = meta
                .get(KEY_FORMAT)
                .map_err(write_error)?
                .map(|v| v.value());
            match found {
                Some(found) if found != FORMAT => {
                    return Err(JournalError::Format {
                        path: self.path.clone(),
                        found,
                        expected: FORMAT,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert(KEY_FORMAT, FORMAT).map_err(write_error)?;
                }
            }
        }
        tx.commit().map_err(write_error)
    }

    /// Adds `appends` and deletes `removes` in one transaction, fsync'd before this
    /// returns. Returns how many of `removes` were there.
    pub fn commit(
        &self,
        appends: &[(OpId, Vec<u8>)],
        removes: &[OpId],
    ) -> Result<u64, JournalError> {
        #[cfg(test)]
        if self.fail_writes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(JournalError::Write(
                "injected failure: no space left on device".into(),
            ));
        }
        let tx = self.db.begin_write().map_err(write_error)?;
        let mut removed = 0;
        {
            let mut table = tx.open_table(ENTRIES).map_err(write_error)?;
            for (id, value) in appends {
                table.insert(id.0, value.as_slice()).map_err(write_error)?;
            }
            for id in removes {
                if table.remove(id.0).map_err(write_error)?.is_some() {
                    removed += 1;
                }
            }
        }
        tx.commit().map_err(write_error)?;
        Ok(removed)
    }

    /// Every entry, by id, as stored.
    pub fn entries(&self) -> Result<Vec<(OpId, Vec<u8>)>, JournalError> {
        let read = |e: &dyn std::fmt::Display| JournalError::Read {
            path: self.path.clone(),
            reason: e.to_string(),
        };
        let tx = self.db.begin_read().map_err(|e| read(&e))?;
        let table = tx.open_table(ENTRIES).map_err(|e| read(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| read(&e))? {
            let (k, v) = row.map_err(|e| read(&e))?;
            out.push((OpId(k.value()), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn write_error(e: impl Into<redb::Error>) -> JournalError {
    JournalError::Write(e.into().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<OpId> {
        (0..n).map(|_| OpId::new()).collect()
    }

    #[test]
    fn appends_and_removals_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join(FILE);
        let id = ids(3);
        {
            let s = JournalStore::open(&path).unwrap();
            assert!(s.entries().unwrap().is_empty());
            let appends: Vec<_> = id
                .iter()
                .map(|i| (*i, i.to_string().into_bytes()))
                .collect();
            assert_eq!(s.commit(&appends, &[]).unwrap(), 0);
            // Removing one that is there and one that never was counts one.
            assert_eq!(s.commit(&[], &[id[1], OpId::new()]).unwrap(), 1);
        }
        let s = JournalStore::open(&path).unwrap();
        let mut left: Vec<OpId> = s.entries().unwrap().into_iter().map(|(i, _)| i).collect();
        left.sort();
        let mut want = vec![id[0], id[2]];
        want.sort();
        assert_eq!(left, want);
        let (_, v) = s
            .entries()
            .unwrap()
            .into_iter()
            .find(|(i, _)| *i == id[0])
            .unwrap();
        assert_eq!(v, id[0].to_string().into_bytes());
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let msg = JournalStore::open(&path).err().unwrap().to_string();
        assert!(
            msg.starts_with(&format!("cannot open the journal `{}`", path.display())),
            "{msg}"
        );
    }

    #[test]
    fn a_journal_of_another_layout_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        {
            let s = JournalStore::open(&path).unwrap();
            let tx = s.db.begin_write().unwrap();
            tx.open_table(META).unwrap().insert(KEY_FORMAT, 7).unwrap();
            tx.commit().unwrap();
        }
        let e = JournalStore::open(&path).err().unwrap();
        assert!(matches!(
            e,
            JournalError::Format {
                found: 7,
                expected: FORMAT,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("layout version 7"),
            "{msg}"
        );
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let _first = JournalStore::open(&path).unwrap();
        let msg = JournalStore::open(&path).err().unwrap().to_string();
        assert!(msg.contains("cannot open the journal"), "{msg}");
    }
}
