#!/usr/bin/env bash
# The benchmark matrix from an initiator host against an appliance, in one command.
#
#   scripts/bench/remote.sh --portal HOST[:PORT] --target IQN [--lun N]
#       [--mode open-iscsi|libiscsi] [--runtime S] [--reps N] [--only CASE,...]
#       [--out DIR] [--baseline DIR/results.json]
#
#   --mode open-iscsi  (default; root, package open-iscsi) discovery (SendTargets) at the
#                      portal, login to the target, fio with libaio on its
#                      /dev/disk/by-path device, logout on exit, whatever happens
#   --mode libiscsi    fio's libiscsi engine straight to the LUN (FIO: a fio built with it,
#                      default .deps/bin/fio from scripts/deps.sh, else fio)
#   --runtime S        seconds per fio run (default 10); --reps N repetitions, medians
#   --only LIST        cases (scripts/bench/jobs/<case>.fio), default all
#   --out DIR          results.md, results.json, chart.png (default ./bench-results)
#   --baseline FILE    an earlier results.json: each median beside it, with the ratio
#
# Writes to the LUN: run it against a LUN whose data does not matter.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
PORTAL=""
IQN=""
LUN=0
MODE=open-iscsi
RUNTIME=10
REPS=3
ONLY=""
OUT="${PWD}/bench-results"
BASELINE=""

die() {
    echo "remote.sh: $*" >&2
    exit 1
}

while (($#)); do
    case "$1" in
    --portal) PORTAL="${2:?}"; shift 2 ;;
    --target) IQN="${2:?}"; shift 2 ;;
    --lun) LUN="${2:?}"; shift 2 ;;
    --mode) MODE="${2:?}"; shift 2 ;;
    --runtime) RUNTIME="${2:?}"; shift 2 ;;
    --reps) REPS="${2:?}"; shift 2 ;;
    --only) ONLY="${2:?}"; shift 2 ;;
    --out) OUT="${2:?}"; shift 2 ;;
    --baseline) BASELINE="${2:?}"; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ -n "$PORTAL" && -n "$IQN" ]] || die "--portal and --target are required (see --help)"
[[ "$PORTAL" == *:* ]] || PORTAL="${PORTAL}:3260"
HOST="${PORTAL%:*}"
PORT="${PORTAL##*:}"
[[ "$LUN" =~ ^[0-9]+$ && "$PORT" =~ ^[0-9]+$ ]] || die "--lun and the port are numbers"

args=(--runtime "$RUNTIME" --reps "$REPS" --out "$OUT" --jobs "${HERE}/jobs"
    --meta "portal=${PORTAL}" "target=${IQN}" "lun=${LUN}" "host=$(hostname)"
    "kernel=$(uname -srm)" "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')")
[[ -n "$ONLY" ]] && args+=(--only "$ONLY")
[[ -n "$BASELINE" ]] && args+=(--baseline "$BASELINE")

case "$MODE" in
libiscsi)
    FIO="${FIO:-}"
    if [[ -z "$FIO" ]]; then
        if [[ -x "${REPO}/.deps/bin/fio" ]]; then FIO="${REPO}/.deps/bin/fio"; else FIO=fio; fi
    fi
    "$FIO" --enghelp 2>/dev/null | grep -qw libiscsi ||
        die "${FIO} has no libiscsi engine (scripts/deps.sh builds one into .deps/bin/fio)"
    url="iscsi\\://${HOST}\\:${PORT}/${IQN//:/\\:}/${LUN}"
    exec python3 "${HERE}/remote.py" --fio "$FIO" --engine libiscsi --target "$url" "${args[@]}"
    ;;
open-iscsi)
    [[ "$(id -u)" -eq 0 ]] || die "open-iscsi mode logs in and out: run as root"
    command -v iscsiadm >/dev/null || die "iscsiadm not found (apt-get install open-iscsi)"
    FIO="${FIO:-fio}"
    logout() {
        iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout >/dev/null 2>&1 || true
    }
    trap logout EXIT
    iscsiadm -m discovery -t sendtargets -p "$PORTAL" | grep -q " ${IQN}$" ||
        die "${IQN} is not among the targets ${PORTAL} offers"
    iscsiadm -m node -T "$IQN" -p "$PORTAL" --login
    dev="/dev/disk/by-path/ip-${PORTAL}-iscsi-${IQN}-lun-${LUN}"
    for _ in $(seq 100); do
        [[ -b "$dev" ]] && break
        sleep 0.1
    done
    [[ -b "$dev" ]] || die "${dev} did not appear after the login"
    echo "remote.sh: ${dev} -> $(readlink -f "$dev")"
    python3 "${HERE}/remote.py" --fio "$FIO" --engine libaio --target "$dev" "${args[@]}"
    ;;
*) die "--mode: open-iscsi or libiscsi" ;;
esac
