use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloudcore::cli::{self, config as client_config, Client};
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
    /// Log filter (target=level directives, as in RUST_LOG); overrides log.level.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// text or json; overrides log.format.
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where the API is and how to authenticate; each setting: flag, else environment variable,
/// else the client config file, else the default.
#[derive(clap::Args)]
struct ClientArgs {
    /// REST API address [env: CLOUDCORE_SERVER] [default: http://127.0.0.1:10002].
    #[arg(long)]
    server: Option<String>,
    /// API token [env: CLOUDCORE_TOKEN] [default: <data_dir>/api-token].
    #[arg(long)]
    token: Option<String>,
    /// CA certificate for an https:// server [env: CLOUDCORE_CA_CERT].
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// Client config file (TOML: server, token or token_file, ca_cert) [env:
    /// CLOUDCORE_CLIENT_CONFIG] [default: $XDG_CONFIG_HOME/cloudcore/client.toml or
    /// ~/.config/cloudcore/client.toml].
    #[arg(long, value_name = "PATH")]
    client_config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run cloudcore (the default).
    Run,
    /// Print every key with its default, or check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create or update objects (Services, Endpoints, Nodes, Communities, RuleEndpoints,
    /// Rules) from YAML or JSON files, directories of them, or - for stdin. Documents of other
    /// kinds (Deployments, ServiceAccounts, ...) are listed as skipped; exit status 0:
    /// everything applied, 3: applied, but some documents were skipped, 1: an error (nothing
    /// applied unless said).
    Apply {
        /// A file, a directory (its *.yaml, *.yml and *.json files) or - (repeatable).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Also read the directories' subdirectories.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Refuse the whole apply when a document is of a kind cloudcore does not serve.
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List or show services (svc), endpoints (ep), nodes (no), rules or ruleendpoints (re).
    Get {
        /// The kind, or KIND/NAME.
        kind: String,
        name: Option<String>,
        /// Namespace of services and endpoints.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// List services and endpoints of every namespace.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: cli::Output,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a service, endpoints, node, rule or rule endpoint.
    Delete {
        /// The kind, or KIND/NAME.
        kind: String,
        name: Option<String>,
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
    /// Move the store between backends (cloudcore stopped): export from the configured
    /// store, import into another (SQLite ↔ etcd).
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write every object, the history, node tokens and router records of the configured
    /// store (store.backend) as JSON lines.
    Export {
        /// Output file; - for stdout.
        #[arg(short = 'o', long, default_value = "-")]
        output: String,
    },
    /// Fill the configured store, which must be empty, from an export.
    Import {
        /// The export; - for stdin.
        file: String,
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
    // Errors name the key and where its value came from (the file or --set).
    let cfg: Config = edgehub::config_file::load_checked(
        args.config.as_deref(),
        std::path::Path::new(DEFAULT_CONFIG),
        &overrides,
        Config::validate,
    )?;
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

/// `cloudcore store export|import`.
async fn store_command(cfg: &Config, command: StoreCommand) -> anyhow::Result<()> {
    use cloudcore::store::export;
    use std::io::Write;
    let store = cloudcore::app::open_store(cfg).await?.store;
    match command {
        StoreCommand::Export { output } => {
            let dump = tokio::task::spawn_blocking(move || export::dump(store.as_ref())).await??;
            let (version, objects) = (dump.version, dump.records.len());
            if output == "-" {
                let mut out = std::io::stdout().lock();
                export::write(&dump, &mut out)?;
                out.flush()?;
            } else {
                let file = std::fs::File::create(&output)
                    .map_err(|e| anyhow::anyhow!("cannot write {output}: {e}"))?;
                export::write(&dump, std::io::BufWriter::new(file))?;
            }
            eprintln!("exported version {version}: {objects} objects, {} changes of history, {} tokens, {} router records", dump.changes.len(), dump.tokens.len(), dump.router.len());
        }
        StoreCommand::Import { file } => {
            let dump = if file == "-" {
                export::read(std::io::stdin().lock())?
            } else {
                let f = std::fs::File::open(&file)
                    .map_err(|e| anyhow::anyhow!("cannot read {file}: {e}"))?;
                export::read(std::io::BufReader::new(f))
                    .map_err(|e| anyhow::anyhow!("{file}: {e}"))?
            };
            let (version, objects) = (dump.version, dump.records.len());
            tokio::task::spawn_blocking(move || {
                export::check_empty(store.as_ref())?;
                store.restore(&dump)
            })
            .await??;
            eprintln!(
                "imported version {version}: {objects} objects into the {} store",
                cfg.store.backend
            );
        }
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
    let client = |c: ClientArgs| -> anyhow::Result<Client> {
        let flags = client_config::Flags {
            server: c.server,
            token: c.token,
            ca_cert: c.ca_cert,
            client_config: c.client_config,
        };
        let env = client_config::Env::from_process();
        Ok(Client::new(client_config::resolve(
            &flags,
            &env,
            &cfg.data_dir,
        )?))
    };
    match args.command {
        None | Some(Command::Run) => {
            cfg.log.init(args.log_level.as_deref(), args.log_format);
            cloudcore::app::run(cfg).await
        }
        Some(Command::Apply {
            files,
            recursive,
            strict,
            client: c,
        }) => {
            let report = cli::apply(&client(c)?, &files, recursive, strict).await?;
            if report.skipped > 0 {
                eprintln!(
                    "cloudcore apply: {} of {} documents skipped (kinds cloudcore does not serve); \
                     exit status {SKIPPED_EXIT}; --strict refuses such manifests whole",
                    report.skipped, report.documents
                );
                SKIPPED.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        }
        Some(Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
            client: c,
        }) => {
            let (kind, name) = cli::kind_and_name(&kind, name.as_deref())?;
            let scope = if all_namespaces {
                cli::Scope::All
            } else {
                cli::Scope::Namespace(&namespace)
            };
            cli::get(&client(c)?, kind, name.as_deref(), scope, output).await
        }
        Some(Command::Delete {
            kind,
            name,
            namespace,
            client: c,
        }) => {
            let (kind, name) = cli::kind_and_name(&kind, name.as_deref())?;
            let name = name.ok_or_else(|| anyhow::anyhow!("delete needs a NAME (or KIND/NAME)"))?;
            cli::delete(&client(c)?, kind, &name, &namespace).await
        }
        Some(Command::Token {
            action: TokenAction::Create { node, client: c },
        }) => cli::token_create(&client(c)?, &node).await,
        Some(Command::Token {
            action: TokenAction::Revoke { node, client: c },
        }) => cli::token_revoke(&client(c)?, &node).await,
        Some(Command::Store(command)) => store_command(&cfg, command).await,
        Some(Command::Config(_)) => Ok(()), // answered above
    }
}

/// `apply` applied what cloudcore serves and skipped documents of other kinds.
static SKIPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const SKIPPED_EXIT: u8 = 3;

fn main() -> ExitCode {
    let code = edgehub::process::run_main("cloudcore", main_inner(Args::parse()));
    if code == ExitCode::SUCCESS && SKIPPED.load(std::sync::atomic::Ordering::Relaxed) {
        return ExitCode::from(SKIPPED_EXIT);
    }
    code
}
