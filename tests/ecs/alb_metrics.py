#!/usr/bin/env python3
"""Publishes, to a moto server's CloudWatch, what an ALB publishes for its target groups, until
killed: every half second, each target group with traffic (by the listener's current weights)
gets RequestCount (its weight: requests in that half second), TargetResponseTime (about 20 ms)
and, when it fails some, HTTPCode_Target_5XX_Count (none at all when it fails none, as an ALB
publishes no zero counts). Dimensions are LoadBalancer and TargetGroup, named as CloudWatch
names them.

    alb_metrics.py ENDPOINT LISTENER_ARN BLUE_ARN BLUE_5XX_RATIO GREEN_ARN GREEN_5XX_RATIO
"""
import random
import sys
import time

import boto3

endpoint, listener = sys.argv[1], sys.argv[2]
ratios = {sys.argv[3]: float(sys.argv[4]), sys.argv[5]: float(sys.argv[6])}
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
elb = boto3.client("elbv2", **kw)
cw = boto3.client("cloudwatch", **kw)

# arn:…:listener/app/NAME/ID/LISTENER_ID → app/NAME/ID; arn:…:targetgroup/NAME/ID → targetgroup/NAME/ID
lb = listener.rsplit(":", 1)[1].removeprefix("listener/").rsplit("/", 1)[0]

while True:
    action = elb.describe_listeners(ListenerArns=[listener])["Listeners"][0]["DefaultActions"][0]
    weights = {t["TargetGroupArn"]: t.get("Weight", 1) for t in action.get("ForwardConfig", {}).get("TargetGroups", [])}
    now = time.time()
    data = []
    for arn, ratio in ratios.items():
        requests = weights.get(arn, 0)
        if requests == 0:
            continue
        # LoadBalancer first: moto compares dimension lists in the order given.
        dims = [{"Name": "LoadBalancer", "Value": lb}, {"Name": "TargetGroup", "Value": arn.rsplit(":", 1)[1]}]
        data.append({"MetricName": "RequestCount", "Dimensions": dims, "Timestamp": now, "Value": requests, "Unit": "Count"})
        data.append({"MetricName": "TargetResponseTime", "Dimensions": dims, "Timestamp": now,
                     "Value": random.uniform(0.018, 0.022), "Unit": "Seconds"})
        errors = round(requests * ratio)
        if errors > 0:
            data.append({"MetricName": "HTTPCode_Target_5XX_Count", "Dimensions": dims, "Timestamp": now,
                         "Value": errors, "Unit": "Count"})
    if data:
        cw.put_metric_data(Namespace="AWS/ApplicationELB", MetricData=data)
    time.sleep(0.5)
