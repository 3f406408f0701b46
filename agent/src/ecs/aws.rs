//! The AWS calls of ECS mode (aws-sdk-ecs, aws-sdk-elasticloadbalancingv2,
//! aws-sdk-applicationautoscaling), each with an error that names the operation and the
//! resource. Every call is counted (`calls`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_applicationautoscaling::types::{ScalableDimension, ServiceNamespace};
use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, LaunchType as EcsLaunchType, LoadBalancer,
    NetworkConfiguration, Service, ServiceField, TaskDefinition,
};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, ForwardActionConfig, TargetGroupTuple, TargetHealthStateEnum,
};

use super::{Colour, Weights};
use crate::spec::{LaunchType, ResolvedEcs};
use crate::verify::CloudWatch;

/// Why an AWS call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AwsError {
    /// The call failed (network, throttling after retries, service error).
    #[error("{op} failed: {message}")]
    Call {
        /// The operation (e.g. `elbv2:ModifyListener`).
        op: &'static str,
        /// What AWS said.
        message: String,
    },
    /// A resource named in the service definition does not exist.
    #[error("{what} does not exist: {id}")]
    Missing {
        /// What kind of resource.
        what: &'static str,
        /// Its name or ARN.
        id: String,
    },
    /// The resources exist but do not fit together.
    #[error("{0}")]
    Invalid(String),
}

impl AwsError {
    /// Whether the same call may succeed later (not a configuration error).
    pub fn is_transient(&self) -> bool {
        matches!(self, AwsError::Call { .. })
    }
}

fn call_err<E: std::error::Error + 'static>(op: &'static str) -> impl Fn(E) -> AwsError {
    move |e| {
        // The SDK's Display is terse ("service error"); its source chain carries the code.
        let mut message = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            let m = c.to_string();
            if !message.contains(&m) {
                message.push_str(": ");
                message.push_str(&m);
            }
            cur = c.source();
        }
        AwsError::Call { op, message }
    }
}

/// What ECS says about a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `ACTIVE`, `DRAINING`, `INACTIVE`.
    pub status: String,
    /// Its task definition ARN.
    pub task_definition: String,
    /// Tasks wanted.
    pub desired: i32,
    /// Tasks running.
    pub running: i32,
}

/// What the live side's service is run with beyond what drover owns (task definition, target
/// group, desired count): deployment configuration, placement, capacity providers, tags and the
/// like. A new side is created with them, so a deploy does not lose them.
#[derive(Clone, Debug, Default)]
pub struct Carried(Option<Service>);

/// ECS, ELBv2 and Application Auto Scaling clients.
#[derive(Clone, Debug)]
pub struct Aws {
    ecs: aws_sdk_ecs::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    scaling: aws_sdk_applicationautoscaling::Client,
    conf: aws_config::SdkConfig,
    calls: Arc<AtomicU64>,
}

impl Aws {
    /// Clients for `region`, credentials and endpoint from the SDK's default chain
    /// (instance/task role in production; `AWS_ENDPOINT_URL` in tests).
    pub async fn new(region: &str) -> Aws {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        Aws {
            ecs: aws_sdk_ecs::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            scaling: aws_sdk_applicationautoscaling::Client::new(&conf),
            conf,
            calls: Arc::default(),
        }
    }

    /// CloudWatch as a metric source, in `region` (default: this agent's), its calls counted
    /// with the others.
    pub fn cloudwatch(&self, region: Option<&str>) -> CloudWatch {
        let conf = match region {
            Some(r) if self.conf.region().map(|own| own.as_ref()) != Some(r) => self
                .conf
                .to_builder()
                .region(aws_config::Region::new(r.to_string()))
                .build(),
            _ => self.conf.clone(),
        };
        CloudWatch::new(aws_sdk_cloudwatch::Client::new(&conf), self.calls.clone())
    }

    /// API calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks that the cluster exists and is active.
    pub async fn check_cluster(&self, cluster: &str) -> Result<(), AwsError> {
        self.count();
        let out = self
            .ecs
            .describe_clusters()
            .clusters(cluster)
            .send()
            .await
            .map_err(call_err("ecs:DescribeClusters"))?;
        let active = out.clusters().iter().any(|c| c.status() == Some("ACTIVE"));
        if active {
            Ok(())
        } else {
            Err(AwsError::Missing {
                what: "ECS cluster",
                id: cluster.into(),
            })
        }
    }

