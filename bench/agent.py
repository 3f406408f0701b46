#!/usr/bin/env python3
"""Agent benchmarks, all in one run on this machine (release build).

    bench/agent.py [--rounds N] [--idle-seconds S] [--skip-ansible]

1. cold download + verify + extract of a 10 MB artifact: drover's fetch+stage phases vs
   `curl -o f URL && sha256sum f && tar xzf f` on the same file from the same server;
2. deploy overhead with the artifact already cached (fetch → deployed, no health check, so the
   app's own start and health wait are excluded);
3. rollback overhead (switch back + restart issued; the failure comes from a smoke command);
4. the same deploy done by ansible-playbook (get_url with checksum, unarchive, file symlink,
   command restart, uri health check) vs `drover-agent once` doing it, wall clock;
5. agent idle RSS and CPU with a 5 s poll of a smart-HTTP Git repo.

Peers: lighttpd (artifacts + git http-backend), git, curl, tar; ansible-core from PyPI into a
throwaway venv (not a project dependency). Timings come from the agent's own event log
(`events.jsonl`, millisecond timestamps) or wall clock where said.
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/drover-target"))
AGENT = TARGET / "release/drover-agent"
HELLO = TARGET / "release/hello"
GIT_ENV = dict(os.environ, GIT_CONFIG_GLOBAL="/dev/null", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x",
               GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@x")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, limit=10):
    t0 = time.time()
    while time.time() - t0 < limit:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def artifact(out_dir, version, blob_mb=10, extra_env=""):
    """A hello release with `blob_mb` MB of incompressible data; returns (path, sha256)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        def add(name, data, mode=0o644):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
        add("bin/hello", HELLO.read_bytes(), 0o755)
        add("bin/fail", b"#!/bin/sh\nexit 1\n", 0o755)
        add("release.env", f"VERSION={version}\n{extra_env}".encode())
        if blob_mb:
            add("data/blob.bin", os.urandom(blob_mb << 20))
    data = buf.getvalue()
    path = out_dir / f"hello-{version}.tar.gz"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


class Lighttpd:
    def __init__(self, work, docroot, repos):
        self.port = free_port()
        conf = work / f"lighttpd-{self.port}.conf"
        conf.write_text(f'''server.modules = ("mod_alias", "mod_cgi", "mod_setenv")
server.bind = "127.0.0.1"
server.port = {self.port}
server.document-root = "{docroot}"
server.errorlog = "{work}/lighttpd.log"
mimetype.assign = ( "" => "application/octet-stream" )
$HTTP["url"] =~ "^/git/" {{
  alias.url = ( "/git/" => "/usr/lib/git-core/git-http-backend/" )
  cgi.assign = ( "" => "" )
  setenv.set-environment = ( "GIT_PROJECT_ROOT" => "{repos}", "GIT_HTTP_EXPORT_ALL" => "1", "GIT_CONFIG_GLOBAL" => "/dev/null" )
}}
''')
        self.proc = subprocess.Popen(["lighttpd", "-D", "-f", str(conf)])
        wait_port(self.port)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


SERVICE = """service: hello
artifact: {{ url: "{art}/hello-{{version}}.tar.gz" }}
install: {{ root: "{{base}}/hello", keep_releases: 2 }}
run: {{ command: ["bin/hello", "--port", "{{port}}"], stop_timeout: 5s }}
{checks}
"""


class Bench:
    def __init__(self, work, art_url):
        self.work = work
        self.art_url = art_url
        self.repo = work / "fleet"
        self.repo.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        self.set_service("")
        self.hosts = 0

    def set_service(self, checks):
        (self.repo / "services").mkdir(exist_ok=True)
        (self.repo / "services/hello.yaml").write_text(SERVICE.format(art=self.art_url, checks=checks))

    def pin(self, version, sha):
        (self.repo / "environments").mkdir(exist_ok=True)
        (self.repo / "environments/bench.yaml").write_text(
            f"environment: bench\nservices:\n  hello: {{ version: {version}, sha256: {sha} }}\n")
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", version)

    def host(self, repo_url=None, poll="30s"):
        self.hosts += 1
        base = self.work / f"host-{self.hosts}"
        base.mkdir()
        port = free_port()
        cfg = base / "agent.yaml"
        cfg.write_text(
            f"host: h{self.hosts}\nenvironment: bench\n"
            f"vars: {{ port: \"{port}\", base: \"{base}\" }}\n"
            f"repo: {{ url: \"{repo_url or self.repo}\", poll_interval: {poll} }}\n"
            f"state_dir: {base}/state\nservice_manager: process\n")
        return base, cfg, port

    def once(self, cfg):
        t0 = time.perf_counter()
        r = subprocess.run([str(AGENT), "--config", str(cfg), "once"], capture_output=True, text=True)
        return time.perf_counter() - t0, r

    def events(self, base):
        return [json.loads(l) for l in (base / "state/events.jsonl").read_text().splitlines()]

    def kill_apps(self):
        for pidfile in self.work.glob("host-*/state/run/*.pid"):
            try:
                os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def phase_times(events, version):
    """{phase: timestamp} of the last deploy of `version`."""
    out = {}
    for e in events:
        if e["version"] == version:
            out[e["phase"]] = ts(e["at"])
    return out


