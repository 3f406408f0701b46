#!/usr/bin/env bash
# drover quickstart: a coordinator and 5 local "hosts" deploy a demo service from a Git repo.
# A commit promotes a version; an approver approves it from the CLI; hosts deploy 2 at a time;
# `git revert` of a promotion brings the fleet back (no approval: that version succeeded
# here before); a broken version halts the rollout after the first batch and the upgraded
# hosts revert.
#
#   examples/quickstart.sh [--keep]
#
# Each "host" is a drover-agent process with its own config, state dir, install root and app
# port, all on this machine; the coordinator keeps its state in one SQLite file. Everything
# lives in a temporary directory, removed at the end (unless --keep).
# Needs: cargo, git, python3 (a static artifact server), curl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo_root=$(cd "$here/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/drover-target}
keep=${1:-}
hosts=(host-1 host-2 host-3 host-4 host-5)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

say "building drover-agent, drover-coordinator, drover and the demo service"
(cd "$repo_root" && cargo build -q -p drover-agent -p drover-coordinator -p drover-example-hello)
bin="$CARGO_TARGET_DIR/debug"

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

say "packaging hello 1.0.0, 2.0.0, and 3.0.0 — a build that fails its health check on host-3..5"
mkdir -p "$work/artifacts"
sha1=$("$here/hello/package.sh" 1.0.0 "$work/artifacts")
sha2=$("$here/hello/package.sh" 2.0.0 "$work/artifacts")
sha3=$("$here/hello/package.sh" 3.0.0 "$work/artifacts" --broken-on host-3,host-4,host-5)
art_port=$(free_port)
python3 -m http.server "$art_port" --bind 127.0.0.1 --directory "$work/artifacts" >"$work/artifacts.log" 2>&1 &
pids+=($!)
echo "artifact server on http://127.0.0.1:$art_port/"

say "creating the desired-state repo $work/fleet"
export GIT_CONFIG_GLOBAL=/dev/null GIT_AUTHOR_NAME=quickstart GIT_AUTHOR_EMAIL=qs@example.com \
  GIT_COMMITTER_NAME=quickstart GIT_COMMITTER_EMAIL=qs@example.com
git init -q -b main "$work/fleet"
cp -r "$here/fleet/services" "$here/fleet/environments" "$work/fleet/"
promote() { # VERSION SHA256 MESSAGE
  sed -i -E "s/hello: \{ version: [^,]+, sha256: [0-9a-zA-Z]+ \}/hello: { version: $1, sha256: $2 }/" "$work/fleet/environments/prod.yaml"
  git -C "$work/fleet" add -A && git -C "$work/fleet" commit -q -m "$3"
  echo "committed: $3 ($(git -C "$work/fleet" rev-parse --short HEAD))"
}
promote 1.0.0 "$sha1" "hello 1.0.0"
"$bin/drover-agent" validate "$work/fleet" --var port --var artifact_port --var hosts_dir

say "starting the coordinator (SQLite store $work/coordinator.db); it reads the repo itself"
mkdir -p "$work/tokens"
chmod 700 "$work/tokens"
old_umask=$(umask); umask 077   # token files: readable by their owner only
coord_port=$(free_port)
head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/tokens/alice"
hash() { "$bin/drover-coordinator" hash-token < "$work/tokens/$1" | cut -d' ' -f2; }
cat >"$work/coordinator.yaml" <<CFG
listen: 127.0.0.1:$coord_port
store: { sqlite: $work/coordinator.db }
repo: { url: "$work/fleet", branch: main, poll_interval: 3s }
lease_ttl: 30s
heartbeat_interval: 1s
tokens:
  - { name: alice, role: approver, groups: [release-managers], sha256: $(hash alice) }
CFG
# Each host its own agent token, bound to its name: it can lease and report only as itself.
for h in "${hosts[@]}"; do
  "$bin/drover-coordinator" enroll "$h" > "$work/tokens/$h.enroll"
  grep -v '^#' "$work/tokens/$h.enroll" | head -n 1 > "$work/tokens/$h"
  grep '^  - ' "$work/tokens/$h.enroll" >> "$work/coordinator.yaml"
  rm "$work/tokens/$h.enroll"
done
umask "$old_umask"
"$bin/drover-coordinator" serve --config "$work/coordinator.yaml" >"$work/coordinator.log" 2>&1 &
pids+=($!)
export DROVER_URL="http://127.0.0.1:$coord_port"
drover() { "$bin/drover" --token-file "$work/tokens/alice" "$@"; }
until curl -fsS "$DROVER_URL/healthz" >/dev/null 2>&1; do sleep 0.1; done
echo "coordinator on $DROVER_URL (alice may approve for release-managers)"

