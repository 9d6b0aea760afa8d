#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian 12 machine (run as root).
#
# Idempotent and fast when everything is already present:
#   - apt packages: libiscsi-bin libiscsi-dev tgt, DPDK (dpdk libdpdk-dev libclang-dev),
#     iproute2 ethtool + the (minimal) build deps of fio
#     (`apt-get update` runs once, only when a package is missing)
#   - fio built from Debian's source package WITH the libiscsi engine, installed as
#     .deps/bin/fio (the system fio, if any, is left alone)
#   - checks that the Rust toolchain (cargo) is available
#
# Quiet on success; on failure it prints the log of the failing step.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEPS_DIR="${REPO_ROOT}/.deps"
FIO_BIN="${DEPS_DIR}/bin/fio"
LOG_DIR="${DEPS_DIR}/logs"

mkdir -p "${LOG_DIR}"

die() {
    echo "deps.sh: ERROR: $*" >&2
    exit 1
}

# run LOGNAME CMD...: run quietly, dump the log and fail on error.
run() {
    local name="$1"
    shift
    local log="${LOG_DIR}/${name}.log"
    if ! "$@" >"${log}" 2>&1; then
        echo "deps.sh: step '${name}' failed: $*" >&2
        echo "----- ${log} (last 80 lines) -----" >&2
        tail -n 80 "${log}" >&2
        echo "-----" >&2
        exit 1
    fi
}

# ---------------------------------------------------------------- rust toolchain
if [[ -d "${HOME:-/root}/.cargo/bin" ]]; then
    PATH="${HOME:-/root}/.cargo/bin:${PATH}"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found in PATH: install the Rust toolchain (https://rustup.rs) first"

# ---------------------------------------------------------------- apt packages
APT_PACKAGES=(
    libiscsi-bin libiscsi-dev tgt
    # the DPDK transport (cargo feature `dpdk`): DPDK 22.11, bindgen's libclang, and what
    # the end-to-end tests use to build their network namespaces
    dpdk libdpdk-dev libclang-dev iproute2 ethtool
    # fio build deps (only what the libiscsi build needs)
    build-essential pkg-config dpkg-dev zlib1g-dev libaio-dev
    # the benchmark charts; systemd-analyze for the unit files' check
    python3-matplotlib systemd
)

if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
else
    SUDO=()
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("${p}")
    fi
done

apt_updated=0
apt_update_once() {
    if [[ "${apt_updated}" -eq 0 ]]; then
        run apt-update "${SUDO[@]}" apt-get update
        apt_updated=1
    fi
}

if [[ "${#missing[@]}" -gt 0 ]]; then
    apt_update_once
    run apt-install "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

# ---------------------------------------------------------------- fio with libiscsi
fio_ok() {
    [[ -x "${FIO_BIN}" ]] && "${FIO_BIN}" --enghelp 2>/dev/null | grep -qw libiscsi
}

# Make sure apt has deb-src entries (deb822 sources on Debian 12). Returns 0 if
# something was added.
enable_deb_src() {
    local f="/etc/apt/sources.list.d/debian.sources"
    local added=0
    if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 1
    fi
    if [[ -f "${f}" ]]; then
        # Append a deb-src twin of every "Types: deb" stanza.
        local src
        src="$(awk '
            BEGIN { RS=""; ORS="\n\n" }
            /(^|\n)Types:[ \t]*deb([ \t]|\n|$)/ {
                sub(/(^|\n)Types:[^\n]*/, "\nTypes: deb-src"); sub(/^\n/, ""); print
            }' "${f}")"
        if [[ -n "${src}" ]]; then
            printf '\n# deb-src added by iscsi-tgt scripts/deps.sh\n%s\n' "${src}" |
                "${SUDO[@]}" tee -a "${f}" >/dev/null
            added=1
        fi
    fi
    if [[ "${added}" -eq 0 && -f /etc/apt/sources.list ]]; then
        local lines
        lines="$(sed -n 's/^deb \(.*\)$/deb-src \1/p' /etc/apt/sources.list)"
        if [[ -n "${lines}" ]]; then
            printf '%s\n' "${lines}" | "${SUDO[@]}" tee -a /etc/apt/sources.list >/dev/null
            added=1
        fi
    fi
    [[ "${added}" -eq 1 ]] || die "could not find any deb source to mirror as deb-src"
    return 0
}

build_fio() {
    local src_root="${DEPS_DIR}/src"
    if enable_deb_src; then
        apt_updated=0
    fi
    # apt-get source needs the deb-src indexes: refresh if they are not there yet.
    if [[ -z "$(apt-cache showsrc fio 2>/dev/null)" ]]; then
        apt_update_once
    fi

    rm -rf "${src_root}"
    mkdir -p "${src_root}"
    # apt-get source drops privileges to _apt when it can; make the dir writable.
    chmod 0777 "${src_root}"
    (cd "${src_root}" && run apt-source apt-get source --download-only fio)
    local dsc
    dsc="$(find "${src_root}" -maxdepth 1 -name 'fio_*.dsc' | head -n 1)"
    [[ -n "${dsc}" ]] || die "apt-get source fio did not download a .dsc"
    (cd "${src_root}" && run dpkg-source dpkg-source -x "${dsc}" fio-src)
    local dir="${src_root}/fio-src"
    (cd "${dir}" && run fio-configure ./configure --enable-libiscsi --disable-native)
    grep -qE '^CONFIG_LIBISCSI=y' "${dir}/config-host.mak" ||
        die "fio configure did not enable libiscsi (see ${LOG_DIR}/fio-configure.log)"
    (cd "${dir}" && run fio-make make -j"$(nproc 2>/dev/null || echo 2)")
    mkdir -p "${DEPS_DIR}/bin"
    install -m 0755 "${dir}/fio" "${FIO_BIN}.tmp"
    mv -f "${FIO_BIN}.tmp" "${FIO_BIN}"
}

if ! fio_ok; then
    echo "deps.sh: building fio with the libiscsi engine into ${FIO_BIN} (about a minute)" >&2
    build_fio
    fio_ok || die "${FIO_BIN} was built but does not list the libiscsi engine"
fi

# ---------------------------------------------------------------- cargo-fuzz
# The fuzz targets in fuzz/ (scripts/fuzz.sh) run under cargo-fuzz.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "deps.sh: installing cargo-fuzz (a few minutes)" >&2
    run cargo-fuzz cargo install --locked cargo-fuzz
fi

# ---------------------------------------------------------------- final checks
for tool in iscsi-ls iscsi-inq iscsi-test-cu tgtd tgtadm; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found after installing packages"
done
