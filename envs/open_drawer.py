"""Open the cabinet's top drawer with a Panda (ManiSkill3 task)."""

from __future__ import annotations

from mani_skill.utils.registration import register_env

from envs.drawer_scene import DrawerSceneEnv

OPEN_DRAWER_ID = "VlaRazorOpenDrawer-v1"


@register_env(OPEN_DRAWER_ID, max_episode_steps=100)
class OpenDrawerEnv(DrawerSceneEnv):
    """**Task:** pull the closed top drawer of the cabinet open ("open top drawer").

    **Randomizations:**
    - the cabinet's table (x, y) is uniform in `cabinet_x_range` × `cabinet_y_range`, or exactly
      `options["obj_init_xy"]` when the reset passes it; its front always faces the robot;
    - the Panda starts retracted (`robot_start_qpos`) plus N(0, `robot_init_qpos_noise`) joint noise.

    **Success:** the top drawer is open at least `open_success_qpos` (0.15 m, SimplerEnv's
    open-drawer threshold) of its 0.25 m travel.
    """

    instruction = "open top drawer"
    drawer_init_qpos = 0.0
    open_success_qpos = 0.15

    def evaluate(self):
        opening = self.drawer_qpos()
        return dict(success=opening >= self.open_success_qpos, drawer_qpos=opening)
