//! Viewer counts: a room's connections and unique users (its own, or the cluster's), the
//! presence list, and coalesced `viewers` updates for rooms whose counts changed.

use super::*;

impl Rooms {
    /// Cluster mode: the rooms whose local viewers changed since the last call, each with its
    /// connection count and viewers.
    pub fn take_dirty_presence(&self) -> Vec<(Channel, u32, Vec<ViewerKey>)> {
        self.take_dirty()
            .into_iter()
            .map(|room| {
                let members = lock(&room.members);
                let keys = members.viewers.keys().cloned().collect();
                (room.channel.clone(), members.set.len() as u32, keys)
            })
            .collect()
    }

    /// The rooms queued for a viewer-count update since the last call.
    pub(super) fn take_dirty(&self) -> Vec<Arc<Room>> {
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        for room in &dirty {
            room.presence_dirty.store(false, Ordering::Release);
        }
        dirty
    }

    /// Queues a viewer-count report for every room (after the cluster lost this node's share).
    pub fn mark_all_dirty(&self) {
        let rooms: Vec<Arc<Room>> = self.map.iter().map(|r| Arc::clone(r.value())).collect();
        for room in rooms {
            self.mark_dirty(&room);
        }
    }

    /// Queues a viewer-count report for one room (its last one failed).
    pub fn mark_presence_dirty(&self, channel: &Channel) {
        if let Some(room) = self.get(channel) {
            self.mark_dirty(&room);
        }
    }

    /// Queues a viewer-count update. A `user:{id}` room gets none: its only viewers are that
    /// user's own tabs.
    pub(super) fn mark_dirty(&self, room: &Arc<Room>) {
        if room.channel.kind() == ChannelKind::User {
            return;
        }
        if !room.presence_dirty.swap(true, Ordering::AcqRel) {
            lock(&self.dirty).push(Arc::clone(room));
        }
    }

    /// Sends one coalesced `viewers` update to each room whose counts changed since the last
    /// call. Called every presence interval.
    pub fn flush_presence(&self) {
        for room in self.take_dirty() {
            if !room.retired.load(Ordering::Acquire) {
                room.send_viewers(room.viewer_counts());
            }
        }
    }
}

impl Room {
    /// The viewer counts clients see: the cluster's in cluster mode, else this node's.
    pub fn viewer_counts(&self) -> ViewerCounts {
        if let Some(totals) = *lock(&self.cluster_viewers) {
            return totals.counts;
        }
        self.local_viewer_counts()
    }

    /// This node's own viewer counts.
    pub(super) fn local_viewer_counts(&self) -> ViewerCounts {
        ViewerCounts {
            connections: self.connections.load(Ordering::Relaxed),
            users: self.users.load(Ordering::Relaxed),
            peak_connections: self.peak_connections.load(Ordering::Relaxed),
            peak_users: self.peak_users.load(Ordering::Relaxed),
        }
    }

    /// Who is in the room: identified users (sorted, at most `limit`) and anonymous connections.
    pub fn presence(&self, limit: usize) -> PresenceReply {
        let members = lock(&self.members);
        let mut users: Vec<UserId> = Vec::new();
        let mut anonymous = 0u32;
        for key in members.viewers.keys() {
            match key {
                ViewerKey::User(u) => users.push(u.clone()),
                ViewerKey::Anonymous(_) => anonymous += 1,
            }
        }
        drop(members);
        users.sort();
        let truncated = users.len() > limit;
        users.truncate(limit);
        PresenceReply {
            channel: self.channel.clone(),
            viewers: self.viewer_counts(),
            users,
            anonymous,
            truncated,
        }
    }

    /// A `viewers` frame to every subscriber.
    pub(super) fn send_viewers(&self, viewers: ViewerCounts) {
        let frame = ServerFrame::Viewers {
            channel: self.channel.clone(),
            ts: now_ms(),
            viewers,
        };
        self.signal(frame, Skip::Nobody);
    }

    pub(super) fn store_counts(&self, members: &Members) {
        let connections = members.set.len() as u32;
        let users = members.viewers.len() as u32;
        self.connections.store(connections, Ordering::Relaxed);
        self.users.store(users, Ordering::Relaxed);
        self.peak_connections
            .fetch_max(connections, Ordering::Relaxed);
        self.peak_users.fetch_max(users, Ordering::Relaxed);
    }
}
