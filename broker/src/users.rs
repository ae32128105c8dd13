//! Who is online on this node: open connections per identified user. A user is online while
//! they have at least one connection.

use dashmap::DashMap;
use gavel_protocol::UserId;

use crate::metrics as m;

#[derive(Default)]
pub struct Users {
    connections: DashMap<UserId, u32>,
}

impl Users {
    /// Counts a new connection of `user`.
    pub fn connected(&self, user: &UserId) {
        let mut count = self.connections.entry(user.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            metrics::gauge!(m::USERS_ONLINE).increment(1.0);
        }
    }

    /// Counts a closed connection of `user`.
    pub fn disconnected(&self, user: &UserId) {
        let gone = self
            .connections
            .remove_if_mut(user, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            })
            .is_some();
        if gone {
            metrics::gauge!(m::USERS_ONLINE).decrement(1.0);
        }
    }

    /// Open connections of `user` on this node.
    pub fn connections(&self, user: &UserId) -> u32 {
        self.connections.get(user).map_or(0, |c| *c)
    }

    /// Distinct users online.
    pub fn online(&self) -> usize {
        self.connections.len()
    }
}
