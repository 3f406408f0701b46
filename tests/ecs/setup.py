#!/usr/bin/env python3
"""Creates, in a moto server, what an ECS service deployed by drover needs: a VPC with two
subnets and a security group, an ALB with a listener forwarding 100% to the blue target group,
a green target group, an ECS cluster, a task definition family, and the blue service running
the first version. Prints the ARNs as JSON.

    setup.py ENDPOINT SERVICE FIRST_IMAGE DESIRED_COUNT
"""
import json
import sys

import boto3

endpoint, service, image, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
ec2 = boto3.client("ec2", **kw)
elb = boto3.client("elbv2", **kw)
ecs = boto3.client("ecs", **kw)

vpc = ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.10.{i}.0/24", AvailabilityZone=f"us-east-1{z}")["Subnet"]["SubnetId"]
           for i, z in ((1, "a"), (2, "b"))]
sg = ec2.create_security_group(GroupName=f"{service}-sg", Description="drover test", VpcId=vpc)["GroupId"]
lb = elb.create_load_balancer(Name=f"{service}-alb", Subnets=subnets, SecurityGroups=[sg], Type="application")["LoadBalancers"][0]["LoadBalancerArn"]
tgs = {}
for colour in ("blue", "green"):
    tgs[colour] = elb.create_target_group(Name=f"{service}-{colour}", Protocol="HTTP", Port=8080, VpcId=vpc,
                                          TargetType="ip", HealthCheckPath="/health")["TargetGroups"][0]["TargetGroupArn"]
listener = elb.create_listener(
    LoadBalancerArn=lb, Protocol="HTTP", Port=80,
    DefaultActions=[{"Type": "forward", "ForwardConfig": {"TargetGroups": [{"TargetGroupArn": tgs["blue"], "Weight": 100}]}}],
)["Listeners"][0]["ListenerArn"]
# A second listener attached to neither target group, for the bad-input tests.
other_tg = elb.create_target_group(Name=f"{service}-other", Protocol="HTTP", Port=8080, VpcId=vpc, TargetType="ip")["TargetGroups"][0]["TargetGroupArn"]
other_listener = elb.create_listener(
    LoadBalancerArn=lb, Protocol="HTTP", Port=81,
    DefaultActions=[{"Type": "forward", "ForwardConfig": {"TargetGroups": [{"TargetGroupArn": other_tg, "Weight": 100}]}}],
)["Listeners"][0]["ListenerArn"]
cluster = ecs.create_cluster(clusterName=f"{service}-cluster")["cluster"]["clusterName"]
td = ecs.register_task_definition(
    family=service, networkMode="awsvpc", requiresCompatibilities=["FARGATE"], cpu="256", memory="512",
    executionRoleArn="arn:aws:iam::123456789012:role/exec",
    containerDefinitions=[{"name": service, "image": image, "memory": 512, "essential": True,
                           "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
                           "environment": [{"name": "MODE", "value": "production"}]}],
)["taskDefinition"]["taskDefinitionArn"]
ecs.create_service(
    cluster=cluster, serviceName=f"{service}-blue", taskDefinition=td, desiredCount=count, launchType="FARGATE",
    loadBalancers=[{"targetGroupArn": tgs["blue"], "containerName": service, "containerPort": 8080}],
    networkConfiguration={"awsvpcConfiguration": {"subnets": subnets, "securityGroups": [sg], "assignPublicIp": "DISABLED"}},
    # What an ECS user sets on a service besides its image, which a deploy must keep.
    deploymentConfiguration={"maximumPercent": 150, "minimumHealthyPercent": 100},
    healthCheckGracePeriodSeconds=45, propagateTags="SERVICE",
    tags=[{"key": "team", "value": "payments"}, {"key": "cost-centre", "value": "42"}],
)
# Autoscaling of the live service: a target (2..8 tasks) and a target-tracking policy.
scaling = boto3.client("application-autoscaling", **kw)
resource = f"service/{cluster.split('/')[-1]}/{service}-blue"
scaling.register_scalable_target(ServiceNamespace="ecs", ResourceId=resource,
                                 ScalableDimension="ecs:service:DesiredCount", MinCapacity=2, MaxCapacity=8)
scaling.put_scaling_policy(
    PolicyName="cpu60", ServiceNamespace="ecs", ResourceId=resource, ScalableDimension="ecs:service:DesiredCount",
    PolicyType="TargetTrackingScaling",
    TargetTrackingScalingPolicyConfiguration={"TargetValue": 60.0, "PredefinedMetricSpecification": {
        "PredefinedMetricType": "ECSServiceAverageCPUUtilization"}, "ScaleInCooldown": 120, "ScaleOutCooldown": 30},
)
print(json.dumps({"cluster": cluster, "listener": listener, "blue": tgs["blue"], "green": tgs["green"],
                  "subnets": subnets, "sg": sg, "other_listener": other_listener, "other_tg": other_tg}))
