//! `fumi daemon --json-rpc`: the automation interface, in the spirit of signal-cli's JSON-RPC mode.
//! JSON-RPC 2.0, one JSON object per line, on stdin/stdout and, with `--socket`, on a Unix socket
//! (one session per connection). A bot or a case-management system sends requests (`send`,
//! `receive`, `history`, ...) and, after `subscribe`, gets every new message as a `message`
//! notification. Methods are documented in docs/JSON_RPC.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fumi_client::official::OfficialEvents;
use fumi_client::{FumiClient, To};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Longest request line accepted, in bytes.
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// A connected client of the daemon: where its answers go, and whether it wants notifications.
struct Session {
    out: mpsc::UnboundedSender<String>,
    subscribed: bool,
}

enum Event {
    Opened(u64, mpsc::UnboundedSender<String>),
    Line(u64, String),
    Closed(u64),
}

/// Runs the daemon until stdin closes (and, with a socket, until interrupted); answers to
/// requests already read are written out before it ends, and the socket file is removed.
pub async fn run(home: &Path, socket: Option<PathBuf>, poll: Duration) -> Result<()> {
    let mut client = FumiClient::open(home)?;
    let (events, mut incoming) = mpsc::unbounded_channel();
    let stdout_writer = spawn_stdio(events.clone());
    let _socket = match socket {
        Some(path) => Some(SocketGuard::bind(&path, events.clone())?),
        None => None,
    };
    let stdin_only = _socket.is_none();
    drop(events);

    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut poll_timer = tokio::time::interval(poll);
    poll_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    use tokio::signal::unix::{SignalKind, signal};
    let (mut interrupt, mut terminate) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            event = incoming.recv() => match event {
                None => break,
                Some(Event::Opened(id, out)) => {
                    sessions.insert(id, Session { out, subscribed: false });
                }
                Some(Event::Closed(id)) => {
                    sessions.remove(&id);
                    if id == 0 && stdin_only {
                        break;
                    }
                }
                Some(Event::Line(id, line)) => {
                    let answer = answer(&mut client, &mut sessions, id, &line).await;
                    if let (Some(answer), Some(session)) = (answer, sessions.get(&id)) {
                        let _ = session.out.send(answer.to_string());
                    }
                }
            },
            _ = poll_timer.tick(), if sessions.values().any(|s| s.subscribed) => {
                match receive(&mut client, &sessions).await {
                    Ok((messages, events)) => {
                        notify(&sessions, &messages);
                        notify_official(&sessions, &events);
                    }
                    Err(error) => tracing::warn!(%error, "receiving failed; trying again"),
                }
            }
        }
    }
    // Closing every session's queue lets the stdout writer finish what is queued, then end.
    drop(sessions);
    let _ = stdout_writer.await;
    Ok(())
}

/// Messages and official-account events that arrived; key directory warnings go to every
/// subscribed session as `keyWarning` notifications.
async fn receive(
    client: &mut FumiClient,
    sessions: &HashMap<u64, Session>,
) -> Result<(Vec<fumi_client::DisplayMessage>, OfficialEvents), fumi_client::ClientError> {
    let messages = client.receive(Duration::ZERO).await?;
    for warning in client.take_key_warnings() {
        broadcast(sessions, "keyWarning", json!({"message": warning}));
    }
    Ok((messages, client.take_official_events()?))
}

fn broadcast(sessions: &HashMap<u64, Session>, method: &str, params: impl serde::Serialize) {
    let notification = json!({"jsonrpc": "2.0", "method": method, "params": params}).to_string();
    for session in sessions.values().filter(|s| s.subscribed) {
        let _ = session.out.send(notification.clone());
    }
}

fn notify(sessions: &HashMap<u64, Session>, messages: &[fumi_client::DisplayMessage]) {
    for message in messages {
        broadcast(sessions, "message", message);
    }
}

fn notify_official(sessions: &HashMap<u64, Session>, events: &OfficialEvents) {
    for post in &events.posts {
        broadcast(sessions, "channelPost", post);
    }
    for submission in &events.submissions {
        broadcast(sessions, "formSubmission", submission);
    }
    for receipt in &events.receipts {
        broadcast(sessions, "formReceipt", receipt);
    }
    for warning in &events.warnings {
        broadcast(sessions, "channelWarning", warning);
    }
}

fn error(id: Value, code: i64, message: String) -> Option<Value> {
    Some(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
}

/// Handles one line: a request or a batch (an array of requests, answered by an array of the
/// answers, notifications left out). `None` when there is nothing to answer.
async fn answer(
    client: &mut FumiClient,
    sessions: &mut HashMap<u64, Session>,
    session: u64,
    line: &str,
) -> Option<Value> {
    if line.trim().is_empty() {
        return None;
    }
    if line.len() > MAX_REQUEST_BYTES {
        // The request's id, if it has one, so that the caller can tell which request failed.
        #[derive(serde::Deserialize)]
        struct IdOnly {
            id: Option<Value>,
        }
        let id = serde_json::from_str::<IdOnly>(line).ok().and_then(|r| r.id);
        return error(
            id.unwrap_or(Value::Null),
            -32600,
            format!("a request is at most {MAX_REQUEST_BYTES} bytes"),
        );
    }
    let request: Value = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(e) => return error(Value::Null, -32700, format!("not JSON: {e}")),
    };
    let Value::Array(batch) = request else {
        return answer_one(client, sessions, session, request).await;
    };
    if batch.is_empty() {
        return error(Value::Null, -32600, "an empty batch".into());
    }
    let mut answers = Vec::with_capacity(batch.len());
    for request in batch {
        answers.extend(answer_one(client, sessions, session, request).await);
    }
    (!answers.is_empty()).then_some(Value::Array(answers))
}

