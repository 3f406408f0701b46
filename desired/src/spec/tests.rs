use std::path::PathBuf;

use super::*;

const HELLO: &str = r#"service: hello
kind: vm
targets: { role: web }
artifact:
  url: "https://artifacts.example.com/hello/hello-{version}.tar.gz"
install:
  root: /srv/{host}/hello
  keep_releases: 5
  shared: [data, logs]
  templates:
    - src: config/app.env.tmpl
      dest: config/app.env
run:
  unit: hello.service
  command: ["bin/hello", "--port", "{port}"]
hooks:
  before_stop: bin/drain
  after_install: { command: [bin/migrate, --yes], timeout: 2m }
health:
  url: "http://127.0.0.1:{port}/health"
  expect_status: 200
  timeout: 30s
smoke:
  - url: "http://127.0.0.1:{port}/version"
    expect_body: "{version}"
  - command: [bin/smoke]
"#;

const PROD: &str = r#"environment: prod
rollout:
  max_parallel: 2
  max_failures: 0
approval:
  required: true
  approvers: [release-managers]
  timeout: 24h
promotion:
  requires: staging
services:
  hello: { version: 1.4.2, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }
"#;

const STAGING: &str = "environment: staging\nservices:\n  hello: { version: 1.10, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n";

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

fn good() -> Vec<(String, String)> {
    files(&[
        ("services/hello.yaml", HELLO),
        ("environments/prod.yaml", PROD),
        ("environments/staging.yaml", STAGING),
        ("README.md", "not a spec file"),
    ])
}

#[test]
fn the_design_examples_load() {
    let repo = load(&good(), None).unwrap();
    let hello = &repo.services["hello"];
    assert_eq!(hello.kind, Kind::Vm);
    assert_eq!(hello.install.as_ref().unwrap().shared.len(), 2);
    let after = hello.hooks.after_install.as_ref().unwrap();
    assert_eq!(after.timeout, Dur::secs(120));
    assert_eq!(after.command.len(), 2);
    assert_eq!(
        hello.hooks.before_stop.as_ref().unwrap().timeout,
        Dur::secs(60)
    );
    let prod = &repo.environments["prod"];
    assert_eq!(prod.rollout.max_parallel, 2);
    assert!(prod.approval.required);
    assert_eq!(
        repo.environments["staging"].services["hello"]
            .value
            .version
            .as_ref()
            .map(|v| v.as_str()),
        Some("1.10")
    );
    assert_eq!(repo.host_var_names(), vec!["port".to_string()]);
}

#[test]
fn every_problem_is_reported_with_file_and_line() {
    let bad_service = HELLO
        .replace("keep_releases: 5", "keep_releases: 1\n  keep_relases: 3")
        .replace("timeout: 30s", "timeout: 30 seconds")
        .replace("https://artifacts", "ftp://artifacts");
    let bad_env = PROD.replace("requires: staging", "requires: qa").replace(
        "  hello: {",
        "  ghost: { version: 1.0, sha256: abc }\n  hello: {",
    );
    let repo = files(&[
        ("services/hello.yaml", &bad_service),
        (
            "services/broken.yaml",
            "service: broken\nkind: vm\n  bad: [\n",
        ),
        ("environments/prod.yaml", &bad_env),
        (
            "environments/staging.yaml",
            "environment: stage\nservices: {}\n",
        ),
    ]);
    let problems = load(&repo, None).unwrap_err();
    let text = problems.to_string();
    let expect = [
        (
            "environments/prod.yaml:10:",
            "environment `qa` is not defined",
        ),
        ("environments/prod.yaml:12:", "invalid sha256 `abc`"),
        (
            "environments/prod.yaml:12:",
            "service `ghost` is not defined",
        ),
        ("environments/staging.yaml:1:", "in a file named `staging`"),
        ("services/broken.yaml:", "invalid YAML"),
        ("services/hello.yaml:5:", "scheme `ftp`"),
        ("services/hello.yaml:8:", "keep_releases must be at least 2"),
        ("services/hello.yaml:9:", "unknown field `keep_relases`"),
        ("services/hello.yaml:23:", "invalid duration `30 seconds`"),
    ];
    for (at, what) in expect {
        assert!(
            problems
                .0
                .iter()
                .any(|p| p.to_string().starts_with(at) && p.message.contains(what)),
            "missing {at} {what} in:\n{text}"
        );
    }
    assert_eq!(problems.0.len(), expect.len(), "{text}");
}

