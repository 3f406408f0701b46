//! Safe archive extraction.
//!
//! Every entry is checked before anything is written: no absolute paths, no `..`, no device
//! or FIFO files, symlinks must be relative and stay inside the release, nothing may be
//! written through a symlink, hard links must point at files already extracted, and the total
//! size is capped (which also stops decompression bombs). Files are created with
//! `O_NOFOLLOW | O_EXCL`, setuid/setgid bits are dropped. Beyond these checks on the archive's
//! text, every write goes through [`Beneath`] with [`Follow::Never`]: the kernel itself
//! refuses a path that passes through any link.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::beneath::{Beneath, Follow, is_refused};

/// Why an archive was rejected or could not be extracted.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs, reason = "variant fields are named for what they hold")]
pub enum ExtractError {
    /// An entry would escape the release or is not allowed.
    #[error("unsafe archive entry `{entry}`: {reason}; nothing was installed")]
    Unsafe {
        /// The entry's path in the archive.
        entry: String,
        /// Why it is rejected.
        reason: String,
    },
    /// Unpacking would exceed the size limit.
    #[error(
        "archive unpacks to more than limits.max_unpacked_size ({limit} bytes); nothing was installed"
    )]
    TooLarge { limit: u64 },
    /// The archive is not a readable tar / tar.gz.
    #[error("artifact is not a valid .tar or .tar.gz archive: {0}")]
    Corrupt(String),
    /// Writing failed (for instance the disk is full).
    #[error("extracting to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an extracted path is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
}

/// Turns an archive path into a safe relative path, or says why it is not one.
fn clean(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains `..`".into()),
            Component::RootDir | Component::Prefix(_) => return Err("path is absolute".into()),
        }
    }
    Ok(out)
}

/// Resolves a symlink target lexically from the link's directory; `None` if it escapes.
fn resolve_link(link: &Path, target: &Path) -> Option<PathBuf> {
    if target.is_absolute() {
        return None;
    }
    let mut parts: Vec<_> = link
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(_) => parts.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// What an archive may unpack to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unpack {
    /// Bytes at most (`limits.max_unpacked_size`); every entry also counts as 512 bytes, so
    /// that many empty files cannot exhaust the inodes under a small size limit.
    pub max_bytes: u64,
    /// Entries at most (`limits.max_entries`).
    pub max_entries: u64,
}

/// Default for [`Unpack::max_entries`].
pub const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// Largest GNU long-name / long-link or PAX header payload accepted (the tar reader holds it
/// in memory).
pub const MAX_META: u64 = 64 << 10;
/// Longest entry path accepted, in bytes.
pub const MAX_PATH: usize = 4096;

