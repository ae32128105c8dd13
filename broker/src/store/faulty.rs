//! A [`BidLog`] that fails on demand, for tests of what the broker does when its disk does:
//! it passes every call through to an inner log until told to fail writes or flushes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use gavel_protocol::UserId;

use super::{BidLog, BidRecord, Outboxed, StorageError};

pub struct FaultyLog {
    inner: Arc<dyn BidLog>,
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    tear_appends: AtomicBool,
    fail_reverts: AtomicBool,
    /// Flushes that reached the inner log, and flushes refused.
    syncs: AtomicU64,
    refused_syncs: AtomicU64,
}

impl FaultyLog {
    pub fn new(inner: Arc<dyn BidLog>) -> FaultyLog {
        FaultyLog {
            inner,
            fail_writes: AtomicBool::new(false),
            fail_syncs: AtomicBool::new(false),
            tear_appends: AtomicBool::new(false),
            fail_reverts: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            refused_syncs: AtomicU64::new(0),
        }
    }

    /// From now on, writes (append, put, revert, archive) fail, or work again.
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// From now on, flushes fail, or work again.
    pub fn fail_syncs(&self, fail: bool) {
        self.fail_syncs.store(fail, Ordering::SeqCst);
    }

    /// From now on, appends write the turn's bids but not its record or outbox, and then fail
    /// as torn, or work again.
    pub fn tear_appends(&self, tear: bool) {
        self.tear_appends.store(tear, Ordering::SeqCst);
    }

    /// From now on, undos (reverts) fail, or work again.
    pub fn fail_reverts(&self, fail: bool) {
        self.fail_reverts.store(fail, Ordering::SeqCst);
    }

    /// How many flushes were attempted (passed through or refused).
    pub fn sync_attempts(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst) + self.refused_syncs.load(Ordering::SeqCst)
    }

    fn write(&self) -> Result<(), StorageError> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StorageError::Io("injected write failure".into()));
        }
        Ok(())
    }
}

impl BidLog for FaultyLog {
    fn append(
        &self,
        auction: &str,
        bids: &[BidRecord],
        record: &[u8],
        outbox: &[Outboxed],
    ) -> Result<(), StorageError> {
        self.write()?;
        if self.tear_appends.load(Ordering::SeqCst) {
            // What a write cut mid-turn leaves: the turn's bids, with the record (and the
            // outbox) as they were before it.
            if let Some(before) = self.inner.auction(auction)? {
                self.inner.append(auction, bids, &before, &[])?;
            }
            return Err(StorageError::Torn("injected torn write".into()));
        }
        self.inner.append(auction, bids, record, outbox)
    }

    fn put_auction(&self, auction: &str, record: &[u8]) -> Result<(), StorageError> {
        self.write()?;
        self.inner.put_auction(auction, record)
    }

    fn sync(&self) -> Result<(), StorageError> {
        if self.fail_syncs.load(Ordering::SeqCst) {
            self.refused_syncs.fetch_add(1, Ordering::SeqCst);
            return Err(StorageError::Io("injected flush failure".into()));
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync()
    }

    fn sync_blocks(&self) -> bool {
        self.inner.sync_blocks()
    }

    fn bids(
        &self,
        auction: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, StorageError> {
        self.inner.bids(auction, after, limit)
    }

    fn last_seq(&self, auction: &str) -> Result<u64, StorageError> {
        self.inner.last_seq(auction)
    }

    fn auctions(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.inner.auctions()
    }

    fn auction(&self, auction: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.auction(auction)
    }

    fn find_bid(
        &self,
        auction: &str,
        user: &UserId,
        request_id: &str,
    ) -> Result<Option<BidRecord>, StorageError> {
        self.inner.find_bid(auction, user, request_id)
    }

    fn revert(
        &self,
        auction: &str,
        last_seq: u64,
        record: &[u8],
        outbox: &[String],
    ) -> Result<(), StorageError> {
        self.write()?;
        if self.fail_reverts.load(Ordering::SeqCst) {
            return Err(StorageError::Io("injected revert failure".into()));
        }
        self.inner.revert(auction, last_seq, record, outbox)
    }

    fn outbox(&self) -> Result<Vec<Outboxed>, StorageError> {
        self.inner.outbox()
    }

    fn put_outbox(&self, id: &str, entry: &[u8]) -> Result<(), StorageError> {
        self.write()?;
        self.inner.put_outbox(id, entry)
    }

    fn remove_outbox(&self, id: &str) -> Result<(), StorageError> {
        self.write()?;
        self.inner.remove_outbox(id)
    }

    fn archive(&self, auction: &str) -> Result<(), StorageError> {
        self.write()?;
        self.inner.archive(auction)
    }
}
