//! Proxy (maximum) bidding: worked cases, and random bid sequences checked against a reference
//! model of eBay's rules (second-highest maximum plus one increment, capped by the highest).

use proptest::prelude::*;

use super::*;
use crate::auction::rules::ProxyReference;

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

pub(crate) fn spec_with(increment: Increment) -> AuctionSpec {
    spec_with_reserve(increment, None)
}

fn spec_with_reserve(increment: Increment, reserve: Option<i64>) -> AuctionSpec {
    AuctionSpec {
        id: "p1".into(),
        title: "Proxy lot".into(),
        currency: "EUR".into(),
        starting_price: 1000,
        increment,
        reserve,
        starts_at: 1_000,
        ends_at: 10_000_000,
        soft_close: SoftClose::default(),
        buy_now: None,
        required_role: None,
    }
}

fn active() -> Auction {
    let mut a = Auction::new(spec_with(Increment::Fixed(100)));
    a.advance(1_000);
    a
}

fn amounts(accepted: &Accepted) -> Vec<(String, i64, bool)> {
    accepted
        .placed
        .iter()
        .map(|p| (p.user.to_string(), p.amount, p.automatic))
        .collect()
}

#[test]
fn a_maximum_answers_a_lower_bid_one_increment_above_it() {
    let mut a = active();
    let first = a
        .place_bid_with_max(&user("ann"), 1000, Some(5000), 2_000)
        .unwrap();
    assert_eq!((first.amount, first.max_amount), (1000, Some(5000)));
    assert_eq!(
        a.state.price,
        Some(1000),
        "a maximum alone does not move the price"
    );

    let bob = a.place_bid(&user("bob"), 1500, 2_001).unwrap();
    assert_eq!(
        amounts(&bob),
        vec![("bob".into(), 1500, false), ("ann".into(), 1600, true)]
    );
    assert!(!bob.leading);
    assert_eq!(bob.outbid, Some((user("bob"), 1500)));
    assert_eq!(
        (a.state.price, a.state.leader.clone()),
        (Some(1600), Some(user("ann")))
    );
    assert_eq!(a.state.bid_count, 3);
    assert_eq!(a.leading_max(), Some(5000));
}

#[test]
fn a_higher_maximum_wins_one_increment_above_the_old_one() {
    let mut a = active();
    a.place_bid_with_max(&user("ann"), 1000, Some(5000), 2_000)
        .unwrap();
    let bob = a
        .place_bid_with_max(&user("bob"), 1100, Some(8000), 2_001)
        .unwrap();
    // Ann's maximum is used up (an automatic bid at 5000), then Bob leads at 5100.
    assert_eq!(
        amounts(&bob),
        vec![("ann".into(), 5000, true), ("bob".into(), 5100, true)]
    );
    assert!(bob.leading);
    assert_eq!(bob.outbid, Some((user("ann"), 5000)));
    assert_eq!((bob.seq, bob.amount, bob.max_amount), (3, 5100, Some(8000)));
    assert_eq!(a.leading_max(), Some(8000));
}

#[test]
fn equal_maxima_go_to_the_earlier_one() {
    let mut a = active();
    a.place_bid_with_max(&user("ann"), 1000, Some(5000), 2_000)
        .unwrap();
    let bob = a
        .place_bid_with_max(&user("bob"), 1100, Some(5000), 2_001)
        .unwrap();
    assert_eq!(
        amounts(&bob),
        vec![("bob".into(), 5000, true), ("ann".into(), 5000, true)]
    );
    assert_eq!(
        (a.state.price, a.state.leader.clone()),
        (Some(5000), Some(user("ann")))
    );
    assert_eq!(a.state.leader_max, None, "used up");
}

#[test]
fn a_maximum_less_than_an_increment_above_the_leader_wins_at_itself() {
    let mut a = active();
    a.place_bid_with_max(&user("ann"), 1000, Some(5000), 2_000)
        .unwrap();
    let bob = a
        .place_bid_with_max(&user("bob"), 1100, Some(5050), 2_001)
        .unwrap();
    assert_eq!(bob.amount, 5050);
    assert_eq!(a.state.leader_max, None);
}

