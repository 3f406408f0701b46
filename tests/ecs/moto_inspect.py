#!/usr/bin/env python3
# (Not named inspect.py: that would shadow the standard library module of the same name.)
"""Prints what moto holds for an ECS service as JSON: the listener's weights (by target group
ARN), the services and their task definitions, and every revision of the family.

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
services = {}
for s in ecs.describe_services(cluster=cluster, services=[f"{service}-blue", f"{service}-green"])["services"]:
    if s["status"] != "INACTIVE":
        services[s["serviceName"]] = {"status": s["status"], "task_definition": s["taskDefinition"], "desired": s["desiredCount"]}
revisions = []
for arn in ecs.list_task_definitions(familyPrefix=service)["taskDefinitionArns"]:
    td = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]
    for k in ("taskDefinitionArn", "revision", "registeredAt", "registeredBy", "status", "deregisteredAt"):
        td.pop(k, None)
    revisions.append(td)
print(json.dumps({"weights": weights, "services": services, "revisions": revisions}, default=str))
