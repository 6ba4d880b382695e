//! The configuration reference of both binaries: the key tables of `docs/operations.md`,
//! checked against the defaults the code really has, and turned into a commented default
//! configuration file (`edgemesh config defaults`, `cloudcore config defaults`).
//!
//! The tables are the one place a key's meaning is written down: the binaries embed the
//! document and print its meanings as comments, and each crate's tests fail when a key of the
//! code is missing from its table, has another default there, or when the table names a key
//! the code does not have.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One row of a reference table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDoc {
    /// Dotted key, e.g. `proxy.http.request_timeout`.
    pub key: String,
    /// The default as written in the table: a TOML value between backticks (strings without
    /// their quotes), or prose without backticks for a key that has no default value.
    pub default: String,
    pub meaning: String,
}

impl KeyDoc {
    /// The literal default, when the table gives one (`` `10s` `` → `10s`).
    pub fn literal(&self) -> Option<&str> {
        self.default
            .strip_prefix('`')
            .and_then(|d| d.strip_suffix('`'))
    }
}

fn start_marker(name: &str) -> String {
    format!("<!-- config-reference: {name} -->")
}
const END_MARKER: &str = "<!-- /config-reference -->";

/// The rows of the table between `<!-- config-reference: NAME -->` and
/// `<!-- /config-reference -->` (header and separator rows left out).
pub fn reference(markdown: &str, name: &str) -> Vec<KeyDoc> {
    let start = start_marker(name);
    markdown
        .lines()
        .skip_while(|l| l.trim() != start)
        .skip(1)
        .take_while(|l| l.trim() != END_MARKER)
        .filter_map(parse_row)
        .collect()
}

/// `| `key` | default | meaning |` → a row; header, separator and other lines → None.
fn parse_row(line: &str) -> Option<KeyDoc> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
    let [key, default, meaning] = cells.as_slice() else {
        return None;
    };
    let key = key.strip_prefix('`')?.strip_suffix('`')?;
    Some(KeyDoc {
        key: key.to_string(),
        default: default.to_string(),
        meaning: meaning.to_string(),
    })
}

/// `cfg` as a TOML table (keys whose value is unset are left out).
pub fn to_table<T: Serialize>(cfg: &T) -> Result<toml::Table, toml::ser::Error> {
    toml::Table::try_from(cfg)
}

/// How a default is written in the tables: strings without quotes, other values as TOML.
fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if s.is_empty() => "\"\"".to_string(),
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every leaf key of `table`, dotted, with its value; an empty table (a map such as `labels`)
/// is a leaf.
pub fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    flatten_into("", table, &mut out);
    out
}

fn flatten_into(prefix: &str, table: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if !t.is_empty() => flatten_into(&key, t, out),
            other => out.push((key, other.clone())),
        }
    }
}

/// Where the code and its reference table disagree, one sentence each; empty when they agree.
/// `T` is the config type: a key the table gives without a default must still be one `T`
/// accepts.
pub fn check<T: DeserializeOwned + Serialize + Default>(rows: &[KeyDoc]) -> Vec<String> {
    let mut problems = Vec::new();
    let defaults = match to_table(&T::default()) {
        Ok(t) => flatten(&t),
        Err(e) => return vec![format!("the defaults do not serialize: {e}")],
    };
    for (key, value) in &defaults {
        match rows.iter().find(|r| &r.key == key) {
            None => problems.push(format!("`{key}` (default {value}) has no row in the table")),
            Some(row) => match row.literal() {
                Some(lit) if lit == shown(value) => {}
                _ => problems.push(format!(
                    "`{key}`: the table says {} but the default is `{}`",
                    row.default,
                    shown(value)
                )),
            },
        }
    }
    // Keys without a default are not in `defaults`; the deserializer names them all.
    let mut sections = vec![String::new()];
    if let Ok(t) = to_table(&T::default()) {
        tables_in("", &t, &mut sections);
    }
    for section in &sections {
        for field in fields_of::<T>(section) {
            let key = if section.is_empty() {
                field
            } else {
                format!("{section}.{field}")
            };
            if !sections.contains(&key)
                && !defaults.iter().any(|(k, _)| k == &key)
                && !rows.iter().any(|r| r.key == key)
            {
                problems.push(format!("`{key}` (no default) has no row in the table"));
            }
        }
    }
    for (i, row) in rows.iter().enumerate() {
        if rows[..i].iter().any(|r| r.key == row.key) {
            problems.push(format!("`{}` has two rows", row.key));
        }
        if row.meaning.len() < 10 {
            problems.push(format!("`{}` has no meaning in the table", row.key));
        }
        if defaults.iter().any(|(k, _)| k == &row.key) {
            continue;
        }
        if row.literal().is_some() {
            problems.push(format!(
                "`{}`: the table gives the default {} but the code has no value for it",
                row.key, row.default
            ));
        }
        if !accepts_key::<T>(&row.key) {
            problems.push(format!(
                "`{}` is in the table but not a key of the code",
                row.key
            ));
        }
    }
    problems
}

