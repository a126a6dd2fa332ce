//! Cluster mode: two `fumi server` nodes on one PostgreSQL database (a schema of their own) and a
//! private NATS server. Clients on different nodes exchange 1:1 and group messages pushed across
//! nodes; a node killed with SIGKILL while messages flow loses no acknowledged message and
//! duplicates none once its clients reach the other node; a node that loses NATS says so and still
//! delivers by re-reading mailboxes.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FUMI, Server, User, fumi_ok, hex_encode};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A NATS server of this test's own, on a free port; killed when dropped.
struct Nats {
    child: Child,
    url: String,
}

impl Nats {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cluster tests need {NATS_SERVER} (apt-get install nats-server): {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two nodes sharing a database schema, the blob store and the transparency log key.
struct Cluster {
    nodes: Vec<Server>,
    database: String,
    schema: String,
    _blobs: tempfile::TempDir,
}

impl Cluster {
    fn start(nats: &Nats) -> Self {
        let database = std::env::var("FUMI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let schema = format!("cluster_{}", hex_encode(&rand::random::<[u8; 8]>()));
        let blobs = tempfile::tempdir().unwrap();
        let config = format!(
            "database = \"{database}\"\ndatabase_schema = \"{schema}\"\nnats_url = \"{}\"\n\
             nats_subject_prefix = \"{schema}\"\nblob_store = \"{}\"\n",
            nats.url,
            blobs.path().display()
        );
        let first = Server::start_configured(&config, None);
        // Written once the first node has opened its log (just after it printed its address).
        let key_file = first.data_dir().join("audit-log.key");
        let deadline = Instant::now() + Duration::from_secs(10);
        let key = loop {
            match std::fs::read(&key_file) {
                Ok(key) if key.len() == 64 => break key,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                other => panic!("no transparency log key: {other:?}"),
            }
        };
        let second = Server::start_configured(&config, Some(&key));
        Cluster {
            nodes: vec![first, second],
            database,
            schema,
            _blobs: blobs,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = Command::new("psql")
            .args([
                self.database.as_str(),
                "-X",
                "-q",
                "-c",
                &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema),
            ])
            .output();
    }
}

/// A TCP forwarder standing in for a load balancer: clients keep its address while it sends new
/// connections to whichever node is current.
struct Balancer {
    url: String,
    target: Arc<Mutex<String>>,
}

impl Balancer {
    fn new(node: &Server) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = Arc::new(Mutex::new(address(node)));
        let current = target.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(current.lock().unwrap().as_str()) else {
                    continue; // the client sees a reset and retries
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Balancer { url, target }
    }

