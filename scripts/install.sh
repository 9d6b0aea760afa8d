#!/usr/bin/env bash
# Installs the appliance: binaries, setup script, systemd units, an example configuration.
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--no-build]
#   scripts/install.sh --render-units DIR [--prefix DIR]   (units only, e.g. for checks)
#
# Default prefix /usr/local: bin/iscsi-tgt, bin/iscsictl, lib/iscsi-tgt/setup.sh,
# share/doc/iscsi-tgt/README.md; units in /etc/systemd/system; /etc/iscsi-tgt/iscsi-tgt.toml
# and setup.env only when missing (an existing configuration is never overwritten).
# Then: edit /etc/iscsi-tgt/*, `systemctl daemon-reload`, `systemctl enable --now
# iscsi-tgt-setup iscsi-tgt iscsi-tgt-apply`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/usr/local
DESTDIR=""
BUILD=1
RENDER=""

while (($#)); do
    case "$1" in
    --prefix) PREFIX="${2:?}"; shift 2 ;;
    --destdir) DESTDIR="${2:?}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --render-units) RENDER="${2:?}"; shift 2 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

BINDIR="${BINDIR:-${PREFIX}/bin}"
LIBDIR="${LIBDIR:-${PREFIX}/lib/iscsi-tgt}"
DOCDIR="${DOCDIR:-${PREFIX}/share/doc/iscsi-tgt}"

render() {
    local out="$1" f
    mkdir -p "$out"
    for f in "${REPO}"/scripts/systemd/*.service.in "${REPO}"/scripts/systemd/*.timer.in; do
        sed -e "s|@BINDIR@|${BINDIR}|g" -e "s|@LIBDIR@|${LIBDIR}|g" -e "s|@DOCDIR@|${DOCDIR}|g" \
            "$f" >"${out}/$(basename "${f%.in}")"
    done
}

if [[ -n "$RENDER" ]]; then
    render "$RENDER"
    exit 0
fi

if ((BUILD)); then
    (cd "$REPO" && cargo build --release -p dataplane -p control)
fi
install -D -m 0755 "${REPO}/target/release/iscsi-tgt" "${DESTDIR}${BINDIR}/iscsi-tgt"
install -D -m 0755 "${REPO}/target/release/iscsictl" "${DESTDIR}${BINDIR}/iscsictl"
install -D -m 0755 "${REPO}/scripts/setup.sh" "${DESTDIR}${LIBDIR}/setup.sh"
install -D -m 0644 "${REPO}/README.md" "${DESTDIR}${DOCDIR}/README.md"
render "${DESTDIR}/etc/systemd/system"
mkdir -p "${DESTDIR}/etc/iscsi-tgt"
if [[ ! -e "${DESTDIR}/etc/iscsi-tgt/iscsi-tgt.toml" ]]; then
    install -m 0640 "${REPO}/scripts/systemd/iscsi-tgt.example.toml" "${DESTDIR}/etc/iscsi-tgt/iscsi-tgt.toml"
fi
if [[ ! -e "${DESTDIR}/etc/iscsi-tgt/setup.env" ]]; then
    install -m 0644 "${REPO}/scripts/systemd/setup.example.env" "${DESTDIR}/etc/iscsi-tgt/setup.env"
fi
echo "installed under ${DESTDIR:-/}${PREFIX}; units in ${DESTDIR}/etc/systemd/system"
echo "next: edit /etc/iscsi-tgt/iscsi-tgt.toml and setup.env, then"
echo "  systemctl daemon-reload && systemctl enable --now iscsi-tgt-setup iscsi-tgt iscsi-tgt-apply"
echo "  (Prometheus via node_exporter's textfile collector: systemctl enable --now iscsi-tgt-metrics.timer)"
