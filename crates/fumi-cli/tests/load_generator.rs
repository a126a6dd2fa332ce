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
}
