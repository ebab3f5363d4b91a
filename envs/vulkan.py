"""Check that SAPIEN (ManiSkill3's renderer) finds a usable Vulkan device.

SAPIEN needs Vulkan even for state-only envs. On our CPU machines the device is Mesa's lavapipe, and
Debian 12's stock Mesa is rejected by SAPIEN, so the failure mode is common and its raw message
("failed to find a rendering device") does not say how to fix it. The probe runs in a subprocess
because a bad driver can abort the process instead of raising.
"""

from __future__ import annotations

import functools
import subprocess
import sys

SETUP_HINT = "run `bash scripts/setup_vulkan.sh` (installs Mesa lavapipe from bookworm-backports)"

_PROBE = """
import warnings
warnings.simplefilter("ignore")
import sapien.render
sapien.render.RenderSystem()
print(sapien.render.get_device_summary().splitlines()[0] if sapien.render.get_device_summary() else "")
"""


class VulkanUnavailableError(RuntimeError):
    """No Vulkan device that SAPIEN accepts."""


@functools.lru_cache(maxsize=1)
def vulkan_status() -> tuple[bool, str]:
    """Return (usable, reason). Cached per process; costs one ~1-2 s subprocess the first time."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False, "the SAPIEN Vulkan probe timed out after 120 s"
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"probe exited with code {proc.returncode}"
    return False, last


def vulkan_available() -> bool:
    """True when SAPIEN can create a render system on this machine."""
    return vulkan_status()[0]


def require_vulkan() -> None:
    """Raise a one-line VulkanUnavailableError naming the fix when no usable device exists."""
    usable, reason = vulkan_status()
    if not usable:
        raise VulkanUnavailableError(f"no usable Vulkan device for SAPIEN ({reason}); {SETUP_HINT}")
