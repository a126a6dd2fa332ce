//! Test harness: the real `fumi` binary as server and as clients, on 127.0.0.1, each test in its
//! own temporary directory.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub const FUMI: &str = env!("CARGO_BIN_EXE_fumi");

/// A running `fumi server` process with its own data directory and log file.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// The admin API's URL.
    pub admin_url: String,
    listen: String,
    admin_listen: String,
    /// Settings from the environment, kept for restarts.
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// With `FUMI_TEST_BACKEND=postgres`: the PostgreSQL URL and this server's own schema,
    /// dropped when the test ends.
    postgres: Option<(String, String)>,
}

/// The PostgreSQL database and a fresh schema, if the suite runs on the cluster backend.
fn postgres_backend() -> Option<(String, String)> {
    if std::env::var("FUMI_TEST_BACKEND").ok()? != "postgres" {
        return None;
    }
    let url = std::env::var("FUMI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("test_{}", hex_encode(&rand::random::<[u8; 8]>()));
    Some((url, schema))
}

fn psql(url: &str, sql: &str) -> Vec<u8> {
    let output = Command::new("psql")
        .args([url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        output.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

impl Server {
    /// Starts a server on an ephemeral port.
    pub fn start() -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), Vec::new())
    }

    /// Starts a server with extra environment variables (settings).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::start_in(tempfile::tempdir().expect("temp dir"), env)
    }

    /// Starts a server with a TOML configuration file.
    pub fn start_with_config(toml: &str) -> Self {
        Self::start_configured(toml, None)
    }

    /// Starts a server with a TOML configuration file and, if given, this transparency log key
    /// file content.
    pub fn start_configured(toml: &str, audit_key: Option<&[u8]>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(key) = audit_key {
            std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
            std::fs::write(dir.path().join("data").join("audit-log.key"), key).expect("key file");
        }
        let config = dir.path().join("fumi.toml");
        std::fs::write(&config, toml).expect("config file");
        let env = vec![("FUMI_CONFIG".into(), config.to_str().expect("utf-8 path").into())];
        Self::start_in(dir, env)
    }

    /// Starts a server on the data directory the caller prepared in `dir/data` (SQLite only:
    /// the data is the directory).
    pub fn start_on_data(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::start_on(dir, env, None)
    }

    fn start_in(dir: tempfile::TempDir, env: Vec<(String, String)>) -> Self {
        Self::start_on(dir, env, postgres_backend())
    }

    /// Starts a server with a TOML configuration, on this PostgreSQL schema if the suite runs
    /// on PostgreSQL (from [`Server::postgres_backend`]).
    pub fn start_configured_on(toml: &str, postgres: Option<(String, String)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("fumi.toml");
        std::fs::write(&config, toml).expect("config file");
        let env = vec![("FUMI_CONFIG".into(), config.to_str().expect("utf-8 path").into())];
        Self::start_on(dir, env, postgres)
    }

    fn start_on(dir: tempfile::TempDir, env: Vec<(String, String)>, postgres: Option<(String, String)>) -> Self {
        let mut server = Server {
            dir,
            url: String::new(),
            admin_url: String::new(),
            listen: "127.0.0.1:0".into(),
            admin_listen: "127.0.0.1:0".into(),
            env,
            child: None,
            postgres,
        };
        if let Some((url, schema)) = &server.postgres {
            server.env.push(("FUMI_DATABASE".into(), url.clone()));
            server.env.push(("FUMI_DATABASE_SCHEMA".into(), schema.clone()));
        }
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn database(&self) -> PathBuf {
        self.data_dir().join("fumi.db")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut command = Command::new(FUMI);
        command
            .args([
                "server",
                "--listen",
                &self.listen,
                "--admin-listen",
                &self.admin_listen,
                "--data",
            ])
            .arg(self.data_dir())
            .env("FUMI_LOG", "debug")
            // Key directory epochs every 100 ms instead of every second: clients meeting a new
            // account or device wait for its epoch.
            .env("FUMI_KEY_DIRECTORY_EPOCH_MS", "100")
            // The lying-server hooks of tests/key_transparency.rs (test builds only).
            .env("FUMI_TEST_HOOKS", "1")
            .stdout(Stdio::piped())
            .stderr(log);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start fumi server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("server prints its address");
        let mut urls = line
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches(',').to_owned());
        let url = urls.next().unwrap_or_else(|| panic!("no address in {line:?}"));
        let admin_url = urls.next().unwrap_or_else(|| panic!("no admin address in {line:?}"));
        // Restarts reuse the ports, because clients keep the server URL in their home.
        self.listen = url.trim_start_matches("http://").to_owned();
        self.admin_listen = admin_url.trim_start_matches("http://").to_owned();
        self.url = url;
        self.admin_url = admin_url;
        self.child = Some(child);
    }

    /// Kills the server with SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// Stops the server with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("kill -TERM");
            assert!(status.success());
            let exit = child.wait().expect("reap");
            assert!(exit.success(), "server exited with {exit}");
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the server first");
        self.spawn();
    }

    /// Starts the server again with extra environment variables for this run only.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "stop or kill the server first");
        let kept = self.env.len();
        self.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.spawn();
        self.env.truncate(kept);
    }

    /// The `/metrics` page (a plain HTTP/1.0 GET, so that sync and async tests can both use it).
    pub fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// Asserts that none of `markers` appears in anything the server wrote (files, log, rows).
    pub fn assert_never_wrote(&self, markers: &[&str]) {
        for (path, bytes) in self.all_written_bytes() {
            for marker in markers {
                assert!(
                    !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                    "{marker} found in {}",
                    path.display()
                );
            }
        }
    }

    /// A public GET (no credentials) that must answer 200; returns the whole answer.
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let address = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        assert!(
            answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
            "{answer}"
        );
        answer
    }

    /// A POST of JSON without credentials (the test hooks); returns the status and the body.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        use std::io::{Read, Write};
        let address = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        let body = body.to_string();
        write!(
            stream,
            "POST {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status: {answer}"));
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
        (status, body)
    }

    /// A public GET answered with JSON.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let answer = self.get(path);
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// Every byte the server wrote: its files (database, blobs, log) and, on PostgreSQL, every
    /// row of its schema (bytea printed byte for byte where printable, so text would show).
    pub fn all_written_bytes(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        collect_files(self.dir.path(), &mut files);
        let mut written: Vec<(PathBuf, Vec<u8>)> = files
            .into_iter()
            .map(|path| (path.clone(), std::fs::read(&path).expect("read")))
            .collect();
        if let Some((url, schema)) = &self.postgres {
            let tables = psql(
                url,
                &format!("SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' ORDER BY 1"),
            );
            for table in String::from_utf8(tables).expect("utf-8").lines() {
                let rows = psql(
                    url,
                    &format!("SET bytea_output = 'escape'; COPY \"{schema}\".\"{table}\" TO STDOUT"),
                );
                written.push((PathBuf::from(format!("postgres:{schema}.{table}")), rows));
            }
        }
        written
    }
}

