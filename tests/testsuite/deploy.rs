//! Deploying, rolling back and supervising the hello service on one host.

use std::time::Duration;

use drover_tests::host::{Fleet, Out, SERVICE};
use drover_tests::{Killed, wait_for};

#[test]
fn deploys_then_upgrades_with_hooks_templates_and_shared_dirs() {
    let f = Fleet::new();
    let h = f.host("h1");
    let v1 = f.hello("1.0.0", &[]);
    f.pin(&v1);
    let plan = h.run_cmd(&["plan"], &[]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(
        plan.stdout.contains("hello: (nothing) → 1.0.0: fetch"),
        "{}",
        plan.stdout
    );

    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("hello: deployed 1.0.0 (first install)"),
        "{}",
        out.stdout
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    let release = h.root().join("releases/1.0.0");
    let env = std::fs::read_to_string(release.join("config/app.env")).unwrap();
    assert!(env.contains("GREETING=hello from h1 (test)"), "{env}");
    assert!(env.contains(&format!("PORT={}", h.port)), "{env}");
    assert!(env.contains("SECRET=s3cret"), "{env}");
    assert_eq!(
        std::fs::read_link(release.join("data")).unwrap(),
        std::path::Path::new("../../shared/data")
    );
    assert!(h.root().join("shared/data").is_dir());

    let v2 = f.hello("2.0.0", &[]);
    f.pin(&v2);
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("deployed 2.0.0 (was 1.0.0)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("draining before 2.0.0 replaces 1.0.0"),
        "before_stop output is logged: {}",
        out.stderr
    );
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
    let st = h.hello();
    assert_eq!(st["current"], "2.0.0");
    assert_eq!(st["previous"], "1.0.0");
    assert!(st["last_error"].is_null());
    assert_eq!(h.app_pids().len(), 1);
    // Up to date: nothing happens.
    let pid = h.app_pids()[0];
    let out = h.once();
    assert!(
        out.stdout.contains("2.0.0 running (up to date)"),
        "{}",
        out.stdout
    );
    assert_eq!(h.app_pids(), vec![pid]);
    let plan = h.run_cmd(&["plan"], &[]);
    assert!(
        plan.stdout.contains("hello: 2.0.0 — up to date"),
        "{}",
        plan.stdout
    );
}

#[test]
fn a_broken_version_rolls_back_and_is_not_retried_until_the_pin_changes() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let broken = f.hello("2.0.0", &["FAIL_HEALTH=1"]);
    f.pin(&broken);
    let out = h.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("2.0.0 failed and was rolled back to 1.0.0"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("HTTP 500, expected 200"),
        "{}",
        out.stdout
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    let st = h.hello();
    assert_eq!(st["current"], "1.0.0");
    assert_eq!(st["failed"]["version"], "2.0.0");
    let phases = h.phases();
    let tail: Vec<&str> = phases.iter().rev().take(2).map(String::as_str).collect();
    assert_eq!(tail, ["2.0.0:rolled_back", "2.0.0:rollback"]);

    // Not retried: no new deploy events.
    let before = h.events().len();
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("not retried until the desired version changes"),
        "{}",
        out.stdout
    );
    assert_eq!(h.events().len(), before);

    // A new pin is deployed.
    f.pin(&f.hello("2.0.1", &[]));
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(h.version().as_deref(), Some("2.0.1"));
    assert!(h.hello()["failed"].is_null());
}

#[test]
fn a_failed_first_install_leaves_nothing_running() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &["FAIL_HEALTH=1"]));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("rolled back to nothing (first install)"),
        "{}",
        out.stdout
    );
    assert!(h.app_pids().is_empty());
    assert!(h.current_dir().is_none());
    assert!(h.hello()["current"].is_null());
}

#[test]
fn keep_releases_never_removes_current_or_previous() {
    let f = Fleet::new();
    let h = f.host("h1");
    for v in ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0"] {
        f.pin(&f.hello(v, &[]));
        let out = h.once();
        assert_eq!(out.code, 0, "{}", out.all());
    }
    assert_eq!(h.releases(), ["1.2.0", "1.3.0", "1.4.0"]);
    f.pin(&f.hello("1.5.0", &["FAIL_HEALTH=1"]));
    assert_eq!(h.once().code, 1);
    assert_eq!(h.current_dir().as_deref(), Some("1.4.0"));
    let rel = h.releases();
    assert!(
        rel.contains(&"1.4.0".to_string()) && rel.contains(&"1.3.0".to_string()),
        "{rel:?}"
    );
    // Only the artifacts of current and previous stay cached.
    f.pin(&f.hello("1.6.0", &[]));
    assert_eq!(h.once().code, 0);
    let cached = std::fs::read_dir(h.state.join("cache")).unwrap().count();
    assert_eq!(cached, 2);
}

