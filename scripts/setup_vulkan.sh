#!/usr/bin/env bash
# Make a Vulkan device usable by SAPIEN (ManiSkill3) on a CPU-only Debian 12 machine.
#
# Why: SAPIEN needs Vulkan even for state-only envs. Debian 12's own Mesa 22.3 lavapipe is rejected
# (it lacks descriptorBindingPartiallyBound); Mesa from bookworm-backports works. We add the
# backports suite on the SAME mirror URI that the system's debian.sources already uses, so no host
# name lives in this repository.
#
# Idempotent: exits at once when a usable device already exists (checked by envs.vulkan, or by
# the bare SAPIEN probe when the repo is not importable). Needs root (apt).
set -euo pipefail

PYTHON="${PYTHON:-python}"
SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS=/etc/apt/sources.list.d/vla-razor-bookworm-backports.sources
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

vulkan_usable() {
    (cd "$REPO_ROOT" && "$PYTHON" -c "import envs.vulkan as v; v.require_vulkan()") >/dev/null 2>&1
}

sapien_installed() {
    "$PYTHON" -c "import sapien" >/dev/null 2>&1
}

backports_mesa_installed() {
    dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q "bpo"
}

if vulkan_usable; then
    echo "setup_vulkan: a usable Vulkan device already exists; nothing to do."
    exit 0
fi
if ! sapien_installed && backports_mesa_installed; then
    echo "setup_vulkan: backports Mesa is already installed (SAPIEN is not, so it was not probed)."
    exit 0
fi

if [ ! -f "$SOURCES" ]; then
    echo "setup_vulkan: $SOURCES not found; add a bookworm-backports apt source by hand, then run" \
         "apt-get install -y -t bookworm-backports mesa-vulkan-drivers" >&2
    exit 1
fi

# First URI of the stanza whose Suites include plain 'bookworm' (the main archive, not -security).
MIRROR_URI="$(awk '
    /^URIs:/   { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }
' "$SOURCES")"
if [ -z "$MIRROR_URI" ]; then
    echo "setup_vulkan: no 'bookworm' suite found in $SOURCES; cannot derive the mirror URI." >&2
    exit 1
fi

if [ ! -f "$BACKPORTS" ]; then
    cat > "$BACKPORTS" <<SRC
Types: deb
URIs: $MIRROR_URI
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q -t bookworm-backports mesa-vulkan-drivers

if vulkan_usable; then
    echo "setup_vulkan: Vulkan device is usable now."
elif ! sapien_installed; then
    echo "setup_vulkan: installed backports Mesa; SAPIEN is not installed yet, so it was not probed" \
         "(pip install -e '.[sim]', then rerun this script to check)."
else
    echo "setup_vulkan: installed backports Mesa but SAPIEN still finds no usable Vulkan device;" \
         "check 'python -c \"import envs.vulkan as v; v.require_vulkan()\"' for the reason." >&2
    exit 1
fi