#[test]
fn vm_pins_need_a_digest_and_versions_are_checked() {
    let env = "environment: prod\nservices:\n  hello: { version: 1.0 }\n";
    let e = load(
        &files(&[
            ("services/hello.yaml", HELLO),
            ("environments/prod.yaml", env),
        ]),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("needs `sha256:`"), "{e}");
    let env = "environment: prod\nservices:\n  hello: { sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n";
    let e = load(
        &files(&[
            ("services/hello.yaml", HELLO),
            ("environments/prod.yaml", env),
        ]),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("environments/prod.yaml:3:10"), "{e}");
    assert!(e.to_string().contains("missing field `version`"), "{e}");
    let env = "environment: prod\nservices:\n  hello: { version: ../../etc, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n";
    let e = load(
        &files(&[
            ("services/hello.yaml", HELLO),
            ("environments/prod.yaml", env),
        ]),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("invalid version `../../etc`"), "{e}");
}

#[test]
fn duplicate_names_are_reported() {
    let e = load(
        &files(&[
            ("services/hello.yaml", HELLO),
            ("services/hello.yml", HELLO),
            (
                "environments/prod.yaml",
                PROD.replace("requires: staging", "requires: prod").as_str(),
            ),
        ]),
        None,
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("defined twice"), "{text}");
    assert!(text.contains("names this environment itself"), "{text}");
}

#[test]
fn unknown_template_names_need_host_vars() {
    let e = load(&good(), Some(&["region".to_string()])).unwrap_err();
    assert!(
        e.to_string().contains("unknown template name `{port}`"),
        "{e}"
    );
    assert!(load(&good(), Some(&["port".to_string()])).is_ok());
    let env_in_url = HELLO.replace("{version}.tar.gz", "{env.TOKEN}.tar.gz");
    let e = load(
        &files(&[
            ("services/hello.yaml", &env_in_url),
            ("environments/prod.yaml", PROD),
            ("environments/staging.yaml", STAGING),
        ]),
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("only available in template files"),
        "{e}"
    );
}

fn host<'a>(labels: &'a BTreeMap<String, String>, vars: &'a BTreeMap<String, String>) -> Host<'a> {
    Host {
        name: "web-01",
        environment: "prod",
        labels,
        vars,
        manager: ServiceManager::Process,
        kind: Kind::Vm,
    }
}

#[test]
fn resolve_renders_for_the_host() {
    let repo = load(&good(), None).unwrap();
    let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    let vars = BTreeMap::from([("port".to_string(), "8080".to_string())]);
    let plan = resolve(&repo, &host(&labels, &vars)).unwrap();
    assert_eq!(plan.policy.rollout.max_parallel, 2);
    assert_eq!(plan.policy.promotion_requires.as_deref(), Some("staging"));
    let s = &plan.services[0];
    assert_eq!(s.version, "1.4.2");
    assert_eq!(s.root, PathBuf::from("/srv/web-01/hello"));
    assert_eq!(
        s.artifact_url,
        "https://artifacts.example.com/hello/hello-1.4.2.tar.gz"
    );
    assert_eq!(s.run.command, vec!["bin/hello", "--port", "8080"]);
    assert_eq!(
        s.health.as_ref().unwrap().url,
        "http://127.0.0.1:8080/health"
    );
    assert_eq!(s.smoke[0].expect_body.as_deref(), Some("1.4.2"));
    // The resolved form round-trips through JSON (it is stored with in-flight deployments).
    let json = serde_json::to_string(s).unwrap();
    let back: ResolvedService = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s);
}

