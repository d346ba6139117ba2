//! Event-time parsing and formatting.
//!
//! Every timestamp inside Weir is an `i64` of nanoseconds since the Unix epoch, UTC. Payloads
//! carry time in two shapes, both accepted wherever a timestamp is expected:
//!
//! - text in RFC 3339 / ISO 8601: `2024-01-01T12:00:00Z`, `2024-01-01T14:00:00.5+02:00`,
//!   `2024-01-01 12:00:00.123` (no offset means UTC; a space may replace the `T`; seconds and
//!   the fraction are optional, the fraction is kept to the nanosecond);
//! - an epoch number, integer or decimal, in a configured [`TimeUnit`] (`1704067200000` ms,
//!   `1704067200.25` s). Decimal text is converted exactly, without a detour through `f64`.
//!
//! Both parsers are hand-written for fixed layouts because they run once per decoded row;
//! chrono does the calendar arithmetic.

use chrono::{DateTime, Datelike, Timelike};
use serde::{Deserialize, Serialize};

const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// The unit of epoch numbers in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TimeUnit {
    /// Seconds since the epoch (`"s"`).
    #[serde(rename = "s")]
    Seconds,
    /// Milliseconds since the epoch (`"ms"`), what most IoT devices send.
    #[default]
    #[serde(rename = "ms")]
    Millis,
    /// Microseconds since the epoch (`"us"`).
    #[serde(rename = "us")]
    Micros,
    /// Nanoseconds since the epoch (`"ns"`).
    #[serde(rename = "ns")]
    Nanos,
}

impl TimeUnit {
    /// How many nanoseconds one unit holds.
    pub const fn nanos(self) -> i64 {
        match self {
            Self::Seconds => NANOS_PER_SECOND,
            Self::Millis => 1_000_000,
            Self::Micros => 1_000,
            Self::Nanos => 1,
        }
    }

    /// log10 of [`Self::nanos`], for exact decimal scaling.
    const fn nanos_exponent(self) -> i32 {
        match self {
            Self::Seconds => 9,
            Self::Millis => 6,
            Self::Micros => 3,
            Self::Nanos => 0,
        }
    }
}

/// Parses either an RFC 3339 timestamp or an epoch number written as text.
///
/// Text whose fifth byte is `-` (`2024-...`) is a date; anything else must be an epoch number in
/// `unit`. Returns `None` for anything unparseable or outside the `i64` nanosecond range
/// (years 1677 to 2262).
pub fn parse_timestamp(text: &str, unit: TimeUnit) -> Option<i64> {
    let bytes = text.trim_ascii().as_bytes();
    if bytes.len() >= 10 && bytes[4] == b'-' {
        parse_rfc3339_bytes(bytes)
    } else {
        parse_epoch(bytes, unit)
    }
}

/// Parses an RFC 3339 / ISO 8601 timestamp; see the module docs for the accepted forms.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    parse_rfc3339_bytes(text.trim_ascii().as_bytes())
}

/// Converts an integer epoch value in `unit` to nanoseconds, `None` on overflow.
pub fn epoch_to_nanos(value: i64, unit: TimeUnit) -> Option<i64> {
    value.checked_mul(unit.nanos())
}

/// Converts a decimal epoch number written as text (`1704067200`, `-1.5`, `1.7e12`) in `unit`
/// to nanoseconds. Exact: sub-nanosecond digits are rounded half away from zero.
pub fn parse_epoch(text: &[u8], unit: TimeUnit) -> Option<i64> {
    match parse_integer_epoch(text, unit) {
        Some(nanos) => Some(nanos),
        None => parse_decimal_epoch(text, unit),
    }
}

/// The common case of [`parse_epoch`] without wide arithmetic: a plain integer of at most 18
/// digits, which fits an `i64` before scaling. `None` for anything else, including overflow,
/// which the general path then rejects too.
#[inline]
fn parse_integer_epoch(text: &[u8], unit: TimeUnit) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut value: i64 = 0;
    // Eight digits at a time while there are eight; at most two words, so no overflow.
    let mut rest = digits;
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        let word = u64::from_le_bytes(*word);
        if crate::decode::leading_digits(word) != 8 {
            return None;
        }
        value = value * 100_000_000 + crate::decode::digits_value(word, 8) as i64;
        rest = tail;
    }
    for &b in rest {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value * 10 + i64::from(b - b'0');
    }
    (if negative { -value } else { value }).checked_mul(unit.nanos())
}

