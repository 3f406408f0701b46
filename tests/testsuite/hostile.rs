//! Hostile input on the agent (issue 11, in part): a commit built to exhaust the agent's
//! memory or stack is refused with where and why, in bounded memory, and the running version
//! stays.

use std::os::unix::process::CommandExt;

use drover_tests::host::{Fleet, Host};

/// Host h1 running hello 1.0.0, and its app's pids.
fn running(f: &Fleet) -> (Host, Vec<i32>) {
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let pids = h.app_pids();
    (h, pids)
}

/// Nine levels of nine aliases: 9^10 values once expanded (the report's 407-byte bomb).
fn bomb() -> String {
    let mut text = String::from("environment: test\nx0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        text.push_str(&format!(
            "x{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text
}

#[test]
fn a_yaml_bomb_commit_is_refused_in_bounded_memory_and_the_running_version_stays() {
    let f = Fleet::new();
    let (h, pids) = running(&f);
    for (what, text) in [
        ("alias bomb", bomb()),
        (
            "deep nesting",
            format!("environment: test\nx:\n{}x\n", "- ".repeat(100_000)),
        ),
    ] {
        f.repo.write("environments/test.yaml", &text);
        f.repo.commit(what);
        // At most 1 GiB of address space (the unbounded parser needed over 6 GB).
        let mut cmd = h.cmd(&["once"]);
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.code().is_some(),
            "{what}: killed by a signal: {all}"
        );
        assert_ne!(out.status.code(), Some(0), "{what}: {all}");
        assert!(all.contains("environments/test.yaml:"), "{what}: {all}");
        assert!(
            all.contains("alias bomb") || all.contains("levels deep"),
            "{what}: {all}"
        );
        assert_eq!(h.version().as_deref(), Some("1.0.0"), "{what}");
        assert_eq!(
            h.app_pids(),
            pids,
            "{what}: the running app was not touched"
        );
        // validate says the same.
        let v = std::process::Command::new(drover_tests::bin("drover-agent"))
            .arg("validate")
            .arg(&f.repo.dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&v.stdout).to_string();
        assert_eq!(v.status.code(), Some(1), "{text}");
        assert!(text.contains("environments/test.yaml:"), "{text}");
    }
}

/// Files under `dir` (recursively) whose name ends with one of `suffixes`.
fn files(dir: &std::path::Path, suffixes: &[&str], out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            files(&p, suffixes, out);
        } else if ft.is_file() && suffixes.iter().any(|s| p.to_string_lossy().ends_with(s)) {
            out.push(p);
        }
    }
}

#[test]
fn state_events_and_rendered_templates_are_not_world_readable() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let mut state = Vec::new();
    files(&h.state, &[".json", "events.jsonl"], &mut state);
    assert!(state.len() >= 2, "{state:?}");
    for p in &state {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    let rendered = h.root().join("current/config/app.env");
    assert_eq!(mode(&rendered), 0o640, "{}", rendered.display());
    // A token file every user can read is refused, saying why.
    let token = h.base.join("agent.token");
    std::fs::write(&token, "t").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cfg = std::fs::read_to_string(&h.config).unwrap();
    cfg.push_str(&format!(
        "coordinator: {{ url: \"http://127.0.0.1:1\", token_file: \"{}\" }}\n",
        token.display()
    ));
    std::fs::write(&h.config, cfg).unwrap();
    let out = h.run_cmd(&["check-config"], &[]);
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("readable by every user") && out.all().contains("chmod 600"),
        "{}",
        out.all()
    );
}

/// A link through an earlier link (`d/l -> ..`, then `config -> d/l/..`): it reads as inside
/// the release but is its parent on disk, where the template would then be written. Refused
/// at extraction; nothing is written outside, the running version stays.
#[test]
fn a_link_through_an_earlier_link_cannot_carry_a_template_outside() {
    use drover_tests::artifact::{Entry, tar_gz, write};
    let f = Fleet::new();
    let (h, pids) = running(&f);
    let hello = std::fs::read(drover_tests::bin("hello")).unwrap();
    let bytes = tar_gz(&[
        Entry::Dir("bin/"),
        Entry::File("bin/hello", &hello, 0o755),
        Entry::Dir("d/"),
        Entry::Symlink("d/l", ".."),
        Entry::Symlink("config", "d/l/.."),
        Entry::File("app.env.tmpl", b"X={port}\n", 0o644),
        Entry::File("release.env", b"VERSION=2.0.0\n", 0o644),
    ]);
    let built = write(&f.artifacts(), "2.0.0", &bytes);
    f.pin(&built);
    let out = h.once();
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all().contains("points outside the release"),
        "{}",
        out.all()
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    assert_eq!(h.app_pids(), pids);
    // Nothing next to the releases, nor above the install root.
    assert!(!h.root().join("releases/app.env").exists());
    assert!(!h.root().join("app.env").exists());
}

