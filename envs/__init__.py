"""Tasks of the vla-razor study and helpers: embedded ManiSkill3 tasks (pick can, open / close top drawer) and
SimplerEnv's Google-robot tasks (`envs.simpler`, pick coke can, open / close drawer).

`make_task` builds a gymnasium env with obs {"image", "state"}; `envs.torchrl_adapter` wraps it
for TorchRL collectors; `envs.placement` plans object placements without importing a simulator.
"""

from envs.registry import (
    STATE_DIM,
    STATE_LAYOUT,
    TASKS,
    known_tasks,
    make_task,
    placement_box,
    state_layout,
    task_instruction,
)

__all__ = ["STATE_DIM", "STATE_LAYOUT", "TASKS", "known_tasks", "make_task", "placement_box", "state_layout",
           "task_instruction"]
