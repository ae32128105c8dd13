//! An in-memory [`BidLog`]: for tests and for running without a disk. Nothing survives the
//! process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{BidLog, BidRecord, StorageError};

#[derive(Default)]
pub struct MemoryLog {
    /// One lock over everything: this implementation is for tests, not for speed.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    auctions: BTreeMap<String, Vec<u8>>,
    bids: BTreeMap<(String, u64), BidRecord>,
}

impl MemoryLog {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BidLog for MemoryLog {
    fn append(&self, auction: &str, bid: &BidRecord, record: &[u8]) -> Result<(), StorageError> {
        let mut inner = self.inner();
        inner
            .bids
            .insert((auction.to_owned(), bid.seq), bid.clone());
        inner.auctions.insert(auction.to_owned(), record.to_vec());
        Ok(())
    }

    fn put_auction(&self, auction: &str, record: &[u8]) -> Result<(), StorageError> {
        self.inner()
            .auctions
            .insert(auction.to_owned(), record.to_vec());
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn sync_blocks(&self) -> bool {
        false
    }

    fn bids(
        &self,
        auction: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, StorageError> {
        let inner = self.inner();
        let from = (auction.to_owned(), after.saturating_add(1));
        let to = (auction.to_owned(), u64::MAX);
        Ok(inner
            .bids
            .range(from..=to)
            .take(limit)
            .map(|(_, b)| b.clone())
            .collect())
    }

    fn last_seq(&self, auction: &str) -> Result<u64, StorageError> {
        let inner = self.inner();
        let from = (auction.to_owned(), 0);
        let to = (auction.to_owned(), u64::MAX);
        Ok(inner
            .bids
            .range(from..=to)
            .next_back()
            .map_or(0, |(k, _)| k.1))
    }

    fn auctions(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        Ok(self
            .inner()
            .auctions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
