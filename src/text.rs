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
}
