//! The load generator's scenarios, run small against a real server: they keep working, and under
//! concurrent load (group commit of many submissions and acknowledgements) every accepted message
//! reaches its recipient exactly once. Speed is measured by `fumi-bench`, never asserted here.

mod common;

use std::time::Duration;

use common::Server;

fn bench_server() -> Server {
    Server::start_with_env(&[
        ("FUMI_REGISTRATIONS_PER_MINUTE", "0"),
        ("FUMI_DEVICE_REQUESTS_PER_MINUTE", "0"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_are_each_delivered_exactly_once() {
    let server = bench_server();
    let http = reqwest::Client::new();
    let timeout = Duration::from_secs(60);
    let report = fumi_bench::throughput(&http, &server.url, 8, 50, 8, 300, timeout)
        .await
        .unwrap();
    assert_eq!(report["accepted"], 400, "{report}");
    assert_eq!(report["delivered"], 400, "{report}");
    assert_eq!(report["delivered_more_than_once"], 0, "{report}");

    let report = fumi_bench::latency(&http, &server.url, 200, 1, 4, 300, timeout)
        .await
        .unwrap();
    assert_eq!(report["delivered"], report["sent"], "{report}");

    let report = fumi_bench::fanout(&http, &server.url, 30, 2, timeout).await.unwrap();
    for round in report["rounds"].as_array().unwrap() {
        assert_eq!(round["members_reached"], 30, "{report}");
    }

    // A channel post is pushed once to every online subscriber; offline ones fetch both posts.
    let report = fumi_bench::channel(&http, &server.url, 40, 25, 2, timeout)
        .await
        .unwrap();
    assert_eq!(report["subscribers"], 40, "{report}");
    for round in report["posts"].as_array().unwrap() {
        assert_eq!(round["online_reached"], 25, "{report}");
    }
    assert_eq!(report["offline_posts_fetched"], 15 * 2, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_no_accepted_message_and_duplicates_none() {
    use std::sync::{Arc, Mutex};

    use fumi_bench::sim::{Arrivals, SimDevice, fingerprint, random};
    use fumi_proto::MessageId;

    let mut server = bench_server();
    // No pooled connections: each request reaches the server that is running now.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    for _ in 0..4 {
        senders.push(Arc::new(SimDevice::register(&http, &server.url, 0).await.unwrap()));
        recipients.push(SimDevice::register(&http, &server.url, 1).await.unwrap());
    }
    let mut groups = Vec::new();
    for (sender, recipient) in senders.iter().zip(&recipients) {
        groups.push(sender.create_group(&[recipient]).await.unwrap().0);
    }

    // Each sender submits until the server dies; what got an OK is "accepted".
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let unconfirmed = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (sender, group) in senders.iter().zip(&groups) {
        let (sender, group) = (sender.clone(), *group);
        let (accepted, unconfirmed) = (accepted.clone(), unconfirmed.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..5_000 {
                let (message, to) = sender.encrypt(group, 300).unwrap();
                let id = MessageId::from_bytes(random());
                match sender.submit_with_id(id, message.clone(), to.clone()).await {
                    Ok(()) => accepted.lock().unwrap().push(fingerprint(&message)),
                    Err(_) => {
                        unconfirmed.lock().unwrap().push((sender.clone(), id, message, to));
                        return;
                    }
                }
            }
        }));
    }
    // Kill it once messages are flowing (bounded: senders that all failed early end the wait).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < 200 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    for task in tasks {
        task.await.unwrap();
    }
    server.restart();
    let confirmed_before_crash = accepted.lock().unwrap().len();

    // The senders retry what they never got an answer for, with the same ids and bytes.
    let retries: Vec<_> = unconfirmed.lock().unwrap().drain(..).collect();
    for (sender, id, message, to) in retries {
        sender.submit_with_id(id, message.clone(), to).await.unwrap();
        accepted.lock().unwrap().push(fingerprint(&message));
    }

    let arrivals = Arrivals::default();
    let mut listeners = Vec::new();
    for recipient in &recipients {
        listeners.push(recipient.listen_with(arrivals.clone(), true).await.unwrap());
    }
    let accepted = accepted.lock().unwrap().clone();
    arrivals
        .wait_for(accepted.len(), std::time::Instant::now() + Duration::from_secs(60))
        .await;
    assert!(confirmed_before_crash >= 200);
    for key in &accepted {
        assert_eq!(arrivals.copies(key).0, 1, "an accepted message arrived 0 or 2+ times");
    }
    // Nothing arrived that was not accepted (the welcome backlog aside, which is not counted
    // because each recipient's Welcome is a different message and arrived once).
    assert_eq!(
        arrivals.count(),
        accepted.len() + recipients.len(),
        "unexpected extra deliveries"
    );
    assert_eq!(arrivals.duplicates(), 0);
}
