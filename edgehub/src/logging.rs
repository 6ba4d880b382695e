//! Log setup shared by both binaries: `RUST_LOG`-style filters, text or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format {s:?}: expected text or json")),
        }
    }
}

/// The `[log]` table of both config files.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `RUST_LOG`-style filter; the environment variable wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl LogConfig {
    /// Installs logging from the config, with command-line flags taking precedence.
    pub fn init(&self, level_flag: Option<&str>, format_flag: Option<LogFormat>) {
        init(
            level_flag.unwrap_or(&self.level),
            format_flag.unwrap_or(self.format),
        );
    }
}

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `edgemesh=debug,edgehub=info`; `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr (a pipe whose reader went away) must not take the agent down:
        // reporting the failed write is itself a write to stderr, which would panic.
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    // Already initialised (tests): keep the first subscriber.
    let _ = result;
}

/// For one-shot commands that print (`get`, `status`): die quietly on a closed stdout, like
/// any Unix tool piped into `head`, instead of panicking in `println!`. The daemons keep
/// Rust's default (SIGPIPE ignored), so a peer closing a socket is just an error.
pub fn quiet_on_closed_stdout() {
    // SAFETY: setting a signal's disposition to the default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
