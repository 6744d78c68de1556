#!/usr/bin/env bash
# The test suite RUNS times in a row (default 3), each core kept busy by a busy
# loop all the while: a test that depends on timing fails here before it fails
# in CI. Extra arguments go to pytest.
#
#   bash tools/test_under_load.sh [RUNS] [PYTEST ARGS...]     (make test-loaded)
set -euo pipefail
runs=${1:-3}
shift || true
python=${PYTHON:-.venv/bin/python}
burners=()
for _ in $(seq "$(nproc)"); do
    (while :; do :; done) &
    burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null || true' EXIT
for run in $(seq "$runs"); do
    echo "== run $run of $runs, with $(nproc) busy loops beside it ($(date +%H:%M:%S))"
    "$python" -m pytest -q -p no:cacheprovider "$@"
done
echo "== $runs runs passed ($(date +%H:%M:%S))"
