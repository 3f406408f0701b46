//! What one host must run: the environment's pins joined with the service definitions,
//! filtered by `targets`, with every template rendered for this host.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    Account, Approval, Compare, Digest, Direction, Dur, Kind, OnMedium, Pattern, RelPath, Repo,
    Rollout, ServiceManager, ServiceSpec, Template, Vars, VerifyOverride,
};
use crate::yaml::{Mark, Problem, Problems};

/// The host the plan is for.
#[derive(Clone, Debug)]
pub struct Host<'a> {
    /// Host name (`{host}`).
    pub name: &'a str,
    /// Environment (`{environment}`).
    pub environment: &'a str,
    /// Labels, matched by `targets`.
    pub labels: &'a BTreeMap<String, String>,
    /// Host vars.
    pub vars: &'a BTreeMap<String, String>,
    /// Which `run` field must be present.
    pub manager: ServiceManager,
    /// Which kind of services this agent deploys.
    pub kind: Kind,
}

/// The environment's policy, as the coordinator needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvPolicy {
    /// Environment name.
    pub name: String,
    /// Rolling-batch policy.
    pub rollout: Rollout,
    /// Approval gate.
    pub approval: Approval,
    /// Upstream environment a version must have succeeded in.
    pub promotion_requires: Option<String>,
}

/// Everything this host must run, for one commit of the repo.
#[derive(Clone, Debug)]
pub struct HostPlan {
    /// The environment's policy.
    pub policy: EnvPolicy,
    /// The services that target this host, rendered.
    pub services: Vec<ResolvedService>,
    /// The ECS services of the environment (for an agent in ECS mode).
    pub ecs: Vec<ResolvedEcsService>,
    /// The jobs (`kind: job`) this host may run, rendered; the coordinator picks one host.
    pub jobs: Vec<ResolvedJob>,
    /// Services pinned in the environment that do not target this host (name, reason).
    pub skipped: Vec<(String, String)>,
}

/// One service, rendered for one host and one version: all a deploy needs, with no reference
/// to the repo. Stored with an in-flight deployment so recovery works without Git.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedService {
    /// Service name.
    pub service: String,
    /// Environment.
    pub environment: String,
    /// Desired version.
    pub version: String,
    /// Pinned artifact digest.
    pub sha256: Digest,
    /// Artifact URL.
    pub artifact_url: String,
    /// Install root.
    pub root: PathBuf,
    /// Releases kept on disk.
    pub keep_releases: u32,
    /// Shared directories.
    pub shared: Vec<RelPath>,
    /// Template files (src, dest), relative to the release.
    pub templates: Vec<(RelPath, RelPath)>,
    /// How to run it.
    pub run: ResolvedRun,
    /// Hook before stop.
    pub before_stop: Option<ResolvedHook>,
    /// Hook after install.
    pub after_install: Option<ResolvedHook>,
    /// Health check.
    pub health: Option<ResolvedHealth>,
    /// Smoke tests.
    pub smoke: Vec<ResolvedSmoke>,
    /// Metric analysis.
    #[serde(default)]
    pub verify: Option<ResolvedVerify>,
    /// Template names and values (built-ins and host vars), for template files.
    pub vars: BTreeMap<String, String>,
    /// Owner of rendered template files.
    #[serde(default)]
    pub template_owner: Option<Account>,
    /// Group of rendered template files.
    #[serde(default)]
    pub template_group: Option<Account>,
    /// Patterns redacted from hook, smoke and health output.
    #[serde(default)]
    pub redact: Vec<Pattern>,
}

/// A job (`kind: job`) rendered for one host and one version: its artifact, release layout
/// and `run.command` (in `service`), and how long the command may run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedJob {
    /// Artifact, install root and command, as for a service.
    pub service: ResolvedService,
    /// The command is killed, and the job fails, after this long.
    pub timeout: Dur,
}

/// Metric analysis, rendered for the host (queries keep `{version}`, filled in per side).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedVerify {
    /// How long to watch.
    pub duration: Dur,
    /// Sample step.
    pub interval: Dur,
    /// Prometheus base URL (empty when the metrics come from CloudWatch).
    #[serde(default)]
    pub prometheus: String,
    /// CloudWatch, when the metrics come from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudwatch: Option<ResolvedCloudWatch>,
    /// What a medium risk does.
    pub on_medium: OnMedium,
    /// Pass when metrics cannot be read.
    pub fail_open: bool,
    /// Fewest samples per side.
    pub min_points: u32,
    /// The metrics.
    pub metrics: Vec<ResolvedMetric>,
}

