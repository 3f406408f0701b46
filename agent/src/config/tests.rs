use super::*;

fn load(files: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let files: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    Config::from_texts(&files, BTreeMap::new())
}

const BASE: &str = "host: web-01\nenvironment: prod\nlabels: {role: web}\nvars: {port: \"8080\"}\nrepo: {url: \"https://git.example.com/fleet.git\"}\nstate_dir: /var/lib/drover\nservice_manager: process\n";

#[test]
fn full_config_loads_with_defaults() {
    let c = load(&[("agent.yaml", BASE)]).unwrap();
    assert_eq!(c.host, "web-01");
    assert_eq!(c.environment, "prod");
    assert_eq!(c.repo.branch, "main");
    assert_eq!(c.repo.poll_interval, Duration::from_secs(30));
    assert_eq!(c.repo.local_path, None);
    assert_eq!(c.service_manager, ServiceManager::Process);
    assert_eq!(c.vars["port"], "8080");
    assert_eq!(c.limits.max_artifact_size, 2 << 30);
    assert_eq!(c.download.retries, 4);
}

/// `/dev/zero` would be read for ever, a FIFO would block start-up: both are refused.
#[test]
fn a_token_or_ca_file_that_is_not_a_regular_file_is_refused() {
    let text = format!(
        "{BASE}coordinator: {{ url: \"http://127.0.0.1:1\", token_file: /dev/zero, ca_file: /dev/zero }}\n"
    );
    let e = load(&[("agent.yaml", &text)]).unwrap_err().to_string();
    assert!(
        e.contains("cannot read coordinator token file /dev/zero: not a regular file"),
        "{e}"
    );
    assert!(
        e.contains("cannot read coordinator ca_file /dev/zero: not a regular file"),
        "{e}"
    );
}

#[test]
fn dropins_override_and_merge() {
    let c = load(&[
        ("agent.yaml", BASE),
        (
            "agent.d/10-repo.yaml",
            "repo: {branch: release, poll_interval: 5s}\n",
        ),
        (
            "agent.d/20-vars.yaml",
            "vars: {region: eu}\nlabels: {role: api}\n",
        ),
    ])
    .unwrap();
    assert_eq!(c.repo.url, "https://git.example.com/fleet.git");
    assert_eq!(c.repo.branch, "release");
    assert_eq!(c.repo.poll_interval, Duration::from_secs(5));
    assert_eq!(c.vars.len(), 2);
    assert_eq!(c.labels["role"], "api");
}

#[test]
fn every_problem_is_reported_with_its_file() {
    let e = load(&[
            ("agent.yaml", BASE),
            (
                "agent.d/10.yaml",
                "repo: {url: \"ftp://x\", poll_interval: soon}\nvars: {version: x}\nmystery: 1\nstate_dir: var/lib\n",
            ),
        ])
        .unwrap_err();
    let ConfigError::Invalid(p) = e else { panic!() };
    let text = p.to_string();
    assert_eq!(p.0.len(), 5, "{text}");
    assert!(text.contains("agent.d/10.yaml:1:"), "{text}");
    assert!(text.contains("invalid duration `soon`"), "{text}");
    assert!(text.contains("not a Git URL"), "{text}");
    assert!(
        text.contains("would hide the built-in `{version}`"),
        "{text}"
    );
    assert!(text.contains("unknown field `mystery`"), "{text}");
    assert!(text.contains("must be an absolute path"), "{text}");
}

#[test]
fn missing_environment_is_an_error() {
    let e = load(&[("agent.yaml", "repo: {url: /x}\n")]).unwrap_err();
    assert!(e.to_string().contains("missing field `environment`"), "{e}");
}

#[test]
fn metrics_is_off_by_default_and_loopback_needs_no_token() {
    assert_eq!(load(&[("agent.yaml", BASE)]).unwrap().metrics, None);
    let text = format!("{BASE}metrics: {{ listen: \"127.0.0.1:9469\" }}\n");
    let c = load(&[("agent.yaml", &text)]).unwrap();
    assert_eq!(
        c.metrics,
        Some(MetricsConfig {
            listen: "127.0.0.1:9469".parse().unwrap(),
            token: None
        })
    );
}

