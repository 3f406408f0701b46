//! The desired-state repo, format v1: `services/*.yaml` and `environments/*.yaml`.
//!
//! [`load`] parses and validates every file and returns a [`Repo`] or **every** problem found,
//! each with file and line. [`resolve`] then renders what one host must run.

pub(crate) mod leaf;
mod resolve;
#[cfg(feature = "schema")]
pub mod schema;
mod template;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::freeze::{Cron, Stamp, Window, Zone};
use crate::yaml::{self, Mark, Problem, Problems, Spanned};

pub use leaf::{Account, ByteSize, Digest, Dur, Name, Pattern, RelPath, Version};
pub use resolve::{
    CwQuery, ResolvedCloudWatch, ResolvedEcs, ResolvedEcsService, ResolvedJob, ResolvedMetric,
    ResolvedVerify, alb_default_metrics, fill_side,
};
pub use resolve::{
    EnvPolicy, Host, HostPlan, ResolvedHealth, ResolvedHook, ResolvedRun, ResolvedService,
    ResolvedSmoke, resolve,
};
pub use template::{BUILTINS, Template, Vars, env_names, render_str};

/// A service definition, `services/<service>.yaml`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The service's name; must match the file name.
    pub service: Spanned<Name>,
    /// `vm` (default): deployed by the agent on each host; `ecs`: by the cluster's ECS agent;
    /// `job`: `run.command` run once per (environment, version) on one matching host.
    #[serde(default)]
    pub kind: Kind,
    /// Label selector over the agents' `labels`; absent = every host of the environment.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// Where the artifact comes from (vm).
    pub artifact: Option<Artifact>,
    /// Where and how releases are installed (vm).
    pub install: Option<Install>,
    /// How the service is run (vm).
    pub run: Option<Run>,
    /// Hooks run around the switch (vm).
    #[serde(default)]
    pub hooks: Hooks,
    /// The health check that must pass after start.
    pub health: Option<Health>,
    /// Smoke tests run once after the health check passes.
    #[serde(default)]
    pub smoke: Vec<Smoke>,
    /// Metric analysis after health and smoke tests pass (vm), at each traffic step (ecs).
    pub verify: Option<Spanned<Verify>>,
    /// The ECS service, blue-green or canary behind an ALB (kind: ecs).
    pub ecs: Option<Ecs>,
    /// Patterns removed from hook, smoke and health output before it leaves the host (the
    /// coordinator, events, status, logs). The values of `{env.NAME}` used in template files
    /// are always removed.
    #[serde(default)]
    pub redact: Vec<Pattern>,
    /// How long a job's command may run before it (and its process group) is killed and the
    /// job fails (kind: job). Default 30m, at most 24h.
    pub timeout: Option<Dur>,
}

/// A job's default `timeout`.
pub const DEFAULT_JOB_TIMEOUT_S: u64 = 1800;
/// The longest `timeout` a job may give.
pub const MAX_JOB_TIMEOUT_S: u64 = 86_400;

/// `ecs:` — an ECS service deployed by the cluster's agent through weighted target groups.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ecs {
    /// The cluster (name or ARN).
    pub cluster: Template,
    /// Task definition family (it exists; drover registers new revisions of it).
    pub task_family: Template,
    /// The container whose image changes.
    pub container: Template,
    /// The image; must use `{version}`.
    pub image: Template,
    /// Tasks of the new service.
    pub desired_count: u32,
    /// The ALB listener whose forward weights shift traffic.
    pub listener_arn: Template,
    /// A listener rule to modify instead of the listener's default action.
    pub rule_arn: Option<Template>,
    /// The two target groups; services `<service>-blue` and `<service>-green` attach to them.
    pub target_groups: TargetGroups,
    /// `blue_green` (default) or `canary`.
    #[serde(default)]
    pub strategy: Strategy,
    /// The traffic steps, ending at 100: a percentage of traffic on the new version (`10`), or
    /// `{ weight: 10, wait: 5m, approval: true }` for a step with its own bake time or an
    /// approval before it goes on. Default [10, 50, 100] (blue_green), [10, 25, 50, 100]
    /// (canary).
    pub steps: Option<Vec<Spanned<EcsStep>>>,
    /// Bake time (and analysis) at each step that gives no `wait`. Default 5m.
    #[serde(default = "default_step_wait")]
    pub step_wait: Dur,
    /// Wait before the old side is scaled down. Default 30s.
    #[serde(default = "default_drain")]
    pub drain: Dur,
    /// Time for the new tasks to run and their targets to become healthy. Default 5m.
    #[serde(default = "default_ecs_health_timeout")]
    pub health_timeout: Dur,
    /// `FARGATE` (default) or `EC2`.
    #[serde(default)]
    pub launch_type: LaunchType,
    /// The container port registered in the target group.
    pub container_port: u16,
    /// awsvpc networking (required for FARGATE).
    pub network: Option<Network>,
}

fn default_step_wait() -> Dur {
    Dur::secs(300)
}
fn default_drain() -> Dur {
    Dur::secs(30)
}
fn default_ecs_health_timeout() -> Dur {
    Dur::secs(300)
}

/// One entry of `ecs.steps`: `10`, or `{ weight: 10, wait: 5m, approval: true }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcsStep {
    /// Percent of traffic on the new version.
    pub weight: i64,
    /// Bake time at this step; default `ecs.step_wait`.
    pub wait: Option<Dur>,
    /// Whether the step, once baked and verified, waits for an approval (`drover approve`,
    /// by the environment's `approval.approvers`) before traffic moves on. Traffic stays
    /// where it is meanwhile; a rejection, or no answer within `approval.timeout`, puts it
    /// all back on the old side.
    pub approval: bool,
}

impl<'de> Deserialize<'de> for EcsStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            weight: i64,
            wait: Option<Dur>,
            #[serde(default)]
            approval: bool,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EcsStep;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a percentage (10), or { weight: 10, wait: 5m, approval: true }")
            }
            fn visit_i64<E: serde::de::Error>(self, weight: i64) -> Result<EcsStep, E> {
                Ok(EcsStep {
                    weight,
                    wait: None,
                    approval: false,
                })
            }
            fn visit_u64<E: serde::de::Error>(self, weight: u64) -> Result<EcsStep, E> {
                self.visit_i64(i64::try_from(weight).unwrap_or(i64::MAX))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<EcsStep, A::Error> {
                let f = Full::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(EcsStep {
                    weight: f.weight,
                    wait: f.wait,
                    approval: f.approval,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// The longest bake `ecs.steps[].wait` may give.
pub const MAX_STEP_WAIT_S: u64 = 86_400;

/// `target_groups: { blue: ARN, green: ARN }`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetGroups {
    /// The blue side.
    pub blue: Template,
    /// The green side.
    pub green: Template,
}

/// How traffic moves.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A full new side, traffic shifted in a few steps.
    #[default]
    BlueGreen,
    /// The same machinery with finer steps.
    Canary,
}

/// ECS launch type.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum LaunchType {
    /// Fargate.
    #[default]
    #[serde(rename = "FARGATE")]
    Fargate,
    /// EC2 instances.
    #[serde(rename = "EC2")]
    Ec2,
}

/// awsvpc network configuration.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Subnets.
    pub subnets: Vec<String>,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Whether tasks get a public IP.
    #[serde(default)]
    pub assign_public_ip: bool,
}

