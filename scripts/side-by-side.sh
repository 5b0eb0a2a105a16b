#!/usr/bin/env bash
# Runs the commands given as arguments side by side (each through `bash -c`) and waits for all of
# them. The test suites spend much of their time waiting on the processes they start (services,
# Redis, containers), so together they take little longer than the longest alone. Each command's
# output is kept apart and printed, in the order given, with its seconds, once all have ended; the
# exit status is 1 when any command failed.
set -uo pipefail
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for i in $(seq 1 $#); do
    (
        start=$(date +%s)
        bash -c "${!i}" > "$logs/$i.log" 2>&1
        echo $? > "$logs/$i.rc"
        echo $(( $(date +%s) - start )) > "$logs/$i.s"
    ) &
done
wait
status=0
for i in $(seq 1 $#); do
    rc=$(cat "$logs/$i.rc")
    echo "== ${!i}: exit $rc after $(cat "$logs/$i.s")s"
    cat "$logs/$i.log"
    [ "$rc" = 0 ] || status=1
done
exit $status