/// The dotted names of the non-empty tables in `table` (the config's sections).
fn tables_in(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        if let toml::Value::Table(t) = v {
            if !t.is_empty() {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                tables_in(&key, t, out);
                out.push(key);
            }
        }
    }
}

/// The field names of the section `section` of `T`, from the "unknown field ..., expected one
/// of ..." error a made-up key gets (structs deny unknown fields).
fn fields_of<T: DeserializeOwned>(section: &str) -> Vec<String> {
    const PROBE: &str = "no_such_key_probe";
    let key = if section.is_empty() {
        PROBE.to_string()
    } else {
        format!("{section}.{PROBE}")
    };
    let mut table = toml::Table::new();
    if crate::config_file::apply_override(&mut table, &format!("{key}=0")).is_err() {
        return Vec::new();
    }
    let Err(e) = crate::config_file::from_table::<T>(table) else {
        return Vec::new();
    };
    let text = e.to_string();
    let Some((_, expected)) = text.split_once("expected") else {
        return Vec::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Whether `T` knows `key`: set it to a value of a type no key has (a datetime), and see
/// whether the error is a type error or an unknown field.
fn accepts_key<T: DeserializeOwned>(key: &str) -> bool {
    let mut table = toml::Table::new();
    if crate::config_file::apply_override(&mut table, &format!("{key}=1979-05-27T07:32:00Z"))
        .is_err()
    {
        return false;
    }
    match crate::config_file::from_table::<T>(table) {
        Ok(_) => true,
        Err(e) => !e.to_string().contains("unknown field"),
    }
}

/// A TOML file with every key of `rows` at its default, each preceded by its meaning; keys
/// without a default are commented out. `header` lines come first, as comments.
pub fn render<T: Serialize + Default>(header: &str, rows: &[KeyDoc]) -> Result<String, String> {
    let defaults = to_table(&T::default()).map_err(|e| e.to_string())?;
    let defaults = flatten(&defaults);
    let mut sections: Vec<&str> = Vec::new();
    for row in rows {
        let section = section_of(&row.key);
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    // Top-level keys must come before the first table header.
    sections.sort_by_key(|s| !s.is_empty());
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&comment(line));
    }
    for section in sections {
        out.push('\n');
        if !section.is_empty() {
            out.push_str(&format!("[{section}]\n"));
        }
        for (i, row) in rows
            .iter()
            .filter(|r| section_of(&r.key) == section)
            .enumerate()
        {
            let name = &row.key[section.len() + usize::from(!section.is_empty())..];
            if i > 0 {
                out.push('\n');
            }
            for line in wrap(&row.meaning, 96) {
                out.push_str(&comment(&line));
            }
            match defaults.iter().find(|(k, _)| k == &row.key) {
                Some((_, value)) => out.push_str(&format!("{name} = {value}\n")),
                None => out.push_str(&format!("# {name} = ... ({})\n", row.default)),
            }
        }
    }
    Ok(out)
}

fn section_of(key: &str) -> &str {
    key.rsplit_once('.').map(|(s, _)| s).unwrap_or("")
}

fn comment(line: &str) -> String {
    if line.is_empty() {
        "#\n".to_string()
    } else {
        format!("# {line}\n")
    }
}

/// Splits `text` into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// `cfg` as TOML with the values of `secrets` (dotted keys) replaced, for `config show`.
pub fn to_toml_redacted<T: Serialize>(cfg: &T, secrets: &[&str]) -> Result<String, String> {
    let mut table = to_table(cfg).map_err(|e| e.to_string())?;
    for key in secrets {
        let mut parts: Vec<&str> = key.split('.').collect();
        let Some(last) = parts.pop() else { continue };
        let mut cur = Some(&mut table);
        for p in parts {
            cur = cur
                .and_then(|t| t.get_mut(p))
                .and_then(|v| v.as_table_mut());
        }
        if let Some(v) = cur.and_then(|t| t.get_mut(last)) {
            *v = toml::Value::String("<redacted>".into());
        }
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        port: u16,
        secret: Option<String>,
    }
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        name: String,
        dir: Option<String>,
        #[serde(with = "humantime_serde_shim")]
        wait: Duration,
        inner: Inner,
    }
    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                name: "a".into(),
                dir: None,
                wait: Duration::from_secs(5),
                inner: Inner {
                    port: 7,
                    secret: None,
                },
            }
        }
    }
    // edgehub does not depend on humantime-serde; seconds are enough here.
    mod humantime_serde_shim {
        use serde::{Deserialize, Deserializer, Serializer};
        use std::time::Duration;
        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format!("{}s", d.as_secs()))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            let s = String::deserialize(d)?;
            s.trim_end_matches('s')
                .parse()
                .map(Duration::from_secs)
                .map_err(serde::de::Error::custom)
        }
    }

    const DOC: &str = "# Config\n\n<!-- config-reference: test -->\n| key | default | meaning |\n|---|---|---|\n| `name` | `a` | the name of the thing |\n| `dir` | unset | where it keeps its files |\n| `wait` | `5s` | how long it waits for it |\n| `inner.port` | `7` | the port it listens on |\n| `inner.secret` | unset | a secret, not shown |\n<!-- /config-reference -->\n| `x` | `1` | outside the markers |\n";

    #[test]
    fn a_table_that_matches_the_code_renders_a_loadable_file() {
        let rows = reference(DOC, "test");
        assert_eq!(rows.len(), 5);
        assert_eq!(rows[1].literal(), None);
        assert_eq!(check::<Cfg>(&rows), Vec::<String>::new());
        let text = render::<Cfg>("defaults", &rows).expect("render");
        assert!(
            text.contains("# the port it listens on\nport = 7\n"),
            "{text}"
        );
        assert!(text.contains("# dir = ... (unset)\n"), "{text}");
        let loaded: Cfg =
            crate::config_file::from_table(text.parse().expect("toml")).expect("load");
        assert_eq!(loaded.wait, Duration::from_secs(5));
    }

    #[test]
    fn drift_either_way_is_reported() {
        let doc = DOC
            .replace("`5s`", "`10s`")
            .replace("| `inner.port` | `7` | the port it listens on |\n", "")
            .replace("| `dir` | unset |", "| `dri` | unset |")
            .replace("| `inner.secret` | unset | a secret, not shown |\n", "");
        let problems = check::<Cfg>(&reference(&doc, "test"));
        assert_eq!(problems.len(), 5, "{problems:?}");
        for key in ["`wait`", "`inner.port`", "`dri`", "`dir`", "`inner.secret`"] {
            assert!(
                problems.iter().any(|p| p.contains(key)),
                "{key}: {problems:?}"
            );
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Cfg::default();
        c.inner.secret = Some("hunter2".into());
        let text = to_toml_redacted(&c, &["inner.secret", "no.such"]).expect("toml");
        assert!(
            !text.contains("hunter2") && text.contains("<redacted>"),
            "{text}"
        );
    }
}
