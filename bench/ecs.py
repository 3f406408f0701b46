#!/usr/bin/env python3
"""ECS orchestration overhead against moto_server, zero waits (release build).

    bench/ecs.py [--rounds 5]

Each round: a full blue-green (register the task definition, create the green service, attach
it at 0 %, wait for healthy targets, 10 → 50 → 100 %, delete blue) — wall time of
`drover-agent once` and the API calls it made (from its log); then a broken version whose
targets never get healthy, timing the rollback phase (one weight call puts 100 % back, then the
new side is removed) from the agent's event log. moto answers every call locally, so this
measures drover's own overhead. The scheduler stand-in (tests/ecs/scheduler.py) registers the
targets, as in the tests.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent import GIT_ENV, TARGET, free_port, git, ts, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AGENT = TARGET / "release/drover-agent"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "drover-agent"], cwd=ROOT, check=True,
                   env=dict(os.environ, CARGO_TARGET_DIR=str(TARGET)))
    work = Path(tempfile.mkdtemp(prefix="drover-ecs-bench."))
    port = free_port()
    moto = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stderr=subprocess.DEVNULL,
                            env=dict(os.environ, MOTO_ECS_SERVICE_RUNNING="2"))
    procs = [moto]
    try:
        wait_port(port, 30)
        url = f"http://127.0.0.1:{port}"
        arns = json.loads(subprocess.run([sys.executable, ROOT / "tests/ecs/setup.py", url, "web", "repo/web:1.0.0", "2"],
                                         check=True, capture_output=True, text=True).stdout)
        broken = work / "broken"
        broken.write_text("")
        procs.append(subprocess.Popen([sys.executable, ROOT / "tests/ecs/scheduler.py", url, arns["cluster"], str(broken)],
                                      stderr=subprocess.DEVNULL))
        repo = work / "fleet"
        (repo / "services").mkdir(parents=True)
        (repo / "environments").mkdir()
        git(repo, "init", "-q", "-b", "main")

        def service(health_timeout):
            (repo / "services/web.yaml").write_text(f"""service: web
kind: ecs
ecs:
  cluster: {arns['cluster']}
  task_family: web
  container: web
  image: "repo/web:{{version}}"
  desired_count: 2
  listener_arn: "{arns['listener']}"
  target_groups: {{ blue: "{arns['blue']}", green: "{arns['green']}" }}
  steps: [10, 50, 100]
  step_wait: 0s
  drain: 0s
  health_timeout: {health_timeout}
  container_port: 8080
  network: {{ subnets: {json.dumps(arns['subnets'])}, security_groups: ["{arns['sg']}"] }}
""")

        def pin(version):
            (repo / "environments/prod.yaml").write_text(f"environment: prod\nservices:\n  web: {{ version: {version} }}\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", version)

        service("30s")
        pin("1.0.0")
        cfg = work / "agent.yaml"
        cfg.write_text(f"host: bench\nenvironment: prod\nrepo: {{ url: \"{repo}\" }}\nstate_dir: {work}/state\n"
                       f"mode: ecs\necs: {{ cluster: {arns['cluster']}, region: us-east-1, poll_interval: 200ms }}\n")
        env = dict(os.environ, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                   AWS_EC2_METADATA_DISABLED="true", DROVER_LOG="info")

        def once():
            t0 = time.perf_counter()
            r = subprocess.run([str(AGENT), "--config", str(cfg), "once"], capture_output=True, text=True, env=env)
            return time.perf_counter() - t0, r

        once()
        deploys, calls, rollbacks = [], [], []
        for i in range(args.rounds):
            pin(f"2.0.{i}")
            dt, r = once()
            assert r.returncode == 0, r.stdout + r.stderr
            deploys.append(dt)
            m = re.findall(r"api_calls\S*?(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", r.stderr))
            calls.append(int(m[-1]) if m else -1)
        service("1s")
        for i in range(args.rounds):
            v = f"3.0.{i}"
            with open(broken, "a") as f:
                f.write(f"repo/web:{v}\n")
            pin(v)
            _, r = once()
            assert r.returncode == 1 and "rolled back" in r.stdout, r.stdout + r.stderr
            ev = [json.loads(l) for l in (work / "state/events.jsonl").read_text().splitlines()]
            t = {e["phase"]: ts(e["at"]) for e in ev if e["version"] == v}
            rollbacks.append(t["rolled_back"] - t["rolling_back"])
        med = statistics.median
        print(f"\n== ECS orchestration against moto_server (release build, zero waits) ==")
        print(f"full blue-green 10 → 50 → 100 %: median {med(deploys)*1000:.0f} ms wall for `drover-agent once` "
              f"(process start and Git read included), {med(calls):.0f} AWS API calls   target ≤ 2 s")
        print(f"rollback (one ModifyListener back to 100 % blue, then green removed): median {med(rollbacks)*1000:.0f} ms   target ≤ 1 s")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
