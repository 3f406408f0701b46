//! Validated leaf values of drover's YAML files: names, versions, digests, durations, paths.
//!
//! Each type parses from a YAML string. A bad value is reported with its position (see
//! [`crate::yaml::report`]) and replaced by an inert placeholder so the rest of the file is
//! still checked; the file as a whole is then rejected.

use std::fmt;
use std::path::{Component, Path};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::yaml::{self, Mark, Spanned};

/// Reads a string and parses it with `parse`; on failure reports the problem and returns
/// `invalid` (or fails when not reading drover YAML).
pub(crate) fn parse_leaf<'de, D, T>(
    d: D,
    parse: impl FnOnce(&str, &Mark) -> Result<T, String>,
    invalid: impl FnOnce(String) -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    if !yaml::is_collecting() {
        // Another format (a JSON state file): the value was validated when it was written.
        let s = String::deserialize(d)?;
        return parse(&s, &Mark::file_start("")).map_err(de::Error::custom);
    }
    let s = Spanned::<String>::deserialize(d)?;
    match parse(&s.value, &s.mark) {
        Ok(v) => Ok(v),
        Err(msg) => {
            if yaml::report(&s.mark, msg.clone()) {
                Ok(invalid(s.value))
            } else {
                Err(de::Error::custom(msg))
            }
        }
    }
}

macro_rules! string_leaf {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates `s`.
            pub fn parse(s: &str) -> Result<$name, String> {
                $check(s).map(|()| $name(s.to_string()))
            }
            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                parse_leaf(d, |s, _| $name::parse(s), $name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

string_leaf!(
    /// A service or environment name: lowercase letters, digits, `-` and `_`, starting with a
    /// letter or digit, at most 63 characters.
    Name,
    check_name
);

string_leaf!(
    /// A version: letters, digits and `.`, `_`, `+`, `-`, starting with a letter or digit, at
    /// most 128 characters. It names a release directory, so it can never contain `/`.
    Version,
    check_version
);

string_leaf!(
    /// A user or group on the host: a POSIX account name (`[a-z_][a-z0-9_-]*`, at most 32
    /// characters) or a numeric id.
    Account,
    check_account
);

string_leaf!(
    /// A regular expression (Rust `regex` syntax: linear time, no look-around), at most
    /// 1,000 characters, that compiles within a bounded size.
    Pattern,
    check_pattern
);

impl Pattern {
    /// The compiled expression (it compiled when parsed).
    pub fn regex(&self) -> regex::Regex {
        compile(&self.0).expect("validated when parsed")
    }
}

/// Largest compiled pattern, so a hostile one cannot take the host's memory.
const PATTERN_SIZE: usize = 1 << 20;

fn compile(s: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(s)
        .size_limit(PATTERN_SIZE)
        .dfa_size_limit(PATTERN_SIZE)
        .nest_limit(64)
        .build()
}

fn check_pattern(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 1000 {
        return Err("a pattern must have 1 to 1,000 characters".into());
    }
    match compile(s) {
        Ok(r) if r.is_match("") => Err(format!(
            "pattern `{s}` matches the empty string, so it would redact nothing useful; make it match something"
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("invalid pattern `{s}`: {e}")),
    }
}

fn check_account(s: &str) -> Result<(), String> {
    let numeric = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let named = !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if numeric || named {
        Ok(())
    } else {
        Err(format!(
            "invalid user or group `{s}`: use an account name (lowercase letters, digits, `-`, `_`, at most 32) or a numeric id"
        ))
    }
}

fn check_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name `{s}`: use lowercase letters, digits, `-` and `_` (at most 63, starting with a letter or digit)"
        ))
    }
}

fn check_version(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid version `{s}`: use letters, digits, `.`, `_`, `+` and `-`, starting with a letter or digit (e.g. 1.4.2)"
        ))
    }
}

/// A SHA-256 digest, as 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Digest(String);

