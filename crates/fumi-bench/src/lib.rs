//! The load generator's scenarios, as a library so that the test suite can run each one small
//! (`crates/fumi-cli/tests/load_generator.rs`); `main.rs` is the command line around them.

pub mod sim;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use fumi_proto::endpoints;
use futures_util::future::try_join_all;
use serde_json::{Value, json};

use crate::sim::{Arrivals, SimDevice, fingerprint};

/// Registers `count` devices, 64 at a time.
async fn register_many(
    http: &reqwest::Client,
    server: &str,
    count: usize,
    key_packages: usize,
) -> Result<Vec<SimDevice>> {
    let mut devices = Vec::with_capacity(count);
    while devices.len() < count {
        let batch = (count - devices.len()).min(64);
        devices.extend(try_join_all((0..batch).map(|_| SimDevice::register(http, server, key_packages))).await?);
    }
    Ok(devices)
}

/// Senders and recipients in 1:1 groups, recipients listening.
struct Pairs {
    senders: Vec<SimDevice>,
    groups: Vec<fumi_proto::GroupId>,
    _recipients: Vec<SimDevice>,
    _listeners: Vec<tokio::task::JoinHandle<()>>,
}

/// `server` may list several nodes of a cluster, comma-separated: senders then use the first
/// and recipients listen on the last, so every message crosses nodes.
async fn pairs(http: &reqwest::Client, server: &str, count: usize, arrivals: &Arrivals) -> Result<Pairs> {
    let nodes: Vec<&str> = server.split(',').map(str::trim).collect();
    let senders = register_many(http, nodes[0], count, 0).await?;
    let recipients = register_many(http, nodes[nodes.len() - 1], count, 1).await?;
    let groups = try_join_all(
        senders
            .iter()
            .zip(&recipients)
            .map(|(s, r)| async move { Ok::<_, anyhow::Error>(s.create_group(&[r]).await?.0) }),
    )
    .await?;
    let listeners = try_join_all(recipients.iter().map(|r| r.listen(arrivals.clone()))).await?;
    Ok(Pairs {
        senders,
        groups,
        _recipients: recipients,
        _listeners: listeners,
    })
}

/// N senders × M messages, `in_flight` requests per sender; accepted and delivered per second.
pub async fn throughput(
    http: &reqwest::Client,
    server: &str,
    senders: usize,
    messages: usize,
    in_flight: usize,
    size: usize,
    timeout: Duration,
) -> Result<Value> {
    let arrivals = Arrivals::default();
    let setup = pairs(http, server, senders, &arrivals).await?;
    let encrypt_started = Instant::now();
    let mut prepared = Vec::with_capacity(senders);
    let mut ciphertext_bytes = 0;
    for (sender, group) in setup.senders.iter().zip(&setup.groups) {
        let mut batch = Vec::with_capacity(messages);
        for _ in 0..messages {
            let (message, recipients) = sender.encrypt(*group, size)?;
            ciphertext_bytes += message.len();
            batch.push((message, recipients));
        }
        prepared.push(batch);
    }
    let total = senders * messages;
    let encrypt_seconds = encrypt_started.elapsed().as_secs_f64();

    let started = Instant::now();
    let accepted = Arc::new(AtomicUsize::new(0));
    try_join_all(setup.senders.iter().zip(prepared).map(|(sender, batch)| {
        let accepted = accepted.clone();
        async move {
            let queue = tokio::sync::Mutex::new(batch.into_iter());
            try_join_all((0..in_flight).map(|_| async {
                loop {
                    let next = queue.lock().await.next();
                    let Some((message, recipients)) = next else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    sender.submit(message, recipients).await?;
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }))
            .await
        }
    }))
    .await?;
    let accept_seconds = started.elapsed().as_secs_f64();
    let delivered = arrivals.wait_for(total, Instant::now() + timeout).await;
    let deliver_seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "scenario": "throughput",
        "senders": senders,
        "messages": total,
        "mean_ciphertext_bytes": ciphertext_bytes / total.max(1),
        "accepted": accepted.load(Ordering::Relaxed),
        "accepted_per_second": accepted.load(Ordering::Relaxed) as f64 / accept_seconds,
        "delivered": delivered,
        "delivered_more_than_once": arrivals.duplicates(),
        "delivered_per_second": delivered as f64 / deliver_seconds,
        "seconds_to_accept_all": accept_seconds,
        "seconds_to_deliver_all": deliver_seconds,
        "client_mls_encrypts_per_second": total as f64 / encrypt_seconds,
    }))
}

