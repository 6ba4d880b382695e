//! Where the CLI finds cloudcore and its credentials, like kubectl: each of server, token and
//! CA certificate comes from its flag, else its environment variable, else the client config
//! file, else a default. Every value remembers where it came from, so an error can say which
//! setting to fix.

use std::fmt;
use std::path::{Path, PathBuf};

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:10002";
pub const ENV_SERVER: &str = "CLOUDCORE_SERVER";
pub const ENV_TOKEN: &str = "CLOUDCORE_TOKEN";
pub const ENV_CA_CERT: &str = "CLOUDCORE_CA_CERT";
pub const ENV_CLIENT_CONFIG: &str = "CLOUDCORE_CLIENT_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    #[error("client config {}: cannot read it: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("client config {}: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("client config {}: key {key}: {message}", .path.display())]
    Key {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    #[error("server {value:?} (from {from}): expected http://HOST:PORT or https://HOST:PORT")]
    BadServer { value: String, from: Source },
    #[error("the API token from {from} is empty")]
    EmptyToken { from: Source },
    #[error(
        "no API token: none given (--token, {ENV_TOKEN}, `token` or `token_file` in the client \
         config) and cannot read the default {}: {reason}",
        .path.display()
    )]
    NoToken { path: PathBuf, reason: String },
}

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    /// A key of the client config file.
    File {
        path: PathBuf,
        key: &'static str,
    },
    /// The built-in default (for the token: the file it was read from).
    Default(Option<PathBuf>),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::File { path, key } => write!(f, "key {key} in {}", path.display()),
            Source::Default(None) => f.write_str("the default"),
            Source::Default(Some(path)) => write!(f, "the default token file {}", path.display()),
        }
    }
}

/// The client-related flags as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub client_config: Option<PathBuf>,
}

/// The environment the settings may come from (a value to keep tests off the process's).
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub server: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<String>,
    pub client_config: Option<String>,
    pub xdg_config_home: Option<String>,
    pub home: Option<String>,
}

impl Env {
    pub fn from_process() -> Env {
        // An empty variable counts as unset, as with most shells' `VAR= cmd`.
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Env {
            server: var(ENV_SERVER),
            token: var(ENV_TOKEN),
            ca_cert: var(ENV_CA_CERT),
            client_config: var(ENV_CLIENT_CONFIG),
            xdg_config_home: var("XDG_CONFIG_HOME"),
            home: var("HOME"),
        }
    }
}

/// The client config file (TOML), every key a string.
#[derive(Debug, Default)]
struct FileConfig {
    server: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
    ca_cert: Option<String>,
}

/// The settings the client uses, each with where it came from.
#[derive(Clone, Debug)]
pub struct Settings {
    pub server: String,
    pub server_source: Source,
    pub token: String,
    pub token_source: Source,
    pub ca_cert: Option<PathBuf>,
    pub ca_cert_source: Option<Source>,
    /// The client config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// Where the client config file is looked for, read or not (for hints in errors).
    pub config_path: Option<PathBuf>,
}

/// The client config path: the flag, else `CLOUDCORE_CLIENT_CONFIG` (both must exist), else
/// `$XDG_CONFIG_HOME/cloudcore/client.toml` or `~/.config/cloudcore/client.toml` (optional).
fn config_path(flags: &Flags, env: &Env) -> (Option<PathBuf>, bool) {
    if let Some(p) = &flags.client_config {
        return (Some(p.clone()), true);
    }
    if let Some(p) = &env.client_config {
        return (Some(PathBuf::from(p)), true);
    }
    let base = match (&env.xdg_config_home, &env.home) {
        (Some(x), _) => Some(PathBuf::from(x)),
        (None, Some(h)) => Some(Path::new(h).join(".config")),
        (None, None) => None,
    };
    (base.map(|b| b.join("cloudcore").join("client.toml")), false)
}

fn read_file_config(path: &Path) -> Result<FileConfig, ClientConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        ClientConfigError::Parse {
            path: path.to_path_buf(),
            message: match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            },
        }
    })?;
    // Key by key rather than through serde, so that every error names its key.
    let mut file = FileConfig::default();
    for (key, value) in table {
        let slot = match key.as_str() {
            "server" => &mut file.server,
            "token" => &mut file.token,
            "token_file" => &mut file.token_file,
            "ca_cert" => &mut file.ca_cert,
            _ => {
                return Err(ClientConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!(
                        "unknown key {key}: expected server, token, token_file or ca_cert"
                    ),
                })
            }
        };
        match value {
            toml::Value::String(v) => *slot = Some(v),
            other => {
                return Err(ClientConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!("key {key}: expected a string, got {}", other.type_str()),
                })
            }
        }
    }
    Ok(file)
}

