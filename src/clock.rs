//! Wall-clock time: timestamps as the contract writes them (RFC 3339, UTC, second
//! precision), and a [`Clock`] that code judging expiries takes, so tests move time
//! forward instead of sleeping.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The current wall-clock time.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The system clock plus an offset that only grows: a test "waits" by advancing it.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset: Mutex<Duration>,
}

impl OffsetClock {
    pub fn advance(&self, by: Duration) {
        *crate::lock(&self.offset) += by;
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + *crate::lock(&self.offset)
    }
}

pub fn rfc3339(at: SystemTime) -> String {
    let t = OffsetDateTime::from(at);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Parse an RFC 3339 timestamp (also the ISO-8601 form the login API uses).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text.trim(), &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_seconds() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        assert_eq!(rfc3339(at), "2026-11-18T11:06:40Z");
        assert_eq!(
            parse_rfc3339("2026-11-18T11:06:40Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000))
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn an_offset_clock_runs_ahead() {
        let clock = OffsetClock::default();
        clock.advance(Duration::from_secs(3600));
        let ahead = clock
            .now()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        assert!(ahead > Duration::from_secs(3590), "{ahead:?}");
    }
}
