#!/usr/bin/env python3
"""Fleet benchmark: 10 hosts rolling 2 at a time through the coordinator (release build).

    bench/fleet.py [--hosts 10] [--parallel 2] [--rounds 3]

Starts a real drover-coordinator (SQLite) and N drover-agent processes (service_manager:
process, the hello demo app with its health check and smoke test), all on this machine, with
the desired-state repo as a local path (agents react through inotify). Each round commits a
new version and measures commit → every host converged (read from the agents' state files),
and checks from the agents' event logs that no more than --parallel hosts were between stop
and healthy at once.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent import GIT_ENV, HELLO, TARGET, Lighttpd, artifact, free_port, git, ts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AGENT = TARGET / "release/drover-agent"
COORD = TARGET / "release/drover-coordinator"

SERVICE = """service: hello
artifact: {{ url: "{art}/hello-{{version}}.tar.gz" }}
install: {{ root: "{{base}}/hello", keep_releases: 3 }}
run: {{ command: ["bin/hello", "--port", "{{port}}"], stop_timeout: 5s }}
health: {{ url: "http://127.0.0.1:{{port}}/health", timeout: 10s }}
smoke: [ {{ url: "http://127.0.0.1:{{port}}/version", expect_body: "{{version}}" }} ]
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "drover-agent", "-p", "drover-coordinator",
                    "-p", "drover-example-hello"], cwd=ROOT, check=True, env=dict(os.environ, CARGO_TARGET_DIR=str(TARGET)))
    work = Path(tempfile.mkdtemp(prefix="drover-fleet-bench."))
    arts = work / "artifacts"
    arts.mkdir()
    http = Lighttpd(work, arts, work)
    procs = []
    try:
        token = "bench-agent-token"
        (work / "token").write_text(token)
        import hashlib
        cport = free_port()
        (work / "c.yaml").write_text(
            f"listen: 127.0.0.1:{cport}\nstore: {{ sqlite: {work}/c.db }}\nheartbeat_interval: 1s\n"
            f"tokens:\n  - {{ name: fleet, role: agent, sha256: {hashlib.sha256(token.encode()).hexdigest()} }}\n")
        procs.append(subprocess.Popen([str(COORD), "serve", "--config", str(work / "c.yaml")], stderr=subprocess.DEVNULL))
        repo = work / "fleet"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        (repo / "services").mkdir()
        (repo / "environments").mkdir()
        (repo / "services/hello.yaml").write_text(SERVICE.format(art=f"http://127.0.0.1:{http.port}"))

        def pin(version):
            _, sha = artifact(arts, version, blob_mb=0)
            (repo / "environments/bench.yaml").write_text(
                f"environment: bench\nrollout: {{ max_parallel: {args.parallel} }}\n"
                f"services:\n  hello: {{ version: {version}, sha256: {sha} }}\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", version)

        pin("1.0.0")
        hosts = []
        for i in range(args.hosts):
            base = work / f"h{i:02}"
            base.mkdir()
            cfg = base / "agent.yaml"
            cfg.write_text(
                f"host: h{i:02}\nenvironment: bench\nvars: {{ port: \"{free_port()}\", base: \"{base}\" }}\n"
                f"repo: {{ url: \"{repo}\", poll_interval: 30s }}\nstate_dir: {base}/state\nservice_manager: process\n"
                f"coordinator: {{ url: \"http://127.0.0.1:{cport}\", token_file: \"{work}/token\", heartbeat_interval: 1s }}\n")
            procs.append(subprocess.Popen([str(AGENT), "--config", str(cfg), "run"], stderr=subprocess.DEVNULL))
            hosts.append(base)

        def current(base):
            try:
                s = json.loads((base / "state/services/hello.json").read_text())
                return None if s.get("deployment") else (s.get("current") or {}).get("version")
            except (OSError, ValueError):
                return None

        def converge(version, limit=120):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < limit:
                if all(current(h) == version for h in hosts):
                    return time.perf_counter() - t0
                time.sleep(0.02)
            raise SystemExit(f"{version}: not converged after {limit}s")

        converge("1.0.0")
        times, overlaps = [], []
        for r in range(args.rounds):
            v = f"2.0.{r}"
            _, sha = artifact(arts, v, blob_mb=0)
            (repo / "environments/bench.yaml").write_text(
                f"environment: bench\nrollout: {{ max_parallel: {args.parallel} }}\n"
                f"services:\n  hello: {{ version: {v}, sha256: {sha} }}\n")
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", v)
            times.append(converge(v))
            windows = []
            for h in hosts:
                start = None
                for line in (h / "state/events.jsonl").read_text().splitlines():
                    e = json.loads(line)
                    if e["version"] != v:
                        continue
                    if e["phase"] == "stop":
                        start = ts(e["at"])
                    elif e["phase"] == "deployed" and start is not None:
                        windows.append((start, ts(e["at"])))
            points = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows], key=lambda p: (p[0], p[1]))
            cur = mx = 0
            for _, d in points:
                cur += d
                mx = max(mx, cur)
            overlaps.append(mx)
        print(f"\n== fleet benchmark: {args.hosts} hosts, max_parallel {args.parallel}, release build ==")
        print(f"commit → all {args.hosts} hosts converged: median {statistics.median(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})   target ≤ 10 s")
        print(f"most hosts between stop and healthy at once: {max(overlaps)} (limit {args.parallel})")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for pidfile in work.glob("h*/state/run/*.pid"):
            try:
                os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
            except OSError:
                pass
        http.stop()
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
