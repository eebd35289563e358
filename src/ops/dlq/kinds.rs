//! The values the dlq tools accept for `--kind` and `--limit`: a typo is an error that
//! lists what exists, never an empty match.

use crate::pipeline::FailureKind;

/// Reasons RabbitMQ gives in `x-death` when it dead-letters a message itself.
pub const BROKER_REASONS: [&str; 4] = ["delivery_limit", "expired", "rejected", "maxlen"];

/// Every kind a dead letter can have.
pub fn known_kinds() -> Vec<String> {
    FailureKind::ALL
        .iter()
        .map(|k| k.as_str().to_owned())
        .chain(BROKER_REASONS.iter().map(|r| format!("broker:{r}")))
        .chain(std::iter::once("unknown".to_owned()))
        .collect()
}

pub fn parse_kind(text: &str) -> Result<String, String> {
    let known = known_kinds();
    if known.iter().any(|k| k == text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{:?} is not a dead-letter kind; known: {}",
            crate::text::printable(text, 64),
            known.join(", ")
        ))
    }
}

/// A positive count (0 would match nothing; say `all` where a tool takes it).
pub fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("0 would match nothing: give a positive number".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a positive number")),
    }
}

/// `peek --limit`: a positive count, or `all`.
pub fn parse_limit(text: &str) -> Result<Limit, String> {
    if text.trim().eq_ignore_ascii_case("all") {
        return Ok(Limit::All);
    }
    match text.trim().parse::<usize>() {
        Ok(0) => Err("0 would show nothing: give a positive number, or all".into()),
        Ok(n) => Ok(Limit::At(n)),
        Err(_) => Err(format!("{text:?} is not a positive number or all")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    All,
    At(usize),
}

impl Limit {
    pub fn max(self) -> Option<usize> {
        match self {
            Limit::All => None,
            Limit::At(n) => Some(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_limits_are_checked() {
        assert_eq!(parse_kind("rejected"), Ok("rejected".to_owned()));
        assert_eq!(
            parse_kind("broker:delivery_limit"),
            Ok("broker:delivery_limit".to_owned())
        );
        let typo = parse_kind("rejceted").expect_err("typo");
        assert!(typo.contains("known: invalid_command, rejected"), "{typo}");
        assert_eq!(parse_limit("all"), Ok(Limit::All));
        assert_eq!(parse_limit("5"), Ok(Limit::At(5)));
        assert!(parse_limit("0").is_err());
        assert!(parse_count("0").is_err());
        assert_eq!(parse_count("3"), Ok(3));
    }
}
