"""Close the cabinet's open top drawer with a Panda (ManiSkill3 task)."""

from __future__ import annotations

from mani_skill.utils.registration import register_env

from envs.drawer_scene import DrawerSceneEnv

CLOSE_DRAWER_ID = "VlaRazorCloseDrawer-v1"


@register_env(CLOSE_DRAWER_ID, max_episode_steps=100)
class CloseDrawerEnv(DrawerSceneEnv):
    """**Task:** push the open top drawer of the cabinet closed ("close top drawer").

    **Randomizations:**
    - the cabinet's table (x, y) is uniform in `cabinet_x_range` × `cabinet_y_range`, or exactly
      `options["obj_init_xy"]` when the reset passes it; its front always faces the robot;
    - the top drawer starts `drawer_init_qpos` (0.20 m) open;
    - the Panda starts retracted (`robot_start_qpos`) plus N(0, `robot_init_qpos_noise`) joint noise.

    **Success:** the top drawer is open at most `close_success_qpos` (0.05 m, SimplerEnv's
    close-drawer threshold).
    """

    instruction = "close top drawer"
    drawer_init_qpos = 0.20
    close_success_qpos = 0.05

    def evaluate(self):
        opening = self.drawer_qpos()
        return dict(success=opening <= self.close_success_qpos, drawer_qpos=opening)
