//! A room's subscriber set (its subscriptions), copy-on-write in fixed-size chunks. Publishers read an immutable
//! [`Snapshot`] without locking; a join or leave copies at most two chunks and the chunk list,
//! so a join storm into a 10,000-viewer room costs O(n/CHUNK) per join, not O(n).

use std::collections::HashMap;
use std::sync::Arc;

use crate::feed::Subscription;
use crate::outbound::ConnId;

/// Connections per chunk: big enough that the chunk list stays short, small enough that
/// copying one chunk on a join is cheap.
const CHUNK: usize = 256;

type Chunk = Arc<Vec<Arc<Subscription>>>;

/// What a publish iterates: every subscriber at one instant.
#[derive(Default)]
pub struct Snapshot {
    chunks: Vec<Chunk>,
}

impl Snapshot {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Subscription>> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }

    pub fn len(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.len()).sum()
    }
}

/// The writable side, owned by the room's membership lock.
#[derive(Default)]
pub struct SubscriberSet {
    /// Every chunk is full but the last, which is never empty.
    chunks: Vec<Chunk>,
    /// Where each connection sits: (chunk, slot).
    index: HashMap<ConnId, (usize, usize)>,
}

impl SubscriberSet {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds a connection's subscription; false if the connection was already there.
    pub fn insert(&mut self, sub: &Arc<Subscription>) -> bool {
        let id = sub.conn.id;
        if self.index.contains_key(&id) {
            return false;
        }
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => {
                let mut copy = Vec::with_capacity(CHUNK.min(last.len() + 1));
                copy.extend(last.iter().cloned());
                copy.push(Arc::clone(sub));
                self.index
                    .insert(id, (self.chunks.len() - 1, copy.len() - 1));
                *self.chunks.last_mut().expect("non-empty") = Arc::new(copy);
            }
            _ => {
                self.chunks.push(Arc::new(vec![Arc::clone(sub)]));
                self.index.insert(id, (self.chunks.len() - 1, 0));
            }
        }
        true
    }

    /// Removes a connection's subscription; `None` if it was not there. The last subscriber
    /// moves into the hole.
    pub fn remove(&mut self, id: ConnId) -> Option<Arc<Subscription>> {
        let (chunk, slot) = self.index.remove(&id)?;
        let last_chunk = self.chunks.len() - 1;
        let removed = Arc::clone(&self.chunks[chunk][slot]);
        let mut tail: Vec<Arc<Subscription>> = self.chunks[last_chunk].iter().cloned().collect();
        let moved = tail.pop().expect("the last chunk is never empty");
        if moved.conn.id != id {
            if chunk == last_chunk {
                tail[slot] = Arc::clone(&moved);
            } else {
                let mut copy: Vec<Arc<Subscription>> = self.chunks[chunk].iter().cloned().collect();
                copy[slot] = Arc::clone(&moved);
                self.chunks[chunk] = Arc::new(copy);
            }
            self.index.insert(moved.conn.id, (chunk, slot));
        }
        if tail.is_empty() {
            self.chunks.pop();
        } else {
            self.chunks[last_chunk] = Arc::new(tail);
        }
        Some(removed)
    }

    /// An immutable view for publishers (clones the chunk pointers, not the connections).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            chunks: self.chunks.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::ConnHandle;
    use gavel_protocol::Format;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn conn(id: ConnId) -> Arc<Subscription> {
        let conn = ConnHandle::new(id, None, Format::MsgPack, 1, usize::MAX);
        Subscription::new(conn)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any sequence of joins and leaves leaves exactly the expected members, each once, and
        /// a snapshot taken earlier is unaffected by later changes.
        #[test]
        fn behaves_like_a_set(ops in prop::collection::vec((any::<bool>(), 0u64..600), 0..1200)) {
            let mut set = SubscriberSet::default();
            let mut model = BTreeSet::new();
            let conns: Vec<_> = (0..600).map(conn).collect();
            for (add, id) in ops {
                let before = set.snapshot();
                let before_ids: BTreeSet<ConnId> = before.iter().map(|c| c.conn.id).collect();
                if add {
                    prop_assert_eq!(set.insert(&conns[id as usize]), model.insert(id));
                } else {
                    prop_assert_eq!(set.remove(id).map(|s| s.conn.id), model.take(&id));
                }
                let ids: Vec<ConnId> = set.snapshot().iter().map(|c| c.conn.id).collect();
                let unique: BTreeSet<ConnId> = ids.iter().copied().collect();
                prop_assert_eq!(ids.len(), unique.len());
                prop_assert_eq!(&unique, &model);
                prop_assert_eq!(set.len(), model.len());
                let still: BTreeSet<ConnId> = before.iter().map(|c| c.conn.id).collect();
                prop_assert_eq!(still, before_ids);
                prop_assert!(set.chunks.iter().rev().skip(1).all(|c| c.len() == CHUNK));
                prop_assert!(set.chunks.last().is_none_or(|c| !c.is_empty()));
            }
        }
    }
}