#[test]
fn resolve_skips_untargeted_hosts_and_reports_missing_vars() {
    let repo = load(&good(), None).unwrap();
    let labels = BTreeMap::from([("role".to_string(), "db".to_string())]);
    let vars = BTreeMap::new();
    let plan = resolve(&repo, &host(&labels, &vars)).unwrap();
    assert!(plan.services.is_empty());
    assert_eq!(plan.skipped[0].0, "hello");

    let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    let e = resolve(&repo, &host(&labels, &vars)).unwrap_err();
    assert!(e.to_string().contains("services/hello.yaml:15:"), "{e}");
    assert!(
        e.to_string().contains("unknown template name `{port}`"),
        "{e}"
    );

    let mut other = host(&labels, &vars);
    other.environment = "qa";
    let e = resolve(&repo, &other).unwrap_err();
    assert!(e.to_string().contains("environment `qa`"), "{e}");
}

/// Three services of one environment ordered by `after`; `order` gives each one's line.
fn ordered(order: &[(&str, &str)]) -> Result<Repo, Problems> {
    let mut list = vec![];
    let mut env = String::from("environment: prod\nservices:\n");
    let texts: Vec<(String, String)> = order
        .iter()
        .map(|(name, _)| {
            (
                format!("services/{name}.yaml"),
                HELLO.replace("service: hello", &format!("service: {name}")),
            )
        })
        .collect();
    for (name, after) in order {
        env.push_str(&format!(
            "  {name}: {{ version: 1.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b{after} }}\n"
        ));
    }
    for (p, t) in &texts {
        list.push((p.clone(), t.clone()));
    }
    list.push(("environments/prod.yaml".to_string(), env));
    load(&list, None)
}

