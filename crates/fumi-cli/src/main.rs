//! `fumi`: the Fumi server and every user command, in one binary.

mod server;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fumi_client::{DisplayMessage, FumiClient};

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
    },
    /// Show this device's account.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a message: `fumi send bob.17 "hello"` or `fumi send --group "Ward 3" "hello"`.
    Send {
        /// Recipient's full username (e.g. bob.17) and the text; only the text with --group.
        #[arg(required = true, num_args = 1..=2, value_names = ["USERNAME", "TEXT"])]
        args: Vec<String>,
        /// Send to the group with this name.
        #[arg(long)]
        group: Option<String>,
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
    /// Set your display name.
    Set {
        /// New display name.
        #[arg(long)]
        name: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(args),
        command => {
            init_client_logging();
            run_client_command(cli.home, command)
        }
    };
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn init_client_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FUMI_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
            Command::Server(_) => unreachable!("handled in main"),
            Command::Register { server, name, username } => {
                let client = FumiClient::register(&home, &server, &name, &username).await?;
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
            Command::Send { args, group } => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                match (group, args.as_slice()) {
                    (Some(group), [text]) => client.send_group(&group, text).await?,
                    (None, [to, text]) => client.send_direct(to, text).await?,
                    (Some(_), _) => anyhow::bail!("with --group, give only the text: fumi send --group NAME TEXT"),
                    (None, _) => anyhow::bail!("give a username and the text: fumi send bob.17 \"hello\""),
                };
            }
            Command::Receive { timeout, json } => {
                let mut client = FumiClient::open(&home)?;
                for message in client.receive(Duration::from_secs(timeout)).await? {
                    print_message(&message, json)?;
                }
            }
            Command::Group(GroupCommand::Create { name, members }) => {
                let mut client = FumiClient::open(&home)?;
                client.sync().await?;
                client.create_group(&name, &members).await?;
                println!("created group {name:?} with {}", members.join(", "));
            }
            Command::Group(GroupCommand::Add(args)) => {
                let mut client = FumiClient::open(&home)?;
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
                        let state = if conversation.active { "" } else { " (removed)" };
                        println!("{}{state}: {}", conversation.name, conversation.members.join(", "));
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
                        println!("{} [{kind}]{unread}", conversation.name);
                    }
                }
            }
            Command::History { conversation, json } => {
                let client = FumiClient::open(&home)?;
                for message in client.history(&conversation)? {
                    print_message(&message, json)?;
                }
            }
            Command::Profile(ProfileCommand::Set { name }) => {
                let mut client = FumiClient::open(&home)?;
                client.set_name(&name).await?;
                println!("profile updated");
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
    let sender = match &message.sender_name {
        Some(name) => format!("{} · {name}", message.sender),
        None => message.sender.clone(),
    };
    let prefix = if message.group {
        format!("[{}] ", message.conversation_name)
    } else {
        String::new()
    };
    if message.event {
        println!("{prefix}* {}", message.text);
    } else {
        println!("{prefix}[{sender}] {}", message.text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Catches clap definition errors (which otherwise panic at run time) for every subcommand.
    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