/// One metric, rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedMetric {
    /// Name.
    pub name: String,
    /// PromQL; `{version}` is still to be filled in (empty for a CloudWatch metric).
    #[serde(default)]
    pub query: String,
    /// The CloudWatch metric (for a CloudWatch source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloudwatch: Option<CwQuery>,
    /// Whether the query selects a side, by `{version}` or `{target_group}` (then the
    /// baseline is the old side over the same window).
    pub by_version: bool,
    /// Highest acceptable median.
    pub max: Option<f64>,
    /// Lowest acceptable median.
    pub min: Option<f64>,
    /// Compare with the old version.
    pub baseline: bool,
    /// Which way is worse.
    pub direction: Direction,
    /// Relative tolerance.
    pub tolerance: f64,
    /// Absolute tolerance.
    pub tolerance_abs: f64,
}

/// Where CloudWatch is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedCloudWatch {
    /// Region, when not the default.
    pub region: Option<String>,
}

/// A CloudWatch metric, rendered: dimension values keep `{version}`, `{target_group}` and
/// `{load_balancer}`, filled in per side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CwQuery {
    /// Namespace.
    pub namespace: String,
    /// Metric name.
    pub metric: String,
    /// Statistic.
    pub stat: String,
    /// Dimensions.
    pub dimensions: BTreeMap<String, String>,
    /// The divisor's metric and statistic, for a ratio.
    pub divide_by: Option<(String, String)>,
}

/// `text` with each `{name}` of `vars` replaced: a side's names, kept in a rendered metric
/// until the side is known.
pub fn fill_side(text: &str, vars: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    for (name, value) in vars {
        t = t.replace(&format!("{{{name}}}"), value);
    }
    t
}

impl CwQuery {
    /// This query with each `{name}` of `vars` replaced in the dimension values.
    pub fn fill(&self, vars: &[(&str, &str)]) -> CwQuery {
        let mut q = self.clone();
        for v in q.dimensions.values_mut() {
            *v = fill_side(v, vars);
        }
        q
    }
}

impl std::fmt::Display for CwQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.namespace, self.metric, self.stat)?;
        if let Some((m, s)) = &self.divide_by {
            write!(f, " / {m} ({s})")?;
        }
        let dims: Vec<String> = self
            .dimensions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(f, " [{}]", dims.join(", "))
    }
}

/// The metrics a `kind: ecs` service is verified with when it reads CloudWatch and lists
/// none: its ALB's 5xx ratio and target response time, per target group, each compared with
/// the other colour over the same window.
pub fn alb_default_metrics() -> Vec<ResolvedMetric> {
    let dims: BTreeMap<String, String> = [
        ("LoadBalancer", "{load_balancer}"),
        ("TargetGroup", "{target_group}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let metric = |metric: &str, stat: &str, divide_by: Option<(&str, &str)>| CwQuery {
        namespace: "AWS/ApplicationELB".into(),
        metric: metric.into(),
        stat: stat.into(),
        dimensions: dims.clone(),
        divide_by: divide_by.map(|(m, s)| (m.into(), s.into())),
    };
    [
        (
            "5xx_ratio",
            metric(
                "HTTPCode_Target_5XX_Count",
                "Sum",
                Some(("RequestCount", "Sum")),
            ),
            0.1,
            0.01,
        ),
        (
            "response_time",
            metric("TargetResponseTime", "Average", None),
            0.2,
            0.05,
        ),
    ]
    .into_iter()
    .map(|(name, q, tolerance, tolerance_abs)| ResolvedMetric {
        name: name.to_string(),
        query: String::new(),
        cloudwatch: Some(q),
        by_version: true,
        max: None,
        min: None,
        baseline: true,
        direction: Direction::Increase,
        tolerance,
        tolerance_abs,
    })
    .collect()
}

/// An ECS service, rendered for one version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedEcsService {
    /// Service name (`<service>-blue` and `<service>-green` in ECS).
    pub service: String,
    /// Environment.
    pub environment: String,
    /// Desired version.
    pub version: String,
    /// The ECS and ALB settings.
    pub ecs: ResolvedEcs,
    /// Metric analysis at each traffic step.
    #[serde(default)]
    pub verify: Option<ResolvedVerify>,
}