/// Every blob file (finished or being uploaded) under the server's data directory.
impl Server {
    pub fn blob_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for sub in ["blobs", "uploads"] {
            let dir = self.data_dir().join(sub);
            if dir.exists() {
                collect_files(&dir, &mut files);
            }
        }
        files
    }
}

impl Server {
    /// Whether this server keeps its state in PostgreSQL (`FUMI_TEST_BACKEND=postgres`).
    pub fn is_postgres(&self) -> bool {
        self.postgres.is_some()
    }

    /// The PostgreSQL URL and schema a server started now would use, if the suite runs on
    /// PostgreSQL (for settings that name further schemas, like regions: `<schema>_<name>`).
    pub fn postgres_backend() -> Option<(String, String)> {
        postgres_backend()
    }

    /// Runs SQL statements on the server's database, whichever the backend (as a malicious
    /// operator or a broken disk would). `{0}`, `{1}`, … stand for these byte strings, written as
    /// blob literals; write booleans as TRUE/FALSE.
    pub fn execute(&self, sql: &str, bytes: &[&[u8]]) {
        let statement = self.with_literals(sql, bytes);
        match &self.postgres {
            Some((url, schema)) => {
                psql(url, &format!("SET search_path TO \"{schema}\"; {statement}"));
            }
            None => {
                let db = rusqlite::Connection::open(self.database()).unwrap();
                db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                db.execute_batch(&statement).unwrap();
            }
        }
    }

