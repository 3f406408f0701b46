//! The coordinator's own reading of the desired-state repo: the same mirror, loop and strict
//! parser as the agent's (`drover_desired`). Each new branch tip is validated as a whole; a
//! valid one becomes the [`Desired`] state the core follows (versions and policies), an
//! invalid one is refused with every problem at file:line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use drover_desired::git::{Mirror, RepoConfig, Snapshot};
use drover_desired::spec::{self, Kind, Repo, Rollbacks};
use tokio::sync::watch;

use crate::actor::{Command, now_ms};
use crate::core::{Desired, EnvDesired, Refused};
use crate::wire::Policy;

/// What a fetch of the branch tip gives the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// A valid commit.
    Desired(Desired),
    /// A commit that does not validate.
    Refused(Refused),
    /// The repo could not be read.
    Error(String),
}

/// Validates `snap` as a whole and reads every environment's pins and policy from it.
pub fn read(snap: &Snapshot, now: u64) -> Update {
    match spec::load(&snap.files, None) {
        Ok(repo) => Update::Desired(desired(&repo, snap, now)),
        Err(problems) => Update::Refused(Refused {
            commit: snap.commit.clone(),
            problems: problems.0.iter().map(ToString::to_string).collect(),
            at_ms: now,
        }),
    }
}

fn desired(repo: &Repo, snap: &Snapshot, now: u64) -> Desired {
    let environments = repo
        .environments
        .iter()
        .map(|(name, env)| {
            let policy = Policy {
                max_parallel: env.rollout.max_parallel,
                max_failures: env.rollout.max_failures,
                approval_required: env.approval.required,
                approvers: env.approval.approvers.clone(),
                approval_timeout_ms: u64::try_from(env.approval.timeout.0.as_millis())
                    .unwrap_or(u64::MAX),
                promotion_requires: env
                    .promotion
                    .as_ref()
                    .map(|p| p.requires.value.as_str().to_string()),
                rollbacks_need_approval: env.approval.rollbacks == Rollbacks::Required,
                approve_after_first_batch: env.approval.after_first_batch,
            };
            let services: BTreeMap<String, String> = env
                .services
                .iter()
                .filter_map(|(s, pin)| {
                    pin.value
                        .version
                        .as_ref()
                        .map(|v| (s.clone(), v.as_str().to_string()))
                })
                .collect();
            let after: BTreeMap<String, Vec<String>> = env
                .services
                .iter()
                .filter(|(_, pin)| !pin.value.after.is_empty())
                .map(|(s, pin)| {
                    let names = pin.value.after.iter().map(|a| a.value.as_str().to_string());
                    (s.clone(), names.collect())
                })
                .collect();
            (
                name.clone(),
                EnvDesired {
                    policy,
                    services,
                    after,
                    freeze: env.freeze_windows(),
                    jobs: env
                        .services
                        .keys()
                        .filter(|s| repo.services.get(*s).is_some_and(|d| d.kind == Kind::Job))
                        .cloned()
                        .collect(),
                    notify: env
                        .notify
                        .iter()
                        .map(|r| crate::notify::Route {
                            on: r.value.on.iter().map(|e| e.value).collect(),
                            to: r
                                .value
                                .to
                                .iter()
                                .map(|c| c.value.as_str().to_string())
                                .collect(),
                        })
                        .collect(),
                },
            )
        })
        .collect();
    Desired {
        commit: snap.commit.clone(),
        commit_time_ms: snap.commit_time_ms,
        fetched_at_ms: now,
        environments,
    }
}

/// Follows the branch (mirror under `git_dir`) until `shutdown`, handing each tip to the
/// actor and publishing it on `tip` (agents long-poll it). `wake` asks for a fetch now.
pub async fn follow(
    cfg: RepoConfig,
    git_dir: PathBuf,
    actor: mpsc::Sender<Command>,
    tip: watch::Sender<Option<String>>,
    wake: tokio::sync::mpsc::Receiver<()>,
    shutdown: watch::Receiver<bool>,
) {
    let mirror = Arc::new(Mirror::new(&git_dir, &cfg.url, &cfg.branch));
    let mut last: Option<String> = None;
    let mut failing = false;
    drover_desired::git::follow(
        mirror,
        cfg,
        wake,
        shutdown,
        || true,
        move |result| {
            let update = match result {
                Ok(snap) => {
                    if last.as_deref() == Some(snap.commit.as_str()) && !failing {
                        return;
                    }
                    failing = false;
                    last = Some(snap.commit.clone());
                    tip.send_if_modified(|t| {
                        let moved = t.as_deref() != Some(snap.commit.as_str());
                        if moved {
                            *t = Some(snap.commit.clone());
                        }
                        moved
                    });
                    read(&snap, now_ms())
                }
                Err(e) => {
                    failing = true;
                    Update::Error(e.to_string())
                }
            };
            let _ = actor.send(Command::Desired(Box::new(update)));
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(files: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            commit: "c0ffee".into(),
            commit_time_ms: 42_000,
            files: files
                .iter()
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .collect(),
        }
    }

    const SERVICE: &str = "service: web\nkind: ecs\necs:\n  cluster: c\n  task_family: web\n  container: web\n  image: \"r/web:{version}\"\n  desired_count: 2\n  listener_arn: arn:l\n  target_groups: { blue: arn:b, green: arn:g }\n  container_port: 80\n  launch_type: EC2\n";

    #[test]
    fn policy_and_versions_come_from_the_commit() {
        let u = read(
            &snap(&[
                ("services/web.yaml", SERVICE),
                (
                    "environments/prod.yaml",
                    "environment: prod\nrollout: { max_parallel: 3, max_failures: 1 }\napproval: { required: true, approvers: [rm], timeout: 2h, rollbacks: required }\npromotion: { requires: staging }\nservices:\n  web: { version: 1.10 }\n",
                ),
                (
                    "environments/staging.yaml",
                    "environment: staging\nservices: {}\n",
                ),
            ]),
            7,
        );
        let Update::Desired(d) = u else {
            panic!("{u:?}")
        };
        assert_eq!(d.commit, "c0ffee");
        assert_eq!(d.commit_time_ms, 42_000);
        assert_eq!(d.version("prod", "web"), Some("1.10"));
        let p = &d.environments["prod"].policy;
        assert_eq!(
            *p,
            Policy {
                max_parallel: 3,
                max_failures: 1,
                approval_required: true,
                approvers: vec!["rm".into()],
                approval_timeout_ms: 7_200_000,
                promotion_requires: Some("staging".into()),
                rollbacks_need_approval: true,
                approve_after_first_batch: false,
            }
        );
        assert!(d.environments["staging"].services.is_empty());
    }

    #[test]
    fn an_invalid_commit_is_refused_with_every_problem() {
        let u = read(
            &snap(&[
                ("services/web.yaml", SERVICE),
                (
                    "environments/prod.yaml",
                    "environment: prod\nrollout: { max_paralel: 3 }\nservices:\n  web: { version: 1.0 }\n  api: { version: 2.0 }\n",
                ),
            ]),
            7,
        );
        let Update::Refused(r) = u else {
            panic!("{u:?}")
        };
        assert_eq!(r.commit, "c0ffee");
        let all = r.problems.join("\n");
        assert!(
            all.contains("environments/prod.yaml:2:") && all.contains("max_paralel"),
            "{all}"
        );
        assert!(all.contains("service `api` is not defined"), "{all}");
    }
}
