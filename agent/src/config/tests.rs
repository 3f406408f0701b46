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