/// Resolves server, token and CA certificate. `data_dir` holds the default token file.
pub fn resolve(flags: &Flags, env: &Env, data_dir: &Path) -> Result<Settings, ClientConfigError> {
    let (config_path, required) = config_path(flags, env);
    let (file, config_file) = match &config_path {
        Some(p) if required || p.exists() => (read_file_config(p)?, Some(p.clone())),
        _ => (FileConfig::default(), None),
    };
    let file_path = config_file.clone().unwrap_or_default();
    let in_file = |key: &'static str| Source::File {
        path: file_path.clone(),
        key,
    };
    // Relative paths in the file are relative to the file, as kubectl does.
    let relative = |p: &Path| match file_path.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    };

    let (server, server_source) = if let Some(s) = &flags.server {
        (s.clone(), Source::Flag("--server"))
    } else if let Some(s) = &env.server {
        (s.clone(), Source::Env(ENV_SERVER))
    } else if let Some(s) = &file.server {
        (s.clone(), in_file("server"))
    } else {
        (DEFAULT_SERVER.to_string(), Source::Default(None))
    };
    if !(server.starts_with("http://") || server.starts_with("https://")) || server.len() < 9 {
        return Err(ClientConfigError::BadServer {
            value: server,
            from: server_source,
        });
    }

    if file.token.is_some() && file.token_file.is_some() {
        return Err(ClientConfigError::Key {
            path: file_path.clone(),
            key: "token_file",
            message: "set token or token_file, not both".into(),
        });
    }
    let (token, token_source) = if let Some(t) = &flags.token {
        (t.clone(), Source::Flag("--token"))
    } else if let Some(t) = &env.token {
        (t.clone(), Source::Env(ENV_TOKEN))
    } else if let Some(t) = &file.token {
        (t.clone(), in_file("token"))
    } else if let Some(tf) = &file.token_file {
        let tf = relative(Path::new(tf));
        let t = std::fs::read_to_string(&tf).map_err(|e| ClientConfigError::Key {
            path: file_path.clone(),
            key: "token_file",
            message: format!("cannot read {}: {e}", tf.display()),
        })?;
        (t, in_file("token_file"))
    } else {
        let path = data_dir.join(crate::auth::API_TOKEN_FILE);
        let t = std::fs::read_to_string(&path).map_err(|e| ClientConfigError::NoToken {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        (t, Source::Default(Some(path)))
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(ClientConfigError::EmptyToken { from: token_source });
    }

    let (ca_cert, ca_cert_source) = if let Some(c) = &flags.ca_cert {
        (Some(c.clone()), Some(Source::Flag("--ca-cert")))
    } else if let Some(c) = &env.ca_cert {
        (Some(PathBuf::from(c)), Some(Source::Env(ENV_CA_CERT)))
    } else if let Some(c) = &file.ca_cert {
        (Some(relative(Path::new(c))), Some(in_file("ca_cert")))
    } else {
        (None, None)
    };

    Ok(Settings {
        server: server.trim_end_matches('/').to_string(),
        server_source,
        token,
        token_source,
        ca_cert,
        ca_cert_source,
        config_file,
        config_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
            std::fs::write(dir.path().join("data/api-token"), "default-token\n").expect("token");
            Fixture { dir }
        }
        fn data(&self) -> PathBuf {
            self.dir.path().join("data")
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(&p, text).expect("write");
            p
        }
        /// An environment whose default config location is inside the fixture.
        fn env(&self) -> Env {
            Env {
                xdg_config_home: Some(self.dir.path().join("xdg").display().to_string()),
                ..Env::default()
            }
        }
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let fx = Fixture::new();
        let s = resolve(&Flags::default(), &fx.env(), &fx.data()).expect("settings");
        assert_eq!(s.server, DEFAULT_SERVER);
        assert_eq!(s.server_source, Source::Default(None));
        assert_eq!(s.token, "default-token");
        assert_eq!(
            s.token_source,
            Source::Default(Some(fx.data().join("api-token")))
        );
        assert_eq!(s.ca_cert, None);
        assert_eq!(s.config_file, None);
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let fx = Fixture::new();
        let file = fx.write(
            "xdg/cloudcore/client.toml",
            "server = \"http://file:1\"\ntoken = \"file-token\"\nca_cert = \"ca.pem\"\n",
        );
        let mut env = fx.env();
        let s = resolve(&Flags::default(), &env, &fx.data()).expect("file");
        assert_eq!(
            (s.server.as_str(), s.token.as_str()),
            ("http://file:1", "file-token")
        );
        assert_eq!(
            s.token_source,
            Source::File {
                path: file.clone(),
                key: "token"
            }
        );
        // Relative to the file's directory.
        assert_eq!(s.ca_cert, Some(fx.dir.path().join("xdg/cloudcore/ca.pem")));

        env.server = Some("http://env:2".into());
        env.token = Some("env-token".into());
        env.ca_cert = Some("/env/ca.pem".into());
        let s = resolve(&Flags::default(), &env, &fx.data()).expect("env");
        assert_eq!(
            (s.server.as_str(), s.token.as_str()),
            ("http://env:2", "env-token")
        );
        assert_eq!(s.token_source, Source::Env(ENV_TOKEN));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/env/ca.pem")));

        let flags = Flags {
            server: Some("https://flag:3/".into()),
            token: Some("flag-token".into()),
            ca_cert: Some("/flag/ca.pem".into()),
            client_config: None,
        };
        let s = resolve(&flags, &env, &fx.data()).expect("flags");
        assert_eq!(
            (s.server.as_str(), s.token.as_str()),
            ("https://flag:3", "flag-token")
        );
        assert_eq!(s.server_source, Source::Flag("--server"));
        assert_eq!(s.ca_cert_source, Some(Source::Flag("--ca-cert")));
    }

    #[test]
    fn each_setting_falls_back_on_its_own() {
        let fx = Fixture::new();
        fx.write("xdg/cloudcore/client.toml", "server = \"http://file:1\"\n");
        let env = Env {
            token: Some("env-token".into()),
            ..fx.env()
        };
        let s = resolve(&Flags::default(), &env, &fx.data()).expect("settings");
        assert_eq!(s.server, "http://file:1");
        assert_eq!(s.token, "env-token");
    }

    #[test]
    fn explicit_config_path_and_token_file() {
        let fx = Fixture::new();
        fx.write("xdg/cloudcore/client.toml", "token = \"ignored\"\n");
        fx.write("other/secret", "  from-token-file\n");
        let other = fx.write("other/client.toml", "token_file = \"secret\"\n");
        let env = Env {
            client_config: Some(other.display().to_string()),
            ..fx.env()
        };
        let s = resolve(&Flags::default(), &env, &fx.data()).expect("env path");
        assert_eq!(s.token, "from-token-file");
        assert_eq!(
            s.token_source,
            Source::File {
                path: other.clone(),
                key: "token_file"
            }
        );
        // The flag beats the variable; an explicit path must exist.
        let flags = Flags {
            client_config: Some(fx.dir.path().join("missing.toml")),
            ..Flags::default()
        };
        let err = resolve(&flags, &env, &fx.data()).expect_err("missing file");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let fx = Fixture::new();
        let cases = [
            ("servr = \"http://x:1\"\n", "servr"),
            ("token = \"a\"\ntoken_file = \"b\"\n", "token_file"),
            ("token_file = \"nope\"\n", "token_file"),
            ("server = 5\n", "key server: expected a string"),
            ("token = [\n", "line 1"),
        ];
        for (text, key) in cases {
            let path = fx.write("xdg/cloudcore/client.toml", text);
            let err = resolve(&Flags::default(), &fx.env(), &fx.data())
                .expect_err(text)
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(&path.display().to_string()), "{text}: {err}");
        }
        let path = fx.write("xdg/cloudcore/client.toml", "server = \"ftp://x\"\n");
        let err = resolve(&Flags::default(), &fx.env(), &fx.data())
            .expect_err("bad scheme")
            .to_string();
        assert!(
            err.contains("key server in") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn no_token_anywhere_says_where_it_looked() {
        let fx = Fixture::new();
        let err = resolve(&Flags::default(), &fx.env(), &fx.dir.path().join("none"))
            .expect_err("no token")
            .to_string();
        assert!(
            err.contains("--token") && err.contains("api-token"),
            "{err}"
        );
    }
}
