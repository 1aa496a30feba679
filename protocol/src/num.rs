//! Exact numbers and time: money in cents, decimal factors, millisecond timestamps.
//!
//! Amounts on the API are decimal strings or JSON numbers; either way they are parsed from
//! the literal text (never through a binary float), so `19.99` is exactly 1999 cents.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The largest amount of money accepted anywhere (10^12 currency units, in cents).
pub const MONEY_CENTS_MAX: i64 = 100_000_000_000_000;

/// An amount of money in hundredths of the currency unit (cents, fen).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Money(pub i64);

impl Money {
    pub const ZERO: Money = Money(0);

    /// Parses a literal with at most two decimals (`"199"`, `"199.5"`, `"199.00"`, `"-3.20"`).
    pub fn parse(text: &str) -> Result<Money, String> {
        let decimal = parse_decimal(text)?;
        if decimal.scale() > 2 {
            return Err(format!("{text:?} has more than 2 decimals"));
        }
        // Checked: a literal near Decimal's maximum overflows when scaled to cents.
        let cents = decimal
            .checked_mul(Decimal::ONE_HUNDRED)
            .ok_or_else(|| format!("{text:?} is out of range"))?;
        let cents: i64 = cents
            .try_into()
            .map_err(|_| format!("{text:?} is out of range"))?;
        if cents.unsigned_abs() > MONEY_CENTS_MAX.unsigned_abs() {
            return Err(format!("{text:?} is out of range (at most 1000000000000)"));
        }
        Ok(Money(cents))
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, 2)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// The schema of an amount of money on the API: a decimal string or a JSON number.
pub(crate) fn money_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "An amount of money: at most 2 decimals, at most 10^12 in size (a decimal string, or a JSON number read from its exact text).",
        "oneOf": [
            {"type": "string", "pattern": r"^-?[0-9]{1,13}(\.[0-9]{1,2})?$"},
            {"type": "number", "minimum": -1_000_000_000_000i64, "maximum": 1_000_000_000_000i64}
        ]
    })
}

fn decimal() -> schemars::Schema {
    schemars::json_schema!({
        "description": "An exact decimal (a decimal string, or a JSON number read from its exact text).",
        "oneOf": [
            {"type": "string", "pattern": r"^-?[0-9]{1,28}(\.[0-9]{1,28})?$"},
            {"type": "number"}
        ]
    })
}

pub(crate) fn decimal_schema_option(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"oneOf": [{"type": "null"}, decimal()]})
}

pub(crate) fn decimal_map_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "additionalProperties": decimal()})
}

/// Parses a plain decimal literal (optional `-`, digits, optional `.` and digits); no
/// exponents, no spaces, at most 28 significant digits.
pub fn parse_decimal(text: &str) -> Result<Decimal, String> {
    let body = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match body.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (body, None),
    };
    let digits_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok(int) || frac.is_some_and(|f| !digits_ok(f)) {
        return Err(format!("{text:?} is not a decimal number"));
    }
    Decimal::from_str(text).map_err(|_| format!("{text:?} is out of range"))
}

/// The text of a JSON number or string literal, for exact decimal parsing.
pub fn literal_text(raw: &serde_json::value::RawValue) -> Result<String, String> {
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|e| e.to_string())
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Ok(text.to_string())
    } else {
        Err(format!("expected a decimal string or number, found {text}"))
    }
}

/// A point in time, milliseconds since the Unix epoch (UTC).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Millis(pub i64);

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;
/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 3_600_000;

impl Millis {
    /// Parses an RFC 3339 timestamp (`2026-11-23T10:00:00Z`, `2026-11-23T18:00:00+08:00`).
    pub fn parse_rfc3339(text: &str) -> Result<Millis, String> {
        let at = OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|_| format!("{text:?} is not an RFC 3339 timestamp"))?;
        let ms = at.unix_timestamp_nanos() / 1_000_000;
        // Years 1970 to 8999: a timestamp plus the longest expiry, window or retention (twice
        // `rules::DAYS_MAX`, 200 years) stays a year RFC 3339 can write (at most 9999).
        if !(0..MILLIS_YEAR_9000).contains(&ms) {
            return Err(format!("{text:?} is outside the years 1970 to 8999"));
        }
        Ok(Millis(ms as i64))
    }

    pub fn plus_days(self, days: u32) -> Millis {
        Millis(self.0 + i64::from(days) * DAY_MS)
    }

    /// A wall-clock reading as milliseconds since the epoch (before the epoch: 0). `protocol`
    /// reads no clock itself: the shells that may (the node's API and clock proposals, the
    /// client) read `SystemTime::now()` and convert it here.
    pub fn from_system_time(time: std::time::SystemTime) -> Millis {
        let since_epoch = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Millis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }
}

/// 9000-01-01T00:00:00Z: accepted timestamps are before it.
const MILLIS_YEAR_9000: i128 = 221_845_392_000_000;

impl fmt::Display for Millis {
    /// RFC 3339 in UTC. Never fails: a time RFC 3339 cannot write (outside years 0 to 9999,
    /// which accepted input cannot reach) is written as milliseconds since the epoch.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .ok()
            .and_then(|at| at.format(&Rfc3339).ok());
        match text {
            Some(text) => f.write_str(&text),
            None => write!(f, "{}ms", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_parses_exactly_from_literal_text() {
        assert_eq!(Money::parse("199"), Ok(Money(19_900)));
        assert_eq!(Money::parse("199.5"), Ok(Money(19_950)));
        assert_eq!(Money::parse("0.07"), Ok(Money(7)));
        assert_eq!(Money::parse("-3.20"), Ok(Money(-320)));
        assert_eq!(
            Money::parse("19.99").map(|m| m.to_string()),
            Ok("19.99".to_string())
        );
        assert!(Money::parse("1.005")
            .unwrap_err()
            .contains("more than 2 decimals"));
        assert!(Money::parse("1e3").is_err());
        assert!(Money::parse(" 1").is_err());
        assert!(Money::parse("1.").is_err());
        assert!(Money::parse("1000000000000.01").is_err());
        // Near Decimal's maximum: an error, not an overflow panic.
        assert!(Money::parse("1000000000000000000000000000").is_err());
        assert!(Money::parse("-9223372036854775808").is_err());
        assert_eq!(Money(-5).to_string(), "-0.05");
    }

    #[test]
    fn literal_text_keeps_number_digits() {
        let raw = |s: &str| serde_json::from_str::<Box<serde_json::value::RawValue>>(s).unwrap();
        assert_eq!(
            literal_text(&raw("0.30000000000000004")).unwrap(),
            "0.30000000000000004"
        );
        assert_eq!(literal_text(&raw("\"12.50\"")).unwrap(), "12.50");
        assert!(literal_text(&raw("true")).is_err());
    }

    #[test]
    fn timestamps_round_trip() {
        let t = Millis::parse_rfc3339("2026-11-23T18:00:00+08:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-23T10:00:00Z");
        assert_eq!(
            Millis::parse_rfc3339("2026-11-23T10:00:00.250Z").unwrap().0 - t.0,
            250
        );
        assert!(Millis::parse_rfc3339("yesterday").is_err());
        assert!(Millis::parse_rfc3339("1960-01-01T00:00:00Z").is_err());
        assert!(Millis::parse_rfc3339("9000-01-01T00:00:00Z").is_err());
        assert!(Millis::parse_rfc3339("8999-12-31T23:59:59Z").is_ok());
        // Far beyond RFC 3339's years, formatting still answers.
        assert_eq!(Millis(i64::MAX).to_string(), format!("{}ms", i64::MAX));
    }
}
