//! Releases on disk: `root/releases/<dir>/`, the `current` symlink, `root/shared/`.
//!
//! A release is staged completely in `releases/<dir>.tmp` (extracted, templates rendered,
//! shared dirs linked, marker written, flushed to disk) and only then renamed to
//! `releases/<dir>`, so a directory without `.tmp` is always complete. Switching is one atomic
//! rename of a new `current` symlink. The previous release stays on disk as the backup.

mod extract;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest template file rendered.
pub const MAX_TEMPLATE: u64 = 1 << 20;

pub use extract::{DEFAULT_MAX_ENTRIES, ExtractError, Unpack, extract, extract_with};

use crate::fsutil;
use crate::spec::{Digest, ResolvedService, Vars, render_str};

/// The marker file written into every staged release.
pub const MARKER: &str = ".drover-release.json";

/// Why staging a release failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The archive was rejected or could not be unpacked.
    #[error(transparent)]
    Extract(#[from] ExtractError),
    /// A template file could not be rendered.
    #[error("template {src} → {dest}: {message}")]
    Template {
        /// Source, in the release.
        src: String,
        /// Destination, in the release.
        dest: String,
        /// What went wrong.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReleaseError {
    let path = path.to_path_buf();
    move |source| ReleaseError::Io { what, path, source }
}

/// What the marker of a release records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Service.
    pub service: String,
    /// Version.
    pub version: String,
    /// Artifact digest.
    pub sha256: Digest,
    /// When it was staged (RFC 3339).
    pub staged_at: String,
}