fn parse_decimal_epoch(text: &[u8], unit: TimeUnit) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, text),
    };
    let mut mantissa: u128 = 0;
    let mut exponent: i32 = 0;
    let mut any_digit = false;
    let mut i = 0;
    while let Some(&b) = digits.get(i).filter(|b| b.is_ascii_digit()) {
        mantissa = push_digit(mantissa, b, &mut exponent);
        any_digit = true;
        i += 1;
    }
    if digits.get(i) == Some(&b'.') {
        i += 1;
        while let Some(&b) = digits.get(i).filter(|b| b.is_ascii_digit()) {
            let before = exponent;
            mantissa = push_digit(mantissa, b, &mut exponent);
            // A digit after the point lowers the exponent unless it no longer fit.
            if exponent == before {
                exponent -= 1;
            } else {
                exponent = before;
            }
            any_digit = true;
            i += 1;
        }
    }
    if !any_digit {
        return None;
    }
    if matches!(digits.get(i), Some(b'e' | b'E')) {
        i += 1;
        let (exp_negative, start) = match digits.get(i) {
            Some(b'-') => (true, i + 1),
            Some(b'+') => (false, i + 1),
            _ => (false, i),
        };
        let exp_digits = digits.get(start..)?;
        if exp_digits.is_empty() || exp_digits.len() > 4 {
            return None;
        }
        let mut explicit: i32 = 0;
        for &b in exp_digits {
            if !b.is_ascii_digit() {
                return None;
            }
            explicit = explicit * 10 + i32::from(b - b'0');
        }
        exponent += if exp_negative { -explicit } else { explicit };
        i = digits.len();
    }
    if i != digits.len() {
        return None;
    }
    let scale = exponent + unit.nanos_exponent();
    let magnitude = if scale >= 0 {
        mantissa.checked_mul(10u128.checked_pow(u32::try_from(scale).ok()?)?)?
    } else {
        let divisor = 10u128.checked_pow(u32::try_from(-scale).ok()?);
        match divisor {
            Some(divisor) => (mantissa + divisor / 2) / divisor,
            None => 0,
        }
    };
    let magnitude = i128::try_from(magnitude).ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

/// Appends one decimal digit; once the mantissa would overflow, further digits only scale it.
fn push_digit(mantissa: u128, digit: u8, exponent: &mut i32) -> u128 {
    match mantissa
        .checked_mul(10)
        .and_then(|m| m.checked_add(u128::from(digit - b'0')))
    {
        Some(m) if m < (1u128 << 120) => m,
        _ => {
            *exponent += 1;
            mantissa
        }
    }
}

fn parse_rfc3339_bytes(b: &[u8]) -> Option<i64> {
    let year = digits_at(b, 0, 4)?;
    let month = digits_at(b, 5, 2)?;
    let day = digits_at(b, 8, 2)?;
    if b[4] != b'-' || b.get(7) != Some(&b'-') {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day)?;
    let (mut hour, mut minute, mut second, mut nanos) = (0, 0, 0, 0);
    let mut i = 10;
    if matches!(b.get(i), Some(b'T' | b't' | b' ')) {
        hour = digits_at(b, i + 1, 2)?;
        if b.get(i + 3) != Some(&b':') {
            return None;
        }
        minute = digits_at(b, i + 4, 2)?;
        i += 6;
        if b.get(i) == Some(&b':') {
            second = digits_at(b, i + 1, 2)?;
            i += 3;
            if matches!(b.get(i), Some(b'.' | b',')) {
                i += 1;
                let start = i;
                let mut scale = 100_000_000;
                while let Some(&d) = b.get(i).filter(|d| d.is_ascii_digit()) {
                    nanos += u32::from(d - b'0') * scale;
                    scale /= 10;
                    i += 1;
                }
                if i == start {
                    return None;
                }
            }
        }
    }
    let offset_seconds: i64 = match b.get(i) {
        None => 0,
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let hours = digits_at(b, i + 1, 2)?;
            i += 3;
            if b.get(i) == Some(&b':') {
                i += 1;
            }
            let minutes = if i < b.len() {
                let m = digits_at(b, i, 2)?;
                i += 2;
                m
            } else {
                0
            };
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = i64::from(hours * 3600 + minutes * 60);
            if sign == b'-' { -seconds } else { seconds }
        }
        Some(_) => return None,
    };
    if i != b.len() {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_seconds;
    seconds
        .checked_mul(NANOS_PER_SECOND)?
        .checked_add(i64::from(nanos))
}

/// Days from 1970-01-01 to a proleptic Gregorian date, `None` for an invalid date.
///
/// Howard Hinnant's `days_from_civil`; hand-rolled because it runs once per decoded row and
/// chrono's validated constructors cost several times more.
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if day == 0 || day > month_days {
        return None;
    }
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Some(era * 146_097 + day_of_era - 719_468)
}

/// Reads `count` ASCII digits starting at `at`.
fn digits_at(b: &[u8], at: usize, count: usize) -> Option<u32> {
    let digits = b.get(at..at + count)?;
    let mut value = 0u32;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value * 10 + u32::from(d - b'0');
    }
    Some(value)
}

