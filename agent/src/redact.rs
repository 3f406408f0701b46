//! Secrets kept on the host: output of hooks, smoke tests and health probes is cut to a few
//! KiB and redacted before it reaches a log, the state file, events or the coordinator.

use std::collections::BTreeMap;

use crate::spec::Pattern;

/// What replaces a secret.
pub const MASK: &str = "[redacted]";

/// Shortest value of `{env.NAME}` that is redacted: shorter ones are no secret, and masking
/// them would garble every message (`1`, `on`).
pub const MIN_SECRET: usize = 4;

/// Most bytes of command output that leave the host in a message (the end is kept).
pub const MAX_SHOWN: usize = 2048;

/// Removes known secrets from text.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    /// Literal secrets, longest first (so a secret containing another is masked whole).
    literals: Vec<String>,
    patterns: Vec<regex::Regex>,
}

impl Redactor {
    /// Masks the values of `secret_env` (names looked up in `env`) and what `patterns` match.
    pub fn new<'a>(
        secret_env: impl IntoIterator<Item = &'a String>,
        env: &BTreeMap<String, String>,
        patterns: &[Pattern],
    ) -> Redactor {
        let mut literals: Vec<String> = secret_env
            .into_iter()
            .filter_map(|n| env.get(n))
            .filter(|v| v.len() >= MIN_SECRET)
            .cloned()
            .collect();
        literals.sort_by_key(|v| std::cmp::Reverse(v.len()));
        literals.dedup();
        Redactor {
            literals,
            patterns: patterns.iter().map(Pattern::regex).collect(),
        }
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn apply(&self, text: &str) -> String {
        // Every occurrence of every secret is found in the original text first, so that two
        // secrets that overlap are masked whole (replacing one after the other would leave
        // the rest of the second).
        let mut masked = vec![false; text.len()];
        for secret in &self.literals {
            for (at, _) in text.match_indices(secret.as_str()) {
                masked[at..at + secret.len()].fill(true);
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut in_mask = false;
        for (i, c) in text.char_indices() {
            if masked[i] {
                if !in_mask {
                    out.push_str(MASK);
                }
                in_mask = true;
            } else {
                out.push(c);
                in_mask = false;
            }
        }
        for p in &self.patterns {
            if p.is_match(&out) {
                out = p.replace_all(&out, MASK).into_owned();
            }
        }
        out
    }
}

/// The last [`MAX_SHOWN`] bytes of `text` (cut at a character boundary), marked when cut.
pub fn tail(text: &str) -> String {
    if text.len() <= MAX_SHOWN {
        return text.to_string();
    }
    let mut start = text.len() - MAX_SHOWN;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_patterns_are_masked() {
        let env = BTreeMap::from([
            ("DB_PASSWORD".to_string(), "hunter2-hunter2".to_string()),
            ("SHORT".to_string(), "on".to_string()),
            ("PATH".to_string(), "/usr/bin".to_string()),
        ]);
        let names = ["DB_PASSWORD".to_string(), "SHORT".to_string()];
        let r = Redactor::new(
            &names,
            &env,
            &[Pattern::parse(r"token=[A-Za-z0-9]+").unwrap()],
        );
        let out = r.apply("login hunter2-hunter2 failed; token=abc123 on /usr/bin");
        assert_eq!(out, "login [redacted] failed; [redacted] on /usr/bin");
        // Names not used by templates are not secrets.
        assert!(r.apply("/usr/bin").contains("/usr/bin"));
    }

    /// Found in review: replacing one secret after the other left the rest of the second.
    #[test]
    fn overlapping_secrets_are_masked_whole() {
        let env = BTreeMap::from([
            ("A".to_string(), "abcdef".to_string()),
            ("B".to_string(), "defghi".to_string()),
        ]);
        let names = ["A".to_string(), "B".to_string()];
        let r = Redactor::new(&names, &env, &[]);
        assert_eq!(r.apply("x abcdefghi y défghi"), "x [redacted] y défghi");
        assert_eq!(r.apply("defghi"), "[redacted]");
    }

    #[test]
    fn tail_keeps_the_end() {
        let long = "é".repeat(3000);
        let t = tail(&long);
        assert!(t.len() <= MAX_SHOWN + "…".len() + 1 && t.starts_with('…'));
        assert_eq!(tail("short"), "short");
    }
}
