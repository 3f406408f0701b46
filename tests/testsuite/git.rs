//! Reading the desired state over file://, smart HTTP (lighttpd + git http-backend) and
//! git://; reacting to local commits; force-pushes; unreachable and invalid repos.

use std::time::{Duration, Instant};

use drover_tests::git::GitDaemon;
use drover_tests::host::{Fleet, Host};
use drover_tests::lighttpd::Lighttpd;
use drover_tests::wait_for;

/// A fleet whose repo is also published as `repos/fleet.git`, with smart HTTP in front.
fn published() -> (Fleet, std::path::PathBuf, Lighttpd) {
    let f = Fleet::new();
    let repos = f.dir.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    let bare = f.repo.bare_clone(&repos.join("fleet.git"));
    let http = Lighttpd::start(f.dir.path(), &f.dir.path().join("www"), Some(&repos));
    (f, bare, http)
}

fn host_at(f: &Fleet, name: &str, url: &str) -> Host {
    Host::new(f.dir.path(), name, url, &f.art.url(), "")
}

#[test]
fn deploys_over_file_http_and_git_protocols() {
    let (f, bare, http) = published();
    let daemon = GitDaemon::start(bare.parent().unwrap());
    f.pin(&f.hello("1.0.0", &[]));
    f.repo.push();
    let hosts = [
        host_at(&f, "via-file", &format!("file://{}", bare.display())),
        host_at(
            &f,
            "via-http",
            &format!("http://127.0.0.1:{}/git/fleet.git", http.port),
        ),
        host_at(
            &f,
            "via-git",
            &format!("git://127.0.0.1:{}/fleet.git", daemon.port),
        ),
    ];
    for h in &hosts {
        let out = h.once();
        assert_eq!(out.code, 0, "{}: {}", h.name, out.all());
        assert_eq!(h.version().as_deref(), Some("1.0.0"), "{}", h.name);
    }
    f.pin(&f.hello("2.0.0", &[]));
    f.repo.push();
    for h in &hosts {
        assert_eq!(h.once().code, 0, "{}", h.name);
        assert_eq!(h.version().as_deref(), Some("2.0.0"), "{}", h.name);
        assert_eq!(
            h.status()["repo"]["commit"].as_str(),
            Some(f.repo.git(&["rev-parse", "HEAD"]).as_str())
        );
    }
}

#[test]
fn a_local_commit_is_seen_within_a_second() {
    let f = Fleet::new();
    // Poll once a minute: only the inotify watch can explain a quick reaction.
    let h = Host::new(
        f.dir.path(),
        "h1",
        f.repo.dir.to_str().unwrap(),
        &f.art.url(),
        "",
    );
    let cfg = std::fs::read_to_string(&h.config)
        .unwrap()
        .replace("poll_interval: 1s", "poll_interval: 60s");
    std::fs::write(&h.config, cfg).unwrap();
    f.pin(&f.hello("1.0.0", &[]));
    let _agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(30));
    let v2 = f.hello("2.0.0", &[]);
    let t0 = Instant::now();
    f.pin(&v2);
    wait_for(
        "the agent to start deploying 2.0.0",
        Duration::from_secs(20),
        || {
            h.phases()
                .contains(&"2.0.0:fetch".to_string())
                .then_some(())
        },
    );
    let noticed = t0.elapsed();
    eprintln!("commit → agent started deploying: {noticed:?}");
    // Far below the 60 s poll interval: the watch fired.
    assert!(noticed < Duration::from_secs(20));
    h.wait_current("2.0.0", Duration::from_secs(30));
}

