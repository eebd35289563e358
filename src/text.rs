//! Text for humans from untrusted sources (message bodies and headers, Redis records): what
//! the operator commands print.
//!
//! Invariant: the result holds no control character and no invisible or direction-changing
//! formatting character (they are written as `\n`, `\u{1b}`, …), so a message cannot
//! move the cursor, retitle the terminal or fake a line of output; and it is bounded.

/// `text` escaped for a terminal and cut to `max_chars` characters (with a note of how many
/// were left out).
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars + 16));
    let mut chars = text.chars();
    for (shown, c) in chars.by_ref().enumerate() {
        if shown == max_chars {
            let rest = 1 + chars.count();
            out.push_str(&format!("…(+{rest} characters)"));
            return out;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_invisible_format(c) => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` as one word for a POSIX shell: as it is when it holds only characters no shell
/// reads specially, else in single quotes (a `'` inside written `'\''`). Characters a
/// terminal would interpret are escaped as [`printable`] does: the result is meant to be
/// shown, then pasted.
pub fn shell_quote(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        return text.to_owned();
    }
    format!("'{}'", printable(text, 512).replace('\'', "'\\''"))
}

/// Cut to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// `1 event`, `3 events`: a count with its noun in the right number.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Whether `text` shows nothing: only whitespace and invisible formatting characters.
pub fn is_blank(text: &str) -> bool {
    text.chars()
        .all(|c| c.is_whitespace() || is_invisible_format(c))
}

/// Zero-width and bidirectional formatting characters: invisible, or able to reorder what
/// is shown around them.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x2069 | 0xFEFF
    )
}

/// An error with its sources, each once: `connect failed: connection refused`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert_eq!(
            printable("\u{1b}]0;pwned\u{7}\u{1b}[2J\nX", 100),
            "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\nX"
        );
        assert_eq!(
            printable("safe \u{202e}txt.exe", 100),
            "safe \\u{202e}txt.exe"
        );
        assert_eq!(printable("Zürich", 100), "Zürich");
    }

    #[test]
    fn bounds_the_length() {
        assert_eq!(printable(&"a".repeat(10), 4), "aaaa…(+6 characters)");
        assert_eq!(printable("abcd", 4), "abcd");
    }

    #[test]
    fn shell_quoting_survives_the_shell() {
        for (text, quoted) in [
            ("ORG-2001", "ORG-2001"),
            ("BAD 1", "'BAD 1'"),
            ("it's", "'it'\\''s'"),
            ("$(rm -rf /)", "'$(rm -rf /)'"),
            ("", "''"),
        ] {
            assert_eq!(shell_quote(text), quoted);
            // What the shell makes of it is the text itself.
            let echoed = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {quoted}"))
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&echoed.stdout), text, "{quoted}");
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(1, "event", "events"), "1 event");
        assert_eq!(count(0, "event", "events"), "0 events");
    }
}
