use std::fs;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// Builds a tar.gz in memory with raw headers, so hostile entries can be made.
struct Tar {
    b: tar::Builder<flate2::write::GzEncoder<Vec<u8>>>,
}

impl Tar {
    fn new() -> Tar {
        Tar {
            b: tar::Builder::new(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::fast(),
            )),
        }
    }
    fn header(path: &str, kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // Write the name bytes directly: set_path refuses `..` and absolute paths.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o755);
        h.set_cksum();
        h
    }
    fn file(mut self, path: &str, data: &[u8]) -> Tar {
        let h = Tar::header(path, EntryType::Regular, data.len() as u64);
        self.b.append(&h, data).unwrap();
        self
    }
    fn dir(mut self, path: &str) -> Tar {
        let h = Tar::header(path, EntryType::Directory, 0);
        self.b.append(&h, io::empty()).unwrap();
        self
    }
    fn link(mut self, path: &str, kind: EntryType, to: &str) -> Tar {
        let mut h = Tar::header(path, kind, 0);
        h.set_link_name_literal(to).unwrap();
        h.set_cksum();
        self.b.append(&h, io::empty()).unwrap();
        self
    }
    fn special(mut self, path: &str, kind: EntryType) -> Tar {
        let h = Tar::header(path, kind, 0);
        self.b.append(&h, io::empty()).unwrap();
        self
    }
    fn extract(self, limit: u64) -> (tempfile::TempDir, Result<(), ExtractError>) {
        let bytes = self.b.into_inner().unwrap().finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ar = dir.path().join("a.tar.gz");
        fs::write(&ar, bytes).unwrap();
        let dest = dir.path().join("out");
        fs::create_dir(&dest).unwrap();
        let r = extract(&ar, &dest, limit);
        (dir, r)
    }
}

fn rejected(t: Tar, what: &str) {
    let (dir, r) = t.extract(1 << 20);
    let e = r.expect_err("must be rejected");
    assert!(e.to_string().contains(what), "{e}");
    // Nothing escaped the destination.
    assert!(!dir.path().join("x").exists());
}