/// ECS settings, rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedEcs {
    /// Cluster.
    pub cluster: String,
    /// Task definition family.
    pub task_family: String,
    /// Container whose image changes.
    pub container: String,
    /// The image of the desired version.
    pub image: String,
    /// Tasks.
    pub desired_count: u32,
    /// Listener.
    pub listener_arn: String,
    /// Rule modified instead of the listener's default action.
    pub rule_arn: Option<String>,
    /// Target group of `<service>-blue`.
    pub tg_blue: String,
    /// Target group of `<service>-green`.
    pub tg_green: String,
    /// Traffic steps, percent, ending at 100.
    pub steps: Vec<u8>,
    /// Bake time per step (unless `waits` gives the step's own).
    pub step_wait: Dur,
    /// Bake times of the steps that give their own (`steps: [{ weight: 10, wait: 10m }]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub waits: BTreeMap<u8, Dur>,
    /// The steps that wait for an approval once baked and verified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<u8>,
    /// Blue-green (the new side at full size from the start) or canary (scaled with its
    /// traffic).
    #[serde(default)]
    pub strategy: super::Strategy,
    /// Wait before the old side goes.
    pub drain: Dur,
    /// Time for the new side to become healthy.
    pub health_timeout: Dur,
    /// Launch type.
    pub launch_type: super::LaunchType,
    /// Container port.
    pub container_port: u16,
    /// awsvpc network.
    pub network: Option<super::Network>,
}

impl ResolvedEcs {
    /// The bake time at step `weight`.
    pub fn wait_at(&self, weight: u8) -> Dur {
        self.waits.get(&weight).copied().unwrap_or(self.step_wait)
    }

    /// Whether step `weight` waits for an approval once baked.
    pub fn approval_at(&self, weight: u8) -> bool {
        self.approvals.contains(&weight)
    }

    /// The new side's tasks while it takes `weight` % of the traffic: all of `desired_count`
    /// for blue-green; for a canary its share, rounded up, at least one (so a canary at 10 %
    /// does not double the capacity).
    pub fn tasks_at(&self, weight: u8) -> u32 {
        match self.strategy {
            super::Strategy::BlueGreen => self.desired_count,
            super::Strategy::Canary => {
                let share = (u64::from(self.desired_count) * u64::from(weight)).div_ceil(100);
                u32::try_from(share)
                    .unwrap_or(u32::MAX)
                    .clamp(1, self.desired_count.max(1))
            }
        }
    }

    /// The new side's tasks when it is created (before any traffic): those of the first step.
    pub fn first_tasks(&self) -> u32 {
        self.tasks_at(self.steps.first().copied().unwrap_or(100))
    }
}

/// How to run the service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedRun {
    /// systemd unit.
    pub unit: Option<String>,
    /// Command (process manager).
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Stop timeout.
    pub stop_timeout: Dur,
    /// User the command, hooks and smoke commands run as (process manager).
    #[serde(default)]
    pub user: Option<Account>,
    /// Their group.
    #[serde(default)]
    pub group: Option<Account>,
}

/// A hook, rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedHook {
    /// Program (relative to the release) and arguments.
    pub command: Vec<String>,
    /// Time limit.
    pub timeout: Dur,
}

/// The health check, rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedHealth {
    /// URL.
    pub url: String,
    /// Expected status.
    pub expect_status: u16,
    /// Expected body substring.
    pub expect_body: Option<String>,
    /// Time to become healthy.
    pub timeout: Dur,
}

/// A smoke test, rendered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedSmoke {
    /// URL to check.
    pub url: Option<String>,
    /// Or a command to run.
    pub command: Option<Vec<String>>,
    /// Expected status.
    pub expect_status: u16,
    /// Expected body substring.
    pub expect_body: Option<String>,
    /// Time limit.
    pub timeout: Dur,
}

