#!/usr/bin/env python3
"""A local stand-in for Slack, PagerDuty, Jira and a webhook receiver (none is reachable from
the test machines). It is a fake on purpose, and strict: every request is checked field by
field against the service's documented format, and what is wrong is recorded with it, so the
tests can assert that drover sends what each API takes.

  /slack/hook/...            Slack incoming webhook (Block Kit + text fallback)
  /slack/api/chat.postMessage Slack Web API (Bearer bot token, channel)
  /slack/response/...        a click's response_url
  /pd/v2/enqueue             PagerDuty Events API v2
  /jira/rest/api/2/issue     Jira REST v2: create (answers a new key), and .../{key}/comment
  /hook/...                  drover's signed webhook (X-Drover-Signature-256)
  POST /_script              {"prefix": "/hook", "answers": [[500, null], [429, "1"]]}: the next
                             requests under prefix get these statuses (and Retry-After);
                             status 0: never answered (a hung receiver)

Each request is appended to --log as one JSON line: method, path, headers, body, status,
problems.
"""

import argparse
import base64
import hashlib
import hmac
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
SCRIPTS = []  # [prefix, [(status, retry_after)]]
ISSUES = {}
SEQ = [0]


def check_text_obj(o, where, problems, max_len, kinds=("plain_text", "mrkdwn")):
    if not isinstance(o, dict):
        problems.append(f"{where}: not a text object")
        return
    if o.get("type") not in kinds:
        problems.append(f"{where}.type {o.get('type')!r} not in {kinds}")
    t = o.get("text")
    if not isinstance(t, str) or not t:
        problems.append(f"{where}.text missing")
    elif len(t) > max_len:
        problems.append(f"{where}.text over {max_len} characters")


def check_slack_message(m, problems):
    """Slack: `text` (the fallback) and Block Kit `blocks`, as api.slack.com/block-kit documents."""
    if not isinstance(m.get("text"), str) or not m["text"].strip():
        problems.append("text (the fallback for notifications) is missing")
    blocks = m.get("blocks")
    if not isinstance(blocks, list) or not blocks or len(blocks) > 50:
        problems.append("blocks must be 1..50 blocks")
        return
    action_ids = set()
    for i, b in enumerate(blocks):
        w = f"blocks[{i}]"
        t = b.get("type")
        if t == "header":
            check_text_obj(b.get("text"), w + ".text", problems, 150, ("plain_text",))
        elif t == "section":
            if "text" not in b and "fields" not in b:
                problems.append(f"{w}: a section needs text or fields")
            if "text" in b:
                check_text_obj(b["text"], w + ".text", problems, 3000)
            if "fields" in b:
                f = b["fields"]
                if not isinstance(f, list) or len(f) > 10:
                    problems.append(f"{w}.fields: at most 10")
                else:
                    for j, x in enumerate(f):
                        check_text_obj(x, f"{w}.fields[{j}]", problems, 2000)
        elif t == "actions":
            els = b.get("elements") or []
            if not 1 <= len(els) <= 25:
                problems.append(f"{w}.elements: 1..25")
            for j, e in enumerate(els):
                if e.get("type") != "button":
                    problems.append(f"{w}.elements[{j}] is not a button")
                check_text_obj(e.get("text"), f"{w}.elements[{j}].text", problems, 75, ("plain_text",))
                aid = e.get("action_id")
                if not isinstance(aid, str) or not aid or len(aid) > 255 or aid in action_ids:
                    problems.append(f"{w}.elements[{j}].action_id missing, too long or not unique")
                action_ids.add(aid)
                if len(e.get("value", "")) > 2000:
                    problems.append(f"{w}.elements[{j}].value over 2000")
                if "style" in e and e["style"] not in ("primary", "danger"):
                    problems.append(f"{w}.elements[{j}].style {e['style']!r}")
        elif t == "context":
            els = b.get("elements") or []
            if not 1 <= len(els) <= 10:
                problems.append(f"{w}.elements: 1..10")
            for j, e in enumerate(els):
                check_text_obj(e, f"{w}.elements[{j}]", problems, 3000)
        else:
            problems.append(f"{w}: unexpected block type {t!r}")


def check_pagerduty(m, problems):
    """PagerDuty Events API v2 (developer.pagerduty.com, 'Send an Alert Event')."""
    if not isinstance(m.get("routing_key"), str) or len(m["routing_key"]) != 32:
        problems.append("routing_key must be the integration's 32-character key")
    a = m.get("event_action")
    if a not in ("trigger", "acknowledge", "resolve"):
        problems.append(f"event_action {a!r}")
    dk = m.get("dedup_key")
    if a in ("acknowledge", "resolve") and not dk:
        problems.append("dedup_key is required to acknowledge or resolve")
    if dk is not None and (not isinstance(dk, str) or len(dk) > 255):
        problems.append("dedup_key must be a string of at most 255 characters")
    if a == "trigger":
        p = m.get("payload") or {}
        s = p.get("summary")
        if not isinstance(s, str) or not s or len(s) > 1024:
            problems.append("payload.summary must be 1..1024 characters")
        if not p.get("source"):
            problems.append("payload.source is required")
        if p.get("severity") not in ("critical", "error", "warning", "info"):
            problems.append(f"payload.severity {p.get('severity')!r}")
        for l in m.get("links", []):
            if not l.get("href"):
                problems.append("links[].href is required")
    elif "payload" in m:
        problems.append(f"payload is only sent with a trigger, not {a}")


