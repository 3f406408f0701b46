#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/seeds/<target>/).

Seeds are valid inputs from the repo's examples and the attacks of issue 11, so the fuzzers
start from both sides of every check. Rerun after changing the examples: fuzz/seeds/make.py
"""
import io
import json
import os
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def read(path):
    with open(os.path.join(REPO, path), "rb") as f:
        return f.read()


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def bomb(levels, width):
    text = "a0: &a0 [" + ", ".join(["x"] * width) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
    return text.encode()


# spec: services/hello.yaml \0 environments/prod.yaml \0 services/db.yaml \0 environments/staging.yaml
fleet = read("examples/fleet/services/hello.yaml")
prod = read("examples/fleet/environments/prod.yaml")
put("spec", "fleet", fleet + b"\0" + prod)
put("spec", "ecs", read("examples/ecs/services/web.yaml") + b"\0" + read("examples/ecs/environments/prod.yaml"))
put("spec", "alias-bomb", bomb(10, 9) + b"\0" + prod)
put("spec", "deep", b"a: " + b"[" * 200 + b"]" * 200 + b"\0" + prod)
put("spec", "duplicate-keys", b"".join(b"k%d: 1\nk%d: 2\n" % (i, i) for i in range(50)) + b"\0" + prod)
put("spec", "merge-and-anchors", b"base: &b {a: 1}\nservice: hello\n<<: *b\n\0" + prod)
put("spec", "two-envs", fleet + b"\0" + prod + b"\0" + fleet.replace(b"service: hello", b"service: db") + b"\0" + prod)

# agent_config: main \0 drop-in
put("agent_config", "packaged", read("packaging/config/agent.yaml"))
put("agent_config", "ecs", read("examples/ecs/agent.yaml"))
put(
    "agent_config",
    "dropin",
    read("packaging/config/agent.yaml")
    + b"\0host: web-1\nlabels: { role: web }\nvars: { port: '8080' }\n"
    + b"coordinator: { url: 'http://127.0.0.1:1/', token_file: /dev/zero }\n",
)
put("agent_config", "bomb", bomb(8, 8))


# extract
def tar(entries, gz=True, fmt=tarfile.GNU_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as t:
        for name, kind, arg in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                t.addfile(info)
            elif kind == "file":
                info.size = len(arg)
                info.mode = 0o755
                t.addfile(info, io.BytesIO(arg))
            elif kind == "setuid":
                info.size = len(arg)
                info.mode = 0o4755
                t.addfile(info, io.BytesIO(arg))
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = arg
                t.addfile(info)
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = arg
                t.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                t.addfile(info)
    data = buf.getvalue()
    if gz:
        # Fixed gzip header time, so the seeds do not change on every run.
        data = data[:4] + b"\0\0\0\0" + data[8:]
    return data


put("extract", "release", tar([("bin", "dir", None), ("bin/hello", "file", b"#!/bin/sh\necho hi\n"), ("config", "dir", None), ("config/app.env.tmpl", "file", b"PORT={port}\n"), ("current", "sym", "bin/hello"), ("bin/again", "hard", "bin/hello")]))
put("extract", "plain-tar", tar([("a", "file", b"x" * 600), ("d/b", "file", b"y")], gz=False))
put("extract", "pax", tar([("p" * 300, "file", b"long")], fmt=tarfile.PAX_FORMAT))
put("extract", "gnu-long", tar([("g" * 300 + "/x", "file", b"long")]))
put("extract", "traversal", tar([("../evil", "file", b"x")]))
put("extract", "absolute", tar([("/tmp/evil", "file", b"x")]))
put("extract", "link-escape", tar([("up", "sym", ".."), ("up/evil", "file", b"x")]))
put("extract", "link-through-link", tar([("a", "dir", None), ("a/b", "sym", ".."), ("c", "sym", "a/b/.."), ("c/evil", "file", b"x")]))
put("extract", "hard-escape", tar([("h", "hard", "/etc/passwd")]))
put("extract", "fifo", tar([("f", "fifo", None)]))
put("extract", "setuid", tar([("s", "setuid", b"x")]))
put("extract", "many-empty", tar([(f"e{i}", "file", b"") for i in range(600)]))
put("extract", "replace-link", tar([("l", "sym", "x"), ("l", "file", b"y")]))

# template
for i, t in enumerate([
    b"PORT={port}\nHOST={host}\n",
    b"SECRET={env.SECRET}\n{{literal}}\n",
    b"{rack}{version}{environment}",
    b"{unknown} {env.MISSING} {",
    b"}}{{}}{ {} {env.} {env..x}",
]):
    put("template", f"t{i}", t)

# request: first byte 0 heartbeat, 1 acquire, 2 release, 3 rollback; then the JSON body
hb = {"environment": "prod", "labels": {"role": "web"}, "agent_version": "0.1.0", "commit": "0" * 40,
      "services": [{"service": "hello", "desired": "2.0", "actual": "1.0", "healthy": True,
                    "phase": "health", "last_error": "\x1b[31mred\x1b[0m", "failed": None}]}
acq = {"host": "web-2", "environment": "prod", "service": "hello", "version": "2.0",
       "purpose": "deploy", "commit": "0" * 39 + "2"}
rel = {"outcome": "failure", "message": "boom", "verification": {"risk": "medium", "summary": "p=0.2"}}
for i, (k, body) in enumerate([(0, hb), (1, acq), (1, dict(acq, purpose="revert")), (2, rel),
                                (2, {"outcome": "success"}), (3, {"to": "1.0"}), (3, {})]):
    put("request", f"r{i}", bytes([k]) + json.dumps(body).encode())
put("request", "deep-json", b"\0" + b"[" * 200 + b"]" * 200)
