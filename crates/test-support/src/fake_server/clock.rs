//! Time, the way the agent-server writes and reads it.
//!
//! Two formats coexist in the real server and both are reproduced byte for byte:
//!
//! * **event timestamps** are *naive local time* (`datetime.now()` without a zone), written
//!   with Python's `isoformat()`: `2026-11-22T14:42:27.674188`, and the fraction is omitted
//!   entirely when the microsecond happens to be 0. The fake's "local zone" is
//!   [`FakeConfig::utc_offset`](super::FakeConfig::utc_offset) (UTC by default) so tests never
//!   depend on the machine's `TZ`.
//! * **`created_at` / `updated_at`** of a conversation are aware UTC datetimes, serialized by
//!   pydantic as `2026-11-25T19:01:18.765350Z` (same fraction rule).
//!
//! Query parameters `timestamp__gte`, `timestamp__lt` and the events socket's `after_timestamp`
//! are parsed like pydantic v2 (speedate) parses a `datetime`, converted to naive local time and
//! then compared **as strings** with the stored timestamps, exactly as the real server does
//! (`event.timestamp < gte.isoformat()`). [`parse_query_datetime`] returns that comparison key.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]` (Python `isoformat()` of a naive datetime).
pub(crate) fn naive_iso(t: PrimitiveDateTime) -> String {
    let us = t.microsecond();
    let mut s = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if us != 0 {
        s.push_str(&format!(".{us:06}"));
    }
    s
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` (pydantic's JSON form of an aware UTC datetime).
pub(crate) fn utc_iso_z(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    let mut s = naive_iso(PrimitiveDateTime::new(t.date(), t.time()));
    s.push('Z');
    s
}

/// Now, truncated to microseconds (Python's resolution).
pub(crate) fn now_utc() -> OffsetDateTime {
    let t = OffsetDateTime::now_utc();
    let us = t.microsecond();
    t.replace_nanosecond(us * 1000).unwrap_or(t)
}

/// Naive local "now" in the given zone, microsecond resolution.
pub(crate) fn now_local(offset: UtcOffset) -> PrimitiveDateTime {
    let t = now_utc().to_offset(offset);
    PrimitiveDateTime::new(t.date(), t.time())
}

/// Parse a timestamp this module wrote (naive ISO), for keeping per-conversation ordering.
pub(crate) fn parse_naive_iso(s: &str) -> Option<PrimitiveDateTime> {
    match parse_datetime(s) {
        Ok(Parsed::Naive(p)) => Some(p),
        _ => None,
    }
}

/// A successfully parsed query datetime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Parsed {
    Naive(PrimitiveDateTime),
    Aware(OffsetDateTime),
}

/// Why a datetime query parameter was refused: pydantic's error `type` and the text after
/// "Input should be a valid datetime[ or date], ".
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DtError {
    pub kind: &'static str,
    pub error: String,
}

impl DtError {
    fn date(e: &str) -> Self {
        DtError {
            kind: "datetime_from_date_parsing",
            error: e.to_owned(),
        }
    }
    fn time(e: &str) -> Self {
        DtError {
            kind: "datetime_parsing",
            error: e.to_owned(),
        }
    }
    /// The `msg` of the 422 item.
    pub fn msg(&self) -> String {
        if self.kind == "datetime_from_date_parsing" {
            format!("Input should be a valid datetime or date, {}", self.error)
        } else {
            format!("Input should be a valid datetime, {}", self.error)
        }
    }
}

/// Parse a query datetime and return the string the real server compares event timestamps
/// with: the value converted to naive local time in `offset`, formatted by `isoformat()`.
pub(crate) fn parse_query_datetime(s: &str, offset: UtcOffset) -> Result<String, DtError> {
    let naive = match parse_datetime(s)? {
        Parsed::Naive(p) => p,
        Parsed::Aware(a) => {
            let l = a.to_offset(offset);
            PrimitiveDateTime::new(l.date(), l.time())
        }
    };
    Ok(naive_iso(naive))
}

fn digits(b: &[u8], what: &str) -> Result<u32, String> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return Err(format!("invalid character in {what}"));
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Ok(v)
}

/// A subset of speedate's datetime grammar, with its error texts for the common mistakes:
/// unix seconds/milliseconds (`1700000000`, `1700000000.5`), `YYYY-MM-DD` (midnight),
/// `YYYY-MM-DD[T| |t|_]HH:MM[:SS[.f{1,}]]` optionally followed by `Z`/`z` or `±HH[:]MM`.
pub(crate) fn parse_datetime(s: &str) -> Result<Parsed, DtError> {
    let b = s.as_bytes();
    // Unix timestamps (pydantic accepts them for datetime fields).
    if !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_digit() || *c == b'.' || *c == b'-')
        && b.iter().filter(|c| **c == b'.').count() <= 1
        && b[1..].iter().all(|c| *c != b'-')
        && s.parse::<f64>().is_ok()
    {
        let mut v: f64 = s.parse().unwrap_or(0.0);
        if v.abs() > 2e10 {
            v /= 1000.0;
        }
        let micros = (v * 1e6).round() as i128;
        let t = OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
            .map_err(|_| DtError::date("input is too long"))?;
        return Ok(Parsed::Aware(t));
    }
    if b.len() < 10 {
        return Err(DtError::date("input is too short"));
    }
    let year = digits(&b[0..4], "year").map_err(|e| DtError::date(&e))?;
    if b[4] != b'-' || b[7] != b'-' {
        return Err(DtError::date("invalid date separator, expected `-`"));
    }
    let month = digits(&b[5..7], "month").map_err(|e| DtError::date(&e))?;
    let day = digits(&b[8..10], "day").map_err(|e| DtError::date(&e))?;
    let month = u8::try_from(month)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or_else(|| DtError::date("month value is outside expected range of 1-12"))?;
    let date = Date::from_calendar_date(year as i32, month, day as u8)
        .map_err(|_| DtError::date("day value is outside expected range"))?;
    if b.len() == 10 {
        return Ok(Parsed::Naive(PrimitiveDateTime::new(date, Time::MIDNIGHT)));
    }
    if !matches!(b[10], b'T' | b't' | b' ' | b'_') {
        return Err(DtError::date(
            "invalid datetime separator, expected `T`, `t`, `_` or space",
        ));
    }
    let rest = &b[11..];
    if rest.len() < 5 {
        return Err(DtError::time("input is too short"));
    }
    let hour = digits(&rest[0..2], "hour").map_err(|e| DtError::time(&e))?;
    if rest[2] != b':' {
        return Err(DtError::time("invalid time separator, expected `:`"));
    }
    let minute = digits(&rest[3..5], "minute").map_err(|e| DtError::time(&e))?;
    let mut i = 5;
    let mut second = 0u32;
    let mut micro = 0u32;
    if rest.len() > i && rest[i] == b':' {
        if rest.len() < i + 3 {
            return Err(DtError::time("input is too short"));
        }
        second = digits(&rest[i + 1..i + 3], "second").map_err(|e| DtError::time(&e))?;
        i += 3;
        if rest.len() > i && (rest[i] == b'.' || rest[i] == b',') {
            i += 1;
            let start = i;
            while i < rest.len() && rest[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(DtError::time("second fraction value is missing"));
            }
            let frac = &rest[start..i];
            let mut us = 0u32;
            for k in 0..6 {
                us = us * 10 + frac.get(k).map(|c| u32::from(c - b'0')).unwrap_or(0);
            }
            micro = us;
        }
    }
    if hour > 23 {
        return Err(DtError::time(
            "hour value is outside expected range of 0-23",
        ));
    }
    if minute > 59 {
        return Err(DtError::time(
            "minute value is outside expected range of 0-59",
        ));
    }
    if second > 59 {
        return Err(DtError::time(
            "second value is outside expected range of 0-59",
        ));
    }
    let time = Time::from_hms_micro(hour as u8, minute as u8, second as u8, micro)
        .map_err(|_| DtError::time("invalid time"))?;
    let naive = PrimitiveDateTime::new(date, time);
    let tz = &rest[i..];
    if tz.is_empty() {
        return Ok(Parsed::Naive(naive));
    }
    if tz == b"Z" || tz == b"z" {
        return Ok(Parsed::Aware(naive.assume_utc()));
    }
    let sign: i32 = match tz[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return Err(DtError::time("invalid timezone sign")),
    };
    let tzd = &tz[1..];
    let (h, m) = match tzd.len() {
        2 => (digits(tzd, "timezone").map_err(|e| DtError::time(&e))?, 0),
        4 => (
            digits(&tzd[0..2], "timezone").map_err(|e| DtError::time(&e))?,
            digits(&tzd[2..4], "timezone").map_err(|e| DtError::time(&e))?,
        ),
        5 if tzd[2] == b':' => (
            digits(&tzd[0..2], "timezone").map_err(|e| DtError::time(&e))?,
            digits(&tzd[3..5], "timezone").map_err(|e| DtError::time(&e))?,
        ),
        _ => {
            return Err(DtError::time(
                "unexpected extra characters at the end of the input",
            ))
        }
    };
    if h > 23 || m > 59 {
        return Err(DtError::time("timezone offset must be less than 24 hours"));
    }
    let secs = sign * (h as i32 * 3600 + m as i32 * 60);
    let off = UtcOffset::from_whole_seconds(secs)
        .map_err(|_| DtError::time("timezone offset must be less than 24 hours"))?;
    Ok(Parsed::Aware(naive.assume_offset(off)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn python_isoformat_rules() {
        assert_eq!(
            naive_iso(datetime!(2026-11-22 14:42:27.674188)),
            "2026-11-22T14:42:27.674188"
        );
        assert_eq!(
            naive_iso(datetime!(2026-11-22 14:42:27)),
            "2026-11-22T14:42:27"
        );
        assert_eq!(
            naive_iso(datetime!(2026-11-22 14:42:27.000100)),
            "2026-11-22T14:42:27.000100"
        );
        assert_eq!(
            utc_iso_z(datetime!(2026-11-25 19:01:18.765350 UTC)),
            "2026-11-25T19:01:18.765350Z"
        );
    }

    #[test]
    fn query_datetimes_like_the_real_server() {
        let utc = UtcOffset::UTC;
        // Values and outcomes observed against agent-server 1.58.2 (server in UTC).
        assert_eq!(
            parse_query_datetime("2026-11-25", utc).unwrap(),
            "2026-11-25T00:00:00"
        );
        assert_eq!(
            parse_query_datetime("2026-11-25T19:02:08.501523Z", utc).unwrap(),
            "2026-11-25T19:02:08.501523"
        );
        assert_eq!(
            parse_query_datetime("2026-11-25T20:02:08.501523+01:00", utc).unwrap(),
            "2026-11-25T19:02:08.501523"
        );
        assert_eq!(
            parse_query_datetime("1700000000", utc).unwrap(),
            "2023-11-14T22:13:20"
        );
        let e = parse_query_datetime("yesterday", utc).unwrap_err();
        assert_eq!(
            (e.kind, e.msg().as_str()),
            (
                "datetime_from_date_parsing",
                "Input should be a valid datetime or date, input is too short"
            )
        );
        let e = parse_query_datetime("2026-13-01", utc).unwrap_err();
        assert_eq!(e.msg(), "Input should be a valid datetime or date, month value is outside expected range of 1-12");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = parse_query_datetime(&s, UtcOffset::UTC);
        }

        #[test]
        fn written_timestamps_parse_back_and_sort_like_time(a in 0i64..4_000_000_000, b in 0i64..4_000_000_000, ua in 0u32..1_000_000, ub in 0u32..1_000_000) {
            let ta = OffsetDateTime::from_unix_timestamp(a).unwrap().replace_microsecond(ua).unwrap();
            let tb = OffsetDateTime::from_unix_timestamp(b).unwrap().replace_microsecond(ub).unwrap();
            let (pa, pb) = (PrimitiveDateTime::new(ta.date(), ta.time()), PrimitiveDateTime::new(tb.date(), tb.time()));
            let (sa, sb) = (naive_iso(pa), naive_iso(pb));
            prop_assert_eq!(parse_naive_iso(&sa), Some(pa));
            // String order is time order except across the omitted-zero-fraction edge, which
            // the real server has too; with both fractions present it must agree.
            if ua != 0 && ub != 0 {
                prop_assert_eq!(sa.cmp(&sb), pa.cmp(&pb));
            }
        }
    }
}
