//! `fumi daemon --json-rpc`: a bot drives the daemon over its Unix socket — subscribes, receives
//! a message as a notification, replies — and over stdin/stdout.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FUMI, Server, User};
use serde_json::{Value, json};

struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Rpc {
    fn connect(path: &std::path::Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("daemon socket never appeared: {e}"),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn send(&mut self, request: Value) {
        writeln!(self.writer, "{request}").unwrap();
    }

    fn next(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("a line from the daemon");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Calls a method and returns its answer, skipping notifications on the way.
    fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let answer = self.next();
            if answer["id"] == id {
                return answer;
            }
        }
    }
}

/// The daemon process, killed when the test ends, whether it passes or panics.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_bot_subscribes_receives_and_replies_over_the_socket() {
    let server = Server::start();
    let citizen = User::register(&server, "citizen", "Citizen");
    let bot = User::register(&server, "cityhall", "City Hall");
    let socket = bot.home.path().join("rpc.sock");
    let mut daemon = Daemon(
        Command::new(FUMI)
            .args([
                "--home",
                bot.home.path().to_str().unwrap(),
                "daemon",
                "--json-rpc",
                "--poll-ms",
                "100",
                "--socket",
            ])
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut rpc = Rpc::connect(&socket);

    let me = rpc.call(1, "whoami", json!({}));
    assert_eq!(me["result"]["username"], bot.username.as_str(), "{me}");
    assert_eq!(rpc.call(2, "subscribe", json!({}))["result"]["subscribed"], true);

    citizen.ok(&["send", &bot.username, "When is the vaccination centre open?"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let question = loop {
        assert!(Instant::now() < deadline, "no message notification");
        let event = rpc.next();
        if event["method"] == "message" && event["params"]["event"] == false {
            break event["params"].clone();
        }
    };
    assert_eq!(question["text"], "When is the vaccination centre open?");
    assert_eq!(question["sender"], citizen.username.as_str());

    let sent = rpc.call(
        3,
        "send",
        json!({"to": citizen.username, "text": "9:00 to 17:00, Monday to Saturday."}),
    );
    assert!(sent["result"]["id"].is_string(), "{sent}");
    assert_eq!(
        citizen.receive_texts(),
        vec!["9:00 to 17:00, Monday to Saturday.".to_owned()]
    );

    // Bad requests get JSON-RPC errors, and the session goes on.
    rpc.send(json!("not an object").to_string().into());
    assert_eq!(rpc.call(4, "launch", json!({}))["error"]["code"], -32601);
    assert_eq!(
        rpc.call(5, "send", json!({"text": "to nobody"}))["error"]["code"],
        -32602
    );
    let history = rpc.call(6, "history", json!({"conversation": citizen.username}));
    let texts: Vec<&str> = history["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["event"] == false)
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "When is the vaccination centre open?",
            "9:00 to 17:00, Monday to Saturday."
        ]
    );

    // The same over stdin/stdout.
    let stdin = daemon.0.stdin.as_mut().unwrap();
    writeln!(
        stdin,
        "{}",
        json!({"jsonrpc": "2.0", "id": 9, "method": "conversations"})
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(daemon.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["id"], 9);
    assert_eq!(answer["result"].as_array().unwrap().len(), 1);
}

fn spawn_daemon(user: &User, socket: &std::path::Path) -> Daemon {
    Daemon(
        Command::new(FUMI)
            .args([
                "--home",
                user.home.path().to_str().unwrap(),
                "daemon",
                "--json-rpc",
                "--poll-ms",
                "100",
                "--socket",
            ])
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn an_organisation_bot_gets_form_submissions_as_events_and_posts_to_its_channel() {
    let server = Server::start();
    let citizen = User::register(&server, "citizen", "Citizen");
    let bot = User::register(&server, "health", "Health Office");
    let link = bot
        .ok(&["channel", "create", "Check-in"])
        .lines()
        .find_map(|l| l.strip_prefix("link: "))
        .unwrap()
        .to_owned();
    let definition = bot.home.path().join("form.json");
    std::fs::write(
        &definition,
        json!({"title": "Daily check-in", "fields": [
            {"name": "temperature", "label": "Temperature", "type": "number", "required": true},
            {"name": "cough", "label": "Cough", "type": "boolean", "required": true}]})
        .to_string(),
    )
    .unwrap();
    let published = bot.ok(&["form", "publish", "Check-in", definition.to_str().unwrap()]);
    let form_id = published.trim().strip_prefix("published form ").unwrap().to_owned();
    citizen.ok(&["channel", "subscribe", &link]);

    let socket = bot.home.path().join("rpc.sock");
    let _daemon = spawn_daemon(&bot, &socket);
    let mut rpc = Rpc::connect(&socket);
    assert_eq!(rpc.call(1, "subscribe", json!({}))["result"]["subscribed"], true);

    let answers = citizen.home.path().join("answers.json");
    std::fs::write(&answers, json!({"temperature": 37.9, "cough": true}).to_string()).unwrap();
    citizen.ok(&["form", "fill", &form_id, "--answers", answers.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let submission = loop {
        assert!(Instant::now() < deadline, "no formSubmission notification");
        let event = rpc.next();
        if event["method"] == "formSubmission" {
            break event["params"].clone();
        }
    };
    assert_eq!(submission["form_id"], form_id.as_str());
    assert_eq!(submission["submitter"], citizen.username.as_str());
    assert_eq!(submission["answers"], json!({"temperature": 37.9, "cough": true}));

    let posted = rpc.call(
        2,
        "channelPost",
        json!({"channel": "Check-in", "text": "Fever clinic open until 20:00"}),
    );
    assert_eq!(posted["result"]["seq"], 2, "{posted}");
    let forms = rpc.call(3, "submissions", json!({"form": form_id}));
    assert_eq!(forms["result"].as_array().unwrap().len(), 1, "{forms}");

    let lines: Vec<Value> = citizen
        .ok(&["receive", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(kinds, ["channel_post", "form_receipt"], "{lines:?}");
    assert_eq!(lines[0]["post"]["text"], "Fever clinic open until 20:00");
}

/// The daemon on stdin/stdout as a shell pipeline uses it: every request read is answered
/// before it ends at end of input; batches get one array back; an oversized request's error
/// names its id; Ctrl-C removes the socket file.
#[test]
fn stdin_requests_are_answered_before_the_daemon_ends() {
    let server = Server::start();
    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let oversized = json!({"jsonrpc": "2.0", "id": 4, "method": "whoami", "params": {"pad": "x".repeat(300 * 1024)}});
    let input = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "send", "params": {"to": bob.username, "text": "piped"}}),
        json!([
            {"jsonrpc": "2.0", "id": 2, "method": "whoami"},
            {"jsonrpc": "2.0", "method": "whoami"},
            {"jsonrpc": "2.0", "id": 3, "method": "no_such_method"}
        ]),
        oversized,
        json!([]),
    ]
    .map(|line| format!("{line}\n"))
    .concat();
    let mut daemon = Command::new(FUMI)
        .args(["--home", alice.home.path().to_str().unwrap(), "daemon", "--json-rpc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Written and closed at once: the daemon sees end of input while the send is under way.
    daemon.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = daemon.wait_with_output().unwrap();
    assert!(output.status.success());
    let answers: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 4, "{answers:?}");
    assert_eq!(answers[0]["id"], 1, "{answers:?}");
    assert!(answers[0].get("result").is_some(), "{answers:?}");
    let batch = answers[1].as_array().expect("a batch is answered by an array");
    assert_eq!(batch.len(), 2, "the notification gets no answer: {batch:?}");
    assert_eq!(batch[0]["id"], 2);
    assert_eq!(batch[0]["result"]["username"], alice.username.as_str());
    assert_eq!(batch[1]["id"], 3);
    assert_eq!(batch[1]["error"]["code"], -32601);
    assert_eq!(answers[2]["id"], 4, "{}", answers[2]);
    assert_eq!(answers[2]["error"]["code"], -32600);
    assert_eq!(answers[3]["error"]["code"], -32600);
    assert_eq!(bob.receive_texts(), ["piped"]);

    // Interrupted, it removes its socket.
    let socket = alice.home.path().join("bot.sock");
    let mut daemon = spawn_daemon(&alice, &socket);
    let mut rpc = Rpc::connect(&socket);
    assert_eq!(rpc.call(1, "whoami", json!({}))["id"], 1);
    let pid = daemon.0.id() as i32;
    // SAFETY: signals the daemon this test started and still owns (not yet waited for).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = daemon.0.wait().unwrap();
    assert!(
        status.success(),
        "ended by the signal instead of handling it: {status:?}"
    );
    assert!(!socket.exists(), "the socket file was left behind");
}
