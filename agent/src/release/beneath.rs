//! File operations that stay beneath one directory.
//!
//! Every write, read, link and removal inside a release (extraction, templates, shared dirs,
//! pruning) goes through a [`Beneath`] handle on the release (or releases) directory. Paths
//! are resolved by the kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: a link
//! in the archive, or one an app left in its shared dir, can point a path anywhere, and the
//! kernel then refuses it instead of following it out. The last component of every path that
//! is created or removed is never followed ([`Follow::Never`] also refuses links on the way).
//!
//! On kernels without `openat2` (before Linux 5.6), paths are walked one component at a time
//! with `O_NOFOLLOW`, so any link on the way is refused: stricter, never looser.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How links on the way to a path are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Links are followed while they stay beneath the directory.
    Beneath,
    /// No link is followed at all.
    Never,
}

/// Set once the kernel said it has no `openat2`.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// A directory, and every path given to it resolved beneath it.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

/// A path refused because it escapes the directory or passes through a link: the archive or
/// the spec is at fault, not the host, so trying again would not help.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// Whether `e` is a [`Refused`] path.
pub fn is_refused(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Refused>())
}

/// The error for a path that escapes or passes through a link, in words.
fn explain(e: Errno, rel: &Path) -> io::Error {
    let shown = rel.display();
    let refused = |why: String| io::Error::new(io::ErrorKind::PermissionDenied, Refused(why));
    match e {
        Errno::XDEV => refused(format!(
            "{shown} resolves outside the release (through a link); refused"
        )),
        Errno::LOOP => refused(format!(
            "{shown} is or passes through a symbolic link here; refused"
        )),
        other => io::Error::from(other),
    }
}

