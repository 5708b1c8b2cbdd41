//! RFC 3339 date-times (a Quarantine's `expiresAt`), without a date-time dependency.

use std::time::SystemTime;

/// An RFC 3339 date-time (`2026-12-01T00:00:00Z`, `2026-12-01t01:30:00.5+01:30`).
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Result<i64, String> {
        let part = s
            .get(from..from + len)
            .filter(|p| p.bytes().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| format!("expected {len} digits at position {}", from + 1))?;
        part.parse::<i64>().map_err(|e| e.to_string())
    };
    let sep = |at: usize, want: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if want.contains(c) => Ok(()),
            _ => Err(format!(
                "expected {:?} at position {}",
                want.iter().map(|c| *c as char).collect::<String>(),
                at + 1
            )),
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let mut at = 19;
    let mut nanos: u32 = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(|c| c.is_ascii_digit()) {
            at += 1;
        }
        if at == start {
            return Err("expected digits after the decimal point".into());
        }
        let digits = &s[start..at.min(start + 9)];
        let scale = 10u32.pow(9 - digits.len() as u32);
        nanos = digits.parse::<u32>().map_err(|e| e.to_string())? * scale;
    }
    let offset = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(c @ (b'+' | b'-')) if at + 6 == b.len() => {
            let sign = if *c == b'+' { 1 } else { -1 };
            let h = num(at + 1, 2)?;
            sep(at + 3, b":")?;
            let m = num(at + 4, 2)?;
            if h > 23 || m > 59 {
                return Err("the offset is out of range".into());
            }
            sign * (h * 3600 + m * 60)
        }
        _ => return Err("expected Z or an offset like +01:00 at the end".into()),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(format!("month {month} does not exist")),
    };
    if !(1..=days_in_month).contains(&day) {
        return Err(format!("day {day} does not exist in month {month}"));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("the time of day is out of range".into());
    }
    // Days since 1970-01-01 (proleptic Gregorian calendar; H. Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset;
    let since = |secs: i64| std::time::Duration::new(secs.unsigned_abs(), 0);
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(since(secs))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(since(secs))
    };
    t.and_then(|t| t.checked_add(std::time::Duration::from_nanos(nanos as u64)))
        .ok_or_else(|| "the time is out of range".into())
}
