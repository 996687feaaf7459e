//! FHIR `date`, `dateTime` and `instant` values as half-open UTC ranges.
//!
//! A FHIR date is imprecise: `2024-03` means the whole of March. Search (prefixes `eq`, `lt`,
//! `ge`, …) compares ranges, so every value is turned into `[start, end)` in UTC. Values without
//! a time zone (dates, and search values that omit it) are read as UTC; the README says so.
//! Range bounds are kept as fixed-width strings (`2024-03-01T00:00:00.000Z`) so that the store
//! can compare them as text and keep them in an ordinary index.

use time::format_description::well_known::Rfc3339;
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// How precisely a value was written; it decides the width of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Precision {
    Year,
    Month,
    Day,
    Minute,
    Second,
    Millisecond,
}

/// A half-open UTC interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// The lowest and highest keys, used for open-ended periods.
pub const MIN_KEY: &str = "0000-01-01T00:00:00.000Z";
pub const MAX_KEY: &str = "9999-12-31T23:59:59.999Z";

/// Which lexical forms a value may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateKind {
    /// `date`: YYYY, YYYY-MM or YYYY-MM-DD.
    Date,
    /// `dateTime`: a date, or a full time with seconds and a zone.
    DateTime,
    /// `instant`: a full time with seconds and a zone.
    Instant,
    /// A search parameter value: any of the above, and also minutes-only or zone-less times.
    SearchValue,
}

impl DateRange {
    pub fn start_key(&self) -> String {
        to_key(self.start)
    }
    pub fn end_key(&self) -> String {
        to_key(self.end)
    }
}

/// Formats an instant as the fixed-width, sortable UTC key used by the store
/// (`YYYY-MM-DDThh:mm:ss.sssZ`). The digits are written by hand rather than through
/// `format!`, whose machinery was most of the cost of stamping each version on the writer and
/// of every date index key (BENCHMARKS.md, issue 17, ninth sitting); a year outside 0–9999
/// goes through `format!` as before (`tests::keys_are_written_as_format_writes_them`).
pub fn to_key(at: OffsetDateTime) -> String {
    let at = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
    let year = match u32::try_from(at.year()) {
        Ok(year) if year <= 9999 => year,
        _ => return format_key(at),
    };
    let mut out = String::with_capacity(24);
    push_digits(&mut out, year, 4);
    for (separator, value, width) in [
        ('-', u32::from(u8::from(at.month())), 2),
        ('-', u32::from(at.day()), 2),
        ('T', u32::from(at.hour()), 2),
        (':', u32::from(at.minute()), 2),
        (':', u32::from(at.second()), 2),
        ('.', u32::from(at.millisecond()), 3),
    ] {
        out.push(separator);
        push_digits(&mut out, value, width);
    }
    out.push('Z');
    out
}

/// Writes the last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut String, value: u32, width: u32) {
    for place in (0..width).rev() {
        let digit = (value / 10u32.pow(place)) % 10;
        out.push(char::from_digit(digit, 10).unwrap_or('0'));
    }
}

