//! `{name}` templates in service definitions and in template files.
//!
//! Only `{identifier}` is a placeholder (identifier: letters, digits, `_`, with `.` between
//! parts, e.g. `{port}` or `{env.DB_URL}`); every other brace is literal text. That keeps
//! PromQL (`rate(x{code=~"5.."}[1m])`) and JSON usable inside templates without escaping.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::yaml::{Mark, Spanned};

/// Names every service definition may use, besides the host's `vars`.
pub const BUILTINS: &[&str] = &["version", "service", "environment", "host"];

/// A string with `{name}` placeholders, and where it was written.
#[derive(Clone, Debug)]
pub struct Template {
    text: String,
    mark: Mark,
}

impl PartialEq for Template {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// One piece of a template.
#[derive(Debug, PartialEq)]
enum Part<'a> {
    Text(&'a str),
    Name(&'a str),
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Splits `text` into literal text and placeholders.
fn parts(text: &str) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut lit_start = 0;
    let mut offset = 0;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if is_name(&after[..close]) => {
                let at = offset + open;
                if at > lit_start {
                    out.push(Part::Text(&text[lit_start..at]));
                }
                out.push(Part::Name(&after[..close]));
                offset = at + close + 2;
                lit_start = offset;
                rest = &text[offset..];
            }
            _ => {
                offset += open + 1;
                rest = &text[offset..];
            }
        }
    }
    if lit_start < text.len() {
        out.push(Part::Text(&text[lit_start..]));
    }
    out
}

/// The values a template may refer to.
pub struct Vars<'a> {
    /// Built-ins and host vars.
    pub names: &'a BTreeMap<String, String>,
    /// The agent's environment, for `{env.NAME}` (only in template files).
    pub env: Option<&'a BTreeMap<String, String>>,
}

impl Template {
    /// A template from `text`, written at `mark`.
    pub fn new(text: impl Into<String>, mark: Mark) -> Template {
        Template {
            text: text.into(),
            mark,
        }
    }

    /// The raw text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Where the template was written.
    pub fn mark(&self) -> &Mark {
        &self.mark
    }

    /// The placeholder names used.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        parts(&self.text).into_iter().filter_map(|p| match p {
            Part::Name(n) => Some(n),
            Part::Text(_) => None,
        })
    }

    /// Renders the template; an unknown name is an error naming it and the known ones.
    pub fn render(&self, vars: &Vars) -> Result<String, String> {
        render_str(&self.text, vars)
    }
}

/// The `NAME`s of the `{env.NAME}` placeholders in a template file's text.
pub fn env_names(text: &str) -> impl Iterator<Item = &str> {
    parts(text).into_iter().filter_map(|p| match p {
        Part::Name(n) => n.strip_prefix("env."),
        Part::Text(_) => None,
    })
}

/// Renders `text` (a template file's content, or a template's text).
pub fn render_str(text: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut unknown = Vec::new();
    for part in parts(text) {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Name(n) => {
                let value = match (n.strip_prefix("env."), vars.env) {
                    (Some(var), Some(env)) => env.get(var),
                    _ => vars.names.get(n),
                };
                match value {
                    Some(v) => out.push_str(v),
                    None => unknown.push(n),
                }
            }
        }
    }
    if unknown.is_empty() {
        return Ok(out);
    }
    unknown.dedup();
    let list = unknown
        .iter()
        .map(|n| format!("`{{{n}}}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let env_hint = if unknown.iter().any(|n| n.starts_with("env.")) {
        if vars.env.is_some() {
            "; `{env.NAME}` needs NAME in the agent's environment"
        } else {
            "; `{env.NAME}` is only available in template files"
        }
    } else {
        ""
    };
    let known = vars.names.keys().cloned().collect::<Vec<_>>().join(", ");
    Err(format!(
        "unknown template name {list}{env_hint} (known here: {known}; host vars come from the agent config's `vars`)"
    ))
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !crate::yaml::is_collecting() {
            return Ok(Template::new(String::deserialize(d)?, Mark::file_start("")));
        }
        let s = Spanned::<String>::deserialize(d)?;
        Ok(Template::new(s.value, s.mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_identifiers_are_placeholders() {
        let t = r#"sum(rate(x{code=~"5..",instance="{host}"}[1m])) {version}{"#;
        assert_eq!(
            parts(t),
            vec![
                Part::Text(r#"sum(rate(x{code=~"5..",instance=""#),
                Part::Name("host"),
                Part::Text(r#""}[1m])) "#),
                Part::Name("version"),
                Part::Text("{"),
            ]
        );
        let names = vars(&[("host", "h1"), ("version", "2")]);
        let v = Vars {
            names: &names,
            env: None,
        };
        assert_eq!(
            render_str(t, &v).unwrap(),
            r#"sum(rate(x{code=~"5..",instance="h1"}[1m])) 2{"#
        );
        assert_eq!(render_str(r#"{"a": 1}"#, &v).unwrap(), r#"{"a": 1}"#);
    }

    #[test]
    fn unknown_names_are_listed() {
        let names = vars(&[("host", "h1")]);
        let v = Vars {
            names: &names,
            env: None,
        };
        let e = render_str("{port} {prot} {port}", &v).unwrap_err();
        assert!(e.contains("`{port}`, `{prot}`"), "{e}");
        assert!(e.contains("known here: host"), "{e}");
    }

    #[test]
    fn env_names_only_with_env() {
        let names = vars(&[]);
        let env = vars(&[("DB", "postgres://x")]);
        let with = Vars {
            names: &names,
            env: Some(&env),
        };
        assert_eq!(render_str("db={env.DB}", &with).unwrap(), "db=postgres://x");
        let without = Vars {
            names: &names,
            env: None,
        };
        assert!(
            render_str("db={env.DB}", &without)
                .unwrap_err()
                .contains("only available in template files")
        );
    }
}