fn with_service(f: &Fleet, replace: &str, by: &str) {
    assert!(SERVICE.contains(replace));
    f.repo
        .write("services/hello.yaml", &SERVICE.replace(replace, by));
}

#[test]
fn a_hanging_hook_times_out_and_rolls_back() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    with_service(
        &f,
        "  before_stop: bin/drain\n",
        "  before_stop: bin/drain\n  after_install: { command: [bin/hang], timeout: 1s }\n",
    );
    f.pin(&f.hello("2.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("after_install hook `bin/hang` timed out after 1s"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("output: hanging"), "{}", out.stdout);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    // The hook's process group was killed: no `sleep 600` left running in the release.
    let leftovers: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cwd.starts_with(h.root()) && cmd.starts_with(b"sleep\x00600")
        })
        .collect();
    assert!(leftovers.is_empty(), "hook processes left: {leftovers:?}");
}

#[test]
fn a_failing_hook_rolls_back_with_its_output() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    with_service(
        &f,
        "  before_stop: bin/drain\n",
        "  before_stop: bin/drain\n  after_install: bin/fail\n",
    );
    f.pin(&f.hello("2.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("after_install hook `bin/fail` failed (exit status: 7)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("migration failed"), "{}", out.stdout);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
}

#[test]
fn a_health_endpoint_that_never_answers_times_out() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    with_service(&f, "  timeout: 5s\n", "  timeout: 2s\n");
    f.pin(&f.hello("2.0.0", &["HANG_HEALTH=1"]));
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout.contains("did not pass within 2s"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("timed out") || out.stdout.contains("operation timed out"),
        "{}",
        out.stdout
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
}

#[test]
fn an_app_that_exits_at_start_fails_fast() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    with_service(&f, "  timeout: 5s\n", "  timeout: 60s\n");
    f.pin(&f.hello("2.0.0", &["EXIT_AT_START=1"]));
    let t0 = std::time::Instant::now();
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("the service exited (exit status: 3) before its health check passed"),
        "{}",
        out.stdout
    );
    // Fails on the exit, not at the 60s health timeout.
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
}

#[test]
fn manual_rollback_goes_back_and_pins_the_old_version() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[]));
    assert_eq!(h.once().code, 0);
    let out = h.run_cmd(&["rollback", "hello"], &[]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("rolled back to 1.0.0"),
        "{}",
        out.stdout
    );
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    let st = h.hello();
    assert_eq!(st["current"], "1.0.0");
    assert_eq!(st["previous"], "2.0.0");
    assert_eq!(st["failed"]["version"], "2.0.0");
    // The agent does not undo the operator's rollback.
    assert_eq!(h.once().code, 1);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    // Nothing to roll back to for an unknown service: a clear error.
    let out = h.run_cmd(&["rollback", "nope"], &[]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("cannot roll back nope: nothing is deployed"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_daemon_restarts_a_crashed_app_and_a_restarted_agent_adopts_it() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(30));
    let pid = h.app_pids()[0];
    // Kill the app: the agent notices and starts it again.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let new_pid = wait_for("the app to be restarted", Duration::from_secs(20), || {
        let pids = h.app_pids();
        (pids.len() == 1 && pids[0] != pid && h.version().is_some()).then(|| pids[0])
    });
    assert!(h.phases().contains(&"1.0.0:restart".to_string()));
    // Stop the agent: the app keeps running; a new agent adopts it without a restart.
    assert_eq!(agent.stop(), 0);
    assert_eq!(h.app_pids(), vec![new_pid]);
    let agent = h.spawn(&[]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(h.app_pids(), vec![new_pid]);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    // A second daemon on the same state dir refuses to start.
    let mut second = h.spawn(&[]);
    wait_for("the second agent to exit", Duration::from_secs(10), || {
        (!second.alive()).then_some(())
    });
    assert!(
        second
            .log()
            .contains("another drover-agent is already running"),
        "{}",
        second.log()
    );
    drop(agent);
}

#[test]
fn status_shows_state_and_errors() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &["FAIL_HEALTH=1"]));
    assert_eq!(h.once().code, 1);
    let table = h.run_cmd(&["status"], &[]);
    assert_eq!(table.code, 0);
    let line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("hello"))
        .unwrap();
    assert!(
        line.contains("1.0.0") && line.contains("running pid"),
        "{line}"
    );
    assert!(line.contains("2.0.0 rolled back"), "{line}");
    let st = h.status();
    assert_eq!(st["host"], "h1");
    assert_eq!(st["environment"], "test");
    assert!(st["repo"]["commit"].is_string());
    assert!(st["services"]["hello"]["process"]["pid"].is_number());
}