#[test]
fn metrics_settings_that_would_expose_or_break_the_endpoint_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open-token");
    std::fs::write(&open, "s3cret-token\n").unwrap();
    let shut = dir.path().join("token");
    std::fs::write(&shut, "s3cret-token\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&shut, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (metrics, expect) in [
        (
            "{ listen: \"0.0.0.0:9469\" }".to_string(),
            "agent.yaml:8:20: metrics listen 0.0.0.0:9469 is reachable from other hosts: set metrics.token_file",
        ),
        (
            "{ listen: \"localhost:9469\" }".to_string(),
            "metrics listen `localhost:9469` is not an address and port: write e.g. 127.0.0.1:9469",
        ),
        (
            "{ listen: \"127.0.0.1\" }".to_string(),
            "metrics listen `127.0.0.1` is not an address and port",
        ),
        (
            "{ listen: \"127.0.0.1:9469\", port: 1 }".to_string(),
            "unknown field `port`",
        ),
        ("{ token_file: /x }".to_string(), "missing field `listen`"),
        (
            format!(
                "{{ listen: \"0.0.0.0:9469\", token_file: {} }}",
                open.display()
            ),
            "metrics token file",
        ),
        (
            "{ listen: \"0.0.0.0:9469\", token_file: /dev/zero }".to_string(),
            "cannot read metrics token file /dev/zero: not a regular file",
        ),
    ] {
        let text = format!("{BASE}metrics: {metrics}\n");
        let e = load(&[("agent.yaml", &text)]).unwrap_err().to_string();
        assert!(e.contains(expect), "{metrics}: {e}");
    }
    // Off loopback with a private token file: served, the token kept out of Debug output.
    let text = format!(
        "{BASE}metrics: {{ listen: \"0.0.0.0:9469\", token_file: {} }}\n",
        shut.display()
    );
    let c = load(&[("agent.yaml", &text)]).unwrap();
    let m = c.metrics.unwrap();
    assert_eq!(m.token.as_deref(), Some("s3cret-token"));
    assert!(!format!("{m:?}").contains("s3cret"));
}

#[test]
fn ecs_polling_defaults_to_two_seconds_and_is_bounded() {
    let ecs = |line: &str| {
        load(&[(
            "/etc/drover/agent.yaml",
            &format!("{BASE}mode: ecs\necs: {{ cluster: c, region: us-east-1{line} }}\n"),
        )])
    };
    let c = ecs("").unwrap();
    assert_eq!(c.ecs.unwrap().poll, std::time::Duration::from_secs(2));
    let c = ecs(", poll_interval: 500ms").unwrap();
    assert_eq!(c.ecs.unwrap().poll, std::time::Duration::from_millis(500));
    for bad in [", poll_interval: 10ms", ", poll_interval: 5m"] {
        let e = ecs(bad).unwrap_err().to_string();
        assert!(
            e.contains("agent.yaml:9:")
                && e.contains("ecs.poll_interval")
                && e.contains("from 100ms to 60s"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn the_coordinator_is_one_url_or_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let with = |url: &str| {
        load(&[(
            "agent.yaml",
            &format!(
                "{BASE}coordinator: {{ url: {url}, token_file: {} }}\n",
                token.display()
            ),
        )])
    };
    let c = with("[\"http://127.0.0.1:7070/\", \"http://127.0.0.1:7071\"]").unwrap();
    assert_eq!(
        c.coordinator.unwrap().url,
        "http://127.0.0.1:7070,http://127.0.0.1:7071"
    );
    let c = with("\"http://127.0.0.1:7070\"").unwrap();
    assert_eq!(c.coordinator.unwrap().url, "http://127.0.0.1:7070");
    for (bad, why) in [
        ("[]", "a list of 1 to 16"),
        (
            "[\"ftp://x\"]",
            "`ftp://x` must start with http:// or https://",
        ),
        ("[\"http://a,b\"]", "one URL per entry"),
        ("[\"https://ok:1\", \"http://10.0.0.1:7070\"]", "plain HTTP"),
    ] {
        let e = with(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}
