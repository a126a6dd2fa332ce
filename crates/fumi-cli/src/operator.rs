//! Operator accountability from the command line: `fumi audit …` checks a server's public log of
//! operator accesses (what a regulator or journalist runs), `fumi admin …` is the operator's only
//! door to stored data, each call signed and logged.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fumi_audit::verify::{Totals, VerifierState};
use fumi_audit::{Entry, Outcome};
use fumi_client::FumiClient;
use fumi_client::admin::{AdminClient, ReviewedReport, generate_moderation_key, generate_operator_key};
use fumi_client::audit::verify_log;
use reqwest::Method;

use crate::terminal;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify a server's log of operator accesses and print the totals. With --state, also check
    /// that the log extends the one seen last time (kept in that file); exits non-zero if the log
    /// was rewritten, truncated or forked.
    Verify {
        /// Server URL, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "FUMI_SERVER")]
        server: String,
        /// File remembering the last verified head and totals (created on the first run).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the log entries about your own account (every operator access to it).
    Mine {
        /// Print JSON, one entry per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct AdminArgs {
    /// Admin API URL.
    #[arg(
        long,
        global = true,
        env = "FUMI_ADMIN_SERVER",
        default_value = "http://127.0.0.1:8081"
    )]
    server: String,
    /// Your operator name, as in the server's configuration.
    #[arg(long, global = true, env = "FUMI_OPERATOR")]
    operator: Option<String>,
    /// Your operator key file (from `fumi admin keygen`).
    #[arg(long, global = true, env = "FUMI_OPERATOR_KEY")]
    key: Option<PathBuf>,
    /// Why you do this (a ticket id, printable ASCII); written into the public log.
    #[arg(long, global = true)]
    reason: Option<String>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an operator key file; prints the public key for the server's configuration.
    Keygen {
        /// Where to write the secret key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// List accounts: ids, counts and sizes (the server holds nothing else).
    Accounts,
    /// Suspend an account: its devices are refused until it is unsuspended.
    Suspend {
        /// Account id (32 hex digits).
        account: String,
    },
    /// Lift a suspension.
    Unsuspend {
        /// Account id.
        account: String,
    },
    /// Delete an account and everything stored for it.
    Purge {
        /// Account id.
        account: String,
    },
    /// Create the moderators' key file; prints the public key for the server's
    /// `moderation_public_key` (reports are sealed to it; only this file opens them).
    ModerationKeygen {
        /// Where to write the secret key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// List abuse reports (numbers, times, sizes: they are sealed).
    Reports,
    /// Read an abuse report: opens it with the moderation key and verifies its franking proof
    /// (that the named sender really sent this text in that conversation). Exits non-zero if the
    /// proof fails.
    Report {
        /// The report's number (from `fumi admin reports`).
        id: u64,
        /// The moderation key file (from `fumi admin moderation-keygen`).
        #[arg(long, env = "FUMI_MODERATION_KEY")]
        moderation_key: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stored blob (attachment ciphertext).
    DeleteBlob {
        /// Blob id (32 hex digits).
        blob: String,
    },
    /// Show the server's metrics.
    Metrics,
    /// Move an account's stored data (queued messages, key packages, profile, avatar, files) to
    /// another region: copied, verified by SHA-256, then deleted at the source. Interrupted,
    /// run it again to finish.
    Relocate {
        /// Account id.
        account: String,
        /// The target region, as named in the server's configuration.
        #[arg(long)]
        to: String,
    },
}

pub async fn run_audit(home: &Path, command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { server, state, json } => {
            let previous: Option<VerifierState> = read_state(state.as_deref(), "verifier state")?;
            let verified = verify_log(&server, previous.as_ref()).await?;
            write_state(state.as_deref(), &verified.state)?;
            let head = &verified.state.head;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "tree_size": head.tree_size,
                        "root_hash": head.root_hash,
                        "log_key": head.log_key,
                        "signed_at": head.timestamp,
                        "new_entries": verified.new_entries,
                        "totals": verified.state.totals,
                    })
                );
            } else {
                println!(
                    "log verified: {} entries ({} new since the last run), head signed {} by log key {}",
                    head.tree_size,
                    verified.new_entries,
                    format_utc(head.timestamp),
                    head.log_key
                );
                print_totals(&verified.state.totals);
            }
        }
        AuditCommand::Mine { json } => {
            let client = FumiClient::open(home)?;
            let (verified, mine) = client.my_audit_entries().await?;
            if json {
                for entry in &mine {
                    println!("{}", serde_json::to_string(entry)?);
                }
            } else {
                println!(
                    "{} of the log's {} entries (verified) concern your account",
                    mine.len(),
                    verified.state.head.tree_size
                );
                for entry in &mine {
                    println!("{}", describe(entry));
                }
            }
        }
    }
    Ok(())
}

