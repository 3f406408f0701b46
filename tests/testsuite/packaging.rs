//! Packages and systemd: unit files verified by `systemd-analyze`, .deb/.rpm contents, and the
//! agent installed from its .deb into a real systemd (systemd-nspawn), deploying an app that
//! runs as a systemd unit.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use drover_tests::artifact;
use drover_tests::git::Repo;
use drover_tests::host::Out;
use drover_tests::nspawn::Container;
use drover_tests::{TestDir, wait_for, workspace};
use serde_json::Value;

/// Builds the packages once (release build, `packaging/build.sh`) into `packages/<rev>`.
fn packages(revision: u32) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<u32>>> = OnceLock::new();
    let dir = drover_tests::bin_dir()
        .join("test-packages")
        .join(revision.to_string());
    let lock = BUILT.get_or_init(Default::default);
    let mut built = lock.lock().unwrap();
    if !built.contains(&revision) {
        let out = Command::new(workspace().join("packaging/build.sh"))
            .arg(&dir)
            .args(["--revision", &revision.to_string()])
            .output()
            .expect("packaging/build.sh runs");
        assert!(
            out.status.success(),
            "packaging/build.sh failed (cargo-deb and cargo-generate-rpm installed?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        built.push(revision);
    }
    dir
}

fn run(cmd: &str, args: &[&str]) -> Out {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
        .into()
}

fn deb(revision: u32, name: &str) -> PathBuf {
    packages(revision).join(format!("{name}_0.1.0-{revision}_amd64.deb"))
}

fn rpm(revision: u32, name: &str) -> PathBuf {
    packages(revision).join(format!("{name}-0.1.0-{revision}.x86_64.rpm"))
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    // On the host: the units as shipped, with their /usr/bin paths pointing at the built
    // binaries (the container test verifies the installed unit with --root).
    let t = TestDir::new();
    for unit in ["drover-agent.service", "drover-coordinator.service"] {
        let text =
            std::fs::read_to_string(workspace().join("packaging/systemd").join(unit)).unwrap();
        let text = text
            .replace(
                "/usr/bin/drover-agent",
                drover_tests::bin("drover-agent").to_str().unwrap(),
            )
            .replace(
                "/usr/bin/drover-coordinator",
                drover_tests::bin("drover-coordinator").to_str().unwrap(),
            );
        let path = t.path().join(unit);
        std::fs::write(&path, text).unwrap();
        let out = run("systemd-analyze", &["verify", path.to_str().unwrap()]);
        assert_eq!(out.code, 0, "{unit}: {}", out.all());
        assert!(!out.all().contains("Unknown key"), "{unit}: {}", out.all());
    }
    // A broken unit is caught (the check is not a no-op).
    let bad = t.path().join("bad.service");
    std::fs::write(
        &bad,
        "[Service]\nType=notifyy\nExecStart=drover-agent run\n",
    )
    .unwrap();
    let out = run("systemd-analyze", &["verify", bad.to_str().unwrap()]);
    assert_ne!(out.code, 0, "{}", out.all());
}