def fmt(xs):
    return f"median {statistics.median(xs)*1000:7.1f} ms  (min {min(xs)*1000:.1f}, max {max(xs)*1000:.1f}, n={len(xs)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--skip-ansible", action="store_true")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "drover-agent", "-p", "drover-example-hello"],
                   cwd=ROOT, check=True, env=dict(os.environ, CARGO_TARGET_DIR=str(TARGET)))
    work = Path(tempfile.mkdtemp(prefix="drover-bench."))
    arts = work / "artifacts"
    arts.mkdir()
    repos = work / "repos"
    repos.mkdir()
    http = Lighttpd(work, arts, repos)
    art_url = f"http://127.0.0.1:{http.port}"
    b = Bench(work, art_url)
    results = {}
    try:
        # 1. Cold download + verify + extract.
        path, sha = artifact(arts, "1.0.0")
        size = path.stat().st_size
        b.pin("1.0.0", sha)
        drover_cold, shell_cold = [], []
        for _ in range(args.rounds):
            base, cfg, _ = b.host()
            dt, r = b.once(cfg)
            assert r.returncode == 0, r.stdout + r.stderr
            p = phase_times(b.events(base), "1.0.0")
            drover_cold.append(p["stop"] - p["fetch"])
            b.kill_apps()
            d = work / "shell"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            t0 = time.perf_counter()
            subprocess.run(f"curl -sf -o {d}/a.tgz {art_url}/hello-1.0.0.tar.gz && sha256sum {d}/a.tgz >/dev/null "
                           f"&& mkdir {d}/x && tar xzf {d}/a.tgz -C {d}/x", shell=True, check=True)
            shell_cold.append(time.perf_counter() - t0)
        results["cold"] = (drover_cold, shell_cold, size)

        # 2. Deploy overhead, artifact cached, fresh release each time, no health check.
        base, cfg, port = b.host()
        assert b.once(cfg)[1].returncode == 0
        overhead, stage = [], []
        for i in range(args.rounds):
            v = f"1.1.{i}"
            p_, s_ = artifact(arts, v)
            shutil.copy(p_, base / f"state/cache/{s_}")
            b.pin(v, s_)
            _, r = b.once(cfg)
            assert r.returncode == 0, r.stdout + r.stderr
            p = phase_times(b.events(base), v)
            overhead.append(p["deployed"] - p["fetch"])
            stage.append(p["stop"] - p["stage"])
        results["cached"] = (overhead, stage)

        # 3. Rollback overhead: a smoke command fails, the previous release is restarted.
        b.set_service("smoke: [ { command: [bin/fail], timeout: 5s } ]")
        rollback = []
        for i in range(args.rounds):
            v = f"1.2.{i}"
            p_, s_ = artifact(arts, v, blob_mb=0)
            b.pin(v, s_)
            _, r = b.once(cfg)
            assert r.returncode == 1 and "rolled back" in r.stdout, r.stdout + r.stderr
            p = phase_times(b.events(base), v)
            rollback.append(p["rolled_back"] - p["rollback"])
        results["rollback"] = rollback
        b.set_service("")
        b.kill_apps()

        # 4. Side by side with ansible-playbook: the same full deploy, with a health check.
        if not args.skip_ansible:
            results["ansible"] = ansible_vs_drover(b, work, arts, art_url, args.rounds)
            b.kill_apps()

        # 5. Idle RSS and CPU, 5 s poll of a smart-HTTP repo.
        bare = repos / "fleet.git"
        subprocess.run(["git", "clone", "-q", "--bare", str(b.repo), str(bare)], env=GIT_ENV, check=True)
        base, cfg, port = b.host(repo_url=f"{art_url}/git/fleet.git", poll="5s")
        agent = subprocess.Popen([str(AGENT), "--config", str(cfg), "run"], stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 60:
            st = subprocess.run([str(AGENT), "--config", str(cfg), "status", "--json"], capture_output=True, text=True)
            if json.loads(st.stdout)["services"].get("hello", {}).get("current"):
                break
            time.sleep(0.2)
        tick = os.sysconf("SC_CLK_TCK")

        def cpu():
            f = Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / tick

        def rss():
            for line in Path(f"/proc/{agent.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        c0, samples = cpu(), []
        t0 = time.time()
        while time.time() - t0 < args.idle_seconds:
            samples.append(rss())
            time.sleep(1)
        c1 = cpu()
        split = {k: v for k, v in (l.split(":", 1) for l in Path(f"/proc/{agent.pid}/status").read_text().splitlines())
                 if k in ("RssAnon", "RssFile")}
        print("idle agent memory at the end:", ", ".join(f"{k} {v.strip()}" for k, v in split.items()))
        agent.send_signal(signal.SIGTERM)
        agent.wait()
        results["idle"] = (max(samples), statistics.mean(samples), (c1 - c0) / args.idle_seconds * 100, args.idle_seconds)
    finally:
        b.kill_apps()
        http.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n== drover agent benchmarks ({os.cpu_count()} cores; release build) ==")
    d, s, size = results["cold"]
    print(f"cold fetch+verify+extract, {size/1e6:.1f} MB artifact:")
    print(f"  drover (fetch+stage phases)         {fmt(d)}")
    print(f"  curl + sha256sum + tar xzf          {fmt(s)}")
    print(f"  ratio drover/shell                  {statistics.median(d)/statistics.median(s):.2f}x "
          f"(drover {size/1e6/statistics.median(d):.0f} MB/s)")
    o, st = results["cached"]
    print(f"deploy overhead, cached 10 MB artifact, fetch→deployed (no health wait):")
    print(f"  total                               {fmt(o)}   target ≤ 300 ms")
    print(f"  of which stage (extract + sync)     {fmt(st)}")
    print(f"rollback overhead (rollback→rolled_back, restart issued):")
    print(f"  total                               {fmt(results['rollback'])}   target ≤ 100 ms")
    if "ansible" in results:
        dr, an = results["ansible"]
        print("same deploy, wall clock (download 10 MB, verify, unpack, switch, restart, health check):")
        print(f"  drover-agent once                   {fmt(dr)}")
        print(f"  ansible-playbook                    {fmt(an)}")
        print(f"  drover is {statistics.median(an)/statistics.median(dr):.1f}x faster   target ≥ 10x")
    mx, mean, cpu_pct, secs = results["idle"]
    print(f"agent idle, 5 s poll of a smart-HTTP repo, {secs} s: RSS max {mx:.1f} MiB (mean {mean:.1f}), "
          f"CPU {cpu_pct:.2f}%   target ≤ 15 MiB, ~0%")


PLAYBOOK = """- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    root: "{root}"
  tasks:
    - name: download and verify
      get_url:
        url: "{url}"
        dest: "{{{{ root }}}}/hello-{version}.tar.gz"
        checksum: "sha256:{sha}"
    - name: release dir
      file: {{ path: "{{{{ root }}}}/releases/{version}", state: directory }}
    - name: unpack
      unarchive:
        src: "{{{{ root }}}}/hello-{version}.tar.gz"
        dest: "{{{{ root }}}}/releases/{version}"
        remote_src: true
    - name: switch current
      file: {{ src: "{{{{ root }}}}/releases/{version}", dest: "{{{{ root }}}}/current", state: link, force: true }}
    - name: restart
      shell: |
        if [ -f {{{{ root }}}}/pid ]; then kill $(cat {{{{ root }}}}/pid) 2>/dev/null || true; sleep 0.2; fi
        cd {{{{ root }}}}/current && (setsid bin/hello --port {port} >/dev/null 2>&1 & echo $! > {{{{ root }}}}/pid)
    - name: health check
      uri: {{ url: "http://127.0.0.1:{port}/health", status_code: 200 }}
      register: health
      until: health.status == 200
      retries: 50
      delay: 0.1
"""


def ansible_vs_drover(b, work, arts, art_url, rounds):
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "ansible-core"], check=True)
    b.set_service('health: { url: "http://127.0.0.1:{port}/health", timeout: 10s }')
    drover, ansible = [], []
    base, cfg, port = b.host()
    aroot = work / "ansible-root"
    aroot.mkdir()
    aport = free_port()
    for i in range(rounds):
        v = f"3.0.{i}"
        p_, s_ = artifact(arts, v)
        b.pin(v, s_)
        dt, r = b.once(cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        drover.append(dt)
        play = work / "play.yml"
        play.write_text(PLAYBOOK.format(root=aroot, url=f"{art_url}/hello-{v}.tar.gz", version=v, sha=s_, port=aport))
        t0 = time.perf_counter()
        r = subprocess.run([str(venv / "bin/ansible-playbook"), "-i", "localhost,", str(play)],
                           capture_output=True, text=True, env=dict(os.environ, ANSIBLE_PYTHON_INTERPRETER=sys.executable))
        ansible.append(time.perf_counter() - t0)
        assert r.returncode == 0, r.stdout + r.stderr
    try:
        os.kill(int((aroot / "pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    return drover, ansible


if __name__ == "__main__":
    main()