    /// The number a `SELECT COUNT(*) …` gives on the server's database (placeholders as in
    /// [`Self::execute`]).
    pub fn count(&self, sql: &str, bytes: &[&[u8]]) -> u64 {
        let statement = self.with_literals(sql, bytes);
        match &self.postgres {
            Some((url, schema)) => {
                let out = psql(url, &format!("SET search_path TO \"{schema}\"; {statement}"));
                String::from_utf8(out).unwrap().trim().parse().unwrap()
            }
            None => {
                let db = rusqlite::Connection::open(self.database()).unwrap();
                db.query_row(&statement, [], |r| r.get::<_, i64>(0)).unwrap() as u64
            }
        }
    }

    fn with_literals(&self, sql: &str, bytes: &[&[u8]]) -> String {
        let mut statement = sql.to_owned();
        for (i, value) in bytes.iter().enumerate() {
            let literal = match self.postgres {
                Some(_) => format!("'\\x{}'::bytea", hex_encode(value)),
                None => format!("X'{}'", hex_encode(value)),
            };
            statement = statement.replace(&format!("{{{i}}}"), &literal);
        }
        statement
    }
}

/// Every row of every table of the server's database, as text (on PostgreSQL, each table's rows
/// sorted, since an update may move a row without changing it). The key directory's tables
/// (`kt_*`) are left out: the epoch publisher derives them from accounts, devices and usernames
/// on its own clock, so they change between two snapshots whenever an earlier change is published.
pub fn snapshot(server: &Server) -> String {
    if let Some((url, schema)) = &server.postgres {
        // One psql for the whole schema: a snapshot is taken around every refused request.
        let tables = psql(
            url,
            &format!(
                "SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' AND tablename NOT LIKE 'kt\\_%' ORDER BY 1"
            ),
        );
        let tables: Vec<String> = String::from_utf8(tables)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect();
        let script: String = tables
            .iter()
            .map(|t| format!("\\echo ==table {t}\nCOPY \"{schema}\".\"{t}\" TO STDOUT;\n"))
            .collect();
        let mut child = Command::new("psql")
            .args([url.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run psql");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes()).expect("script");
        let output = child.wait_with_output().expect("psql");
        assert!(output.status.success());
        let mut out = String::new();
        let mut table = String::new();
        let mut rows: Vec<String> = Vec::new();
        let flush = |table: &str, rows: &mut Vec<String>, out: &mut String| {
            rows.sort();
            for row in rows.drain(..) {
                out.push_str(&format!("{table}: {row}\n"));
            }
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            match line.strip_prefix("==table ") {
                Some(name) => {
                    flush(&table, &mut rows, &mut out);
                    table = name.to_owned();
                }
                None => rows.push(line.to_owned()),
            }
        }
        flush(&table, &mut rows, &mut out);
        return out;
    }
    let db =
        rusqlite::Connection::open_with_flags(server.database(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let tables: Vec<String> = db
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'kt\\_%' ESCAPE '\\' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = String::new();
    for table in tables {
        let mut stmt = db
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .unwrap();
        let columns = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                Ok((0..columns)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap();
        for row in rows {
            out.push_str(&format!("{table}: {}\n", row.unwrap()));
        }
    }
    out
}

/// The device id and `Authorization` value stored in a user's client store.
pub fn credentials(user: &User) -> (fumi_proto::DeviceId, String) {
    let db = rusqlite::Connection::open(user.home.path().join("fumi.db")).unwrap();
    let (device, secret): (Vec<u8>, Vec<u8>) = db
        .query_row("SELECT device_id, device_secret FROM account", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let device = fumi_proto::DeviceId::from_slice(&device).unwrap();
    (device, format!("Fumi {device}:{}", hex_encode(&secret)))
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Vec<u8> {
    let text = text.trim();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test shows what the server said (its directory is deleted next).
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.log_path())
        {
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- last lines of the server log ({})\n{}", self.url, tail.join("\n"));
        }
        if let Some((url, schema)) = &self.postgres {
            // Its own schema and those of its regions (named after it).
            let drop = format!(
                "DO $$ DECLARE s TEXT; BEGIN FOR s IN SELECT nspname FROM pg_namespace \
                 WHERE nspname = '{schema}' OR nspname LIKE '{schema}\\_%' LOOP \
                 EXECUTE format('DROP SCHEMA %I CASCADE', s); END LOOP; END $$"
            );
            let _ = Command::new("psql")
                .args([url.as_str(), "-X", "-q", "-c", &drop])
                .output();
        }
    }
}

/// A person with one device: a home directory for the `fumi` CLI.
pub struct User {
    pub home: tempfile::TempDir,
    pub username: String,
}

impl User {
    /// Registers through the CLI and returns the user with its full username.
    pub fn register(server: &Server, nickname: &str, name: &str) -> Self {
        Self::register_with(server, nickname, name, &[])
    }

    /// Registers with extra `fumi register` arguments (`--region jp`).
    pub fn register_with(server: &Server, nickname: &str, name: &str, extra: &[&str]) -> Self {
        let home = tempfile::tempdir().expect("temp dir");
        let mut args = vec![
            "register",
            "--server",
            &server.url,
            "--name",
            name,
            "--username",
            nickname,
        ];
        args.extend_from_slice(extra);
        let out = fumi_ok(home.path(), &args);
        let username = out
            .trim()
            .strip_prefix("registered ")
            .unwrap_or_else(|| panic!("unexpected: {out}"))
            .to_owned();
        assert!(username.starts_with(&format!("{nickname}.")), "{username}");
        User { home, username }
    }

    /// Runs a command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        fumi_ok(self.home.path(), args)
    }

    /// Runs a command; returns the whole output.
    pub fn run(&self, args: &[&str]) -> Output {
        fumi(self.home.path(), args)
    }

    /// Receives queued messages as JSON objects.
    pub fn receive_json(&self) -> Vec<serde_json::Value> {
        receive_json(self.home.path())
    }

    /// Texts of received (non-event) messages.
    pub fn receive_texts(&self) -> Vec<String> {
        texts(&self.receive_json())
    }
}

/// `fumi server` on ephemeral loopback ports with this data directory, for tests that expect it
/// to refuse to start (add settings before running it).
pub fn server_command(data: &Path) -> Command {
    let mut command = Command::new(FUMI);
    command
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(data);
    command
}

/// `fumi` without a home (operator and auditor commands).
pub fn run(args: &[&str]) -> Output {
    Command::new(FUMI).args(args).output().expect("run fumi")
}

/// [`run`] that must succeed; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "fumi {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// A file of `size` random bytes named `name` in `dir`; returns its path and bytes.
pub fn random_file(dir: &Path, name: &str, size: usize) -> (PathBuf, Vec<u8>) {
    let mut bytes = vec![0u8; size];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write file");
    (path, bytes)
}

pub fn fumi(home: &Path, args: &[&str]) -> Output {
    Command::new(FUMI)
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("FUMI_HOME")
        .output()
        .expect("run fumi")
}

/// Receives a home's queued messages as JSON objects.
pub fn receive_json(home: &Path) -> Vec<serde_json::Value> {
    fumi_ok(home, &["receive", "--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}")))
        .collect()
}

/// The texts of the messages (not events) among `messages`.
pub fn texts(messages: &[serde_json::Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["event"] == false)
        .map(|m| m["text"].as_str().expect("text").to_owned())
        .collect()
}

pub fn fumi_ok(home: &Path, args: &[&str]) -> String {
    let output = fumi(home, args);
    assert!(
        output.status.success(),
        "fumi {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The account id (hex) stored in a user's client store.
pub fn account_of(user: &User) -> String {
    let db = rusqlite::Connection::open(user.home.path().join("fumi.db")).unwrap();
    let account: Vec<u8> = db
        .query_row("SELECT account_id FROM account", [], |r| r.get(0))
        .unwrap();
    hex_encode(&account)
}

/// Where `receive` said it saved the file `name`.
pub fn saved_path(output: &str, name: &str) -> PathBuf {
    let line = output
        .lines()
        .find(|l| l.contains(&format!("[file {name} ")))
        .unwrap_or_else(|| panic!("no line for {name} in {output}"));
    PathBuf::from(line.rsplit("] ").next().unwrap().trim())
}
