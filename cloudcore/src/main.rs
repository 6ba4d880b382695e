use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloudcore::cli::{self, Client};
use cloudcore::config::{Config, DEFAULT_CONFIG};
use edgehub::logging::{self, LogFormat};

/// edgemesh's cloud side: REST API, store and the hub edge nodes connect to.
#[derive(Parser)]
#[command(name = "cloudcore", version)]
struct Args {
    /// Config file (TOML); /etc/cloudcore/cloudcore.toml is used when it exists.
    #[arg(long, short = 'c', global = true, env = "CLOUDCORE_CONFIG")]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set hub.listen=0.0.0.0:10000 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Shorthand for --set data_dir=DIR.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax); overrides log.level.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// text or json; overrides log.format.
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// REST API address.
    #[arg(
        long,
        env = "CLOUDCORE_SERVER",
        default_value = "http://127.0.0.1:10002"
    )]
    server: String,
    /// API token (default: <data_dir>/api-token).
    #[arg(long, env = "CLOUDCORE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate for an https:// server.
    #[arg(long, env = "CLOUDCORE_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run cloudcore (the default).
    Run,
    /// Print every key with its default, or check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create or update objects from a YAML/JSON file, a directory of them, or - for stdin.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List or show services, endpoints or nodes.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// table, wide, json or yaml.
        #[arg(short = 'o', long, default_value = "table")]
        output: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a service, endpoints or node.
    Delete {
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Manage node tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Create (or rotate) a node's token and print it.
    Create {
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a node's token and disconnect it.
    Revoke {
        node: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut overrides = args.set.clone();
    if let Some(d) = &args.data_dir {
        overrides.push(format!(
            "data_dir={}",
            toml_string(&d.display().to_string())
        ));
    }
    let cfg: Config = edgehub::config_file::load(
        args.config.as_deref(),
        std::path::Path::new(DEFAULT_CONFIG),
        &overrides,
    )?;
    cfg.validate()?;
    Ok(cfg)
}

fn toml_string(s: &str) -> String {
    format!("{s:?}")
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every key at its default, with what it means, as a TOML file.
    Defaults,
    /// Load and validate the configuration (FILE, else --config, else the default file).
    Check { file: Option<PathBuf> },
    /// Print the configuration in effect after the file and --set; the API token is redacted.
    Show,
}

/// `cloudcore config ...`.
fn config_command(args: &Args, command: &ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Defaults => {
            print!(
                "{}",
                cloudcore::config::defaults_toml().map_err(anyhow::Error::msg)?
            )
        }
        ConfigCommand::Check { .. } => {
            load_config(args)?;
            match &args.config {
                Some(file) => println!("{}: ok", file.display()),
                None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
                    println!("{DEFAULT_CONFIG}: ok")
                }
                None => println!("ok ({DEFAULT_CONFIG} does not exist: defaults and flags only)"),
            }
        }
        ConfigCommand::Show => print!(
            "{}",
            load_config(args)?
                .to_toml_redacted()
                .map_err(anyhow::Error::msg)?
        ),
    }
    Ok(())
}

async fn main_inner(mut args: Args) -> anyhow::Result<()> {
    if let Some(Command::Config(ConfigCommand::Check { file: Some(f) })) = &args.command {
        args.config = Some(f.clone());
    }
    // Before the config is loaded: `config defaults` must work whatever the file holds.
    if let Some(Command::Config(command)) = &args.command {
        logging::quiet_on_closed_stdout();
        return config_command(&args, command);
    }
    let cfg = load_config(&args)?;
    if !matches!(args.command, None | Some(Command::Run)) {
        logging::quiet_on_closed_stdout();
    }
    let client = |c: ClientArgs| Client::new(c.server, c.token, c.ca_cert, &cfg.data_dir);
    match args.command {
        None | Some(Command::Run) => {
            cfg.log.init(args.log_level.as_deref(), args.log_format);
            cloudcore::app::run(cfg).await
        }
        Some(Command::Apply { file, client: c }) => cli::apply(&client(c)?, &file).await,
        Some(Command::Get {
            kind,
            name,
            namespace,
            output,
            client: c,
        }) => cli::get(&client(c)?, &kind, name.as_deref(), &namespace, &output).await,
        Some(Command::Delete {
            kind,
            name,
            namespace,
            client: c,
        }) => cli::delete(&client(c)?, &kind, &name, &namespace).await,
        Some(Command::Token {
            action: TokenAction::Create { node, client: c },
        }) => cli::token_create(&client(c)?, &node).await,
        Some(Command::Token {
            action: TokenAction::Revoke { node, client: c },
        }) => cli::token_revoke(&client(c)?, &node).await,
        Some(Command::Config(_)) => Ok(()), // answered above
    }
}

fn main() -> ExitCode {
    edgehub::process::run_main("cloudcore", main_inner(Args::parse()))
}
