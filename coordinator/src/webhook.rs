//! Git push webhooks (`POST /v1/webhooks/git`): a forge tells the coordinator that the
//! desired-state repo moved, and it fetches at once instead of at its next poll. The request
//! carries no bearer token; its signature is its authentication — GitHub's
//! `X-Hub-Signature-256` (HMAC-SHA256 of the body), GitLab's `X-Gitlab-Token` (a shared
//! token), Gitea's and Forgejo's `X-Gitea-Signature` / `X-Forgejo-Signature` (hex HMAC-SHA256
//! of the body). The body is never parsed: whatever it says, the coordinator only fetches the
//! branch it follows, so a verified webhook can cause a fetch and nothing else.
//!
//! [`verify`] is pure; [`Secrets::load`] reads the secret files once at start-up.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Longest secret file read.
const MAX_SECRET: u64 = 4096;

/// The secret files named in coordinator.yaml (`webhook:`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretFiles {
    /// GitHub's webhook secret.
    pub github: Option<PathBuf>,
    /// GitLab's secret token.
    pub gitlab: Option<PathBuf>,
    /// Gitea's or Forgejo's webhook secret.
    pub gitea: Option<PathBuf>,
}

/// The secrets, read.
#[derive(Clone, Default)]
pub struct Secrets {
    github: Option<Vec<u8>>,
    gitlab: Option<Vec<u8>>,
    gitea: Option<Vec<u8>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which forges are set up, never the secrets.
        f.debug_struct("Secrets")
            .field("github", &self.github.is_some())
            .field("gitlab", &self.gitlab.is_some())
            .field("gitea", &self.gitea.is_some())
            .finish()
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("secret file {path}: {problem}")]
pub struct SecretError {
    /// The file.
    pub path: String,
    /// What is wrong, and how to fix it.
    pub problem: String,
}

fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    read_secret_file(
        path,
        "anyone on this host could trigger fetches as the forge",
    )
}

/// Reads a secret file: not readable by every user (`exposure` says what a reader could do),
/// at most 4 KiB, trimmed, not empty.
pub(crate) fn read_secret_file(path: &Path, exposure: &str) -> Result<Vec<u8>, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |problem: String| SecretError {
        path: path.display().to_string(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(err(format!(
            "readable by every user: {exposure}; chmod 600 it"
        )));
    }
    let text = drover_desired::file::read_text_capped(path, MAX_SECRET)
        .map_err(|e| err(format!("{e} (at most {MAX_SECRET} bytes)")))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(err("is empty".into()));
    }
    Ok(secret.as_bytes().to_vec())
}

impl Secrets {
    /// Reads the files; each must be non-empty and not readable by others.
    pub fn load(files: &SecretFiles) -> Result<Secrets, SecretError> {
        let read = |p: &Option<PathBuf>| p.as_deref().map(read_secret).transpose();
        Ok(Secrets {
            github: read(&files.github)?,
            gitlab: read(&files.gitlab)?,
            gitea: read(&files.gitea)?,
        })
    }

    /// Secrets given directly (tests).
    pub fn new(github: Option<&str>, gitlab: Option<&str>, gitea: Option<&str>) -> Secrets {
        let v = |s: Option<&str>| s.map(|s| s.as_bytes().to_vec());
        Secrets {
            github: v(github),
            gitlab: v(gitlab),
            gitea: v(gitea),
        }
    }

    /// Whether any forge is set up (else the endpoint answers 404).
    pub fn any(&self) -> bool {
        self.github.is_some() || self.gitlab.is_some() || self.gitea.is_some()
    }
}

/// The forge whose signature a webhook carried, verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forge {
    /// GitHub (`X-Hub-Signature-256`).
    Github,
    /// GitLab (`X-Gitlab-Token`).
    Gitlab,
    /// Gitea or Forgejo (`X-Gitea-Signature`, `X-Forgejo-Signature`).
    Gitea,
}