/// Renders the plan of `host` from `repo`, or every problem that prevents it.
pub fn resolve(repo: &Repo, host: &Host) -> Result<HostPlan, Problems> {
    let Some(env) = repo.environments.get(host.environment) else {
        return Err(Problems(vec![Problem::new(
            Mark::file_start(&format!("environments/{}.yaml", host.environment)),
            format!(
                "environment `{}` (this host's, from the agent config) is not defined in the repo",
                host.environment
            ),
        )]));
    };
    let policy = EnvPolicy {
        name: host.environment.to_string(),
        rollout: env.rollout.clone(),
        approval: env.approval.clone(),
        promotion_requires: env
            .promotion
            .as_ref()
            .map(|p| p.requires.value.as_str().to_string()),
    };
    let mut problems = Vec::new();
    let mut services = Vec::new();
    let mut ecs = Vec::new();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for (name, pin) in &env.services {
        let Some(spec) = repo.services.get(name) else {
            continue; // reported by load()
        };
        // Jobs run on VM hosts.
        let kind = match spec.kind {
            Kind::Job => Kind::Vm,
            k => k,
        };
        if kind != host.kind {
            continue;
        }
        let over = env.verify.get(name).map(|o| &o.value);
        if spec.kind == Kind::Ecs {
            let Some(version) = &pin.value.version else {
                continue; // reported by load()
            };
            let names = template_names(host, name, version);
            let mut r = Renderer::new(&names, &mut problems);
            if let Some(e) = render_ecs(spec, over, &mut r, host, &names) {
                ecs.push(e);
            }
            continue;
        }
        if let Some((k, v)) = spec
            .targets
            .iter()
            .find(|(k, v)| host.labels.get(*k) != Some(*v))
        {
            skipped.push((name.clone(), format!("targets {k}={v}")));
            continue;
        }
        let (Some(version), Some(sha256)) = (&pin.value.version, pin.value.sha256.clone()) else {
            continue; // reported by load()
        };
        let names = template_names(host, name, version);
        let mut r = Renderer::new(&names, &mut problems);
        let job = spec.kind == Kind::Job;
        // A job runs its command itself, whatever the host's service manager.
        let manager = if job {
            ServiceManager::Process
        } else {
            host.manager
        };
        if let Some(s) = render_service(spec, over, &mut r, host, manager, sha256, &names) {
            if job {
                let timeout = spec
                    .timeout
                    .unwrap_or(Dur::secs(super::DEFAULT_JOB_TIMEOUT_S));
                jobs.push(ResolvedJob {
                    service: s,
                    timeout,
                });
            } else {
                services.push(s);
            }
        }
    }
    if problems.is_empty() {
        Ok(HostPlan {
            policy,
            services,
            ecs,
            jobs,
            skipped,
        })
    } else {
        Err(Problems(problems).sorted())
    }
}

/// The names a service's templates of `host` may use: the host's vars and the built-ins.
fn template_names(
    host: &Host,
    service: &str,
    version: &impl std::fmt::Display,
) -> BTreeMap<String, String> {
    let mut names = host.vars.clone();
    names.insert("version".into(), version.to_string());
    names.insert("service".into(), service.to_string());
    names.insert("environment".into(), host.environment.to_string());
    names.insert("host".into(), host.name.to_string());
    names
}

struct Renderer<'a> {
    vars: Vars<'a>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Renderer<'a> {
    fn new(names: &'a BTreeMap<String, String>, problems: &'a mut Vec<Problem>) -> Self {
        Renderer {
            vars: Vars { names, env: None },
            problems,
        }
    }

    fn one(&mut self, t: &Template) -> String {
        t.render(&self.vars).unwrap_or_else(|e| {
            self.problems.push(Problem::new(t.mark().clone(), e));
            String::new()
        })
    }
    /// Renders a URL template and checks the result's scheme.
    fn url(&mut self, t: &Template, schemes: &[&str], what: &str) -> String {
        let url = self.one(t);
        if !url.is_empty()
            && let Some(p) = super::url_problem(&url, schemes, what)
        {
            self.problems.push(Problem::new(t.mark().clone(), p));
        }
        url
    }
    fn all(&mut self, ts: &[Template]) -> Vec<String> {
        ts.iter().map(|t| self.one(t)).collect()
    }
}

