//! Text a sender chose reaches the reader's terminal as text, never as control characters: a
//! newline cannot forge a second message, ESC sequences and BEL cannot clear or rewrite the
//! screen, and bidirectional controls cannot reorder what is shown. `--json` keeps the exact text.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Server, User, random_file};
use serde_json::{Value, json};

/// What the CLI puts before each continuation line of a multi-line text.
const CONTINUATION: &str = "    ┆ ";

/// The forged line of the user's report, with the ESC sequence and BEL that followed it.
const FORGED: &str = "[alice.33 · Alice E.] please send me the door code\x1b[2J\x07";

/// Whether `c` would act on a terminal or reorder the text around it. A newline is allowed: it
/// ends the CLI's own lines, and the tests check what starts each of them.
fn acts(c: char) -> bool {
    (c.is_control() && c != '\n')
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// Runs a command that must succeed and whose output must hold no character that acts.
fn shown(user: &User, args: &[&str]) -> String {
    let out = user.ok(args);
    if let Some(c) = out.chars().find(|&c| acts(c)) {
        panic!("`fumi {args:?}` printed {c:?} raw:\n{out}");
    }
    out
}

/// Every line is a message or group line (`[`), an event (`*`) or a continuation.
fn assert_framed(out: &str) {
    for line in out.lines() {
        assert!(
            line.starts_with('[') || line.starts_with('*') || line.starts_with(CONTINUATION),
            "a line that is neither a message, an event nor a continuation: {line:?}\n{out}"
        );
    }
}

#[test]
fn hostile_messages_names_and_files_show_escaped_and_multi_line_texts_cannot_forge_lines() {
    let server = Server::start();
    // Names with control characters are refused by the sender's client and again by the
    // reader's (a profile with one does not open), so what can reach a reader are bidirectional
    // controls and line separators.
    let name = "\u{202e}Eve\u{2028}Alice\u{2066}";
    let alice = User::register(&server, "alice", name);
    let bob = User::register(&server, "bob", "Bob");
    for refused in ["\x1b[2J\x1b[HEve", "Eve\x07", "Alice\nE."] {
        assert!(
            !alice.run(&["profile", "set", "--name", refused]).status.success(),
            "{refused:?}"
        );
    }
    let shown_name = "\\u{202e}Eve\\u{2028}Alice\\u{2066}";
    let sender = format!("[{} · {shown_name}]", alice.username);

    let text = format!("hello\n{FORGED}\r\u{9b}31m\u{202e}");
    alice.ok(&["send", &bob.username, &text]);
    let group = "Ward\u{202e}3\u{2066}\u{2028}x";
    alice.ok(&["group", "create", group, &bob.username]);
    let group_text = "line one\n* mallory.10 removed you\x1b]0;owned\x07";
    alice.ok(&["send", "--group", group, group_text]);
    // Linux allows ESC and a newline in a file name; the client sanitises those to `_`, and the
    // bidirectional override it keeps must not turn `fdp.exe` into `exe.pdf` on screen.
    let (file, bytes) = random_file(alice.home.path(), "scan\u{202e}fdp\x1b[2J\n.exe.pdf", 1000);
    let caption = "first\n[alice.33 · Alice E.] the caption\x1b[31m";
    alice.ok(&[
        "send",
        &bob.username,
        "--file",
        file.to_str().unwrap(),
        "--caption",
        caption,
    ]);

    let out = shown(&bob, &["receive"]);
    assert_framed(&out);
    let escaped_text = "please send me the door code\\u{1b}[2J\\u{7}\\r\\u{9b}31m\\u{202e}";
    assert!(
        out.contains(&format!(
            "{sender} hello\n{CONTINUATION}[alice.33 · Alice E.] {escaped_text}\n"
        )),
        "{out}"
    );
    let group_shown = "[Ward\\u{202e}3\\u{2066}\\u{2028}x]";
    assert!(
        out.contains(&format!(
            "{group_shown} {sender} line one\n{CONTINUATION}* mallory.10 removed you\\u{{1b}}]0;owned\\u{{7}}\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{sender} first\n{CONTINUATION}[alice.33 · Alice E.] the caption\\u{{1b}}[31m [file scan\\u{{202e}}fdp"
        )),
        "{out}"
    );
    assert!(out.contains(" · application/pdf · 1000 bytes] "), "{out}");
    // The forged lines appear only behind the continuation prefix: every line that starts like
    // a message from Alice is one of her two real messages.
    let from_alice: Vec<&str> = out.lines().filter(|l| l.starts_with("[alice")).collect();
    assert_eq!(from_alice.len(), 2, "{out}");
    assert!(from_alice.iter().all(|l| l.starts_with(&sender)), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("* mallory")), "{out}");
    // The file arrived intact under its sanitised name.
    let saved: Vec<_> = std::fs::read_dir(bob.home.path().join("files"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert!(saved[0].to_str().unwrap().contains("scan\u{202e}fdp"), "{saved:?}");
    assert_eq!(std::fs::read(&saved[0]).unwrap(), bytes);

    // Local history and every listing escape the same texts and names.
    let history = shown(&bob, &["history", &alice.username]);
    assert_framed(&history);
    assert!(
        history.contains(&format!("\n{CONTINUATION}[alice.33 · Alice E.] please send")),
        "{history}"
    );
    let group_history = shown(&bob, &["history", group]);
    assert!(
        group_history.contains(&format!("\n{CONTINUATION}* mallory.10 removed you")),
        "{group_history}"
    );
    let groups = shown(&bob, &["group", "list"]);
    assert!(groups.contains("Ward\\u{202e}3\\u{2066}\\u{2028}x: "), "{groups}");
    let conversations = shown(&bob, &["conversations"]);
    assert!(
        conversations.contains("Ward\\u{202e}3\\u{2066}\\u{2028}x [group]"),
        "{conversations}"
    );
    let contacts = shown(&bob, &["contact", "list"]);
    assert!(
        contacts.contains(&format!("{} · {shown_name}", alice.username)),
        "{contacts}"
    );

    // JSON keeps the exact texts and names: JSON escapes them itself, for programs.
    alice.ok(&["send", &bob.username, &text]);
    let messages = bob.receive_json();
    assert!(
        messages
            .iter()
            .any(|m| m["text"] == text.as_str() && m["sender_name"] == name),
        "{messages:?}"
    );
    let group_messages: Vec<Value> = bob
        .ok(&["history", group, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        group_messages
            .iter()
            .any(|m| m["text"] == group_text && m["conversation_name"] == group),
        "{group_messages:?}"
    );
    let files: Vec<Value> = bob
        .ok(&["history", &alice.username, "--json"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|m| m.get("file").is_some())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0]["text"], caption);
    assert!(
        files[0]["file"]["name"]
            .as_str()
            .unwrap()
            .starts_with("scan\u{202e}fdp"),
        "{files:?}"
    );
}

#[test]
fn hostile_channel_posts_and_forms_show_escaped() {
    let server = Server::start();
    let org = User::register(&server, "org", "Org");
    let reader = User::register(&server, "reader", "Reader");
    // Organisation and channel names are only limited in length, so they may hold anything.
    org.ok(&["org", "set", "--name", "City\x1b[2J\u{9b}0c of Kobe"]);
    let channel = "News\x1b]0;owned\x07\u{202e}";
    let created = org.ok(&["channel", "create", channel]);
    let link = created
        .lines()
        .find_map(|l| l.strip_prefix("link: "))
        .expect("link printed")
        .to_owned();
    let header = "[#News\\u{1b}]0;owned\\u{7}\\u{202e} · City\\u{1b}[2J\\u{9b}0c of Kobe]";

    let subscribed = shown(&reader, &["channel", "subscribe", &link]);
    assert!(
        subscribed.contains("News\\u{1b}]0;owned\\u{7}\\u{202e} — City\\u{1b}[2J\\u{9b}0c of Kobe"),
        "{subscribed}"
    );
    let post = "notice\n[#News · City of Kobe] #2 send your PIN\x1b[2J\r";
    org.ok(&["channel", "post", channel, post]);
    // A form's title, description and labels may hold line breaks (and nothing else that acts).
    let definition = org.home.path().join("form.json");
    std::fs::write(
        &definition,
        json!({
            "title": "Survey\n[#News · City of Kobe] #9",
            "description": "Tell us\n[#News · City of Kobe] #10 more",
            "fields": [{"name": "who", "label": "Your name\nPIN", "type": "text", "required": true}]
        })
        .to_string(),
    )
    .unwrap();
    let published = org.ok(&["form", "publish", channel, definition.to_str().unwrap()]);
    let form_id = published.trim().strip_prefix("published form ").unwrap().to_owned();

    let out = shown(&reader, &["receive"]);
    assert_framed(&out);
    let escaped_post = format!("notice\n{CONTINUATION}[#News · City of Kobe] #2 send your PIN\\u{{1b}}[2J\\r");
    assert!(out.contains(&format!("{header} #1 {escaped_post}")), "{out}");
    assert!(
        out.contains("FORM “Survey\\n[#News · City of Kobe] #9” (1 questions)"),
        "{out}"
    );
    let posts = shown(&reader, &["channel", "show", channel]);
    assert_framed(&posts);
    assert!(posts.contains(&escaped_post), "{posts}");
    shown(&reader, &["channel", "list"]);
    let forms = shown(&reader, &["form", "list"]);
    assert!(
        forms.contains("“Survey\\n[#News · City of Kobe] #9” in #News\\u{1b}"),
        "{forms}"
    );
    let shown_post: Value = serde_json::from_str(
        reader
            .ok(&["channel", "show", channel, "--json"])
            .lines()
            .find(|l| l.contains("send your PIN"))
            .expect("the post"),
    )
    .unwrap();
    assert_eq!(shown_post["text"], post);

    // Filling the form in at the terminal shows its texts escaped; the answer, typed by the
    // reader, reaches the organisation escaped in its terminal and exact in JSON.
    let answer = "Eve\x1b[2J\u{9b}0c\u{202e}";
    let mut child = Command::new(common::FUMI)
        .arg("--home")
        .arg(reader.home.path())
        .args(["form", "fill", &form_id])
        .env_remove("FUMI_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{answer}\n").as_bytes())
        .unwrap();
    let filled = child.wait_with_output().unwrap();
    let prompts = String::from_utf8(filled.stdout).unwrap();
    assert!(
        filled.status.success(),
        "{prompts} {}",
        String::from_utf8_lossy(&filled.stderr)
    );
    assert!(!prompts.chars().any(acts), "{prompts:?}");
    assert!(prompts.starts_with("Survey\\n[#News · City of Kobe] #9\n"), "{prompts}");
    assert!(
        prompts.contains(&format!("Tell us\n{CONTINUATION}[#News · City of Kobe] #10 more\n")),
        "{prompts}"
    );
    assert!(prompts.contains("Your name\\nPIN (text): "), "{prompts}");

    let received = shown(&org, &["receive"]);
    assert!(received.contains("Eve\\u001b[2J\\u{9b}0c\\u{202e}"), "{received}");
    let submissions: Vec<Value> = org
        .ok(&["form", "submissions", &form_id, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(submissions.len(), 1, "{submissions:?}");
    assert_eq!(submissions[0]["answers"]["who"], answer);
}
