//! `fumi-bench`: a load generator for a running Fumi server (127.0.0.1 only). Each scenario
//! registers simulated devices, builds real MLS groups, then drives the server over HTTP and the
//! delivery WebSocket, and prints a readable summary and, with `--json`, one JSON object.
//! Every loop is bounded in count and in time. Start the server with rate limits off:
//!
//! ```sh
//! FUMI_REGISTRATIONS_PER_MINUTE=0 FUMI_DEVICE_REQUESTS_PER_MINUTE=0 fumi server --data /tmp/bench
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fumi_bench::{channel, connections, fanout, latency, throughput};
use serde_json::Value;

#[derive(Parser)]
#[command(version, about = "Load generator for a running Fumi server (127.0.0.1 only)")]
struct Cli {
    /// The server's URL; must be on 127.0.0.1 or localhost. For a cluster, several URLs,
    /// comma-separated: throughput and latency send through the first and receive on the last.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// Print one JSON object instead of the summary.
    #[arg(long, global = true)]
    json: bool,
    /// Give up waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 120, global = true)]
    timeout: u64,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N senders × M messages, each sender in its own 1:1 conversation; accepted (durably) and
    /// delivered messages per second.
    Throughput {
        /// Senders (each with one recipient).
        #[arg(long, default_value_t = 50)]
        senders: usize,
        /// Messages per sender.
        #[arg(long, default_value_t = 400)]
        messages: usize,
        /// Requests in flight per sender.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
        /// Plaintext bytes per message (the MLS ciphertext adds about 80).
        #[arg(long, default_value_t = 300)]
        size: usize,
    },
    /// A steady total rate over several conversations; send-to-receipt latency percentiles.
    Latency {
        /// Messages per second, in total.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Conversations (sender/recipient pairs) the messages are spread over.
        #[arg(long, default_value_t = 20)]
        pairs: usize,
        /// Plaintext bytes per message.
        #[arg(long, default_value_t = 300)]
        size: usize,
    },
    /// One message into a group of G other member devices, all online; time until the last has it.
    Fanout {
        /// Member devices besides the sender (a Fumi group has at most 1000 devices).
        #[arg(long, default_value_t = 999)]
        members: usize,
        /// Messages sent, one after another (each measured).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// One post to a channel of S subscribed accounts, O of them online: the organisation's
    /// cost, the time until the last online subscriber has it, offline catch-up speed.
    Channel {
        /// Subscribed accounts.
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// How many of them listen on a WebSocket (each is an open file on both sides).
        #[arg(long, default_value_t = 1000)]
        online: usize,
        /// Posts, one after another (each measured).
        #[arg(long, default_value_t = 3)]
        posts: usize,
    },
    /// Opens N idle delivery WebSockets and reports the server's resident memory before and after.
    Connections {
        /// Connections (each a device of its own account).
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// The server's process id, to read its resident memory from /proc.
        #[arg(long)]
        server_pid: Option<u32>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    for server in cli.server.split(',') {
        let host = reqwest::Url::parse(server.trim())
            .context("--server must be a URL (or several, comma-separated, for a cluster)")?
            .host_str()
            .unwrap_or_default()
            .to_owned();
        if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
            bail!("fumi-bench drives only a server on this machine (127.0.0.1), not {host}");
        }
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let timeout = Duration::from_secs(cli.timeout);
    let report = match cli.scenario {
        Scenario::Throughput {
            senders,
            messages,
            in_flight,
            size,
        } => throughput(&http, &cli.server, senders, messages, in_flight, size, timeout).await?,
        Scenario::Latency {
            rate,
            seconds,
            pairs,
            size,
        } => latency(&http, &cli.server, rate, seconds, pairs, size, timeout).await?,
        Scenario::Fanout { members, rounds } => fanout(&http, &cli.server, members, rounds, timeout).await?,
        Scenario::Channel {
            subscribers,
            online,
            posts,
        } => channel(&http, &cli.server, subscribers, online, posts, timeout).await?,
        Scenario::Connections { count, server_pid } => connections(&http, &cli.server, count, server_pid).await?,
    };
    if cli.json {
        println!("{report}");
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn print_summary(report: &Value) {
    let Some(fields) = report.as_object() else { return };
    for (key, value) in fields {
        match value {
            Value::Number(n) if n.is_f64() => println!("{key:<28} {:.2}", n.as_f64().unwrap_or_default()),
            other => println!("{key:<28} {other}"),
        }
    }
}
