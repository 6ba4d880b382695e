//! A strict parser of the Prometheus text exposition format (version 0.0.4), for tests that
//! scrape `/metrics`: what Prometheus would reject, or silently mis-read, is an error here.
//!
//! Checked, after the format's specification
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/#text-format-details>):
//! metric and label names; label value and HELP escapes; float values (`NaN`, `+Inf`, `-Inf`);
//! optional integer timestamps; at most one HELP and one TYPE per metric, both before its
//! first sample; a family's samples in one group; no duplicate series; histograms with an
//! `le` on every bucket, cumulative buckets, a `+Inf` bucket equal to `_count`, and a `_sum`;
//! summaries with a `quantile` on every sample.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Type {
    fn parse(s: &str) -> Option<Type> {
        Some(match s {
            "counter" => Type::Counter,
            "gauge" => Type::Gauge,
            "histogram" => Type::Histogram,
            "summary" => Type::Summary,
            "untyped" => Type::Untyped,
            _ => return None,
        })
    }
}

/// One line of samples: the full name (`x_bucket` for a histogram bucket), labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

/// A metric family: the name its HELP and TYPE lines give, and its samples.
#[derive(Clone, Debug)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    pub kind: Type,
    /// Whether a TYPE line said so (an untyped family may have none).
    pub typed: bool,
    pub samples: Vec<Sample>,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
}

/// What is wrong, and on which line (1-based; 0 for a whole-family check).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

pub fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

/// A sample value: Go float syntax as Prometheus writes it, plus `NaN`, `+Inf`, `-Inf`.
pub fn parse_value(s: &str) -> Option<f64> {
    match s {
        "NaN" => return Some(f64::NAN),
        "+Inf" => return Some(f64::INFINITY),
        "-Inf" => return Some(f64::NEG_INFINITY),
        _ => {}
    }
    // Rust also takes `inf`, `infinity` and `nan` in any case; the format does not.
    let body = s.trim_start_matches(['+', '-']);
    let numeric = !body.is_empty()
        && body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !numeric || s.len() - body.len() > 1 {
        return None;
    }
    s.parse().ok()
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        Parser::default().run(text)
    }

    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The samples called `name` whose labels include every `(key, value)` of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.families
            .iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| s.name == name)
            .filter(move |s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
    }

    /// The sum of [`Exposition::samples`] (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|s| s.value).sum()
    }
}

#[derive(Default)]
struct Parser {
    families: Vec<Family>,
    /// Family index by name.
    index: HashMap<String, usize>,
    /// Families that have samples; a later TYPE or HELP for them is an error.
    sampled: HashSet<usize>,
    /// The family of the last sample line: samples of one family must be consecutive.
    current: Option<usize>,
    series: HashSet<(String, BTreeMap<String, String>)>,
}

