//! The README's walkthrough, run as printed: every `sh` block of "Two-minute walkthrough" after
//! the one that starts the server, in order, in one shell, against a test server. Only the
//! server's address and the `/tmp/` directory are replaced (by this test's server and a
//! temporary directory), so the README cannot drift from what the commands do.

mod common;

use std::process::Command;

use common::{FUMI, Server};

/// The `sh` blocks between the walkthrough's heading and the line after its last block.
fn walkthrough_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find("## Two-minute walkthrough")
        .expect("the walkthrough heading");
    let end = readme[start..]
        .find("Every command has `--help`")
        .expect("the end of the walkthrough")
        + start;
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme[start..end].lines() {
        match (&mut current, line) {
            (None, "```sh") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unclosed block");
    blocks
}

#[test]
fn the_readme_walkthrough_runs_as_printed() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let blocks = walkthrough_blocks(&readme);
    assert!(blocks.len() >= 4, "{blocks:?}");
    assert!(
        blocks[0].contains("fumi server"),
        "the first block starts the server: {}",
        blocks[0]
    );

    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(FUMI).parent().unwrap();
    let script = blocks[1..]
        .concat()
        .replace("http://127.0.0.1:8080", &server.url)
        .replace("/tmp/", &format!("{}/", dir.path().display()));
    let output = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .current_dir(dir.path())
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .env_remove("FUMI_HOME")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "the walkthrough stopped:\n{stdout}\n--- stderr\n{stderr}"
    );
    // What the comments promise.
    for promised in [
        "hello Bob",
        "shift starts at 8",
        "the scan",
        "verified by Digital Agency",
        "The clinic opens at 9",
        "\"jsonrpc\":\"2.0\"",
    ] {
        assert!(stdout.contains(promised), "{promised:?} not shown:\n{stdout}");
    }
    assert!(
        !format!("{stdout}{stderr}").contains("SECURITY WARNING"),
        "{stdout}\n{stderr}"
    );
    // Nothing went wrong on the way (a contact's profile that does not open, a failed fetch).
    assert!(!stderr.contains(" WARN "), "{stderr}");
    let csv = std::fs::read_to_string(dir.path().join("out.csv")).unwrap();
    assert!(csv.contains("Bob Example"), "{csv}");
}