fn render_service(
    spec: &ServiceSpec,
    over: Option<&VerifyOverride>,
    r: &mut Renderer,
    host: &Host,
    manager: ServiceManager,
    sha256: Digest,
    names: &BTreeMap<String, String>,
) -> Option<ResolvedService> {
    let at = spec.service.mark.clone();
    let (artifact, install, run) = (
        spec.artifact.as_ref()?,
        spec.install.as_ref()?,
        spec.run.as_ref()?,
    );
    let root = r.one(&install.root);
    if !root.starts_with('/') {
        r.problems.push(Problem::new(
            install.root.mark().clone(),
            format!("install root renders to `{root}`, which is not an absolute path"),
        ));
    }
    let unit = run.unit.as_ref().map(|u| r.one(u));
    let command = run.command.as_deref().map(|c| r.all(c)).unwrap_or_default();
    match manager {
        ServiceManager::Systemd if unit.is_none() => r.problems.push(Problem::new(
            at.clone(),
            "this host uses service_manager: systemd, so `run.unit:` is required",
        )),
        ServiceManager::Process if command.is_empty() => r.problems.push(Problem::new(
            at.clone(),
            "this host uses service_manager: process, so `run.command:` is required",
        )),
        _ => {}
    }
    let env = run.env.iter().map(|(k, v)| (k.clone(), r.one(v))).collect();
    let hook = |h: &Option<super::Hook>, r: &mut Renderer| {
        h.as_ref().map(|h| ResolvedHook {
            command: r.all(&h.command),
            timeout: h.timeout,
        })
    };
    let before_stop = hook(&spec.hooks.before_stop, r);
    let after_install = hook(&spec.hooks.after_install, r);
    const WEB: &[&str] = &["http", "https"];
    let health = spec.health.as_ref().map(|h| ResolvedHealth {
        url: r.url(&h.url, WEB, "health url"),
        expect_status: h.expect_status,
        expect_body: h.expect_body.as_ref().map(|b| r.one(b)),
        timeout: h.timeout,
    });
    let smoke = spec
        .smoke
        .iter()
        .map(|s| ResolvedSmoke {
            url: s.url.as_ref().map(|u| r.url(u, WEB, "smoke url")),
            command: s.command.as_deref().map(|c| r.all(c)),
            expect_status: s.expect_status,
            expect_body: s.expect_body.as_ref().map(|b| r.one(b)),
            timeout: s.timeout,
        })
        .collect();
    Some(ResolvedService {
        service: spec.service.value.as_str().to_string(),
        environment: host.environment.to_string(),
        version: names["version"].clone(),
        sha256,
        artifact_url: r.url(&artifact.url, &["http", "https", "file"], "artifact url"),
        root: PathBuf::from(root),
        keep_releases: install.keep_releases.value,
        shared: install.shared.clone(),
        templates: install
            .templates
            .iter()
            .map(|t| (t.src.clone(), t.dest.clone()))
            .collect(),
        run: ResolvedRun {
            unit,
            command,
            env,
            stop_timeout: run.stop_timeout,
            user: run.user.clone(),
            group: run.group.clone(),
        },
        before_stop,
        after_install,
        health,
        smoke,
        verify: render_verify(spec, over, r, names),
        vars: names.clone(),
        template_owner: install.template_owner.clone(),
        template_group: install.template_group.clone(),
        redact: spec.redact.clone(),
    })
}

fn render_ecs(
    spec: &ServiceSpec,
    over: Option<&VerifyOverride>,
    r: &mut Renderer,
    host: &Host,
    names: &BTreeMap<String, String>,
) -> Option<ResolvedEcsService> {
    let e = spec.ecs.as_ref()?;
    // Valid steps are percentages (`load` refused the others).
    let given: Vec<(u8, super::EcsStep)> = e
        .steps
        .iter()
        .flatten()
        .filter_map(|s| Some((u8::try_from(s.value.weight).ok()?, s.value)))
        .collect();
    let steps = if given.is_empty() {
        match e.strategy {
            super::Strategy::BlueGreen => vec![10, 50, 100],
            super::Strategy::Canary => vec![10, 25, 50, 100],
        }
    } else {
        given.iter().map(|(w, _)| *w).collect()
    };
    let waits = given
        .iter()
        .filter_map(|(w, s)| Some((*w, s.wait?)))
        .collect();
    let approvals = given
        .iter()
        .filter(|(_, s)| s.approval)
        .map(|(w, _)| *w)
        .collect();
    Some(ResolvedEcsService {
        service: spec.service.value.as_str().to_string(),
        environment: host.environment.to_string(),
        version: names["version"].clone(),
        ecs: ResolvedEcs {
            cluster: r.one(&e.cluster),
            task_family: r.one(&e.task_family),
            container: r.one(&e.container),
            image: r.one(&e.image),
            desired_count: e.desired_count,
            listener_arn: r.one(&e.listener_arn),
            rule_arn: e.rule_arn.as_ref().map(|t| r.one(t)),
            tg_blue: r.one(&e.target_groups.blue),
            tg_green: r.one(&e.target_groups.green),
            steps,
            step_wait: e.step_wait,
            waits,
            approvals,
            strategy: e.strategy,
            drain: e.drain,
            health_timeout: e.health_timeout,
            launch_type: e.launch_type,
            container_port: e.container_port,
            network: e.network.clone(),
        },
        verify: render_verify(spec, over, r, names),
    })
}

