//! Keeps the auction registry in step with the cluster: loads the auctions after each
//! (re)connection, adopts those other nodes create and refreshes those they change.

use super::*;

/// Keeps the auction registry in step with the cluster: after each pub/sub (re)connection,
/// once the control channel is subscribed (so no notice falls between), loads every auction,
/// retrying until Redis answers, and makes every actor catch up; in between, adopts auctions
/// other nodes create and refreshes those they change.
pub(crate) async fn follow_auctions(
    cluster: Arc<Cluster>,
    shared: Arc<crate::Shared>,
    mut control_rx: mpsc::Receiver<Control>,
) {
    let shutdown = shared.shutdown.clone();
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    lost_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let control = tokio::select! {
            _ = shutdown.cancelled() => return,
            control = control_rx.recv() => match control { Some(c) => c, None => return },
            // Notices were dropped (queue full): reload as after a reconnection.
            _ = lost_check.tick(), if cluster.control_lost.load(Ordering::Acquire) => {
                cluster.control_lost.store(false, Ordering::Release);
                Control::Resubscribed
            }
        };
        match control {
            Control::Created(id) => {
                if let Err(error) = shared.auctions.adopt(&id).await {
                    tracing::warn!(auction = %id, %error, "could not load an auction another node created");
                }
            }
            Control::Changed(id, version) => {
                if !shared.auctions.is_live(&id) {
                    let _ = shared.auctions.adopt(&id).await;
                } else {
                    shared.auctions.changed(&id, version);
                }
            }
            Control::Resubscribed => {
                loop {
                    match shared.auctions.load().await {
                        Ok(count) => {
                            tracing::info!(auctions = count, "auctions loaded from the cluster");
                            cluster.set_auctions_loaded();
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "loading auctions from the cluster failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            }
                        }
                    }
                }
                // Changes announced while disconnected were missed: every actor catches up.
                shared.auctions.refresh_all();
            }
        }
    }
}