/// An app (or anyone with its rights) may swap its shared dir for a link, or an operator may
/// put it on another disk: the agent links releases to it but never writes through it, so a
/// link to `/etc` cannot be chowned to the app's user.
#[test]
fn a_link_in_shared_is_used_but_never_written_through() {
    use std::os::unix::fs::MetadataExt;
    let f = Fleet::new();
    let (h, _) = running(&f);
    let outside = f.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let before = std::fs::metadata(&outside).unwrap();
    let shared = h.root().join("shared/data");
    std::fs::remove_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&outside, &shared).unwrap();
    f.pin(&f.hello("2.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
    assert!(std::fs::symlink_metadata(&shared).unwrap().is_symlink());
    let after = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (before.uid(), before.gid(), before.mode())
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

/// The hello artifact with an `after_install` hook that prints the rendered config (which
/// holds `{env.DROVER_TEST_SECRET}`) and an API key, then fails.
fn leaky(f: &Fleet, version: &str) -> drover_tests::artifact::Built {
    use drover_tests::artifact::{Entry, tar_gz, write};
    let hello = std::fs::read(drover_tests::bin("hello")).unwrap();
    let leak = b"#!/bin/sh\necho 'migration failed with this config:'\ncat config/app.env\necho 'api_key=AKIA0123456789 rejected'\nexit 3\n";
    let tmpl = b"PORT={port}\nSECRET={env.DROVER_TEST_SECRET}\n";
    let release = format!("VERSION={version}\n");
    let bytes = tar_gz(&[
        Entry::Dir("bin/"),
        Entry::File("bin/hello", &hello, 0o755),
        Entry::File("bin/leak", leak, 0o755),
        Entry::Dir("config/"),
        Entry::File("config/app.env.tmpl", tmpl, 0o644),
        Entry::File("release.env", release.as_bytes(), 0o644),
    ]);
    write(&f.artifacts(), version, &bytes)
}

/// A failing hook prints a secret: what leaves the host (the coordinator's history and
/// status, events, the state file, `status`, the agent's log) has it masked.
#[test]
fn a_failing_hook_keeps_its_secrets_on_the_host() {
    use drover_tests::coordinator::Coordinator;
    let f = Fleet::new();
    let c = Coordinator::start(f.dir.path(), "");
    let h = f.host_with("h1", "test", &c.agent_config());
    let service = drover_tests::host::SERVICE
        .replace(
            "hooks:\n  before_stop: bin/drain\n",
            "hooks:\n  after_install: bin/leak\nredact: [\"api_key=\\\\S+\"]\n",
        )
        .replace("  shared: [data]\n", "");
    assert!(service.contains("redact:"), "{service}");
    f.repo.write("services/hello.yaml", &service);
    let built = leaky(&f, "1.0.0");
    c.wait_commit(&f.pin(&built));
    let out = h.once();
    assert_ne!(out.code, 0, "{}", out.all());
    let mut seen = vec![("agent output", out.all())];
    drover_tests::wait_for(
        "the failure to reach the coordinator",
        std::time::Duration::from_secs(30),
        || {
            let history = serde_json::to_string(&c.history()).unwrap();
            history.contains("after_install").then_some(())
        },
    );
    seen.push((
        "coordinator history",
        serde_json::to_string(&c.history()).unwrap(),
    ));
    seen.push(("coordinator status", c.status().to_string()));
    seen.push(("agent status", h.status().to_string()));
    let mut state = Vec::new();
    files(&h.state, &[".json", ".jsonl", ".log"], &mut state);
    for p in state {
        seen.push((
            "state file",
            std::fs::read_to_string(&p).unwrap_or_default(),
        ));
    }
    for (what, text) in &seen {
        assert!(!text.contains("s3cret"), "{what} holds the secret: {text}");
        assert!(
            !text.contains("AKIA0123456789"),
            "{what} holds the key: {text}"
        );
    }
    // The failure is still explained, with the secrets masked.
    let history = &seen[1].1;
    assert!(
        history.contains("SECRET=[redacted]") && history.contains("[redacted] rejected"),
        "{history}"
    );
}

/// `run_as` in the agent config: the app runs as that user, its templates are readable by
/// its group and not writable by it, its shared dir is its own.
#[test]
fn apps_run_as_the_configured_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let f = Fleet::new();
    // The user must be able to reach its release.
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let h = f.host_with("h1", "test", "run_as: { user: nobody }\n");
    std::fs::set_permissions(&h.base, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        h.base.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    f.pin(&f.hello("1.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let nobody: Vec<u32> = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(|l| {
            l.split(':')
                .skip(2)
                .take(2)
                .map(|n| n.parse().unwrap())
                .collect()
        })
        .expect("a nobody user");
    let (uid, gid) = (nobody[0], nobody[1]);
    let pids = h.app_pids();
    assert!(!pids.is_empty());
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            line.split_whitespace()
                .skip(1)
                .all(|u| u == uid.to_string()),
            "the app runs as nobody: {line}"
        );
    }
    let rendered = std::fs::metadata(h.root().join("current/config/app.env")).unwrap();
    assert_eq!(
        (rendered.uid(), rendered.gid(), rendered.mode() & 0o777),
        (0, gid, 0o640)
    );
    let shared = std::fs::metadata(h.root().join("shared/data")).unwrap();
    assert_eq!((shared.uid(), shared.gid()), (uid, gid));
    // The service's own run.user wins, and a user missing on the host fails before stopping.
    let service = drover_tests::host::SERVICE.replace(
        "  stop_timeout: 5s\n",
        "  stop_timeout: 5s\n  user: no-such-user-here\n",
    );
    f.repo.write("services/hello.yaml", &service);
    f.pin(&f.hello("2.0.0", &[]));
    let before = h.app_pids();
    let out = h.once();
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.all()
            .contains("user `no-such-user-here` does not exist on this host"),
        "{}",
        out.all()
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    assert_eq!(h.app_pids(), before);
}
