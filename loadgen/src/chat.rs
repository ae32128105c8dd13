//! Chat traffic: two members per conversation, messages and typing on fixed schedules, each
//! member timing what the other one sent.

use super::*;

/// Chat: two members per conversation of this worker; one task sends the chat and typing
/// schedules (from the shared start), a reader per member times what the other one sent.
pub(crate) async fn chat(ctx: Arc<Ctx>, run_id: u64) -> Vec<tokio::task::JoinHandle<()>> {
    let s = &ctx.scenario;
    let parts = s.workers.max(1);
    let part = s.worker_index.unwrap_or(0);
    if s.conversations == 0 || (s.chat_rate <= 0.0 && s.typing_rate <= 0.0) {
        return Vec::new();
    }
    let mut tasks = Vec::new();
    let mut members = std::collections::HashMap::new();
    for c in (0..s.conversations).filter(|c| c % parts == part) {
        let Ok(channel) = Channel::parse(&format!("conversation:lg{run_id}-c{c}")) else {
            continue;
        };
        for m in 0..2usize {
            let n = s.viewers + s.bidders + 2 * c + m;
            let user = format!("lgc{c}m{m}");
            let claims = Claims {
                sub: user.clone(),
                exp: now_ms() / 1000 + 24 * 3600,
                roles: None,
                channels: Some(vec![channel.to_string()]),
            };
            let token = sign_hs256(s.jwt_secret.as_bytes(), &claims).unwrap_or_default();
            let Some(client) = open(&ctx, n, token, Some(&channel)).await else {
                continue;
            };
            let (mut reader, writer) = client.split();
            members.insert((c, m), (channel.clone(), writer));
            let ctx = Arc::clone(&ctx);
            tasks.push(tokio::spawn(async move {
                while let Ok(Incoming::Frame(frame)) = reader.next().await {
                    match frame {
                        ServerFrame::Event(e) if e.event == "message" => {
                            if e.from.as_ref().map(|u| u.as_str()) == Some(user.as_str()) {
                                continue;
                            }
                            ctx.stats.chat_received.fetch_add(1, Ordering::Relaxed);
                            #[derive(serde::Deserialize)]
                            struct Sent {
                                k: u64,
                            }
                            let sent = e.data.decode::<Sent>().ok();
                            let due = sent.and_then(|Sent { k }| {
                                let start = *ctx.start.get()?;
                                let rate = ctx.scenario.chat_rate;
                                Some(Schedule { start, rate }.due(k))
                            });
                            if let Some(at) = due {
                                ctx.record(Metric::Chat, n, at.elapsed());
                            }
                        }
                        ServerFrame::Typing { .. } => {
                            ctx.stats.typing_received.fetch_add(1, Ordering::Relaxed);
                        }
                        ServerFrame::Ok {
                            result: Reply::Published { .. },
                            ..
                        } => {
                            ctx.stats.chat_published.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            }));
        }
    }
    let senders = Arc::new(members);
    for typing in [false, true] {
        let rate = if typing { s.typing_rate } else { s.chat_rate };
        if rate <= 0.0 {
            continue;
        }
        let (ctx, senders) = (Arc::clone(&ctx), Arc::clone(&senders));
        tasks.push(tokio::spawn(async move {
            let Some(start) = ctx.start.get().copied() else {
                return;
            };
            let conversations = ctx.scenario.conversations;
            let total = (rate * ctx.scenario.duration.as_secs_f64()).round() as u64;
            let mine = Arc::clone(&senders);
            let events =
                (0..total).filter(move |k| mine.contains_key(&sender_of(*k, conversations)));
            let mut ticks = match pacer::ticks(Schedule { start, rate }, events) {
                Ok(ticks) => ticks,
                Err(error) => return ctx.error("pacer", error.to_string()),
            };
            while let Some(k) = ticks.recv().await {
                let Some((channel, writer)) = senders.get(&sender_of(k, conversations)) else {
                    continue;
                };
                let frame = if typing {
                    ctx.stats.typing_sent.fetch_add(1, Ordering::Relaxed);
                    ClientFrame::Typing {
                        id: k,
                        channel: channel.clone(),
                        typing: k % 2 == 0,
                    }
                } else {
                    ctx.stats.chat_sent.fetch_add(1, Ordering::Relaxed);
                    ClientFrame::Publish {
                        id: k,
                        channel: channel.clone(),
                        data: json!({ "k": k }).into(),
                    }
                };
                if writer.send(&frame).await.is_err() {
                    return;
                }
            }
            if let Err(error) = ticks.finished() {
                ctx.error("pacer", error.to_string());
            }
        }));
    }
    tasks
}

/// Which conversation and member send message `k` of a schedule: conversations in turn, the
/// two members alternating.
fn sender_of(k: u64, conversations: usize) -> (usize, usize) {
    (
        (k as usize) % conversations,
        (k as usize / conversations) % 2,
    )
}