/// `verify:` — metric analysis, against Prometheus or CloudWatch, after health and smoke tests
/// (vm) or at each traffic step (ecs).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// How long to watch the new version.
    pub duration: Dur,
    /// Sample step. Default: a twentieth of `duration`, between 1s and 60s (Prometheus); 60s
    /// (CloudWatch, whose ALB metrics have one-minute resolution).
    pub interval: Option<Dur>,
    /// Prometheus base URL; a template. Exactly one of `prometheus` and `cloudwatch`.
    pub prometheus: Option<Template>,
    /// Read the metrics from CloudWatch (GetMetricData). Exactly one of `prometheus` and
    /// `cloudwatch`.
    pub cloudwatch: Option<CloudWatch>,
    /// What a medium risk does: `pause` (default: keep the version, pause the rollout for a
    /// human) or `rollback`.
    #[serde(default)]
    pub on_medium: OnMedium,
    /// Go on when metrics cannot be read (Prometheus down, no data). Default false: missing
    /// data is never a pass.
    #[serde(default)]
    pub fail_open: bool,
    /// Fewest samples per side for a conclusion. Default 6 (Prometheus), 5 (CloudWatch).
    pub min_points: Option<u32>,
    /// The metrics. May be left out on a `kind: ecs` service read from CloudWatch: the
    /// defaults are the ALB's 5xx ratio and target response time per target group.
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

/// The default `min_points`: enough samples for the rank test to reach significance.
pub fn default_min_points(cloudwatch: bool) -> u32 {
    if cloudwatch { 5 } else { 6 }
}

/// `verify.cloudwatch:` — where CloudWatch is.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudWatch {
    /// AWS region. Default: the ECS agent's region, or the SDK's default chain on a vm host
    /// (`AWS_REGION`, the instance's region).
    pub region: Option<String>,
}

/// A metric read from CloudWatch (`metrics[].cloudwatch`), optionally as a ratio.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudWatchMetric {
    /// Namespace, e.g. `AWS/ApplicationELB`.
    pub namespace: String,
    /// Metric name, e.g. `HTTPCode_Target_5XX_Count`.
    pub metric: String,
    /// Statistic: `Average` (default), `Sum`, `Minimum`, `Maximum`, `SampleCount` or a
    /// percentile such as `p99`.
    #[serde(default = "default_stat")]
    pub stat: String,
    /// Dimensions; values are templates (`{version}`, and on ECS `{target_group}` and
    /// `{load_balancer}`: the side measured).
    #[serde(default)]
    pub dimensions: BTreeMap<String, Template>,
    /// Divide by this metric of the same namespace and dimensions, period by period (a
    /// period with no data point of the metric counts as 0: CloudWatch publishes no zero
    /// counts; a period with none of the divisor is skipped).
    pub divide_by: Option<CloudWatchDivisor>,
}

fn default_stat() -> String {
    "Average".into()
}

/// The divisor of a CloudWatch ratio.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudWatchDivisor {
    /// Metric name, e.g. `RequestCount`.
    pub metric: String,
    /// Statistic. Default `Sum`.
    #[serde(default = "default_divisor_stat")]
    pub stat: String,
}

fn default_divisor_stat() -> String {
    "Sum".into()
}

/// What a medium-risk verdict does.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMedium {
    /// Keep the new version and pause the rollout for a human.
    #[default]
    Pause,
    /// Roll back, like a high risk.
    Rollback,
}

/// Which way a metric gets worse.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (errors, latency).
    #[default]
    Increase,
    /// Lower is worse (throughput, success rate).
    Decrease,
    /// Any change is worse.
    Either,
}

/// What a metric is compared with.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// The old version: hosts still on it over the same window (when the query uses
    /// `{version}`), else this host before the switch.
    Baseline,
}

/// One metric of `verify.metrics`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    /// Its name, for reports.
    pub name: Spanned<String>,
    /// PromQL returning one or more series; a template (`{version}` is the version measured).
    /// For a Prometheus source.
    pub query: Option<Template>,
    /// The CloudWatch metric. For a CloudWatch source.
    pub cloudwatch: Option<CloudWatchMetric>,
    /// Highest acceptable median.
    pub max: Option<f64>,
    /// Lowest acceptable median.
    pub min: Option<f64>,
    /// Compare with the old version.
    pub compare: Option<Compare>,
    /// Which way is worse. Default increase.
    #[serde(default)]
    pub direction: Direction,
    /// Relative change tolerated (0.1 = 10%). Default 0.1.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Absolute change tolerated on top (for metrics near zero). Default 0.
    #[serde(default)]
    pub tolerance_abs: f64,
}

fn default_tolerance() -> f64 {
    0.1
}

/// An environment's override of a service's `verify` (every field optional).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyOverride {
    /// Replaces `duration`.
    pub duration: Option<Dur>,
    /// Replaces `interval`.
    pub interval: Option<Dur>,
    /// Replaces the source with Prometheus.
    pub prometheus: Option<Template>,
    /// Replaces the source with CloudWatch.
    pub cloudwatch: Option<CloudWatch>,
    /// Replaces `on_medium`.
    pub on_medium: Option<OnMedium>,
    /// Replaces `fail_open`.
    pub fail_open: Option<bool>,
    /// Replaces `min_points`.
    pub min_points: Option<u32>,
    /// Replaces the whole metric list.
    pub metrics: Option<Vec<Metric>>,
}

/// How an agent stops and starts the services of its host (agent config `service_manager`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceManager {
    /// `systemctl stop/start` of the service's `run.unit`.
    Systemd,
    /// The agent runs `run.command` itself, detached, and supervises it.
    Process,
}

/// What kind of target a service runs on.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A service on plain VMs, deployed by the agent of each host.
    #[default]
    Vm,
    /// An ECS service, deployed by the agent of its cluster.
    Ecs,
    /// A one-off command from an artifact (e.g. a database migration), run once per
    /// (environment, version) on one matching host under a lease of one.
    Job,
}

/// `artifact:` — the release archive.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// `http(s)://` or `file://` URL of a `.tar.gz` (or `.tar`) archive; a template.
    pub url: Template,
}

/// `install:` — the release layout on the host.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// Absolute directory holding `releases/<version>/`, `current` and `shared/`; a template.
    pub root: Template,
    /// How many releases to keep on disk (at least 2: current and previous). Default 5.
    #[serde(default = "default_keep_releases")]
    pub keep_releases: Spanned<u32>,
    /// Directories under `root/shared/` linked into every release at the same relative path.
    #[serde(default, deserialize_with = "rel_paths")]
    pub shared: Vec<RelPath>,
    /// Files rendered from host vars (and `{env.NAME}`) into the release, mode 0640.
    #[serde(default)]
    pub templates: Vec<TemplateFile>,
    /// Owner of the rendered files. Default: the agent's user (root).
    pub template_owner: Option<Account>,
    /// Group of the rendered files. Default: `run.group` (or the group of `run.user`), so
    /// the app can read them but not change them; else the agent's group.
    pub template_group: Option<Account>,
}

fn default_keep_releases() -> Spanned<u32> {
    Spanned {
        mark: Mark::file_start(""),
        value: 5,
    }
}

fn rel_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RelPath>, D::Error> {
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct P(#[serde(deserialize_with = "RelPath::deserialize_yaml")] RelPath);
    Ok(Vec::<P>::deserialize(d)?.into_iter().map(|p| p.0).collect())
}

/// One template file: `src` (in the release) rendered to `dest` (in the release).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    /// The template, relative to the release.
    #[serde(deserialize_with = "RelPath::deserialize_yaml")]
    pub src: RelPath,
    /// Where the rendered file goes, relative to the release.
    #[serde(deserialize_with = "RelPath::deserialize_yaml")]
    pub dest: RelPath,
}

/// `run:` — how the service runs.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The systemd unit stopped and started (`service_manager: systemd`).
    pub unit: Option<Template>,
    /// The command the agent starts and supervises (`service_manager: process`), relative
    /// paths resolved in the release directory.
    pub command: Option<Vec<Template>>,
    /// Extra environment variables for `command`.
    #[serde(default)]
    pub env: BTreeMap<String, Template>,
    /// How long a stop may take before the process group is killed. Default 10s.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: Dur,
    /// The user `command`, hooks and smoke commands run as (`service_manager: process`).
    /// Default: the agent config's `run_as.user`; without either, root (warned).
    pub user: Option<Account>,
    /// Their group. Default: the user's primary group.
    pub group: Option<Account>,
}