#[test]
fn normal_archive_extracts() {
    let (dir, r) = Tar::new()
        .dir("bin/")
        .file("bin/app", b"#!/bin/sh\necho hi\n")
        .file("./conf/a.conf", b"k=v")
        .link("bin/run", EntryType::Symlink, "app")
        .link("conf/b.conf", EntryType::Link, "conf/a.conf")
        .link("top", EntryType::Symlink, "conf/../bin")
        .extract(1 << 20);
    r.unwrap();
    let out = dir.path().join("out");
    assert_eq!(fs::read(out.join("conf/b.conf")).unwrap(), b"k=v");
    assert_eq!(
        fs::read_link(out.join("bin/run")).unwrap(),
        Path::new("app")
    );
    let mode = fs::metadata(out.join("bin/app"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn plain_tar_extracts() {
    let mut b = tar::Builder::new(Vec::new());
    let h = Tar::header("hello.txt", EntryType::Regular, 2);
    b.append(&h, &b"hi"[..]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar");
    fs::write(&ar, b.into_inner().unwrap()).unwrap();
    let dest = dir.path().join("out");
    fs::create_dir(&dest).unwrap();
    // 2 bytes of data, plus 512 for the entry itself.
    extract(&ar, &dest, 514).unwrap();
    assert_eq!(fs::read(dest.join("hello.txt")).unwrap(), b"hi");
}

#[test]
fn traversal_is_rejected() {
    rejected(Tar::new().file("../x", b"evil"), "contains `..`");
    rejected(Tar::new().file("a/../../x", b"evil"), "contains `..`");
    rejected(Tar::new().file("/etc/x", b"evil"), "absolute");
}

#[test]
fn escaping_links_are_rejected() {
    rejected(
        Tar::new().link("root", EntryType::Symlink, "/"),
        "points outside",
    );
    rejected(
        Tar::new().link("up", EntryType::Symlink, "../.."),
        "points outside",
    );
    rejected(
        Tar::new().link("h", EntryType::Link, "/etc/passwd"),
        "hard link target",
    );
    rejected(
        Tar::new().link("h", EntryType::Link, "../x"),
        "hard link target",
    );
    rejected(
        Tar::new().link("h", EntryType::Link, "missing"),
        "not a file extracted earlier",
    );
}

#[test]
fn writing_through_links_is_rejected() {
    // `deep/p -> ..` stays inside, but `deep/p/q -> ../x` would then escape.
    rejected(
        Tar::new()
            .dir("deep/")
            .link("deep/p", EntryType::Symlink, "..")
            .link("deep/p/q", EntryType::Symlink, "../x"),
        "through a symlink",
    );
    rejected(
        Tar::new()
            .link("l", EntryType::Symlink, "sub")
            .file("l", b"overwrite the link"),
        "replaces a symlink",
    );
}

#[test]
fn devices_are_rejected() {
    rejected(Tar::new().special("dev", EntryType::Char), "device");
    rejected(Tar::new().special("fifo", EntryType::Fifo), "FIFO");
}

#[test]
fn size_limit_is_enforced() {
    let (_d, r) = Tar::new().file("big", &vec![0u8; 4096]).extract(1000);
    assert!(matches!(r, Err(ExtractError::TooLarge { limit: 1000 })));
}

#[test]
fn garbage_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    fs::write(&ar, [0x1f, 0x8b, 1, 2, 3, 4]).unwrap();
    let dest = dir.path().join("out");
    fs::create_dir(&dest).unwrap();
    let e = extract(&ar, &dest, 100).unwrap_err();
    assert!(e.to_string().contains("not a valid"), "{e}");
}

/// A GNU long-name header announcing 3 GiB (the reader would hold it in memory): refused
/// from its header, before any of it is read, and in little memory.
#[test]
fn a_huge_long_name_header_is_refused_before_its_payload() {
    let mut raw = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(EntryType::GNULongName);
    h.set_size(3 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    raw.extend_from_slice(h.as_bytes());
    // 3 MB of the "name", gzip makes it tiny.
    raw.extend(std::iter::repeat_n(b'a', 3 << 20));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut gz, &raw).unwrap();
    let bytes = gz.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    fs::write(&ar, bytes).unwrap();
    let dest = dir.path().join("out");
    fs::create_dir(&dest).unwrap();
    let e = extract(&ar, &dest, 1 << 30).unwrap_err().to_string();
    assert!(
        e.contains("announces 3221225472 bytes; at most 65536"),
        "{e}"
    );
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
}

#[test]
fn many_empty_entries_are_bounded() {
    let mut t = Tar::new();
    for i in 0..3000 {
        t = t.file(&format!("f{i}"), b"");
    }
    let bytes = t.b.into_inner().unwrap().finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ar = dir.path().join("a.tar.gz");
    fs::write(&ar, bytes).unwrap();
    let run = |limits: Unpack| {
        let dest = dir
            .path()
            .join(format!("out{}-{}", limits.max_bytes, limits.max_entries));
        fs::create_dir(&dest).unwrap();
        extract_with(&ar, &dest, limits)
    };
    // Each entry counts as 512 bytes: 3000 empty files are 1.5 MB of a 1 MiB limit.
    let e = run(Unpack {
        max_bytes: 1 << 20,
        max_entries: 1_000_000,
    })
    .unwrap_err();
    assert!(matches!(e, ExtractError::TooLarge { .. }), "{e}");
    // And limits.max_entries.
    let e = run(Unpack {
        max_bytes: 1 << 30,
        max_entries: 1000,
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("more than limits.max_entries (1000)"),
        "{e}"
    );
    run(Unpack {
        max_bytes: 1 << 30,
        max_entries: 3000,
    })
    .unwrap();
}

#[test]
fn hostile_paths_are_cut_in_errors() {
    let long = format!("{}/../x", "a".repeat(90));
    let (_d, r) = Tar::new().file(&long, b"x").extract(1 << 20);
    let e = r.unwrap_err().to_string();
    assert!(e.contains(".."), "{e}");
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    let p = "d/".repeat(3000) + "f";
    assert!(shown(Path::new(&p)).len() < 300);
    assert!(shown(Path::new(&p)).contains("(6001 bytes)"));
    assert_eq!(header_size(h.as_bytes()), Some(0));
}

#[test]
fn a_link_through_an_earlier_link_is_judged_as_on_disk() {
    // `d/l -> ..` is the release root; `x -> d/l/..` reads as `d` but is its parent.
    rejected(
        Tar::new()
            .dir("d/")
            .link("d/l", EntryType::Symlink, "..")
            .link("x", EntryType::Symlink, "d/l/.."),
        "points outside",
    );
    // Loops are refused, not followed forever.
    let mut m = HashMap::new();
    m.insert(PathBuf::from("a"), PathBuf::from("b"));
    m.insert(PathBuf::from("b"), PathBuf::from("a"));
    assert_eq!(resolve_on_disk(Path::new("x"), Path::new("a"), &m), None);
    // Through a link that stays inside: fine.
    let mut m = HashMap::new();
    m.insert(PathBuf::from("d/l"), PathBuf::from("../e"));
    assert_eq!(
        resolve_on_disk(Path::new("x"), Path::new("d/l/f"), &m),
        Some(PathBuf::from("e/f"))
    );
    let (_d, r) = Tar::new()
        .dir("d/")
        .dir("e/")
        .link("d/l", EntryType::Symlink, "../e")
        .link("x", EntryType::Symlink, "d/l")
        .extract(1 << 20);
    r.unwrap();
}