/// An auditor's state from `path` (none on the first run, or without --state).
fn read_state<T: serde::de::DeserializeOwned>(path: Option<&Path>, what: &str) -> Result<Option<T>> {
    let Some(path) = path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let state = serde_json::from_str(&text).with_context(|| format!("{} is not a {what} file", path.display()))?;
    Ok(Some(state))
}

/// Replaces the state file at `path` (if given) in one rename.
fn write_state<T: serde::Serialize>(path: Option<&Path>, state: &T) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot write {}", path.display()))
}

/// `fumi keys audit`: the key directory's append-only proofs since the last run.
pub async fn run_keys_audit(server: &str, state: Option<&Path>, json: bool) -> Result<()> {
    let previous: Option<fumi_client::keys::AuditorState> = read_state(state, "key directory audit state")?;
    let report = fumi_client::keys::audit_directory(server, previous.as_ref()).await?;
    write_state(state, &report.state)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "from_epoch": report.from_epoch,
                "epoch": report.state.epoch,
                "root_hash": report.state.root_hash,
                "log_key": report.state.log_key,
                "epochs_checked": report.epochs_checked,
            })
        );
    } else {
        println!(
            "key directory audited: epochs {} to {} only appended ({} steps checked); root {} signed by log key {}",
            report.from_epoch, report.state.epoch, report.epochs_checked, report.state.root_hash, report.state.log_key
        );
    }
    Ok(())
}

/// The names and reasons are the server's log entries: escaped, since an auditor may be reading
/// a hostile server's log.
fn print_totals(totals: &Totals) {
    let section = |title: &str, counts: &std::collections::BTreeMap<String, u64>| {
        println!("{title}:");
        if counts.is_empty() {
            println!("  (none)");
        }
        for (name, count) in counts {
            let name = if name.is_empty() { "(none)" } else { name };
            println!("  {:<24} {count}", terminal::line(name));
        }
    };
    let allowed = totals.entries - totals.refused;
    println!("accesses: {allowed}");
    section("accesses by operator", &totals.by_operator);
    section("accesses by jurisdiction", &totals.by_jurisdiction);
    section("accesses by kind", &totals.by_action);
    println!("refused attempts: {}", totals.refused);
    for (reason, count) in &totals.refused_by_reason {
        println!("  {:<24} {count}", terminal::line(reason));
    }
}

/// One log entry on one line, escaped like [`print_totals`].
fn describe(entry: &Entry) -> String {
    let outcome = match &entry.outcome {
        Outcome::Allowed => "allowed".to_owned(),
        Outcome::Refused(reason) => format!("REFUSED ({reason})"),
    };
    let described = format!(
        "{}  {} by {} ({}) from {}, reason {:?}: {}",
        format_utc(entry.time),
        entry.action,
        entry.operator,
        entry.jurisdiction,
        entry.source,
        entry.reason,
        outcome
    );
    terminal::line(&described).into_owned()
}

