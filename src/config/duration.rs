//! Human durations as the configuration writes them: `250ms`, `5s`, `2m`, `1h`, `30d`.
//!
//! Invariant: one unsigned integer followed by exactly one unit; nothing else parses, so a
//! typo is an error at start-up instead of a surprising schedule in production.

use std::time::Duration;

pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(millis_per_unit).map(Duration::from_millis)
}

/// The shortest exact spelling of `d` in the same syntax (used in messages and queue names
/// only when nothing was configured).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms > 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_duration("30d"),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(parse_duration(" 10s "), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "s",
            "5",
            "5 s",
            "5parsecs",
            "5 parsecs",
            "-5s",
            "1.5s",
            "5S",
            "5sec",
            "ms5",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["250ms", "5s", "2m", "1h", "30d", "90s", "1500ms"] {
            let d = parse_duration(s).expect("valid");
            assert_eq!(format_duration(d), s);
        }
    }
}
