//! `fumi authority`, `fumi org`, `fumi channel` and `fumi form`: official accounts.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fumi_client::FumiClient;
use fumi_client::official::{ChannelPostView, ChannelSummary, OfficialEvents, SubmissionView};
use fumi_core::form::Answers;
use fumi_core::official::{AuthorityKey, OrganisationClaim, Verification};

use crate::terminal::{body, line};

#[derive(Subcommand)]
pub enum AuthorityCommand {
    /// (For an authority) make a signing key; prints the public key users trust.
    Keygen {
        /// Where to write the secret key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// (For an authority) sign an organisation's request (from `fumi org request`) after
    /// checking who they are; prints the statement to give back to them.
    Certify {
        /// The request file.
        request: PathBuf,
        /// The authority key file (from `fumi authority keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The authority's name, as written into the statement.
        #[arg(long)]
        name: String,
        /// Days the statement stays valid.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Write the statement here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Trust an authority's key to verify organisations (e.g. your government's CA, or your
    /// server operator's): organisations it vouches for are shown as verified.
    Trust {
        /// A name for it, shown as "verified by NAME".
        name: String,
        /// Its public key (64 hex digits), obtained from the authority itself, not from a chat.
        public_key: String,
    },
    /// Stop trusting an authority.
    Remove {
        /// The name you gave it.
        name: String,
    },
    /// List the authorities you trust.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum OrgCommand {
    /// Set this account's organisation name and logo (shown in its channels); prints the
    /// request to send to an authority for verification.
    Set {
        /// The organisation's name.
        #[arg(long)]
        name: String,
        /// A logo image (at most 64 KiB).
        #[arg(long)]
        logo: Option<PathBuf>,
        /// Write the request here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the verification request for the current name and logo.
    Request {
        /// Write it here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Install the statement an authority signed; every channel shows it from now on.
    Install {
        /// The statement file.
        statement: PathBuf,
    },
    /// Show the organisation profile and whether you would see it as verified.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ChannelCommand {
    /// Create a broadcast channel run by this account; prints its link.
    Create {
        /// Channel name.
        name: String,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Also print the link as a QR code.
        #[arg(long)]
        qr: bool,
    },
    /// Post text or a file to a channel you run (signed by your organisation, sealed once for
    /// everyone): `fumi channel post News "text"`, `fumi channel post News --file notice.pdf`.
    Post {
        /// Channel name or id.
        channel: String,
        /// The text (with --file: shown with the file).
        #[arg(required_unless_present = "file")]
        text: Option<String>,
        /// Post this file (encrypted on this device; subscribers download it).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Subscribe with a channel link (staff devices of the organisation do this too).
    Subscribe {
        /// The `fumi://channel/...` link.
        link: String,
    },
    /// Leave a channel.
    Unsubscribe {
        /// Channel name or id.
        channel: String,
    },
    /// List your channels (with the subscriber count for your own).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a channel's posts (fetching new ones first).
    Show {
        /// Channel name or id.
        channel: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum FormCommand {
    /// Publish a form (a JSON definition; see docs/OFFICIAL_ACCOUNTS.md) in a channel you run.
    Publish {
        /// Channel name or id.
        channel: String,
        /// The definition file.
        definition: PathBuf,
    },
    /// List the forms you know.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fill in a form; the answers go end-to-end encrypted to the organisation's staff devices.
    Fill {
        /// Form id (or a unique prefix of 6+ digits, or its title).
        form: String,
        /// Read the answers from this JSON file instead of asking.
        #[arg(long)]
        answers: Option<PathBuf>,
    },
    /// Write the submissions this device received for your form as CSV (file mode 0600).
    Export {
        /// Form id, prefix or title.
        form: String,
        /// The CSV file to write.
        #[arg(long)]
        csv: PathBuf,
    },
    /// List submissions of a form (received, for your own; sent, with receipts, otherwise).
    Submissions {
        /// Form id, prefix or title.
        form: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

fn write_or_print(out: Option<&Path>, text: &str) -> Result<()> {
    match out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n")).with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("written to {}", path.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// Escaped: the reason can quote the name an unknown authority gave itself.
fn describe(verification: &Verification) -> String {
    match verification {
        Verification::Verified { authority } => format!("✔ verified by {}", line(authority)),
        Verification::Unverified { reason } => format!("not verified ({})", line(reason)),
    }
}

/// Whether an authority command runs without an account (the authority's own tools).
pub fn is_offline(command: &AuthorityCommand) -> bool {
    matches!(
        command,
        AuthorityCommand::Keygen { .. } | AuthorityCommand::Certify { .. }
    )
}

/// Runs an authority command that needs no account.
pub fn run_authority_offline(command: &AuthorityCommand) -> Result<()> {
    match command {
        AuthorityCommand::Keygen { out } => {
            let key = AuthorityKey::generate(&mut rand::rng());
            fumi_server::audit::write_private(out, &hex::encode(key.secret()))
                .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
            println!("authority key written to {}", out.display());
            println!("public key: {}", hex::encode(key.public_key()));
            println!(
                "users trust it with: fumi authority trust \"NAME\" {}",
                hex::encode(key.public_key())
            );
            Ok(())
        }
        AuthorityCommand::Certify {
            request,
            key,
            name,
            days,
            out,
        } => {
            let text =
                std::fs::read_to_string(request).with_context(|| format!("cannot read {}", request.display()))?;
            let claim: OrganisationClaim = serde_json::from_str(&text).context("not an organisation request")?;
            let secret = std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(secret.trim(), &mut bytes).context("the key file does not hold an authority key")?;
            let now = fumi_client::now_ms();
            let statement = AuthorityKey::from_secret(&bytes).issue(name, claim, now, now + days * 86_400_000);
            write_or_print(out.as_deref(), &serde_json::to_string_pretty(&statement)?)
        }
        _ => unreachable!("is_offline"),
    }
}

pub async fn run_authority(home: &Path, command: AuthorityCommand) -> Result<()> {
    let client = FumiClient::open(home)?;
    match command {
        AuthorityCommand::Trust { name, public_key } => {
            client.trust_authority(&name, &public_key)?;
            println!("organisations verified by {name} are now shown as verified");
        }
        AuthorityCommand::Remove { name } => client.distrust_authority(&name)?,
        AuthorityCommand::List { json } => {
            for authority in client.trusted_authorities()? {
                let key = hex::encode(authority.public_key);
                if json {
                    println!("{}", serde_json::json!({"name": authority.name, "public_key": key}));
                } else {
                    println!("{}  {key}", authority.name);
                }
            }
        }
        AuthorityCommand::Keygen { .. } | AuthorityCommand::Certify { .. } => unreachable!("offline"),
    }
    Ok(())
}

pub async fn run_org(home: &Path, command: OrgCommand) -> Result<()> {
    let mut client = FumiClient::open(home)?;
    match command {
        OrgCommand::Set { name, logo, out } => {
            let claim = client.set_organisation(&name, logo.as_deref()).await?;
            write_or_print(out.as_deref(), &serde_json::to_string_pretty(&claim)?)?;
            eprintln!("send this request to an authority; install what it signs with `fumi org install`");
        }
        OrgCommand::Request { out } => write_or_print(
            out.as_deref(),
            &serde_json::to_string_pretty(&client.organisation_request()?)?,
        )?,
        OrgCommand::Install { statement } => {
            let text =
                std::fs::read_to_string(&statement).with_context(|| format!("cannot read {}", statement.display()))?;
            client.install_verification(&text).await?;
            println!("installed; your channels now carry the statement");
        }
        OrgCommand::Show { json } => {
            let profile = client.organisation()?;
            let who = client.whoami();
            let account = fumi_proto::AccountId::parse(&who.account_id)?;
            let identity_key = client.organisation_request()?.identity_key;
            let verification = profile.verification(
                account,
                &identity_key,
                &client.trusted_authorities()?,
                fumi_client::now_ms(),
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": profile.name, "logo": profile.logo.is_some(),
                                       "verification": verification})
                );
            } else {
                println!("{} · {}", profile.name, describe(&verification));
            }
        }
    }
    Ok(())
}

fn print_channel(channel: &ChannelSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(channel)?);
        return Ok(());
    }
    let role = if channel.own { "yours" } else { "subscribed" };
    let count = channel
        .subscribers
        .map(|n| format!(" · {n} subscriber{}", if n == 1 { "" } else { "s" }))
        .unwrap_or_default();
    println!(
        "{} — {} · {} · {role}{count} · {} posts",
        line(&channel.name),
        line(&channel.organisation),
        describe(&channel.verification),
        channel.posts
    );
    if channel.own {
        println!("  link: {}", channel.link);
    }
    Ok(())
}

fn print_post(post: &ChannelPostView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(post)?);
        return Ok(());
    }
    // The organisation chose the names, the text, the form and the file; the saved path ends in
    // its file name.
    let badge = post
        .verified_by
        .as_ref()
        .map(|a| format!(" ✔ {}", line(a)))
        .unwrap_or_default();
    let header = format!(
        "[#{} · {}{badge}] #{}",
        line(&post.channel_name),
        line(&post.organisation),
        post.seq
    );
    let text = post
        .text
        .as_deref()
        .map(|t| format!(" {}", body(t)))
        .unwrap_or_default();
    match (&post.form, &post.file) {
        (Some(form), _) => println!(
            "{header} FORM “{}” ({} questions): fumi form fill {}",
            line(&form.title),
            form.fields,
            line(&form.form_id)
        ),
        (None, Some(file)) => {
            let state = match (&file.path, &file.error) {
                (_, Some(error)) => format!("NOT SAVED: {}", line(error)),
                (Some(path), None) => line(path).into_owned(),
                (None, None) => "not downloaded yet; run `fumi receive` again".into(),
            };
            println!(
                "{header}{text} [file {} · {} bytes] {state}",
                line(&file.name),
                file.size
            );
        }
        (None, None) => println!("{header}{text}"),
    }
    Ok(())
}

fn print_submission(submission: &SubmissionView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(submission)?);
        return Ok(());
    }
    let title = line(submission.form_title.as_deref().unwrap_or(&submission.form_id));
    if submission.outgoing {
        let state = match submission.receipt_at {
            Some(_) => "received by the organisation",
            None => "sent, no receipt yet",
        };
        println!("submission {} to “{title}”: {state}", line(&submission.submission));
    } else {
        // JSON escapes C0 controls in the answers but not C1 or bidirectional controls.
        println!(
            "submission {} to “{title}” from {}: {}",
            line(&submission.submission),
            line(&submission.submitter),
            line(&serde_json::to_string(&submission.answers)?)
        );
    }
    Ok(())
}

/// Prints what `receive` found besides messages.
pub fn print_events(events: &OfficialEvents, json: bool) -> Result<()> {
    for post in &events.posts {
        if json {
            println!("{}", serde_json::json!({"type": "channel_post", "post": post}));
        } else {
            print_post(post, false)?;
        }
    }
    for submission in &events.submissions {
        if json {
            println!(
                "{}",
                serde_json::json!({"type": "form_submission", "submission": submission})
            );
        } else {
            print_submission(submission, false)?;
        }
    }
    for receipt in &events.receipts {
        if json {
            println!("{}", serde_json::json!({"type": "form_receipt", "submission": receipt}));
        } else {
            print_submission(receipt, false)?;
        }
    }
    for warning in &events.warnings {
        if json {
            println!("{}", serde_json::json!({"type": "channel_warning", "warning": warning}));
        } else {
            eprintln!(
                "WARNING: refused post #{} in channel {}: {}",
                warning.seq,
                line(&warning.channel_name),
                line(&warning.warning)
            );
        }
    }
    Ok(())
}

pub async fn run_channel(home: &Path, command: ChannelCommand) -> Result<()> {
    let mut client = FumiClient::open(home)?;
    match command {
        ChannelCommand::Create { name, description, qr } => {
            let channel = client.create_channel(&name, description.as_deref()).await?;
            println!("created channel {} ({})", channel.name, channel.id);
            println!("link: {}", channel.link);
            if qr {
                println!("{}", crate::qr(&channel.link)?);
            }
            println!("staff devices of this account subscribe with the same link to read and post");
        }
        ChannelCommand::Post { channel, text, file } => {
            let seq = match (file, text) {
                (Some(file), caption) => client.post_file(&channel, &file, caption.as_deref()).await?,
                (None, Some(text)) => client.post_text(&channel, &text).await?,
                (None, None) => unreachable!("clap requires text or --file"),
            };
            println!("posted #{seq}");
        }
        ChannelCommand::Subscribe { link } => {
            let channel = client.subscribe_channel(&link).await?;
            print_channel(&channel, false)?;
        }
        ChannelCommand::Unsubscribe { channel } => client.unsubscribe_channel(&channel).await?,
        ChannelCommand::List { json } => {
            for channel in client.channels().await? {
                print_channel(&channel, json)?;
            }
        }
        ChannelCommand::Show { channel, json } => {
            client.sync_channels().await?;
            print_events(
                &OfficialEvents {
                    warnings: client.take_channel_warnings(&channel)?,
                    ..Default::default()
                },
                json,
            )?;
            for post in client.channel_history(&channel)? {
                print_post(&post, json)?;
            }
        }
    }
    Ok(())
}

pub async fn run_form(home: &Path, command: FormCommand) -> Result<()> {
    let mut client = FumiClient::open(home)?;
    match command {
        FormCommand::Publish { channel, definition } => {
            let bytes = std::fs::read(&definition).with_context(|| format!("cannot read {}", definition.display()))?;
            let form_id = client.publish_form(&channel, &bytes).await?;
            println!("published form {form_id}");
        }
        FormCommand::List { json } => {
            client.sync_channels().await?;
            for form in client.forms()? {
                if json {
                    println!("{}", serde_json::to_string(&form)?);
                } else {
                    let count = if form.own { "received" } else { "sent" };
                    println!(
                        "{}  “{}” in #{} · {} questions · {} {count}",
                        line(&form.form_id),
                        line(&form.title),
                        line(&form.channel_name),
                        form.fields,
                        form.submissions
                    );
                }
            }
        }
        FormCommand::Fill { form, answers } => {
            client.sync_channels().await?;
            let answers: Answers = match answers {
                Some(path) => {
                    let text =
                        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_str(&text).context("the answers file must be a JSON object of field: answer")?
                }
                None => ask(&client, &form)?,
            };
            let id = client.submit_form(&form, answers).await?;
            println!("sent submission {id}; a receipt arrives when the organisation's device has it (`fumi receive`)");
        }
        FormCommand::Export { form, csv } => {
            client.sync().await?;
            let rows = client.export_form(&form, &csv)?;
            println!(
                "wrote {rows} submission{} to {}",
                if rows == 1 { "" } else { "s" },
                csv.display()
            );
        }
        FormCommand::Submissions { form, json } => {
            client.sync().await?;
            for submission in client.submissions(&form)? {
                print_submission(&submission, json)?;
            }
        }
    }
    Ok(())
}

/// Asks each question on the terminal until it gets a valid answer.
fn ask(client: &FumiClient, form: &str) -> Result<Answers> {
    let (_, definition) = client.form(form)?;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut answers = Answers::new();
    // The organisation wrote the whole form; labels, choices and errors quoting them may hold
    // line breaks.
    println!("{}", line(&definition.title));
    if let Some(description) = &definition.description {
        println!("{}", body(description));
    }
    for field in &definition.fields {
        for (i, choice) in field.choices.iter().enumerate() {
            println!("  {}. {}", i + 1, line(choice));
        }
        loop {
            let optional = if field.required { "" } else { ", Enter to skip" };
            print!("{} ({}{optional}): ", line(&field.label), line(&field.expects()));
            std::io::stdout().flush()?;
            let Some(input) = lines.next() else {
                bail!("input ended before the form was complete; nothing was sent");
            };
            match field.parse_typed(&input?) {
                Ok(Some(value)) => {
                    answers.insert(field.name.clone(), value);
                    break;
                }
                Ok(None) if !field.required => break,
                Ok(None) => println!("  an answer is required"),
                Err(e) => println!("  {}", line(&e.to_string())),
            }
        }
    }
    Ok(answers)
}