pub async fn run_admin(args: AdminArgs) -> Result<()> {
    let new_key = match &args.command {
        AdminCommand::Keygen { out } => Some((out, "operator", generate_operator_key())),
        AdminCommand::ModerationKeygen { out } => Some((out, "moderation", generate_moderation_key())),
        _ => None,
    };
    if let Some((out, kind, (secret, public))) = new_key {
        fumi_server::audit::write_private(out, &secret)
            .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
        println!("{kind} key written to {}", out.display());
        println!("public key: {public}");
        println!("add to the server's configuration:");
        if kind == "operator" {
            println!(
                "[[operators]]\nname = \"YOUR-NAME\"\npublic_key = \"{public}\"\njurisdiction = \"jp\"\nnetworks = [\"127.0.0.1/32\"]"
            );
        } else {
            println!("moderation_public_key = \"{public}\"");
        }
        return Ok(());
    }
    let (Some(operator), Some(key), Some(reason)) = (&args.operator, &args.key, &args.reason) else {
        bail!("admin commands need --operator, --key and --reason (the reason is written into the public log)");
    };
    let secret = std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let admin = AdminClient::new(&args.server, operator, &secret, reason)?;
    match args.command {
        AdminCommand::Keygen { .. } | AdminCommand::ModerationKeygen { .. } => unreachable!("handled above"),
        AdminCommand::Accounts => {
            let accounts: serde_json::Value = admin.json(Method::GET, "/admin/v1/accounts", None).await?;
            println!("{}", serde_json::to_string_pretty(&accounts)?);
        }
        AdminCommand::Suspend { account } => {
            admin
                .json::<()>(Method::POST, &format!("/admin/v1/accounts/{account}/suspend"), None)
                .await?;
            println!("account {account} suspended");
        }
        AdminCommand::Unsuspend { account } => {
            admin
                .json::<()>(Method::POST, &format!("/admin/v1/accounts/{account}/unsuspend"), None)
                .await?;
            println!("account {account} unsuspended");
        }
        AdminCommand::Purge { account } => {
            let answer: serde_json::Value = admin
                .json(Method::DELETE, &format!("/admin/v1/accounts/{account}"), None)
                .await?;
            println!("account {account} purged ({} blobs deleted)", answer["blobs_deleted"]);
        }
        AdminCommand::Reports => {
            let reports: serde_json::Value = admin.json(Method::GET, "/admin/v1/reports", None).await?;
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
        AdminCommand::Report {
            id,
            moderation_key,
            json,
        } => {
            let secret = std::fs::read_to_string(&moderation_key)
                .with_context(|| format!("cannot read {}", moderation_key.display()))?;
            let reviewed = admin.review_report(id, &secret).await?;
            print_report(&reviewed, json)?;
            if let Err(reason) = &reviewed.verdict {
                bail!(
                    "REPORT REJECTED: its franking proof does not verify ({reason}); the reported content cannot be attributed to the named sender"
                );
            }
        }
        AdminCommand::DeleteBlob { blob } => {
            admin
                .json::<()>(Method::DELETE, &format!("/admin/v1/blobs/{blob}"), None)
                .await?;
            println!("blob {blob} deleted");
        }
        AdminCommand::Metrics => print!("{}", admin.text(Method::GET, "/admin/v1/metrics").await?),
        AdminCommand::Relocate { account, to } => {
            let mut outcome = None;
            admin
                .json_lines(
                    Method::POST,
                    &format!("/admin/v1/accounts/{account}/relocate"),
                    Some(&serde_json::json!({ "to": to })),
                    |line| {
                        if let Some(step) = line["step"].as_str() {
                            eprintln!("{}: {}/{}", terminal::line(step), line["done"], line["total"]);
                        } else {
                            outcome = Some(line);
                        }
                    },
                )
                .await?;
            match outcome {
                Some(line) if line.get("done").is_some() => {
                    let done = &line["done"];
                    if done["already_there"] == true {
                        println!("account {account} already lives in region {to}");
                    } else {
                        println!("account {account} relocated to region {to}");
                        println!("{}", serde_json::to_string_pretty(done)?);
                    }
                }
                Some(line) => bail!(
                    "relocation stopped: {}; run the same command again to resume it",
                    line["error"].as_str().unwrap_or("unknown error")
                ),
                None => {
                    bail!("the connection ended before the relocation did; run the same command again to finish it")
                }
            }
        }
    }
    Ok(())
}

fn print_report(reviewed: &ReviewedReport, json: bool) -> Result<()> {
    let report = &reviewed.report;
    let evidence = &report.evidence;
    if json {
        let verdict = match &reviewed.verdict {
            Ok(_) => serde_json::json!({"verified": true}),
            Err(reason) => serde_json::json!({"verified": false, "reason": reason}),
        };
        println!(
            "{}",
            serde_json::json!({
                "id": reviewed.id,
                "verdict": verdict,
                "sender": evidence.context.sender,
                "sender_device": evidence.context.device,
                "conversation": evidence.context.group,
                "message": evidence.context.message,
                "sent_at": evidence.context.sent_at,
                "content": evidence.content,
                "reporter": report.reporter,
                "comment": report.comment,
                "reported_at": report.reported_at,
            })
        );
        return Ok(());
    }
    // The text, file name and comment are shown with `{:?}`, which escapes control and
    // bidirectional characters; the media type and the verdict's reason are the reporter's or
    // the sender's too.
    println!("report {}", reviewed.id);
    match &reviewed.verdict {
        Ok(sender) => println!(
            "  VERIFIED: account {} (device {}) sent this in conversation {}",
            sender.account, sender.device, evidence.context.group
        ),
        Err(reason) => println!("  NOT VERIFIED: {}", terminal::line(reason)),
    }
    println!("  sent:      {}", format_utc(evidence.context.sent_at));
    println!("  text:      {:?}", evidence.content.text);
    if let Some(file) = &evidence.content.file {
        println!(
            "  file:      {:?} ({}, {} bytes, sha256 of the sealed blob {})",
            file.name,
            terminal::line(&file.media_type),
            file.size,
            terminal::line(&file.digest)
        );
    }
    println!("  reporter:  account {}", report.reporter);
    println!("  reported:  {}", format_utc(report.reported_at));
    println!("  comment:   {:?}", report.comment);
    Ok(())
}

/// `YYYY-MM-DD hh:mm:ss UTC` from ms since the Unix epoch.
pub fn format_utc(ms: u64) -> String {
    fumi_core::form::iso_time(ms).replace('T', " ").replace('Z', " UTC")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::format_utc(1_795_643_236_000), "2026-11-25 21:47:16 UTC");
        assert_eq!(super::format_utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
