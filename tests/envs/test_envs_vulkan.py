"""The Vulkan guard's error tells the user how to fix it (no simulator needed)."""

import pytest

from envs import vulkan


def test_missing_vulkan_error_names_the_setup_script(monkeypatch):
    monkeypatch.setattr(vulkan, "vulkan_status", lambda: (False, "RuntimeError: failed to find a rendering device"))
    with pytest.raises(vulkan.VulkanUnavailableError) as err:
        vulkan.require_vulkan()
    message = str(err.value)
    assert "bash scripts/setup_vulkan.sh" in message
    assert "failed to find a rendering device" in message
    assert "\n" not in message


def test_usable_vulkan_passes(monkeypatch):
    monkeypatch.setattr(vulkan, "vulkan_status", lambda: (True, "GPU: llvmpipe"))
    vulkan.require_vulkan()