impl Digest {
    /// Parses 64 hex digits (any case; an optional `sha256:` prefix is accepted).
    pub fn parse(s: &str) -> Result<Digest, String> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Digest(hex.to_ascii_lowercase()))
        } else {
            Err(format!(
                "invalid sha256 `{s}`: expected 64 hex digits (as printed by `sha256sum FILE`)"
            ))
        }
    }

    /// The hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for names and messages.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// Parses a digest read from drover YAML (reporting problems there).
    pub fn deserialize_yaml<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        parse_leaf(d, |s, _| Digest::parse(s), Digest)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `1h30m` or `2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses a duration: one or more `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
    pub fn parse(s: &str) -> Result<Dur, String> {
        let bad = || {
            format!("invalid duration `{s}`: write a number and a unit, e.g. 500ms, 30s, 5m, 1h30m")
        };
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "d" => Duration::from_secs(n.saturating_mul(86400)),
                _ => return Err(bad()),
            };
            total = total.saturating_add(unit);
            rest = &rest[unit_len..];
        }
        Ok(Dur(total))
    }

    /// A duration of `secs` seconds.
    pub const fn secs(secs: u64) -> Dur {
        Dur(Duration::from_secs(secs))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            f.write_str("0s")
        } else if ms % 1000 != 0 {
            write!(f, "{ms}ms")
        } else if ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // An invalid value becomes the longest duration, so it sets off no follow-on "too short".
        parse_leaf(d, |s, _| Dur::parse(s), |_| Dur(Duration::MAX))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A relative path that stays inside its base directory: no `..`, not absolute, not empty.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RelPath(String);

impl RelPath {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<RelPath, String> {
        let p = Path::new(s);
        if s.is_empty() {
            return Err("empty path".into());
        }
        if p.is_absolute() {
            return Err(format!(
                "`{s}` is absolute: give a path relative to the release directory"
            ));
        }
        if p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!("`{s}` leaves its directory (`..` is not allowed)"));
        }
        Ok(RelPath(s.trim_end_matches('/').to_string()))
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// Parses a path read from drover YAML (reporting problems there).
    pub fn deserialize_yaml<'de, D: Deserializer<'de>>(d: D) -> Result<RelPath, D::Error> {
        parse_leaf(d, |s, _| RelPath::parse(s), RelPath)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A byte size written as `512`, `10KiB`, `200MiB`, `2GiB` (or `k`, `M`, `G` decimal units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a size.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size `{s}`: write e.g. 500MiB or 2GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "k" | "kB" | "K" | "KB" => 1000,
            "KiB" => 1 << 10,
            "M" | "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "G" | "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "T" | "TB" => 1_000_000_000_000,
            "TiB" => 1 << 40,
            _ => return Err(format!("invalid size `{s}`: write e.g. 500MiB or 2GiB")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n >= 1 << shift && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_leaf(d, |s, _| ByteSize::parse(s), |_| ByteSize(0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("30s").unwrap().0, Duration::from_secs(30));
        assert_eq!(Dur::parse("500ms").unwrap().0, Duration::from_millis(500));
        assert_eq!(Dur::parse("1h30m").unwrap().0, Duration::from_secs(5400));
        assert_eq!(Dur::parse("2d").unwrap().0, Duration::from_secs(172800));
        for bad in ["", "30", "s", "3x", "1.5s", "-1s", "30 s"] {
            assert!(Dur::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Dur::parse("90s").unwrap().to_string(), "90s");
        assert_eq!(Dur::parse("120s").unwrap().to_string(), "2m");
        assert_eq!(Dur::parse("1500ms").unwrap().to_string(), "1500ms");
    }

    #[test]
    fn versions_and_names() {
        for ok in ["1.4.2", "2024.11.27-abc123", "v1", "1.0.0+build.5", "1.10"] {
            assert!(Version::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "1.0/../x",
            "a b",
            "-1",
            &"9".repeat(129),
        ] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
        for ok in ["hello", "web-2", "a_b", "9lives"] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Hello", "-x", "a.b", "a/b", &"x".repeat(64)] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests() {
        let d = "6B86B273FF34FCE19D6B804EFF5A3F5747ADA4EAA22F1D49C01E52DDB7875B4B";
        assert_eq!(Digest::parse(d).unwrap().as_str(), d.to_lowercase());
        assert!(Digest::parse(&format!("sha256:{d}")).is_ok());
        assert!(Digest::parse(&d[1..]).is_err());
        assert!(Digest::parse(&d.replace('B', "g")).is_err());
    }

    #[test]
    fn rel_paths() {
        assert!(RelPath::parse("bin/drain").is_ok());
        assert!(RelPath::parse("./bin/x").is_ok());
        assert!(RelPath::parse("/etc/x").is_err());
        assert!(RelPath::parse("a/../../x").is_err());
        assert!(RelPath::parse("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(ByteSize::parse("2G").unwrap().0, 2_000_000_000);
        assert_eq!(ByteSize::parse("512").unwrap().0, 512);
        assert!(ByteSize::parse("10 furlongs").is_err());
        assert_eq!(ByteSize(3 << 30).to_string(), "3GiB");
    }
}
