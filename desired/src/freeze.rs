//! Freeze windows (`freeze:` in `environments/<env>.yaml`): times when no new rollout of the
//! environment starts. A window is absolute (`from`/`to`, RFC 3339 with an offset) or
//! recurring (a five-field cron expression that opens it, a `duration`, and the `timezone`
//! the expression is read in, UTC by default).
//!
//! Everything here is pure: [`frozen_until`] answers for an instant, so the coordinator can
//! ask at every decision and a test can ask for any date.

use std::fmt;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::spec::Dur;
use crate::spec::leaf::parse_leaf;

/// The longest recurring window (`duration`): a month.
pub const MAX_DURATION_S: u64 = 31 * 86_400;

/// The longest cron expression read.
const MAX_CRON_LEN: usize = 256;

/// An instant written in RFC 3339 with its offset (`2026-12-24T00:00:00Z`,
/// `2026-12-24T00:00:00+01:00`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(pub Timestamp);

impl Stamp {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Stamp, String> {
        if s.len() > 64 {
            return Err("a time is at most 64 characters".into());
        }
        s.trim().parse::<Timestamp>().map(Stamp).map_err(|_| {
            format!(
                "invalid time `{s}`: write it in RFC 3339 with an offset, e.g. 2026-12-24T00:00:00Z or 2026-12-24T00:00:00+01:00"
            )
        })
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A time zone by its IANA name (`Europe/Berlin`, `UTC`), from the tz database drover
/// carries (so every host and the coordinator read a window the same way).
#[derive(Clone, Debug)]
pub struct Zone {
    name: String,
    tz: TimeZone,
}

impl Zone {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Zone, String> {
        if s.len() > 64 {
            return Err("a time zone name is at most 64 characters".into());
        }
        let tz = TimeZone::get(s).map_err(|_| {
            format!("unknown time zone `{s}`: give an IANA name, e.g. UTC, Europe/Berlin, America/New_York")
        })?;
        Ok(Zone {
            name: s.to_string(),
            tz,
        })
    }

    /// UTC.
    pub fn utc() -> Zone {
        Zone {
            name: "UTC".into(),
            tz: TimeZone::UTC,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A five-field cron expression (minute, hour, day of month, month, day of week), as cron(5)
/// reads it: `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, month and day
/// names (`JAN`, `FRI`; day 0 and 7 are Sunday). When both day fields are restricted, a day
/// matching either matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    any_day: bool,
    any_weekday: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl Cron {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Cron, String> {
        if s.len() > MAX_CRON_LEN {
            return Err(format!(
                "a cron expression is at most {MAX_CRON_LEN} characters"
            ));
        }
        let fields: Vec<&str> = s.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "cron `{s}` has {} field(s): give five (minute hour day-of-month month day-of-week), e.g. \"0 18 * * FRI\"",
                fields.len()
            ));
        }
        let minutes = field(fields[0], "minute", 0, 59, &[])?;
        let hours = field(fields[1], "hour", 0, 23, &[])? as u32;
        let days = field(fields[2], "day of month", 1, 31, &[])? as u32;
        let months = field(fields[3], "month", 1, 12, &MONTHS)? as u16;
        let mut weekdays = field(fields[4], "day of week", 0, 7, &WEEKDAYS)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7); // 7 is Sunday too.
        }
        Ok(Cron {
            text: fields.join(" "),
            minutes,
            hours,
            days,
            months,
            weekdays: weekdays as u8,
            any_day: fields[2].starts_with('*'),
            any_weekday: fields[4].starts_with('*'),
        })
    }

