#!/usr/bin/env python3
"""Plays the ECS scheduler for moto, which starts no tasks: every 0.2 s, each ACTIVE service
with desiredCount > 0 gets that many targets registered (and healthy, as moto reports all
targets) in its target group, unless its image is listed in BROKEN_FILE (one image per line):
then its targets are withheld, so the service never becomes healthy. Target groups that no
active service uses are emptied, as ECS deregisters the tasks of a deleted service.

    scheduler.py ENDPOINT CLUSTER BROKEN_FILE
"""
import sys
import time
import zlib

import boto3

endpoint, cluster, broken_file = sys.argv[1], sys.argv[2], sys.argv[3]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
ecs = boto3.client("ecs", **kw)
elb = boto3.client("elbv2", **kw)
images = {}

while True:
    try:
        try:
            broken = {l.strip() for l in open(broken_file) if l.strip()}
        except OSError:
            broken = set()
        arns = ecs.list_services(cluster=cluster)["serviceArns"]
        services = ecs.describe_services(cluster=cluster, services=arns)["services"] if arns else []
        wanted = {}
        for s in services:
            if s["status"] != "ACTIVE" or not s.get("loadBalancers"):
                continue
            td = s["taskDefinition"]
            if td not in images:
                images[td] = ecs.describe_task_definition(taskDefinition=td)["taskDefinition"]["containerDefinitions"][0]["image"]
            tg = s["loadBalancers"][0]["targetGroupArn"]
            n = s["desiredCount"] if images[td] not in broken else 0
            base = zlib.crc32(s["serviceName"].encode()) % 200 + 20
            wanted[tg] = {f"10.10.{base}.{i + 10}" for i in range(n)}
        for tg in elb.describe_target_groups()["TargetGroups"]:
            arn = tg["TargetGroupArn"]
            have = {d["Target"]["Id"] for d in elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]}
            want = wanted.get(arn, set())
            if want - have:
                elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": t, "Port": 8080} for t in want - have])
            if have - want:
                elb.deregister_targets(TargetGroupArn=arn, Targets=[{"Id": t, "Port": 8080} for t in have - want])
    except Exception as e:  # moto restarting, a service being deleted: try again
        print(f"scheduler: {e}", file=sys.stderr)
    time.sleep(0.2)