impl Parser {
    fn run(mut self, text: &str) -> Result<Exposition, ParseError> {
        if !text.is_empty() && !text.ends_with('\n') {
            return err(text.lines().count(), "the last line has no line feed");
        }
        for (i, line) in text.split_terminator('\n').enumerate() {
            let n = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                self.comment(n, comment)?;
            } else {
                self.sample(n, line)?;
            }
        }
        for f in &self.families {
            check_family(f).map_err(|message| ParseError { line: 0, message })?;
        }
        Ok(Exposition {
            families: self.families,
        })
    }

    fn family_mut(&mut self, n: usize, name: &str) -> Result<usize, ParseError> {
        if let Some(&i) = self.index.get(name) {
            if self.sampled.contains(&i) {
                return err(n, format!("HELP or TYPE for {name} after its samples"));
            }
            return Ok(i);
        }
        self.families.push(Family {
            name: name.to_string(),
            help: None,
            kind: Type::Untyped,
            typed: false,
            samples: Vec::new(),
        });
        let i = self.families.len() - 1;
        self.index.insert(name.to_string(), i);
        Ok(i)
    }

    fn comment(&mut self, n: usize, comment: &str) -> Result<(), ParseError> {
        let mut parts = comment
            .trim_start_matches([' ', '\t'])
            .splitn(2, [' ', '\t']);
        let keyword = parts.next().unwrap_or("");
        if keyword != "HELP" && keyword != "TYPE" || !comment.starts_with([' ', '\t']) {
            return Ok(()); // an ordinary comment
        }
        let rest = parts.next().unwrap_or("").trim_start_matches([' ', '\t']);
        let (name, arg) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        if !is_metric_name(name) {
            return err(n, format!("{keyword}: invalid metric name {name:?}"));
        }
        let i = self.family_mut(n, name)?;
        let f = &mut self.families[i];
        if keyword == "HELP" {
            if f.help.is_some() {
                return err(n, format!("a second HELP for {name}"));
            }
            f.help = Some(unescape(arg, false).ok_or_else(|| ParseError {
                line: n,
                message: format!("HELP for {name}: bad escape in {arg:?}"),
            })?);
        } else {
            if f.typed {
                return err(n, format!("a second TYPE for {name}"));
            }
            f.kind = Type::parse(arg.trim()).ok_or_else(|| ParseError {
                line: n,
                message: format!("TYPE for {name}: unknown type {arg:?}"),
            })?;
            f.typed = true;
        }
        Ok(())
    }

    /// Which family a sample name belongs to: its own, or a histogram's or summary's whose
    /// name it extends with `_bucket`, `_sum` or `_count`.
    fn family_of(&self, name: &str) -> Option<usize> {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if let Some(&i) = self.index.get(base) {
                    let kind = self.families[i].kind;
                    if kind == Type::Histogram || kind == Type::Summary && suffix != "_bucket" {
                        return Some(i);
                    }
                }
            }
        }
        self.index.get(name).copied()
    }

    fn sample(&mut self, n: usize, line: &str) -> Result<(), ParseError> {
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return err(n, format!("invalid metric name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = parse_labels(n, after, &mut labels)?;
        }
        let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
        let value = fields.next().ok_or_else(|| ParseError {
            line: n,
            message: format!("{name}: no value"),
        })?;
        let value = parse_value(value).ok_or_else(|| ParseError {
            line: n,
            message: format!("{name}: invalid value {value:?}"),
        })?;
        let timestamp_ms = match fields.next() {
            None => None,
            Some(t) => Some(t.parse::<i64>().map_err(|_| ParseError {
                line: n,
                message: format!("{name}: invalid timestamp {t:?}"),
            })?),
        };
        if let Some(extra) = fields.next() {
            return err(n, format!("{name}: unexpected {extra:?} after the value"));
        }
        let i = match self.family_of(name) {
            Some(i) => i,
            None => self.family_mut(n, name)?,
        };
        if self.sampled.contains(&i) && self.current != Some(i) {
            return err(
                n,
                format!("samples of {} are not in one group", self.families[i].name),
            );
        }
        if !self.series.insert((name.to_string(), labels.clone())) {
            return err(n, format!("duplicate series {name}{labels:?}"));
        }
        self.sampled.insert(i);
        self.current = Some(i);
        self.families[i].samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
            timestamp_ms,
        });
        Ok(())
    }
}

/// Parses `name="value",...}` (after the `{`); returns what follows the `}`.
fn parse_labels<'a>(
    n: usize,
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, ParseError> {
    loop {
        s = s.trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix('}') {
            return Ok(after);
        }
        let eq = s.find('=').ok_or_else(|| ParseError {
            line: n,
            message: "a label without =".into(),
        })?;
        let key = s[..eq].trim_end();
        if !is_label_name(key) {
            return err(n, format!("invalid label name {key:?}"));
        }
        s = s[eq + 1..].trim_start_matches([' ', '\t']);
        let Some(body) = s.strip_prefix('"') else {
            return err(n, format!("label {key}: the value is not quoted"));
        };
        // The closing quote is the first one not escaped.
        let mut end = None;
        let mut escaped = false;
        for (j, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(j);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            return err(n, format!("label {key}: unterminated value"));
        };
        let value = unescape(&body[..end], true).ok_or_else(|| ParseError {
            line: n,
            message: format!("label {key}: bad escape in {:?}", &body[..end]),
        })?;
        if labels.insert(key.to_string(), value).is_some() {
            return err(n, format!("label {key} given twice"));
        }
        s = body[end + 1..].trim_start_matches([' ', '\t']);
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return err(n, format!("after label {key}: expected , or }}"));
        }
    }
}