/// An archive path as shown in errors: hostile paths are cut.
fn shown(p: &Path) -> String {
    let s = p.display().to_string();
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Reads a tar stream and checks each header **before** the tar reader acts on it: metadata
/// entries (long names, PAX) larger than [`MAX_META`], and more than `max_entries` entries,
/// are refused before any of their payload is read.
struct Guard<R> {
    inner: R,
    /// Bytes left until the next header block (0: the next block is a header).
    until_header: u64,
    /// The header being read, and how much of it.
    header: [u8; 512],
    filled: usize,
    entries: u64,
    max_entries: u64,
    /// After the end-of-archive block nothing is parsed any more.
    done: bool,
}

/// The size field of a tar header (octal, or base-256 when the high bit is set).
fn header_size(h: &[u8; 512]) -> Option<u64> {
    let f = &h[124..136];
    if f[0] & 0x80 != 0 {
        let mut v: u64 = 0;
        for (i, b) in f.iter().enumerate() {
            let b = if i == 0 { b & 0x7f } else { *b };
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let t: String = f
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let t = t.trim();
    if t.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(t, 8).ok()
}

impl<R: Read> Guard<R> {
    fn new(inner: R, max_entries: u64) -> Guard<R> {
        Guard {
            inner,
            until_header: 0,
            header: [0; 512],
            filled: 0,
            entries: 0,
            max_entries,
            done: false,
        }
    }

    fn refuse(msg: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }

    /// Looks at `bytes` just read: payload skipped, header blocks checked.
    fn watch(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.done {
            if self.until_header > 0 {
                let n = (self.until_header.min(bytes.len() as u64)) as usize;
                self.until_header -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (512 - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled < 512 {
                continue;
            }
            self.filled = 0;
            if self.header.iter().all(|b| *b == 0) {
                self.done = true;
                continue;
            }
            let size = header_size(&self.header)
                .ok_or_else(|| Self::refuse("a tar header has an unreadable size".into()))?;
            let kind = self.header[156];
            if matches!(kind, b'L' | b'K' | b'x' | b'g') && size > MAX_META {
                return Err(Self::refuse(format!(
                    "a long-name or PAX header announces {size} bytes; at most {MAX_META}"
                )));
            }
            self.entries += 1;
            if self.entries > self.max_entries {
                return Err(Self::refuse(format!(
                    "more than limits.max_entries ({}) entries",
                    self.max_entries
                )));
            }
            // Payload, padded to whole blocks.
            self.until_header = size.div_ceil(512).saturating_mul(512);
        }
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.watch(&buf[..n])?;
        Ok(n)
    }
}

/// One step of a path being resolved.
enum Step {
    Name(std::ffi::OsString),
    Up,
}

/// The steps of a relative path; `None` if it is absolute.
fn steps(p: &Path) -> Option<Vec<Step>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(Step::Name(n.to_os_string())),
            Component::ParentDir => out.push(Step::Up),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Resolves a symlink target as the filesystem will: from the link's directory, following the
/// links extracted earlier (`links`: link path → its target), at most 40 of them as the kernel
/// does. `None` if it escapes the release (or loops).
fn resolve_on_disk(
    link: &Path,
    target: &Path,
    links: &HashMap<PathBuf, PathBuf>,
) -> Option<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = link
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let mut queue: std::collections::VecDeque<Step> = steps(target)?.into();
    let mut hops = 0;
    while let Some(step) = queue.pop_front() {
        match step {
            Step::Name(n) => {
                parts.push(n);
                let here: PathBuf = parts.iter().collect();
                if let Some(to) = links.get(&here) {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    parts.pop();
                    for s in steps(to)?.into_iter().rev() {
                        queue.push_front(s);
                    }
                }
            }
            Step::Up => {
                parts.pop()?;
            }
        }
    }
    Some(parts.iter().collect())
}

/// Extracts the archive at `archive` (tar, or tar.gz by its magic bytes) into the empty
/// directory `dest`, unpacking at most `max_bytes` (and [`DEFAULT_MAX_ENTRIES`] entries).
pub fn extract(archive: &Path, dest: &Path, max_bytes: u64) -> Result<(), ExtractError> {
    extract_with(
        archive,
        dest,
        Unpack {
            max_bytes,
            max_entries: DEFAULT_MAX_ENTRIES,
        },
    )
}

/// Extracts within `limits`.
pub fn extract_with(archive: &Path, dest: &Path, limits: Unpack) -> Result<(), ExtractError> {
    let max_bytes = limits.max_bytes;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| {
            if is_refused(&source) {
                ExtractError::Unsafe {
                    entry: shown(path.strip_prefix(dest).unwrap_or(&path)),
                    reason: source.to_string(),
                }
            } else {
                ExtractError::Io { path, source }
            }
        }
    };
    let mut file =
        BufReader::with_capacity(256 << 10, File::open(archive).map_err(io_err(archive))?);
    // Peek at the magic bytes without consuming them.
    let gz = file
        .fill_buf()
        .map_err(io_err(archive))?
        .starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let root = Beneath::open(dest).map_err(io_err(dest))?;
    let mut ar = tar::Archive::new(Guard::new(reader, limits.max_entries));
    let mut seen: HashMap<PathBuf, Kind> = HashMap::new();
    let mut links: HashSet<PathBuf> = HashSet::new();
    let mut link_to: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut total: u64 = 0;
    let entries = ar
        .entries()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ExtractError::Corrupt(e.to_string()))?;
        let raw = entry
            .path()
            .map_err(|e| ExtractError::Corrupt(e.to_string()))?
            .into_owned();
        let shown = shown(&raw);
        let unsafe_entry = |reason: &str| ExtractError::Unsafe {
            entry: shown.clone(),
            reason: reason.to_string(),
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }
        if raw.as_os_str().len() > MAX_PATH {
            return Err(unsafe_entry(&format!("its path is over {MAX_PATH} bytes")));
        }
        let rel = clean(&raw).map_err(|r| unsafe_entry(&r))?;
        if rel.as_os_str().is_empty() {
            continue; // the archive's root directory
        }
        if rel.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(unsafe_entry("it would be written through a symlink"));
        }
        if seen.get(&rel) == Some(&Kind::Link) {
            return Err(unsafe_entry("it replaces a symlink"));
        }
        let size = entry.header().size().unwrap_or(0);
        total = total.saturating_add(size).saturating_add(512);
        if total > max_bytes {
            return Err(ExtractError::TooLarge { limit: max_bytes });
        }
        let target = dest.join(&rel);
        if let Some(parent) = rel.parent() {
            root.create_dir_all(parent, Follow::Never)
                .map_err(io_err(&dest.join(parent)))?;
        }
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        match kind {
            EntryType::Directory => {
                match root.mkdir(&rel, 0o700, Follow::Never) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::AlreadyExists
                            && seen.get(&rel) != Some(&Kind::File) => {}
                    Err(e) => return Err(io_err(&target)(e)),
                }
                root.chmod_dir(&rel, mode | 0o700)
                    .map_err(io_err(&target))?;
                seen.insert(rel, Kind::Dir);
            }
            EntryType::Regular | EntryType::Continuous => {
                if seen.get(&rel) == Some(&Kind::File) {
                    root.remove_file(&rel, Follow::Never)
                        .map_err(io_err(&target))?;
                }
                let mut out = root
                    .create(&rel, if mode == 0 { 0o644 } else { mode }, Follow::Never)
                    .map_err(io_err(&target))?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut out).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof
                        || e.kind() == io::ErrorKind::InvalidData
                    {
                        ExtractError::Corrupt(format!("{shown}: {e}"))
                    } else {
                        io_err(&target)(e)
                    }
                })?;
                if copied != size {
                    return Err(ExtractError::Corrupt(format!(
                        "{shown}: archive ends after {copied} of {size} bytes"
                    )));
                }
                seen.insert(rel, Kind::File);
            }
            EntryType::Symlink => {
                let to = entry
                    .link_name()
                    .map_err(|e| ExtractError::Corrupt(e.to_string()))?
                    .ok_or_else(|| unsafe_entry("symlink without a target"))?
                    .into_owned();
                // Judged as the filesystem will resolve it: through the links before it.
                if resolve_link(&rel, &to).is_none()
                    || resolve_on_disk(&rel, &to, &link_to).is_none()
                {
                    return Err(unsafe_entry(&format!(
                        "symlink to `{}` points outside the release",
                        to.display()
                    )));
                }
                if seen.contains_key(&rel) {
                    return Err(unsafe_entry("symlink replaces an earlier entry"));
                }
                root.symlink(&to, &rel, Follow::Never)
                    .map_err(io_err(&target))?;
                links.insert(rel.clone());
                link_to.insert(rel.clone(), to);
                seen.insert(rel, Kind::Link);
            }
            EntryType::Link => {
                let to = entry
                    .link_name()
                    .map_err(|e| ExtractError::Corrupt(e.to_string()))?
                    .ok_or_else(|| unsafe_entry("hard link without a target"))?
                    .into_owned();
                let to = clean(&to).map_err(|r| {
                    unsafe_entry(&format!("hard link target `{}`: {r}", to.display()))
                })?;
                if seen.get(&to) != Some(&Kind::File)
                    || to.ancestors().skip(1).any(|a| links.contains(a))
                {
                    return Err(unsafe_entry(&format!(
                        "hard link to `{}`, which is not a file extracted earlier",
                        to.display()
                    )));
                }
                if seen.get(&rel) == Some(&Kind::File) {
                    root.remove_file(&rel, Follow::Never)
                        .map_err(io_err(&target))?;
                }
                root.hard_link(&to, &rel).map_err(io_err(&target))?;
                seen.insert(rel, Kind::File);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(unsafe_entry("device and FIFO files are not allowed"));
            }
            other => {
                return Err(unsafe_entry(&format!("unsupported entry type {other:?}")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