/// Why a webhook is refused (answered 401; nothing is fetched).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No signature header at all.
    #[error(
        "unsigned: a Git webhook needs X-Hub-Signature-256 (GitHub), X-Gitlab-Token (GitLab) or X-Gitea-Signature (Gitea, Forgejo)"
    )]
    Unsigned,
    /// Signed for a forge this coordinator has no secret for.
    #[error("signed by {0}, but coordinator.yaml has no webhook secret for it")]
    NotConfigured(&'static str),
    /// The signature does not match.
    #[error("the {0} signature does not match the body and the configured secret")]
    Mismatch(&'static str),
}

/// Whether `hex_sig` is the HMAC-SHA256 of `body` with `secret` (compared in constant time).
pub(crate) fn hmac_matches(secret: &[u8], body: &[u8], hex_sig: &str) -> bool {
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // Constant time.
    mac.verify_slice(&sig).is_ok()
}

/// Hex HMAC-SHA256 of `body` with `secret`.
pub(crate) fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Compares tokens in time independent of where they differ (both are hashed first).
fn same_token(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (Sha256::digest(a), Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

/// Checks a webhook: `header` looks a request header up by its lower-case name. Accepted when
/// any signature it carries verifies with the secret of its forge (Gitea also sends
/// GitHub's header, signed with its own secret). Pure.
pub fn verify(
    secrets: &Secrets,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
) -> Result<Forge, Refused> {
    let github = header("x-hub-signature-256");
    let gitlab = header("x-gitlab-token");
    let gitea = header("x-gitea-signature").or_else(|| header("x-forgejo-signature"));
    if github.is_none() && gitlab.is_none() && gitea.is_none() {
        return Err(Refused::Unsigned);
    }
    let mut refusal = None;
    if let Some(sig) = &gitea {
        match &secrets.gitea {
            Some(s) if hmac_matches(s, body, sig) => return Ok(Forge::Gitea),
            Some(_) => refusal = Some(Refused::Mismatch("Gitea/Forgejo")),
            None => refusal = refusal.or(Some(Refused::NotConfigured("Gitea/Forgejo"))),
        }
    }
    if let Some(sig) = &github {
        match (&secrets.github, sig.strip_prefix("sha256=")) {
            (Some(s), Some(hex)) if hmac_matches(s, body, hex) => return Ok(Forge::Github),
            (Some(_), _) => refusal = Some(Refused::Mismatch("GitHub")),
            // Gitea sends both headers; its own one decides then.
            (None, _) if gitea.is_some() => {}
            (None, _) => refusal = refusal.or(Some(Refused::NotConfigured("GitHub"))),
        }
    }
    if let Some(token) = &gitlab {
        match &secrets.gitlab {
            Some(s) if same_token(s, token.trim().as_bytes()) => return Ok(Forge::Gitlab),
            Some(_) => refusal = Some(Refused::Mismatch("GitLab")),
            None => refusal = refusal.or(Some(Refused::NotConfigured("GitLab"))),
        }
    }
    Err(refusal.unwrap_or(Refused::Unsigned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    fn headers(list: &[(&str, String)]) -> impl Fn(&str) -> Option<String> {
        let list: Vec<(String, String)> = list
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        move |name| list.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        // RFC 4231, test case 2.
        let body = b"what do ya want for nothing?";
        assert!(hmac_matches(
            b"Jefe",
            body,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        ));
        assert!(!hmac_matches(b"Jefe", body, "5bdcc146"));
        assert!(!hmac_matches(b"Jefe", body, "not hex"));
    }

    #[test]
    fn each_forge_is_checked_with_its_own_secret() {
        let s = Secrets::new(Some("gh"), Some("gl-token"), Some("gt"));
        let body = br#"{"ref":"refs/heads/main"}"#;
        let ok = |h: &[(&str, String)]| verify(&s, headers(h), body);
        assert_eq!(
            ok(&[(
                "x-hub-signature-256",
                format!("sha256={}", sign("gh", body))
            )]),
            Ok(Forge::Github)
        );
        assert_eq!(
            ok(&[("x-gitlab-token", "gl-token".into())]),
            Ok(Forge::Gitlab)
        );
        assert_eq!(
            ok(&[("x-gitea-signature", sign("gt", body))]),
            Ok(Forge::Gitea)
        );
        assert_eq!(
            ok(&[("x-forgejo-signature", sign("gt", body))]),
            Ok(Forge::Gitea)
        );
        // Gitea sends GitHub's header too, signed with its own secret.
        assert_eq!(
            ok(&[
                ("x-gitea-signature", sign("gt", body)),
                (
                    "x-hub-signature-256",
                    format!("sha256={}", sign("gt", body))
                ),
            ]),
            Ok(Forge::Gitea)
        );
    }

    #[test]
    fn forged_unsigned_and_unconfigured_webhooks_are_refused() {
        let s = Secrets::new(Some("gh"), None, None);
        let body = b"{}";
        let check = |h: &[(&str, String)]| verify(&s, headers(h), body);
        assert_eq!(check(&[]), Err(Refused::Unsigned));
        // Signed with another secret, for another body, without the prefix, or not hex.
        for sig in [
            format!("sha256={}", sign("other", body)),
            format!("sha256={}", sign("gh", b"{ }")),
            sign("gh", body),
            "sha256=zz".into(),
            "sha256=".into(),
        ] {
            assert_eq!(
                check(&[("x-hub-signature-256", sig.clone())]),
                Err(Refused::Mismatch("GitHub")),
                "{sig}"
            );
        }
        assert_eq!(
            check(&[("x-gitlab-token", "anything".into())]),
            Err(Refused::NotConfigured("GitLab"))
        );
        assert_eq!(
            check(&[("x-gitea-signature", sign("gh", body))]),
            Err(Refused::NotConfigured("Gitea/Forgejo"))
        );
        let gl = Secrets::new(None, Some("gl-token"), None);
        for token in ["gl-toke", "gl-token2", ""] {
            assert_eq!(
                verify(&gl, headers(&[("x-gitlab-token", token.into())]), body),
                Err(Refused::Mismatch("GitLab")),
                "{token}"
            );
        }
        // A mismatch is reported over a forge that is not set up.
        assert_eq!(
            check(&[
                ("x-gitlab-token", "x".into()),
                ("x-hub-signature-256", "sha256=00".into()),
            ]),
            Err(Refused::Mismatch("GitHub"))
        );
    }

    #[test]
    fn secret_files_must_be_private_and_non_empty() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            Some(p)
        };
        let good = SecretFiles {
            github: file("gh", "s3cret\n", 0o600),
            ..SecretFiles::default()
        };
        let s = Secrets::load(&good).unwrap();
        assert!(s.any());
        assert!(!format!("{s:?}").contains("s3cret"));
        for (files, says) in [
            (
                SecretFiles {
                    gitlab: file("open", "x", 0o644),
                    ..SecretFiles::default()
                },
                "readable by every user",
            ),
            (
                SecretFiles {
                    gitea: file("empty", " \n", 0o600),
                    ..SecretFiles::default()
                },
                "is empty",
            ),
            (
                SecretFiles {
                    github: Some(dir.path().join("missing")),
                    ..SecretFiles::default()
                },
                "No such file",
            ),
        ] {
            let e = Secrets::load(&files).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
        assert!(!Secrets::load(&SecretFiles::default()).unwrap().any());
    }
}
