//! An in-memory [`BidLog`]: for tests and for running without a disk. Nothing survives the
//! process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use gavel_protocol::UserId;

use super::{BidLog, BidRecord, Outboxed, StorageError};

#[derive(Default)]
pub struct MemoryLog {
    /// One lock over everything: this implementation is for tests, not for speed.
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Live auctions' records.
    auctions: BTreeMap<String, Vec<u8>>,
    archived: BTreeMap<String, Vec<u8>>,
    bids: BTreeMap<(String, u64), BidRecord>,
    /// (auction, user, request id) → seq.
    requests: BTreeMap<(String, UserId, String), u64>,
    /// Webhook id → entry.
    outbox: BTreeMap<String, Vec<u8>>,
}

impl MemoryLog {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BidLog for MemoryLog {
    fn append(
        &self,
        auction: &str,
        bids: &[BidRecord],
        record: &[u8],
        outbox: &[Outboxed],
    ) -> Result<(), StorageError> {
        let mut inner = self.inner();
        for webhook in outbox {
            inner
                .outbox
                .insert(webhook.id.clone(), webhook.entry.clone());
        }
        for bid in bids {
            if bid.has_request() {
                inner.requests.insert(
                    (auction.to_owned(), bid.user.clone(), bid.request_id.clone()),
                    bid.seq,
                );
            }
            inner
                .bids
                .insert((auction.to_owned(), bid.seq), bid.clone());
        }
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

    fn auction(&self, auction: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let inner = self.inner();
        Ok(inner
            .auctions
            .get(auction)
            .or_else(|| inner.archived.get(auction))
            .cloned())
    }

    fn find_bid(
        &self,
        auction: &str,
        user: &UserId,
        request_id: &str,
    ) -> Result<Option<BidRecord>, StorageError> {
        let inner = self.inner();
        let key = (auction.to_owned(), user.clone(), request_id.to_owned());
        Ok(inner
            .requests
            .get(&key)
            .and_then(|seq| inner.bids.get(&(auction.to_owned(), *seq)))
            .filter(|bid| bid.user == *user && bid.request_id == request_id)
            .cloned())
    }

    fn revert(
        &self,
        auction: &str,
        last_seq: u64,
        record: &[u8],
        outbox: &[String],
    ) -> Result<(), StorageError> {
        let mut inner = self.inner();
        for id in outbox {
            inner.outbox.remove(id);
        }
        let from = (auction.to_owned(), last_seq.saturating_add(1));
        let to = (auction.to_owned(), u64::MAX);
        let dropped: Vec<BidRecord> = inner
            .bids
            .range(from..=to)
            .map(|(_, b)| b.clone())
            .collect();
        for bid in dropped {
            inner.bids.remove(&(auction.to_owned(), bid.seq));
            inner
                .requests
                .remove(&(auction.to_owned(), bid.user, bid.request_id));
        }
        inner.auctions.insert(auction.to_owned(), record.to_vec());
        Ok(())
    }

    fn outbox(&self) -> Result<Vec<Outboxed>, StorageError> {
        Ok(self
            .inner()
            .outbox
            .iter()
            .map(|(id, entry)| Outboxed {
                id: id.clone(),
                entry: entry.clone(),
            })
            .collect())
    }

    fn put_outbox(&self, id: &str, entry: &[u8]) -> Result<(), StorageError> {
        self.inner().outbox.insert(id.to_owned(), entry.to_vec());
        Ok(())
    }

    fn remove_outbox(&self, id: &str) -> Result<(), StorageError> {
        self.inner().outbox.remove(id);
        Ok(())
    }

    fn archive(&self, auction: &str) -> Result<(), StorageError> {
        let mut inner = self.inner();
        if let Some(record) = inner.auctions.remove(auction) {
            inner.archived.insert(auction.to_owned(), record);
        }
        Ok(())
    }
}
