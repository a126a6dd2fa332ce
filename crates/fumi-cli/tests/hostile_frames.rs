//! A hostile delivery stream: a man in the middle of Bob's delivery WebSocket duplicates,
//! replays, forges, truncates and mis-signals frames. Bob's client shows every real message
//! exactly once, warns about or refuses the rest with a clear error, and the next honest session
//! works.

mod common;

use std::sync::{Arc, Mutex};

use common::{Server, User, fumi};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Honest,
    /// Every envelope twice.
    Duplicate,
    /// Before `drained`, every envelope seen in any earlier session again.
    ReplayOld,
    /// A forged envelope (garbage MLS bytes, an unused sequence number) first.
    Forge,
    /// `drained` at once, before the backlog.
    EarlyDrained,
    /// The first envelope cut in half (not JSON any more).
    Truncate,
}

#[derive(Default)]
struct Shared {
    mode: Option<Mode>,
    seen: Vec<String>,
}

/// Forwards everything to the server; on `/v1/ws` sits in the middle of the WebSocket.
async fn run_proxy(listener: TcpListener, upstream: String, shared: Arc<Mutex<Shared>>) {
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let (upstream, shared) = (upstream.clone(), shared.clone());
        tokio::spawn(async move {
            let mut head = [0u8; 16];
            let n = client.peek(&mut head).await.unwrap_or(0);
            if head[..n].starts_with(b"GET /v1/ws") {
                middle(client, &upstream, shared).await;
            } else {
                let mut client = client;
                let mut server = TcpStream::connect(&upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn middle(client: TcpStream, upstream: &str, shared: Arc<Mutex<Shared>>) {
    let authorization = Arc::new(Mutex::new(None));
    let seen_auth = authorization.clone();
    let mut client = tokio_tungstenite::accept_hdr_async(
        client,
        move |request: &tokio_tungstenite::tungstenite::handshake::server::Request, response| {
            *seen_auth.lock().unwrap() = request.headers().get("authorization").cloned();
            Ok(response)
        },
    )
    .await
    .unwrap();
    let mut request = format!("ws://{upstream}/v1/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", authorization.lock().unwrap().clone().unwrap());
    let (mut server, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mode = shared.lock().unwrap().mode.unwrap_or(Mode::Honest);
    match mode {
        Mode::Forge => {
            let forged = r#"{"type":"envelope","seq":987654321,"message":"bm90IE1MUw==","received_at":1}"#;
            client.send(Message::Text(forged.into())).await.unwrap();
        }
        Mode::EarlyDrained => {
            client
                .send(Message::Text(r#"{"type":"drained"}"#.into()))
                .await
                .unwrap();
        }
        _ => {}
    }
    let mut truncated = false;
    loop {
        tokio::select! {
            frame = client.next() => match frame {
                Some(Ok(frame @ Message::Text(_))) => { let _ = server.send(frame).await; }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => { let _ = server.close(None).await; return; }
                Some(Ok(_)) => {}
            },
            frame = server.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let text = text.to_string();
                    let is_envelope = text.contains(r#""type":"envelope""#);
                    if text.contains(r#""type":"drained""#) && mode == Mode::ReplayOld {
                        let old = shared.lock().unwrap().seen.clone();
                        for frame in old {
                            let _ = client.send(Message::Text(frame.into())).await;
                        }
                    }
                    if is_envelope {
                        shared.lock().unwrap().seen.push(text.clone());
                    }
                    let out = if is_envelope && mode == Mode::Truncate && !truncated {
                        truncated = true;
                        text[..text.len() / 2].to_owned()
                    } else {
                        text.clone()
                    };
                    let _ = client.send(Message::Text(out.into())).await;
                    if is_envelope && mode == Mode::Duplicate {
                        let _ = client.send(Message::Text(text.into())).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => { let _ = client.close(None).await; return; }
                Some(Ok(_)) => {}
            },
        }
    }
}

#[test]
fn a_tampered_delivery_stream_shows_nothing_twice_or_false() {
    let server = Server::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(run_proxy(
        listener,
        server.url.trim_start_matches("http://").to_owned(),
        shared.clone(),
    ));

    let alice = User::register(&server, "alice", "Alice");
    let bob_home = tempfile::tempdir().unwrap();
    let registered = common::fumi_ok(
        bob_home.path(),
        &["register", "--server", &proxy_url, "--name", "Bob", "--username", "bob"],
    );
    let bob = User {
        home: bob_home,
        username: registered.trim().trim_start_matches("registered ").to_owned(),
    };
    let set_mode = |mode| shared.lock().unwrap().mode = Some(mode);

    let mut sent = Vec::new();
    for (round, mode) in [
        Mode::Duplicate,
        Mode::ReplayOld,
        Mode::Forge,
        Mode::EarlyDrained,
        Mode::Truncate,
    ]
    .into_iter()
    .enumerate()
    {
        let text = format!("message {round}");
        alice.ok(&["send", &bob.username, &text]);
        sent.push(text);
        set_mode(mode);
        let output = fumi(bob.home.path(), &["receive"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        match mode {
            Mode::Forge => assert!(stderr.contains("dropped a message"), "{mode:?}: {stderr}"),
            Mode::Truncate => {
                assert!(!output.status.success(), "{mode:?} went unnoticed");
                assert!(stderr.contains("malformed frame from server"), "{mode:?}: {stderr}");
            }
            _ => assert!(output.status.success(), "{mode:?}: {stderr}"),
        }
        // An honest session afterwards: everything sent so far is in history exactly once.
        set_mode(Mode::Honest);
        bob.ok(&["receive"]);
        let history = bob.ok(&["history", &alice.username]);
        for text in &sent {
            assert_eq!(
                history.matches(&format!("] {text}\n")).count(),
                1,
                "after {mode:?}:\n{history}"
            );
        }
    }
    bob.ok(&["send", &alice.username, "bob is fine"]);
    assert!(alice.receive_texts().contains(&"bob is fine".to_owned()));
}