    /// Checks that both target groups exist.
    pub async fn check_target_groups(&self, e: &ResolvedEcs) -> Result<(), AwsError> {
        for arn in [&e.tg_blue, &e.tg_green] {
            self.count();
            let r = self
                .elb
                .describe_target_groups()
                .target_group_arns(arn.as_str())
                .send()
                .await;
            match r {
                Ok(out) if !out.target_groups().is_empty() => {}
                Ok(_) => {
                    return Err(AwsError::Missing {
                        what: "target group",
                        id: arn.clone(),
                    });
                }
                Err(err) => {
                    let e = call_err("elbv2:DescribeTargetGroups")(err);
                    if e.to_string().contains("TargetGroupNotFound") {
                        return Err(AwsError::Missing {
                            what: "target group",
                            id: arn.clone(),
                        });
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The forward actions of the listener's default action (or of the rule).
    async fn forward(&self, e: &ResolvedEcs) -> Result<Vec<(String, u32)>, AwsError> {
        self.count();
        let actions: Vec<Action> = match &e.rule_arn {
            Some(rule) => {
                let out = self
                    .elb
                    .describe_rules()
                    .rule_arns(rule.as_str())
                    .send()
                    .await
                    .map_err(|err| {
                        missing_or(call_err("elbv2:DescribeRules")(err), "listener rule", rule)
                    })?;
                out.rules()
                    .first()
                    .ok_or_else(|| AwsError::Missing {
                        what: "listener rule",
                        id: rule.clone(),
                    })?
                    .actions()
                    .to_vec()
            }
            None => {
                let out = self
                    .elb
                    .describe_listeners()
                    .listener_arns(e.listener_arn.as_str())
                    .send()
                    .await
                    .map_err(|err| {
                        missing_or(
                            call_err("elbv2:DescribeListeners")(err),
                            "listener",
                            &e.listener_arn,
                        )
                    })?;
                out.listeners()
                    .first()
                    .ok_or_else(|| AwsError::Missing {
                        what: "listener",
                        id: e.listener_arn.clone(),
                    })?
                    .default_actions()
                    .to_vec()
            }
        };
        let mut out = Vec::new();
        for a in actions
            .iter()
            .filter(|a| a.r#type() == Some(&ActionTypeEnum::Forward))
        {
            match a.forward_config() {
                Some(f) => {
                    for t in f.target_groups() {
                        if let Some(arn) = t.target_group_arn() {
                            out.push((arn.to_string(), t.weight().unwrap_or(1).max(0) as u32));
                        }
                    }
                }
                None => {
                    if let Some(arn) = a.target_group_arn() {
                        out.push((arn.to_string(), 1));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The weights on the two sides; an error if the listener forwards to neither.
    pub async fn weights(&self, e: &ResolvedEcs) -> Result<Weights, AwsError> {
        let fwd = self.forward(e).await?;
        let of = |arn: &str| fwd.iter().filter(|(a, _)| a == arn).map(|(_, w)| *w).sum();
        let w = Weights {
            blue: of(&e.tg_blue),
            green: of(&e.tg_green),
        };
        if w.blue == 0 && w.green == 0 {
            let on = if e.rule_arn.is_some() {
                "rule"
            } else {
                "listener"
            };
            return Err(AwsError::Invalid(format!(
                "the {on} {} forwards to neither target group of the service ({} and {}); attach one of them with weight > 0 first",
                e.rule_arn.as_deref().unwrap_or(&e.listener_arn),
                e.tg_blue,
                e.tg_green
            )));
        }
        Ok(w)
    }

    /// Sets the weights in **one** call (ModifyListener, or ModifyRule when a rule is given).
    pub async fn set_weights(&self, e: &ResolvedEcs, w: Weights) -> Result<(), AwsError> {
        let tuple = |arn: &str, weight: u32| {
            TargetGroupTuple::builder()
                .target_group_arn(arn)
                .weight(weight as i32)
                .build()
        };
        let action = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .forward_config(
                ForwardActionConfig::builder()
                    .target_groups(tuple(&e.tg_blue, w.blue))
                    .target_groups(tuple(&e.tg_green, w.green))
                    .build(),
            )
            .build();
        self.count();
        match &e.rule_arn {
            Some(rule) => {
                self.elb
                    .modify_rule()
                    .rule_arn(rule.as_str())
                    .actions(action)
                    .send()
                    .await
                    .map_err(call_err("elbv2:ModifyRule"))?;
            }
            None => {
                self.elb
                    .modify_listener()
                    .listener_arn(e.listener_arn.as_str())
                    .default_actions(action)
                    .send()
                    .await
                    .map_err(call_err("elbv2:ModifyListener"))?;
            }
        }
        Ok(())
    }

    /// Healthy targets in a target group.
    pub async fn healthy_targets(&self, tg: &str) -> Result<u32, AwsError> {
        self.count();
        let out = self
            .elb
            .describe_target_health()
            .target_group_arn(tg)
            .send()
            .await
            .map_err(call_err("elbv2:DescribeTargetHealth"))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter(|d| {
                d.target_health().and_then(|h| h.state()) == Some(&TargetHealthStateEnum::Healthy)
            })
            .count() as u32)
    }

    /// An ECS service, if it exists and is not deleted.
    pub async fn service(
        &self,
        cluster: &str,
        name: &str,
    ) -> Result<Option<ServiceInfo>, AwsError> {
        self.count();
        let out = self
            .ecs
            .describe_services()
            .cluster(cluster)
            .services(name)
            .send()
            .await
            .map_err(call_err("ecs:DescribeServices"))?;
        Ok(out
            .services()
            .iter()
            .find(|s| s.status() != Some("INACTIVE"))
            .map(|s| ServiceInfo {
                status: s.status().unwrap_or_default().to_string(),
                task_definition: s.task_definition().unwrap_or_default().to_string(),
                desired: s.desired_count(),
                running: s.running_count(),
            }))
    }

    /// A task definition by ARN, or the latest ACTIVE revision of a family.
    pub async fn task_definition(&self, id: &str) -> Result<TaskDefinition, AwsError> {
        self.count();
        let out = self
            .ecs
            .describe_task_definition()
            .task_definition(id)
            .send()
            .await
            .map_err(|err| {
                missing_or(
                    call_err("ecs:DescribeTaskDefinition")(err),
                    "task definition",
                    id,
                )
            })?;
        out.task_definition.ok_or_else(|| AwsError::Missing {
            what: "task definition",
            id: id.into(),
        })
    }

    /// The image of `container` in a task definition.
    pub fn image_of(td: &TaskDefinition, container: &str) -> Option<String> {
        td.container_definitions()
            .iter()
            .find(|c| c.name() == Some(container))
            .and_then(|c| c.image())
            .map(str::to_string)
    }

    /// Registers a new revision of `base` in which only `container`'s image is `image`.
    pub async fn register_copy(
        &self,
        base: &TaskDefinition,
        container: &str,
        image: &str,
    ) -> Result<String, AwsError> {
        if !base
            .container_definitions()
            .iter()
            .any(|c| c.name() == Some(container))
        {
            return Err(AwsError::Invalid(format!(
                "task definition {} has no container `{container}`",
                base.task_definition_arn().unwrap_or_default()
            )));
        }
        let containers = base
            .container_definitions()
            .iter()
            .map(|c| {
                if c.name() == Some(container) {
                    let mut c = c.clone();
                    c.image = Some(image.to_string());
                    c
                } else {
                    c.clone()
                }
            })
            .collect();
        self.count();
        let out = self
            .ecs
            .register_task_definition()
            .family(base.family().unwrap_or_default())
            .set_container_definitions(Some(containers))
            .set_task_role_arn(base.task_role_arn().map(str::to_string))
            .set_execution_role_arn(base.execution_role_arn().map(str::to_string))
            .set_network_mode(base.network_mode().cloned())
            .set_volumes(nonempty(base.volumes()))
            .set_placement_constraints(nonempty(base.placement_constraints()))
            .set_requires_compatibilities(nonempty(base.requires_compatibilities()))
            .set_cpu(base.cpu().map(str::to_string))
            .set_memory(base.memory().map(str::to_string))
            .set_pid_mode(base.pid_mode().cloned())
            .set_ipc_mode(base.ipc_mode().cloned())
            .set_proxy_configuration(base.proxy_configuration().cloned())
            .set_ephemeral_storage(base.ephemeral_storage().cloned())
            .set_runtime_platform(base.runtime_platform().cloned())
            .send()
            .await
            .map_err(call_err("ecs:RegisterTaskDefinition"))?;
        out.task_definition()
            .and_then(|t| t.task_definition_arn())
            .map(str::to_string)
            .ok_or_else(|| AwsError::Call {
                op: "ecs:RegisterTaskDefinition",
                message: "no ARN in the answer".into(),
            })
    }

    /// Creates the service `name` on `colour`'s target group, or updates it to `td` and the
    /// desired count.
    pub async fn ensure_service(
        &self,
        e: &ResolvedEcs,
        name: &str,
        colour: Colour,
        td: &str,
        count: u32,
        carried: &Carried,
    ) -> Result<(), AwsError> {
        let exists = self.service(&e.cluster, name).await?.is_some();
        self.count();
        if exists {
            self.ecs
                .update_service()
                .cluster(e.cluster.as_str())
                .service(name)
                .task_definition(td)
                .desired_count(count as i32)
                .send()
                .await
                .map_err(call_err("ecs:UpdateService"))?;
            return Ok(());
        }
        let tg = match colour {
            Colour::Blue => &e.tg_blue,
            Colour::Green => &e.tg_green,
        };
        let mut req = self
            .ecs
            .create_service()
            .cluster(e.cluster.as_str())
            .service_name(name)
            .task_definition(td)
            .desired_count(count as i32)
            .load_balancers(
                LoadBalancer::builder()
                    .target_group_arn(tg.as_str())
                    .container_name(e.container.as_str())
                    .container_port(i32::from(e.container_port))
                    .build(),
            );
        let live = carried.0.as_ref();
        let providers = live.map(|l| l.capacity_provider_strategy().to_vec());
        if providers.as_ref().is_some_and(|p| !p.is_empty()) {
            // A capacity provider strategy stands in for the launch type.
            req = req.set_capacity_provider_strategy(providers);
        } else {
            req = req.launch_type(match e.launch_type {
                LaunchType::Fargate => EcsLaunchType::Fargate,
                LaunchType::Ec2 => EcsLaunchType::Ec2,
            });
        }
        if let Some(l) = live {
            let tags = l.tags().to_vec();
            req = req
                .set_deployment_configuration(l.deployment_configuration().cloned())
                .set_health_check_grace_period_seconds(l.health_check_grace_period_seconds())
                .set_placement_constraints(Some(l.placement_constraints().to_vec()))
                .set_placement_strategy(Some(l.placement_strategy().to_vec()))
                .set_propagate_tags(l.propagate_tags().cloned())
                .enable_ecs_managed_tags(l.enable_ecs_managed_tags())
                .enable_execute_command(l.enable_execute_command())
                .set_platform_version(l.platform_version().map(str::to_string))
                .set_tags((!tags.is_empty()).then_some(tags));
        }
        if let Some(n) = &e.network {
            let vpc = AwsVpcConfiguration::builder()
                .set_subnets(Some(n.subnets.clone()))
                .set_security_groups(Some(n.security_groups.clone()))
                .assign_public_ip(if n.assign_public_ip {
                    AssignPublicIp::Enabled
                } else {
                    AssignPublicIp::Disabled
                })
                .build()
                .map_err(call_err("ecs:CreateService"))?;
            req = req.network_configuration(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(vpc)
                    .build(),
            );
        }
        req.send().await.map_err(call_err("ecs:CreateService"))?;
        Ok(())
    }

    /// Sets service `name`'s desired count.
    pub async fn scale(&self, cluster: &str, name: &str, count: u32) -> Result<(), AwsError> {
        self.count();
        self.ecs
            .update_service()
            .cluster(cluster)
            .service(name)
            .desired_count(i32::try_from(count).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(call_err("ecs:UpdateService"))?;
        Ok(())
    }

    /// The settings of service `live` (none if it does not exist) a new side is created with.
    pub async fn carried(&self, cluster: &str, live: &str) -> Result<Carried, AwsError> {
        self.count();
        let out = self
            .ecs
            .describe_services()
            .cluster(cluster)
            .services(live)
            .include(ServiceField::Tags)
            .send()
            .await
            .map_err(call_err("ecs:DescribeServices"))?;
        Ok(Carried(
            out.services()
                .iter()
                .find(|s| s.status() != Some("INACTIVE"))
                .cloned(),
        ))
    }

    /// Gives service `to` the Application Auto Scaling target (min, max, role, suspension)
    /// and scaling policies of service `from`, if `from` has one; idempotent (registering and
    /// putting are upserts). Returns how many policies were carried, or `None` without a
    /// target to carry.
    pub async fn carry_scaling(
        &self,
        cluster: &str,
        from: &str,
        to: &str,
    ) -> Result<Option<usize>, AwsError> {
        let (src, dst) = (scaling_id(cluster, from), scaling_id(cluster, to));
        self.count();
        let targets = self
            .scaling
            .describe_scalable_targets()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_ids(&src)
            .send()
            .await
            .map_err(call_err("application-autoscaling:DescribeScalableTargets"))?;
        let Some(t) = targets.scalable_targets().first() else {
            return Ok(None);
        };
        self.count();
        let policies = self
            .scaling
            .describe_scaling_policies()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_id(&src)
            .send()
            .await
            .map_err(call_err("application-autoscaling:DescribeScalingPolicies"))?;
        self.count();
        self.scaling
            .register_scalable_target()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_id(&dst)
            .min_capacity(t.min_capacity())
            .max_capacity(t.max_capacity())
            .set_role_arn((!t.role_arn().is_empty()).then(|| t.role_arn().to_string()))
            .set_suspended_state(t.suspended_state().cloned())
            .send()
            .await
            .map_err(call_err("application-autoscaling:RegisterScalableTarget"))?;
        for p in policies.scaling_policies() {
            self.count();
            self.scaling
                .put_scaling_policy()
                .service_namespace(ServiceNamespace::Ecs)
                .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
                .resource_id(&dst)
                .policy_name(p.policy_name())
                .policy_type(p.policy_type().clone())
                .set_step_scaling_policy_configuration(
                    p.step_scaling_policy_configuration().cloned(),
                )
                .set_target_tracking_scaling_policy_configuration(
                    p.target_tracking_scaling_policy_configuration().cloned(),
                )
                .set_predictive_scaling_policy_configuration(
                    p.predictive_scaling_policy_configuration().cloned(),
                )
                .send()
                .await
                .map_err(call_err("application-autoscaling:PutScalingPolicy"))?;
        }
        Ok(Some(policies.scaling_policies().len()))
    }

    /// Whether service `name` has an Application Auto Scaling target.
    pub async fn has_scaling(&self, cluster: &str, name: &str) -> Result<bool, AwsError> {
        self.count();
        let out = self
            .scaling
            .describe_scalable_targets()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_ids(scaling_id(cluster, name))
            .send()
            .await
            .map_err(call_err("application-autoscaling:DescribeScalableTargets"))?;
        Ok(!out.scalable_targets().is_empty())
    }

    /// Removes service `name`'s scalable target (and with it its policies); no-op without one.
    pub async fn drop_scaling(&self, cluster: &str, name: &str) -> Result<(), AwsError> {
        // Asked first: what a missing target answers differs between implementations
        // (ObjectNotFoundException, or a ValidationException).
        if !self.has_scaling(cluster, name).await? {
            return Ok(());
        }
        self.count();
        match self
            .scaling
            .deregister_scalable_target()
            .service_namespace(ServiceNamespace::Ecs)
            .scalable_dimension(ScalableDimension::EcsServiceDesiredCount)
            .resource_id(scaling_id(cluster, name))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_object_not_found_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(call_err("application-autoscaling:DeregisterScalableTarget")(e)),
        }
    }

    /// Scales a service to zero and deletes it (no-op if it does not exist).
    pub async fn remove_service(&self, cluster: &str, name: &str) -> Result<(), AwsError> {
        if self.service(cluster, name).await?.is_none() {
            return Ok(());
        }
        self.count();
        self.ecs
            .update_service()
            .cluster(cluster)
            .service(name)
            .desired_count(0)
            .send()
            .await
            .map_err(call_err("ecs:UpdateService"))?;
        self.count();
        self.ecs
            .delete_service()
            .cluster(cluster)
            .service(name)
            .force(true)
            .send()
            .await
            .map_err(call_err("ecs:DeleteService"))?;
        Ok(())
    }
}

fn nonempty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// Turns a "not found" service error into [`AwsError::Missing`].
fn missing_or(e: AwsError, what: &'static str, id: &str) -> AwsError {
    let text = e.to_string();
    if text.contains("NotFound") || text.contains("not found") || text.contains("does not exist") {
        AwsError::Missing {
            what,
            id: id.into(),
        }
    } else {
        e
    }
}

/// The Application Auto Scaling resource id of ECS service `name` in `cluster` (a name or an
/// ARN): `service/<cluster name>/<service>`.
fn scaling_id(cluster: &str, name: &str) -> String {
    let cluster = cluster.rsplit_once(":cluster/").map_or(cluster, |(_, n)| n);
    format!("service/{cluster}/{name}")
}
