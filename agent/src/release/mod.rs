//! Releases on disk: `root/releases/<dir>/`, the `current` symlink, `root/shared/`.
//!
//! A release is staged completely in `releases/<dir>.tmp` (extracted, templates rendered,
//! shared dirs linked, marker written, flushed to disk) and only then renamed to
//! `releases/<dir>`, so a directory without `.tmp` is always complete. Switching is one atomic
//! rename of a new `current` symlink. The previous release stays on disk as the backup.

mod beneath;
mod extract;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;
use serde::{Deserialize, Serialize};

pub use beneath::{Beneath, Follow, Refused, is_refused};

/// Largest template file rendered.
pub const MAX_TEMPLATE: u64 = 1 << 20;

pub use extract::{DEFAULT_MAX_ENTRIES, ExtractError, Unpack, extract, extract_with};

use crate::account::Ids;
use crate::fsutil;
use crate::spec::{Digest, ResolvedService, Vars, env_names, render_str};

/// The marker file written into every staged release.
pub const MARKER: &str = ".drover-release.json";

/// Why staging a release failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
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
    /// A path was refused: it escapes the install root or passes through a link.
    #[error("{path}: {message}")]
    Refused { path: PathBuf, message: String },
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReleaseError {
    let path = path.to_path_buf();
    move |source| {
        if is_refused(&source) {
            ReleaseError::Refused {
                path,
                message: source.to_string(),
            }
        } else {
            ReleaseError::Io { what, path, source }
        }
    }
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
    /// The `{env.NAME}` names its templates used: their values are secrets, redacted from
    /// the output of its hooks and checks (names only, never values).
    #[serde(default)]
    pub secret_env: Vec<String>,
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
        opts: &Stage,
    ) -> Result<(), ReleaseError> {
        let releases = self.releases();
        fs::create_dir_all(&releases).map_err(io_err("creating", &releases))?;
        let final_dir = self.release(dir);
        let tmp = releases.join(format!("{dir}.tmp"));
        remove_tree(&tmp);
        fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = self.fill(&tmp, archive, svc, env, opts);
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
        opts: &Stage,
    ) -> Result<(), ReleaseError> {
        extract_with(archive, tmp, opts.unpack)?;
        let vars = Vars {
            names: &svc.vars,
            env: Some(env),
        };
        let rel = Beneath::open(tmp).map_err(io_err("opening", tmp))?;
        let mut secret_env = BTreeSet::new();
        for (src, dest) in &svc.templates {
            let terr = |message: String| ReleaseError::Template {
                src: src.to_string(),
                dest: dest.to_string(),
                message,
            };
            // Links are judged on disk by the kernel: the template and the directory it is
            // written to must resolve inside the release (a link in the archive could point
            // them anywhere).
            let refused = |e: io::Error| terr(e.to_string());
            let mut file = rel
                .open_read(src.as_path(), Follow::Beneath)
                .map_err(refused)?;
            let meta = file.metadata().map_err(refused)?;
            if !meta.is_file() || meta.len() > MAX_TEMPLATE {
                return Err(terr(format!(
                    "the template must be a file of at most {MAX_TEMPLATE} bytes"
                )));
            }
            let mut text = String::new();
            (&mut file)
                .take(MAX_TEMPLATE + 1)
                .read_to_string(&mut text)
                .map_err(|e| terr(format!("cannot read the template in the release: {e}")))?;
            let rendered = render_str(&text, &vars).map_err(terr)?;
            secret_env.extend(env_names(&text).map(str::to_string));
            let dest_path = dest.as_path();
            if let Some(parent) = dest_path.parent() {
                rel.create_dir_all(parent, Follow::Beneath)
                    .map_err(refused)?;
            }
            match rel.kind(dest_path, Follow::Beneath).map_err(refused)? {
                None => {}
                Some(FileType::Directory) => {
                    return Err(terr("the destination is a directory in the release".into()));
                }
                Some(_) => rel
                    .remove_file(dest_path, Follow::Beneath)
                    .map_err(refused)?,
            }
            // Rendered templates may hold secrets ({env.*}): 0640, never through a link.
            let mut f = rel
                .create(dest_path, 0o640, Follow::Beneath)
                .map_err(refused)?;
            beneath::chown(&f, opts.ids.template_uid, opts.ids.template_gid)
                .map_err(|e| terr(format!("setting its owner and group: {e}")))?;
            f.write_all(rendered.as_bytes())
                .map_err(io_err("writing", &tmp.join(dest_path)))?;
        }
        let root = Beneath::open(&self.root).map_err(io_err("opening", &self.root))?;
        for d in &svc.shared {
            // `shared/` is written by the app: a link it left there is never followed.
            let shared = Path::new("shared").join(d.as_path());
            let at = self.root.join(&shared);
            match root.kind(&shared, Follow::Never) {
                // A link is the operator's choice (a bigger disk): used, never written through.
                Ok(Some(FileType::Directory | FileType::Symlink)) => {}
                Ok(None) => {
                    root.create_dir_all(&shared, Follow::Never)
                        .map_err(io_err("creating", &at))?;
                    // The app runs as run.user: its shared dirs are its own.
                    root.chown_dir(&shared, opts.ids.uid, opts.ids.gid)
                        .map_err(io_err("setting the owner of", &at))?;
                }
                Ok(Some(_)) => {
                    return Err(ReleaseError::Refused {
                        path: at,
                        message: "is a file, not a shared directory; refused".into(),
                    });
                }
                Err(e) => return Err(io_err("checking", &at)(e)),
            }
            let link = d.as_path();
            let link_at = tmp.join(link);
            match rel
                .kind(link, Follow::Never)
                .map_err(io_err("checking", &link_at))?
            {
                None => {}
                Some(kind) => {
                    tracing::info!(dir = %d, "the archive contains a shared dir; replacing it with the shared link");
                    if kind == FileType::Directory {
                        rel.remove_tree(link)
                            .map_err(io_err("replacing", &link_at))?;
                    } else {
                        rel.remove_file(link, Follow::Never)
                            .map_err(io_err("replacing", &link_at))?;
                    }
                }
            }
            if let Some(parent) = link.parent() {
                rel.create_dir_all(parent, Follow::Never)
                    .map_err(io_err("creating", &link_at))?;
            }
            let depth = link.components().count();
            let mut target = PathBuf::new();
            for _ in 0..=depth {
                target.push("..");
            }
            target.push("shared");
            target.push(link);
            rel.symlink(&target, link, Follow::Never)
                .map_err(io_err("linking", &link_at))?;
        }
        let marker = Marker {
            service: svc.service.clone(),
            version: svc.version.clone(),
            sha256: svc.sha256.clone(),
            staged_at: fsutil::now_rfc3339(),
            secret_env: secret_env.into_iter().collect(),
        };
        let path = tmp.join(MARKER);
        // An archive may ship a file (or link) of that name: ours replaces it.
        if rel
            .kind(Path::new(MARKER), Follow::Never)
            .map_err(io_err("checking", &path))?
            .is_some()
        {
            rel.remove_tree(Path::new(MARKER))
                .map_err(io_err("replacing", &path))?;
        }
        rel.create(Path::new(MARKER), 0o644, Follow::Never)
            .and_then(|mut f| {
                f.write_all(&serde_json::to_vec_pretty(&marker).expect("marker serializes"))
            })
            .map_err(io_err("writing", &path))?;
        // One flush of the filesystem makes every extracted file durable before the rename.
        fsutil::syncfs(tmp).map_err(io_err("syncing", tmp))?;
        Ok(())
    }
}

/// How a release is staged: archive limits and who owns what.
#[derive(Clone, Copy, Debug)]
pub struct Stage {
    /// Archive limits.
    pub unpack: Unpack,
    /// Owners of templates and shared dirs.
    pub ids: Ids,
}

/// Removes the directory tree `path`, never following a link inside it (or `path` itself, if
/// it is one), making read-only directories writable first. Errors are logged, not returned:
/// leftovers are retried later.
pub fn remove_tree(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let result = Beneath::open(parent).and_then(|b| b.remove_tree(Path::new(name)));
    if let Err(e) = result
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove");
    }
}
