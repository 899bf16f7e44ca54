#!/usr/bin/env bash
# A Ray head on this machine, its dashboard (and so the job server `raysight` talks to) on 127.0.0.1 only.
#
#   cluster/local.sh [NUM_CPUS]   start it (NUM_CPUS defaults to the machine's cores); prints the RAY_ADDRESS to export
#   cluster/local.sh stop         stop it (`ray stop`: every Ray process of this machine, as Ray has no per-head stop)
#
# Run it with the environment that has raysight installed on PATH (e.g. an activated .venv): the head's workers and
# every job's `python` are that environment's. Ports: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265).
set -euo pipefail

RAY=${RAY:-ray}
if ! command -v "$RAY" >/dev/null 2>&1; then
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    RAY="$here/../.venv/bin/ray"  # the repository's virtualenv, when not activated
fi
if ! command -v "$RAY" >/dev/null 2>&1; then
    echo "local.sh: no 'ray' on PATH: activate the environment with raysight[ray] installed, or set RAY=/path/to/ray" >&2
    exit 2
fi
# Jobs run `python SCRIPT`: make that the python of the environment that holds this ray (and raysight).
PATH="$(cd "$(dirname "$(command -v "$RAY")")" && pwd):$PATH"
export PATH

PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}

if [[ "${1:-}" == "stop" ]]; then
    exec "$RAY" stop
fi

NUM_CPUS=${1:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}
"$RAY" start --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --include-dashboard=true --num-cpus="$NUM_CPUS" --disable-usage-stats

cat <<MSG

Ray head running. For \`raysight submit/jobs/logs/stop\` (and \`ray job\`):
    export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
Scripts that call ray.init() on this machine find the head by themselves (leave RAY_ADDRESS unset for them, or
pass --address 127.0.0.1:$PORT). Stop it with: cluster/local.sh stop
MSG
