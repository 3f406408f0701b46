//! Bad artifacts and bad artifact servers: each gets a clear error and the running version
//! keeps running (same process).

use drover_tests::artifact::{self, Entry, hello_bytes, tar_gz};
use drover_tests::faulty::{Faulty, Script};
use drover_tests::host::{Fleet, Host};

/// A fleet with hello 1.0.0 running on one host, plus a scripted server for new artifacts.
fn running(extra: &str) -> (Fleet, Host, Faulty, i32) {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let faulty = Faulty::start();
    // Serve 1.0.0 from the scripted server too, so switching servers changes nothing else.
    faulty.set(
        "/hello-1.0.0.tar.gz",
        Script::Body(std::fs::read(f.artifacts().join("hello-1.0.0.tar.gz")).unwrap()),
    );
    h.write_config(f.repo.dir.to_str().unwrap(), &faulty.url(), extra);
    let pid = h.app_pids()[0];
    (f, h, faulty, pid)
}

fn assert_untouched(h: &Host, pid: i32) {
    assert_eq!(h.app_pids(), vec![pid], "the running app was not touched");
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    assert_eq!(h.current_dir().as_deref(), Some("1.0.0"));
    assert!(
        !h.releases().iter().any(|r| r.ends_with(".tmp")),
        "no half-staged release is left: {:?}",
        h.releases()
    );
}

#[test]
fn a_missing_artifact_is_reported_and_retried_later() {
    let (f, h, faulty, pid) = running("");
    let bytes = hello_bytes("2.0.0", &[]);
    f.pin_raw("2.0.0", &artifact::sha256(&bytes));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains(&format!(
            "artifact {}/hello-2.0.0.tar.gz not found (HTTP 404)",
            faulty.url()
        )),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("(will retry)"), "{}", out.stdout);
    assert_untouched(&h, pid);
    // The upload finishes: the next pass deploys it.
    faulty.set("/hello-2.0.0.tar.gz", Script::Body(bytes));
    assert_eq!(h.once().code, 0);
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
}

#[test]
fn server_errors_are_retried_with_backoff() {
    let (f, h, faulty, _) = running("");
    let bytes = hello_bytes("2.0.0", &[]);
    faulty.set(
        "/hello-2.0.0.tar.gz",
        Script::FailThen(2, 503, bytes.clone()),
    );
    f.pin_raw("2.0.0", &artifact::sha256(&bytes));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(faulty.hits("/hello-2.0.0.tar.gz"), 3);
    assert!(
        out.stderr.contains("HTTP 503 after 1 attempt(s)"),
        "{}",
        out.stderr
    );
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
}

#[test]
fn a_digest_mismatch_installs_nothing() {
    let (f, h, faulty, pid) = running("");
    let bytes = hello_bytes("2.0.0", &[]);
    faulty.set("/hello-2.0.0.tar.gz", Script::Body(bytes));
    let wrong = artifact::sha256(b"something else");
    f.pin_raw("2.0.0", &wrong);
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains(&format!("sha256 mismatch: the repo pins {wrong}")),
        "{}",
        out.stdout
    );
    assert_untouched(&h, pid);
    assert_eq!(h.hello()["failed"]["version"], "2.0.0");
    // Nothing unverified stays in the cache.
    let cache: Vec<_> = std::fs::read_dir(h.state.join("cache"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cache.len(), 1, "only 1.0.0's artifact");
}

#[test]
fn a_truncated_download_is_retried_then_reported() {
    let (f, h, faulty, pid) = running("download: { retries: 1 }\n");
    let bytes = hello_bytes("2.0.0", &[]);
    let len = bytes.len();
    faulty.set(
        "/hello-2.0.0.tar.gz",
        Script::Truncate(bytes.clone(), len / 2),
    );
    f.pin_raw("2.0.0", &artifact::sha256(&bytes));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains(&format!(
            "download truncated at {} of {len} bytes (after 2 attempt(s))",
            len / 2
        )),
        "{}",
        out.stdout
    );
    assert_eq!(faulty.hits("/hello-2.0.0.tar.gz"), 2);
    assert_untouched(&h, pid);
}