#[test]
fn raising_ones_own_maximum_does_not_raise_the_price() {
    let mut a = active();
    a.place_bid_with_max(&user("ann"), 1000, Some(2000), 2_000)
        .unwrap();
    let raised = a
        .place_bid_with_max(&user("ann"), 1100, Some(9000), 2_001)
        .unwrap();
    assert!(raised.placed.is_empty());
    assert_eq!(
        (raised.seq, raised.amount, raised.max_amount),
        (1, 1000, Some(9000))
    );
    assert_eq!((a.state.price, a.state.bid_count), (Some(1000), 1));
    // A lower maximum later changes nothing: maxima only rise.
    let lower = a
        .place_bid_with_max(&user("ann"), 1100, Some(3000), 2_002)
        .unwrap();
    assert_eq!(lower.max_amount, Some(9000));
    let bob = a.place_bid(&user("bob"), 5000, 2_003).unwrap();
    assert_eq!(amounts(&bob)[1], ("ann".into(), 5100, true));
}

#[test]
fn a_maximum_below_the_amount_is_invalid() {
    let mut a = active();
    let refused = a
        .place_bid_with_max(&user("ann"), 1000, Some(999), 2_000)
        .unwrap_err();
    assert_eq!(refused.reason, BidRejection::InvalidAmount);
    assert_eq!(a.state.bid_count, 0);
}

#[test]
fn the_maximum_is_not_in_the_public_snapshot() {
    let mut a = active();
    a.place_bid_with_max(&user("ann"), 1000, Some(987_654), 2_000)
        .unwrap();
    let public = serde_json::to_string(&a.snapshot(2_001)).unwrap();
    assert!(!public.contains("987654"), "{public}");
}

/// Increment tables whose step never shrinks as the price grows (as real tables are).
fn increments() -> impl Strategy<Value = Increment> {
    prop_oneof![
        (1i64..500).prop_map(Increment::Fixed),
        (
            1i64..50,
            1i64..200,
            1i64..300,
            1000i64..5000,
            5000i64..20000
        )
            .prop_map(|(a, b, c, from1, from2)| Increment::Tiers(vec![
                Tier { from: 0, step: a },
                Tier {
                    from: from1,
                    step: a + b
                },
                Tier {
                    from: from2,
                    step: a + b + c
                },
            ])),
    ]
}

/// One bid of a sequence: who (of five), how far above the next minimum the amount is
/// (negative: too low), and the maximum's distance above the amount (`None`: a plain bid).
type Step = (usize, i64, Option<i64>);

