//! Rooms across nodes: a room that was empty when its first subscriber came recovers with
//! `since` like any other; a node killed and restarted under the same `--node-id` leaves no
//! stale viewers behind; a node that begins to follow a room answers with the cluster's totals.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_empty_when_subscribed_recovers_with_since_on_any_node() {
    let cluster = Cluster::start(2).await;
    for (room, back_on) in [("auction:fresh-same", 0), ("auction:fresh-other", 1)] {
        let mut first = cluster.connect(0, None).await;
        let Reply::Subscribed { seq, epoch, .. } = first.subscribe(room).await else {
            panic!()
        };
        // No event yet: Redis has no run of seqs for the room, and a subscriber starts none.
        assert_eq!((seq, epoch), (0, 0), "{room}");
        for n in 0..3 {
            assert_eq!(
                cluster.publish(1, room, "note", json!({"n": n})).await.0,
                200
            );
        }
        // The first event names the run's epoch; the others do not repeat it.
        let opening = first.next_event().await;
        assert_eq!(opening.seq, 1, "{room}");
        let epoch = opening.epoch.expect("seq 1 carries its epoch");
        assert_ne!(epoch, 0);
        assert_eq!(events(&mut first, 2).await, vec![(2, 1), (3, 2)], "{room}");
        drop(first);
        for n in 3..5 {
            assert_eq!(
                cluster.publish(0, room, "note", json!({"n": n})).await.0,
                200
            );
        }
        let mut back = cluster.connect(back_on, None).await;
        let Reply::Subscribed {
            recovered,
            epoch: now,
            ..
        } = back.subscribe_since(room, Some(3), Some(epoch)).await
        else {
            panic!()
        };
        assert_eq!((recovered, now), (Some(true), epoch), "{room}");
        assert_eq!(events(&mut back, 2).await, vec![(4, 3), (5, 4)], "{room}");
    }
    // One that left before the first event (since 0, epoch 0) gets every event of the run.
    let mut early = cluster.connect(1, None).await;
    early.subscribe("auction:fresh-missed").await;
    drop(early);
    for n in 0..2 {
        let (status, _) = cluster
            .publish(0, "auction:fresh-missed", "note", json!({"n": n}))
            .await;
        assert_eq!(status, 200);
    }
    let mut back = cluster.connect(1, None).await;
    let Reply::Subscribed { recovered, .. } = back
        .subscribe_since("auction:fresh-missed", Some(0), Some(0))
        .await
    else {
        panic!()
    };
    assert_eq!(recovered, Some(true));
    assert_eq!(events(&mut back, 2).await, vec![(1, 0), (2, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_under_its_id_leaves_no_stale_viewers() {
    // A TTL longer than the test: the killed process is never reaped here, so only its
    // successor (same `--node-id`, as deploy/ configures) can take its viewers out.
    const TTL_MS: u64 = 120_000;
    let mut cluster = Cluster::start(0).await;
    let a = cluster.add_node(TTL_MS, &[]).await;
    let b = cluster.add_node(TTL_MS, &["--node-id", "fixed-b"]).await;
    let mut viewers = Vec::new();
    for node in [a, b, b, b] {
        let mut c = cluster.connect(node, None).await;
        c.subscribe("auction:restart").await;
        viewers.push(c);
    }
    eventually("node a counts four viewers", || async {
        connections(&cluster, a).await == Some(4)
    })
    .await;
    let (mut killed, _) = cluster.nodes.remove(b);
    killed.kill().unwrap();
    killed.wait().unwrap();
    viewers.truncate(1);
    let b = cluster.add_node(TTL_MS, &["--node-id", "fixed-b"]).await;
    eventually(
        "the killed process's three viewers leave the counts",
        || async { connections(&cluster, a).await == Some(1) },
    )
    .await;
    // The new process's own viewers count.
    let mut again = cluster.connect(b, None).await;
    again.subscribe("auction:restart").await;
    eventually("two viewers", || async {
        connections(&cluster, a).await == Some(2)
    })
    .await;
}

/// The viewer connections `node` shows for the room of the restart test.
async fn connections(cluster: &Cluster, node: usize) -> Option<u64> {
    cluster.room(node, "auction:restart").await["connections"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_begins_to_follow_a_room_answers_with_the_cluster_totals() {
    let cluster = Cluster::start(2).await;
    let mut crowd = Vec::new();
    for _ in 0..3 {
        let mut c = cluster.connect(1, None).await;
        c.subscribe("auction:crowd").await;
        crowd.push(c);
    }
    eventually("Redis published three viewers", || async {
        cluster
            .redis
            .cli(&["GET", "gavel:pres:auction:crowd:last"])
            .starts_with("V3 3 3 3 ")
    })
    .await;
    // Node 0 did not follow the room: its reply carries the totals as last published (the
    // newcomer is counted in the next `viewers` frame), not its own count of one.
    let mut newcomer = cluster.connect(0, None).await;
    let Reply::Subscribed { viewers, .. } = newcomer.subscribe("auction:crowd").await else {
        panic!()
    };
    assert_eq!((viewers.connections, viewers.users), (3, 3));
    loop {
        if let ServerFrame::Viewers { viewers, .. } = newcomer.recv().await {
            if viewers.connections == 4 {
                break;
            }
        }
    }
}

/// A node whose pub/sub connection drops while a room it follows, still without events, gets
/// its first events: the resync that follows sends them to its subscribers (who saw nothing),
/// rather than keeping them as history only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_first_run_published_during_a_resync_reach_the_subscribers() {
    let cluster = Cluster::start(2).await;
    let mut viewer = cluster.connect(0, None).await;
    let Reply::Subscribed { epoch, .. } = viewer.subscribe("auction:quiet-start").await else {
        panic!()
    };
    assert_eq!(epoch, 0);
    // Node 0's pub/sub connection is cut (it is the one subscribed to the most channels: it
    // follows the room, node 1 does not); node 1 publishes while node 0 reconnects.
    let clients = cluster.redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]);
    let field = |line: &str, name: &str| -> Option<String> {
        line.split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let node0 = clients
        .lines()
        .max_by_key(|l| field(l, "sub").and_then(|n| n.parse::<u32>().ok()))
        .and_then(|l| field(l, "id"))
        .expect("a pub/sub client");
    cluster.redis.cli(&["CLIENT", "KILL", "ID", &node0]);
    for n in 0..3 {
        let (status, _) = cluster
            .publish(1, "auction:quiet-start", "note", json!({"n": n}))
            .await;
        assert_eq!(status, 200);
    }
    assert_eq!(events(&mut viewer, 3).await, vec![(1, 0), (2, 1), (3, 2)]);
}
