//! The JSON Schemas of the repo files (`schema/`): generated from the parser's own types (the
//! committed copies must match), accepting every example, and rejecting what the parser
//! rejects, as an independent validator reads them (Python's `jsonschema`, draft 7, with the
//! YAML loaded by PyYAML as YAML 1.2, as editors load it).

use std::path::{Path, PathBuf};
use std::process::Command;

use drover_desired::spec::{self, schema};
use drover_tests::host::SERVICE;
use drover_tests::{TestDir, workspace};

/// Validates each of `files` against `schema`; the validator's verdict per file, with its
/// messages.
const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
# YAML 1.2 (what drover's parser and editors' YAML support read) has no timestamps: a freeze
# window's `from: 2026-12-24T00:00:00Z` is text, not the datetime PyYAML's 1.1 would make.
class Loader(yaml.SafeLoader):
    pass
Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
v = jsonschema.Draft7Validator(schema)
for f in sys.argv[2:]:
    doc = yaml.load(open(f), Loader=Loader)
    errs = sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    def show(e):
        print(f"{f}: /{'/'.join(map(str, e.absolute_path))}: {e.message}")
        for c in e.context or []:
            show(c)
    for e in errs:
        show(e)
    print(f"{f}: {'invalid' if errs else 'valid'}")
"#;

fn schema_file(name: &str) -> PathBuf {
    workspace().join("schema").join(name)
}

/// Each file's verdict (true: valid) and the validator's whole output.
fn judge(schema: &str, files: &[PathBuf]) -> (Vec<bool>, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(VALIDATE)
        .arg(schema_file(schema))
        .args(files)
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the validator failed (pip install jsonschema pyyaml):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts = files
        .iter()
        .map(|f| {
            let valid = format!("{}: valid", f.display());
            let invalid = format!("{}: invalid", f.display());
            assert!(text.contains(&valid) || text.contains(&invalid), "{text}");
            text.lines().any(|l| l == valid)
        })
        .collect();
    (verdicts, text)
}

#[test]
fn the_committed_schemas_are_what_the_parser_types_generate() {
    for (name, _) in schema::FILES {
        let want = serde_json::to_string_pretty(&schema::by_file(name).unwrap()).unwrap() + "\n";
        let path = schema_file(name);
        if std::env::var_os("DROVER_BLESS_SCHEMA").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "schema/{name} differs from what the parser's types generate: run \
             `DROVER_BLESS_SCHEMA=1 cargo test -p drover-tests --test testsuite schema::` and commit it"
        );
    }
}

fn kind_of(path: &Path) -> &'static str {
    match path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
    {
        Some("services") => "service.schema.json",
        Some("environments") => "environment.schema.json",
        _ => panic!("{} is not a repo file", path.display()),
    }
}

#[test]
fn every_example_repo_file_passes_its_schema() {
    let mut files = Vec::new();
    for repo in ["examples/fleet", "examples/ecs"] {
        for dir in ["services", "environments"] {
            for e in std::fs::read_dir(workspace().join(repo).join(dir)).unwrap() {
                files.push(e.unwrap().path());
            }
        }
    }
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let (v, text) = judge(kind_of(f), std::slice::from_ref(f));
        assert!(v[0], "{text}");
    }
}

const ENV: &str = "environment: test\nrollout: { max_parallel: 2 }\nservices:\n  hello: { version: 1.0.0, sha256: 6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b }\n";