#[test]
fn after_orders_services_and_refuses_cycles_unknown_names_and_itself() {
    let repo = ordered(&[
        ("api", ", after: [migrate]"),
        ("migrate", ""),
        ("web", ", after: [api, migrate]"),
    ])
    .unwrap();
    let after: Vec<&str> = repo.environments["prod"].services["web"]
        .value
        .after
        .iter()
        .map(|a| a.value.as_str())
        .collect();
    assert_eq!(after, ["api", "migrate"]);

    // A cycle of three, reported once at the entry that closes it.
    let e = ordered(&[
        ("api", ", after: [web]"),
        ("migrate", ", after: [api]"),
        ("web", ", after: [migrate]"),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(e.matches("makes a cycle").count(), 1, "{e}");
    assert!(
        e.contains("environments/prod.yaml:")
            && e.contains("`after` makes a cycle: api after web after migrate after api"),
        "{e}"
    );
    // Unknown and self.
    let e = ordered(&[("api", ", after: [db, api]"), ("web", "")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("environments/prod.yaml:3:")
            && e.contains("`after` names `db`, which is not pinned in environment `prod`"),
        "{e}"
    );
    assert!(
        e.contains("service `api`: `after` names the service itself"),
        "{e}"
    );
    // A bad name is a bad name.
    let e = ordered(&[("api", ", after: [Web]"), ("web", "")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid name `Web`"), "{e}");
}

/// `prod` with the `freeze:` block `freeze` (indented, from line 3).
fn frozen(freeze: &str) -> Result<Repo, Problems> {
    let env = format!(
        "environment: prod\nfreeze:\n{freeze}services:\n  hello: {{ version: 1.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }}\n"
    );
    load(
        &[
            ("services/hello.yaml".to_string(), HELLO.to_string()),
            ("environments/prod.yaml".to_string(), env),
        ],
        None,
    )
}

#[test]
fn freeze_windows_are_read_and_bad_ones_refused_at_their_line() {
    let repo = frozen(
        "  - { from: 2026-12-24T00:00:00Z, to: \"2026-12-27T00:00:00+01:00\" }\n  - { cron: \"0 18 * * FRI\", duration: 62h, timezone: Europe/Berlin }\n  - { cron: \"0 0 1 1 *\", duration: 1d }\n",
    )
    .unwrap();
    let ws = repo.environments["prod"].freeze_windows();
    assert_eq!(ws.len(), 3);
    assert_eq!(
        ws[0].to_string(),
        "2026-12-24T00:00:00Z to 2026-12-26T23:00:00Z"
    );
    assert_eq!(
        ws[1].to_string(),
        "\"0 18 * * FRI\" for 62h (Europe/Berlin)"
    );
    assert_eq!(ws[2].to_string(), "\"0 0 1 1 *\" for 24h (UTC)");

    for (entry, says) in [
        (
            "  - { from: 2026-12-24T00:00:00Z }\n",
            "needs both `from` and `to`",
        ),
        (
            "  - { from: 2026-12-27T00:00:00Z, to: 2026-12-24T00:00:00Z }\n",
            "is not before `to`",
        ),
        (
            "  - { from: 2026-12-24, to: 2026-12-27T00:00:00Z }\n",
            "RFC 3339 with an offset",
        ),
        (
            "  - { cron: \"0 18 * *\", duration: 1h }\n",
            "has 4 field(s)",
        ),
        (
            "  - { cron: \"0 18 * * FRI\" }\n",
            "needs `cron` (when it opens) and `duration`",
        ),
        (
            "  - { cron: \"0 18 * * FRI\", duration: 40d }\n",
            "from 1m to 31d",
        ),
        (
            "  - { cron: \"0 18 * * FRI\", duration: 1h, timezone: Mars/Base }\n",
            "unknown time zone `Mars/Base`",
        ),
        (
            "  - { cron: \"0 18 * * FRI\", duration: 1h, from: 2026-12-24T00:00:00Z }\n",
            "not both",
        ),
        ("  - { }\n", "an empty window"),
        (
            "  - { cron: \"0 18 * * FRI\", duration: 1h, reason: xmas }\n",
            "reason",
        ),
    ] {
        let e = frozen(entry).unwrap_err().to_string();
        assert!(e.contains("environments/prod.yaml:3:"), "{entry}: {e}");
        assert!(e.contains(says), "{entry}: {e}");
    }
}

const WEB: &str = "service: web\nkind: ecs\necs:\n  cluster: c\n  task_family: web\n  container: web\n  image: \"r/web:{version}\"\n  desired_count: 4\n  listener_arn: l\n  target_groups: { blue: b, green: g }\n  container_port: 8080\n  launch_type: EC2\n";

fn ecs(extra: &str) -> Result<Repo, Problems> {
    load(
        &[
            ("services/web.yaml".to_string(), format!("{WEB}{extra}")),
            (
                "environments/prod.yaml".to_string(),
                "environment: prod\nservices:\n  web: { version: 1.0 }\n".to_string(),
            ),
        ],
        None,
    )
}

#[test]
fn ecs_steps_take_a_wait_and_an_approval_and_bad_ones_are_refused_at_their_line() {
    let repo = ecs(
        "  step_wait: 1m\n  steps:\n    - { weight: 10, wait: 5m, approval: true }\n    - { weight: 50, wait: 10m }\n    - 100\n",
    )
    .unwrap();
    let host = Host {
        name: "ecs-agent",
        environment: "prod",
        labels: &BTreeMap::new(),
        vars: &BTreeMap::new(),
        manager: ServiceManager::Process,
        kind: Kind::Ecs,
    };
    let plan = resolve(&repo, &host).unwrap();
    let e = &plan.ecs[0].ecs;
    assert_eq!(e.steps, [10, 50, 100]);
    assert_eq!(e.wait_at(10), Dur::secs(300));
    assert_eq!(e.wait_at(50), Dur::secs(600));
    assert_eq!(e.wait_at(100), Dur::secs(60), "the default bake");
    assert!(e.approval_at(10) && !e.approval_at(50) && !e.approval_at(100));
    // Blue-green: the new side is full size from the start; a canary grows with its traffic.
    assert_eq!((e.first_tasks(), e.tasks_at(10)), (4, 4));
    let ten = ecs("  strategy: canary\n").unwrap();
    let mut c = resolve(&ten, &host).unwrap().ecs[0].ecs.clone();
    c.desired_count = 10;
    assert_eq!(c.steps, [10, 25, 50, 100]);
    let tasks: Vec<u32> = c.steps.iter().map(|p| c.tasks_at(*p)).collect();
    assert_eq!(tasks, [1, 3, 5, 10]);
    assert_eq!(c.first_tasks(), 1);
    let small = ecs("  strategy: canary\n  steps: [1, 100]\n").unwrap();
    let c = &resolve(&small, &host).unwrap().ecs[0].ecs;
    assert_eq!(
        (c.tasks_at(1), c.tasks_at(100)),
        (1, 4),
        "never fewer than one task"
    );
    // The record keeps its old form for plain steps.
    let plain = ecs("  steps: [20, 100]\n").unwrap();
    let json = serde_json::to_value(&resolve(&plain, &host).unwrap().ecs[0].ecs).unwrap();
    assert!(json.get("waits").is_none() && json.get("approvals").is_none());

    for (steps, line, says) in [
        ("[10, 50]", 13, "ends at 50, not 100"),
        (
            "[50, 10, 100]",
            13,
            "weight 10 does not increase on the step before (50)",
        ),
        ("[0, 100]", 13, "weight 0 is not a percentage from 1 to 100"),
        ("[10, 101]", 13, "weight 101 is not a percentage"),
        ("[-5, 100]", 13, "weight -5 is not a percentage"),
        ("[]", 1, "ecs.steps is empty"),
        ("[{ weight: 10, wait: 2d }, 100]", 13, "longer than a day"),
        ("[{ weight: 10, approve: true }, 100]", 13, "approve"),
        ("[{ wait: 5m }, 100]", 13, "weight"),
        ("[ten, 100]", 13, "a percentage (10), or { weight: 10"),
        (
            "[{ weight: 10, approval: maybe }, 100]",
            13,
            "true or false",
        ),
    ] {
        let e = ecs(&format!("  steps: {steps}\n")).unwrap_err().to_string();
        assert!(
            e.contains(&format!("services/web.yaml:{line}:")),
            "{steps}: {e}"
        );
        assert!(e.contains(says), "{steps}: {e}");
    }
}

#[test]
fn ecs_services_refuse_what_only_a_vm_uses() {
    for (extra, field) in [
        ("health: { url: \"http://x/health\" }\n", "health"),
        ("smoke:\n  - command: [bin/smoke]\n", "smoke"),
        ("hooks: { before_stop: bin/drain }\n", "hooks"),
        ("redact: [\"secret=\\\\S+\"]\n", "redact"),
        (
            "artifact: { url: \"https://a/web-{version}.tar.gz\" }\n",
            "artifact",
        ),
    ] {
        let e = ecs(extra).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "kind: ecs; `{field}:` is only for kind: vm and would be ignored"
            )),
            "{field}: {e}"
        );
    }
}

const MIGRATE: &str = "service: migrate\nkind: job\ntargets: { role: db }\nartifact: { url: \"https://a/migrate-{version}.tar.gz\" }\ninstall: { root: /srv/migrate }\nrun: { command: [bin/migrate, --yes] }\n";

fn with_job(job: &str, pin: &str) -> Result<Repo, Problems> {
    load(
        &[
            ("services/hello.yaml".to_string(), HELLO.to_string()),
            ("services/migrate.yaml".to_string(), job.to_string()),
            (
                "environments/prod.yaml".to_string(),
                format!(
                    "environment: prod\nservices:\n  migrate: {pin}\n  hello: {{ version: 1.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b, after: [migrate] }}\n"
                ),
            ),
        ],
        None,
    )
}

const PIN: &str =
    "{ version: \"5\", sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }";

#[test]
fn a_job_resolves_for_matching_hosts_only_and_refuses_what_does_not_apply() {
    let repo = with_job(&format!("{MIGRATE}timeout: 10m\n"), PIN).unwrap();
    let labels = BTreeMap::from([("role".to_string(), "db".to_string())]);
    let vars = BTreeMap::from([("port".to_string(), "8080".to_string())]);
    // A systemd host runs the job's command itself: no `run.unit` needed.
    let host = Host {
        name: "db-01",
        environment: "prod",
        labels: &labels,
        vars: &vars,
        manager: ServiceManager::Systemd,
        kind: Kind::Vm,
    };
    let plan = resolve(&repo, &host).unwrap();
    assert_eq!(plan.jobs.len(), 1);
    assert!(plan.services.is_empty(), "hello targets role: web");
    let j = &plan.jobs[0];
    assert_eq!(j.service.run.command, ["bin/migrate", "--yes"]);
    assert_eq!(j.timeout, Dur::secs(600));
    let web = BTreeMap::from([("role".to_string(), "web".to_string())]);
    let other = Host {
        labels: &web,
        manager: ServiceManager::Process,
        ..host.clone()
    };
    let plan = resolve(&repo, &other).unwrap();
    assert!(plan.jobs.is_empty() && plan.services.len() == 1);
    assert!(plan.skipped.iter().any(|(n, _)| n == "migrate"));
    // The default timeout.
    let repo = with_job(MIGRATE, PIN).unwrap();
    let plan = resolve(&repo, &host).unwrap();
    assert_eq!(plan.jobs[0].timeout, Dur::secs(1800));

    for (extra, says) in [
        (
            "health: { url: \"http://x/\" }\n",
            "`health:` does not apply",
        ),
        ("smoke: [{ command: [bin/x] }]\n", "`smoke:` does not apply"),
        (
            "hooks: { before_stop: bin/drain }\n",
            "`hooks:` does not apply",
        ),
        ("timeout: 2d\n", "timeout 48h is out of range"),
        ("timeout: 0s\n", "is out of range"),
    ] {
        let e = with_job(&format!("{MIGRATE}{extra}"), PIN)
            .unwrap_err()
            .to_string();
        assert!(e.contains("services/migrate.yaml:1:"), "{extra}: {e}");
        assert!(e.contains(says), "{extra}: {e}");
    }
    let e = with_job(
        &MIGRATE.replace(
            "run: { command: [bin/migrate, --yes] }\n",
            "run: { unit: m.service }\n",
        ),
        PIN,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("needs `run.command:`") && e.contains("`run.unit:` does not apply"),
        "{e}"
    );
    let e = with_job(MIGRATE, "{ version: \"5\" }")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is kind: job, so its pin needs `sha256:`"),
        "{e}"
    );
    // `timeout` is a job's.
    let e = load(
        &[
            (
                "services/hello.yaml".to_string(),
                format!("{HELLO}timeout: 1m\n"),
            ),
            (
                "environments/prod.yaml".to_string(),
                "environment: prod\nservices: {}\n".to_string(),
            ),
        ],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`timeout:` is only for kind: job"), "{e}");
}

#[test]
fn cloudwatch_verify_defaults_to_the_alb_metrics_on_ecs_and_bad_blocks_are_refused() {
    let host = Host {
        name: "ecs-agent",
        environment: "prod",
        labels: &BTreeMap::new(),
        vars: &BTreeMap::new(),
        manager: ServiceManager::Process,
        kind: Kind::Ecs,
    };
    // No metrics: the ALB's 5xx ratio and response time, per side, at one-minute periods.
    let repo = ecs("verify:\n  duration: 5m\n  cloudwatch: {}\n").unwrap();
    let v = resolve(&repo, &host).unwrap().ecs[0]
        .verify
        .clone()
        .unwrap();
    assert_eq!(v.interval, Dur::secs(60));
    assert_eq!(v.min_points, 5);
    assert!(v.prometheus.is_empty());
    let names: Vec<&str> = v.metrics.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["5xx_ratio", "response_time"]);
    let q = v.metrics[0].cloudwatch.as_ref().unwrap();
    assert_eq!(q.dimensions["TargetGroup"], "{target_group}");
    assert!(v.metrics.iter().all(|m| m.baseline && m.by_version));
    // Its own metric, with the side's names kept for the agent to fill in.
    let own = ecs("verify:\n  duration: 10s\n  interval: 1s\n  cloudwatch: { region: eu-west-1 }\n  metrics:\n    - name: errors\n      cloudwatch:\n        namespace: App\n        metric: Errors\n        stat: p99.9\n        dimensions: { TargetGroup: \"{target_group}\", Env: \"{environment}\" }\n        divide_by: { metric: Requests }\n      max: 0.01\n").unwrap();
    let v = resolve(&own, &host).unwrap().ecs[0].verify.clone().unwrap();
    let q = v.metrics[0].cloudwatch.as_ref().unwrap();
    assert_eq!(q.dimensions["Env"], "prod");
    assert_eq!(q.dimensions["TargetGroup"], "{target_group}");
    assert_eq!(q.divide_by, Some(("Requests".into(), "Sum".into())));
    assert_eq!(
        v.cloudwatch.as_ref().unwrap().region.as_deref(),
        Some("eu-west-1")
    );
    assert_eq!(v.min_points, 5);

    let cw = |body: &str| format!("verify:\n  duration: 10m\n  cloudwatch: {{}}\n{body}");
    for (extra, line, says) in [
        (
            "verify:\n  duration: 5m\n  metrics: [{ name: e, query: up, max: 1 }]\n".to_string(),
            14,
            "no metric source",
        ),
        (
            "verify:\n  duration: 5m\n  prometheus: \"http://p:9090\"\n  cloudwatch: {}\n  metrics: [{ name: e, query: up, max: 1 }]\n".to_string(),
            14,
            "not both",
        ),
        (cw("  metrics: [{ name: e, query: up, max: 1 }]\n"), 16, "needs `cloudwatch: { namespace"),
        (
            "verify:\n  duration: 5m\n  prometheus: \"http://p:9090\"\n  metrics:\n    - { name: e, cloudwatch: { namespace: A, metric: B }, max: 1 }\n".to_string(),
            17,
            "needs `query:` (PromQL)",
        ),
        (cw("  metrics: [{ name: e, cloudwatch: { namespace: A, metric: B, stat: avg }, max: 1 }]\n"), 16, "statistic `avg`"),
        (cw("  metrics: [{ name: e, cloudwatch: { namespace: A, metric: B, stat: p101 }, max: 1 }]\n"), 16, "statistic `p101`"),
        (cw("  metrics: [{ name: e, cloudwatch: { namespace: \"\", metric: B }, max: 1 }]\n"), 16, "namespace must be 1 to 255"),
        (cw("  metrics: [{ name: e, cloudwatch: { namespace: A, metric: B, unit: s }, max: 1 }]\n"), 16, "unit"),
        (cw("  interval: 45s\n"), 14, "not a CloudWatch period"),
        ("verify:\n  duration: 4m\n  cloudwatch: {}\n".to_string(), 14, "gives at most 4 samples per side, and `min_points` is 5"),
        ("verify:\n  duration: 5m\n  cloudwatch: { region: \"EU West\" }\n".to_string(), 14, "not an AWS region name"),
        ("verify:\n  duration: 5m\n  cloudwatch: { profile: x }\n".to_string(), 15, "profile"),
    ] {
        let e = ecs(&extra).unwrap_err().to_string();
        assert!(e.contains(&format!("services/web.yaml:{line}:")), "{extra}: {e}");
        assert!(e.contains(says), "{extra}: {e}");
    }
    // A vm service has no default metrics, and no side names.
    let vm = HELLO.replace(
        "smoke:\n",
        "verify:\n  duration: 5m\n  cloudwatch: {}\nsmoke:\n",
    );
    let e = load(
        &files(&[
            ("services/hello.yaml", &vm),
            ("environments/prod.yaml", PROD),
        ]),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("only a kind: ecs service has default CloudWatch metrics"),
        "{e}"
    );
    let vm = HELLO.replace(
        "smoke:\n",
        "verify:\n  duration: 5m\n  cloudwatch: {}\n  metrics: [{ name: e, cloudwatch: { namespace: A, metric: B, dimensions: { T: \"{target_group}\" } }, max: 1 }]\nsmoke:\n",
    );
    let e = load(
        &files(&[
            ("services/hello.yaml", &vm),
            ("environments/prod.yaml", PROD),
        ]),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("are for the metrics of a kind: ecs service"),
        "{e}"
    );
}

#[test]
fn an_environment_may_switch_the_verify_source() {
    let base = "verify:\n  duration: 5m\n  prometheus: \"http://p:9090\"\n  metrics: [{ name: e, query: up, max: 1 }]\n";
    let env = |over: &str| {
        load(
            &[
                ("services/web.yaml".to_string(), format!("{WEB}{base}")),
                (
                    "environments/prod.yaml".to_string(),
                    format!(
                        "environment: prod\nservices:\n  web: {{ version: 1.0 }}\nverify:\n  web: {over}\n"
                    ),
                ),
            ],
            None,
        )
    };
    let host = Host {
        name: "ecs-agent",
        environment: "prod",
        labels: &BTreeMap::new(),
        vars: &BTreeMap::new(),
        manager: ServiceManager::Process,
        kind: Kind::Ecs,
    };
    // CloudWatch with no metrics of its own in prod: the service's PromQL metric does not fit.
    let e = env("{ cloudwatch: {} }").unwrap_err().to_string();
    assert!(e.contains("environments/prod.yaml:5:"), "{e}");
    assert!(e.contains("needs `cloudwatch: { namespace"), "{e}");
    let repo = env("{ cloudwatch: {}, metrics: [] }").unwrap();
    let v = resolve(&repo, &host).unwrap().ecs[0]
        .verify
        .clone()
        .unwrap();
    assert!(v.cloudwatch.is_some() && v.prometheus.is_empty());
    assert_eq!(v.metrics.len(), 2, "the ALB defaults");
    assert_eq!(v.interval, Dur::secs(60));
    let e = env("{ prometheus: \"http://q:9090\", cloudwatch: {} }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not both"), "{e}");
}