/// Appends `nanos` as an RFC 3339 UTC timestamp ending in `Z` to `out`.
///
/// The fraction has 0, 3, 6 or 9 digits, the fewest that keep the value exact, so whole
/// seconds print as `2024-01-01T00:00:00Z` and milliseconds as `...00.250Z`. Writes into the
/// caller's buffer so a sink can reuse one `String` for every row.
pub fn format_rfc3339(nanos: i64, out: &mut String) {
    let at = DateTime::from_timestamp_nanos(nanos).naive_utc();
    push_padded(out, at.year().unsigned_abs(), 4);
    out.push('-');
    push_padded(out, at.month(), 2);
    out.push('-');
    push_padded(out, at.day(), 2);
    out.push('T');
    push_padded(out, at.hour(), 2);
    out.push(':');
    push_padded(out, at.minute(), 2);
    out.push(':');
    push_padded(out, at.second(), 2);
    let fraction = at.nanosecond();
    if fraction != 0 {
        out.push('.');
        if fraction.is_multiple_of(1_000_000) {
            push_padded(out, fraction / 1_000_000, 3);
        } else if fraction.is_multiple_of(1_000) {
            push_padded(out, fraction / 1_000, 6);
        } else {
            push_padded(out, fraction, 9);
        }
    }
    out.push('Z');
}

