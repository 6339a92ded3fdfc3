#!/usr/bin/env bash
# Create (or update) the process work pool the deployments and the EC2 workers share.
# Run once per Prefect server/workspace, from anywhere PREFECT_API_URL points at it:
#
#     PREFECT_API_URL=http://prefect.internal.example:4200/api deployments/create-work-pool.sh
#
# The pool name: $1, else PREFECT_DEFAULT_WORK_POOL_NAME, else prefect.toml's default.
set -euo pipefail
cd "$(dirname "$0")/.."
POOL="${1:-${PREFECT_DEFAULT_WORK_POOL_NAME:-$(sed -n 's/^default_work_pool_name *= *"\([^"]*\)".*/\1/p' prefect.toml)}}"
if [ -z "$POOL" ]; then
  echo "error: no pool name (argument, PREFECT_DEFAULT_WORK_POOL_NAME or prefect.toml)" >&2
  exit 2
fi
PREFECT="${PREFECT:-prefect}"
"$PREFECT" work-pool create "$POOL" --type process --overwrite
echo "work pool $POOL ready; start a worker with: prefect worker start --pool $POOL"
