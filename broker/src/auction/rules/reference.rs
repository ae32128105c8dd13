//! A reference model of proxy (maximum) bidding, for tests of the rules and of whole brokers:
//! eBay's rules restated over every maximum at once, independent of the incremental state
//! machine in `rules`, reserve rule included. Not used by the broker itself.

use gavel_protocol::UserId;

use super::AuctionSpec;

/// The leader is the highest maximum (the earliest on a tie) and, after each challenge, the
/// price is the second-highest maximum plus its increment, capped by the highest (and never
/// below what the winning bidder typed). A leader's own bids only raise their maximum (or,
/// plain, set the price they typed). Feed it bids in order with [`ProxyReference::bid`].
pub struct ProxyReference {
    spec: AuctionSpec,
    /// Per bidder: their highest maximum and when (bid number) they reached it.
    maxima: Vec<(UserId, i64, usize)>,
    bids: usize,
    pub price: Option<i64>,
    pub leader: Option<UserId>,
}

impl ProxyReference {
    pub fn new(spec: AuctionSpec) -> ProxyReference {
        ProxyReference {
            spec,
            maxima: Vec::new(),
            bids: 0,
            price: None,
            leader: None,
        }
    }

    /// The highest maximum `who` has had.
    pub fn max_of(&self, who: &UserId) -> Option<i64> {
        self.maxima.iter().find(|m| &m.0 == who).map(|m| m.1)
    }

    /// The least amount a bid may have now.
    pub fn next_min_bid(&self) -> i64 {
        match self.price {
            None => self.spec.starting_price,
            Some(p) => p + self.spec.step_at(p),
        }
    }

    fn raise(&mut self, who: &UserId, max: i64, at: usize) {
        match self.maxima.iter_mut().find(|m| &m.0 == who) {
            Some(entry) if entry.1 < max => *entry = (who.clone(), max, at),
            Some(_) => {}
            None => self.maxima.push((who.clone(), max, at)),
        }
    }

    /// Judges a bid (`max`: a proxy bid's maximum); whether it is accepted.
    pub fn bid(&mut self, who: &UserId, amount: i64, max: Option<i64>) -> bool {
        let accepted = self.judge(who, amount, max);
        // The reserve rule: a leading maximum that reaches the reserve lifts the price to it.
        if let (true, Some(reserve), Some(price), Some(leader)) =
            (accepted, self.spec.reserve, self.price, self.leader.clone())
        {
            if price < reserve && self.max_of(&leader).is_some_and(|m| m >= reserve) {
                self.price = Some(reserve);
            }
        }
        accepted
    }

    fn judge(&mut self, who: &UserId, amount: i64, max: Option<i64>) -> bool {
        let at = self.bids;
        self.bids += 1;
        if amount < self.next_min_bid() || max.is_some_and(|m| m < amount) {
            return false;
        }
        if self.leader.as_ref() == Some(who) {
            match max {
                Some(max) => self.raise(who, max, at),
                None => {
                    self.price = Some(amount);
                    self.raise(who, amount, at);
                }
            }
            return true;
        }
        if self.price.is_none() {
            self.price = Some(amount);
            self.leader = Some(who.clone());
            self.raise(who, max.unwrap_or(amount), at);
            return true;
        }
        // A challenger's earlier maximum was beaten already: this one replaces it.
        self.maxima.retain(|m| &m.0 != who);
        self.maxima.push((who.clone(), max.unwrap_or(amount), at));
        let mut ranked = self.maxima.clone();
        ranked.sort_by(|x, y| y.1.cmp(&x.1).then(x.2.cmp(&y.2)));
        let (top, second) = (&ranked[0], &ranked[1]);
        let second_price = if second.1 == top.1 {
            top.1
        } else {
            top.1.min(second.1 + self.spec.step_at(second.1))
        };
        let typed = if &top.0 == who { amount } else { 0 };
        self.price = Some(second_price.max(typed));
        self.leader = Some(top.0.clone());
        true
    }
}
