//! The retry policy: backoff schedule, full jitter and `Retry-After`.
//!
//! Everything here is a pure function of its inputs (the random draw and the clock are
//! parameters), so the schedule is unit-tested exactly. [`Backoff`] plugs the schedule into
//! `backon`, which drives the in-process retry loop.
//!
//! Invariants:
//! - a delay never exceeds `max_interval`, and a server's `Retry-After` never exceeds
//!   `max_retry_after`;
//! - `max_tries` counts tries, not retries: 4 tries means at most 3 sleeps;
//! - a `Retry-After` from the server replaces the jittered delay (it is the server telling
//!   us when it will accept work again; waiting less only earns another 429).

use std::time::{Duration, SystemTime};

use rand::RngExt;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    pub max_tries: u32,
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    /// The un-jittered ceiling for the sleep after failed try number `retry` (0-based):
    /// `min(max_interval, initial × multiplier^retry)`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.min(64) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_interval.as_secs_f64() {
            self.max_interval
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// Full jitter: a uniform draw in `[0, ceiling]`; `unit` is the random draw in `[0, 1)`.
    pub fn jittered(&self, retry: u32, unit: f64) -> Duration {
        self.ceiling(retry).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The sleep before the next try, or `None` when the tries are used up.
    /// `tries_made` counts the tries already made (≥ 1).
    pub fn next_delay(
        &self,
        tries_made: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if tries_made >= self.max_tries {
            return None;
        }
        Some(match retry_after {
            Some(server) => server.min(self.max_retry_after),
            None => self.jittered(tries_made.saturating_sub(1), unit),
        })
    }

    /// A fresh schedule for one in-process retry loop.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            tries_made: 1,
        }
    }
}

/// The schedule as an iterator, the shape `backon` drives. Each item is the jittered sleep
/// before the next try; it ends after `max_tries - 1` items. `Retry-After` is applied by
/// `backon`'s `adjust` hook with [`RetryPolicy::clamp_retry_after`].
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    tries_made: u32,
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self
            .policy
            .next_delay(self.tries_made, None, rand::rng().random::<f64>())?;
        self.tries_made += 1;
        Some(delay)
    }
}

impl backon::BackoffBuilder for RetryPolicy {
    type Backoff = Backoff;

    fn build(self) -> Backoff {
        self.backoff()
    }
}

impl RetryPolicy {
    /// `backon` adjust hook: keep the end of the schedule (`None`), otherwise let a server's
    /// `Retry-After` replace the jittered delay.
    pub fn clamp_retry_after(
        &self,
        retry_after: Option<Duration>,
        scheduled: Option<Duration>,
    ) -> Option<Duration> {
        let scheduled = scheduled?;
        Some(match retry_after {
            Some(server) => server.min(self.max_retry_after),
            None => scheduled,
        })
    }
}

/// Parse a `Retry-After` header: delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2026 07:28:00 GMT`), relative to `now`. A date in the past means "now".
/// Anything else is ignored (`None`), and the normal backoff applies.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long digit strings saturate instead of failing; the caller clamps.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::Retryable;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A policy shaped like the shipped one (250 ms doubling to 10 s, 4 tries, `Retry-After`
    /// capped at 2 minutes).
    fn default_policy() -> RetryPolicy {
        RetryPolicy {
            initial: ms(250),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
            max_tries: 4,
            max_retry_after: Duration::from_secs(120),
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = default_policy();
        let got: Vec<_> = (0..8).map(|r| p.ceiling(r)).collect();
        assert_eq!(
            got,
            [
                ms(250),
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(10_000),
                ms(10_000)
            ]
        );
        assert_eq!(
            p.ceiling(10_000),
            ms(10_000),
            "huge retry counts do not overflow"
        );
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let p = default_policy();
        assert_eq!(p.jittered(2, 0.0), Duration::ZERO);
        assert_eq!(p.jittered(2, 0.5), ms(500));
        assert_eq!(p.jittered(2, 0.999_999).as_millis(), 999);
        assert_eq!(
            p.jittered(2, 7.0),
            ms(1000),
            "out-of-range draws are clamped"
        );
    }

    #[test]
    fn tries_are_bounded() {
        let p = default_policy();
        assert!(p.next_delay(1, None, 1.0).is_some());
        assert!(p.next_delay(3, None, 1.0).is_some());
        assert_eq!(p.next_delay(4, None, 1.0), None, "4 tries = 3 sleeps");
        let delays: Vec<_> = p.backoff().collect();
        assert_eq!(delays.len(), 3);
        for (i, d) in delays.iter().enumerate() {
            assert!(*d <= p.ceiling(i as u32), "{d:?} above ceiling {i}");
        }
    }

    #[test]
    fn retry_after_replaces_jitter_and_is_capped() {
        let p = default_policy();
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(7)), 0.0),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            p.next_delay(1, Some(Duration::from_secs(86_400)), 0.0),
            Some(Duration::from_secs(120))
        );
        assert_eq!(p.next_delay(4, Some(Duration::from_secs(1)), 0.0), None);
        assert_eq!(
            p.clamp_retry_after(Some(ms(1500)), Some(ms(3))),
            Some(ms(1500))
        );
        assert_eq!(p.clamp_retry_after(None, Some(ms(3))), Some(ms(3)));
        assert_eq!(p.clamp_retry_after(Some(ms(1500)), None), None);
    }

    #[test]
    fn retry_after_both_forms() {
        let now = httpdate::parse_http_date("Thu, 26 Nov 2026 12:00:00 GMT").expect("date");
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Thu, 26 Nov 2026 12:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // RFC 850 and asctime forms are legal HTTP-dates too.
        assert_eq!(
            parse_retry_after("Thursday, 26-Nov-26 12:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Thu Nov 26 12:00:05 2026", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Thu, 26 Nov 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "1.5", "soon", "Thu, 99 Nov 2026 12:00:00 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backon_drives_the_schedule_in_virtual_time() {
        let p = RetryPolicy {
            initial: ms(100),
            ..default_policy()
        };
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let c = calls.clone();
        let result: Result<(), &str> = (move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err("transient")
            }
        })
        .retry(p)
        .sleep(tokio::time::sleep)
        .await;
        assert_eq!(result, Err("transient"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "max_tries tries, then give up"
        );
        // Full jitter: total sleep is at most 100 + 200 + 400 ms of virtual time.
        assert!(started.elapsed() <= ms(700), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn backon_honours_retry_after() {
        let p = default_policy();
        let calls = Arc::new(AtomicU32::new(0));
        let started = tokio::time::Instant::now();
        let c = calls.clone();
        let result: Result<u32, Duration> = (move || {
            let c = c.clone();
            async move {
                match c.fetch_add(1, Ordering::SeqCst) {
                    0 => Err(Duration::from_secs(3)),
                    n => Ok(n),
                }
            }
        })
        .retry(p)
        .sleep(tokio::time::sleep)
        .adjust(move |wait: &Duration, scheduled| p.clamp_retry_after(Some(*wait), scheduled))
        .await;
        assert_eq!(result, Ok(1));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < ms(3100),
            "{waited:?}"
        );
    }
}
