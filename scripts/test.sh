#!/usr/bin/env bash
# THE test suite: dependencies, release build of the whole workspace, all unit
# tests and the end-to-end tests (tests/, crate `e2e`).
#
#   sudo scripts/test.sh        (or as root; CI: .ci/run)
#
# Exits non-zero if any step fails; prints a summary at the end.
# Logs: target/test-logs/, e2e artifacts: target/e2e/.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${REPO_ROOT}"

if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    PATH="${HOME:-/root}/.cargo/bin:${PATH}"
fi

LOG_DIR="${REPO_ROOT}/target/test-logs"
mkdir -p "${LOG_DIR}"

# Overall budget: the suite must stay well under 40 min on 2 cores.
STEP_TIMEOUT_BUILD="${STEP_TIMEOUT_BUILD:-1500}" # seconds
STEP_TIMEOUT_TEST="${STEP_TIMEOUT_TEST:-1500}"   # seconds

declare -a SUMMARY=()
overall=0
suite_start=${SECONDS}

# step NAME TIMEOUT CMD...: run a step, tee its output to a log, record the result.
step() {
    local name="$1" limit="$2"
    shift 2
    local log="${LOG_DIR}/${name}.log"
    local start=${SECONDS} rc=0
    echo "==> ${name}: $*"
    set +e
    timeout --kill-after=30 "${limit}" "$@" 2>&1 | tee "${log}"
    rc=${PIPESTATUS[0]}
    set -e
    local took=$((SECONDS - start))
    if [[ ${rc} -eq 0 ]]; then
        SUMMARY+=("PASS  ${name} (${took}s)")
    else
        [[ ${rc} -eq 124 ]] && echo "==> ${name}: TIMED OUT after ${limit}s"
        SUMMARY+=("FAIL  ${name} (${took}s, exit ${rc}, log ${log})")
        overall=1
    fi
    return "${rc}"
}

# shellcheck disable=SC2317  # invoked via trap
print_summary() {
    echo
    echo "==================== test summary ===================="
    local line
    for line in "${SUMMARY[@]}"; do
        echo "  ${line}"
    done
    if [[ -f "${LOG_DIR}/cargo-test.log" ]]; then
        local passed=0 failed=0 ignored=0 n
        while read -r n; do passed=$((passed + n)); done < <(sed -n 's/^test result: .* \([0-9]\+\) passed;.*/\1/p' "${LOG_DIR}/cargo-test.log")
        while read -r n; do failed=$((failed + n)); done < <(sed -n 's/^test result: .*; \([0-9]\+\) failed;.*/\1/p' "${LOG_DIR}/cargo-test.log")
        while read -r n; do ignored=$((ignored + n)); done < <(sed -n 's/^test result: .*; \([0-9]\+\) ignored;.*/\1/p' "${LOG_DIR}/cargo-test.log")
        echo "  rust tests: ${passed} passed, ${failed} failed, ${ignored} ignored"
        local failing
        failing="$(awk '/^failures:$/ { f = 1; next } /^$/ { f = 0 } f && /^    [^ ]/ { print "    " $1 }' "${LOG_DIR}/cargo-test.log")"
        if [[ -n "${failing}" ]]; then
            echo "  failing tests:"
            echo "${failing}"
        fi
        # Compliance (iscsi-test-cu) one-liner, printed by tests/tests/compliance.rs.
        grep -E '^iscsi-test-cu \([a-z0-9-]+\): [0-9]+ tests' "${LOG_DIR}/cargo-test.log" | sed 's/^/  /' || true
    fi
    if [[ -f "${LOG_DIR}/fuzz.log" ]]; then
        grep -E '^fuzz [a-z_]+: ' "${LOG_DIR}/fuzz.log" | sed 's/^/  /' || true
    fi
    echo "  total time: $((SECONDS - suite_start))s"
    if [[ ${overall} -eq 0 ]]; then
        echo "  RESULT: PASS"
    else
        echo "  RESULT: FAIL"
    fi
    echo "======================================================"
}
trap print_summary EXIT

if ! step deps 1800 "${REPO_ROOT}/scripts/deps.sh"; then
    exit 1
fi
# Everything is built with the DPDK transport: the DPDK unit tests (DPDK_TESTS=1) and the
# end-to-end tests over DPDK must run, not skip (E2E_REQUIRE_DPDK=1).
export DPDK_TESTS=1 E2E_REQUIRE_DPDK=1
if ! step cargo-build "${STEP_TIMEOUT_BUILD}" \
    cargo build --release --workspace --all-targets --features dpdk; then
    exit 1
fi
# Unit tests of every crate, then the e2e crate's integration tests against the
# freshly built target/release/iscsi-tgt. --no-fail-fast: report everything.
# The e2e raw-socket sessions leave what they sent in target/fuzz-seeds (the fuzz corpus).
rm -rf "${REPO_ROOT}/target/fuzz-seeds"
export FUZZ_SEED_DIR="${REPO_ROOT}/target/fuzz-seeds"
step cargo-test "${STEP_TIMEOUT_TEST}" \
    cargo test --release --workspace --features dpdk --no-fail-fast -- --nocapture || true
# A short bounded run of every fuzz target (a crash fails the suite).
step fuzz 1200 "${REPO_ROOT}/scripts/fuzz.sh" "${FUZZ_SECONDS:-15}" || true

exit "${overall}"
