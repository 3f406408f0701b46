#!/usr/bin/env python3
# (Not named inspect.py: that would shadow the standard library module of the same name.)
"""Prints what moto holds for an ECS service as JSON: the listener's weights (by target group
ARN), the services (task definition, count, the settings a deploy keeps, tags, autoscaling)
and every revision of the family.

    moto_inspect.py ENDPOINT CLUSTER SERVICE LISTENER_ARN [set-weights BLUE_ARN W GREEN_ARN W]
"""
import json
import sys

import boto3

endpoint, cluster, service, listener = sys.argv[1:5]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
elb = boto3.client("elbv2", **kw)
ecs = boto3.client("ecs", **kw)
if len(sys.argv) > 5 and sys.argv[5] == "set-weights":
    b, wb, g, wg = sys.argv[6:10]
    elb.modify_listener(ListenerArn=listener, DefaultActions=[{"Type": "forward", "ForwardConfig": {"TargetGroups": [
        {"TargetGroupArn": b, "Weight": int(wb)}, {"TargetGroupArn": g, "Weight": int(wg)}]}}])
action = elb.describe_listeners(ListenerArns=[listener])["Listeners"][0]["DefaultActions"][0]
weights = {t["TargetGroupArn"]: t.get("Weight", 1) for t in action.get("ForwardConfig", {}).get("TargetGroups", [])}
scaling = boto3.client("application-autoscaling", **kw)
services = {}
for s in ecs.describe_services(cluster=cluster, services=[f"{service}-blue", f"{service}-green"], include=["TAGS"])["services"]:
    if s["status"] != "INACTIVE":
        resource = f"service/{cluster.split('/')[-1]}/{s['serviceName']}"
        targets = scaling.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[resource])["ScalableTargets"]
        policies = scaling.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=resource)["ScalingPolicies"]
        services[s["serviceName"]] = {
            "status": s["status"], "task_definition": s["taskDefinition"], "desired": s["desiredCount"],
            "deployment": s.get("deploymentConfiguration"), "grace": s.get("healthCheckGracePeriodSeconds"),
            "propagate_tags": s.get("propagateTags"),
            "tags": {t["key"]: t["value"] for t in s.get("tags", [])},
            "scaling": [{"min": t["MinCapacity"], "max": t["MaxCapacity"]} for t in targets],
            "policies": [{"name": p["PolicyName"], "type": p["PolicyType"],
                          "target": p.get("TargetTrackingScalingPolicyConfiguration", {}).get("TargetValue")} for p in policies],
        }
revisions = []
for arn in ecs.list_task_definitions(familyPrefix=service)["taskDefinitionArns"]:
    td = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]
    for k in ("taskDefinitionArn", "revision", "registeredAt", "registeredBy", "status", "deregisteredAt"):
        td.pop(k, None)
    revisions.append(td)
targets = sorted(t["ResourceId"] for t in scaling.describe_scalable_targets(ServiceNamespace="ecs")["ScalableTargets"])
print(json.dumps({"weights": weights, "services": services, "revisions": revisions, "scaling_targets": targets},
                 default=str))
