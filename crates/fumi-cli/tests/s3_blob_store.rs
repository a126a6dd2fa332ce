//! The blob store on an S3-compatible service: moto's S3 server (`pip install 'moto[server]'`),
//! a real HTTP process on 127.0.0.1. `.ci/run` installs it and sets `FUMI_TEST_REQUIRE_S3=1`, so
//! CI fails rather than skips when it is missing; a developer without it sees the test skip
//! with a message.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, User};

struct Moto {
    child: Child,
    address: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Option<Moto> {
        if Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var_os("FUMI_TEST_REQUIRE_S3").is_none(),
                "moto_server is not installed: pip install 'moto[server]'"
            );
            eprintln!("SKIPPED: moto_server is not installed (pip install 'moto[server]')");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            address: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&moto.address).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// One plain HTTP/1.0 request; returns status line and body.
    fn http(&self, method: &str, path: &str) -> (String, Vec<u8>) {
        let mut stream = TcpStream::connect(&self.address).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.address
        )
        .unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end");
        let status = String::from_utf8_lossy(&answer[..answer.iter().position(|b| *b == b'\r').unwrap()]).into_owned();
        (status, answer[split + 4..].to_vec())
    }

    fn keys(&self, bucket: &str) -> Vec<String> {
        let (status, body) = self.http("GET", &format!("/{bucket}?list-type=2"));
        assert!(status.contains(" 200"), "{status}");
        let body = String::from_utf8(body).unwrap();
        body.split("<Key>")
            .skip(1)
            .map(|rest| rest.split("</Key>").next().unwrap().to_owned())
            .collect()
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", format!("http://{}", self.address)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "fumi-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "fumi-test-secret".into()),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false".into()),
        ]
    }
}

#[test]
fn files_go_through_an_s3_compatible_store() {
    let Some(moto) = Moto::start() else { return };
    let (status, _) = moto.http("PUT", "/fumi-blobs");
    assert!(status.contains(" 200"), "create bucket: {status}");
    let mut env = moto.env();
    env.push(("FUMI_BLOB_STORE", "s3://fumi-blobs/region-jp".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start_with_env(&env);

    let alice = User::register(&server, "alice", "Alice");
    let bob = User::register(&server, "bob", "Bob");
    let path = alice.home.path().join("report.txt");
    let content = "zqmark-s3-file-content ".repeat(600_000); // about 13 MiB: a multipart upload
    std::fs::write(&path, &content).unwrap();
    alice.ok(&["send", &bob.username, "--file", path.to_str().unwrap()]);

    let keys = moto.keys("fumi-blobs");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("region-jp/blobs/"), "{keys:?}");
    let (_, stored) = moto.http("GET", &format!("/fumi-blobs/{}", keys[0]));
    assert_eq!(
        stored.len() as u64,
        fumi_core::attachment::ciphertext_size(content.len() as u64)
    );
    assert!(
        !stored.windows(6).any(|w| w == b"zqmark"),
        "the store holds ciphertext only"
    );
    assert!(server.blob_files().is_empty(), "nothing left in local staging");

    let out = bob.ok(&["receive"]);
    assert_eq!(
        std::fs::read_to_string(common::saved_path(&out, "report.txt")).unwrap(),
        content
    );
    assert!(moto.keys("fumi-blobs").is_empty(), "deleted once fetched");
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(
        log.contains("S3 bucket fumi-blobs"),
        "the server says where blobs go: {log}"
    );
}

#[test]
fn a_missing_bucket_stops_the_server_at_startup() {
    let Some(moto) = Moto::start() else { return };
    let data = tempfile::tempdir().unwrap();
    let output = common::server_command(data.path())
        .env("FUMI_BLOB_STORE", "s3://no-such-bucket")
        .envs(moto.env())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("S3 bucket no-such-bucket") && stderr.contains("does not accept writes"),
        "{stderr}"
    );
}