    /// The expression, as written (single spaces).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it fires on `d` (at some hour and minute).
    fn on(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => dow,
            (false, true) => dom,
            (false, false) => dom || dow,
        }
    }

    /// The last time it fired at or before `now`, read in `tz`, looking back at most `days`
    /// days.
    fn last_fire(&self, now: Timestamp, tz: &TimeZone, days: i64) -> Option<Timestamp> {
        let local = now.to_zoned(tz.clone());
        // A candidate later than this (local) cannot be at or before `now`, whatever the
        // offset changes of the day (at most a few hours).
        let horizon = local.datetime().checked_add(3.hours()).ok()?;
        let mut best: Option<Timestamp> = None;
        for back in 0..=days {
            let d = local.date().checked_sub(back.days()).ok()?;
            if !self.on(d) {
                continue;
            }
            for h in (0..24i8).rev().filter(|h| self.hours & (1 << h) != 0) {
                for m in (0..60i8).rev().filter(|m| self.minutes & (1 << m) != 0) {
                    let at: DateTime = d.at(h, m, 0, 0);
                    if at > horizon {
                        continue;
                    }
                    // A time in a gap of the zone (spring forward) opens at the same wall
                    // clock distance after it; in a fold, at its first occurrence.
                    let Ok(z) = at.to_zoned(tz.clone()) else {
                        continue;
                    };
                    let t = z.timestamp();
                    if t <= now && best.is_none_or(|b| t > b) {
                        best = Some(t);
                    }
                }
            }
            if best.is_some() {
                // Every candidate of an earlier day is earlier still.
                return best;
            }
        }
        best
    }
}

/// One field of a cron expression as a bit set of the values it allows.
fn field(s: &str, what: &str, min: u8, max: u8, names: &[&str]) -> Result<u64, String> {
    let value = |v: &str| -> Result<u8, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
            // Months count from 1, weekdays from 0 (Sunday).
            return Ok(i as u8 + min);
        }
        let n: u8 = v
            .parse()
            .map_err(|_| format!("cron {what} `{s}`: `{v}` is not a number from {min} to {max}"))?;
        if n < min || n > max {
            return Err(format!(
                "cron {what} `{s}`: {n} is out of range ({min} to {max})"
            ));
        }
        Ok(n)
    };
    let mut set = 0u64;
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => {
                let st: u8 = st
                    .parse()
                    .map_err(|_| format!("cron {what} `{s}`: step `{st}` is not a number"))?;
                if st == 0 {
                    return Err(format!("cron {what} `{s}`: a step of 0"));
                }
                (r, Some(st))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!("cron {what} `{s}`: range {a}-{b} runs backwards"));
            }
            (a, b)
        } else {
            let a = value(range)?;
            // `5/15` means from 5 to the end, every 15.
            (a, if step.is_some() { max } else { a })
        };
        let step = step.unwrap_or(1) as usize;
        for v in (lo..=hi).step_by(step) {
            set |= 1 << v;
        }
    }
    Ok(set)
}

macro_rules! text_leaf {
    ($t:ty, $show:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // An invalid value is reported; the placeholder never reaches a decision.
                parse_leaf(d, |s, _| <$t>::parse(s), |_| <$t>::placeholder())
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let show: fn(&$t) -> String = $show;
                s.serialize_str(&show(self))
            }
        }
    };
}

impl Stamp {
    fn placeholder() -> Stamp {
        Stamp(Timestamp::UNIX_EPOCH)
    }
}
impl Zone {
    fn placeholder() -> Zone {
        Zone::utc()
    }
}
impl Cron {
    fn placeholder() -> Cron {
        Cron::parse("0 0 1 1 *").expect("valid")
    }
}

text_leaf!(Stamp, |s| s.to_string());
text_leaf!(Zone, |z| z.name.clone());
text_leaf!(Cron, |c| c.text.clone());

/// A freeze window, as the coordinator keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Window {
    /// From `from` (included) to `to` (excluded).
    Between {
        /// Start.
        from: Stamp,
        /// End.
        to: Stamp,
    },
    /// Opened by `cron` (read in `timezone`), for `duration`.
    Recurring {
        /// When it opens.
        cron: Cron,
        /// How long it stays open.
        duration: Dur,
        /// The zone `cron` is read in.
        timezone: Zone,
    },
}

impl Window {
    /// When this window, open at `now`, closes; `None` when it is not open.
    pub fn open_until(&self, now: Timestamp) -> Option<Timestamp> {
        match self {
            Window::Between { from, to } => (from.0 <= now && now < to.0).then_some(to.0),
            Window::Recurring {
                cron,
                duration,
                timezone,
            } => {
                let secs = duration.0.as_secs().min(MAX_DURATION_S);
                let days = (secs / 86_400) as i64 + 1;
                let start = cron.last_fire(now, &timezone.tz, days)?;
                let end = start.checked_add((secs as i64).seconds()).ok()?;
                (now < end).then_some(end)
            }
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Between { from, to } => write!(f, "{from} to {to}"),
            Window::Recurring {
                cron,
                duration,
                timezone,
            } => write!(f, "\"{}\" for {duration} ({timezone})", cron.as_str()),
        }
    }
}