#[test]
fn force_pushes_and_rewritten_history_are_followed() {
    let (f, _bare, http) = published();
    let h = host_at(
        &f,
        "h1",
        &format!("http://127.0.0.1:{}/git/fleet.git", http.port),
    );
    let a = f.pin(&f.hello("1.0.0", &[]));
    f.repo.push();
    assert_eq!(h.once().code, 0);
    f.pin(&f.hello("2.0.0", &[]));
    f.repo.push();
    assert_eq!(h.once().code, 0);
    assert_eq!(h.version().as_deref(), Some("2.0.0"));
    // Rewrite history: drop the 2.0.0 commit, commit 3.0.0 on top of 1.0.0, force-push.
    f.repo.git(&["reset", "-q", "--hard", &a]);
    let c = f.pin(&f.hello("3.0.0", &[]));
    f.repo.push();
    let out = h.once();
    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(h.version().as_deref(), Some("3.0.0"));
    assert_eq!(h.status()["repo"]["commit"].as_str(), Some(c.as_str()));
    // And back to an older commit: the tip is the desired state, even if it goes backwards.
    f.repo.git(&["reset", "-q", "--hard", &a]);
    f.repo.push();
    assert_eq!(h.once().code, 0);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
}

#[test]
fn a_wrong_repo_url_is_a_clear_error() {
    let f = Fleet::new();
    for (url, expect) in [
        (
            format!("{}/no-such-repo", f.dir.path().display()),
            "cannot fetch",
        ),
        (
            "http://127.0.0.1:1/fleet.git".to_string(),
            "cannot fetch http://127.0.0.1:1/fleet.git",
        ),
    ] {
        let h = host_at(&f, "h1", &url);
        let out = h.once();
        assert_eq!(out.code, 1, "{}", out.all());
        assert!(
            out.stderr.contains("cannot read the desired state"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains(expect), "{}", out.stderr);
    }
    // A branch that does not exist.
    let h = host_at(&f, "h2", f.repo.dir.to_str().unwrap());
    let cfg = std::fs::read_to_string(&h.config)
        .unwrap()
        .replace("poll_interval: 1s", "poll_interval: 1s, branch: nope");
    std::fs::write(&h.config, cfg).unwrap();
    let out = h.once();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("branch `nope` not found"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_git_server_going_down_keeps_the_running_version() {
    let (f, bare, mut http) = published();
    let h = host_at(
        &f,
        "h1",
        &format!("http://127.0.0.1:{}/git/fleet.git", http.port),
    );
    f.pin(&f.hello("1.0.0", &[]));
    f.repo.push();
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(30));
    let pid = h.app_pids()[0];
    http.stop();
    // A new commit lands on the server's disk while its HTTP front is down.
    f.pin(&f.hello("2.0.0", &[]));
    f.repo
        .git(&["push", "-q", "--force", bare.to_str().unwrap(), "main"]);
    wait_for(
        "the agent to report the repo unreachable",
        Duration::from_secs(20),
        || h.status()["repo"]["error"].as_str().map(str::to_string),
    );
    let st = h.status();
    assert!(
        st["repo"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot fetch"),
        "{st}"
    );
    assert!(st["repo"]["failing_since"].is_string());
    assert_eq!(h.app_pids(), vec![pid]);
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    http.restart();
    h.wait_current("2.0.0", Duration::from_secs(60));
    assert!(h.status()["repo"]["error"].is_null());
    drop(agent);
}

#[test]
fn an_invalid_commit_keeps_the_running_version() {
    let f = Fleet::new();
    let h = f.host("h1");
    f.pin(&f.hello("1.0.0", &[]));
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(30));
    f.repo.write(
        "environments/test.yaml",
        "environment: test\nservices:\n  hello: { version: 2.0.0, sha: abc }\n",
    );
    f.repo.commit("typo");
    let err = wait_for(
        "the agent to report the invalid commit",
        Duration::from_secs(20),
        || h.status()["repo"]["error"].as_str().map(str::to_string),
    );
    assert!(err.contains("environments/test.yaml:3:"), "{err}");
    assert!(err.contains("unknown field `sha`"), "{err}");
    assert_eq!(h.version().as_deref(), Some("1.0.0"));
    f.pin(&f.hello("2.0.0", &[]));
    h.wait_current("2.0.0", Duration::from_secs(30));
    drop(agent);
}

/// Fetches the git daemon has served (one `upload-pack` request each).
fn fetches(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("Request upload-pack")
        .count()
}

/// With a coordinator, an agent learns of a commit by long-polling it: Git sees one fetch per
/// commit and none while nothing changes, however short the poll interval. With the
/// coordinator gone, the agent polls Git again.
#[test]
fn a_coordinated_agent_fetches_once_per_commit_and_polls_git_when_the_coordinator_is_gone() {
    let f = Fleet::new();
    f.pin(&f.hello("1.0.0", &[]));
    let repos = f.dir.path().join("repos");
    std::fs::create_dir_all(&repos).unwrap();
    let bare = f.repo.bare_clone(&repos.join("fleet.git"));
    let log = f.dir.path().join("git-daemon.log");
    let daemon = GitDaemon::start_logged(&repos, &log);
    // The coordinator reads the bare repo directly (its fetches are not the daemon's).
    let mut c = drover_tests::coordinator::Coordinator::prepare(f.dir.path(), "");
    let cfg = std::fs::read_to_string(c.config()).unwrap();
    std::fs::write(
        c.config(),
        cfg.replace(
            &f.repo.dir.display().to_string(),
            &bare.display().to_string(),
        ),
    )
    .unwrap();
    c.restart();
    let h = Host::new(
        f.dir.path(),
        "web-01",
        &format!("git://127.0.0.1:{}/fleet.git", daemon.port),
        &f.art.url(),
        &c.agent_config(),
    );
    let agent = h.spawn(&[]);
    h.wait_current("1.0.0", Duration::from_secs(60));
    wait_for(
        "the agent to follow the coordinator",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&agent.log)
                .unwrap_or_default()
                .contains("following the coordinator for new commits")
                .then_some(())
        },
    );
    // The coordinator holds the agent's long-poll (/metrics counts it).
    wait_for("the long-poll to be held", Duration::from_secs(10), || {
        let (s, m) = c.http(
            "GET",
            "/metrics",
            Some(&drover_tests::coordinator::token("watcher")),
            "",
            false,
        );
        (s == 200
            && m.as_str()
                .unwrap_or("")
                .contains("drover_coordinator_tip_waiting 1\n"))
        .then_some(())
    });
    let before = fetches(&log);
    // Nothing changes: no fetch, though the poll interval is 1s.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(fetches(&log), before, "fetched with nothing new");

    // A commit: one fetch.
    let v2 = f.hello("2.0.0", &[]);
    f.pin(&v2);
    f.repo.push();
    h.wait_current("2.0.0", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fetches(&log), before + 1, "one fetch for one commit");

    // The coordinator ahead of this host's Git (it reads the working repo, the host the
    // pushed one): the host's fetch does not give the tip, so it polls Git until it does.
    let cfg = std::fs::read_to_string(c.config()).unwrap();
    std::fs::write(
        c.config(),
        cfg.replace(
            &bare.display().to_string(),
            &f.repo.dir.display().to_string(),
        ),
    )
    .unwrap();
    c.kill();
    c.restart();
    let third = f.pin_raw("3.0.0", &"c".repeat(64));
    let has = |what: &str| {
        std::fs::read_to_string(&agent.log)
            .unwrap_or_default()
            .contains(what)
    };
    wait_for(
        "the agent to see that its Git lags the coordinator",
        Duration::from_secs(60),
        || has("fetching from Git here did not give").then_some(()),
    );
    f.repo.push();
    wait_for(
        "the agent to poll Git and catch up",
        Duration::from_secs(30),
        || (h.status()["repo"]["commit"] == third.as_str()).then_some(()),
    );

    // The coordinator gone: the agent polls Git and sees the next commit.
    c.kill();
    let fourth = f.pin_raw("4.0.0", &"d".repeat(64));
    f.repo.push();
    wait_for(
        "the agent to fetch 4.0.0's commit from Git",
        Duration::from_secs(30),
        || (h.status()["repo"]["commit"] == fourth.as_str()).then_some(()),
    );
    assert!(
        has("the coordinator does not answer; polling Git"),
        "{}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
}
