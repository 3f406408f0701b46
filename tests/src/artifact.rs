//! Artifacts for the tests: the hello demo service packaged like `examples/hello/package.sh`
//! (with extra scripts for hooks), and hand-made hostile archives.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

/// A packaged artifact.
#[derive(Clone, Debug)]
pub struct Built {
    /// Where it is.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// The version it is for.
    pub version: String,
}

/// Hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One entry of a hand-made archive.
pub enum Entry<'a> {
    /// A regular file.
    File(&'a str, &'a [u8], u32),
    /// A directory.
    Dir(&'a str),
    /// A symlink (path, target).
    Symlink(&'a str, &'a str),
    /// A hard link (path, target).
    Hardlink(&'a str, &'a str),
    /// A character device.
    CharDevice(&'a str),
}

/// A tar.gz of `entries`, names written raw (so `..` and absolute paths can be made).
pub fn tar_gz(entries: &[Entry]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for e in entries {
        let (path, kind, data, mode, link): (&str, EntryType, &[u8], u32, Option<&str>) = match e {
            Entry::File(p, d, m) => (p, EntryType::Regular, d, *m, None),
            Entry::Dir(p) => (p, EntryType::Directory, &[], 0o755, None),
            Entry::Symlink(p, t) => (p, EntryType::Symlink, &[], 0o777, Some(t)),
            Entry::Hardlink(p, t) => (p, EntryType::Link, &[], 0o644, Some(t)),
            Entry::CharDevice(p) => (p, EntryType::Char, &[], 0o644, None),
        };
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        if let Some(t) = link {
            h.set_link_name_literal(t).expect("link name");
        }
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

/// Writes `bytes` as `dir/hello-<version>.tar.gz`.
pub fn write(dir: &Path, version: &str, bytes: &[u8]) -> Built {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join(format!("hello-{version}.tar.gz"));
    std::fs::write(&path, bytes).expect("write artifact");
    Built {
        path,
        sha256: sha256(bytes),
        version: version.to_string(),
    }
}

/// The bytes of a hello release: `bin/hello`, hooks, a template, and `release.env` with
/// `VERSION=<version>` plus `env` lines (e.g. `FAIL_HEALTH=1`).
pub fn hello_bytes(version: &str, env: &[&str]) -> Vec<u8> {
    let hello = std::fs::read(crate::bin("hello")).expect("hello binary");
    let mut release_env = format!("VERSION={version}\n");
    for line in env {
        release_env.push_str(line);
        release_env.push('\n');
    }
    let drain =
        b"#!/bin/sh\necho \"draining before $DROVER_VERSION replaces $DROVER_PREVIOUS_VERSION\"\n";
    let hang = b"#!/bin/sh\necho hanging\nsleep 600\n";
    let slow = b"#!/bin/sh\nsleep 1\n";
    let fail = b"#!/bin/sh\necho migration failed >&2\nexit 7\n";
    let tmpl = b"GREETING=hello from {host} ({environment})\nPORT={port}\nSECRET={env.DROVER_TEST_SECRET}\n";
    tar_gz(&[
        Entry::Dir("bin/"),
        Entry::File("bin/hello", &hello, 0o755),
        Entry::File("bin/drain", drain, 0o755),
        Entry::File("bin/hang", hang, 0o755),
        Entry::File("bin/slow", slow, 0o755),
        Entry::File("bin/fail", fail, 0o755),
        Entry::Dir("config/"),
        Entry::File("config/app.env.tmpl", tmpl, 0o644),
        Entry::File("release.env", release_env.as_bytes(), 0o644),
    ])
}

/// Packages hello `version` into `dir`.
pub fn hello(dir: &Path, version: &str, env: &[&str]) -> Built {
    write(dir, version, &hello_bytes(version, env))
}
