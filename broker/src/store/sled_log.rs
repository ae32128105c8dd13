//! The sled [`BidLog`]: one tree; `a\0{auction}` holds a live auction's record (`x\0{auction}`
//! once archived), `b\0{auction}\0{seq}` (seq big-endian, so keys sort by seq) holds its bids,
//! and `r\0{auction}\0{user}\0{request id}` maps a bid's idempotency key to its seq;
//! `o\0{webhook id}` is the webhook outbox. A turn's bids, their index entries, the auction
//! record after them and the turn's webhooks are written in one atomic batch. Durable once `sync` (sled's `flush`) returns; see the README
//! for exactly what that survives.

use std::path::Path;

use gavel_protocol::UserId;

use super::{BidLog, BidRecord, Outboxed, StorageError};

/// sled's page cache. Its default (1 GiB) is far more than a bid log needs.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

pub struct SledLog {
    db: sled::Db,
}

fn io(e: sled::Error) -> StorageError {
    StorageError::Io(e.to_string())
}

fn auction_key(auction: &str) -> Vec<u8> {
    let mut key = b"a\0".to_vec();
    key.extend_from_slice(auction.as_bytes());
    key
}

fn archived_key(auction: &str) -> Vec<u8> {
    let mut key = b"x\0".to_vec();
    key.extend_from_slice(auction.as_bytes());
    key
}

/// User ids cannot hold a NUL, so the request id after the second NUL is unambiguous.
fn request_key(auction: &str, user: &UserId, request_id: &str) -> Vec<u8> {
    let mut key = b"r\0".to_vec();
    key.extend_from_slice(auction.as_bytes());
    key.push(0);
    key.extend_from_slice(user.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(request_id.as_bytes());
    key
}

fn bid_prefix(auction: &str) -> Vec<u8> {
    let mut key = b"b\0".to_vec();
    key.extend_from_slice(auction.as_bytes());
    key.push(0);
    key
}

fn bid_key(auction: &str, seq: u64) -> Vec<u8> {
    let mut key = bid_prefix(auction);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

impl SledLog {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path) -> Result<SledLog, StorageError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_BYTES)
            // Flushing is ours (group commit); sled's own timer would only add writes.
            .flush_every_ms(None)
            .open()
            .map_err(io)?;
        Ok(SledLog { db })
    }

    fn decode_bid(bytes: &[u8]) -> Result<BidRecord, StorageError> {
        rmp_serde::from_slice(bytes).map_err(|e| StorageError::Corrupt(e.to_string()))
    }
}

fn outbox_key(id: &str) -> Vec<u8> {
    let mut key = b"o\0".to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

impl BidLog for SledLog {
    fn append(
        &self,
        auction: &str,
        bids: &[BidRecord],
        record: &[u8],
        outbox: &[Outboxed],
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for webhook in outbox {
            batch.insert(outbox_key(&webhook.id), webhook.entry.as_slice());
        }
        for bid in bids {
            let encoded =
                rmp_serde::to_vec_named(bid).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            batch.insert(bid_key(auction, bid.seq), encoded);
            if bid.has_request() {
                batch.insert(
                    request_key(auction, &bid.user, &bid.request_id),
                    &bid.seq.to_be_bytes(),
                );
            }
        }
        batch.insert(auction_key(auction), record);
        self.db.apply_batch(batch).map_err(io)
    }

    fn put_auction(&self, auction: &str, record: &[u8]) -> Result<(), StorageError> {
        self.db.insert(auction_key(auction), record).map_err(io)?;
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.db.flush().map_err(io)?;
        Ok(())
    }

    fn bids(
        &self,
        auction: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BidRecord>, StorageError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let start = bid_key(auction, first);
        let end = bid_key(auction, u64::MAX);
        self.db
            .range(start..=end)
            .take(limit)
            .map(|kv| kv.map_err(io).and_then(|(_, v)| SledLog::decode_bid(&v)))
            .collect()
    }

    fn last_seq(&self, auction: &str) -> Result<u64, StorageError> {
        match self.db.scan_prefix(bid_prefix(auction)).next_back() {
            None => Ok(0),
            Some(kv) => {
                let (key, _) = kv.map_err(io)?;
                let seq: [u8; 8] = key[key.len() - 8..]
                    .try_into()
                    .map_err(|_| StorageError::Corrupt("short bid key".into()))?;
                Ok(u64::from_be_bytes(seq))
            }
        }
    }

    fn auctions(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.db
            .scan_prefix(b"a\0")
            .map(|kv| {
                let (key, value) = kv.map_err(io)?;
                let id = String::from_utf8(key[2..].to_vec())
                    .map_err(|_| StorageError::Corrupt("auction key is not UTF-8".into()))?;
                Ok((id, value.to_vec()))
            })
            .collect()
    }

    fn auction(&self, auction: &str) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(record) = self.db.get(auction_key(auction)).map_err(io)? {
            return Ok(Some(record.to_vec()));
        }
        Ok(self
            .db
            .get(archived_key(auction))
            .map_err(io)?
            .map(|r| r.to_vec()))
    }

    fn find_bid(
        &self,
        auction: &str,
        user: &UserId,
        request_id: &str,
    ) -> Result<Option<BidRecord>, StorageError> {
        let Some(seq) = self
            .db
            .get(request_key(auction, user, request_id))
            .map_err(io)?
        else {
            return Ok(None);
        };
        let seq: [u8; 8] = seq[..]
            .try_into()
            .map_err(|_| StorageError::Corrupt("short request index entry".into()))?;
        match self
            .db
            .get(bid_key(auction, u64::from_be_bytes(seq)))
            .map_err(io)?
        {
            Some(bytes) => SledLog::decode_bid(&bytes).map(Some),
            None => Ok(None),
        }
    }

    fn revert(
        &self,
        auction: &str,
        last_seq: u64,
        record: &[u8],
        outbox: &[String],
    ) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for id in outbox {
            batch.remove(outbox_key(id));
        }
        for bid in self.bids(auction, last_seq, usize::MAX)? {
            batch.remove(bid_key(auction, bid.seq));
            if bid.has_request() {
                batch.remove(request_key(auction, &bid.user, &bid.request_id));
            }
        }
        batch.insert(auction_key(auction), record);
        self.db.apply_batch(batch).map_err(io)
    }

    fn outbox(&self) -> Result<Vec<Outboxed>, StorageError> {
        self.db
            .scan_prefix(b"o\0")
            .map(|item| {
                let (key, value) = item.map_err(io)?;
                Ok(Outboxed {
                    id: String::from_utf8_lossy(&key[2..]).into_owned(),
                    entry: value.to_vec(),
                })
            })
            .collect()
    }

    fn put_outbox(&self, id: &str, entry: &[u8]) -> Result<(), StorageError> {
        self.db.insert(outbox_key(id), entry).map_err(io)?;
        Ok(())
    }

    fn remove_outbox(&self, id: &str) -> Result<(), StorageError> {
        self.db.remove(outbox_key(id)).map_err(io)?;
        Ok(())
    }

    fn archive(&self, auction: &str) -> Result<(), StorageError> {
        let Some(record) = self.db.get(auction_key(auction)).map_err(io)? else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        batch.remove(auction_key(auction));
        batch.insert(archived_key(auction), record);
        self.db.apply_batch(batch).map_err(io)
    }
}
