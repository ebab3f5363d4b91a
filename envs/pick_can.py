"""Pick a coke-can-sized cylinder off the table with a Panda (ManiSkill3 task)."""

from __future__ import annotations

import numpy as np
import sapien
import torch

from mani_skill.agents.robots import Panda
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.utils.registration import register_env
from mani_skill.utils.scene_builder.table import TableSceneBuilder
from mani_skill.utils.structs.pose import Pose

from envs.task_common import TaskCameraMixin, object_xy_for_reset

PICK_CAN_ID = "VlaRazorPickCan-v1"


@register_env(PICK_CAN_ID, max_episode_steps=40)
class PickCanEnv(TaskCameraMixin, BaseEnv):
    """**Task:** grasp the red can standing on the table and lift it ("pick coke can").

    **Randomizations:**
    - the can's table (x, y) is uniform in `can_x_range` × `can_y_range`, or exactly
      `options["obj_init_xy"]` when the reset passes it (see `envs.placement` for grids);
    - the Panda starts at ManiSkill's table rest pose plus N(0, `robot_init_qpos_noise`) joint noise.

    **Success:** the can's centre is at least `lift_success_height` above its resting height while
    both fingers grasp it.

    Observation extras: `tcp_pose` [7] (xyz + wxyz quaternion, world) and `obj_pos` [3] (can centre,
    world) — the privileged object position a learned policy may use as a state token.
    """

    SUPPORTED_ROBOTS = ["panda"]
    agent: Panda

    instruction = "pick coke can"
    # A 330 ml can: 6.6 cm diameter leaves ~7 mm per side inside the Panda's 8 cm opening.
    can_radius = 0.033
    can_height = 0.12
    can_color = (0.8, 0.05, 0.05, 1.0)
    can_density = 300.0  # kg/m^3; ~0.12 kg, an empty-ish can the gripper lifts without slip
    can_x_range = (-0.10, 0.10)
    can_y_range = (-0.10, 0.10)
    lift_success_height = 0.05
    robot_init_qpos_noise = 0.02
    # Camera to the robot's left, above the table, looking across the placement box: a side view
    # never hides the can under the gripper (a front or top view does at grasp time), and the box
    # plus a lifted can just fill the frame, so the can stays large at 128^2.
    camera_eye = (-0.03, 0.40, 0.40)
    camera_target = (-0.03, 0.0, 0.04)
    camera_fov = 0.85

    def _load_scene(self, options: dict):
        self.table_scene = TableSceneBuilder(self, robot_init_qpos_noise=self.robot_init_qpos_noise)
        self.table_scene.build()
        builder = self.scene.create_actor_builder()
        # SAPIEN cylinders lie along their local x axis: pitch the shape 90 deg to stand the can up.
        upright = sapien.Pose(q=[np.cos(np.pi / 4), 0.0, np.sin(np.pi / 4), 0.0])
        builder.add_cylinder_collision(
            pose=upright, radius=self.can_radius, half_length=self.can_height / 2,
            density=self.can_density,
        )
        builder.add_cylinder_visual(
            pose=upright, radius=self.can_radius, half_length=self.can_height / 2,
            material=sapien.render.RenderMaterial(base_color=list(self.can_color)),
        )
        builder.initial_pose = sapien.Pose(p=[0.0, 0.0, self.can_height / 2])
        self.can = builder.build(name="can")

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        with torch.device(self.device):
            batch = len(env_idx)
            self.table_scene.initialize(env_idx)
            xyz = torch.zeros((batch, 3))
            xyz[:, :2] = object_xy_for_reset(options, batch, self.can_x_range, self.can_y_range)
            xyz[:, 2] = self.can_height / 2
            self.can.set_pose(Pose.create_from_pq(xyz))

    def _get_obs_extra(self, info: dict):
        return dict(tcp_pose=self.agent.tcp_pose.raw_pose, obj_pos=self.can.pose.p)

    def evaluate(self):
        lifted = self.can.pose.p[:, 2] >= self.can_height / 2 + self.lift_success_height
        grasped = self.agent.is_grasping(self.can)
        return dict(success=lifted & grasped, is_grasped=grasped, lifted=lifted)

    def compute_dense_reward(self, obs, action, info):
        # Sparse by design (the RL study uses success); dense/normalized modes map to it.
        return info["success"].float()

    def compute_normalized_dense_reward(self, obs, action, info):
        return self.compute_dense_reward(obs, action, info)