/// `prod` with the `notify:` block `notify` (indented, from line 3).
fn notified(notify: &str) -> Result<Repo, Problems> {
    let env = format!(
        "environment: prod\nnotify:\n{notify}services:\n  hello: {{ version: 1.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }}\n"
    );
    load(
        &[
            ("services/hello.yaml".to_string(), HELLO.to_string()),
            ("environments/prod.yaml".to_string(), env),
        ],
        None,
    )
}

#[test]
fn notify_routes_name_known_events_and_bad_ones_are_refused_at_their_line() {
    let repo = notified(
        "  - on: [approval_required, started, succeeded, failed, rolled_back, verification_medium, paused]\n    to: [deploys-slack, prod-pager]\n  - { on: [failed], to: [ops-jira] }\n",
    )
    .unwrap();
    let routes = &repo.environments["prod"].notify;
    assert_eq!(routes.len(), 2);
    let on: Vec<Event> = routes[0].value.on.iter().map(|e| e.value).collect();
    assert_eq!(on, Event::ALL.to_vec());
    assert_eq!(routes[1].value.to[0].value.as_str(), "ops-jira");

    for (entry, line, says) in [
        (
            "  - { on: [deployed], to: [x] }\n",
            3,
            "unknown variant `deployed`, expected one of `approval_required`, `started`",
        ),
        ("  - { on: [], to: [x] }\n", 3, "a route needs `on`"),
        (
            "  - { on: [failed], to: [] }\n",
            3,
            "and `to` (channel names",
        ),
        ("  - { on: [failed], to: [Bad Name] }\n", 3, "invalid name"),
        (
            "  - { on: [failed, failed], to: [x] }\n",
            3,
            "event `failed` is listed twice",
        ),
        (
            "  - { on: [failed], to: [x, x] }\n",
            3,
            "channel `x` is listed twice",
        ),
        ("  - { on: [failed], too: [x] }\n", 3, "unknown field `too`"),
        ("  - failed\n", 3, "expected a mapping with `on` or `to`"),
    ] {
        let e = notified(entry).unwrap_err().to_string();
        assert!(e.contains(says), "{entry}: {e}");
        assert!(
            e.contains(&format!("environments/prod.yaml:{line}")),
            "{entry}: {e}"
        );
    }
    let many: String = (0..MAX_ROUTES + 1)
        .map(|i| format!("  - {{ on: [failed], to: [c{i}] }}\n"))
        .collect();
    let e = notified(&many).unwrap_err().to_string();
    assert!(e.contains("routes; at most 32"), "{e}");
}
