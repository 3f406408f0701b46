//! The desired-state parser: YAML → spec → what one host runs.
//!
//! The input is up to four files separated by NUL bytes, read as `services/hello.yaml`,
//! `environments/prod.yaml`, `services/db.yaml` and `environments/staging.yaml`, as the agent
//! and the coordinator read a commit. A valid repo is then resolved for a host of each
//! environment, by both kinds of agent. Nothing may panic, and the parser's limits (depth,
//! aliases, file size) bound its time and memory.
#![no_main]

use std::collections::BTreeMap;

use drover_desired::spec::{self, Host, Kind, ServiceManager};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = [
    "services/hello.yaml",
    "environments/prod.yaml",
    "services/db.yaml",
    "environments/staging.yaml",
];

fuzz_target!(|data: &[u8]| {
    let mut files = Vec::new();
    for (name, part) in NAMES.iter().zip(data.split(|b| *b == 0)) {
        let Ok(text) = std::str::from_utf8(part) else {
            return;
        };
        files.push((name.to_string(), text.to_string()));
    }
    let vars = ["rack".to_string()];
    let Ok(repo) = spec::load(&files, Some(&vars)) else {
        return;
    };
    let _ = repo.host_var_names();
    let _ = spec::root_warnings(&repo, true);
    let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
    let host_vars = BTreeMap::from([("rack".to_string(), "r1".to_string())]);
    for env in repo.environments.keys() {
        for (manager, kind) in [
            (ServiceManager::Systemd, Kind::Vm),
            (ServiceManager::Process, Kind::Vm),
            (ServiceManager::Systemd, Kind::Ecs),
        ] {
            let host = Host {
                name: "web-1",
                environment: env,
                labels: &labels,
                vars: &host_vars,
                manager,
                kind,
            };
            let _ = spec::resolve(&repo, &host);
        }
    }
});