    fn switch_to(&self, node: &Server) {
        *self.target.lock().unwrap() = address(node);
    }
}

fn address(node: &Server) -> String {
    node.url.trim_start_matches("http://").to_owned()
}

fn register_at(url: &str, nickname: &str) -> User {
    let home = tempfile::tempdir().unwrap();
    let out = fumi_ok(
        home.path(),
        &["register", "--server", url, "--name", nickname, "--username", nickname],
    );
    let username = out.trim().strip_prefix("registered ").unwrap().to_owned();
    User { home, username }
}

/// `fumi receive --timeout SECONDS --json` started in the background.
fn listen(user: &User, seconds: u64) -> Child {
    Command::new(FUMI)
        .args([
            "--home",
            user.home.path().to_str().unwrap(),
            "receive",
            "--json",
            "--timeout",
        ])
        .arg(seconds.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn texts_of(mut child: Child) -> Vec<String> {
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["event"] == false)
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

/// How many delivery connections of `node` have drained their mailbox and wait for pushes.
fn drained(node: &Server) -> u64 {
    let metrics = node.metrics();
    let line = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fumi_deliveries_drained_total "))
        .expect("the drained counter is exported");
    line.trim().parse().unwrap()
}

/// Waits until `count` more delivery connections of `node` than `before` have drained their
/// mailbox: their `receive` now waits for pushed envelopes.
fn settle(node: &Server, before: u64, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while drained(node) < before + count {
        assert!(Instant::now() < deadline, "the listeners never connected");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clients_on_different_nodes_get_direct_and_group_messages_pushed_across_nodes() {
    let nats = Nats::start();
    let cluster = Cluster::start(&nats);
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    let alice = register_at(&one.url, "alice");
    let bob = register_at(&two.url, "bob");
    let carol = register_at(&two.url, "carol");

    // Bob listens on node two; Alice sends through node one. Without an event from node one,
    // node two would find the message only at its 30-second mailbox re-read, after Bob stopped.
    alice.ok(&["send", &bob.username, "first contact"]);
    assert_eq!(bob.receive_texts(), ["first contact"]);
    let before = drained(two);
    let listener = listen(&bob, 6);
    settle(two, before, 1);
    alice.ok(&["send", &bob.username, "pushed across nodes"]);
    assert_eq!(texts_of(listener), ["pushed across nodes"]);

    alice.ok(&["group", "create", "Ward 3", &bob.username, &carol.username]);
    let before = drained(two);
    let listeners = [listen(&bob, 6), listen(&carol, 6)];
    settle(two, before, 2);
    alice.ok(&["send", "--group", "Ward 3", "shift change at 7"]);
    for listener in listeners {
        assert_eq!(texts_of(listener), ["shift change at 7"]);
    }
    for node in [one, two] {
        assert!(node.metrics().contains("fumi_cluster_bus_connected 1"));
    }

    // A third node with a transparency log key of its own would fork the shared log: refused.
    let stranger = tempfile::tempdir().unwrap();
    let refused = common::server_command(stranger.path())
        .env("FUMI_DATABASE", &cluster.database)
        .env("FUMI_DATABASE_SCHEMA", &cluster.schema)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("is not the key that signed the log"), "{stderr}");
}

#[test]
fn a_node_killed_while_messages_flow_loses_and_duplicates_nothing() {
    let nats = Nats::start();
    let mut cluster = Cluster::start(&nats);
    let balancer = Balancer::new(&cluster.nodes[0]);
    let alice = register_at(&balancer.url, "alice");
    let bob = register_at(&balancer.url, "bob");
    alice.ok(&["send", &bob.username, "hello"]);
    assert_eq!(bob.receive_texts(), ["hello"]);

    // Alice sends one message after another while node one is killed mid-stream.
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let (home, to, sent) = (alice.home.path().to_owned(), bob.username.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            for i in 0..24 {
                let text = format!("message {i}");
                if common::fumi(&home, &["send", &to, &text]).status.success() {
                    acknowledged.push(text);
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            acknowledged
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 8 {
        assert!(Instant::now() < deadline, "the first messages never went out");
        std::thread::sleep(Duration::from_millis(5));
    }
    cluster.nodes[0].kill9();
    balancer.switch_to(&cluster.nodes[1]);
    let acknowledged = sender.join().unwrap();
    // Anything an interrupted command left in Alice's outbox goes out now, once.
    alice.ok(&["conversations"]);
    alice.ok(&["receive"]);
    let received = bob.receive_texts();
    for text in &acknowledged {
        assert_eq!(
            received.iter().filter(|t| *t == text).count(),
            1,
            "{text} must arrive exactly once: {received:?}"
        );
    }
    let mut unique = received.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), received.len(), "duplicates: {received:?}");
    assert!(acknowledged.len() >= 20, "{acknowledged:?}");
}

#[test]
fn a_node_that_loses_nats_says_so_and_still_delivers() {
    let mut nats = Nats::start();
    let cluster = Cluster::start(&nats);
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    let alice = register_at(&one.url, "alice");
    let bob = register_at(&two.url, "bob");
    alice.ok(&["send", &bob.username, "before"]);
    assert_eq!(bob.receive_texts(), ["before"]);

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !two.metrics().contains("fumi_cluster_bus_connected 0") {
        assert!(Instant::now() < deadline, "node two never noticed NATS was gone");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = drained(two);
    let listener = listen(&bob, 8);
    settle(two, before, 1);
    alice.ok(&["send", &bob.username, "while NATS is down"]);
    assert_eq!(texts_of(listener), ["while NATS is down"]);
    let log = std::fs::read_to_string(two.log_path()).unwrap();
    assert!(log.contains("lost NATS"), "{log}");
}