#[test]
fn hostile_archives_are_rejected() {
    let (f, h, faulty, pid) = running("");
    let outside = h.base.join("x");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "2.0.1",
            tar_gz(&[Entry::File("../x", b"evil", 0o644)]),
            "contains `..`",
        ),
        (
            "2.0.2",
            tar_gz(&[Entry::File("/etc/x", b"evil", 0o644)]),
            "path is absolute",
        ),
        (
            "2.0.3",
            tar_gz(&[Entry::Symlink("root", "/")]),
            "points outside the release",
        ),
        (
            "2.0.4",
            tar_gz(&[Entry::Symlink("up", "../../../x")]),
            "points outside the release",
        ),
        (
            "2.0.5",
            tar_gz(&[Entry::Hardlink("passwd", "/etc/passwd")]),
            "hard link target `/etc/passwd`: path is absolute",
        ),
        (
            "2.0.6",
            tar_gz(&[Entry::Hardlink("h", "../../x")]),
            "contains `..`",
        ),
        (
            "2.0.7",
            tar_gz(&[Entry::CharDevice("dev/null")]),
            "device and FIFO files are not allowed",
        ),
        (
            "2.0.8",
            tar_gz(&[
                Entry::Dir("d/"),
                Entry::Symlink("d/p", ".."),
                Entry::Symlink("d/p/q", "../x"),
            ]),
            "written through a symlink",
        ),
    ];
    for (version, bytes, expect) in cases {
        faulty.set(
            &format!("/hello-{version}.tar.gz"),
            Script::Body(bytes.clone()),
        );
        f.pin_raw(version, &artifact::sha256(&bytes));
        let out = h.once();
        assert_eq!(out.code, 1, "{version}: {}", out.all());
        assert!(
            out.stdout.contains("unsafe archive entry"),
            "{version}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains(expect),
            "{version}: want `{expect}` in {}",
            out.stdout
        );
        assert!(!outside.exists(), "{version} wrote outside the release");
        assert_untouched(&h, pid);
    }
}

#[test]
fn archives_over_the_limits_are_rejected() {
    let (f, h, faulty, pid) = running("limits: { max_unpacked_size: 1MiB }\n");
    let bytes = hello_bytes("2.0.0", &[]);
    faulty.set("/hello-2.0.0.tar.gz", Script::Body(bytes.clone()));
    f.pin_raw("2.0.0", &artifact::sha256(&bytes));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("archive unpacks to more than limits.max_unpacked_size (1048576 bytes)"),
        "{}",
        out.stdout
    );
    assert_untouched(&h, pid);

    h.write_config(
        f.repo.dir.to_str().unwrap(),
        &faulty.url(),
        "limits: { max_artifact_size: 100KiB }\n",
    );
    let bytes = hello_bytes("2.0.1", &[]);
    faulty.set("/hello-2.0.1.tar.gz", Script::Body(bytes.clone()));
    f.pin_raw("2.0.1", &artifact::sha256(&bytes));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("over limits.max_artifact_size (102400 bytes)"),
        "{}",
        out.stdout
    );
    assert_untouched(&h, pid);
}

#[test]
fn a_full_disk_fails_cleanly_and_recovers() {
    let f = Fleet::new();
    let base = f.dir.path().join("small");
    let Some(_mnt) = drover_tests::Tmpfs::mount(&base, "64m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); disk-full path not exercised");
        return;
    };
    let h = Host::new(
        &base,
        "h1",
        f.repo.dir.to_str().unwrap(),
        &f.art.url(),
        "limits: { min_free_space: 0 }\n",
    );
    f.pin(&f.hello("1.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let pid = h.app_pids()[0];
    // Fill the disk, leaving room for the download but not for unpacking it.
    let v2 = f.hello("2.0.0", &[]);
    let artifact_len = std::fs::metadata(&v2.path).unwrap().len();
    let filler = base.join("filler");
    let fill_leaving = |keep: u64| {
        let _ = std::fs::remove_file(&filler);
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&base)
            .output()
            .unwrap();
        let free: u64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::write(&filler, vec![0u8; free.saturating_sub(keep) as usize]).unwrap();
    };
    fill_leaving(artifact_len + 512 * 1024);
    f.pin(&v2);
    let out = h.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains("No space left on device"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("(will retry)"), "{}", out.stdout);
    assert_untouched(&h, pid);
    // The pre-check refuses downloads that cannot fit.
    std::fs::remove_file(h.state.join("cache").join(&v2.sha256)).ok();
    fill_leaving(64 * 1024);
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("not enough disk space"),
        "{}",
        out.stdout
    );
    assert_untouched(&h, pid);
    // Space is freed: the next pass deploys.
    std::fs::remove_file(&filler).unwrap();
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
}