/// Handles one request; `None` for a notification (a request without id) that succeeded.
async fn answer_one(
    client: &mut FumiClient,
    sessions: &mut HashMap<u64, Session>,
    session: u64,
    request: Value,
) -> Option<Value> {
    let id = request.get("id").cloned();
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return error(
            id.unwrap_or(Value::Null),
            -32600,
            "a request needs a \"method\" string".into(),
        );
    };
    let params = request.get("params").cloned().unwrap_or(json!({}));
    let result = call(client, sessions, session, method, &params).await;
    let id = id?;
    Some(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(Failure::UnknownMethod) => {
            return error(id, -32601, format!("no method {method:?}; see docs/JSON_RPC.md"));
        }
        Err(Failure::Params(message)) => return error(id, -32602, message),
        Err(Failure::Client(e)) => return error(id, -32000, e.to_string()),
    })
}

enum Failure {
    UnknownMethod,
    Params(String),
    Client(fumi_client::ClientError),
}

impl From<fumi_client::ClientError> for Failure {
    fn from(e: fumi_client::ClientError) -> Self {
        Failure::Client(e)
    }
}

fn text_param<'a>(params: &'a Value, name: &str) -> Result<&'a str, Failure> {
    params
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::Params(format!("missing string parameter {name:?}")))
}

async fn call(
    client: &mut FumiClient,
    sessions: &mut HashMap<u64, Session>,
    session: u64,
    method: &str,
    params: &Value,
) -> Result<Value, Failure> {
    Ok(match method {
        "subscribe" | "unsubscribe" => {
            let on = method == "subscribe";
            if let Some(s) = sessions.get_mut(&session) {
                s.subscribed = on;
            }
            json!({"subscribed": on})
        }
        "whoami" => json!(client.whoami()),
        "send" => {
            let text = text_param(params, "text")?;
            client.sync().await?;
            let id = match (
                params.get("to").and_then(Value::as_str),
                params.get("group").and_then(Value::as_str),
            ) {
                (Some(to), None) => client.send_direct(to, text).await?,
                (None, Some(group)) => client.send_group(group, text).await?,
                _ => {
                    return Err(Failure::Params(
                        "give exactly one of \"to\" (a username) and \"group\"".into(),
                    ));
                }
            };
            json!({"id": id.to_string()})
        }
        "sendFile" => {
            let path = PathBuf::from(text_param(params, "path")?);
            let caption = params.get("caption").and_then(Value::as_str);
            client.sync().await?;
            let to = match (
                params.get("to").and_then(Value::as_str),
                params.get("group").and_then(Value::as_str),
            ) {
                (Some(to), None) => To::User(to),
                (None, Some(group)) => To::Group(group),
                _ => {
                    return Err(Failure::Params(
                        "give exactly one of \"to\" (a username) and \"group\"".into(),
                    ));
                }
            };
            let id = client.send_file(to, &path, caption).await?;
            json!({"id": id.to_string()})
        }
        "receive" => {
            let (messages, events) = receive(client, sessions).await?;
            notify(sessions, &messages);
            notify_official(sessions, &events);
            json!({"messages": messages, "channel_posts": events.posts, "form_submissions": events.submissions,
                   "form_receipts": events.receipts, "channel_warnings": events.warnings})
        }
        "channelPost" => {
            let seq = client
                .post_text(text_param(params, "channel")?, text_param(params, "text")?)
                .await?;
            json!({"seq": seq})
        }
        "channels" => json!(client.channels().await?),
        "forms" => {
            client.sync_channels().await?;
            json!(client.forms()?)
        }
        "submissions" => {
            client.sync().await?;
            json!(client.submissions(text_param(params, "form")?)?)
        }
        "conversations" => json!(client.conversations()?),
        "history" => json!(client.history(text_param(params, "conversation")?)?),
        "contacts" => json!(client.contacts()?),
        _ => return Err(Failure::UnknownMethod),
    })
}

/// Session 0: stdin and stdout. Returns the writer, which ends once its queue is closed and
/// written out.
fn spawn_stdio(events: mpsc::UnboundedSender<Event>) -> tokio::task::JoinHandle<()> {
    let (out, mut outgoing) = mpsc::unbounded_channel::<String>();
    let _ = events.send(Event::Opened(0, out));
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = outgoing.recv().await {
            if stdout.write_all(format!("{line}\n").as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if events.send(Event::Line(0, line)).is_err() {
                return;
            }
        }
        let _ = events.send(Event::Closed(0));
    });
    writer
}

/// The listening socket; removed when the daemon ends.
struct SocketGuard {
    path: PathBuf,
}

impl SocketGuard {
    fn bind(path: &Path, events: mpsc::UnboundedSender<Event>) -> Result<Self> {
        if let Ok(metadata) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !metadata.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; choose another --socket path",
                    path.display()
                );
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{} is in use by another running daemon", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
        let listener =
            tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
        // Whoever can connect acts as this account: only its owner may.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        tokio::spawn(async move {
            let mut next_id = 1u64;
            while let Ok((stream, _)) = listener.accept().await {
                let id = next_id;
                next_id += 1;
                let (reader, mut writer) = stream.into_split();
                let (out, mut outgoing) = mpsc::unbounded_channel::<String>();
                if events.send(Event::Opened(id, out)).is_err() {
                    return;
                }
                tokio::spawn(async move {
                    while let Some(line) = outgoing.recv().await {
                        if writer.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
                let events = events.clone();
                tokio::spawn(async move {
                    let mut lines = BufReader::new(reader).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if events.send(Event::Line(id, line)).is_err() {
                            return;
                        }
                    }
                    let _ = events.send(Event::Closed(id));
                });
            }
        });
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
