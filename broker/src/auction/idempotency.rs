//! The answers an auction remembers for retries, bounded: the latest [`REMEMBERED`] outcomes by
//! (user, request id), oldest forgotten first. Accepted bids are also in the ledger's
//! idempotency index, so a retry of an old one is answered from there; only remembered
//! rejections are lost past the bound (then a retry is judged anew).

use std::collections::{HashMap, VecDeque};

use gavel_protocol::{Reply, UserId};

/// Outcomes remembered per auction.
pub const REMEMBERED: usize = 4096;

/// A bid's idempotency key.
pub type Key = (UserId, String);

/// The latest outcomes, by key.
#[derive(Default)]
pub struct Outcomes {
    by_key: HashMap<Key, Reply>,
    /// Keys in the order they were remembered, for eviction.
    order: VecDeque<Key>,
}

impl Outcomes {
    pub fn get(&self, key: &Key) -> Option<&Reply> {
        self.by_key.get(key)
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.by_key.contains_key(key)
    }

    /// Remembers an outcome, forgetting the oldest past the bound.
    pub fn remember(&mut self, key: Key, reply: Reply) {
        if self.by_key.insert(key.clone(), reply).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > REMEMBERED {
            if let Some(oldest) = self.order.pop_front() {
                self.by_key.remove(&oldest);
            }
        }
    }

    /// Forgets an outcome (a turn that was not recorded).
    pub fn forget(&mut self, key: &Key) {
        if self.by_key.remove(key).is_some() {
            self.order.retain(|k| k != key);
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gavel_protocol::BidRejection;

    fn key(n: usize) -> Key {
        (UserId::parse("u").unwrap(), format!("r{n}"))
    }

    fn reply(n: usize) -> Reply {
        Reply::BidRejected {
            auction_id: "a".into(),
            request_id: format!("r{n}"),
            reason: BidRejection::TooLow,
            min_amount: Some(n as i64),
            message: String::new(),
        }
    }

    #[test]
    fn keeps_the_latest_and_forgets_the_oldest() {
        let mut outcomes = Outcomes::default();
        for n in 0..REMEMBERED + 10 {
            outcomes.remember(key(n), reply(n));
        }
        assert_eq!(outcomes.len(), REMEMBERED);
        assert!(outcomes.get(&key(9)).is_none());
        assert_eq!(outcomes.get(&key(10)), Some(&reply(10)));
        outcomes.forget(&key(10));
        assert!(!outcomes.contains(&key(10)));
        assert_eq!(outcomes.len(), REMEMBERED - 1);
    }
}