fn default_stop_timeout() -> Dur {
    Dur::secs(10)
}

/// `hooks:` — programs in the release run around the switch.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Run before the old version is stopped (e.g. drain). Failure aborts the deploy.
    pub before_stop: Option<Hook>,
    /// Run after `current` points at the new release, before start (e.g. migrate).
    pub after_install: Option<Hook>,
}

/// A hook: a path in the release (`bin/drain`) or `{ command: [..], timeout: 30s }`.
#[derive(Clone, Debug)]
pub struct Hook {
    /// Program and arguments; the program is relative to the release.
    pub command: Vec<Template>,
    /// Killed (with its process group) after this long. Default 60s.
    pub timeout: Dur,
    /// Where the hook was written.
    pub mark: Mark,
}

impl<'de> Deserialize<'de> for Hook {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            command: Vec<Template>,
            #[serde(default = "default_hook_timeout")]
            timeout: Dur,
        }
        enum Form {
            Path(String),
            Full(Full),
        }
        impl<'de> Deserialize<'de> for Form {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Form;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a path in the release, or { command: [..], timeout: 30s }")
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Form, E> {
                        Ok(Form::Path(s.to_string()))
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<Form, A::Error> {
                        Full::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                            .map(Form::Full)
                    }
                }
                d.deserialize_any(V)
            }
        }
        let s = Spanned::<Form>::deserialize(d)?;
        let (command, timeout) = match s.value {
            Form::Path(p) => (
                vec![Template::new(p, s.mark.clone())],
                default_hook_timeout(),
            ),
            Form::Full(f) => (f.command, f.timeout),
        };
        Ok(Hook {
            command,
            timeout,
            mark: s.mark,
        })
    }
}

fn default_hook_timeout() -> Dur {
    Dur::secs(60)
}

/// `health:` — polled after start until it passes or times out.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The URL to GET; a template.
    pub url: Template,
    /// The status that means healthy. Default 200.
    #[serde(default = "default_status")]
    pub expect_status: u16,
    /// Text the body must contain, if set; a template.
    pub expect_body: Option<Template>,
    /// How long to wait for the service to become healthy. Default 30s.
    #[serde(default = "default_health_timeout")]
    pub timeout: Dur,
}

fn default_status() -> u16 {
    200
}

fn default_health_timeout() -> Dur {
    Dur::secs(30)
}

/// One smoke test: an HTTP check (`url`) or a program in the release (`command`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoke {
    /// The URL to GET; a template.
    pub url: Option<Template>,
    /// Program and arguments, relative to the release; exit 0 passes.
    pub command: Option<Vec<Template>>,
    /// Expected status for `url`. Default 200.
    #[serde(default = "default_status")]
    pub expect_status: u16,
    /// Text the body must contain, if set; a template.
    pub expect_body: Option<Template>,
    /// Time limit. Default 10s.
    #[serde(default = "default_smoke_timeout")]
    pub timeout: Dur,
}

fn default_smoke_timeout() -> Dur {
    Dur::secs(10)
}

/// An environment, `environments/<env>.yaml`: policy and desired versions.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// The environment's name; must match the file name.
    pub environment: Spanned<Name>,
    /// Rolling-batch policy, enforced by the coordinator.
    #[serde(default)]
    pub rollout: Rollout,
    /// Approval gate, held by the coordinator.
    #[serde(default)]
    pub approval: Approval,
    /// Promotion rule, checked by the coordinator.
    pub promotion: Option<Promotion>,
    /// The desired version of each service in this environment.
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<Pin>>,
    /// Per-service overrides of `verify` in this environment.
    #[serde(default)]
    pub verify: BTreeMap<String, Spanned<VerifyOverride>>,
    /// Freeze windows: while one is open no new rollout of this environment starts (those
    /// started go on; rollbacks and reverts are never held).
    #[serde(default)]
    pub freeze: Vec<Spanned<Freeze>>,
    /// Who is told what: each route names events and the coordinator's notification
    /// channels (defined in coordinator.yaml, with their secrets) that hear of them.
    #[serde(default)]
    pub notify: Vec<Spanned<Route>>,
}

/// One entry of `notify:`: the events `on` which the channels `to` are told.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The events.
    pub on: Vec<Spanned<Event>>,
    /// The channels, by name (`notifications:` in coordinator.yaml).
    pub to: Vec<Spanned<Name>>,
}

/// What happens to a rollout that people may be told of.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// It waits for an approver.
    ApprovalRequired,
    /// Hosts started deploying it.
    Started,
    /// Every host runs it healthy.
    Succeeded,
    /// Too many hosts failed (or a gate timed out after traffic moved).
    Failed,
    /// The hosts that had deployed it went back to the version before.
    RolledBack,
    /// A host's metric verification came out medium risk (the rollout pauses).
    VerificationMedium,
    /// It stopped taking new hosts (an operator, or a medium verdict).
    Paused,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 7] = [
        Event::ApprovalRequired,
        Event::Started,
        Event::Succeeded,
        Event::Failed,
        Event::RolledBack,
        Event::VerificationMedium,
        Event::Paused,
    ];

    /// Its name in YAML and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Event::ApprovalRequired => "approval_required",
            Event::Started => "started",
            Event::Succeeded => "succeeded",
            Event::Failed => "failed",
            Event::RolledBack => "rolled_back",
            Event::VerificationMedium => "verification_medium",
            Event::Paused => "paused",
        }
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The most routes an environment may have, and channels a route may name.
pub const MAX_ROUTES: usize = 32;

/// One entry of `freeze:`: `{ from, to }` (RFC 3339 times with offsets), or `{ cron,
/// duration, timezone }` (a five-field cron expression that opens the window, read in
/// `timezone`, UTC by default).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Freeze {
    /// Start of an absolute window (included).
    pub from: Option<Stamp>,
    /// End of an absolute window (excluded).
    pub to: Option<Stamp>,
    /// When a recurring window opens: minute hour day-of-month month day-of-week.
    pub cron: Option<Cron>,
    /// How long a recurring window stays open (at most 31d).
    pub duration: Option<Dur>,
    /// The time zone `cron` is read in (an IANA name). Default UTC.
    pub timezone: Option<Zone>,
}

impl Freeze {
    /// The window, or what is wrong with the entry.
    pub fn window(&self) -> Result<Window, String> {
        let absolute = self.from.is_some() || self.to.is_some();
        let recurring = self.cron.is_some() || self.duration.is_some() || self.timezone.is_some();
        match (absolute, recurring) {
            (true, true) => Err(
                "freeze: give either `from` and `to`, or `cron` and `duration` (with `timezone`), not both".into(),
            ),
            (false, false) => Err(
                "freeze: an empty window; give `from` and `to` (e.g. 2026-12-24T00:00:00Z), or `cron` and `duration`".into(),
            ),
            (true, false) => match (self.from, self.to) {
                (Some(from), Some(to)) if from < to => Ok(Window::Between { from, to }),
                (Some(from), Some(to)) => Err(format!("freeze: `from` {from} is not before `to` {to}")),
                _ => Err("freeze: an absolute window needs both `from` and `to`".into()),
            },
            (false, true) => {
                let (Some(cron), Some(duration)) = (&self.cron, self.duration) else {
                    return Err(
                        "freeze: a recurring window needs `cron` (when it opens) and `duration` (how long it stays open)".into(),
                    );
                };
                let secs = duration.0.as_secs();
                if !(60..=crate::freeze::MAX_DURATION_S).contains(&secs) {
                    return Err(format!(
                        "freeze: duration {duration} is out of range: from 1m to 31d"
                    ));
                }
                Ok(Window::Recurring {
                    cron: cron.clone(),
                    duration,
                    timezone: self.timezone.clone().unwrap_or_else(Zone::utc),
                })
            }
        }
    }
}