/// Cases of one file (the other file of the repo is the good one): the text, whether the
/// parser and the schema accept it, and (when not) a word of the schema's complaint.
fn cases() -> Vec<(&'static str, String, Option<&'static str>)> {
    let svc = |from: &str, to: &str| {
        assert!(SERVICE.contains(from), "{from}");
        SERVICE.replacen(from, to, 1)
    };
    let env = |from: &str, to: &str| {
        assert!(ENV.contains(from), "{from}");
        ENV.replacen(from, to, 1)
    };
    vec![
        // Accepted by both.
        ("services", SERVICE.to_string(), None),
        ("environments", ENV.to_string(), None),
        (
            "services",
            svc(
                "  before_stop: bin/drain",
                "  before_stop: { command: [bin/drain, \"--all\"], timeout: 2m }",
            ),
            None,
        ),
        (
            "services",
            format!("{SERVICE}redact: [\"token=[a-z]+\"]\n"),
            None,
        ),
        ("environments", env("version: 1.0.0", "version: 7"), None),
        (
            "environments",
            format!(
                "{ENV}approval: {{ after_first_batch: true }}\nfreeze:\n  - {{ from: 2026-12-24T00:00:00Z, to: \"2026-12-27T00:00:00+01:00\" }}\n  - {{ cron: \"0 18 * * FRI\", duration: 62h, timezone: Europe/Berlin }}\n"
            ),
            None,
        ),
        // Refused by both.
        (
            "services",
            svc("service: hello", "servce: hello"),
            Some("servce"),
        ),
        (
            "services",
            svc("service: hello", "service: Hello"),
            Some("does not match"),
        ),
        (
            "services",
            svc("keep_releases: 3", "kep_releases: 3"),
            Some("kep_releases"),
        ),
        (
            "services",
            svc("timeout: 5s", "timeout: 5 s"),
            Some("does not match"),
        ),
        (
            "services",
            svc("shared: [data]", "shared: [/data]"),
            Some("does not match"),
        ),
        (
            "services",
            svc("shared: [data]", "shared: [../data]"),
            Some("does not match"),
        ),
        (
            "services",
            svc("stop_timeout: 5s", "stop_timeout: soon"),
            Some("does not match"),
        ),
        (
            "services",
            format!("{SERVICE}kind: lambda\n"),
            Some("lambda"),
        ),
        (
            "services",
            format!("{SERVICE}redact: \"\"\n"),
            Some("is not of type 'array'"),
        ),
        (
            "services",
            svc("smoke:\n  - url:", "smoke:\n    url:"),
            Some("is not of type 'array'"),
        ),
        (
            "services",
            svc(
                "  before_stop: bin/drain",
                "  before_stop: { command: [bin/drain], timout: 2m }",
            ),
            Some("before_stop"),
        ),
        (
            "services",
            svc(
                "health:\n  url:",
                "health:\n  expect_status: \"ok\"\n  url:",
            ),
            Some("expect_status"),
        ),
        (
            "environments",
            env("environment: test", "environment: Test"),
            Some("does not match"),
        ),
        (
            "environments",
            env("sha256: 6b86", "sha256: xyz6b86"),
            Some("does not match"),
        ),
        (
            "environments",
            env("max_parallel: 2", "max_parallel: -1"),
            Some("minimum"),
        ),
        (
            "environments",
            env("max_parallel: 2", "max_paralel: 2"),
            Some("max_paralel"),
        ),
        (
            "environments",
            format!("{ENV}approval: {{ required: maybe }}\n"),
            Some("is not of type 'boolean'"),
        ),
        (
            "environments",
            format!("{ENV}promotion: {{ require: staging }}\n"),
            Some("require"),
        ),
        (
            "environments",
            format!("{ENV}approval: {{ rollbacks: sometimes }}\n"),
            Some("sometimes"),
        ),
        (
            "environments",
            env("b4b }", "b4b, after: 5 }"),
            Some("is not of type 'array'"),
        ),
        (
            "environments",
            format!("{ENV}freeze:\n  - {{ cron: \"0 18 * *\", duration: 2h }}\n"),
            Some("does not match"),
        ),
        (
            "environments",
            format!("{ENV}freeze:\n  - {{ from: 2026-12-24, to: 2026-12-27T00:00:00Z }}\n"),
            Some("2026"),
        ),
    ]
}

#[test]
fn the_schema_and_the_parser_accept_and_refuse_the_same_files() {
    let t = TestDir::new();
    let cases = cases();
    let mut by_schema: Vec<(PathBuf, &str)> = Vec::new();
    for (i, (dir, text, refused)) in cases.iter().enumerate() {
        // The parser, on a repo of this file and the other kind's good one.
        let (service, env) = match *dir {
            "services" => (text.clone(), ENV.to_string()),
            _ => (SERVICE.to_string(), text.clone()),
        };
        let files = vec![
            ("services/hello.yaml".to_string(), service),
            ("environments/test.yaml".to_string(), env),
        ];
        let parsed = spec::load(&files, None);
        assert_eq!(
            parsed.is_ok(),
            refused.is_none(),
            "case {i}: the parser says {:?}:\n{text}",
            parsed.err().map(|p| p.to_string())
        );
        let path = t.path().join(format!("{i}")).join(dir).join("f.yaml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        by_schema.push((path, kind_of_dir(dir)));
    }
    for schema in ["service.schema.json", "environment.schema.json"] {
        let files: Vec<PathBuf> = by_schema
            .iter()
            .filter(|(_, s)| *s == schema)
            .map(|(p, _)| p.clone())
            .collect();
        let (verdicts, text) = judge(schema, &files);
        for (file, valid) in files.iter().zip(verdicts) {
            let i: usize = file
                .parent()
                .and_then(|p| p.parent())
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .unwrap();
            let (_, case, refused) = &cases[i];
            assert_eq!(valid, refused.is_none(), "case {i}:\n{case}\n{text}");
            if let Some(word) = refused {
                let said: String = text
                    .lines()
                    .filter(|l| l.starts_with(&format!("{}: /", file.display())))
                    .collect::<Vec<_>>()
                    .join("\n");
                assert!(
                    said.contains(word),
                    "case {i}: expected `{word}` in:\n{said}"
                );
            }
        }
    }
}

fn kind_of_dir(dir: &str) -> &'static str {
    kind_of(&Path::new(dir).join("f.yaml"))
}