/// The directories of one service's install root.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }

    /// The install root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/releases`.
    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    /// `root/releases/<dir>`.
    pub fn release(&self, dir: &str) -> PathBuf {
        self.releases().join(dir)
    }

    /// `root/current`.
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }

    /// The directory name `current` points at, if it points at a release.
    pub fn current(&self) -> Option<String> {
        let target = fs::read_link(self.current_link()).ok()?;
        let name = target.file_name()?.to_str()?.to_string();
        self.release(&name).is_dir().then_some(name)
    }

    /// The marker of release `dir`, if it is a complete release.
    pub fn marker(&self, dir: &str) -> Option<Marker> {
        let bytes = fs::read(self.release(dir).join(MARKER)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Complete releases on disk, oldest staged first.
    pub fn list(&self) -> Vec<(String, Marker)> {
        let Ok(entries) = fs::read_dir(self.releases()) else {
            return Vec::new();
        };
        let mut out: Vec<(String, Marker)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                if name.ends_with(".tmp") || name.starts_with('.') {
                    return None;
                }
                let m = self.marker(&name)?;
                Some((name, m))
            })
            .collect();
        out.sort_by(|a, b| a.1.staged_at.cmp(&b.1.staged_at).then(a.0.cmp(&b.0)));
        out
    }

    /// Chooses the directory for (`version`, `sha256`): `<version>`, unless a different
    /// artifact of the same version is on disk and in use (current or `protect`), then
    /// `<version>~<sha12>`.
    pub fn dir_for(&self, version: &str, sha256: &Digest, protect: &[&str]) -> String {
        let plain = version.to_string();
        match self.marker(&plain) {
            Some(m) if m.sha256 != *sha256 => {
                let in_use = self.current().as_deref() == Some(plain.as_str())
                    || protect.contains(&plain.as_str());
                if in_use {
                    format!("{version}~{}", sha256.short())
                } else {
                    plain
                }
            }
            _ => plain,
        }
    }

    /// Whether `dir` holds a complete release of `sha256`.
    pub fn is_staged(&self, dir: &str, sha256: &Digest) -> bool {
        self.marker(dir).is_some_and(|m| m.sha256 == *sha256)
    }

    /// Points `current` at release `dir`, atomically.
    pub fn switch(&self, dir: &str) -> Result<(), ReleaseError> {
        let target = Path::new("releases").join(dir);
        fsutil::symlink_atomic(&target, &self.current_link())
            .map_err(io_err("switching current to", &self.release(dir)))
    }

    /// Removes half-staged `*.tmp` directories (left by a crash).
    pub fn clean_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.releases()) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                tracing::info!(path = %e.path().display(), "removing a half-staged release");
                remove_tree(&e.path());
            }
        }
    }

    /// Deletes old releases, keeping the newest `keep` and always the `protect`ed ones.
    pub fn prune(&self, keep: usize, protect: &[&str]) -> Vec<String> {
        let list = self.list();
        let mut removed = Vec::new();
        let excess = list.len().saturating_sub(keep);
        for (name, _) in list.iter().take(excess) {
            if protect.contains(&name.as_str()) {
                continue;
            }
            remove_tree(&self.release(name));
            removed.push(name.clone());
        }
        removed
    }

    /// Stages release `dir` from `archive` for `svc`: extract into `dir.tmp`, render templates,
    /// link shared dirs, write the marker, flush, rename. Blocking.
    pub fn stage(
        &self,
        dir: &str,
        archive: &Path,
        svc: &ResolvedService,
        env: &BTreeMap<String, String>,
        unpack: Unpack,
    ) -> Result<(), ReleaseError> {
        let releases = self.releases();
        fs::create_dir_all(&releases).map_err(io_err("creating", &releases))?;
        let final_dir = self.release(dir);
        let tmp = releases.join(format!("{dir}.tmp"));
        remove_tree(&tmp);
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = self.fill(&tmp, archive, svc, env, unpack);
        if let Err(e) = result {
            remove_tree(&tmp);
            return Err(e);
        }
        if final_dir.exists() {
            // A different artifact of this version, not in use: replace it.
            remove_tree(&final_dir);
        }
        fs::rename(&tmp, &final_dir).map_err(io_err("renaming into place", &final_dir))?;
        fsutil::fsync_dir(&releases).map_err(io_err("syncing", &releases))?;
        Ok(())
    }

    fn fill(
        &self,
        tmp: &Path,
        archive: &Path,
        svc: &ResolvedService,
        env: &BTreeMap<String, String>,
        unpack: Unpack,
    ) -> Result<(), ReleaseError> {
        extract_with(archive, tmp, unpack)?;
        let vars = Vars {
            names: &svc.vars,
            env: Some(env),
        };
        let root = fs::canonicalize(tmp).map_err(io_err("resolving", tmp))?;
        for (src, dest) in &svc.templates {
            let terr = |message: String| ReleaseError::Template {
                src: src.to_string(),
                dest: dest.to_string(),
                message,
            };
            // Links are judged on disk: the template and the directory it is written to must
            // resolve inside the release (a link in the archive could point them anywhere).
            let inside = |p: &Path| -> Result<PathBuf, ReleaseError> {
                let c = fs::canonicalize(p).map_err(io_err("resolving", p))?;
                if c.starts_with(&root) {
                    Ok(c)
                } else {
                    Err(terr(format!(
                        "{} resolves outside the release (through a link); refused",
                        p.strip_prefix(tmp).unwrap_or(p).display()
                    )))
                }
            };
            let src_path = inside(&tmp.join(src.as_path()))?;
            let meta = fs::metadata(&src_path).map_err(io_err("reading", &src_path))?;
            if !meta.is_file() || meta.len() > MAX_TEMPLATE {
                return Err(terr(format!(
                    "the template must be a file of at most {MAX_TEMPLATE} bytes"
                )));
            }
            let text = fs::read_to_string(&src_path)
                .map_err(|e| terr(format!("cannot read the template in the release: {e}")))?;
            let rendered = render_str(&text, &vars).map_err(terr)?;
            let out = tmp.join(dest.as_path());
            if let Some(parent) = out.parent() {
                // The part of the parent that exists must be inside; the rest is made here.
                let existing = parent
                    .ancestors()
                    .find(|a| a.symlink_metadata().is_ok())
                    .unwrap_or(tmp);
                inside(existing)?;
                fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
                inside(parent)?;
            }
            if out.symlink_metadata().is_ok() {
                fs::remove_file(&out).map_err(io_err("replacing", &out))?;
            }
            // Rendered templates may hold secrets ({env.*}): 0640, never through a link.
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o640)
                    .open(&out)
                    .map_err(io_err("writing", &out))?;
                f.write_all(rendered.as_bytes())
                    .map_err(io_err("writing", &out))?;
            }
        }
        for d in &svc.shared {
            let shared = self.root.join("shared").join(d.as_path());
            fs::create_dir_all(&shared).map_err(io_err("creating", &shared))?;
            let link = tmp.join(d.as_path());
            if link.symlink_metadata().is_ok() {
                tracing::info!(dir = %d, "the archive contains a shared dir; replacing it with the shared link");
                if link.is_dir() && !link.is_symlink() {
                    remove_tree(&link);
                } else {
                    fs::remove_file(&link).map_err(io_err("replacing", &link))?;
                }
            }
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            }
            let depth = d.as_path().components().count();
            let mut target = PathBuf::new();
            for _ in 0..=depth {
                target.push("..");
            }
            target.push("shared");
            target.push(d.as_path());
            std::os::unix::fs::symlink(&target, &link).map_err(io_err("linking", &link))?;
        }
        let marker = Marker {
            service: svc.service.clone(),
            version: svc.version.clone(),
            sha256: svc.sha256.clone(),
            staged_at: fsutil::now_rfc3339(),
        };
        let path = tmp.join(MARKER);
        fs::write(
            &path,
            serde_json::to_vec_pretty(&marker).expect("marker serializes"),
        )
        .map_err(io_err("writing", &path))?;
        // One flush of the filesystem makes every extracted file durable before the rename.
        fsutil::syncfs(tmp).map_err(io_err("syncing", tmp))?;
        Ok(())
    }
}

/// Removes a directory tree, first making its directories writable (archives may ship
/// read-only directories). Errors are logged, not returned: leftovers are retried later.
pub fn remove_tree(path: &Path) {
    if path.symlink_metadata().is_err() {
        return;
    }
    if let Err(e) = fs::remove_dir_all(path) {
        use std::os::unix::fs::PermissionsExt;
        fn unlock(p: &Path) {
            if let Ok(m) = p.symlink_metadata()
                && m.is_dir()
            {
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
                if let Ok(entries) = fs::read_dir(p) {
                    for e in entries.flatten() {
                        unlock(&e.path());
                    }
                }
            }
        }
        unlock(path);
        if let Err(e2) = fs::remove_dir_all(path) {
            tracing::warn!(path = %path.display(), error = %e2, first_error = %e, "cannot remove");
        }
    }
}
