use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgehub::logging::{self, LogFormat};
use edgemesh::config::{Config, DEFAULT_CONFIG};

/// edgemesh node agent: keeps the node's copy of the mesh metadata in sync with the cloud.
#[derive(Parser)]
#[command(name = "edgemesh", version)]
struct Args {
    /// Config file (TOML); /etc/edgemesh/edgemesh.toml is used when it exists.
    #[arg(long, short = 'c', global = true, env = "EDGEMESH_CONFIG")]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set cloud.url=ws://10.0.0.1:10000 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Shorthand for --set node_name=NAME.
    #[arg(long, global = true)]
    node_name: Option<String>,
    /// Shorthand for --set data_dir=DIR.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Shorthand for --set cloud.url=URL.
    #[arg(long, global = true)]
    cloud_url: Option<String>,
    /// Shorthand for --set cloud.token=TOKEN.
    #[arg(long, global = true, env = "EDGEMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Shorthand for --set admin.listen=ADDR.
    #[arg(long, global = true)]
    admin_listen: Option<String>,
    /// Log filter (target=level directives, as in RUST_LOG); overrides log.level.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// text or json; overrides log.format.
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Show connection state, synced version and object counts.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every iptables rule and chain edgemesh installed, and the DNS address it added
    /// to `lo` (the agent does this itself on a clean shutdown; run it after a crash or from
    /// ExecStopPost).
    Cleanup,
    /// Print every key with its default, or check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every key at its default, with what it means, as a TOML file.
    Defaults,
    /// Load and validate the configuration (FILE, else --config, else the default file).
    Check { file: Option<PathBuf> },
    /// Print the configuration in effect after the file and --set; the token is redacted.
    Show,
}

/// `edgemesh config ...`.
fn config_command(args: &Args, command: &ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Defaults => {
            print!(
                "{}",
                edgemesh::config::defaults_toml().map_err(anyhow::Error::msg)?
            )
        }
        ConfigCommand::Check { .. } => {
            let cfg = load_config(args, true)?;
            // The token file is read at startup; a missing one should show up here too.
            cfg.hub_client()?;
            if cfg.cloud_urls().is_empty() {
                eprintln!("note: {}", edgemesh::config::NO_CLOUD);
            }
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
            load_config(args, false)?
                .to_toml_redacted()
                .map_err(anyhow::Error::msg)?
        ),
    }
    Ok(())
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Loads the config; `validate` is skipped for commands that only read local state.
fn load_config(args: &Args, validate: bool) -> anyhow::Result<Config> {
    let mut o = args.set.clone();
    if let Some(v) = &args.node_name {
        o.push(format!("node_name={}", quoted(v)));
    }
    if let Some(v) = &args.data_dir {
        o.push(format!("data_dir={}", quoted(&v.display().to_string())));
    }
    if let Some(v) = &args.cloud_url {
        o.push(format!("cloud.url={}", quoted(v)));
    }
    if let Some(v) = &args.token {
        o.push(format!("cloud.token={}", quoted(v)));
    }
    if let Some(v) = &args.admin_listen {
        o.push(format!("admin.listen={}", quoted(v)));
    }
    // Errors name the key and where its value came from (the file or --set).
    let cfg: Config = edgehub::config_file::load_checked(
        args.config.as_deref(),
        std::path::Path::new(DEFAULT_CONFIG),
        &o,
        |cfg: &Config| if validate { cfg.validate() } else { Ok(()) },
    )?;
    Ok(cfg)
}

/// `edgemesh cleanup`: the iptables rules first, which needs no configuration (it runs from
/// `ExecStopPost`, also when a bad config file is what stopped the agent), then the DNS address
/// named by the configuration (the default one when the file does not load).
async fn cleanup(args: &Args) -> anyhow::Result<()> {
    // The config says which DNS address and which UDP policy rule (mark, table) were ours.
    let (dns, udp) = match load_config(args, false) {
        Ok(cfg) => (cfg.dns, cfg.proxy.udp),
        Err(e) => {
            eprintln!(
                "edgemesh cleanup: {e:#}; removing the default DNS address and UDP policy rule only"
            );
            Default::default()
        }
    };
    edgemesh::iptables::cleanup_all(&udp).await?;
    match edgemesh::dns::cleanup(&dns) {
        Ok(true) => println!("edgemesh DNS address {} removed", dns.listen.ip()),
        Ok(false) => {}
        Err(e) => anyhow::bail!("cannot remove the DNS address {}: {e}", dns.listen.ip()),
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
    if matches!(args.command, Some(Command::Cleanup)) {
        logging::quiet_on_closed_stdout();
        return cleanup(&args).await;
    }
    let run = matches!(args.command, None | Some(Command::Run));
    let cfg = load_config(&args, run)?;
    if !run {
        logging::quiet_on_closed_stdout();
    }
    match args.command {
        None | Some(Command::Run) => {
            cfg.log.init(args.log_level.as_deref(), args.log_format);
            edgemesh::agent::run(cfg).await
        }
        Some(Command::Status { json }) => edgemesh::status::run(&cfg, json).await,
        Some(Command::Cleanup) => cleanup(&args).await,
        Some(Command::Config(_)) => Ok(()), // answered above
    }
}

fn main() -> ExitCode {
    edgehub::process::run_main("edgemesh", main_inner(Args::parse()))
}