/// The components of a relative path; `..` and absolute paths are refused.
fn names(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .filter(|c| *c != Component::CurDir)
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

impl Beneath {
    /// Opens the directory `path` (the path itself is trusted: it comes from the config).
    pub fn open(path: &Path) -> io::Result<Beneath> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Beneath {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// The directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` beneath the directory. `flags` should hold `NOFOLLOW` where the last
    /// component must not be a link.
    fn at(&self, rel: &Path, flags: OFlags, mode: Mode, follow: Follow) -> io::Result<OwnedFd> {
        // openat2 refuses any flag beside O_PATH that O_PATH does not allow.
        let flags = if flags.contains(OFlags::PATH) {
            flags | OFlags::CLOEXEC
        } else {
            flags | OFlags::CLOEXEC | OFlags::NOCTTY
        };
        let parts = names(rel)?;
        if parts.is_empty() {
            return Ok(rustix::fs::openat(&self.fd, ".", flags, mode)?);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve = match follow {
                Follow::Beneath => ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
                Follow::Never => ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
            };
            match rustix::fs::openat2(&self.fd, rel, flags, mode, resolve) {
                Ok(fd) => return Ok(fd),
                Err(e) if self.openat2_unavailable(e) => {
                    tracing::info!(
                        "openat2 is not available here: every link inside a release is refused"
                    );
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                }
                // EAGAIN: a concurrent rename raced the lookup; the walk below is exact.
                Err(Errno::AGAIN) => {}
                Err(e) => return Err(explain(e, rel)),
            }
        }
        // One component at a time, never following a link.
        let mut dir = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let (last, walk) = parts.split_last().expect("not empty");
        for name in walk {
            dir = rustix::fs::openat(
                &dir,
                *name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| explain(if e == Errno::NOTDIR { Errno::LOOP } else { e }, rel))?;
        }
        rustix::fs::openat(&dir, *last, flags | OFlags::NOFOLLOW, mode).map_err(|e| explain(e, rel))
    }

    /// The directory holding `rel`, opened beneath, and `rel`'s last name.
    fn parent<'a>(&self, rel: &'a Path, follow: Follow) -> io::Result<(OwnedFd, &'a OsStr)> {
        let parts = names(rel)?;
        let Some(name) = parts.last() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty path names no file",
            ));
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let fd = self.at(
            parent,
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
            follow,
        )?;
        Ok((fd, name))
    }

    /// Whether `e`, from openat2, means the call itself is unavailable, so the walk (which
    /// refuses every link) must do: ENOSYS (before Linux 5.6), or EPERM from a seccomp filter
    /// (older container runtimes), told from a real EPERM on a file by the same call on ".".
    fn openat2_unavailable(&self, e: Errno) -> bool {
        e == Errno::NOSYS
            || (e == Errno::PERM
                && rustix::fs::openat2(
                    &self.fd,
                    ".",
                    OFlags::PATH | OFlags::CLOEXEC,
                    Mode::empty(),
                    ResolveFlags::BENEATH,
                )
                .err()
                    == Some(Errno::PERM))
    }

    /// Creates the directory `rel` with `mode` (its parent must exist).
    pub fn mkdir(&self, rel: &Path, mode: u32, follow: Follow) -> io::Result<()> {
        let (dir, name) = self.parent(rel, follow)?;
        Ok(rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode))?)
    }

    /// Creates `rel` and the directories above it that are missing (0755). Like std's, it
    /// tries the deepest first and goes up only while a parent is missing: an entry whose
    /// parent exists costs one lookup, not one per level (a deep hostile tree stays linear).
    pub fn create_dir_all(&self, rel: &Path, follow: Follow) -> io::Result<()> {
        // Creates `prefix`, or checks that it is a directory (or, with `Beneath`, a link to
        // one beneath).
        let make = |prefix: &Path| match self.mkdir(prefix, 0o755, follow) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self
                .at(
                    prefix,
                    OFlags::PATH | OFlags::DIRECTORY,
                    Mode::empty(),
                    follow,
                )
                .map(drop),
            r => r,
        };
        let parts = names(rel)?;
        // Up: find the deepest prefix that exists (or could be created).
        let mut missing = parts.len();
        while missing > 0 {
            let prefix: PathBuf = parts[..missing].iter().collect();
            match make(&prefix) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing -= 1,
                Err(e) => return Err(e),
            }
        }
        // Down: create the rest.
        for depth in missing + 1..=parts.len() {
            make(&parts[..depth].iter().collect::<PathBuf>())?;
        }
        Ok(())
    }

    /// Creates the new file `rel` (never through a link, never over an existing file).
    pub fn create(&self, rel: &Path, mode: u32, follow: Follow) -> io::Result<File> {
        let (dir, name) = self.parent(rel, follow)?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::WRONLY
                | OFlags::CREATE
                | OFlags::EXCL
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC
                | OFlags::NOCTTY,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens `rel` for reading. Not a FIFO or device: the caller checks the type by `fstat`.
    pub fn open_read(&self, rel: &Path, follow: Follow) -> io::Result<File> {
        let fd = self.at(
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
            follow,
        )?;
        Ok(File::from(fd))
    }

    /// Sets the mode of the directory `rel` (never through a link).
    pub fn chmod_dir(&self, rel: &Path, mode: u32) -> io::Result<()> {
        let fd = self.at(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            Mode::empty(),
            Follow::Never,
        )?;
        Ok(rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?)
    }

    /// Sets owner and group of the directory `rel` (never through a link).
    pub fn chown_dir(&self, rel: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        let fd = self.at(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            Mode::empty(),
            Follow::Never,
        )?;
        chown(&fd, uid, gid)
    }

    /// Makes the symbolic link `rel` → `target` (the target is not checked here).
    pub fn symlink(&self, target: &Path, rel: &Path, follow: Follow) -> io::Result<()> {
        let (dir, name) = self.parent(rel, follow)?;
        Ok(rustix::fs::symlinkat(target, &dir, name)?)
    }

    /// Makes `rel` a hard link to the file `to` (neither is followed if a link).
    pub fn hard_link(&self, to: &Path, rel: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(to, Follow::Never)?;
        let (dir, name) = self.parent(rel, Follow::Never)?;
        Ok(rustix::fs::linkat(
            &from_dir,
            from_name,
            &dir,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Removes the file or link `rel` (a link is removed, not followed).
    pub fn remove_file(&self, rel: &Path, follow: Follow) -> io::Result<()> {
        let (dir, name) = self.parent(rel, follow)?;
        Ok(rustix::fs::unlinkat(&dir, name, AtFlags::empty())?)
    }

    /// What `rel` is, without following it if it is a link; `None` if nothing is there.
    pub fn kind(&self, rel: &Path, follow: Follow) -> io::Result<Option<FileType>> {
        let (dir, name) = match self.parent(rel, follow) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `rel` and everything under it. No link is ever followed: a link is removed as
    /// a link, wherever it points. Read-only directories are made writable first. Holds one
    /// directory open at a time, however deep the tree.
    pub fn remove_tree(&self, rel: &Path) -> io::Result<()> {
        // (path, emptied): a directory is removed when it comes off the stack the second time.
        let mut stack = vec![(rel.to_path_buf(), false)];
        while let Some((path, emptied)) = stack.pop() {
            let (parent, name) = self.parent(&path, Follow::Never)?;
            if emptied {
                rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR)?;
                continue;
            }
            let st = match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                rustix::fs::unlinkat(&parent, name, AtFlags::empty())?;
                continue;
            }
            let dir = rustix::fs::openat(
                &parent,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700))?;
            stack.push((path.clone(), true));
            for entry in rustix::fs::Dir::read_from(&dir)? {
                let entry = entry?;
                let child = entry.file_name().to_bytes();
                if child == b"." || child == b".." {
                    continue;
                }
                let child = OsStr::from_bytes(child);
                let is_dir = match entry.file_type() {
                    FileType::Directory => true,
                    FileType::Unknown => {
                        let st = rustix::fs::statat(&dir, child, AtFlags::SYMLINK_NOFOLLOW)?;
                        FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    }
                    _ => false,
                };
                if is_dir {
                    stack.push((path.join(child), false));
                } else {
                    rustix::fs::unlinkat(&dir, child, AtFlags::empty())?;
                }
            }
        }
        Ok(())
    }
}

/// Sets the owner and group of an open file.
pub fn chown(fd: impl AsFd, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    let uid = uid.map(rustix::fs::Uid::from_raw);
    let gid = gid.map(rustix::fs::Gid::from_raw);
    Ok(rustix::fs::fchown(fd, uid, gid)?)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;

    use super::*;

    fn setup() -> (tempfile::TempDir, Beneath) {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("rel")).unwrap();
        fs::write(t.path().join("secret"), "root only").unwrap();
        let b = Beneath::open(&t.path().join("rel")).unwrap();
        (t, b)
    }

    #[test]
    fn writes_stay_beneath() {
        let (t, b) = setup();
        let rel = t.path().join("rel");
        std::os::unix::fs::symlink("..", rel.join("up")).unwrap();
        std::os::unix::fs::symlink(t.path(), rel.join("abs")).unwrap();
        fs::create_dir(rel.join("d")).unwrap();
        std::os::unix::fs::symlink("d", rel.join("inside")).unwrap();

        // Through a link out of the directory, relative or absolute: refused.
        for p in ["up/escaped", "abs/escaped"] {
            let e = b.create(Path::new(p), 0o644, Follow::Beneath).unwrap_err();
            assert!(
                e.to_string().contains("refused") && is_refused(&e),
                "{p}: {e}"
            );
            assert!(b.create_dir_all(Path::new(p), Follow::Beneath).is_err());
            assert!(
                b.symlink(Path::new("x"), Path::new(p), Follow::Beneath)
                    .is_err()
            );
        }
        assert!(!t.path().join("escaped").exists());
        for p in ["up/secret", "abs/secret"] {
            assert!(b.open_read(Path::new(p), Follow::Beneath).is_err(), "{p}");
        }
        assert!(
            b.open_read(Path::new("../secret"), Follow::Beneath)
                .is_err()
        );
        assert!(b.hard_link(Path::new("up/secret"), Path::new("h")).is_err());

        // Through a link that stays inside: followed with Beneath, refused with Never.
        let mut f = b
            .create(Path::new("inside/a"), 0o600, Follow::Beneath)
            .unwrap();
        f.write_all(b"x").unwrap();
        assert!(rel.join("d/a").is_file());
        assert!(
            b.create(Path::new("inside/b"), 0o600, Follow::Never)
                .is_err()
        );
        // The last component is never followed, and never replaced.
        assert!(
            b.create(Path::new("inside"), 0o600, Follow::Beneath)
                .is_err()
        );
        assert!(b.create(Path::new("d/a"), 0o600, Follow::Beneath).is_err());
        // A directory chain is made, and chmod never follows a link.
        b.create_dir_all(Path::new("x/y/z"), Follow::Never).unwrap();
        assert!(rel.join("x/y/z").is_dir());
        assert!(b.chmod_dir(Path::new("up"), 0o777).is_err());
    }

    #[test]
    fn remove_tree_never_follows_links() {
        let (t, b) = setup();
        let rel = t.path().join("rel");
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "x").unwrap();
        fs::create_dir_all(rel.join("tree/a/b")).unwrap();
        fs::write(rel.join("tree/a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, rel.join("tree/a/out")).unwrap();
        std::os::unix::fs::symlink("../../..", rel.join("tree/a/b/up")).unwrap();
        // A read-only directory is emptied too.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(rel.join("tree/a"), fs::Permissions::from_mode(0o500)).unwrap();
        b.remove_tree(Path::new("tree")).unwrap();
        assert!(!rel.join("tree").exists());
        assert!(outside.join("keep").exists());
        assert!(t.path().join("secret").exists());
        // A link given as the tree is removed as a link.
        std::os::unix::fs::symlink(&outside, rel.join("l")).unwrap();
        b.remove_tree(Path::new("l")).unwrap();
        assert!(outside.join("keep").exists() && rel.symlink_metadata().is_ok());
        // Nothing there: fine. Through a link: refused.
        b.remove_tree(Path::new("none")).unwrap();
        std::os::unix::fs::symlink(&outside, rel.join("l2")).unwrap();
        assert!(b.remove_tree(Path::new("l2/keep")).is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn deep_trees_are_removed_with_few_descriptors() {
        let (t, b) = setup();
        let mut p = PathBuf::from("deep");
        for _ in 0..1500 {
            p.push("d");
        }
        b.create_dir_all(&p, Follow::Never).unwrap();
        b.remove_tree(Path::new("deep")).unwrap();
        assert!(!t.path().join("rel/deep").exists());
    }
}
