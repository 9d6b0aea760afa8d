#!/usr/bin/env bash
# Harness self-check only: a stand-in for the iscsi-tgt binary built on tgtd.
#
#   ISCSI_TGT_BIN=$PWD/scripts/tgtd-as-iscsi-tgt.sh cargo test -p e2e --test discovery
#
# Accepts `--listen ADDR:PORT` (other options are ignored), serves
# iqn.2026-11.io.iscsi-tgt:default with a 64 MiB file-backed disk. Differences
# from iscsi-tgt: tgtd puts a controller on LUN 0 and the disk on LUN 1, so
# tests asserting on LUN 0 fail by design. Exits 0 on SIGTERM/SIGINT.
# The portal is added only after the target is configured, so "port accepts
# connections" means "ready", as with iscsi-tgt.
set -euo pipefail

listen=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --listen)
        listen="$2"
        shift 2
        ;;
    *) shift ;;
    esac
done
[[ -n "${listen}" ]] || { echo "usage: $0 --listen ADDR:PORT" >&2; exit 2; }
port="${listen##*:}"
ctl=$((port % 30000 + 100)) # tgtd control socket number, unique per port
truncate -s 64M lun.img
# tgtd needs some portal at startup: use port+1 until the real one is added.
tgtd -f --iscsi portal="127.0.0.1:$((port + 1))" -C "${ctl}" &
pid=$!
trap 'kill -9 "${pid}"; wait "${pid}" || true; exit 0' TERM INT
adm() { tgtadm -C "${ctl}" --lld iscsi "$@"; }
for _ in $(seq 50); do
    adm --op show --mode target >/dev/null 2>&1 && break
    sleep 0.1
done
adm --op new --mode target --tid 1 -T iqn.2026-11.io.iscsi-tgt:default
adm --op new --mode logicalunit --tid 1 --lun 1 -b "${PWD}/lun.img"
adm --op bind --mode target --tid 1 -I ALL
adm --op new --mode portal --param portal="${listen}"
echo "tgtd ready on ${listen}"
wait "${pid}"