impl Environment {
    /// Its freeze windows (the valid ones: a repo with an invalid one is refused anyway).
    pub fn freeze_windows(&self) -> Vec<Window> {
        self.freeze
            .iter()
            .filter_map(|f| f.value.window().ok())
            .collect()
    }
}

/// `rollout:` — how many hosts deploy at once and how many may fail.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Hosts deploying at once (lease slots). Default 1.
    #[serde(default = "one")]
    pub max_parallel: u32,
    /// Failed hosts tolerated before the rollout halts and reverts. Default 0.
    #[serde(default)]
    pub max_failures: u32,
}

fn one() -> u32 {
    1
}

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            max_parallel: 1,
            max_failures: 0,
        }
    }
}

/// `approval:` — a human gate before any host of a new version moves.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Whether a rollout waits for approval. Default false.
    #[serde(default)]
    pub required: bool,
    /// Coordinator groups whose approvers may approve; empty = any approver.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// Unanswered approvals abort after this long. Default 24h.
    #[serde(default = "default_approval_timeout")]
    pub timeout: Dur,
    /// Whether a return to a version that succeeded in this environment before (a `git
    /// revert`) waits for an approval too. Default `automatic`: it starts at once.
    #[serde(default)]
    pub rollbacks: Rollbacks,
    /// Whether a new version stops once its first batch (`rollout.max_parallel` hosts) has
    /// succeeded, until approved — whether or not it needed an approval to start. A
    /// rejection, or no answer within `timeout`, rolls the first batch back. Default false.
    #[serde(default)]
    pub after_first_batch: bool,
}

/// `approval.rollbacks`: whether a return to a version that succeeded before is approved.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rollbacks {
    /// It starts at once, like an emergency fix should.
    #[default]
    Automatic,
    /// It waits for an approval like any other version.
    Required,
}

fn default_approval_timeout() -> Dur {
    Dur::secs(86400)
}

impl Default for Approval {
    fn default() -> Approval {
        Approval {
            required: false,
            approvers: Vec::new(),
            timeout: default_approval_timeout(),
            rollbacks: Rollbacks::Automatic,
            after_first_batch: false,
        }
    }
}

/// `promotion:` — where a version must have succeeded first.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The upstream environment.
    pub requires: Spanned<Name>,
}

/// The desired version of one service.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The version (required: checked after parsing, so that one missing version does not
    /// hide the problems of the other pins).
    #[serde(default)]
    pub version: Option<Version>,
    /// SHA-256 of the artifact; required for `vm` services.
    #[serde(default, deserialize_with = "opt_digest")]
    pub sha256: Option<Digest>,
    /// Services of this environment whose desired versions must have succeeded here before
    /// this service's rollout starts (a migration before the API, the API before the web).
    #[serde(default)]
    pub after: Vec<Spanned<Name>>,
}