fn sequences() -> impl Strategy<Value = (Increment, Option<i64>, Vec<Step>)> {
    (
        increments(),
        prop::option::of(1000i64..30_000),
        prop::collection::vec(
            (
                0usize..5,
                prop_oneof![3 => Just(0i64), 1 => -50i64..0, 1 => 0i64..3000],
                prop::option::weighted(0.6, 0i64..20_000),
            ),
            1..40,
        ),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    /// The acceptance test of proxy bidding: after every bid of 10,000 random sequences the
    /// rules and the reference agree on acceptance, price and leader; and the price never
    /// passes the leader's maximum, nor falls.
    #[test]
    fn proxy_bidding_matches_the_reference((increment, reserve, steps) in sequences()) {
        let mut auction = Auction::new(spec_with_reserve(increment, reserve));
        auction.advance(1_000);
        let mut reference = ProxyReference::new(auction.spec.clone());
        let users: Vec<UserId> = (0..5).map(|n| user(&format!("u{n}"))).collect();
        for (at, (who, over, max)) in steps.into_iter().enumerate() {
            let who = &users[who];
            let amount = (auction.next_min_bid() + over).max(1);
            let max = max.map(|extra| amount + extra);
            let before = auction.state.price;
            let engine = auction.place_bid_with_max(who, amount, max, 2_000 + at as u64);
            let expected = reference.bid(who, amount, max);
            // The reference judged on the state before the bid: compare after.
            prop_assert_eq!(engine.is_ok(), expected, "bid {} by {}: {:?}", amount, who, max);
            prop_assert_eq!(auction.state.price, reference.price);
            prop_assert_eq!(&auction.state.leader, &reference.leader);
            prop_assert!(auction.state.price >= before);
            prop_assert!(auction.state.price <= auction.leading_max());
            if let Some(leader) = &auction.state.leader {
                prop_assert_eq!(auction.leading_max(), reference.max_of(leader).max(auction.state.price));
            }
            prop_assert_eq!(auction.state.bid_count, auction.state.last_seq);
        }
    }
}

/// The worked example of docs/protocol.md §5.6.8, step by step.
#[test]
fn the_documented_proxy_example_holds() {
    let mut a = active();
    let (ann, bob, cid, dan) = (user("ann"), user("bob"), user("cid"), user("dan"));
    let step1 = a.place_bid_with_max(&ann, 1000, Some(5000), 2_000).unwrap();
    assert_eq!(
        (step1.seq, step1.leading, step1.max_amount),
        (1, true, Some(5000))
    );
    let step2 = a.place_bid(&bob, 1500, 2_001).unwrap();
    assert_eq!(
        amounts(&step2),
        vec![("bob".into(), 1500, false), ("ann".into(), 1600, true)]
    );
    assert!(!step2.leading);
    let step3 = a.place_bid_with_max(&ann, 1700, Some(9000), 2_002).unwrap();
    assert_eq!(
        (step3.seq, step3.amount, step3.max_amount),
        (3, 1600, Some(9000))
    );
    assert!(step3.placed.is_empty());
    let step4 = a
        .place_bid_with_max(&cid, 1700, Some(12000), 2_003)
        .unwrap();
    assert_eq!(
        amounts(&step4),
        vec![("ann".into(), 9000, true), ("cid".into(), 9100, true)]
    );
    assert_eq!(step4.outbid, Some((ann.clone(), 9000)));
    let step5 = a
        .place_bid_with_max(&dan, 9200, Some(12000), 2_004)
        .unwrap();
    assert_eq!(
        amounts(&step5),
        vec![("dan".into(), 12000, true), ("cid".into(), 12000, true)]
    );
    assert!(!step5.leading);
    assert_eq!((a.state.price, a.state.leader), (Some(12000), Some(cid)));
    assert_eq!(a.state.bid_count, 7);
}

/// eBay's reserve rule: a maximum that reaches the reserve lifts the price to it at once, so a
/// bidder willing to pay the reserve does not lose the item to an unmet reserve.
#[test]
fn a_maximum_that_reaches_the_reserve_lifts_the_price_to_it() {
    let mut a = Auction::new(spec_with_reserve(Increment::Fixed(100), Some(5000)));
    a.advance(1_000);
    let first = a
        .place_bid_with_max(&user("ann"), 1000, Some(3000), 2_000)
        .unwrap();
    assert_eq!(
        (first.amount, a.reserve_met()),
        (1000, false),
        "3000 is short of it"
    );
    let raised = a
        .place_bid_with_max(&user("ann"), 1100, Some(8000), 2_001)
        .unwrap();
    assert_eq!(amounts(&raised), vec![("ann".into(), 5000, true)]);
    assert!(a.reserve_met());
    let bob = a.place_bid(&user("bob"), 5100, 2_002).unwrap();
    assert_eq!(amounts(&bob)[1], ("ann".into(), 5200, true));
    let mut b = Auction::new(spec_with_reserve(Increment::Fixed(100), Some(5000)));
    b.advance(1_000);
    let opening = b
        .place_bid_with_max(&user("cid"), 1000, Some(6000), 2_000)
        .unwrap();
    assert_eq!((opening.amount, b.reserve_met()), (5000, true));
}