/// Whether `windows` freeze the environment at `now_ms` (milliseconds since the epoch): the
/// latest end among the windows open then, and the first of them (for the message).
pub fn frozen_until(windows: &[Window], now_ms: u64) -> Option<(u64, &Window)> {
    let now = Timestamp::from_millisecond(i64::try_from(now_ms).ok()?).ok()?;
    let mut out: Option<(u64, &Window)> = None;
    for w in windows {
        if let Some(end) = w.open_until(now) {
            let end = u64::try_from(end.as_millisecond()).unwrap_or(0);
            match &mut out {
                Some((until, _)) => *until = (*until).max(end),
                None => out = Some((end, w)),
            }
        }
    }
    out
}

/// A time in milliseconds since the epoch as RFC 3339 UTC (`2026-12-27T00:00:00Z`).
pub fn show_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn recurring(cron: &str, dur: &str, tz: &str) -> Window {
        Window::Recurring {
            cron: Cron::parse(cron).unwrap(),
            duration: Dur::parse(dur).unwrap(),
            timezone: Zone::parse(tz).unwrap(),
        }
    }

    #[test]
    fn cron_fields_read_as_cron_reads_them() {
        let c = Cron::parse("*/15 9-17 * JAN-mar mon-FRI").unwrap();
        assert_eq!(c.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(c.hours, (9..=17).map(|h| 1u32 << h).sum::<u32>());
        assert_eq!(c.months, 0b1110);
        assert_eq!(c.weekdays, 0b0111110);
        let sunday = Cron::parse("0 0 * * 7").unwrap();
        assert_eq!(sunday.weekdays, 1);
        assert_eq!(
            Cron::parse("5/20 0 1,15 * *").unwrap().minutes,
            1 << 5 | 1 << 25 | 1 << 45
        );
        assert_eq!(
            Cron::parse("0  18 * *   FRI").unwrap().as_str(),
            "0 18 * * FRI"
        );
    }

    #[test]
    fn bad_cron_says_what_and_where() {
        for (bad, says) in [
            ("0 18 * *", "has 4 field(s)"),
            ("60 * * * *", "minute `60`: 60 is out of range (0 to 59)"),
            ("* 24 * * *", "hour `24`"),
            ("* * 0 * *", "day of month `0`"),
            ("* * * 13 *", "month `13`"),
            ("* * * * 8", "day of week `8`"),
            ("* * * * FRY", "`FRY` is not a number"),
            ("*/0 * * * *", "a step of 0"),
            ("5-1 * * * *", "runs backwards"),
            ("a b c d e", "is not a number"),
            ("0 0 * * 1-", "is not a number"),
        ] {
            let e = Cron::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(Cron::parse(&"1,".repeat(200)).is_err());
    }

    #[test]
    fn both_day_fields_restricted_match_either() {
        let c = Cron::parse("0 0 13 * FRI").unwrap();
        // 2026-11-13 is a Friday; 2026-11-20 a Friday; 2026-12-13 a Sunday.
        for d in ["2026-11-13", "2026-11-20", "2026-12-13"] {
            assert!(c.on(d.parse().unwrap()), "{d}");
        }
        assert!(!c.on("2026-11-19".parse().unwrap()));
    }

    #[test]
    fn an_absolute_window_holds_from_its_start_to_its_end() {
        let w = Window::Between {
            from: Stamp::parse("2026-12-24T00:00:00Z").unwrap(),
            to: Stamp::parse("2026-12-27T00:00:00+01:00").unwrap(),
        };
        assert_eq!(w.open_until(at("2026-12-23T23:59:59Z")), None);
        assert_eq!(
            w.open_until(at("2026-12-24T00:00:00Z")),
            Some(at("2026-12-26T23:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-12-26T23:00:00Z")), None);
    }

    #[test]
    fn a_weekend_freeze_in_berlin_follows_the_local_clock() {
        // Friday 18:00 in Berlin for 62h: until Monday 08:00 there.
        let w = recurring("0 18 * * FRI", "62h", "Europe/Berlin");
        // Friday 2026-12-04, 17:59 Berlin = 16:59Z: not yet.
        assert_eq!(w.open_until(at("2026-12-04T16:59:00Z")), None);
        assert_eq!(
            w.open_until(at("2026-12-04T17:00:00Z")),
            Some(at("2026-12-07T07:00:00Z"))
        );
        assert_eq!(
            w.open_until(at("2026-12-06T12:00:00Z")),
            Some(at("2026-12-07T07:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-12-07T07:00:00Z")), None);
        assert_eq!(w.open_until(at("2026-12-09T12:00:00Z")), None);
        // In summer Berlin is UTC+2: Friday 2026-07-03 18:00 local is 16:00Z.
        assert_eq!(
            w.open_until(at("2026-07-03T16:30:00Z")),
            Some(at("2026-07-06T06:00:00Z"))
        );
        // Over the change to summer time (Sunday 2026-03-29 02:00 → 03:00), 62h from Friday
        // 18:00 (UTC+1, 17:00Z) end at 07:00Z, 09:00 local.
        assert_eq!(
            w.open_until(at("2026-03-29T12:00:00Z")),
            Some(at("2026-03-30T07:00:00Z"))
        );
    }

    #[test]
    fn overlapping_fires_keep_the_latest_end() {
        // Every hour for 90 minutes: always open, until 90 minutes after the last fire.
        let w = recurring("0 * * * *", "90m", "UTC");
        assert_eq!(
            w.open_until(at("2026-12-03T10:10:00Z")),
            Some(at("2026-12-03T11:30:00Z"))
        );
        // A long window that opened days ago.
        let w = recurring("0 0 1 * *", "20d", "UTC");
        assert_eq!(
            w.open_until(at("2026-12-19T00:00:00Z")),
            Some(at("2026-12-21T00:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-12-22T00:00:00Z")), None);
    }

    #[test]
    fn frozen_until_takes_the_latest_end_of_the_open_windows() {
        let ws = vec![
            Window::Between {
                from: Stamp::parse("2026-12-24T00:00:00Z").unwrap(),
                to: Stamp::parse("2026-12-27T00:00:00Z").unwrap(),
            },
            recurring("0 18 * * FRI", "62h", "UTC"),
        ];
        // 2026-12-25 is a Friday: the weekend window ends 2026-12-28T08:00Z.
        let now = at("2026-12-26T00:00:00Z").as_millisecond() as u64;
        let (until, _) = frozen_until(&ws, now).unwrap();
        assert_eq!(show_ms(until), "2026-12-28T08:00:00Z");
        let now = at("2026-12-24T01:00:00Z").as_millisecond() as u64;
        assert_eq!(
            show_ms(frozen_until(&ws, now).unwrap().0),
            "2026-12-27T00:00:00Z"
        );
        assert!(frozen_until(&ws, at("2026-12-29T00:00:00Z").as_millisecond() as u64).is_none());
    }

    #[test]
    fn windows_survive_the_store() {
        let ws = vec![
            Window::Between {
                from: Stamp::parse("2026-12-24T00:00:00Z").unwrap(),
                to: Stamp::parse("2026-12-27T00:00:00Z").unwrap(),
            },
            recurring("0 18 * * FRI", "62h", "Europe/Berlin"),
        ];
        let json = serde_json::to_string(&ws).unwrap();
        assert_eq!(
            json,
            r#"[{"from":"2026-12-24T00:00:00Z","to":"2026-12-27T00:00:00Z"},{"cron":"0 18 * * FRI","duration":"62h","timezone":"Europe/Berlin"}]"#
        );
        let back: Vec<Window> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ws);
    }

    #[test]
    fn bad_times_and_zones_say_how_to_write_them() {
        assert!(
            Stamp::parse("2026-12-24 00:00")
                .unwrap_err()
                .contains("RFC 3339 with an offset")
        );
        assert!(Stamp::parse("2026-12-24T00:00:00").is_err(), "no offset");
        assert!(
            Zone::parse("Mars/Olympus")
                .unwrap_err()
                .contains("IANA name")
        );
        assert!(Zone::parse("Europe/Berlin").is_ok());
    }
}