say "starting 5 agents (hosts); host-1 and host-2 watch the repo, host-3..5 poll it every 3s"
for h in "${hosts[@]}"; do
  d="$work/hosts/$h"; mkdir -p "$d"
  port=$(free_port)
  case $h in host-1|host-2) url="$work/fleet" ;; *) url="file://$work/fleet" ;; esac
  cat >"$d/agent.yaml" <<CFG
host: $h
environment: prod
vars: { port: "$port", artifact_port: "$art_port", hosts_dir: "$work/hosts" }
repo: { url: "$url", branch: main, poll_interval: 3s }
state_dir: $d/state
service_manager: process
coordinator: { url: "$DROVER_URL", token_file: "$work/tokens/$h", heartbeat_interval: 1s }
CFG
  echo "$port" > "$d/port"
  "$bin/drover-agent" --config "$d/agent.yaml" run >"$d/agent.log" 2>&1 &
  pids+=($!)
done

versions() { for h in "${hosts[@]}"; do printf '%s=%s ' "$h" "$(curl -fsS "http://127.0.0.1:$(cat "$work/hosts/$h/port")/version" 2>/dev/null || echo -)"; done; echo; }
wait_for() { # DESCRIPTION CHECK-COMMAND
  local t0=$SECONDS
  until eval "$2"; do
    if (( SECONDS - t0 > 90 )); then echo "timed out waiting for $1"; tail -n 20 "$work"/hosts/*/agent.log "$work/coordinator.log"; exit 1; fi
    sleep 0.2
  done
  echo "$1 ($((SECONDS - t0))s)"
}
rollout_state() { drover status --json | python3 -c "import json,sys; rs=[r for r in json.load(sys.stdin)['rollouts'] if r['version']=='$1']; print(rs[-1]['state'] if rs else '-')"; }
all_current() { for h in "${hosts[@]}"; do "$bin/drover-agent" --config "$work/hosts/$h/agent.yaml" status --json | python3 -c "import json,sys; s=json.load(sys.stdin)['services'].get('hello',{}); sys.exit(0 if s.get('current')=='$1' and not s.get('deploying') else 1)" || return 1; done; }
approve() { # VERSION
  wait_for "the coordinator holds $1 for approval" "[ \"\$(rollout_state $1)\" = APPROVAL_REQUIRED ]"
  echo "no host moved yet: $(versions)"
  echo "\$ drover approve prod hello $1"
  drover approve prod hello "$1"
}

approve 1.0.0
wait_for "all 5 hosts run 1.0.0" "all_current 1.0.0"
wait_for "the coordinator confirms it: 1.0.0 SUCCESS (every host reported it healthy)" "[ \"\$(rollout_state 1.0.0)\" = SUCCESS ]"
versions

say "promoting 2.0.0 with a commit"
promote 2.0.0 "$sha2" "hello 2.0.0"
two=$(git -C "$work/fleet" rev-parse HEAD)
approve 2.0.0
wait_for "all 5 hosts run 2.0.0, 2 at a time" "all_current 2.0.0"
wait_for "the coordinator confirms it: 2.0.0 SUCCESS" "[ \"\$(rollout_state 2.0.0)\" = SUCCESS ]"
versions

say "2.0.0 passed its checks, but users complain: undo it with git revert"
echo "\$ git revert $(git -C "$work/fleet" rev-parse --short "$two")"
git -C "$work/fleet" revert --no-edit "$two" >/dev/null
echo "1.0.0 succeeded in prod before: a rollback, no approval; still 2 hosts at a time"
wait_for "all 5 hosts run 1.0.0 again" "all_current 1.0.0"
versions

say "promoting the broken 3.0.0"
promote 3.0.0 "$sha3" "hello 3.0.0"
approve 3.0.0
wait_for "the rollout to halt and roll back" "[ \"\$(rollout_state 3.0.0)\" = ABORTED ]"
wait_for "every host to run 1.0.0 again" "all_current 1.0.0"
versions

say "the coordinator's view"
sleep 2   # one more heartbeat from every host
drover status
echo
echo "audit trail of 3.0.0:"
drover history --limit 200 | grep -E "prod/hello/3.0.0" | sed 's/^/  /'
echo
echo "audit trail of the revert to 1.0.0:"
drover history --limit 200 | grep -E "prod/hello/1.0.0" | tail -n 12 | sed 's/^/  /'
say "done: commits promoted 1.0.0 → 2.0.0 (approved, 2 hosts at a time); git revert brought 1.0.0 back (no approval); broken 3.0.0 halted after the first batch, the upgraded hosts reverted, the rest never ran it"