#[test]
fn debs_and_rpms_carry_binaries_units_config_and_users() {
    let agent = deb(1, "drover-agent");
    let coord = deb(1, "drover-coordinator");
    let list = run("dpkg-deb", &["-c", agent.to_str().unwrap()]).stdout;
    for f in [
        "./usr/bin/drover-agent",
        "./usr/lib/systemd/system/drover-agent.service",
        "./etc/drover/agent.yaml",
        "./usr/lib/tmpfiles.d/drover-agent.conf",
        "./usr/lib/sysusers.d/drover-app.conf",
        "./usr/share/drover/schema/service.schema.json",
        "./usr/share/drover/schema/environment.schema.json",
    ] {
        assert!(list.contains(f), "{f} missing from the agent .deb:\n{list}");
    }
    let list = run("dpkg-deb", &["-c", coord.to_str().unwrap()]).stdout;
    for f in [
        "./usr/bin/drover-coordinator",
        "./usr/bin/drover",
        "./usr/lib/systemd/system/drover-coordinator.service",
        "./etc/drover/coordinator.yaml",
        "./usr/lib/sysusers.d/drover.conf",
    ] {
        assert!(
            list.contains(f),
            "{f} missing from the coordinator .deb:\n{list}"
        );
    }
    let info = run("dpkg-deb", &["-I", agent.to_str().unwrap()]).stdout;
    assert!(
        info.contains("Package: drover-agent") && info.contains("systemd"),
        "{info}"
    );
    let t = TestDir::new();
    for (pkg, conffile) in [
        (&agent, "/etc/drover/agent.yaml"),
        (&coord, "/etc/drover/coordinator.yaml"),
    ] {
        let ctl = t.path().join(pkg.file_name().unwrap());
        run(
            "dpkg-deb",
            &["-e", pkg.to_str().unwrap(), ctl.to_str().unwrap()],
        );
        let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
        assert_eq!(conffiles.trim(), conffile);
        let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
        assert!(postinst.contains("daemon-reload"), "{postinst}");
    }
    let postinst =
        std::fs::read_to_string(t.path().join(coord.file_name().unwrap()).join("postinst"))
            .unwrap();
    assert!(
        postinst.contains("systemd-sysusers"),
        "the coordinator's user is created: {postinst}"
    );

    let agent_rpm = rpm(1, "drover-agent");
    let coord_rpm = rpm(1, "drover-coordinator");
    let files = run("rpm", &["-qpl", agent_rpm.to_str().unwrap()]).stdout;
    assert!(
        files.contains("/usr/bin/drover-agent")
            && files.contains("/usr/lib/systemd/system/drover-agent.service")
            && files.contains("/usr/share/drover/schema/service.schema.json"),
        "{files}"
    );
    let config = run("rpm", &["-qpc", agent_rpm.to_str().unwrap()]).stdout;
    assert_eq!(config.trim(), "/etc/drover/agent.yaml");
    let dump = run("rpm", &["-qp", "--dump", agent_rpm.to_str().unwrap()]).stdout;
    let line = dump
        .lines()
        .find(|l| l.starts_with("/etc/drover/agent.yaml"))
        .unwrap();
    // `rpm --dump`: path size mtime digest mode owner group isconfig isdoc …
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[7], "1", "agent.yaml is %config: {line}");
    let scripts = run("rpm", &["-qp", "--scripts", coord_rpm.to_str().unwrap()]).stdout;
    assert!(
        scripts.contains("useradd -r -g drover"),
        "the coordinator's user is created: {scripts}"
    );
    assert!(
        scripts.contains("disable --now drover-coordinator.service"),
        "{scripts}"
    );
    let files = run("rpm", &["-qpl", coord_rpm.to_str().unwrap()]).stdout;
    assert!(
        files.contains("/usr/bin/drover") && files.contains("/usr/lib/sysusers.d/drover.conf"),
        "{files}"
    );
    // The rpm installs into a scratch root.
    let root = t.path().join("rpmroot");
    std::fs::create_dir_all(&root).unwrap();
    let r = root.to_str().unwrap();
    assert_eq!(run("rpm", &["--root", r, "--initdb"]).code, 0);
    let out = run(
        "rpm",
        &[
            "--root",
            r,
            "-ivh",
            "--nodeps",
            "--noscripts",
            agent_rpm.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(root.join("usr/bin/drover-agent").is_file());
    assert!(root.join("etc/drover/agent.yaml").is_file());
}

const APP_UNIT: &str = "[Unit]\nDescription=hello demo app (deployed by drover)\n[Service]\nWorkingDirectory=/opt/hello/current\nExecStart=/opt/hello/current/bin/hello --port 8080\n";

const SERVICE: &str = r#"service: hello
artifact: { url: "file:///srv/artifacts/hello-{version}.tar.gz" }
install: { root: /opt/hello, keep_releases: 3 }
run: { unit: hello.service }
health: { url: "http://127.0.0.1:8080/health", timeout: 10s }
smoke: [ { url: "http://127.0.0.1:8080/version", expect_body: "{version}" } ]
"#;

const AGENT_CONFIG: &str = "host: box\nenvironment: test\nrepo: { url: /srv/fleet, poll_interval: 1s }\nstate_dir: /var/lib/drover\nservice_manager: systemd\n";

fn agent_status(c: &Container) -> Value {
    let out = c.exec("drover-agent status --json");
    serde_json::from_str(&out.stdout).unwrap_or(Value::Null)
}

fn pin(repo: &Repo, arts: &std::path::Path, version: &str, env: &[&str]) {
    let b = artifact::hello(arts, version, env);
    repo.write(
        "environments/test.yaml",
        &format!(
            "environment: test\nservices:\n  hello: {{ version: {version}, sha256: {} }}\n",
            b.sha256
        ),
    );
    repo.commit(&format!("hello {version}"));
}

#[test]
fn the_agent_package_deploys_in_a_real_systemd() {
    let t = TestDir::new();
    let repo = Repo::init(&t.path().join("fleet"));
    repo.write("services/hello.yaml", SERVICE).write(
        "environments/test.yaml",
        "environment: test\nservices: {}\n",
    );
    repo.commit("initial");
    let arts = t.path().join("artifacts");
    std::fs::create_dir_all(&arts).unwrap();
    // The packages first: their release build saturates both cores for minutes, and a
    // container booting meanwhile is needlessly slow.
    let agent_deb = deb(1, "drover-agent");
    let c = match Container::boot(
        t.path(),
        &[(&repo.dir, "/srv/fleet"), (&arts, "/srv/artifacts")],
    ) {
        Ok(c) => c,
        Err(e) if std::env::var_os("DROVER_REQUIRE_NSPAWN").is_none() => {
            eprintln!(
                "SKIPPED: no systemd container here ({e}); set DROVER_REQUIRE_NSPAWN=1 to make this an error"
            );
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // Install the agent package; the unit is there, verified against the container's root.
    c.put(
        "/var/tmp/drover-agent.deb",
        &std::fs::read(&agent_deb).unwrap(),
    );
    c.ok("dpkg -i /var/tmp/drover-agent.deb");
    let out = run(
        "systemd-analyze",
        &[
            "verify",
            &format!("--root={}", c.root.display()),
            "/usr/lib/systemd/system/drover-agent.service",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.all());
    let default_config = c.read("/etc/drover/agent.yaml");
    assert!(
        default_config.contains("edit me"),
        "the default config is installed"
    );
    // The default config runs process-managed apps as the package's unprivileged user.
    assert!(
        default_config.contains("run_as: { user: drover-app"),
        "{default_config}"
    );
    let user = c.exec("getent passwd drover-app").stdout;
    assert!(
        user.starts_with("drover-app:") && !user.contains(":0:"),
        "the package creates the apps' user: {user:?}"
    );
    assert_eq!(
        c.exec("systemctl is-enabled drover-agent").stdout.trim(),
        "disabled"
    );
    // The operator configures it and installs the app's unit; then enables the agent.
    c.put("/etc/drover/agent.yaml", AGENT_CONFIG.as_bytes());
    c.put("/etc/systemd/system/hello.service", APP_UNIT.as_bytes());
    c.ok("systemctl daemon-reload");
    pin(&repo, &arts, "1.0.0", &[]);
    c.ok("systemctl enable --now drover-agent");
    wait_for("1.0.0 to run as a unit", Duration::from_secs(60), || {
        (agent_status(&c)["services"]["hello"]["current"] == "1.0.0").then_some(())
    });
    assert_eq!(c.exec("systemctl is-active hello").stdout.trim(), "active");
    let app_pid = c.main_pid("hello");
    assert!(app_pid > 0);
    // sd_notify status in `systemctl status`.
    let status = c.exec("systemctl status drover-agent --no-pager").stdout;
    assert!(status.contains("Status: \""), "{status}");
    // Structured journal fields.
    let journal = c
        .exec("journalctl -u drover-agent SERVICE=hello -o json --no-pager")
        .stdout;
    let entries: Vec<Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        !entries.is_empty(),
        "journalctl -u drover-agent SERVICE=hello finds entries"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["VERSION"] == "1.0.0" && e["PHASE"] == "check"),
        "{journal}"
    );

    // A broken version: rolled back, the unit runs 1.0.0 again.
    pin(&repo, &arts, "2.0.0", &["FAIL_HEALTH=1"]);
    wait_for("2.0.0 to be rolled back", Duration::from_secs(60), || {
        let s = agent_status(&c);
        (s["services"]["hello"]["failed"]["version"] == "2.0.0"
            && s["services"]["hello"]["deploying"].is_null())
        .then_some(())
    });
    assert_eq!(agent_status(&c)["services"]["hello"]["current"], "1.0.0");
    assert_eq!(c.exec("systemctl is-active hello").stdout.trim(), "active");
    assert_eq!(
        c.exec("readlink /opt/hello/current").stdout.trim(),
        "releases/1.0.0"
    );
    // A unit that does not exist: a clear error, and 1.0.0 runs again.
    repo.write(
        "services/hello.yaml",
        &SERVICE.replace("unit: hello.service", "unit: nope.service"),
    );
    pin(&repo, &arts, "2.0.1", &[]);
    wait_for(
        "2.0.1 to fail on its missing unit",
        Duration::from_secs(60),
        || {
            let s = agent_status(&c);
            (s["services"]["hello"]["failed"]["version"] == "2.0.1"
                && s["services"]["hello"]["deploying"].is_null())
            .then_some(())
        },
    );
    let err = agent_status(&c)["services"]["hello"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains("systemd unit nope.service not found"), "{err}");
    assert_eq!(c.exec("systemctl is-active hello").stdout.trim(), "active");
    repo.write("services/hello.yaml", SERVICE);
    repo.commit("back to hello.service");
    let app_pid = c.main_pid("hello");

    // Upgrade the package: the agent restarts, the config stays, the app is untouched.
    let agent_pid = c.main_pid("drover-agent");
    c.put(
        "/var/tmp/drover-agent-2.deb",
        &std::fs::read(deb(2, "drover-agent")).unwrap(),
    );
    c.ok("dpkg -i --force-confold /var/tmp/drover-agent-2.deb");
    wait_for("the upgraded agent to run", Duration::from_secs(30), || {
        let pid = c.main_pid("drover-agent");
        (pid != 0 && pid != agent_pid).then_some(())
    });
    assert_eq!(
        c.ok("dpkg-query -W -f '${Version}' drover-agent"),
        "0.1.0-2"
    );
    assert_eq!(
        c.read("/etc/drover/agent.yaml"),
        AGENT_CONFIG,
        "the config is kept"
    );
    assert_eq!(c.main_pid("hello"), app_pid, "the app was not restarted");

    // Remove it: the agent stops, the app keeps running.
    c.ok("dpkg -r drover-agent");
    assert_ne!(
        c.exec("systemctl is-active drover-agent").stdout.trim(),
        "active"
    );
    assert_eq!(c.exec("systemctl is-active hello").stdout.trim(), "active");
    assert_eq!(c.main_pid("hello"), app_pid);

    // The coordinator package: its user, its unit running as that user, the CLI.
    c.put(
        "/var/tmp/drover-coordinator.deb",
        &std::fs::read(deb(1, "drover-coordinator")).unwrap(),
    );
    c.ok("dpkg -i /var/tmp/drover-coordinator.deb");
    assert!(c.ok("getent passwd drover").starts_with("drover:"));
    let failed = c.exec("systemctl start drover-coordinator");
    assert_ne!(
        failed.code, 0,
        "the default config has no tokens: it must not start"
    );
    let journal = c.exec("journalctl -u drover-coordinator --no-pager").stdout;
    assert!(journal.contains("at least one token"), "{journal}");
    let hash = artifact::sha256(b"ops-token");
    let cfg = c.read("/etc/drover/coordinator.yaml").replace(
        "tokens: []",
        &format!("tokens:\n  - {{ name: ops, role: operator, sha256: {hash} }}"),
    );
    c.put("/etc/drover/coordinator.yaml", cfg.as_bytes());
    c.ok("systemctl start drover-coordinator");
    assert_eq!(
        c.ok("systemctl show -P User drover-coordinator").trim(),
        "drover"
    );
    assert_eq!(
        c.ok("stat -c %U /proc/$(systemctl show -P MainPID drover-coordinator)")
            .trim(),
        "drover"
    );
    let out = c.ok("DROVER_TOKEN=ops-token drover status");
    assert!(out.contains("HOSTS") && out.contains("ROLLOUTS"), "{out}");
    let status = c
        .exec("systemctl status drover-coordinator --no-pager")
        .stdout;
    assert!(status.contains("serving on 127.0.0.1:7070"), "{status}");
}

/// Each binary's (completions, man pages) as the .deb installs them, and a subcommand of it.
const DOCS: [(&str, &str, &str); 3] = [
    ("drover-agent", "drover-agent", "validate"),
    ("drover-coordinator", "drover-coordinator", "serve"),
    ("drover-coordinator", "drover", "approve"),
];

#[test]
fn packages_carry_completions_and_man_pages_that_load_and_render() {
    let t = TestDir::new();
    for pkg in ["drover-agent", "drover-coordinator"] {
        let out = run(
            "dpkg-deb",
            &[
                "-x",
                deb(1, pkg).to_str().unwrap(),
                t.path().to_str().unwrap(),
            ],
        );
        assert_eq!(out.code, 0, "{}", out.all());
    }
    let root = t.path();
    for (pkg, bin, sub) in DOCS {
        // bash: the script loads, registers a completion for the binary, and completes its
        // subcommands (the hidden `generate` is not offered).
        let script = root.join(format!("usr/share/bash-completion/completions/{bin}"));
        assert!(script.is_file(), "{} missing", script.display());
        let probe = format!(
            "source {s} && complete -p {bin} && COMP_WORDS=({bin} '') && COMP_CWORD=1 \
             && COMP_LINE='{bin} ' && COMP_POINT=${{#COMP_LINE}} && _{f} {bin} '' {bin}; \
             printf 'offered:%s\\n' \"${{COMPREPLY[@]}}\"",
            s = script.display(),
            f = bin.replace('-', "__"),
        );
        let out = run("bash", &["-c", &probe]);
        assert_eq!(out.code, 0, "{bin}: {}", out.all());
        let registered = format!("-F _{} {bin}\n", bin.replace('-', "__"));
        assert!(out.stdout.contains(&registered), "{bin}: {}", out.all());
        assert!(
            out.stdout.contains(&format!("offered:{sub}\n")),
            "{bin}: {}",
            out.all()
        );
        assert!(
            !out.stdout.contains("offered:generate"),
            "{bin}: {}",
            out.all()
        );
        for file in [
            format!("usr/share/zsh/vendor-completions/_{bin}"),
            format!("usr/share/fish/vendor_completions.d/{bin}.fish"),
        ] {
            let text = std::fs::read_to_string(root.join(&file))
                .unwrap_or_else(|e| panic!("{file} in the {pkg} .deb: {e}"));
            assert!(text.contains(sub), "{file}: {text}");
        }
        // man: the binary's page and its subcommands' pages render.
        for page in [bin.to_string(), format!("{bin}-{sub}")] {
            let file = root.join(format!("usr/share/man/man1/{page}.1.gz"));
            assert!(
                file.is_file(),
                "{} missing from the {pkg} .deb",
                file.display()
            );
            let out = Command::new("man")
                .args(["-l", file.to_str().unwrap()])
                .env("MANPAGER", "cat")
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "man -l {page}: {out:?}");
            assert!(
                text.contains("NAME") && text.contains(&page),
                "{page}: {text}"
            );
            if page == bin {
                assert!(text.contains(sub), "{page} lists {sub}: {text}");
                assert!(!text.contains("generate"), "{page}: {text}");
            }
        }
    }
    // The rpms install them at the Fedora/RHEL paths.
    for (pkg, bin, _) in DOCS {
        let files = run("rpm", &["-qpl", rpm(1, pkg).to_str().unwrap()]).stdout;
        for f in [
            format!("/usr/share/bash-completion/completions/{bin}\n"),
            format!("/usr/share/zsh/site-functions/_{bin}\n"),
            format!("/usr/share/fish/vendor_completions.d/{bin}.fish\n"),
            format!("/usr/share/man/man1/{bin}.1.gz\n"),
        ] {
            assert!(
                files.contains(&f),
                "{f} missing from the {pkg} rpm:\n{files}"
            );
        }
    }
}

#[test]
fn generate_refuses_what_it_does_not_know_and_stays_out_of_help() {
    let t = TestDir::new();
    let agent = drover_tests::bin("drover-agent");
    let out: Out = Command::new(&agent)
        .args(["generate", "pdf", t.path().to_str().unwrap()])
        .output()
        .unwrap()
        .into();
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("unknown document 'pdf'") && out.stderr.contains("bash|zsh|fish|man"),
        "{}",
        out.all()
    );
    let out: Out = Command::new(&agent)
        .args(["generate", "bash", t.path().join("none").to_str().unwrap()])
        .output()
        .unwrap()
        .into();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(out.stderr.contains("cannot write into"), "{}", out.all());
    let out: Out = Command::new(&agent)
        .arg("generate")
        .output()
        .unwrap()
        .into();
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("usage: drover-agent generate"),
        "{}",
        out.all()
    );
    for bin in ["drover-agent", "drover-coordinator", "drover"] {
        let out: Out = Command::new(drover_tests::bin(bin))
            .arg("--help")
            .output()
            .unwrap()
            .into();
        assert_eq!(out.code, 0, "{}", out.all());
        assert!(
            !out.stdout.contains("generate"),
            "{bin} --help: {}",
            out.stdout
        );
    }
}
