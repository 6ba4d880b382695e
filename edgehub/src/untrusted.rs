//! Text that came from outside (a request body, a path, a header, a manifest) bounded before it
//! is echoed in an error, a log line or a metric: a client that sends a 5 MB name must not get
//! a 5 MB error back, nor fill the logs with it.
//!
//! Long values are cut in the middle, so both ends stay recognisable and the message around
//! them (which field, what was wrong) survives: `"aaaa…[4999936 bytes]…aaaa" is not a valid
//! name`.

use std::borrow::Cow;

/// The longest single word (a run without whitespace) an error quotes in full.
pub const MAX_WORD: usize = 128;
/// The longest whole message.
pub const MAX_MESSAGE: usize = 1024;
/// The longest field path (`metadata.labels["…"]`).
pub const MAX_FIELD: usize = 256;

/// `text` cut to about `max` bytes: its head and tail with the number of bytes left out
/// between them. Shorter text is returned as it is.
pub fn clip(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let keep = max.saturating_sub(24) / 2;
    let head = floor_boundary(text, keep);
    let tail = ceil_boundary(text, text.len() - keep);
    let left_out = tail - head;
    Cow::Owned(format!(
        "{}…[{left_out} bytes]…{}",
        &text[..head],
        &text[tail..]
    ))
}

/// A message for an error or a log line: every word longer than [`MAX_WORD`] clipped, then the
/// whole cut to [`MAX_MESSAGE`].
pub fn message(text: &str) -> Cow<'_, str> {
    let long_word = text.split(char::is_whitespace).any(|w| w.len() > MAX_WORD);
    if !long_word && text.len() <= MAX_MESSAGE {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE * 2));
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        out.push_str(&clip(&rest[..end], MAX_WORD));
        // The whitespace itself, kept as it was.
        let ws = rest[end..]
            .find(|c: char| !c.is_whitespace())
            .map_or(rest.len(), |n| end + n);
        out.push_str(&rest[end..ws]);
        rest = &rest[ws..];
        if out.len() > MAX_MESSAGE * 2 {
            break;
        }
    }
    Cow::Owned(clip(&out, MAX_MESSAGE).into_owned())
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_left_alone() {
        assert!(matches!(clip("abc", 10), Cow::Borrowed("abc")));
        let m = "metadata.name: \"web\" is not valid";
        assert!(matches!(message(m), Cow::Borrowed(_)));
    }

    #[test]
    fn a_huge_value_keeps_its_ends_and_the_message_around_it() {
        let name = "a".repeat(5 << 20);
        let m = format!("{name:?} is not a valid name: must be a DNS label");
        let out = message(&m);
        assert!(out.len() < 300, "{} bytes", out.len());
        assert!(out.starts_with("\"aaaa"), "{out}");
        assert!(
            out.ends_with("is not a valid name: must be a DNS label"),
            "{out}"
        );
        assert!(out.contains("bytes]…"), "{out}");
    }

    #[test]
    fn many_words_are_bounded_too_and_utf8_survives() {
        let m = "é ".repeat(100_000);
        let out = message(&m);
        assert!(out.len() <= MAX_MESSAGE + 40, "{} bytes", out.len());
        let word = "é".repeat(1000);
        let out = clip(&word, 100);
        assert!(out.len() < 130 && out.contains("bytes]"), "{out}");
    }
}