def check_jira_issue(m, problems):
    """Jira REST v2 POST /rest/api/2/issue."""
    f = m.get("fields") or {}
    if not (f.get("project") or {}).get("key"):
        problems.append("fields.project.key is required")
    s = f.get("summary")
    if not isinstance(s, str) or not s or len(s) > 255 or "\n" in s:
        problems.append("fields.summary must be one line of 1..255 characters")
    if not (f.get("issuetype") or {}).get("name"):
        problems.append("fields.issuetype.name is required")
    if "description" in f and not isinstance(f["description"], str):
        problems.append("fields.description must be a string in API v2")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        path = self.path
        if path == "/_script":
            s = json.loads(raw)
            with LOCK:
                SCRIPTS.append([s["prefix"], [tuple(a) for a in s["answers"]]])
            return self.answer(200, {"ok": True})
        problems = []
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
            problems.append("the body is not JSON")
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append("Content-Type is not application/json")
        scripted = None
        with LOCK:
            for s in SCRIPTS:
                if path.startswith(s[0]) and s[1]:
                    scripted = s[1].pop(0)
                    break
        status, reply, extra = 200, {}, {}
        if not path.startswith("/slack/response/") and not headers.get("x-drover-delivery"):
            problems.append("X-Drover-Delivery is missing")
        if isinstance(body, dict):
            if path.startswith("/slack/hook/"):
                check_slack_message(body, problems)
                reply = "ok"
            elif path == "/slack/api/chat.postMessage":
                check_slack_message(body, problems)
                if headers.get("authorization") != "Bearer " + ARGS.slack_token:
                    problems.append("Authorization is not the bot token")
                if not body.get("channel"):
                    problems.append("channel is required")
                reply = {"ok": True, "channel": body.get("channel"), "ts": str(time.time())}
            elif path.startswith("/slack/response/"):
                if not isinstance(body.get("text"), str):
                    problems.append("a response_url message needs text")
            elif path == "/pd/v2/enqueue":
                check_pagerduty(body, problems)
                status = 202
                reply = {"status": "success", "message": "Event processed", "dedup_key": body.get("dedup_key")}
            elif path == "/jira/rest/api/2/issue":
                check_jira_issue(body, problems)
                if headers.get("authorization") != ARGS.jira_auth:
                    problems.append("Authorization is not Basic email:token")
                    status = 401
                else:
                    with LOCK:
                        SEQ[0] += 1
                        key = f"{body['fields']['project']['key']}-{SEQ[0]}"
                        ISSUES[key] = []
                    status = 201
                    reply = {"id": str(10000 + SEQ[0]), "key": key, "self": f"/rest/api/2/issue/{key}"}
            elif re.fullmatch(r"/jira/rest/api/2/issue/[A-Z0-9_]+-\d+/comment", path):
                key = path.split("/")[-2]
                if headers.get("authorization") != ARGS.jira_auth:
                    problems.append("Authorization is not Basic email:token")
                if not isinstance(body.get("body"), str) or not body["body"]:
                    problems.append("a comment needs a body")
                with LOCK:
                    if key in ISSUES:
                        ISSUES[key].append(body.get("body"))
                        status = 201
                    else:
                        problems.append(f"issue {key} does not exist")
                        status = 404
            elif path.startswith("/hook/"):
                sig = headers.get("x-drover-signature-256", "")
                want = "sha256=" + hmac.new(ARGS.hook_secret.encode(), raw, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(sig, want):
                    problems.append("X-Drover-Signature-256 does not verify")
                if body.get("delivery") != headers.get("x-drover-delivery"):
                    problems.append("the body's delivery is not X-Drover-Delivery")
                for k in ("event", "rollout", "hosts", "link"):
                    if k not in body:
                        problems.append(f"{k} is missing")
            else:
                status = 404
        if scripted and scripted[0] == 0:
            # A receiver that hangs: read the request, never answer.
            with LOCK, open(ARGS.log, "a") as f:
                f.write(json.dumps({"at": time.time(), "method": "POST", "path": path,
                                    "headers": headers, "body": body, "status": 0,
                                    "problems": problems}) + "\n")
            time.sleep(60)
            self.close_connection = True
            return
        if scripted:
            status = scripted[0]
            if scripted[1] is not None:
                extra["Retry-After"] = scripted[1]
            reply = {"error": "scripted"}
        rec = {
            "at": time.time(),
            "method": "POST",
            "path": path,
            "headers": headers,
            "body": body,
            "status": status,
            "problems": problems,
        }
        with LOCK, open(ARGS.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.answer(status, reply, extra)

    def answer(self, status, reply, extra=None):
        data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(reply, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--hook-secret", default="")
    p.add_argument("--jira-auth", default="")
    p.add_argument("--slack-token", default="")
    ARGS = p.parse_args()
    ThreadingHTTPServer(("127.0.0.1", ARGS.port), Handler).serve_forever()
