//! The rules' unit tests: bids, increments, status, soft close, reserve, buy-now, roles, specs.

use super::*;

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

fn spec() -> AuctionSpec {
    AuctionSpec {
        id: "a1".into(),
        title: "Lot 1".into(),
        currency: "EUR".into(),
        starting_price: 1000,
        increment: Increment::Fixed(100),
        reserve: None,
        starts_at: 1_000,
        ends_at: 100_000,
        soft_close: SoftClose::default(),
        buy_now: None,
        required_role: None,
    }
}

fn active(spec: AuctionSpec) -> Auction {
    let mut a = Auction::new(spec);
    a.advance(1_000);
    assert_eq!(a.state.status, AuctionStatus::Active);
    a
}

#[test]
fn bids_must_meet_the_next_minimum_and_equal_amounts_lose() {
    let mut a = active(spec());
    let too_low = a.place_bid(&user("x"), 999, 2_000).unwrap_err();
    assert_eq!(
        (too_low.reason, too_low.min_amount),
        (BidRejection::TooLow, Some(1000))
    );
    assert_eq!(a.place_bid(&user("x"), 1000, 2_000).unwrap().seq, 1);
    let equal = a.place_bid(&user("y"), 1000, 2_001).unwrap_err();
    assert_eq!(
        (equal.reason, equal.min_amount),
        (BidRejection::TooLow, Some(1100))
    );
    let second = a.place_bid(&user("y"), 1100, 2_002).unwrap();
    assert_eq!(second.outbid, Some((user("x"), 1000)));
    assert_eq!(
        (a.state.bid_count, a.state.last_seq, a.state.price),
        (2, 2, Some(1100))
    );
    // Raising your own bid does not outbid yourself.
    assert_eq!(a.place_bid(&user("y"), 1200, 2_003).unwrap().outbid, None);
}

#[test]
fn invalid_amounts_write_nothing() {
    let mut a = active(spec());
    for amount in [0, -5, MAX_AMOUNT + 1, i64::MAX, i64::MIN] {
        let r = a.place_bid(&user("x"), amount, 2_000).unwrap_err();
        assert_eq!(r.reason, BidRejection::InvalidAmount, "{amount}");
    }
    assert_eq!((a.state.last_seq, a.state.price), (0, None));
}

#[test]
fn a_price_one_increment_from_the_cap_cannot_be_beaten_and_says_so() {
    let mut a = active(spec());
    let top = MAX_AMOUNT - 50;
    a.place_bid(&user("x"), top, 2_000).unwrap();
    // The next minimum (top + 100) is above the cap: an amount up to the cap is too low, one
    // above it invalid, and the message says why no bid can win.
    let r = a.place_bid(&user("y"), MAX_AMOUNT, 2_001).unwrap_err();
    assert_eq!(
        (r.reason, r.min_amount),
        (BidRejection::TooLow, Some(top + 100))
    );
    assert!(
        r.message.contains("no higher bid is possible"),
        "{}",
        r.message
    );
    let r = a.place_bid(&user("y"), top + 100, 2_002).unwrap_err();
    assert_eq!(r.reason, BidRejection::InvalidAmount);
    assert_eq!(
        (a.state.price, a.state.leader),
        (Some(top), Some(user("x")))
    );
}

#[test]
fn tiers_pick_the_step_of_the_price_band() {
    let mut s = spec();
    s.increment = Increment::Tiers(vec![
        Tier { from: 0, step: 100 },
        Tier {
            from: 5000,
            step: 500,
        },
    ]);
    s.validate().unwrap();
    let mut a = active(s);
    a.place_bid(&user("x"), 4950, 2_000).unwrap();
    assert_eq!(a.next_min_bid(), 5050);
    a.place_bid(&user("y"), 5050, 2_001).unwrap();
    assert_eq!(a.next_min_bid(), 5550);
}

#[test]
fn status_gates_bids() {
    let mut a = Auction::new(spec());
    assert_eq!(
        a.place_bid(&user("x"), 5000, 500).unwrap_err().reason,
        BidRejection::NotActive
    );
    a.advance(1_000);
    a.pause(2_000).unwrap();
    assert_eq!(
        a.place_bid(&user("x"), 5000, 2_500).unwrap_err().reason,
        BidRejection::NotActive
    );
    a.resume(10_000).unwrap();
    assert_eq!(
        a.state.ends_at, 108_000,
        "the remaining 98 s are kept across the pause"
    );
    a.place_bid(&user("x"), 5000, 10_001).unwrap();
    a.end_now(20_000).unwrap();
    assert_eq!(
        a.place_bid(&user("y"), 9000, 20_001).unwrap_err().reason,
        BidRejection::Ended
    );
    assert!(a.cancel().is_err());
}

