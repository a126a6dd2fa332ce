//! `fumi server`: settings from defaults, a TOML file, `FUMI_*` environment variables and flags,
//! each overriding the one before.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use fumi_server::Config;

#[derive(Args)]
pub struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FUMI_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address of the admin API [default: 127.0.0.1:8081].
    #[arg(long, env = "FUMI_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Data directory (database) [default: ./fumi-data].
    #[arg(long, env = "FUMI_DATA")]
    data: Option<PathBuf>,
    /// Database: a postgres:// URL for cluster mode [default: embedded SQLite in the data
    /// directory].
    #[arg(long)]
    database: Option<String>,
    /// TOML file with any of the settings listed in the README ("Server settings").
    #[arg(long, env = "FUMI_CONFIG")]
    config: Option<PathBuf>,
}

/// Builds the configuration: defaults, then the file, then `FUMI_<SETTING>` variables, then flags.
fn load_config(args: &ServerArgs) -> Result<Config> {
    let mut table = toml::Table::try_from(Config::default()).context("default settings")?;
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        for (key, value) in file {
            if !table.contains_key(&key) {
                bail!("{}: unknown setting {key:?}", path.display());
            }
            table.insert(key, value);
        }
    }
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys {
        let variable = format!("FUMI_{}", key.to_ascii_uppercase());
        if let Ok(value) = std::env::var(&variable) {
            let parsed = match table[&key] {
                toml::Value::Integer(_) => {
                    toml::Value::Integer(value.parse().with_context(|| format!("{variable} must be a number"))?)
                }
                toml::Value::Array(_) => bail!("{variable}: set {key} in the configuration file (--config)"),
                _ => toml::Value::String(value),
            };
            table.insert(key, parsed);
        }
    }
    let mut config: Config = table.try_into().context("invalid settings")?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(admin_listen) = args.admin_listen {
        config.admin_listen = admin_listen;
    }
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(database) = &args.database {
        config.database = database.clone();
    }
    Ok(config)
}

pub fn run(args: ServerArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(crate::log_filter("info"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Everything the server writes (database, WAL, blobs, the log key) is for its own user only.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let config = load_config(&args)?;
    restrict_data_dir(&config.data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let address = listener.local_addr()?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the admin API (another server may use it): choose another address \
                     with --admin-listen or FUMI_ADMIN_LISTEN",
                    config.admin_listen
                )
            })?;
        let admin_address = admin_listener.local_addr()?;
        println!(
            "fumi server listening on http://{address}, admin API on http://{admin_address}, database: {}",
            fumi_server::database_description(&config)
        );
        std::io::stdout().flush()?;
        fumi_server::run(config, listener, admin_listener, shutdown_signal()).await?;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Makes the data directory and the database files readable by this user only, also when an
/// older version or another tool created them open to others.
fn restrict_data_dir(data: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data).with_context(|| format!("cannot create the data directory {}", data.display()))?;
    let restrict = |path: &std::path::Path, mode: u32| -> Result<()> {
        let current = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if current & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot make {} private", path.display()))?;
            tracing::info!(path = %path.display(), "made readable by this user only (was {current:o})");
        }
        Ok(())
    };
    restrict(data, 0o700)?;
    for name in ["fumi.db", "fumi.db-wal", "fumi.db-shm", "audit-log.key"] {
        let path = data.join(name);
        if path.exists() {
            restrict(&path, 0o600)?;
        }
    }
    Ok(())
}
