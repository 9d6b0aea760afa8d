#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECONDS each (default 20) and prints how many
# inputs each ran. Usage: scripts/fuzz.sh [SECONDS] [TARGET ...]
#
# cargo-fuzz needs the nightly-only sanitizer flags; RUSTC_BOOTSTRAP=1 lets the machine's
# stable toolchain accept them. Corpora: target/fuzz-corpus/<target> (kept between runs), seeded
# from target/fuzz-seeds/<target> (what the e2e raw-socket sessions sent, FUZZ_SEED_DIR)
# and from the configuration files the e2e tests started targets with. A crash stops the
# script with its status; the reproducer is in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(connection pdu_decoder text_keys scsi_device config)
fi
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
mkdir -p target/fuzz-seeds/config
for f in target/e2e/*/config.toml; do
    [ -f "$f" ] && cp "$f" "target/fuzz-seeds/config/$(basename "$(dirname "$f")").toml"
done
for t in "${targets[@]}"; do
    mkdir -p "target/fuzz-corpus/$t"
    dirs=("target/fuzz-corpus/$t")
    [ -d "target/fuzz-seeds/$t" ] && dirs+=("target/fuzz-seeds/$t")
    log="target/fuzz-$t.log"
    if ! cargo fuzz run --fuzz-dir fuzz "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $t FAILED (log $log)"
        exit 1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 || true)
    echo "fuzz $t: ${runs:-?} in ${secs} s (corpus $(ls "target/fuzz-corpus/$t" | wc -l) inputs)"
done