/// `to_key` through `format!`: for the years it does not write by hand.
fn format_key(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// Formats an instant the way Baton writes `meta.lastUpdated` and other instants.
pub fn format_instant(at: OffsetDateTime) -> String {
    to_key(at)
}

/// Parses an instant written by Baton or a client (RFC 3339).
pub fn parse_instant(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Parses a FHIR date/dateTime/instant into its range, checking the lexical form for `kind`.
pub fn parse_range(text: &str, kind: DateKind) -> Result<DateRange, String> {
    let bad = || format!("'{text}' is not a valid FHIR {}", kind_name(kind));
    let (date_part, time_part) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    if kind == DateKind::Instant && time_part.is_none() {
        return Err(bad());
    }
    if kind == DateKind::Date && time_part.is_some() {
        return Err(bad());
    }
    let pieces: Vec<&str> = date_part.split('-').collect();
    if pieces.is_empty() || pieces.len() > 3 || pieces[0].len() != 4 {
        return Err(bad());
    }
    if pieces.iter().skip(1).any(|p| p.len() != 2) || !pieces.iter().all(|p| is_digits(p)) {
        return Err(bad());
    }
    let year: i32 = pieces[0].parse().map_err(|_| bad())?;
    let month_num: u8 = pieces
        .get(1)
        .map_or(Ok(1), |m| m.parse())
        .map_err(|_| bad())?;
    let day: u8 = pieces
        .get(2)
        .map_or(Ok(1), |d| d.parse())
        .map_err(|_| bad())?;
    let month = Month::try_from(month_num).map_err(|_| bad())?;
    let date = Date::from_calendar_date(year, month, day).map_err(|_| bad())?;

    let Some(time_text) = time_part else {
        if pieces.len() < 3 && kind == DateKind::Instant {
            return Err(bad());
        }
        let start = PrimitiveDateTime::new(date, Time::MIDNIGHT).assume_utc();
        if !in_key_range(start) {
            return Err(out_of_range(text));
        }
        let precision = match pieces.len() {
            1 => Precision::Year,
            2 => Precision::Month,
            _ => Precision::Day,
        };
        return Ok(DateRange {
            start,
            end: advance(start, precision),
        });
    };
    if pieces.len() != 3 {
        return Err(bad());
    }

    // Split off the zone: `Z`, `+hh:mm` or `-hh:mm`.
    let (clock, offset) = if let Some(clock) = time_text.strip_suffix('Z') {
        (clock, Some(UtcOffset::UTC))
    } else if let Some(pos) = time_text.rfind(['+', '-']) {
        let zone = &time_text[pos..];
        (&time_text[..pos], Some(parse_offset(zone).ok_or_else(bad)?))
    } else {
        (time_text, None)
    };
    if offset.is_none() && kind != DateKind::SearchValue {
        return Err(bad());
    }
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (clock, None),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    let minutes_only = parts.len() == 2;
    if !(parts.len() == 3 || (minutes_only && kind == DateKind::SearchValue)) {
        return Err(bad());
    }
    if parts.iter().any(|p| p.len() != 2 || !is_digits(p)) {
        return Err(bad());
    }
    let hour: u8 = parts[0].parse().map_err(|_| bad())?;
    let minute: u8 = parts[1].parse().map_err(|_| bad())?;
    let second: u8 = parts
        .get(2)
        .map_or(Ok(0), |s| s.parse())
        .map_err(|_| bad())?;
    let (nanos, precision) = match fraction {
        Some(f) if !f.is_empty() && is_digits(f) && !minutes_only => {
            let mut digits = f.chars().take(9).collect::<String>();
            while digits.len() < 9 {
                digits.push('0');
            }
            (
                digits.parse::<u32>().map_err(|_| bad())?,
                Precision::Millisecond,
            )
        }
        Some(_) => return Err(bad()),
        None if minutes_only => (0, Precision::Minute),
        None => (0, Precision::Second),
    };
    let clock = Time::from_hms_nano(hour, minute, second, nanos).map_err(|_| bad())?;
    // A zone can carry a value across a year boundary (`9999-12-31T23:59:59-01:00` is in the
    // year 10000 in UTC), so the conversion is checked, never assumed.
    let start = PrimitiveDateTime::new(date, clock)
        .assume_offset(offset.unwrap_or(UtcOffset::UTC))
        .checked_to_offset(UtcOffset::UTC)
        .filter(|at| in_key_range(*at))
        .ok_or_else(|| out_of_range(text))?;
    // Truncate to milliseconds: that is the precision of the stored keys.
    let start = start
        .replace_nanosecond(start.millisecond() as u32 * 1_000_000)
        .map_err(|_| bad())?;
    Ok(DateRange {
        start,
        end: advance(start, precision),
    })
}

/// Whether an instant has a key: years 0000 to 9999 in UTC, the range FHIR's lexical forms
/// can express and the fixed-width keys sort correctly.
fn in_key_range(at: OffsetDateTime) -> bool {
    (0..=9999).contains(&at.to_offset(UtcOffset::UTC).year())
}

fn out_of_range(text: &str) -> String {
    format!("'{text}' lies outside the years 0000 to 9999 once converted to UTC")
}

/// The last instant that has a key, where ranges that would run past the year 9999 end.
fn last_instant() -> OffsetDateTime {
    PrimitiveDateTime::new(
        Date::from_calendar_date(9999, Month::December, 31).unwrap_or(Date::MAX),
        Time::from_hms_milli(23, 59, 59, 999).unwrap_or(Time::MIDNIGHT),
    )
    .assume_utc()
}

fn kind_name(kind: DateKind) -> &'static str {
    match kind {
        DateKind::Date => "date (YYYY, YYYY-MM or YYYY-MM-DD)",
        DateKind::DateTime => "dateTime (a date, or YYYY-MM-DDThh:mm:ss with a time zone)",
        DateKind::Instant => "instant (YYYY-MM-DDThh:mm:ss[.sss] with a time zone)",
        DateKind::SearchValue => "date search value",
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_offset(zone: &str) -> Option<UtcOffset> {
    let sign: i8 = if zone.starts_with('-') { -1 } else { 1 };
    let (h, m) = zone[1..].split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !is_digits(h) || !is_digits(m) {
        return None;
    }
    let hours: i8 = h.parse().ok()?;
    let minutes: i8 = m.parse().ok()?;
    if hours > 14 || minutes > 59 {
        return None;
    }
    UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()
}

/// The end of the range that starts at `start` with the given precision; a range that would
/// end after the year 9999 ends at its last millisecond instead.
fn advance(start: OffsetDateTime, precision: Precision) -> OffsetDateTime {
    let end = match precision {
        Precision::Year => start.replace_year(start.year() + 1).ok(),
        Precision::Month => {
            let (year, month) = if start.month() == Month::December {
                (start.year() + 1, Month::January)
            } else {
                (start.year(), start.month().next())
            };
            start
                .replace_year(year)
                .ok()
                .and_then(|s| s.replace_month(month).ok())
        }
        Precision::Day => start.checked_add(Duration::days(1)),
        Precision::Minute => start.checked_add(Duration::minutes(1)),
        Precision::Second => start.checked_add(Duration::seconds(1)),
        Precision::Millisecond => start.checked_add(Duration::milliseconds(1)),
    };
    end.filter(|end| in_key_range(*end))
        .unwrap_or_else(last_instant)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key written by hand is the one `format!` writes, for every field at its widest and
    /// narrowest, and a year before 0 is written by `format!` itself.
    #[test]
    fn keys_are_written_as_format_writes_them() {
        let instants = [
            "2026-12-08T00:35:07.123Z",
            "0000-01-01T00:00:00Z",
            "0999-09-09T09:09:09.009+14:00",
            "9999-12-31T23:59:59.999Z",
            "2024-02-29T12:00:00.5-05:30",
            "1970-01-01T00:00:00.000001Z",
        ];
        for text in instants {
            let at = parse_instant(text).unwrap();
            let utc = at.checked_to_offset(UtcOffset::UTC).unwrap_or(at);
            assert_eq!(to_key(at), format_key(utc), "{text}");
        }
        let before = time::macros::datetime!(-0001-06-01 0:00 UTC);
        assert_eq!(to_key(before), format_key(before));
    }

    fn keys(text: &str, kind: DateKind) -> (String, String) {
        let r = parse_range(text, kind).unwrap();
        (r.start_key(), r.end_key())
    }

    #[test]
    fn dates_widen_to_their_precision() {
        let cases = [
            (
                "2024",
                "2024-01-01T00:00:00.000Z",
                "2025-01-01T00:00:00.000Z",
            ),
            (
                "2024-02",
                "2024-02-01T00:00:00.000Z",
                "2024-03-01T00:00:00.000Z",
            ),
            (
                "2024-12",
                "2024-12-01T00:00:00.000Z",
                "2025-01-01T00:00:00.000Z",
            ),
            (
                "2024-02-29",
                "2024-02-29T00:00:00.000Z",
                "2024-03-01T00:00:00.000Z",
            ),
        ];
        for (text, start, end) in cases {
            assert_eq!(
                keys(text, DateKind::Date),
                (start.into(), end.into()),
                "{text}"
            );
        }
    }

    #[test]
    fn times_are_normalised_to_utc() {
        assert_eq!(
            keys("2024-05-01T10:00:00+02:00", DateKind::DateTime),
            (
                "2024-05-01T08:00:00.000Z".into(),
                "2024-05-01T08:00:01.000Z".into()
            )
        );
        assert_eq!(
            keys("2024-05-01T10:00:00.1234Z", DateKind::Instant),
            (
                "2024-05-01T10:00:00.123Z".into(),
                "2024-05-01T10:00:00.124Z".into()
            )
        );
        assert_eq!(
            keys("2024-05-01T10:00", DateKind::SearchValue),
            (
                "2024-05-01T10:00:00.000Z".into(),
                "2024-05-01T10:01:00.000Z".into()
            )
        );
    }

    #[test]
    fn the_last_representable_values_end_at_the_last_key() {
        for (text, kind) in [
            ("9999", DateKind::Date),
            ("9999-12", DateKind::Date),
            ("9999-12-31", DateKind::Date),
            ("9999-12-31T23:59:59Z", DateKind::DateTime),
            ("9999-12-31T23:59:59.999+00:00", DateKind::Instant),
            ("9999-12-31T23:59", DateKind::SearchValue),
        ] {
            let (_, end) = keys(text, kind);
            assert_eq!(end, MAX_KEY, "{text}");
        }
        assert_eq!(
            keys("0000-01-01T00:00:00Z", DateKind::Instant).0,
            MIN_KEY,
            "the first key"
        );
    }

    #[test]
    fn malformed_values_are_rejected() {
        let bad = [
            ("2024-13", DateKind::Date),
            ("2024-02-30", DateKind::Date),
            ("24-01-01", DateKind::Date),
            ("2024-01-01T10:00:00Z", DateKind::Date),
            ("2024-01-01T10:00:00", DateKind::DateTime),
            ("2024-01-01", DateKind::Instant),
            ("2024-01-01T10:00Z", DateKind::DateTime),
            ("2024-01-01T25:00:00Z", DateKind::DateTime),
            ("2024-01-01T10:00:00+15:00", DateKind::DateTime),
            ("yesterday", DateKind::SearchValue),
            ("", DateKind::SearchValue),
            // Past the year 9999, or before 0000, once converted to UTC.
            ("9999-12-31T23:59:59-01:00", DateKind::DateTime),
            ("9999-12-31T23:30:00-00:30", DateKind::SearchValue),
            ("0000-01-01T00:00:00+01:00", DateKind::Instant),
        ];
        for (text, kind) in bad {
            assert!(parse_range(text, kind).is_err(), "{text} should fail");
        }
    }
}