/// Appends `value` zero-padded to `width` (at most 9) digits, without the formatting machinery,
/// which costs more than the rest of `format_rfc3339` together.
fn push_padded(out: &mut String, value: u32, width: usize) {
    let mut digits = [b'0'; 9];
    let mut rest = value;
    for digit in digits[..width].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.push_str(std::str::from_utf8(&digits[..width]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const JAN_1_2024: i64 = 1_704_067_200 * NANOS_PER_SECOND;

    fn rfc(text: &str) -> Option<i64> {
        parse_timestamp(text, TimeUnit::Millis)
    }

    #[test]
    fn rfc3339_with_z_offset_and_fraction() {
        assert_eq!(rfc("2024-01-01T00:00:00Z"), Some(JAN_1_2024));
        assert_eq!(
            rfc("2024-01-01T00:00:00.5z"),
            Some(JAN_1_2024 + 500_000_000)
        );
        assert_eq!(rfc("2024-01-01T02:00:00+02:00"), Some(JAN_1_2024));
        assert_eq!(rfc("2023-12-31T23:30:00-0030"), Some(JAN_1_2024));
        assert_eq!(rfc("2024-01-01T00:00:00.000000001Z"), Some(JAN_1_2024 + 1));
        assert_eq!(
            rfc("2024-01-01T00:00:00.1234567891Z"),
            Some(JAN_1_2024 + 123_456_789)
        );
    }

    #[test]
    fn iso8601_without_offset_is_utc_and_space_separator_works() {
        assert_eq!(
            rfc("2024-01-01 12:00:00.123"),
            Some(JAN_1_2024 + 12 * 3600 * NANOS_PER_SECOND + 123_000_000)
        );
        assert_eq!(
            rfc("2024-01-01T12:00"),
            Some(JAN_1_2024 + 12 * 3600 * NANOS_PER_SECOND)
        );
        assert_eq!(rfc("2024-01-01"), Some(JAN_1_2024));
    }

    #[test]
    fn civil_days_agree_with_chrono() {
        for (year, month, day) in [
            (1970, 1, 1),
            (2000, 2, 29),
            (1900, 3, 1),
            (2262, 4, 11),
            (1677, 9, 21),
            (2024, 12, 31),
        ] {
            let expected = chrono::NaiveDate::from_ymd_opt(year, month, day).map(|d| {
                d.signed_duration_since(chrono::NaiveDate::default())
                    .num_days()
            });
            assert_eq!(
                days_from_civil(i64::from(year), month, day),
                expected,
                "{year}-{month}-{day}"
            );
        }
        assert_eq!(days_from_civil(1900, 2, 29), None);
        assert_eq!(days_from_civil(2024, 13, 1), None);
    }

    #[test]
    fn invalid_dates_are_rejected() {
        for text in [
            "2024-02-30T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00Q",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+25:00",
            "2024-1-01T00:00:00Z",
            "3000-01-01T00:00:00Z",
            "yesterday",
            "",
        ] {
            assert_eq!(rfc(text), None, "{text}");
        }
    }

    #[test]
    fn epoch_numbers_in_each_unit() {
        assert_eq!(
            parse_timestamp("1704067200", TimeUnit::Seconds),
            Some(JAN_1_2024)
        );
        assert_eq!(
            parse_timestamp("1704067200000", TimeUnit::Millis),
            Some(JAN_1_2024)
        );
        assert_eq!(
            parse_timestamp("1704067200000000", TimeUnit::Micros),
            Some(JAN_1_2024)
        );
        assert_eq!(
            parse_timestamp("1704067200000000000", TimeUnit::Nanos),
            Some(JAN_1_2024)
        );
        assert_eq!(
            epoch_to_nanos(1_704_067_200, TimeUnit::Seconds),
            Some(JAN_1_2024)
        );
        assert_eq!(epoch_to_nanos(i64::MAX, TimeUnit::Seconds), None);
    }

    #[test]
    fn decimal_epochs_are_exact() {
        assert_eq!(
            parse_epoch(b"1704067200.123", TimeUnit::Seconds),
            Some(JAN_1_2024 + 123_000_000)
        );
        assert_eq!(
            parse_epoch(b"1.7040672e12", TimeUnit::Millis),
            Some(JAN_1_2024)
        );
        assert_eq!(
            parse_epoch(b"-1.5", TimeUnit::Seconds),
            Some(-1_500_000_000)
        );
        assert_eq!(parse_epoch(b"0.0000000015", TimeUnit::Seconds), Some(2));
        assert_eq!(parse_epoch(b"1e300", TimeUnit::Seconds), None);
        for bad in [
            &b""[..],
            b"-",
            b".",
            b"1.2.3",
            b"1e",
            b"12abc",
            b"NaN",
            b"inf",
        ] {
            assert_eq!(parse_epoch(bad, TimeUnit::Millis), None, "{bad:?}");
        }
    }

    #[test]
    fn integer_epochs_take_the_short_path_with_the_same_answers() {
        for text in [
            &b"0"[..],
            b"-0",
            b"0001",
            b"1704067200000",
            b"-1704067200000",
            b"999999999999999999",
            b"-999999999999999999",
            b"9223372036854775807",
            b"9223372036",
            b"9223372037",
            b"-9223372037",
            b"+5",
        ] {
            for unit in [
                TimeUnit::Seconds,
                TimeUnit::Millis,
                TimeUnit::Micros,
                TimeUnit::Nanos,
            ] {
                let short = parse_integer_epoch(text, unit);
                let general = parse_decimal_epoch(text, unit);
                // The short path may decline, never disagree.
                assert!(short.is_none() || short == general, "{text:?} {unit:?}");
                assert_eq!(parse_epoch(text, unit), general, "{text:?} {unit:?}");
            }
        }
        // Every length around the eight-digit words, with a stray byte now and then.
        let mut rng = SmallRng::seed_from_u64(0x51_7cc1_b727_220a);
        for _ in 0..100_000 {
            let mut text = Vec::new();
            if rng.random_range(0..4) == 0 {
                text.push(b'-');
            }
            for _ in 0..rng.random_range(0..21) {
                text.push(b'0' + rng.random_range(0..10u8));
            }
            if rng.random_range(0..5) == 0 && !text.is_empty() {
                let at = rng.random_range(0..text.len());
                text[at] = [b'.', b'x', b'/', b':', b'e'][rng.random_range(0..5)];
            }
            let short = parse_integer_epoch(&text, TimeUnit::Millis);
            let general = parse_decimal_epoch(&text, TimeUnit::Millis);
            assert!(short.is_none() || short == general, "{text:?}");
            let digits = &text[usize::from(text.first() == Some(&b'-'))..];
            if (1..=18).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) {
                assert_eq!(
                    short, general,
                    "{text:?}: the short path must take plain integers"
                );
            }
        }
        assert_eq!(
            parse_integer_epoch(b"1704067200000", TimeUnit::Millis),
            Some(JAN_1_2024)
        );
        assert_eq!(parse_integer_epoch(b"9223372037", TimeUnit::Seconds), None);
        assert_eq!(parse_epoch(b"9223372037", TimeUnit::Seconds), None);
    }

    #[test]
    fn formats_utc_with_the_shortest_exact_fraction() {
        let mut out = String::new();
        for (nanos, expected) in [
            (JAN_1_2024, "2024-01-01T00:00:00Z"),
            (JAN_1_2024 + 250_000_000, "2024-01-01T00:00:00.250Z"),
            (JAN_1_2024 + 1_000, "2024-01-01T00:00:00.000001Z"),
            (JAN_1_2024 - 1, "2023-12-31T23:59:59.999999999Z"),
            (0, "1970-01-01T00:00:00Z"),
        ] {
            out.clear();
            format_rfc3339(nanos, &mut out);
            assert_eq!(out, expected);
            assert_eq!(parse_rfc3339(&out), Some(nanos));
        }
    }

    #[test]
    fn time_unit_serde_names() {
        let unit: TimeUnit = serde_json::from_str("\"us\"").expect("valid unit");
        assert_eq!(unit, TimeUnit::Micros);
        assert!(serde_json::from_str::<TimeUnit>("\"minutes\"").is_err());
        assert_eq!(TimeUnit::default(), TimeUnit::Millis);
    }
}
