//! Artifact extraction: a hostile `.tar` or `.tar.gz` unpacked into an empty directory.
//!
//! Whatever the archive, after `extract` (whether it succeeded or refused):
//! - nothing exists outside the destination (a sibling directory stays empty);
//! - the destination holds only directories, regular files and symlinks, no set-id bit;
//! - every symlink that resolves, resolves inside the destination;
//! - the files' bytes and the entries stay within the limits.
#![no_main]

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use drover_agent::release::{Unpack, extract_with};
use libfuzzer_sys::fuzz_target;

const LIMITS: Unpack = Unpack {
    max_bytes: 1 << 20,
    max_entries: 512,
};

fuzz_target!(|data: &[u8]| {
    // On tmpfs when there is one: the target creates and removes a few files per run.
    let base = Path::new("/dev/shm");
    let sandbox = if base.is_dir() {
        tempfile::tempdir_in(base)
    } else {
        tempfile::tempdir()
    }
    .expect("temp dir");
    let archive = sandbox.path().join("artifact.tar.gz");
    fs::write(&archive, data).expect("write the archive");
    let dest = sandbox.path().join("release");
    let outside = sandbox.path().join("outside");
    fs::create_dir(&dest).expect("dest");
    fs::create_dir(&outside).expect("outside");
    let _ = extract_with(&archive, &dest, LIMITS);

    let mut around: Vec<String> = fs::read_dir(sandbox.path())
        .expect("read the sandbox")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    around.sort();
    assert_eq!(around, ["artifact.tar.gz", "outside", "release"]);
    assert_eq!(fs::read_dir(&outside).expect("outside").count(), 0);

    let root = fs::canonicalize(&dest).expect("dest");
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut inodes = HashSet::new();
    walk(&dest, &root, &mut bytes, &mut entries, &mut inodes);
    assert!(bytes <= LIMITS.max_bytes, "{bytes} bytes unpacked");
    assert!(entries <= LIMITS.max_entries, "{entries} entries unpacked");
});

fn walk(dir: &Path, root: &Path, bytes: &mut u64, entries: &mut u64, inodes: &mut HashSet<u64>) {
    for e in fs::read_dir(dir).expect("read dir") {
        let path = e.expect("entry").path();
        let meta = fs::symlink_metadata(&path).expect("lstat");
        *entries += 1;
        let t = meta.file_type();
        assert_eq!(
            meta.permissions().mode() & 0o6000,
            0,
            "set-id bit on {path:?}"
        );
        if t.is_dir() {
            walk(&path, root, bytes, entries, inodes);
        } else if t.is_symlink() {
            if let Ok(to) = fs::canonicalize(&path) {
                assert!(to.starts_with(root), "{path:?} resolves to {to:?}");
            }
        } else {
            assert!(t.is_file(), "{path:?} is {t:?}");
            if inodes.insert(meta.ino()) {
                *bytes += meta.len();
            }
        }
    }
}
