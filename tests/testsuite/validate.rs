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

mod ci_gate {
    //! The CI gate examples (README "Gating promotions in CI") run as written.
    use super::*;
    use drover_desired::yaml::{self, Node, Value};
    use drover_tests::workspace;

    fn load(path: &str) -> Node {
        let text = std::fs::read_to_string(workspace().join(path)).unwrap();
        yaml::parse(path, &text).unwrap_or_else(|p| panic!("{path}: {p}"))
    }

    fn get<'a>(node: &'a Node, key: &str) -> &'a Node {
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no `{key}` at {}", node.mark)),
            _ => panic!("{} is {}, not a mapping", node.mark, node.kind()),
        }
    }

    fn items(node: &Node) -> &[Node] {
        match &node.value {
            Value::Seq(items) => items,
            _ => panic!("{} is {}, not a list", node.mark, node.kind()),
        }
    }

    fn text(node: &Node) -> &str {
        node.as_str()
            .unwrap_or_else(|| panic!("{} is not a scalar", node.mark))
    }

    /// A .deb holding the built agent, as the examples download it (a file:// URL: curl
    /// fetches it exactly as it would over HTTP, with no network).
    fn agent_deb(dir: &std::path::Path) -> String {
        let root = dir.join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: drover-agent\nVersion: 0.1.0-1\nArchitecture: amd64\nMaintainer: t <t@t>\nDescription: test\n",
        )
        .unwrap();
        std::fs::copy(bin("drover-agent"), root.join("usr/bin/drover-agent")).unwrap();
        let deb = dir.join("drover-agent.deb");
        let out = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Znone", "--build"])
            .arg(&root)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        format!("file://{}", deb.display())
    }

    /// A good repo and a bad one (a typo in a field name, found at its line).
    fn repos(dir: &std::path::Path) -> [std::path::PathBuf; 2] {
        let good = dir.join("good");
        write(&good, "services/hello.yaml", SERVICE);
        write(
            &good,
            "environments/test.yaml",
            "environment: test\nservices:\n  hello: { version: 1.0.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n",
        );
        let bad = dir.join("bad");
        write(&bad, "services/hello.yaml", SERVICE);
        write(
            &bad,
            "environments/test.yaml",
            "environment: test\nservices:\n  hello: { versoin: 1.0.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n",
        );
        [good, bad]
    }

    /// Runs `script` with bash -e in `repo`, as a CI runner would.
    fn run_script(script: &str, repo: &std::path::Path, env: &[(&str, String)]) -> (i32, String) {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(repo)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn judge(
        name: &str,
        script: &str,
        env: &dyn Fn(&std::path::Path) -> Vec<(&'static str, String)>,
    ) {
        let t = TestDir::new();
        let [good, bad] = repos(t.path());
        let (code, out) = run_script(script, &good, &env(&t.path().join("good-runner")));
        assert_eq!(code, 0, "{name} on a good repo:\n{script}\n{out}");
        assert!(
            out.contains("ok: 1 service(s), 1 environment(s)"),
            "{name}: {out}"
        );
        let (code, out) = run_script(script, &bad, &env(&t.path().join("bad-runner")));
        assert_ne!(code, 0, "{name} passed a bad repo:\n{out}");
        assert!(
            out.contains("environments/test.yaml:3") && out.contains("versoin"),
            "{name} names the problem: {out}"
        );
    }

    #[test]
    fn the_github_actions_job_passes_a_good_repo_and_stops_a_bad_one() {
        let doc = load("examples/ci/github-actions.yml");
        let job = get(get(&doc, "jobs"), "validate");
        assert_eq!(
            text(get(get(job, "env"), "DROVER_DEB_URL")),
            "${{ vars.DROVER_DEB_URL }}"
        );
        let steps = items(get(job, "steps"));
        assert_eq!(text(get(&steps[0], "uses")), "actions/checkout@v4");
        let script: String = steps[1..]
            .iter()
            .map(|s| text(get(s, "run")).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let t = TestDir::new();
        let url = agent_deb(t.path());
        judge("GitHub Actions", &script, &|runner| {
            std::fs::create_dir_all(runner).unwrap();
            vec![
                ("DROVER_DEB_URL", url.clone()),
                ("RUNNER_TEMP", runner.display().to_string()),
            ]
        });
    }

    #[test]
    fn the_gitlab_job_passes_a_good_repo_and_stops_a_bad_one() {
        let doc = load("examples/ci/gitlab-ci.yml");
        let job = get(&doc, "drover-validate");
        let script: String = items(get(job, "script"))
            .iter()
            .map(text)
            .collect::<Vec<_>>()
            .join("\n");
        // The job writes to /tmp as a container would; here it gets a scratch /tmp of its own.
        let t = TestDir::new();
        let url = agent_deb(t.path());
        let script = script.replace("/tmp/", "\"$JOB_TMP\"/");
        judge("GitLab CI", &script, &|runner| {
            std::fs::create_dir_all(runner).unwrap();
            vec![
                ("DROVER_DEB_URL", url.clone()),
                ("JOB_TMP", runner.display().to_string()),
            ]
        });
    }

    #[test]
    fn the_pre_commit_hook_passes_a_good_repo_and_stops_a_bad_one() {
        let doc = load(".pre-commit-hooks.yaml");
        let hook = &items(&doc)[0];
        assert_eq!(text(get(hook, "id")), "drover-validate");
        assert_eq!(text(get(hook, "language")), "system");
        // pre-commit would otherwise append the changed files to the command line.
        assert_eq!(text(get(hook, "pass_filenames")), "false");
        // pre-commit matches `files` with Python's re.search; this pattern means the same here.
        let files = regex::Regex::new(text(get(hook, "files"))).unwrap();
        assert!(files.is_match("services/hello.yaml") && files.is_match("environments/prod.yaml"));
        assert!(!files.is_match("README.md") && !files.is_match("docs/services/x.yaml"));
        let entry = text(get(hook, "entry")).to_string();
        let path = format!(
            "{}:{}",
            bin("drover-agent").parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        judge("pre-commit", &entry, &|_| vec![("PATH", path.clone())]);
    }
}