#[test]
fn soft_close_extends_only_inside_the_window() {
    let mut s = spec();
    s.soft_close = SoftClose {
        window_ms: 10_000,
        extend_ms: 30_000,
    };
    let mut a = active(s);
    assert_eq!(
        a.place_bid(&user("x"), 1000, 80_000).unwrap().extended_from,
        None
    );
    let late = a.place_bid(&user("y"), 1100, 95_000).unwrap();
    assert_eq!(late.extended_from, Some(100_000));
    assert_eq!(a.state.ends_at, 125_000);
    assert_eq!(a.next_deadline(0), Some(125_000));
    assert!(
        a.advance(110_000).is_empty(),
        "not over at the original end"
    );
    let changes = a.advance(125_000);
    let Some(Change::Ended(ended)) = changes.last() else {
        panic!("{changes:?}")
    };
    assert_eq!(
        (ended.winner.clone(), ended.final_price),
        (Some(user("y")), Some(1100))
    );
}

#[test]
fn reserve_not_met_means_no_winner() {
    let mut s = spec();
    s.reserve = Some(5000);
    let mut a = active(s);
    a.place_bid(&user("x"), 4000, 2_000).unwrap();
    assert!(!a.reserve_met());
    let changes = a.advance(100_000);
    let Some(Change::Ended(ended)) = changes.last() else {
        panic!("{changes:?}")
    };
    assert_eq!(
        (ended.winner.clone(), ended.reserve_met, ended.final_price),
        (None, false, Some(4000))
    );
}

#[test]
fn updates_only_before_the_start() {
    let mut a = Auction::new(spec());
    let mut s = spec();
    s.title = "Lot 1 (renamed)".into();
    s.ends_at = 200_000;
    a.update(s.clone()).unwrap();
    assert_eq!(a.state.ends_at, 200_000);
    a.advance(1_000);
    assert!(a.update(s).is_err());
}

#[test]
fn a_bid_at_the_buy_now_price_is_placed_at_that_price_and_ends_the_auction() {
    let mut a = active(AuctionSpec {
        buy_now: Some(5_000),
        ..spec()
    });
    a.place_bid(&user("u1"), 1_000, 2_000).unwrap();
    assert_eq!(a.snapshot(2_000).buy_now, Some(5_000));
    // Above it: placed at exactly the buy-now price, and the auction is over.
    let bought = a.place_bid(&user("u2"), 9_000, 3_000).unwrap();
    assert_eq!(bought.amount, 5_000);
    assert!(matches!(
        bought.bought.as_slice(),
        [Change::Status { to: AuctionStatus::Ended, .. }, Change::Ended(ended)]
            if ended.winner == Some(user("u2")) && ended.final_price == Some(5_000)
    ));
    assert_eq!(a.state.status, AuctionStatus::Ended);
    assert_eq!(a.state.ends_at, 3_000);
    assert_eq!(a.snapshot(3_000).buy_now, None);
    let late = a.place_bid(&user("u3"), 9_500, 3_000).unwrap_err();
    assert_eq!(late.reason, BidRejection::Ended);
}

#[test]
fn buy_now_lapses_once_the_bidding_passes_it() {
    let mut a = active(AuctionSpec {
        buy_now: Some(1_150),
        ..spec()
    });
    a.place_bid(&user("u1"), 1_100, 2_000).unwrap();
    // The next minimum (1200) is above the buy-now price: it no longer applies.
    assert_eq!(a.snapshot(2_000).buy_now, None);
    let normal = a.place_bid(&user("u2"), 5_000, 3_000).unwrap();
    assert_eq!((normal.amount, normal.bought.len()), (5_000, 0));
    assert_eq!(a.state.status, AuctionStatus::Active);
}

#[test]
fn a_required_role_admits_only_tokens_that_carry_it_or_admin() {
    let open = active(spec());
    assert!(open.admits(None));
    let verified = active(AuctionSpec {
        required_role: Some("verified".into()),
        ..spec()
    });
    assert!(!verified.admits(None));
    assert!(!verified.admits(Some(&["bidder".to_owned()])));
    assert!(verified.admits(Some(&["bidder".to_owned(), "verified".to_owned()])));
    assert!(verified.admits(Some(&["admin".to_owned()])));
    assert_eq!(
        verified.snapshot(0).required_role.as_deref(),
        Some("verified")
    );
}