fn opt_digest<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Digest>, D::Error> {
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct P(#[serde(deserialize_with = "Digest::deserialize_yaml")] Digest);
    Ok(Option::<P>::deserialize(d)?.map(|p| p.0))
}

/// A whole desired-state repo.
#[derive(Clone, Debug, Default)]
pub struct Repo {
    /// Service definitions by name.
    pub services: BTreeMap<String, ServiceSpec>,
    /// Environments by name.
    pub environments: BTreeMap<String, Environment>,
}

impl Repo {
    /// Host var names used by any template (beyond the built-ins), for the validate summary.
    pub fn host_var_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .services
            .values()
            .flat_map(|s| {
                let v = s.verify.as_ref();
                let metrics = v.map_or(&[][..], |v| v.metrics.as_slice());
                templates_of(s)
                    .into_iter()
                    .chain(verify_templates(
                        v.and_then(|v| v.prometheus.as_ref()),
                        metrics,
                    ))
                    .collect::<Vec<_>>()
            })
            .flat_map(|t| t.names().map(str::to_string).collect::<Vec<_>>())
            .filter(|n| !BUILTINS.contains(&n.as_str()) && !SIDE_NAMES.contains(&n.as_str()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// The files of a repo that [`load`] reads: `services/*.yaml` and `environments/*.yaml`
/// (also `.yml`), given as (path relative to the repo, content).
pub fn is_spec_file(path: &str) -> bool {
    let p = Path::new(path);
    let dir_ok = matches!(
        p.parent().and_then(|d| d.to_str()),
        Some("services" | "environments")
    );
    dir_ok && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

/// Services whose `run.command` (the process manager) would run as root: no `run.user`, or
/// `run.user: root`. `default_user`: the agent config's `run_as` names another user.
pub fn root_warnings(repo: &Repo, default_user: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    for s in repo.services.values() {
        let Some(run) = s.run.as_ref().filter(|r| r.command.is_some()) else {
            continue;
        };
        let root = match &run.user {
            Some(u) => matches!(u.as_str(), "root" | "0"),
            None => !default_user,
        };
        if root {
            out.push(Problem::new(
                s.service.mark.clone(),
                format!(
                    "service `{}`: under service_manager: process, `run.command`, its hooks and smoke commands run as root; set `run.user` (or the agent's `run_as`)",
                    s.service.value
                ),
            ));
        }
    }
    out
}

/// Parses and validates a repo given as (path, content) pairs, checking template names
/// against `host_vars` when given (`None`: any name is accepted, as when validating a repo
/// without a host). Returns the repo or every problem found.
pub fn load(files: &[(String, String)], host_vars: Option<&[String]>) -> Result<Repo, Problems> {
    let mut problems = Vec::new();
    let mut repo = Repo::default();
    let mut seen: BTreeMap<(String, String), Mark> = BTreeMap::new();
    for (path, text) in files {
        if !is_spec_file(path) {
            continue;
        }
        let node = match yaml::parse(path, text) {
            Ok(n) => n,
            Err(p) => {
                problems.extend(p.0);
                continue;
            }
        };
        let stem = Path::new(path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let file_mark = Mark::file_start(path);
        if path.starts_with("services/") {
            let Some(spec) = yaml::from_node::<ServiceSpec>(&node, &mut problems) else {
                continue;
            };
            let name = spec.service.value.as_str().to_string();
            check_file_name(&stem, &name, "service", &spec.service.mark, &mut problems);
            if let Some(first) = seen.insert(("service".into(), name.clone()), file_mark.clone()) {
                problems.push(Problem::new(
                    spec.service.mark.clone(),
                    format!("service `{name}` is defined twice (also in {})", first.file),
                ));
            }
            check_service(&spec, host_vars, &mut problems);
            repo.services.insert(name, spec);
        } else {
            let Some(env) = yaml::from_node::<Environment>(&node, &mut problems) else {
                continue;
            };
            let name = env.environment.value.as_str().to_string();
            check_file_name(
                &stem,
                &name,
                "environment",
                &env.environment.mark,
                &mut problems,
            );
            if let Some(first) =
                seen.insert(("environment".into(), name.clone()), file_mark.clone())
            {
                problems.push(Problem::new(
                    env.environment.mark.clone(),
                    format!(
                        "environment `{name}` is defined twice (also in {})",
                        first.file
                    ),
                ));
            }
            repo.environments.insert(name, env);
        }
    }
    if files.iter().all(|(p, _)| !p.starts_with("environments/")) {
        problems.push(Problem::new(
            Mark::file_start("environments/"),
            "no environment files: a desired-state repo needs environments/<env>.yaml",
        ));
    }
    for env in repo.environments.values() {
        check_environment(env, &repo, host_vars, &mut problems);
    }
    if problems.is_empty() {
        Ok(repo)
    } else {
        Err(Problems(problems).sorted())
    }
}

fn check_file_name(stem: &str, name: &str, what: &str, mark: &Mark, problems: &mut Vec<Problem>) {
    if stem != name {
        problems.push(Problem::new(
            mark.clone(),
            format!(
                "{what} `{name}` is in a file named `{stem}`: the file must be named after the {what} (`{name}.yaml`)"
            ),
        ));
    }
}

/// Every template string of a service definition.
fn templates_of(s: &ServiceSpec) -> Vec<&Template> {
    let mut out: Vec<&Template> = Vec::new();
    if let Some(a) = &s.artifact {
        out.push(&a.url);
    }
    if let Some(i) = &s.install {
        out.push(&i.root);
    }
    if let Some(r) = &s.run {
        out.extend(r.unit.iter());
        out.extend(r.command.iter().flatten());
        out.extend(r.env.values());
    }
    for h in [&s.hooks.before_stop, &s.hooks.after_install]
        .into_iter()
        .flatten()
    {
        out.extend(h.command.iter());
    }
    if let Some(h) = &s.health {
        out.push(&h.url);
        out.extend(h.expect_body.iter());
    }
    for sm in &s.smoke {
        out.extend(sm.url.iter());
        out.extend(sm.command.iter().flatten());
        out.extend(sm.expect_body.iter());
    }
    if let Some(e) = &s.ecs {
        out.extend([
            &e.cluster,
            &e.task_family,
            &e.container,
            &e.image,
            &e.listener_arn,
        ]);
        out.extend(e.rule_arn.iter());
        out.extend([&e.target_groups.blue, &e.target_groups.green]);
    }
    out
}

/// The templates of a `verify:` block or override: the Prometheus URL, queries and CloudWatch
/// dimensions.
fn verify_templates<'a>(
    prometheus: Option<&'a Template>,
    metrics: &'a [Metric],
) -> impl Iterator<Item = &'a Template> {
    prometheus.into_iter().chain(metrics.iter().flat_map(|m| {
        m.query
            .iter()
            .chain(m.cloudwatch.iter().flat_map(|c| c.dimensions.values()))
    }))
}

/// Template names that stand for the side measured, on a `kind: ecs` service's metrics.
pub const SIDE_NAMES: &[&str] = &["target_group", "load_balancer"];

/// Whether `stat` is a CloudWatch statistic drover asks for.
fn is_stat(stat: &str) -> bool {
    matches!(
        stat,
        "Average" | "Sum" | "Minimum" | "Maximum" | "SampleCount"
    ) || stat
        .strip_prefix('p')
        .and_then(|p| p.parse::<f64>().ok())
        .is_some_and(|p| p > 0.0 && p <= 100.0 && !stat.contains(['+', '-', 'e', 'E']))
}

/// The default sample step: a twentieth of `duration` between 1s and 60s (Prometheus); 60s
/// (CloudWatch: ALB metrics have one-minute resolution).
pub fn default_interval(duration: Dur, cloudwatch: bool) -> Dur {
    if cloudwatch {
        return Dur::secs(60);
    }
    Dur((duration.0 / 20).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    ))
}

/// Checks `verify:` as it applies to a service: its own block (`over` None) or merged with an
/// environment's override (then only what the override changes is checked, so a problem of
/// the service's block is not reported once per environment).
fn check_verify(
    kind: Kind,
    base: Option<&Verify>,
    over: Option<&VerifyOverride>,
    at: &Mark,
    problems: &mut Vec<Problem>,
) {
    let mut problem = |mark: &Mark, text: String| problems.push(Problem::new(mark.clone(), text));
    let source_here = over.is_none_or(|o| o.prometheus.is_some() || o.cloudwatch.is_some());
    let metrics_here = over.is_none_or(|o| o.metrics.is_some());
    let (prom, cw) = match over {
        Some(o) if source_here => (o.prometheus.as_ref(), o.cloudwatch.as_ref()),
        _ => (
            base.and_then(|b| b.prometheus.as_ref()),
            base.and_then(|b| b.cloudwatch.as_ref()),
        ),
    };
    let metrics: &[Metric] = over
        .and_then(|o| o.metrics.as_deref())
        .or(base.map(|b| b.metrics.as_slice()))
        .unwrap_or(&[]);
    if source_here {
        match (prom, cw) {
            (Some(_), Some(_)) => problem(
                at,
                "verify: give one source, `prometheus:` or `cloudwatch:`, not both".into(),
            ),
            (None, None) if over.is_none() => problem(
                at,
                "verify: no metric source: give `prometheus: URL` or `cloudwatch: {}` (with `region:` when it is not the agent's)".into(),
            ),
            _ => {}
        }
        if let Some(region) = cw.and_then(|c| c.region.as_deref())
            && !(!region.is_empty()
                && region.len() <= 32
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
        {
            problem(
                at,
                format!(
                    "verify.cloudwatch.region `{region}` is not an AWS region name (like eu-west-1)"
                ),
            );
        }
    }
    if let Some(p) = prom.filter(|_| source_here) {
        check_url(p, &["http", "https"], "verify.prometheus", problems);
    }
    let mut problem = |mark: &Mark, text: String| problems.push(Problem::new(mark.clone(), text));
    if source_here || metrics_here {
        if metrics.is_empty() && !(cw.is_some() && kind == Kind::Ecs) {
            problem(
                at,
                if cw.is_some() {
                    "verify: `metrics` is empty (only a kind: ecs service has default CloudWatch metrics, its ALB's 5xx ratio and response time)".into()
                } else {
                    "verify: `metrics` is empty".into()
                },
            );
        }
        for m in metrics {
            // A service's metric that an environment's new source does not fit is that
            // environment's problem.
            let name = &m.name.value;
            let mark = if metrics_here { &m.name.mark } else { at };
            match (prom.is_some(), cw.is_some(), &m.query, &m.cloudwatch) {
                (_, _, Some(_), Some(_)) => problem(
                    mark,
                    format!(
                        "verify: metric `{name}`: give `query:` (Prometheus) or `cloudwatch:`, not both"
                    ),
                ),
                (true, _, None, _) => problem(
                    mark,
                    format!(
                        "verify: metric `{name}` needs `query:` (PromQL): this verify reads Prometheus"
                    ),
                ),
                (_, true, _, None) => problem(
                    mark,
                    format!(
                        "verify: metric `{name}` needs `cloudwatch: {{ namespace, metric, stat, dimensions }}`: this verify reads CloudWatch (`query:` is PromQL)"
                    ),
                ),
                _ => {}
            }
            if let Some(c) = &m.cloudwatch {
                for stat in std::iter::once(&c.stat).chain(c.divide_by.as_ref().map(|d| &d.stat)) {
                    if !is_stat(stat) {
                        problem(
                            mark,
                            format!(
                                "verify: metric `{name}`: statistic `{stat}` is not one of Average, Sum, Minimum, Maximum, SampleCount or a percentile like p99"
                            ),
                        );
                    }
                }
                if c.dimensions.len() > 30 {
                    problem(
                        mark,
                        format!("verify: metric `{name}`: at most 30 dimensions"),
                    );
                }
                for (what, text) in [("namespace", &c.namespace), ("metric", &c.metric)]
                    .into_iter()
                    .chain(
                        c.divide_by
                            .as_ref()
                            .map(|d| ("divide_by.metric", &d.metric)),
                    )
                    .chain(c.dimensions.keys().map(|k| ("dimension name", k)))
                {
                    if text.is_empty() || text.len() > 255 || text.chars().any(char::is_control) {
                        problem(
                            mark,
                            format!(
                                "verify: metric `{name}`: {what} must be 1 to 255 characters, without control characters"
                            ),
                        );
                    }
                }
            }
        }
    }
    if metrics_here {
        let mut names = std::collections::BTreeSet::new();
        for m in metrics {
            let (name, mark) = (&m.name.value, &m.name.mark);
            if !names.insert(name.as_str()) {
                problem(mark, format!("verify: metric `{name}` is listed twice"));
            }
            if m.max.is_none() && m.min.is_none() && m.compare.is_none() {
                problem(
                    mark,
                    format!(
                        "verify: metric `{name}` checks nothing: give `max`, `min` and/or `compare: baseline`"
                    ),
                );
            }
            if !(m.tolerance >= 0.0 && m.tolerance_abs >= 0.0) {
                problem(
                    mark,
                    format!("verify: metric `{name}`: tolerances cannot be negative"),
                );
            }
        }
    }
    // Enough samples for a verdict.
    let timing_here = over.is_none_or(|o| {
        source_here || o.duration.is_some() || o.interval.is_some() || o.min_points.is_some()
    });
    let duration = over.and_then(|o| o.duration).or(base.map(|b| b.duration));
    if let (true, Some(duration)) = (timing_here, duration) {
        let given = over
            .and_then(|o| o.interval)
            .or(base.and_then(|b| b.interval));
        let interval = given.unwrap_or_else(|| default_interval(duration, cw.is_some()));
        let min = over
            .and_then(|o| o.min_points)
            .or(base.and_then(|b| b.min_points))
            .unwrap_or_else(|| default_min_points(cw.is_some()));
        if cw.is_some() && given.is_some() {
            let secs = interval.0.as_secs();
            if interval.0.subsec_nanos() != 0
                || !(matches!(secs, 1 | 5 | 10 | 30) || (secs > 0 && secs % 60 == 0))
            {
                problem(
                    at,
                    format!(
                        "verify.interval {interval} is not a CloudWatch period: give 1s, 5s, 10s, 30s or a multiple of 60s"
                    ),
                );
            }
        }
        if interval.0.is_zero() {
            problem(at, "verify.interval must be more than 0s".into());
        } else {
            // A Prometheus range includes both ends; CloudWatch periods start at the start.
            let n = (duration.0.as_secs_f64() / interval.0.as_secs_f64()).floor() as u64
                + u64::from(cw.is_none());
            if n < u64::from(min) {
                problem(
                    at,
                    format!(
                        "verify: {duration} at one sample every {interval} gives at most {n} samples per side, and `min_points` is {min}: every verdict would be inconclusive; lengthen `duration`, shorten `interval` or lower `min_points`"
                    ),
                );
            }
        }
    }
}

/// Renders `t` with every name set to a dummy value (to check URL syntax without a host).
fn dummy_render(t: &Template) -> String {
    let names: BTreeMap<String, String> = t.names().map(|n| (n.to_string(), "0".into())).collect();
    render_str(
        t.text(),
        &Vars {
            names: &names,
            env: None,
        },
    )
    .unwrap_or_default()
}

/// Why `url` is not an acceptable URL with one of `schemes`, if it is not.
pub(crate) fn url_problem(url: &str, schemes: &[&str], what: &str) -> Option<String> {
    match url::Url::parse(url) {
        Ok(u) if schemes.contains(&u.scheme()) => None,
        Ok(u) => Some(format!(
            "{what} `{url}` has scheme `{}`; expected {}",
            u.scheme(),
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
        Err(e) => Some(format!("{what} `{url}` is not a valid URL: {e}")),
    }
}

fn check_url(t: &Template, schemes: &[&str], what: &str, problems: &mut Vec<Problem>) {
    // A URL starting with a host var (`{base_url}/x`) is checked once rendered for a host.
    if t.text().starts_with('{') && t.names().next().is_some() {
        return;
    }
    if let Some(p) = url_problem(&dummy_render(t), schemes, what) {
        // Show the template, not the dummy rendering.
        let p = p.replacen(&format!("`{}`", dummy_render(t)), &format!("`{t}`"), 1);
        problems.push(Problem::new(t.mark().clone(), p));
    }
}

fn check_service(s: &ServiceSpec, host_vars: Option<&[String]>, problems: &mut Vec<Problem>) {
    let name = s.service.value.as_str();
    let at = &s.service.mark;
    match s.kind {
        Kind::Vm | Kind::Ecs if s.timeout.is_some() => problems.push(Problem::new(
            at.clone(),
            format!("service `{name}`: `timeout:` is only for kind: job (a vm service has `run.stop_timeout`, health and hook timeouts)"),
        )),
        _ => {}
    }
    match s.kind {
        Kind::Vm => {
            if s.ecs.is_some() {
                problems.push(Problem::new(
                    at.clone(),
                    format!("service `{name}` is kind: vm; `ecs:` is only for kind: ecs"),
                ));
            }
            for (missing, field) in [
                (s.artifact.is_none(), "artifact"),
                (s.install.is_none(), "install"),
                (s.run.is_none(), "run"),
            ] {
                if missing {
                    problems.push(Problem::new(
                        at.clone(),
                        format!("service `{name}` (kind: vm) needs `{field}:`"),
                    ));
                }
            }
        }
        Kind::Job => check_job(s, problems),
        Kind::Ecs => {
            match &s.ecs {
                None => problems.push(Problem::new(
                    at.clone(),
                    format!("service `{name}` (kind: ecs) needs `ecs:`"),
                )),
                Some(e) => check_ecs(e, at, problems),
            }
            // What the ECS agent would silently ignore is refused: a health check or smoke
            // test written here would look like protection that never runs.
            for (present, field, instead) in [
                (s.artifact.is_some(), "artifact", "the image is `ecs.image`"),
                (
                    s.install.is_some(),
                    "install",
                    "ECS runs the task definition",
                ),
                (s.run.is_some(), "run", "ECS runs the task definition"),
                (
                    s.health.is_some(),
                    "health",
                    "the new side must have `ecs.desired_count` healthy targets in its target group (the ALB's health check), and `verify:` judges its metrics",
                ),
                (
                    !s.smoke.is_empty(),
                    "smoke",
                    "use `verify:` to judge the new side at each traffic step",
                ),
                (
                    s.hooks.before_stop.is_some() || s.hooks.after_install.is_some(),
                    "hooks",
                    "nothing runs on a host; put a migration in the image's entrypoint or its own service",
                ),
                (
                    !s.redact.is_empty(),
                    "redact",
                    "it filters hook, smoke and health output, which ECS services have none of",
                ),
            ] {
                if present {
                    problems.push(Problem::new(
                        at.clone(),
                        format!("service `{name}` is kind: ecs; `{field}:` is only for kind: vm and would be ignored: {instead}"),
                    ));
                }
            }
        }
    }
    if let Some(a) = &s.artifact {
        check_url(&a.url, &["http", "https", "file"], "artifact url", problems);
    }
    if let Some(i) = &s.install {
        if i.keep_releases.value < 2 {
            problems.push(Problem::new(
                i.keep_releases.mark.clone(),
                "keep_releases must be at least 2 (the current release and the previous one, kept for rollback)",
            ));
        }
        // A root starting with a host var (`{base}/hello`) is checked once rendered.
        let text = i.root.text();
        let templated = text.starts_with('{') && i.root.names().next().is_some();
        if !text.starts_with('/') && !templated {
            problems.push(Problem::new(
                i.root.mark().clone(),
                format!("install root `{}` must be an absolute path", i.root),
            ));
        }
    }
    if let Some(r) = &s.run {
        if r.unit.is_none() && r.command.is_none() {
            problems.push(Problem::new(
                at.clone(),
                format!(
                    "service `{name}`: `run:` needs `unit:` (service_manager: systemd) and/or `command:` (service_manager: process)"
                ),
            ));
        }
        if r.command.as_ref().is_some_and(Vec::is_empty) {
            problems.push(Problem::new(at.clone(), "run.command is empty"));
        }
        for k in r.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                problems.push(Problem::new(
                    at.clone(),
                    format!("run.env: invalid variable name `{k}`"),
                ));
            }
        }
    }
    for h in [&s.hooks.before_stop, &s.hooks.after_install]
        .into_iter()
        .flatten()
    {
        match h.command.first() {
            None => problems.push(Problem::new(h.mark.clone(), "hook command is empty")),
            Some(prog) => {
                if let Err(e) = RelPath::parse(&dummy_render(prog)) {
                    problems.push(Problem::new(
                        prog.mark().clone(),
                        format!("hook program: {e}; hooks run programs inside the release"),
                    ));
                }
            }
        }
    }
    if let Some(h) = &s.health {
        check_url(&h.url, &["http", "https"], "health url", problems);
    }
    if let Some(v) = &s.verify {
        check_verify(s.kind, Some(v), None, &v.mark, problems);
        if v.duration.0.is_zero() {
            problems.push(Problem::new(
                v.mark.clone(),
                "verify.duration must be more than 0s",
            ));
        }
    }
    for sm in &s.smoke {
        match (&sm.url, &sm.command) {
            (Some(u), None) => check_url(u, &["http", "https"], "smoke url", problems),
            (None, Some(c)) if !c.is_empty() => {}
            _ => problems.push(Problem::new(
                at.clone(),
                "each smoke test needs exactly one of `url:` or `command:`",
            )),
        }
    }
    check_names(templates_of(s), host_vars, &[], problems);
    if let Some(v) = &s.verify {
        let side = if s.kind == Kind::Ecs { SIDE_NAMES } else { &[] };
        check_names(
            verify_templates(v.prometheus.as_ref(), &v.metrics),
            host_vars,
            side,
            problems,
        );
    }
}

/// Refuses template names that are neither built-ins, host vars (when known) nor `extra`.
fn check_names<'a>(
    templates: impl IntoIterator<Item = &'a Template>,
    host_vars: Option<&[String]>,
    extra: &[&str],
    problems: &mut Vec<Problem>,
) {
    for t in templates {
        for n in t.names() {
            let known = BUILTINS.contains(&n)
                || extra.contains(&n)
                || match host_vars {
                    None => !n.starts_with("env.") && !SIDE_NAMES.contains(&n),
                    Some(vars) => vars.iter().any(|v| v == n),
                };
            if !known {
                let hint = if n.starts_with("env.") {
                    " (`{env.NAME}` is only available in template files)".to_string()
                } else if SIDE_NAMES.contains(&n) {
                    " (`{target_group}` and `{load_balancer}` are for the metrics of a kind: ecs service)".to_string()
                } else {
                    format!(
                        " (known: {}{}{})",
                        BUILTINS.join(", "),
                        extra.iter().map(|n| format!(", {n}")).collect::<String>(),
                        host_vars
                            .map(|v| v.iter().map(|n| format!(", {n}")).collect::<String>())
                            .unwrap_or_default()
                    )
                };
                problems.push(Problem::new(
                    t.mark().clone(),
                    format!("unknown template name `{{{n}}}`{hint}"),
                ));
            }
        }
    }
}

fn check_ecs(e: &Ecs, at: &Mark, problems: &mut Vec<Problem>) {
    if !e.image.names().any(|n| n == "version") {
        problems.push(Problem::new(
            e.image.mark().clone(),
            format!("ecs.image `{}` must use `{{version}}` (e.g. registry/web:{{version}}): the pin's version picks the image tag", e.image),
        ));
    }
    if e.desired_count == 0 {
        problems.push(Problem::new(
            at.clone(),
            "ecs.desired_count must be at least 1",
        ));
    }
    if e.target_groups.blue.text() == e.target_groups.green.text() {
        problems.push(Problem::new(
            e.target_groups.green.mark().clone(),
            "ecs.target_groups: blue and green must be two different target groups",
        ));
    }
    if let Some(steps) = &e.steps {
        check_steps(steps, at, problems);
    }
    if e.launch_type == LaunchType::Fargate
        && e.network.as_ref().is_none_or(|n| n.subnets.is_empty())
    {
        problems.push(Problem::new(
            at.clone(),
            "ecs.launch_type FARGATE needs `network: { subnets: [...], security_groups: [...] }`",
        ));
    }
}

/// A `kind: job`: an artifact, an install root and `run.command`, nothing that only a running
/// service uses; a bounded timeout.
fn check_job(s: &ServiceSpec, problems: &mut Vec<Problem>) {
    let name = s.service.value.as_str();
    let at = &s.service.mark;
    let command = s.run.as_ref().and_then(|r| r.command.as_ref());
    for (missing, field) in [
        (s.artifact.is_none(), "artifact"),
        (s.install.is_none(), "install"),
        (command.is_none_or(|c| c.is_empty()), "run.command"),
    ] {
        if missing {
            problems.push(Problem::new(
                at.clone(),
                format!("service `{name}` (kind: job) needs `{field}:` (the command the job runs, from its release)"),
            ));
        }
    }
    for (present, field) in [
        (s.ecs.is_some(), "ecs"),
        (s.health.is_some(), "health"),
        (!s.smoke.is_empty(), "smoke"),
        (
            s.hooks.before_stop.is_some() || s.hooks.after_install.is_some(),
            "hooks",
        ),
        (s.verify.is_some(), "verify"),
        (s.run.as_ref().is_some_and(|r| r.unit.is_some()), "run.unit"),
    ] {
        if present {
            problems.push(Problem::new(
                at.clone(),
                format!("service `{name}` is kind: job; `{field}:` does not apply to a command that runs once and exits (its exit status is its check)"),
            ));
        }
    }
    if let Some(t) = s.timeout
        && !(1..=MAX_JOB_TIMEOUT_S).contains(&t.0.as_secs())
    {
        problems.push(Problem::new(
            at.clone(),
            format!("service `{name}`: timeout {t} is out of range: from 1s to 24h"),
        ));
    }
}

/// `ecs.steps`: percentages from 1 to 100, increasing, ending with 100; bounded waits.
fn check_steps(steps: &[Spanned<EcsStep>], at: &Mark, problems: &mut Vec<Problem>) {
    const HOW: &str =
        "give increasing percentages from 1 to 100, ending with 100 (e.g. [10, 50, 100])";
    let Some(last) = steps.last() else {
        problems.push(Problem::new(
            at.clone(),
            format!("ecs.steps is empty: {HOW}"),
        ));
        return;
    };
    let mut before = 0;
    for (i, s) in steps.iter().enumerate() {
        let w = s.value.weight;
        if !(1..=100).contains(&w) {
            problems.push(Problem::new(
                s.mark.clone(),
                format!("ecs.steps[{i}]: weight {w} is not a percentage from 1 to 100: {HOW}"),
            ));
        } else if w <= before {
            problems.push(Problem::new(
                s.mark.clone(),
                format!("ecs.steps[{i}]: weight {w} does not increase on the step before ({before}): {HOW}"),
            ));
        }
        before = before.max(w);
        if let Some(wait) = s.value.wait
            && wait.0.as_secs() > MAX_STEP_WAIT_S
        {
            problems.push(Problem::new(
                s.mark.clone(),
                format!("ecs.steps[{i}]: wait {wait} is longer than a day; bake for at most 24h (use `approval: true` to hold a step for a person)"),
            ));
        }
    }
    if last.value.weight != 100 {
        problems.push(Problem::new(
            last.mark.clone(),
            format!("ecs.steps ends at {}, not 100: {HOW}", last.value.weight),
        ));
    }
}

fn check_environment(
    env: &Environment,
    repo: &Repo,
    host_vars: Option<&[String]>,
    problems: &mut Vec<Problem>,
) {
    let name = env.environment.value.as_str();
    if env.rollout.max_parallel == 0 {
        problems.push(Problem::new(
            env.environment.mark.clone(),
            "rollout.max_parallel must be at least 1",
        ));
    }
    if let Some(p) = &env.promotion {
        let up = p.requires.value.as_str();
        if up == name {
            problems.push(Problem::new(
                p.requires.mark.clone(),
                "promotion.requires names this environment itself",
            ));
        } else if !repo.environments.contains_key(up) {
            problems.push(Problem::new(
                p.requires.mark.clone(),
                format!("promotion.requires: environment `{up}` is not defined (no environments/{up}.yaml)"),
            ));
        }
    }
    for (service, o) in &env.verify {
        match repo.services.get(service) {
            None => problems.push(Problem::new(
                o.mark.clone(),
                format!("verify: service `{service}` is not defined"),
            )),
            Some(spec)
                if spec.verify.is_none()
                    && o.value.metrics.is_none()
                    && !(spec.kind == Kind::Ecs && o.value.cloudwatch.is_some()) =>
            {
                problems.push(Problem::new(
                    o.mark.clone(),
                    format!(
                        "verify: service `{service}` has no `verify:` block to override; give `metrics`, `duration` and `prometheus` (or `cloudwatch`) here or in services/{service}.yaml"
                    ),
                ))
            }
            Some(spec) => {
                let base = spec.verify.as_ref().map(|v| &v.value);
                check_verify(spec.kind, base, Some(&o.value), &o.mark, problems);
                let (prom, metrics) = (o.value.prometheus.as_ref(), o.value.metrics.as_deref());
                let side = if spec.kind == Kind::Ecs { SIDE_NAMES } else { &[] };
                check_names(
                    verify_templates(prom, metrics.unwrap_or(&[])),
                    host_vars,
                    side,
                    problems,
                );
            }
        }
    }
    for (service, pin) in &env.services {
        if pin.value.version.is_none() {
            problems.push(Problem::new(
                pin.mark.clone(),
                format!("service `{service}`: missing field `version` (the version to deploy)"),
            ));
        }
        let Some(spec) = repo.services.get(service) else {
            problems.push(Problem::new(
                pin.mark.clone(),
                format!(
                    "service `{service}` is not defined: add services/{service}.yaml or remove it from this environment"
                ),
            ));
            continue;
        };
        match (spec.kind, &pin.value.sha256) {
            (Kind::Vm | Kind::Job, None) => problems.push(Problem::new(
                pin.mark.clone(),
                format!(
                    "service `{service}` is kind: {}, so its pin needs `sha256:` (the artifact's digest, from `sha256sum`)",
                    if spec.kind == Kind::Job { "job" } else { "vm" }
                ),
            )),
            (Kind::Ecs, Some(_)) => problems.push(Problem::new(
                pin.mark.clone(),
                format!(
                    "service `{service}` is kind: ecs: it is pinned by image tag (`version:`), `sha256:` does not apply"
                ),
            )),
            _ => {}
        }
        for a in &pin.value.after {
            let a_name = a.value.as_str();
            if a_name == service {
                problems.push(Problem::new(
                    a.mark.clone(),
                    format!("service `{service}`: `after` names the service itself"),
                ));
            } else if !env.services.contains_key(a_name) {
                problems.push(Problem::new(
                    a.mark.clone(),
                    format!(
                        "service `{service}`: `after` names `{a_name}`, which is not pinned in environment `{name}`: pin it here or remove it from `after`"
                    ),
                ));
            }
        }
    }
    check_order(env, problems);
    if env.freeze.len() > MAX_FREEZE {
        problems.push(Problem::new(
            env.environment.mark.clone(),
            format!("freeze: {} windows; at most {MAX_FREEZE}", env.freeze.len()),
        ));
    }
    for f in &env.freeze {
        if let Err(e) = f.value.window() {
            problems.push(Problem::new(f.mark.clone(), e));
        }
    }
    check_notify(env, problems);
}

/// `notify:` routes: bounded, each with at least one event and one channel, none twice.
fn check_notify(env: &Environment, problems: &mut Vec<Problem>) {
    if env.notify.len() > MAX_ROUTES {
        problems.push(Problem::new(
            env.notify[MAX_ROUTES].mark.clone(),
            format!("notify: {} routes; at most {MAX_ROUTES}", env.notify.len()),
        ));
    }
    for r in &env.notify {
        let (on, to) = (&r.value.on, &r.value.to);
        if on.is_empty() || to.is_empty() {
            problems.push(Problem::new(
                r.mark.clone(),
                format!(
                    "notify: a route needs `on` (one or more of {}) and `to` (channel names from coordinator.yaml's `notifications:`)",
                    Event::ALL.map(Event::name).join(", ")
                ),
            ));
        }
        if to.len() > MAX_ROUTES {
            problems.push(Problem::new(
                r.mark.clone(),
                format!(
                    "notify: a route names {} channels; at most {MAX_ROUTES}",
                    to.len()
                ),
            ));
        }
        for (i, e) in on.iter().enumerate() {
            if on[..i].iter().any(|x| x.value == e.value) {
                problems.push(Problem::new(
                    e.mark.clone(),
                    format!("notify: event `{}` is listed twice in this route", e.value),
                ));
            }
        }
        for (i, c) in to.iter().enumerate() {
            if to[..i].iter().any(|x| x.value.as_str() == c.value.as_str()) {
                problems.push(Problem::new(
                    c.mark.clone(),
                    format!(
                        "notify: channel `{}` is listed twice in this route",
                        c.value.as_str()
                    ),
                ));
            }
        }
    }
}

/// The most freeze windows an environment may have.
const MAX_FREEZE: usize = 64;

/// Refuses a cycle of `after` among the services of `env`, at the `after` entry that closes it.
fn check_order(env: &Environment, problems: &mut Vec<Problem>) {
    let edges = |s: &str| -> Vec<&Spanned<Name>> {
        env.services
            .get(s)
            .map(|p| {
                p.value
                    .after
                    .iter()
                    .filter(|a| {
                        a.value.as_str() != s && env.services.contains_key(a.value.as_str())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // Depth-first, three colours: a grey service met again closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, Colour> = env
        .services
        .keys()
        .map(|s| (s.as_str(), Colour::White))
        .collect();
    for start in env.services.keys() {
        if colour[start.as_str()] != Colour::White {
            continue;
        }
        // (service, index of its next edge); the stack is the grey chain.
        let mut stack: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
        colour.insert(start.as_str(), Colour::Grey);
        while let Some((s, i)) = stack.last().copied() {
            let next = edges(s);
            if i == next.len() {
                colour.insert(s, Colour::Black);
                stack.pop();
                continue;
            }
            stack.last_mut().expect("not empty").1 += 1;
            let to = next[i].value.as_str();
            match colour[to] {
                Colour::White => {
                    colour.insert(to, Colour::Grey);
                    stack.push((to, 0));
                }
                Colour::Grey => {
                    let from = stack
                        .iter()
                        .position(|(x, _)| *x == to)
                        .expect("grey is on the stack");
                    let mut cycle: Vec<&str> = stack[from..].iter().map(|(x, _)| *x).collect();
                    cycle.push(to);
                    problems.push(Problem::new(
                        next[i].mark.clone(),
                        format!(
                            "`after` makes a cycle: {} (each waits for the next, so none would ever start); remove one of them",
                            cycle.join(" after ")
                        ),
                    ));
                }
                Colour::Black => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
