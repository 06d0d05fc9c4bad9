//! Time, behind a trait so monitors and validity checks can be tested without waiting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;

    fn unix(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// The system clock. With the `insecure-test-hooks` feature, `SIGNET_INSECURE_CLOCK_OFFSET`
/// (a humantime duration, e.g. "80d") moves it forward, so tests can see certificates near
/// their expiry without waiting for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock {
    offset: Duration,
}

impl SystemClock {
    pub fn new() -> Self {
        #[cfg(feature = "insecure-test-hooks")]
        if let Some(d) = std::env::var("SIGNET_INSECURE_CLOCK_OFFSET")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
        {
            tracing::warn!(offset = ?d, "insecure test hook: clock moved forward");
            return Self { offset: d };
        }
        Self {
            offset: Duration::ZERO,
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now() + self.offset
    }
}

/// RFC 3339 UTC to the second, for Unix seconds: `2026-11-22T10:00:00Z`.
pub fn rfc3339(unix: u64) -> String {
    rfc3339_micros(UNIX_EPOCH + Duration::from_secs(unix)).replace(".000000Z", "Z")
}

/// RFC 3339 UTC with microseconds: `2026-11-22T10:00:00.123456Z`.
pub fn rfc3339_micros(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let dt = time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        d.subsec_micros()
    )
}

/// Microseconds since the epoch (0 before it).
pub fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC to the second for microseconds since the epoch (negative: the epoch).
pub fn rfc3339_from_micros(us: i64) -> String {
    rfc3339(u64::try_from(us / 1_000_000).unwrap_or(0))
}

/// Parse what [`rfc3339_micros`] (or any RFC 3339 writer) produced, to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// Parse an RFC 3339 time to microseconds since the epoch.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_000_000_123_456);
        let s = rfc3339_micros(t);
        assert_eq!(s, "2026-11-18T11:06:40.123456Z");
        assert_eq!(parse_rfc3339(&s), Some(1_795_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