/// Merges the service's `verify` with the environment's override and renders it.
fn render_verify(
    spec: &ServiceSpec,
    over: Option<&VerifyOverride>,
    r: &mut Renderer,
    names: &BTreeMap<String, String>,
) -> Option<ResolvedVerify> {
    let base = spec.verify.as_ref().map(|v| &v.value);
    if base.is_none() && over.is_none() {
        return None;
    }
    let o = over.cloned().unwrap_or_default();
    let at = spec.service.mark.clone();
    let duration = o.duration.or(base.map(|b| b.duration));
    // The override's source replaces the service's.
    let (prometheus, cloudwatch) = if o.prometheus.is_some() || o.cloudwatch.is_some() {
        (o.prometheus.clone(), o.cloudwatch.clone())
    } else {
        (
            base.and_then(|b| b.prometheus.clone()),
            base.and_then(|b| b.cloudwatch.clone()),
        )
    };
    let metrics = o
        .metrics
        .or(base.map(|b| b.metrics.clone()))
        .unwrap_or_default();
    let Some(duration) = duration.filter(|_| prometheus.is_some() != cloudwatch.is_some()) else {
        r.problems.push(Problem::new(
            at,
            "verify: `duration` and one source, `prometheus` or `cloudwatch`, are needed (in the service or the environment override)",
        ));
        return None;
    };
    let cw = cloudwatch.is_some();
    let interval = o
        .interval
        .or(base.and_then(|b| b.interval))
        .unwrap_or(super::default_interval(duration, cw));
    // `{version}` (and on ECS the side's target group and load balancer) are filled in
    // later, once for the new side and once for the old one.
    let mut keep = names.clone();
    keep.insert("version".into(), "{version}".into());
    if spec.kind == Kind::Ecs {
        for n in super::SIDE_NAMES {
            keep.insert(n.to_string(), format!("{{{n}}}"));
        }
    }
    let vars = Vars {
        names: &keep,
        env: None,
    };
    let mut render = |t: &Template| {
        t.render(&vars).unwrap_or_else(|e| {
            r.problems.push(Problem::new(t.mark().clone(), e));
            String::new()
        })
    };
    let mut resolved: Vec<ResolvedMetric> = metrics
        .iter()
        .map(|m| {
            let selects = |t: &Template| t.names().any(|n| n == "version" || n == "target_group");
            ResolvedMetric {
                name: m.name.value.clone(),
                query: m.query.as_ref().map(&mut render).unwrap_or_default(),
                cloudwatch: m.cloudwatch.as_ref().map(|c| CwQuery {
                    namespace: c.namespace.clone(),
                    metric: c.metric.clone(),
                    stat: c.stat.clone(),
                    dimensions: c
                        .dimensions
                        .iter()
                        .map(|(k, t)| (k.clone(), render(t)))
                        .collect(),
                    divide_by: c
                        .divide_by
                        .as_ref()
                        .map(|d| (d.metric.clone(), d.stat.clone())),
                }),
                by_version: m.query.as_ref().is_some_and(selects)
                    || m.cloudwatch
                        .as_ref()
                        .is_some_and(|c| c.dimensions.values().any(selects)),
                max: m.max,
                min: m.min,
                baseline: m.compare == Some(Compare::Baseline),
                direction: m.direction,
                tolerance: m.tolerance,
                tolerance_abs: m.tolerance_abs,
            }
        })
        .collect();
    if resolved.is_empty() && cw && spec.kind == Kind::Ecs {
        resolved = alb_default_metrics();
    }
    Some(ResolvedVerify {
        duration,
        interval,
        prometheus: prometheus
            .map(|p| r.url(&p, &["http", "https"], "verify.prometheus"))
            .unwrap_or_default(),
        cloudwatch: cloudwatch.map(|c| ResolvedCloudWatch { region: c.region }),
        on_medium: o
            .on_medium
            .or(base.map(|b| b.on_medium))
            .unwrap_or_default(),
        fail_open: o.fail_open.or(base.map(|b| b.fail_open)).unwrap_or(false),
        min_points: o
            .min_points
            .or(base.and_then(|b| b.min_points))
            .unwrap_or(super::default_min_points(cw)),
        metrics: resolved,
    })
}