/// Undoes `\\`, `\n` and (in label values) `\"`; any other escape is an error.
fn unescape(s: &str, quote: bool) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            '"' if quote => out.push('"'),
            _ => return None,
        }
    }
    Some(out)
}

fn check_family(f: &Family) -> Result<(), String> {
    match f.kind {
        Type::Histogram => check_histogram(f),
        Type::Summary => {
            for s in &f.samples {
                if s.name == f.name && !s.labels.contains_key("quantile") {
                    return Err(format!("summary {}: a sample without quantile", f.name));
                }
            }
            Ok(())
        }
        _ => {
            if let Some(s) = f.samples.iter().find(|s| s.name != f.name) {
                return Err(format!("{}: sample {} in its group", f.name, s.name));
            }
            if f.kind == Type::Counter && f.samples.iter().any(|s| s.value < 0.0) {
                return Err(format!("counter {} is negative", f.name));
            }
            Ok(())
        }
    }
}

/// One histogram series: its `(le, count)` buckets in order, its `_count`, and whether it has
/// a `_sum`.
type HistogramSeries = (Vec<(f64, f64)>, Option<f64>, bool);

fn check_histogram(f: &Family) -> Result<(), String> {
    let bucket = format!("{}_bucket", f.name);
    let sum = format!("{}_sum", f.name);
    let count = format!("{}_count", f.name);
    // Series by their labels without `le`.
    let mut series: BTreeMap<BTreeMap<String, String>, HistogramSeries> = BTreeMap::new();
    for s in &f.samples {
        let mut labels = s.labels.clone();
        if s.name == bucket {
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{bucket} without le"))?;
            let le = parse_value(&le).ok_or_else(|| format!("{bucket}: invalid le {le:?}"))?;
            series.entry(labels).or_default().0.push((le, s.value));
        } else if s.name == count {
            series.entry(labels).or_default().1 = Some(s.value);
        } else if s.name == sum {
            series.entry(labels).or_default().2 = true;
        } else {
            return Err(format!("histogram {}: stray sample {}", f.name, s.name));
        }
    }
    for (labels, (buckets, count_value, has_sum)) in series {
        let mut last = (f64::NEG_INFINITY, 0.0);
        for &(le, v) in &buckets {
            if le <= last.0 {
                return Err(format!("{bucket}{labels:?}: le not increasing"));
            }
            if v < last.1 {
                return Err(format!("{bucket}{labels:?}: buckets are not cumulative"));
            }
            last = (le, v);
        }
        if last.0 != f64::INFINITY {
            return Err(format!("{bucket}{labels:?}: no +Inf bucket"));
        }
        if count_value != Some(last.1) {
            return Err(format!(
                "{count}{labels:?} is {count_value:?}, the +Inf bucket {}",
                last.1
            ));
        }
        if !has_sum {
            return Err(format!("{sum}{labels:?} missing"));
        }
    }
    Ok(())
}

