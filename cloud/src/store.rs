//! Where the control plane keeps its state: a small key-value trait with atomic batches,
//! and its embedded RocksDB implementation.
//!
//! Everything the cloud must not lose goes through [`Store::write`]: the change and its
//! audit entry in one atomic, synced batch. A replicated backend (PostgreSQL) implements the
//! same trait; nothing above it knows which one runs.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::error::{CloudError, Result};

/// The tables of the control plane; one RocksDB column family each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Gateway id -> [`GatewayRecord`](crate::model::GatewayRecord).
    Gateways,
    /// Hash of a one-time enrollment token -> [`Enrollment`](crate::model::Enrollment).
    Enrollments,
    /// Hash of an API token -> [`ApiToken`](crate::model::ApiToken).
    Tokens,
    /// `pipeline/version` (version zero-padded) -> [`PipelineVersion`](crate::model::PipelineVersion).
    Versions,
    /// Deployment name -> [`DeploymentRecord`](crate::model::DeploymentRecord).
    Deployments,
    /// Big-endian sequence number -> [`AuditEntry`](crate::model::AuditEntry).
    Audit,
}

impl Table {
    pub const ALL: [Table; 6] = [
        Table::Gateways,
        Table::Enrollments,
        Table::Tokens,
        Table::Versions,
        Table::Deployments,
        Table::Audit,
    ];

    fn name(self) -> &'static str {
        match self {
            Table::Gateways => "gateways",
            Table::Enrollments => "enrollments",
            Table::Tokens => "tokens",
            Table::Versions => "versions",
            Table::Deployments => "deployments",
            Table::Audit => "audit",
        }
    }
}

/// One change of an atomic batch.
#[derive(Debug, Clone)]
pub enum Write {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
}

/// A key-value store with tables and atomic, durable batches.
pub trait Store: Send + Sync + 'static {
    /// Every entry of `table`, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Applies every write or none; returns once the batch is durable.
    fn write(&self, batch: Vec<Write>) -> Result<()>;
}

/// The embedded store: RocksDB in the cloud's data directory.
pub struct RocksStore {
    db: DB,
}

impl RocksStore {
    /// Opens (or creates) the store in `dir`. Fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(CloudError::io(format!("creating {}", dir.display())))?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Control-plane state is small; a modest cache and write buffer keep the cloud lean.
        options.set_write_buffer_size(4 << 20);
        options.set_max_open_files(256);
        let families = Table::ALL
            .iter()
            .map(|t| ColumnFamilyDescriptor::new(t.name(), Options::default()));
        let db = DB::open_cf_descriptors(&options, dir, families).map_err(|error| {
            CloudError::Storage(format!(
                "cannot open the store in {}: {error}",
                dir.display()
            ))
        })?;
        Ok(Self { db })
    }

    fn family(&self, table: Table) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(table.name())
            .ok_or_else(|| CloudError::Storage(format!("table {} is missing", table.name())))
    }
}

impl Store for RocksStore {
    fn scan(&self, table: Table) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let family = self.family(table)?;
        let mut entries = Vec::new();
        for entry in self.db.iterator_cf(family, rocksdb::IteratorMode::Start) {
            let (key, value) = entry?;
            entries.push((key.into_vec(), value.into_vec()));
        }
        Ok(entries)
    }

    fn write(&self, batch: Vec<Write>) -> Result<()> {
        let mut writes = WriteBatch::default();
        for write in batch {
            match write {
                Write::Put(table, key, value) => writes.put_cf(self.family(table)?, key, value),
                Write::Delete(table, key) => writes.delete_cf(self.family(table)?, key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(writes, &options)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_durable_across_reopen_and_deletes_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = RocksStore::open(dir.path()).expect("open");
            store
                .write(vec![
                    Write::Put(Table::Gateways, b"g1".to_vec(), b"one".to_vec()),
                    Write::Put(Table::Gateways, b"g2".to_vec(), b"two".to_vec()),
                    Write::Put(Table::Audit, 1u64.to_be_bytes().to_vec(), b"added".to_vec()),
                ])
                .expect("write");
            store
                .write(vec![Write::Delete(Table::Gateways, b"g1".to_vec())])
                .expect("delete");
        }
        let store = RocksStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.scan(Table::Gateways).expect("scan"),
            vec![(b"g2".to_vec(), b"two".to_vec())]
        );
        assert_eq!(store.scan(Table::Audit).expect("scan").len(), 1);
        assert!(store.scan(Table::Tokens).expect("scan").is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_a_store_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = RocksStore::open(dir.path()).expect("open");
        let Err(error) = RocksStore::open(dir.path()) else {
            panic!("a second open must fail while the first holds the lock");
        };
        assert!(
            error.to_string().contains("cannot open the store"),
            "{error}"
        );
    }
}
