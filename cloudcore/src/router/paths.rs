//! Request paths: which rule's prefix a path falls under, and the path the target is sent.

use std::collections::HashMap;

/// The `rest` → `service` rules by their `source_resource.path` (trimmed of a trailing `/`).
#[derive(Debug)]
pub struct PathIndex<T> {
    by_prefix: HashMap<String, T>,
}

impl<T> Default for PathIndex<T> {
    fn default() -> Self {
        PathIndex {
            by_prefix: HashMap::new(),
        }
    }
}

impl<T: Clone> PathIndex<T> {
    pub fn insert(&mut self, prefix: String, value: T) {
        self.by_prefix.insert(prefix, value);
    }

    pub fn remove(&mut self, prefix: &str) {
        self.by_prefix.remove(prefix);
    }

    /// The value stored for exactly `prefix`.
    pub fn get(&self, prefix: &str) -> Option<T> {
        self.by_prefix.get(prefix).cloned()
    }

    /// The value of the longest prefix that `path` starts with on a segment boundary (`/abc`
    /// matches `/abc`, `/abc/` and `/abc/x`, not `/abcd`), and the rest of the path after it.
    pub fn lookup<'p>(&self, path: &'p str) -> Option<(T, &'p str)> {
        // Try the path itself, then each shorter prefix ending before a '/': at most one
        // lookup per segment, whatever the number of rules.
        let mut end = path.len();
        loop {
            let candidate = if end == 0 { "/" } else { &path[..end] };
            if let Some(v) = self.by_prefix.get(candidate) {
                let rest = if candidate == "/" { path } else { &path[end..] };
                return Some((v.clone(), rest));
            }
            if end == 0 {
                return None;
            }
            end = path[..end].rfind('/').unwrap_or(0);
        }
    }
}

/// `base` followed by `rest` with exactly one `/` between them; `/` when both are empty.
pub fn join(base: &str, rest: &str) -> String {
    let base = base.strip_suffix('/').unwrap_or(base);
    let joined = match (base.is_empty(), rest.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => rest.to_string(),
        (false, false) if rest.starts_with('/') => format!("{base}{rest}"),
        (false, false) => format!("{base}/{rest}"),
    };
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

/// The target's request target: `path` plus the caller's query, if any.
pub fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let mut idx = PathIndex::default();
        idx.insert("/abc".to_string(), 1);
        idx.insert("/abc/def".to_string(), 2);
        assert_eq!(idx.lookup("/abc"), Some((1, "")));
        assert_eq!(idx.lookup("/abc/"), Some((1, "/")));
        assert_eq!(idx.lookup("/abc/x/y"), Some((1, "/x/y")));
        assert_eq!(idx.lookup("/abc/def"), Some((2, "")));
        assert_eq!(idx.lookup("/abc/def/g"), Some((2, "/g")));
        assert_eq!(idx.lookup("/abc/defg"), Some((1, "/defg")));
        assert_eq!(idx.lookup("/abcd"), None);
        assert_eq!(idx.lookup("/"), None);
        assert_eq!(idx.lookup(""), None);
        idx.insert("/".to_string(), 0);
        assert_eq!(idx.lookup("/abcd"), Some((0, "/abcd")));
        assert_eq!(idx.lookup("/"), Some((0, "/")));
        idx.remove("/abc");
        assert_eq!(idx.lookup("/abc/x"), Some((0, "/abc/x")));
        assert_eq!(idx.get("/abc/def"), Some(2));
        assert_eq!(idx.get("/abc"), None);
    }

    #[test]
    fn joining() {
        assert_eq!(join("", ""), "/");
        assert_eq!(join("", "/x"), "/x");
        assert_eq!(join("/v1", ""), "/v1");
        assert_eq!(join("/v1", "/x"), "/v1/x");
        assert_eq!(join("/v1/", "/x"), "/v1/x");
        assert_eq!(join("/", "/x"), "/x");
        assert_eq!(join("/v1", "/"), "/v1/");
        assert_eq!(with_query("/a".into(), Some("b=1")), "/a?b=1");
        assert_eq!(with_query("/a".into(), None), "/a");
    }
}
