//! Conversations: messages, typing (delivered, never stored), read receipts, joined/left.

use gavel_broker::protocol::{ClientFrame, Reply, ServerFrame};
use serde_json::json;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_typing_receipts_and_joins() {
    let b = TestBroker::start(|_| {}).await;
    let conv = channel("conversation:c1");
    let mut ann = b.connect(Some("ann")).await;
    ann.subscribe("conversation:c1").await;
    let mut bob = b.connect(Some("bob")).await;
    bob.subscribe("conversation:c1").await;

    // Ann is told bob joined.
    loop {
        if let ServerFrame::Joined { user, .. } = ann.recv().await {
            assert_eq!(user.as_str(), "bob");
            break;
        }
    }

    // Bob types: ann sees it; bob's own connection does not get his typing back.
    let done = bob
        .request(|id| ClientFrame::Typing {
            id,
            channel: conv.clone(),
            typing: true,
        })
        .await
        .unwrap();
    assert_eq!(done, Reply::Done {});
    loop {
        if let ServerFrame::Typing { user, typing, .. } = ann.recv().await {
            assert_eq!((user.as_str(), typing), ("bob", true));
            break;
        }
    }

    // Bob sends a message: both get it as event seq 1 from bob.
    let reply = bob
        .request(|id| ClientFrame::Publish {
            id,
            channel: conv.clone(),
            data: json!({"text": "hi"}).into(),
        })
        .await
        .unwrap();
    assert_eq!(
        reply,
        Reply::Published {
            channel: conv.clone(),
            seq: 1
        }
    );
    for c in [&mut ann, &mut bob] {
        let event = c.next_event().await;
        assert_eq!((event.event.as_str(), event.seq), ("message", 1));
        assert_eq!(event.from.as_ref().map(|u| u.as_str()), Some("bob"));
        assert_eq!(event.data.to_json(), json!({"text": "hi"}));
    }

    // Ann reads it: a `read` event with the next seq.
    let reply = ann
        .request(|id| ClientFrame::Read {
            id,
            channel: conv.clone(),
            seq: 1,
        })
        .await
        .unwrap();
    assert_eq!(
        reply,
        Reply::Published {
            channel: conv.clone(),
            seq: 2
        }
    );
    let receipt = bob.next_event().await;
    assert_eq!(
        (receipt.event.as_str(), receipt.data.to_json()),
        ("read", json!({"seq": 1}))
    );
    // A receipt for a seq that does not exist is refused.
    let err = ann
        .request(|id| ClientFrame::Read {
            id,
            channel: conv.clone(),
            seq: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, gavel_broker::protocol::ErrorCode::InvalidRequest);

    // Typing was not stored: a recovering client replays only the message and the receipt.
    let mut later = b.connect(Some("cy")).await;
    let reply = later
        .subscribe_since("conversation:c1", Some(0), None)
        .await;
    assert!(
        matches!(
            reply,
            Reply::Subscribed {
                recovered: Some(true),
                replayed: 2,
                ..
            }
        ),
        "{reply:?}"
    );

    // Bob leaves: ann is told.
    drop(bob);
    loop {
        if let ServerFrame::Left { user, .. } = ann.recv().await {
            assert_eq!(user.as_str(), "bob");
            break;
        }
    }
}
