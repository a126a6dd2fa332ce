//! `fumi`: the Fumi server and every user command, in one binary.

mod daemon;
mod official;
mod operator;
mod progress;
mod server;
mod terminal;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fumi_client::{DisplayMessage, FumiClient, Progress, To};
use terminal::{body, line};

#[derive(Parser)]
#[command(
    name = "fumi",
    version,
    about = "Fumi: an end-to-end encrypted messenger whose server cannot read you."
)]
struct Cli {
    /// Directory holding this device's keys, contacts and history.
    /// [default: the platform data directory, e.g. ~/.local/share/fumi]
    #[arg(long, global = true, env = "FUMI_HOME")]
    home: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded SQLite in ./fumi-data unless configured otherwise).
    Server(server::ServerArgs),
    /// Check a server's public log of operator accesses.
    #[command(subcommand)]
    Audit(operator::AuditCommand),
    /// Key transparency: check your account in the server's key directory, or audit the directory.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Operator tools: keys, and the signed admin API (every call is written to the public log).
    Admin(operator::AdminArgs),
    /// Create an account on a server; prints your full username (name.NN).
    Register {
        /// Server URL, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "FUMI_SERVER")]
        server: String,
        /// Your display name, shown to your contacts (encrypted; the server cannot read it).
        #[arg(long)]
        name: String,
        /// The name part of your username; the client adds a number (alice -> alice.42).
        #[arg(long)]
        username: String,
        /// The region your messages, keys, profile and files are kept in (one the server
        /// offers; default: the server's).
        #[arg(long)]
        region: Option<String>,
    },
    /// Show this device's account.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a message or a file: `fumi send bob.17 "hello"`, `fumi send bob.17 --file scan.pdf`,
    /// `fumi send --group "Ward 3" "hello"`.
    Send {
        /// Recipient's full username (e.g. bob.17) and the text (several words are joined with
        /// spaces); only the text with --group; only the username with --file.
        #[arg(num_args = 0.., value_names = ["USERNAME", "TEXT"])]
        args: Vec<String>,
        /// Send to the group with this name.
        #[arg(long)]
        group: Option<String>,
        /// Send this file (encrypted on this device; any size).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Text shown with the file.
        #[arg(long, requires = "file")]
        caption: Option<String>,
        /// Print the sent message's id and time as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch new messages and print them; with --timeout, keep listening that many seconds.
    Receive {
        /// Seconds to keep listening for new messages after the queued ones.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// One JSON object per line: id, conversation, sender, sender_name, text, sent_at, ...
        #[arg(long)]
        json: bool,
    },
    /// Create and manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List conversations with unread counts.
    Conversations {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the local history of a conversation (a username or a group name); nothing is
    /// fetched from the server.
    History {
        /// name.NN for a 1:1 conversation, or a group name.
        conversation: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Change your profile.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Link, list and remove this account's devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Run as a JSON-RPC 2.0 service for bots and integrations: requests and `message`
    /// notifications, one JSON object per line, on stdin/stdout and optionally a Unix socket
    /// (see docs/JSON_RPC.md).
    Daemon {
        /// Speak JSON-RPC 2.0 (the only mode).
        #[arg(long, required = true)]
        json_rpc: bool,
        /// Also listen on this Unix socket (created with mode 0600; one session per connection).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// How often subscribed sessions are checked for new messages, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
    },
    /// Show the safety number with a contact, to compare in person (or scan as a QR code); with
    /// --confirm, mark it verified. A later change of a verified contact's key is refused loudly.
    Verify {
        /// The contact's full username (e.g. bob.17).
        username: String,
        /// You compared the number with them in person and it matches: mark it verified (and
        /// trust their new key, if it changed).
        #[arg(long)]
        confirm: bool,
        /// Also print the number as a QR code.
        #[arg(long)]
        qr: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report a message you received for abuse: its text and a proof that its sender really sent
    /// it go, sealed, to the server's moderators (only they can open it).
    Report {
        /// The message id (`fumi history NAME --json` and `fumi receive --json` print it).
        message: String,
        /// Why you report it.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Make a one-time invite link to you (no username needed to use it).
    Invite {
        /// Also print the link as a QR code.
        #[arg(long)]
        qr: bool,
    },
    /// Add contacts from invite links, and list them.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Authorities that verify organisations: trust one, or (as an authority) make a key and
    /// sign an organisation's request.
    #[command(subcommand)]
    Authority(official::AuthorityCommand),
    /// This account as an organisation: name, logo, and an authority's verification.
    #[command(subcommand)]
    Org(official::OrgCommand),
    /// Broadcast channels: create, post, subscribe, list, show.
    #[command(subcommand)]
    Channel(official::ChannelCommand),
    /// Forms in channels: publish, fill in (answers reach only the organisation), export.
    #[command(subcommand)]
    Form(official::FormCommand),
    /// Turn disappearing messages on or off for a conversation: `fumi disappearing bob.17 1h`.
    Disappearing {
        /// A username (1:1) or a group name.
        conversation: String,
        /// How long messages live after they arrive (30s, 10m, 1h, 7d, 4w), or `off`.
        duration: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Check every version the key directory ever published of your account: your identity key
    /// and only devices you linked. Exits non-zero with a warning otherwise. `fumi receive`
    /// runs this check whenever the directory changed.
    Check,
    /// Check, as anyone can, that the server's key directory only ever appended: each epoch
    /// extends the one before. With --state, continue from the epoch audited last time (kept in
    /// that file) and fail if its history was rewritten since.
    Audit {
        /// Server URL, e.g. http://127.0.0.1:8080.
        #[arg(long, env = "FUMI_SERVER")]
        server: String,
        /// File remembering the last audited epoch (created on the first run).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Link a new device. On the new device: `fumi --home NEW device link CODE` (or
    /// `--from OLD-HOME` when both are on this machine). On an existing device, without CODE:
    /// print a one-time link code and QR code, and wait for the new device.
    Link {
        /// The code printed by the existing device.
        code: Option<String>,
        /// Home directory of an existing device on this machine to link from.
        #[arg(long, conflicts_with = "code")]
        from: Option<PathBuf>,
        /// Seconds to wait for the new device.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// List this account's devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a device (id or unique prefix): it can read nothing sent afterwards.
    Remove {
        /// Device id, as `device list` shows it.
        device: String,
    },
}

#[derive(Subcommand)]
enum ContactCommand {
    /// Add the person behind an invite link and open a conversation with them.
    Add {
        /// The `fumi://invite/...` link.
        invite: String,
    },
    /// List your contacts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Create a group with these members.
    Create {
        /// Group name (encrypted; the server cannot read it).
        name: String,
        /// Members' usernames.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add members; they read only what is sent after they join.
    Add(MembersArgs),
    /// Remove members; they cannot read anything sent afterwards.
    Remove(MembersArgs),
    /// List your groups.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct MembersArgs {
    /// Group name.
    name: String,
    /// Members' usernames.
    #[arg(required = true)]
    members: Vec<String>,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Set your display name and/or avatar.
    Set {
        /// New display name.
        #[arg(long, required_unless_present = "avatar")]
        name: Option<String>,
        /// Avatar image (PNG, JPEG, GIF or WebP, at most 256 KiB), encrypted like your name.
        #[arg(long)]
        avatar: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(args),
        Command::Admin(args) => {
            init_client_logging();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(operator::run_admin(args)))
        }
        Command::Authority(ref authority) if official::is_offline(authority) => {
            official::run_authority_offline(authority)
        }
        command => {
            init_client_logging();
            run_client_command(cli.home, command)
        }
    };
    if let Err(error) = result {
        // Errors quote what peers and the server sent (names, server messages).
        eprintln!("error: {}", body(&format!("{error:#}")));
        std::process::exit(1);
    }
}

fn init_client_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter("warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `FUMI_LOG` (or `default`), with the logging of whole HTTP requests by dependencies turned off
/// whatever it asks: those requests carry the device credential.
pub(crate) fn log_filter(default: &str) -> tracing_subscriber::EnvFilter {
    let wanted = std::env::var("FUMI_LOG").unwrap_or_else(|_| default.to_owned());
    // akd's own notes (such as creating its first tree) are its jargon, not the operator's.
    let filter = format!("{wanted},tungstenite=off,tokio_tungstenite=off,akd=warn");
    tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("FUMI_LOG={wanted:?} is not a valid filter ({e}); using {default:?}");
        tracing_subscriber::EnvFilter::new(format!("{default},tungstenite=off,tokio_tungstenite=off"))
    })
}

fn default_home() -> Result<PathBuf> {
    Ok(dirs::data_dir()
        .context("no platform data directory; pass --home")?
        .join("fumi"))
}

fn run_client_command(home: Option<PathBuf>, command: Command) -> Result<()> {
    let home = match home {
        Some(home) => home,
        None => default_home()?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        match command {
            Command::Server(_) | Command::Admin(_) => unreachable!("handled in main"),
            Command::Audit(command) => operator::run_audit(&home, command).await?,
            Command::Keys(KeysCommand::Check) => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                let warnings = client.check_own_keys(true).await?;
                if !warnings.is_empty() {
                    for warning in &warnings {
                        eprintln!("{}", line(warning));
                    }
                    anyhow::bail!("your account's key directory entry lists keys you did not add");
                }
                println!("key directory checked: your account lists your identity key and only devices you linked");
            }
            Command::Keys(KeysCommand::Audit { server, state, json }) => {
                operator::run_keys_audit(&server, state.as_deref(), json).await?
            }
            Command::Authority(command) => official::run_authority(&home, command).await?,
            Command::Org(command) => official::run_org(&home, command).await?,
            Command::Channel(command) => official::run_channel(&home, command).await?,
            Command::Form(command) => official::run_form(&home, command).await?,
            Command::Register {
                server,
                name,
                username,
                region,
            } => {
                let client = FumiClient::register_in(&home, &server, &name, &username, region.as_deref()).await?;
                let me = client.whoami();
                println!("registered {}", me.username.unwrap_or_default());
            }
            Command::Whoami { json } => {
                let me = FumiClient::open(&home)?.whoami();
                if json {
                    println!("{}", serde_json::to_string(&me)?);
                } else {
                    println!("{} · {}", me.username.as_deref().unwrap_or("(no username)"), me.name);
                    println!(
                        "account {}\ndevice  {}\nserver  {}",
                        me.account_id, me.device_id, me.server
                    );
                }
            }
            Command::Send {
                args,
                group,
                file,
                caption,
                json,
            } => {
                let mut client = FumiClient::open(&home)?;
                client.set_progress(progress_bar());
                client.sync().await?;
                let (to, text) = match (&group, args.as_slice()) {
                    (Some(_), words) => (None, words.join(" ")),
                    (None, [to, words @ ..]) => (Some(to.as_str()), words.join(" ")),
                    (None, []) => (None, String::new()),
                };
                let id = match (&group, &file, to, text.is_empty()) {
                    (Some(group), None, _, false) => client.send_group(group, &text).await?,
                    (None, None, Some(to), false) => client.send_direct(to, &text).await?,
                    (Some(group), Some(file), _, true) => {
                        client.send_file(To::Group(group), file, caption.as_deref()).await?
                    }
                    (None, Some(file), Some(to), true) => {
                        client.send_file(To::User(to), file, caption.as_deref()).await?
                    }
                    (Some(_), Some(_), _, _) => anyhow::bail!("with --group and --file, give no other arguments"),
                    (None, Some(_), _, _) => {
                        anyhow::bail!("give the username and the file: fumi send bob.17 --file scan.pdf")
                    }
                    (Some(_), None, _, true) => anyhow::bail!("with --group, give the text: fumi send --group NAME TEXT"),
                    (None, None, _, _) => anyhow::bail!("give a username and the text: fumi send bob.17 \"hello\""),
                };
                let to = group.as_deref().or(to).unwrap_or_default();
                if json {
                    println!("{}", serde_json::json!({"id": id.to_string(), "to": to}));
                } else {
                    println!("sent to {}", line(to));
                }
            }
            Command::Receive { timeout, json } => {
                let mut client = FumiClient::open(&home)?;
                client.set_progress(progress_bar());
                client
                    .receive_each(Duration::from_secs(timeout), |message| {
                        print_message(&message, json).map_err(|e| fumi_client::ClientError::Store(e.to_string()))
                    })
                    .await?;
                for warning in client.take_key_warnings() {
                    if json {
                        println!("{}", serde_json::json!({"type": "key_warning", "message": warning}));
                    } else {
                        println!("{}", line(&warning));
                    }
                }
                official::print_events(&client.take_official_events()?, json)?;
            }
            Command::Group(GroupCommand::Create { name, members }) => {
                let mut client = FumiClient::open(&home)?;
                client.set_progress(progress_bar());
                client.sync().await?;
                client.create_group(&name, &members).await?;
                println!("created group {name:?} with {}", members.join(", "));
            }
            Command::Group(GroupCommand::Add(args)) => {
                let mut client = FumiClient::open(&home)?;
                client.set_progress(progress_bar());
                client.sync().await?;
                client.add_to_group(&args.name, &args.members).await?;
                println!("added {} to {:?}", args.members.join(", "), args.name);
            }
            Command::Group(GroupCommand::Remove(args)) => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                client.remove_from_group(&args.name, &args.members).await?;
                println!("removed {} from {:?}", args.members.join(", "), args.name);
            }
            Command::Group(GroupCommand::List { json }) => {
                let client = FumiClient::open(&home)?;
                for conversation in client.conversations()?.into_iter().filter(|c| c.group) {
                    if json {
                        println!("{}", serde_json::to_string(&conversation)?);
                    } else {
                        let state = if !conversation.active {
                            " (removed)"
                        } else if conversation.refused.is_some() {
                            " (not sending: a member the key directory does not list)"
                        } else {
                            ""
                        };
                        println!(
                            "{}{state}: {}",
                            line(&conversation.name),
                            line(&conversation.members.join(", "))
                        );
                    }
                }
            }
            Command::Conversations { json } => {
                let client = FumiClient::open(&home)?;
                for conversation in client.conversations()? {
                    if json {
                        println!("{}", serde_json::to_string(&conversation)?);
                    } else {
                        let kind = if conversation.group { "group" } else { "1:1" };
                        let unread = if conversation.unread > 0 {
                            format!(" ({} unread)", conversation.unread)
                        } else {
                            String::new()
                        };
                        let timer = conversation
                            .disappearing
                            .map(|t| format!(" (messages disappear after {t})"))
                            .unwrap_or_default();
                        println!("{} [{kind}]{unread}{timer}", line(&conversation.name));
                    }
                }
            }
            Command::History { conversation, json } => {
                let client = FumiClient::open(&home)?;
                for message in client.history(&conversation)? {
                    print_message(&message, json)?;
                }
            }
            Command::Profile(ProfileCommand::Set { name, avatar }) => {
                let mut client = FumiClient::open(&home)?;
                if let Some(name) = name {
                    client.set_name(&name).await?;
                }
                if let Some(avatar) = avatar {
                    client.set_avatar(&avatar).await?;
                }
                println!("profile updated; contacts see it with your next message");
            }
            Command::Device(DeviceCommand::Link { code, from, wait }) => match (code, from) {
                (Some(code), None) => {
                    let client = FumiClient::link(&home, &code).await?;
                    let me = client.whoami();
                    println!(
                        "linked as device {} of {}; your other devices add it to your conversations when they next sync",
                        me.device_id,
                        me.username.unwrap_or_default()
                    );
                }
                (None, Some(from)) => {
                    let mut existing = FumiClient::open(&from)?;
                    existing.set_progress(progress_bar());
                    let link = existing.create_device_link().await?;
                    let client = FumiClient::link(&home, &link.code).await?;
                    existing.wait_for_link(&link, Duration::from_secs(wait)).await?;
                    let me = client.whoami();
                    println!(
                        "linked as device {} of {}; it receives what is sent from now on",
                        me.device_id,
                        me.username.unwrap_or_default()
                    );
                }
                (None, None) => {
                    let mut client = FumiClient::open(&home)?;
                    client.set_progress(progress_bar());
                    let link = client.create_device_link().await?;
                    println!("On the new device, run:\n\n  fumi --home NEW-HOME device link '{}'\n", link.code);
                    println!("or scan:\n{}", qr(&link.code)?);
                    println!("Anyone with this code can become your device: show it to no one. Waiting...");
                    let device = client.wait_for_link(&link, Duration::from_secs(wait)).await?;
                    println!("device {device} linked and added to your conversations");
                }
                (Some(_), Some(_)) => unreachable!("clap: --from conflicts with CODE"),
            },
            Command::Device(DeviceCommand::List { json }) => {
                let client = FumiClient::open(&home)?;
                for device in client.devices().await? {
                    if json {
                        println!("{}", serde_json::to_string(&device)?);
                    } else {
                        let about = match (device.this_device, device.trusted, device.known_since) {
                            (true, _, _) => "this device".to_owned(),
                            (false, true, Some(since)) => {
                                format!("known to this device since {}", operator::format_utc(since))
                            }
                            (false, true, None) => "linked by your devices".to_owned(),
                            (false, false, _) => {
                                "NOT LINKED BY ANY OF YOUR DEVICES: remove it if you do not know it; see `fumi keys check`"
                                    .to_owned()
                            }
                        };
                        println!("{}  ({about})", device.id);
                    }
                }
            }
            Command::Device(DeviceCommand::Remove { device }) => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                let removed = client.remove_device(&device).await?;
                println!("removed device {removed}; it can read nothing sent from now on");
            }
            Command::Daemon {
                json_rpc: _,
                socket,
                poll_ms,
            } => daemon::run(&home, socket, Duration::from_millis(poll_ms.max(50))).await?,
            Command::Verify {
                username,
                confirm,
                qr: show_qr,
                json,
            } => {
                let client = FumiClient::open(&home)?;
                let check = if confirm {
                    client.confirm_safety_number(&username).await?
                } else {
                    client.safety_number(&username).await?
                };
                if json {
                    println!("{}", serde_json::to_string(&check)?);
                } else {
                    if check.changed && !confirm {
                        eprintln!(
                            "WARNING: {username}'s identity key is NOT the one you knew. Their messages and \
                             conversations are refused until you compare this new safety number with them \
                             in person and run `fumi verify {username} --confirm`."
                        );
                    }
                    println!("safety number with {username}:");
                    println!("{}", fumi_core::safety::display(&check.number));
                    if show_qr {
                        println!("{}", qr(&format!("fumi-safety:{}", check.number))?);
                    }
                    println!(
                        "{}",
                        if check.verified {
                            "verified: you confirmed this number in person"
                        } else {
                            "not verified: compare it with them in person, then run `fumi verify NAME --confirm`"
                        }
                    );
                }
                if check.changed && !confirm {
                    std::process::exit(3);
                }
            }
            Command::Report { message, comment } => {
                let client = FumiClient::open(&home)?;
                let id = client.report(&message, &comment).await?;
                println!("reported as report {id}; only the server's moderators can read it");
            }
            Command::Invite { qr: show_qr } => {
                let client = FumiClient::open(&home)?;
                let link = client.create_invite().await?;
                println!("{link}");
                if show_qr {
                    println!("{}", qr(&link)?);
                }
                eprintln!("This link works once, for 30 days. Whoever uses it can message you.");
            }
            Command::Contact(ContactCommand::Add { invite }) => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                let contact = client.accept_invite(&invite).await?;
                println!(
                    "added {}{}; say hello with `fumi send {} \"...\"`",
                    line(contact.username.as_deref().unwrap_or(&contact.account_id)),
                    contact.name.map(|n| format!(" · {}", line(&n))).unwrap_or_default(),
                    line(contact.username.as_deref().unwrap_or("USERNAME")),
                );
            }
            Command::Contact(ContactCommand::List { json }) => {
                let client = FumiClient::open(&home)?;
                for contact in client.contacts()? {
                    if json {
                        println!("{}", serde_json::to_string(&contact)?);
                    } else {
                        println!(
                            "{}{}{}{}",
                            line(contact.username.as_deref().unwrap_or(&contact.account_id)),
                            contact.name.map(|n| format!(" · {}", line(&n))).unwrap_or_default(),
                            if contact.verified { "  ✓ verified" } else { "" },
                            contact
                                .avatar
                                .map(|a| format!("  (avatar: {})", line(&a)))
                                .unwrap_or_default(),
                        );
                    }
                }
            }
            Command::Disappearing { conversation, duration } => {
                let after = parse_timer(&duration)?;
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                let to = if fumi_core::Username::parse(&conversation).is_ok() {
                    To::User(&conversation)
                } else {
                    To::Group(&conversation)
                };
                client.set_disappearing(to, after).await?;
                match after {
                    Some(after) => println!(
                        "messages in {conversation} now disappear {} after they arrive",
                        fumi_client::human_duration(after.as_millis() as u64)
                    ),
                    None => println!("disappearing messages are off in {conversation}"),
                }
            }
        }
        Ok(())
    })
}

fn print_message(message: &DisplayMessage, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(message)?);
        return Ok(());
    }
    // Everything here but the size came from the sender: names, texts, the file's name and type,
    // and the saved path, which ends in the sender's file name.
    let sender = match &message.sender_name {
        Some(name) => format!("{} · {}", line(&message.sender), line(name)),
        None => line(&message.sender).into_owned(),
    };
    let prefix = if message.group {
        format!("[{}] ", line(&message.conversation_name))
    } else {
        String::new()
    };
    if message.event {
        println!("{prefix}* {}", line(&message.text));
    } else if let Some(file) = &message.file {
        let caption = if message.text.is_empty() {
            String::new()
        } else {
            format!(" {}", body(&message.text))
        };
        let state = match (&file.path, &file.error) {
            (_, Some(error)) => format!("NOT SAVED: {}", line(error)),
            (Some(path), None) => line(path).into_owned(),
            (None, None) => "not downloaded yet; run `fumi receive` again".into(),
        };
        println!(
            "{prefix}[{sender}]{caption} [file {} · {} · {}] {state}",
            line(&file.name),
            line(&file.media_type),
            human_bytes(file.size)
        );
    } else {
        println!("{prefix}[{sender}] {}", body(&message.text));
    }
    Ok(())
}

/// The transfer progress bar, which quotes file names.
fn progress_bar() -> Box<dyn Progress> {
    Box::new(terminal::Escaped(progress::Bar::default()))
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// `30s`, `10m`, `1h`, `7d`, `4w`, or `off`.
fn parse_timer(text: &str) -> Result<Option<Duration>> {
    let text = text.trim().to_ascii_lowercase();
    if text == "off" {
        return Ok(None);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 30s, 10m, 1h, 7d, 4w, or off"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => anyhow::bail!("{text:?} is not a duration like 30s, 10m, 1h, 7d, 4w, or off"),
    };
    Ok(Some(Duration::from_secs(number.saturating_mul(seconds))))
}

/// A QR code drawn with Unicode half blocks, for terminals.
pub(crate) fn qr(text: &str) -> Result<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).context("the code is too long for a QR code")?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .build())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Catches clap definition errors (which otherwise panic at run time) for every subcommand.
    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn timers_parse() {
        use std::time::Duration;
        assert_eq!(super::parse_timer("1h").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(super::parse_timer("30s").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(super::parse_timer("off").unwrap(), None);
        assert!(super::parse_timer("soon").is_err());
        assert!(super::parse_timer("5y").is_err());
    }
}