/// The worked example of docs/protocol.md §5.6.3, number for number.
#[test]
fn the_documented_tier_example_holds() {
    let a = Auction::new(AuctionSpec {
        starting_price: 9_000,
        increment: Increment::Tiers(vec![
            Tier { from: 0, step: 500 },
            Tier {
                from: 10_000,
                step: 1_000,
            },
            Tier {
                from: 50_000,
                step: 2_500,
            },
        ]),
        ..spec()
    });
    a.spec.validate().unwrap();
    assert_eq!(a.next_min_bid(), 9_000);
    for (price, next) in [
        (9_000, 9_500),
        (9_500, 10_000),
        (10_000, 11_000),
        (49_500, 50_500),
        (50_000, 52_500),
    ] {
        assert_eq!(a.next_min_bid_after(price), next, "after {price}");
    }
}

#[test]
fn specs_are_validated() {
    let mut s = spec();
    s.currency = "euro".into();
    assert!(s.validate().is_err());
    let mut s = spec();
    s.ends_at = s.starts_at;
    assert!(s.validate().is_err());
    let mut s = spec();
    s.increment = Increment::Fixed(0);
    assert!(s.validate().is_err());
    let mut s = spec();
    s.buy_now = Some(s.starting_price - 1);
    assert!(s.validate().is_err(), "buy-now below the starting price");
    let mut s = spec();
    (s.reserve, s.buy_now) = (Some(5_000), Some(4_000));
    assert!(s.validate().is_err(), "buy-now below the reserve");
    let mut s = spec();
    s.required_role = Some("Verified!".into());
    assert!(s.validate().is_err());
    let mut s = spec();
    s.soft_close = SoftClose {
        window_ms: 60_000,
        extend_ms: u64::MAX,
    };
    assert!(s.validate().is_err(), "an extension beyond a day");
    spec().validate().unwrap();
}

/// An extension never moves the end past the latest end a spec may have (every time the
/// broker sends fits in 53 bits).
#[test]
fn soft_close_never_ends_past_the_latest_time() {
    let mut s = spec();
    s.ends_at = MAX_TIME_MS;
    s.soft_close = SoftClose {
        window_ms: MAX_SOFT_CLOSE_MS,
        extend_ms: MAX_SOFT_CLOSE_MS,
    };
    s.validate().unwrap();
    let mut a = Auction::new(s);
    a.advance(a.spec.starts_at);
    let price = a.spec.starting_price;
    a.place_bid(&user("u1"), price, MAX_TIME_MS - 1_000)
        .unwrap();
    assert_eq!(a.state.ends_at, MAX_TIME_MS);
}

/// In a close's grace period (a cluster), a bid that arrived before the end is judged in time
/// and extends a soft close; one that arrived at or after the end is refused as `ended`
/// without closing; the close comes when the grace is over.
#[test]
fn a_grace_period_judges_late_reaching_bids_by_their_arrival() {
    let mut s = spec();
    s.soft_close = SoftClose {
        window_ms: 5_000,
        extend_ms: 10_000,
    };
    let mut a = Auction::new(s);
    a.advance(1_000);
    let grace = 1_000;
    // The end (100 000) has come, the grace not: no close yet.
    assert!(a.advance_with_grace(100_500, grace).is_empty());
    assert_eq!(a.next_deadline(grace), Some(101_000));
    let late = a.place_bid(&user("late"), 1000, 100_000).unwrap_err();
    assert_eq!(late.reason, BidRejection::Ended);
    assert_eq!(
        a.state.status,
        AuctionStatus::Active,
        "a refusal closes nothing"
    );
    // Arrived before the end, judged in the grace: in time, and it extends the close.
    let in_time = a.place_bid(&user("early"), 1000, 99_990).unwrap();
    assert_eq!(in_time.extended_from, Some(100_000));
    assert_eq!(a.state.ends_at, 109_990);
    assert!(a.advance_with_grace(101_000, grace).is_empty());
    let changes = a.advance_with_grace(110_990, grace);
    assert!(changes.iter().any(|c| matches!(c, Change::Ended(_))));
}