/// An open-loop steady `rate` over `pairs` conversations; send-to-receipt percentiles.
pub async fn latency(
    http: &reqwest::Client,
    server: &str,
    rate: u64,
    seconds: u64,
    pair_count: usize,
    size: usize,
    timeout: Duration,
) -> Result<Value> {
    let arrivals = Arrivals::default();
    let setup = pairs(http, server, pair_count, &arrivals).await?;
    let total = (rate * seconds) as usize;
    let mut prepared = Vec::with_capacity(total);
    for i in 0..total {
        let sender = i % pair_count;
        let (message, recipients) = setup.senders[sender].encrypt(setup.groups[sender], size)?;
        prepared.push((sender, message, recipients));
    }
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let senders = Arc::new(setup.senders);
    let mut sent = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for (i, (sender, message, recipients)) in prepared.into_iter().enumerate() {
        // Open loop: each message leaves at its scheduled time, whatever the server's pace.
        tokio::time::sleep_until((started + interval * i as u32).into()).await;
        let key = fingerprint(&message);
        let at = Instant::now();
        sent.push((key, at));
        let senders = senders.clone();
        tasks.push(tokio::spawn(async move {
            senders[sender].submit(message, recipients).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let delivered = arrivals.wait_for(total, Instant::now() + timeout).await;
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(key, at)| arrivals.get(key).map(|arrived| (arrived - *at).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    Ok(json!({
        "scenario": "latency",
        "rate_per_second": rate,
        "seconds": seconds,
        "sent": total,
        "delivered": delivered,
        "p50_ms": percentile(0.50),
        "p95_ms": percentile(0.95),
        "p99_ms": percentile(0.99),
        "max_ms": percentile(1.0),
    }))
}

/// One message at a time into a group of `members` other devices, all online.
pub async fn fanout(
    http: &reqwest::Client,
    server: &str,
    members: usize,
    rounds: usize,
    timeout: Duration,
) -> Result<Value> {
    let sender = SimDevice::register(http, server, 0).await?;
    let others = register_many(http, server, members, 1).await?;
    let setup_started = Instant::now();
    let (group, largest_welcome) = sender.create_group(&others.iter().collect::<Vec<_>>()).await?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let arrivals = Arrivals::default();
    let _listeners = try_join_all(others.iter().map(|o| o.listen(arrivals.clone()))).await?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        // Every member gets the same bytes: count the copies of this message.
        let (message, recipients) = sender.encrypt(group, 300)?;
        let key = fingerprint(&message);
        let started = Instant::now();
        sender.submit(message, recipients).await?;
        let accepted_ms = started.elapsed().as_secs_f64() * 1000.0;
        let reached = arrivals.wait_for_copies(&key, members, Instant::now() + timeout).await;
        let last_ms = arrivals
            .copies(&key)
            .1
            .map(|last| (last - started).as_secs_f64() * 1000.0);
        times.push(json!({"accepted_ms": accepted_ms, "last_member_ms": last_ms, "members_reached": reached}));
    }
    Ok(json!({
        "scenario": "fanout",
        "member_devices": members,
        "group_setup_seconds": setup_seconds,
        "largest_welcome_bytes": largest_welcome,
        "rounds": times,
    }))
}

/// `count` idle delivery WebSockets and the server's resident memory (with its pid).
pub async fn connections(http: &reqwest::Client, server: &str, count: usize, server_pid: Option<u32>) -> Result<Value> {
    let rss = |pid: Option<u32>| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    };
    let devices = register_many(http, server, count, 0).await?;
    let before = rss(server_pid);
    let arrivals = Arrivals::default();
    let started = Instant::now();
    let mut listeners = Vec::with_capacity(count);
    for chunk in devices.chunks(256) {
        listeners.extend(try_join_all(chunk.iter().map(|d| d.listen(arrivals.clone()))).await?);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(server_pid);
    let per_connection = match (before, after) {
        (Some(b), Some(a)) => json!((a.saturating_sub(b)) as f64 * 1024.0 / count as f64),
        _ => Value::Null,
    };
    let open = listeners.iter().filter(|l| !l.is_finished()).count();
    Ok(json!({
        "scenario": "connections",
        "connections": count,
        "open_after_2s": open,
        "seconds_to_connect": connect_seconds,
        "server_rss_kib_before": before,
        "server_rss_kib_after": after,
        "server_rss_bytes_per_connection": per_connection,
    }))
}

/// A channel with `subscribers` subscribed accounts, `online` of them listening: per post, the
/// organisation's cost (one signature and one encryption, whatever the audience), the time
/// until the last online subscriber has it, and how fast offline subscribers fetch it later.
pub async fn channel(
    http: &reqwest::Client,
    server: &str,
    subscribers: usize,
    online: usize,
    posts: usize,
    timeout: Duration,
) -> Result<Value> {
    let online = online.min(subscribers);
    let organisation = SimDevice::register(http, server, 0).await?;
    let (channel, key) = organisation.create_channel().await?;
    let setup_started = Instant::now();
    let devices = register_many(http, server, subscribers, 0).await?;
    for chunk in devices.chunks(256) {
        try_join_all(chunk.iter().map(|d| d.call(endpoints::SUBSCRIBE, &[&channel], ""))).await?;
    }
    let arrivals = Arrivals::default();
    let mut listeners = Vec::with_capacity(online);
    for chunk in devices[..online].chunks(256) {
        listeners.extend(try_join_all(chunk.iter().map(|d| d.listen(arrivals.clone()))).await?);
    }
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    let mut rounds = Vec::with_capacity(posts);
    for seq in 1..=posts as u64 {
        let started = Instant::now();
        let sealed = organisation.seal_post(channel, &key, seq, 300);
        let seal_us = started.elapsed().as_secs_f64() * 1e6;
        let (post_bytes, fingerprint) = (sealed.len(), fingerprint(&sealed));
        organisation.submit_post(channel, seq, sealed).await?;
        let accepted_ms = started.elapsed().as_secs_f64() * 1000.0;
        let reached = arrivals
            .wait_for_copies(&fingerprint, online, Instant::now() + timeout)
            .await;
        let last_ms = arrivals
            .copies(&fingerprint)
            .1
            .map(|last| (last - started).as_secs_f64() * 1000.0);
        rounds.push(json!({
            "organisation_seal_us": seal_us,
            "sealed_post_bytes": post_bytes,
            "accepted_ms": accepted_ms,
            "last_online_subscriber_ms": last_ms,
            "online_reached": reached,
        }));
    }
    // Offline subscribers catch up by number when they come online: a sample fetches the posts.
    let offline = &devices[online..];
    let sample = offline.len().min(2000);
    let fetched = AtomicUsize::new(0);
    let fetch_started = Instant::now();
    for chunk in offline[..sample].chunks(64) {
        try_join_all(chunk.iter().map(|d| async {
            let page: fumi_proto::ChannelPosts = d
                .call(endpoints::CHANNEL_POSTS, &[&channel], "?after=0")
                .await?
                .json()
                .await?;
            fetched.fetch_add(page.posts.len(), Ordering::Relaxed);
            Ok::<_, anyhow::Error>(())
        }))
        .await?;
    }
    let fetch_seconds = fetch_started.elapsed().as_secs_f64();
    let state: fumi_proto::ChannelState = devices[0]
        .call(endpoints::CHANNEL, &[&channel], "")
        .await?
        .json()
        .await?;
    drop(listeners);
    Ok(json!({
        "scenario": "channel",
        "subscribers": state.subscribers,
        "online_subscribers": online,
        "setup_seconds": setup_seconds,
        "posts": rounds,
        "offline_sample": sample,
        "offline_posts_fetched": fetched.load(Ordering::Relaxed),
        "offline_fetches_per_second": if fetch_seconds > 0.0 { sample as f64 / fetch_seconds } else { 0.0 },
    }))
}
