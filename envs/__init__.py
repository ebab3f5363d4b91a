"""ManiSkill3 tasks of the vla-razor study (pick can, open / close top drawer) and helpers.

`make_task` builds a gymnasium env with obs {"image", "state"}; `envs.torchrl_adapter` wraps it
for TorchRL collectors; `envs.placement` plans object placements without importing a simulator.
"""

from envs.registry import STATE_DIM, STATE_LAYOUT, TASKS, make_task, placement_box

__all__ = ["STATE_DIM", "STATE_LAYOUT", "TASKS", "make_task", "placement_box"]
