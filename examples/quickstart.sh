#!/usr/bin/env bash
# drover quickstart: deploy a demo service to 3 local "hosts" from a Git repo, promote a new
# version with a commit, then promote a broken version and watch it roll back by itself.
#
#   examples/quickstart.sh [--keep]
#
# Each "host" is a drover-agent process with its own config, state dir, install root and app
# port, all on this machine. Everything lives in a temporary directory, removed at the end
# (unless --keep). Needs: cargo, git, python3 (for a static artifact server), curl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo_root=$(cd "$here/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/drover-target}
keep=${1:-}
hosts=(host-1 host-2 host-3)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

say "building drover-agent and the demo service"
(cd "$repo_root" && cargo build -q -p drover-agent -p drover-example-hello)
agent="$CARGO_TARGET_DIR/debug/drover-agent"

work=$(mktemp -d /tmp/drover-quickstart.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # The apps run detached from the agents (an agent restart never stops them): stop them too.
  for f in "$work"/hosts/*/state/run/*.pid; do
    [ -f "$f" ] && kill -TERM -- "-$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")" 2>/dev/null || true
  done
  if [ "$keep" = "--keep" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "packaging hello 1.0.0, 2.0.0 and a broken 3.0.0"
mkdir -p "$work/artifacts"
sha1=$("$here/hello/package.sh" 1.0.0 "$work/artifacts")
sha2=$("$here/hello/package.sh" 2.0.0 "$work/artifacts")
sha3=$("$here/hello/package.sh" 3.0.0 "$work/artifacts" --broken)
art_port=$(free_port)
python3 -m http.server "$art_port" --bind 127.0.0.1 --directory "$work/artifacts" >"$work/artifacts.log" 2>&1 &
pids+=($!)
echo "artifact server on http://127.0.0.1:$art_port/"

say "creating the desired-state repo $work/fleet (hello pinned at 1.0.0)"
export GIT_CONFIG_GLOBAL=/dev/null GIT_AUTHOR_NAME=quickstart GIT_AUTHOR_EMAIL=qs@example.com \
  GIT_COMMITTER_NAME=quickstart GIT_COMMITTER_EMAIL=qs@example.com
git init -q -b main "$work/fleet"
cp -r "$here/fleet/services" "$here/fleet/environments" "$work/fleet/"
promote() { # VERSION SHA256 MESSAGE
  sed -i -E "s/hello: \{ version: [^,]+, sha256: [0-9a-fA-FA-Z]+ \}/hello: { version: $1, sha256: $2 }/" "$work/fleet/environments/demo.yaml"
  git -C "$work/fleet" add -A && git -C "$work/fleet" commit -q -m "$3"
  echo "committed: $3 ($(git -C "$work/fleet" rev-parse --short HEAD))"
}
promote 1.0.0 "$sha1" "hello 1.0.0"
"$agent" validate "$work/fleet" --var port --var artifact_port --var hosts_dir

say "starting 3 agents (hosts) watching the repo"
for h in "${hosts[@]}"; do
  d="$work/hosts/$h"; mkdir -p "$d"
  port=$(free_port)
  cat >"$d/agent.yaml" <<CFG
host: $h
environment: demo
vars: { port: "$port", artifact_port: "$art_port", hosts_dir: "$work/hosts" }
repo: { url: "$work/fleet", branch: main, poll_interval: 30s }
state_dir: $d/state
service_manager: process
CFG
  echo "$port" > "$d/port"
  "$agent" --config "$d/agent.yaml" run >"$d/agent.log" 2>&1 &
  pids+=($!)
  echo "$h: app port $port, log $d/agent.log"
done

versions() { for h in "${hosts[@]}"; do printf '%s=%s ' "$h" "$(curl -fsS "http://127.0.0.1:$(cat "$work/hosts/$h/port")/version" 2>/dev/null || echo down)"; done; echo; }
wait_for() { # DESCRIPTION CHECK-COMMAND
  local t0=$SECONDS
  until eval "$2"; do
    if (( SECONDS - t0 > 60 )); then echo "timed out waiting for $1"; tail -n 20 "$work"/hosts/*/agent.log; exit 1; fi
    sleep 0.2
  done
  echo "$1 after $((SECONDS - t0))s"
}
all_current() { for h in "${hosts[@]}"; do "$agent" --config "$work/hosts/$h/agent.yaml" status --json | python3 -c "import json,sys; s=json.load(sys.stdin)['services'].get('hello',{}); sys.exit(0 if s.get('current')=='$1' and not s.get('deploying') and (('$2'=='') or (s.get('failed') or {}).get('version')=='$2') else 1)" || return 1; done; }

wait_for "all hosts run 1.0.0" "all_current 1.0.0 ''"
versions

say "promoting 2.0.0 with a commit"
promote 2.0.0 "$sha2" "hello 2.0.0"
wait_for "all hosts run 2.0.0" "all_current 2.0.0 ''"
versions

say "promoting a broken 3.0.0 (its health check fails)"
promote 3.0.0 "$sha3" "hello 3.0.0 (broken)"
wait_for "every host tried 3.0.0 and rolled back to 2.0.0" "all_current 2.0.0 3.0.0"
versions

say "what the agents recorded"
"$agent" --config "$work/hosts/host-1/agent.yaml" status
echo
echo "host-1 events:"
python3 - "$work/hosts/host-1/state/events.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    print(f"  {e['at'][11:23]}  {e['version']:<6} {e['phase']:<12} {(e.get('detail') or '')[:90]}")
PY
say "done: 1.0.0 → 2.0.0 promoted by commit; broken 3.0.0 rolled back automatically on every host"
