//! `drover-agent validate` and `check-config`: every problem, with file:line.

use drover_tests::host::SERVICE;
use drover_tests::{TestDir, bin};
use std::process::Command;

fn validate(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("drover-agent"))
        .arg("validate")
        .arg(dir)
        .args(args)
        .arg("--config")
        .arg(dir.join("no-such-agent.yaml"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, path: &str, text: &str) {
    let p = dir.join(path);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn a_clean_repo_passes_with_a_summary() {
    let t = TestDir::new();
    write(t.path(), "services/hello.yaml", SERVICE);
    write(
        t.path(),
        "environments/test.yaml",
        "environment: test\nservices:\n  hello: { version: 1.0.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n",
    );
    let (code, out, _) = validate(t.path(), &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        "ok: 1 service(s), 1 environment(s); host vars used: art, base, port"
    );
    // Declared host vars are checked.
    let (code, out, _) = validate(t.path(), &["--var", "port", "--var", "base"]);
    assert_eq!(code, 1);
    assert!(out.contains("unknown template name `{art}`"), "{out}");
}

#[test]
fn every_problem_is_printed_with_file_and_line() {
    let t = TestDir::new();
    // Malformed YAML.
    write(
        t.path(),
        "services/broken.yaml",
        "service: broken\nrun: [unclosed\n",
    );
    // Unknown fields (two), a bad duration, a bad URL scheme.
    write(
        t.path(),
        "services/hello.yaml",
        &SERVICE
            .replace("keep_releases: 3", "keep_releases: 3\n  kep: 1")
            .replace("  timeout: 5s", "  timeout: 5 s\n  retries: 2")
            .replace("{art}/hello", "ftp://host/hello"),
    );
    // Version missing, a bad digest, an undefined service, a duplicate key.
    write(
        t.path(),
        "environments/test.yaml",
        "environment: test\nservices:\n  hello: { sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n  ghost: { version: 1.0, sha256: 123 }\n  ghost: { version: 1.1 }\n",
    );
    write(
        t.path(),
        "environments/prod.yaml",
        "environment: prod\npromotion: { requires: qa }\nservices: {}\n",
    );
    let (code, out, err) = validate(t.path(), &[]);
    assert_eq!(code, 1);
    for expect in [
        "services/broken.yaml:3:1: invalid YAML",
        "services/hello.yaml:3:8: artifact url `ftp://host/hello-{version}.tar.gz` has scheme `ftp`",
        "services/hello.yaml:7:3: unknown field `kep`",
        "services/hello.yaml:19:12: invalid duration `5 s`",
        "services/hello.yaml:20:3: unknown field `retries`",
        "environments/test.yaml:5:3: duplicate key `ghost`",
        "environments/prod.yaml:2:24: promotion.requires: environment `qa` is not defined",
    ] {
        assert!(out.contains(expect), "missing `{expect}` in:\n{out}");
    }
    assert!(err.contains("problem(s) found"), "{err}");
    // Fixing the duplicate key reveals the problems inside the file.
    write(
        t.path(),
        "environments/test.yaml",
        "environment: test\nservices:\n  hello: { sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n  ghost: { version: 1.0, sha256: 123 }\n",
    );
    let (_, out, _) = validate(t.path(), &[]);
    for expect in [
        "environments/test.yaml:3:10: service `hello`: missing field `version`",
        "environments/test.yaml:4:34: invalid sha256 `123`",
        "environments/test.yaml:4:10: service `ghost` is not defined",
    ] {
        assert!(out.contains(expect), "missing `{expect}` in:\n{out}");
    }
}

#[test]
fn not_a_repo_is_a_clear_error() {
    let t = TestDir::new();
    let (code, _, err) = validate(t.path(), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a desired-state repo"), "{err}");
}

#[test]
fn check_config_reports_every_problem() {
    let t = TestDir::new();
    let cfg = t.path().join("agent.yaml");
    std::fs::write(&cfg, "host: h1\nenvironment: test\nrepo: { url: /srv/fleet, poll_interval: often }\nstate_dir: /tmp/x\nservice_manager: proces\n").unwrap();
    std::fs::create_dir(t.path().join("agent.d")).unwrap();
    std::fs::write(
        t.path().join("agent.d/10-extra.yaml"),
        "labels: {role: web}\ncolour: blue\n",
    )
    .unwrap();
    let out = Command::new(bin("drover-agent"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("agent.yaml:3:41: invalid duration `often`"),
        "{err}"
    );
    assert!(
        err.contains("agent.yaml:5:18: unknown variant `proces`"),
        "{err}"
    );
    assert!(
        err.contains("agent.d/10-extra.yaml:2:1: unknown field `colour`"),
        "{err}"
    );

    std::fs::remove_dir_all(t.path().join("agent.d")).unwrap();
    std::fs::write(
        &cfg,
        "host: h1\nenvironment: test\nrepo: { url: /srv/fleet }\nstate_dir: /tmp/x\n",
    )
    .unwrap();
    let out = Command::new(bin("drover-agent"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_examples_are_valid() {
    for (dir, vars) in [
        (
            "examples/fleet",
            vec![
                "--var",
                "port",
                "--var",
                "artifact_port",
                "--var",
                "hosts_dir",
            ],
        ),
        ("examples/ecs", vec![]),
    ] {
        let out = Command::new(bin("drover-agent"))
            .arg("validate")
            .arg(drover_tests::workspace().join(dir))
            .args(vars)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn a_process_managed_service_without_a_user_is_warned_about() {
    let t = TestDir::new();
    write(t.path(), "services/hello.yaml", SERVICE);
    write(
        t.path(),
        "environments/test.yaml",
        "environment: test\nservices: {}\n",
    );
    let (code, _, err) = validate(t.path(), &[]);
    assert_eq!(code, 0, "a warning, not a problem: {err}");
    assert!(
        err.contains("warning: services/hello.yaml:1:")
            && err.contains("run as root; set `run.user`"),
        "{err}"
    );
    // With a user, no warning; a bad user name is a problem at file:line.
    let with_user = SERVICE.replace("  stop_timeout: 5s\n", "  stop_timeout: 5s\n  user: app\n");
    write(t.path(), "services/hello.yaml", &with_user);
    let (code, _, err) = validate(t.path(), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
    let bad = SERVICE.replace(
        "  stop_timeout: 5s\n",
        "  stop_timeout: 5s\n  user: \"Root; rm -rf /\"\nredact: [\"(\", \"x*\"]\n",
    );
    write(t.path(), "services/hello.yaml", &bad);
    let (code, out, _) = validate(t.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("services/hello.yaml:14:") && out.contains("invalid user or group"),
        "{out}"
    );
    assert!(out.contains("invalid pattern `(`"), "{out}");
    assert!(out.contains("matches the empty string"), "{out}");
}
