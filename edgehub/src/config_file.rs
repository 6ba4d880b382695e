//! Loading TOML configuration with command-line overrides, the same way for both binaries.
//!
//! The file is read into a TOML table, `key.path=value` overrides from flags are laid over it,
//! and only then is it turned into the typed config. Every error (unknown key, wrong type,
//! invalid value) names the dotted key, so an operator knows what to fix.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path}: invalid TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("config key `{key}`: {reason}")]
    Key { key: String, reason: String },
    #[error("override {0:?}: expected KEY=VALUE")]
    Override(String),
    /// An error about a key, with where its value came from (the file, or `--set`).
    #[error("{origin}: {error}")]
    At {
        origin: String,
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    pub fn key(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Loads `T` from `path` (when given; `default_path` when it exists; else all defaults) and
/// applies `overrides` of the form `a.b=value` (value parsed as TOML, or taken as a string).
pub fn load<T: DeserializeOwned>(
    path: Option<&Path>,
    default_path: &Path,
    overrides: &[String],
) -> Result<T, ConfigError> {
    let file = match path {
        Some(p) => Some(p.to_path_buf()),
        None if default_path.exists() => Some(default_path.to_path_buf()),
        None => None,
    };
    let mut table = match &file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.clone(),
                reason: e.to_string(),
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Syntax {
                    path: p.clone(),
                    reason: e.to_string().trim().to_string(),
                })?
        }
        None => toml::Table::new(),
    };
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    from_table(table)
}

/// [`load`], then `check` on the result; an error about a key says where its value came
/// from: `--set KEY=...` when an override set it, else the file, else the defaults.
pub fn load_checked<T: DeserializeOwned>(
    path: Option<&Path>,
    default_path: &Path,
    overrides: &[String],
    check: impl FnOnce(&T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError> {
    let file = match path {
        Some(p) => Some(p.to_path_buf()),
        None if default_path.exists() => Some(default_path.to_path_buf()),
        None => None,
    };
    let origin_of = |key: &str| -> String {
        let set = overrides.iter().rev().find(|o| {
            o.split_once('=').is_some_and(|(k, _)| {
                let k = k.trim();
                key == k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}["))
            })
        });
        match (set, &file) {
            (Some(o), _) => format!(
                "--set {}",
                crate::untrusted::clip(o, crate::untrusted::MAX_WORD)
            ),
            (None, Some(f)) => format!("config file {}", f.display()),
            (None, None) => "defaults (no config file)".to_string(),
        }
    };
    let placed = |e: ConfigError| match e {
        ConfigError::Key { ref key, .. } => ConfigError::At {
            origin: origin_of(key),
            error: Box::new(e),
        },
        other => other,
    };
    let config: T = load(path, default_path, overrides).map_err(placed)?;
    check(&config).map_err(placed)?;
    Ok(config)
}

/// Turns a table into `T`, naming the key of the first error.
pub fn from_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, ConfigError> {
    let value = toml::Value::Table(table);
    serde_path_to_error::deserialize(value).map_err(|err| {
        let reason = err.inner().to_string();
        let key = crate::model::error_path(err.path().to_string(), &reason);
        ConfigError::Key {
            key,
            // toml repeats the key on a second line ("in `a.b`"); the key is said already.
            reason: reason.lines().next().unwrap_or("").trim().to_string(),
        }
    })
}

/// Sets `a.b.c=value` in the table, creating intermediate tables.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(assignment.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::Override(assignment.to_string()));
    }
    let value = parse_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut cur = table;
    let mut path = String::new();
    for p in parts {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(p);
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::key(path.clone(), "is not a table"))?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

/// A TOML literal (number, bool, array, quoted string) when it parses as one, else the text.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// A string or a list of strings (`cloud.url = "ws://a"` or `["ws://a", "ws://b"]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        port: u16,
        on: bool,
    }
    impl Default for Inner {
        fn default() -> Self {
            Inner { port: 1, on: true }
        }
    }
    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        name: String,
        proxy: Inner,
    }

    fn load_str(text: &str, overrides: &[&str]) -> Result<Cfg, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(Some(&path), Path::new("/nonexistent"), &o)
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_str("[proxy]\nport = \"abc\"\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("config key `proxy.port`"), "{e}");
        let e = load_str("[proxy]\nprot = 1\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("config key `proxy.prot`"), "{e}");
        let e = load_str("nmae = \"x\"\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("config key `nmae`"), "{e}");
        let e = load_str("[proxy]\nport = 70000\n", &[]).unwrap_err();
        assert!(e.to_string().contains("proxy.port"), "{e}");
        let e = load_str("name = \n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn errors_say_whether_the_file_or_an_override_set_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "name = \"a\"\n[proxy]\nport = 5\n").expect("write");
        let refuse_port_5 = |c: &Cfg| {
            if c.proxy.port == 5 {
                Err(ConfigError::key("proxy.port", "5 is taken"))
            } else {
                Ok(())
            }
        };
        let e =
            load_checked(Some(&path), Path::new("/nonexistent"), &[], refuse_port_5).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "config file {}: config key `proxy.port`: 5 is taken",
                path.display()
            )
        );
        let o = vec!["proxy.port=5".to_string()];
        std::fs::write(&path, "name = \"a\"\n").expect("write");
        let e =
            load_checked(Some(&path), Path::new("/nonexistent"), &o, refuse_port_5).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--set proxy.port=5: config key `proxy.port`"),
            "{e}"
        );
        let o = vec!["proxy={port=\"x\"}".to_string()];
        let e = load_checked(None, Path::new("/nonexistent"), &o, refuse_port_5).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--set proxy={port=\"x\"}: config key `proxy.port`"),
            "{e}"
        );
        let e = load_checked::<Cfg>(None, Path::new("/nonexistent"), &[], |_| {
            Err(ConfigError::key("name", "is required"))
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("defaults (no config file): config key `name`"),
            "{e}"
        );
    }

    #[test]
    fn overrides_win_over_the_file() {
        let c = load_str(
            "name = \"a\"\n[proxy]\nport = 5\n",
            &["proxy.port=7", "name=b", "proxy.on=false"],
        )
        .expect("valid");
        assert_eq!(
            c,
            Cfg {
                name: "b".into(),
                proxy: Inner { port: 7, on: false }
            }
        );
        assert!(load_str("", &["noequals"]).is_err());
        assert!(load_str("", &["name.x=1"]).is_err());
    }
}