/// Another program on a port: answers every GET with 200 and `body`, after `delay_ms`.
const SQUATTER: &str = r#"
import http.server, sys, time

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(int(sys.argv[3]) / 1000)
        b = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def log_message(self, *a):
        pass

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Starts [`SQUATTER`] on `port`.
fn squatter(port: u16, body: &str, delay_ms: u64) -> Killed {
    let child = std::process::Command::new("python3")
        .args([
            "-c",
            SQUATTER,
            &port.to_string(),
            body,
            &delay_ms.to_string(),
        ])
        .spawn()
        .expect("python3 runs");
    drover_tests::wait_port(port, Duration::from_secs(10));
    Killed(child)
}

#[test]
fn an_app_that_cannot_bind_its_port_is_not_fooled_by_another_program() {
    let f = Fleet::new();
    let h = f.host("h1");
    // Another program holds the app's port and passes every check, slowly enough that the
    // app has failed to bind (and exited) by the time the first answer comes.
    let _squatter = squatter(h.port, "1.0.0", 1000);
    f.pin(&f.hello("1.0.0", &[]));
    let out = h.once();
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains("another program answers on its URLs (is its port taken?)"),
        "{}",
        out.stdout
    );
    assert!(h.app_pids().is_empty());
    assert_eq!(h.hello()["failed"]["version"], "1.0.0");
    assert_eq!(h.current(), None);
}

/// `once` shows the phases as they happen: plain lines through a pipe, JSON lines with
/// `--json`, and a live line redrawn in place under a pseudo-terminal (`script`).
#[test]
fn once_shows_each_phase_with_its_timing_plain_json_and_on_a_terminal() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    // Plain (stdout is a pipe): a line as each phase starts and ends, then the summary.
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        !out.stdout.contains('\x1b') && !out.stdout.contains('\r'),
        "{}",
        out.stdout
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix}:\n{}", out.stdout))
    };
    assert!(at("hello 1.0.0: fetch …") < at("hello 1.0.0: fetch ok ("));
    assert!(at("hello 1.0.0: fetch ok (") < at("hello 1.0.0: start …"));
    assert!(at("hello 1.0.0: check ok (") < at("hello: deployed 1.0.0"));
    let timed = lines
        .iter()
        .find(|l| l.starts_with("hello 1.0.0: check ok ("))
        .unwrap();
    assert!(timed.ends_with("s)"), "{timed}");

    // --json: one object per line; a failed check, the rollback, the end, the result.
    f.pin(&f.hello("2.0.0", &["FAIL_HEALTH=1"]));
    let out = h.run_cmd(&["once", "--json"], &[]);
    assert_eq!(out.code, 1, "{}", out.all());
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |event: &str, phase: &str| {
        events
            .iter()
            .find(|e| e["event"] == event && (phase.is_empty() || e["phase"] == phase))
            .unwrap_or_else(|| panic!("no {event} {phase} in {events:#?}"))
    };
    let check = find("phase_ended", "check");
    assert!(
        check["error"].as_str().unwrap().contains("HTTP 500"),
        "{check}"
    );
    assert!(
        check["took_ms"].as_u64().is_some() && check["at"].is_string(),
        "{check}"
    );
    assert_eq!(
        find("phase_ended", "rollback")["error"],
        serde_json::Value::Null
    );
    assert_eq!(find("ended", "")["outcome"], "rolled_back");
    let result = events.last().unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["service"], "hello");
    assert_eq!(result["outcome"], "rolled_back");
    assert_eq!(result["converged"], false);

    // A terminal: finished phases marked, the running one on a live line erased in place.
    f.pin(&f.hello("2.0.1", &[]));
    let cmd = h.cmd(&["once"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_str().unwrap()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = std::process::Command::new("script");
    script.args(["-q", "-e", "-f", "-c", &line, "/dev/null"]);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let out: Out = script.output().expect("script (util-linux) runs").into();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout.contains("… hello 2.0.1: fetch "),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\r\x1b[2K✓ hello 2.0.1: fetch ok ("),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains("✓ hello 2.0.1: check ok ("),
        "{:?}",
        out.stdout
    );
    assert!(
        out.stdout.contains("hello: deployed 2.0.1"),
        "{:?}",
        out.stdout
    );
}
