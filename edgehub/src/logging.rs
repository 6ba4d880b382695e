//! Log setup shared by both binaries: `RUST_LOG`-style filters, text or JSON lines on stderr.
//!
//! Filters are lists of `target=level` directives (`info,edgemesh::proxy=debug`): what
//! operators set. `RUST_LOG`'s span and field directives (`[conn{peer=..}]=debug`) are not
//! taken: their matcher (a regex engine) was about 3% of each binary's code, which is resident
//! memory on every node.

use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    /// A `RUST_LOG`-style filter; `RUST_LOG` and `--log-level` win over it.
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
        let env = std::env::var("RUST_LOG").ok();
        let (filter, rejected) = choose_filter(level_flag, env.as_deref(), &self.level);
        let format = format_flag.unwrap_or(self.format);
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        // Already initialised (tests): keep the first subscriber.
        let _ = subscriber(filter, format, ansi, std::io::stderr).try_init();
        for r in rejected {
            tracing::warn!("{r}");
        }
    }
}

/// The filter to log with: the most explicit source that parses wins, `--log-level` over the
/// `RUST_LOG` environment variable over `log.level`, then `info`. Also returns what was
/// skipped and why, to be logged once logging is up.
pub fn choose_filter(
    flag: Option<&str>,
    env: Option<&str>,
    config: &str,
) -> (Targets, Vec<String>) {
    let mut rejected = Vec::new();
    let sources = [
        ("--log-level", flag),
        ("RUST_LOG", env.filter(|e| !e.trim().is_empty())),
        ("log.level", Some(config)),
    ];
    for (source, value) in sources {
        let Some(value) = value else { continue };
        match Targets::from_str(value) {
            Ok(filter) => return (filter, rejected),
            Err(e) => rejected.push(format!(
                "{source}: {value:?} is not a valid log filter ({e}); ignored"
            )),
        }
    }
    (Targets::new().with_default(tracing::Level::INFO), rejected)
}

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `edgemesh=debug,edgehub=info`; `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) {
    LogConfig {
        level: level.to_string(),
        format,
    }
    .init(None, None);
}

/// Log lines to `writer`: text (coloured only on a terminal) or JSON objects, one a line,
/// with `timestamp`, `level`, `target`, the event's fields (`message` among them) flattened,
/// the current `span` and the list of enclosing `spans` with their fields.
fn subscriber<W>(
    filter: Targets,
    format: LogFormat,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        // The filter decides; the builder's own maximum (INFO by default) would hide debug.
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_ansi(ansi)
        // A closed stderr (a pipe whose reader went away) must not take the agent down:
        // reporting the failed write is itself a write to stderr, which would panic.
        .log_internal_errors(false)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish().with(filter)),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish()
                .with(filter),
        ),
    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    fn capture(format: LogFormat, ansi: bool, filter: &str) -> String {
        let buf = Buffer::default();
        let sub = subscriber(
            Targets::from_str(filter).expect("filter"),
            format,
            ansi,
            buf.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("conn", peer = "10.0.0.1:4000", service = "default/web");
            let _g = span.enter();
            tracing::info!(endpoint = "10.1.0.2:80", "forwarded");
            tracing::debug!("hidden at info");
        });
        let out = buf.0.lock().expect("buffer").clone();
        String::from_utf8(out).expect("utf-8 logs")
    }

    #[test]
    fn json_lines_carry_timestamp_level_target_span_and_message() {
        let out = capture(LogFormat::Json, false, "info");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "one event at info: {out}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert!(
            v["timestamp"].as_str().is_some_and(|t| !t.is_empty()),
            "{v}"
        );
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "edgehub::logging::tests");
        assert_eq!(v["message"], "forwarded");
        assert_eq!(v["endpoint"], "10.1.0.2:80");
        assert_eq!(v["span"]["name"], "conn");
        assert_eq!(v["span"]["peer"], "10.0.0.1:4000");
        assert_eq!(v["spans"][0]["service"], "default/web");
    }

    #[test]
    fn text_has_no_colour_codes_off_a_terminal() {
        let out = capture(LogFormat::Text, false, "info");
        assert!(out.contains("forwarded"), "{out}");
        assert!(out.contains("conn{"), "the span is named: {out}");
        assert!(!out.contains('\u{1b}'), "no ANSI escapes: {out:?}");
    }

    #[test]
    fn directives_choose_levels_per_target() {
        let out = capture(LogFormat::Text, false, "info,edgehub::logging=debug");
        assert!(
            out.contains("hidden at info"),
            "debug for this target: {out}"
        );
        let out = capture(LogFormat::Text, false, "debug,edgehub::logging=warn");
        assert!(!out.contains("forwarded"), "warn for this target: {out}");
    }

    #[test]
    fn the_most_explicit_filter_wins() {
        let (f, rejected) = choose_filter(Some("debug"), Some("warn"), "error");
        assert_eq!(f.to_string(), "debug");
        assert!(rejected.is_empty());
        let (f, _) = choose_filter(None, Some("warn"), "error");
        assert_eq!(f.to_string(), "warn");
        let (f, _) = choose_filter(None, None, "edgemesh=debug");
        assert_eq!(f.to_string(), "edgemesh=debug");
        let (f, _) = choose_filter(None, Some(""), "error");
        assert_eq!(f.to_string(), "error", "an empty RUST_LOG is unset");
    }

    #[test]
    fn a_bad_filter_is_reported_by_its_source() {
        let (f, rejected) = choose_filter(None, Some("edgemesh=loud"), "info");
        assert_eq!(f.to_string(), "info");
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].starts_with("RUST_LOG: "), "{rejected:?}");
        let (f, rejected) = choose_filter(Some("=="), None, "nope=nope");
        assert_eq!(f.to_string(), "info");
        assert!(rejected[0].starts_with("--log-level"), "{rejected:?}");
        assert!(rejected[1].starts_with("log.level"), "{rejected:?}");
    }
}