/// Problems with the naming rules of a process's metrics: every family named `prefix_…`,
/// described (HELP) and typed, counters ending in `_total`, no milliseconds.
pub fn naming_problems(exp: &Exposition, prefix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &exp.families {
        let name = &f.name;
        if !name.starts_with(&format!("{prefix}_")) {
            problems.push(format!("{name}: not prefixed {prefix}_"));
        }
        if f.help.as_deref().is_none_or(|h| h.trim().is_empty()) {
            problems.push(format!("{name}: no HELP"));
        }
        if !f.typed {
            problems.push(format!("{name}: no TYPE"));
        }
        if (f.kind == Type::Counter) != name.ends_with("_total") {
            problems.push(format!(
                "{name}: counters, and only counters, end in _total"
            ));
        }
        if name.contains("_ms_") || name.ends_with("_ms") || name.contains("millis") {
            problems.push(format!("{name}: not in base units"));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"# HELP app_requests_total Requests, by "code".
# TYPE app_requests_total counter
app_requests_total{code="200",path="/a\"b\\c\nd"} 3
app_requests_total{code="500",} 1 1700000000000
# TYPE app_temp gauge
app_temp NaN
# HELP app_latency_seconds Latency.\nSecond line \\ done
# TYPE app_latency_seconds histogram
app_latency_seconds_bucket{le="0.1"} 1
app_latency_seconds_bucket{le="1"} 2
app_latency_seconds_bucket{le="+Inf"} 3
app_latency_seconds_sum 4.5e0
app_latency_seconds_count 3
# TYPE app_q summary
app_q{quantile="0.5"} -Inf
app_q_sum 1
app_q_count 1
# just a comment
other_thing 1
"#;

    #[test]
    fn a_good_exposition_parses() {
        let e = Exposition::parse(GOOD).expect("parses");
        assert_eq!(e.families.len(), 5);
        let r = e.family("app_requests_total").expect("family");
        assert_eq!(r.kind, Type::Counter);
        assert_eq!(r.help.as_deref(), Some(r#"Requests, by "code"."#));
        assert_eq!(r.samples[0].labels["path"], "/a\"b\\c\nd");
        assert_eq!(r.samples[1].timestamp_ms, Some(1_700_000_000_000));
        assert!(e.sum("app_temp", &[]).is_nan());
        assert_eq!(e.sum("app_requests_total", &[]), 4.0);
        assert_eq!(e.sum("app_requests_total", &[("code", "500")]), 1.0);
        let h = e.family("app_latency_seconds").expect("histogram");
        assert_eq!(h.help.as_deref(), Some("Latency.\nSecond line \\ done"));
        assert_eq!(h.samples.len(), 5);
        assert_eq!(e.family("other_thing").map(|f| f.kind), Some(Type::Untyped));
        let problems = naming_problems(&e, "app");
        assert!(problems
            .iter()
            .any(|p| p.starts_with("other_thing: not prefixed")));
        assert!(problems.iter().any(|p| p.starts_with("app_temp: no HELP")));
        assert!(problems.iter().any(|p| p.starts_with("app_q: no HELP")));
    }

    fn rejects(text: &str, why: &str) {
        match Exposition::parse(text) {
            Ok(e) => panic!("accepted ({why}): {e:?}"),
            Err(e) => assert!(e.message.contains(why), "{why}: got {e}"),
        }
    }

    #[test]
    fn violations_are_rejected() {
        rejects("1abc 1\n", "invalid metric name");
        rejects("a{1x=\"v\"} 1\n", "invalid label name");
        rejects("a{__x=\"v\"} 1\n", "invalid label name");
        rejects("a{x=v} 1\n", "not quoted");
        rejects("a{x=\"v} 1\n", "unterminated");
        rejects("a{x=\"\\t\"} 1\n", "bad escape");
        rejects("a{x=\"1\",x=\"2\"} 1\n", "given twice");
        rejects("a 1\na 2\n", "duplicate series");
        rejects("a inf\n", "invalid value");
        rejects("a 0x10\n", "invalid value");
        rejects("a 1 2.5\n", "invalid timestamp");
        rejects("a 1 2 3\n", "unexpected");
        rejects("a\n", "no value");
        rejects("a 1", "line feed");
        rejects("a 1\n# TYPE a counter\n", "after its samples");
        rejects("# TYPE a counter\n# TYPE a counter\na 1\n", "a second TYPE");
        rejects("# HELP a x\n# HELP a y\na 1\n", "a second HELP");
        rejects("# TYPE a countr\na 1\n", "unknown type");
        rejects("a 1\nb 1\na{x=\"y\"} 1\n", "not in one group");
        rejects("# TYPE a counter\na -1\n", "negative");
        let h = "# TYPE h histogram\n";
        rejects(
            &format!("{h}h_bucket 1\nh_count 1\nh_sum 1\n"),
            "without le",
        );
        rejects(
            &format!("{h}h_bucket{{le=\"1\"}} 1\nh_count 1\nh_sum 1\n"),
            "no +Inf",
        );
        rejects(
            &format!("{h}h_bucket{{le=\"1\"}} 2\nh_bucket{{le=\"+Inf\"}} 1\nh_count 1\nh_sum 1\n"),
            "not cumulative",
        );
        rejects(
            &format!("{h}h_bucket{{le=\"+Inf\"}} 2\nh_count 1\nh_sum 1\n"),
            "the +Inf bucket",
        );
        rejects(
            &format!("{h}h_bucket{{le=\"+Inf\"}} 1\nh_count 1\n"),
            "missing",
        );
        rejects("# TYPE s summary\ns 1\n", "without quantile");
    }
}
