"""Scene shared by the drawer tasks: table, Panda in a retracted pose, and the primitive cabinet.

The open / close tasks (envs/open_drawer.py, envs/close_drawer.py) subclass `DrawerSceneEnv` and
add only what differs: the drawer's starting opening, the success test and the instruction.
"""

from __future__ import annotations

import numpy as np
import sapien
import torch

from mani_skill.agents.robots import Panda
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.utils.scene_builder.table import TableSceneBuilder
from mani_skill.utils.structs.pose import Pose

from envs.cabinet import CabinetGeometry, build_cabinet
from envs.task_common import ROBOT_BASE_XYZ, TaskCameraMixin, object_xy_for_reset


class DrawerSceneEnv(TaskCameraMixin, BaseEnv):
    """Panda in front of a two-drawer cabinet whose front faces the robot.

    Observation extras: `tcp_pose` [7] (xyz + wxyz quaternion, world), `obj_pos` [3] (top drawer
    handle bar centre, world — the privileged object position) and `drawer_qpos` [1] (m open).
    """

    SUPPORTED_ROBOTS = ["panda"]
    agent: Panda

    instruction = ""
    cabinet_geometry = CabinetGeometry()
    # Cabinet footprint centre (world). At x = 0.25 the closed handle is ~0.645 m from the robot
    # base: close enough for a vertical gripper to hook it, far enough that a 0.25 m open drawer
    # stays clear of the base.
    cabinet_x_range = (0.23, 0.27)
    cabinet_y_range = (-0.08, 0.08)
    drawer_init_qpos = 0.0  # m open at reset; the close task overrides it
    # Retracted, raised Panda start with the gripper pointing down: ManiSkill's table rest pose
    # sits where an open drawer ends up. TCP ≈ (-0.22, 0, 0.36) world.
    robot_start_qpos = (0.0, -0.5, 0.0, -2.5, 0.0, 2.0, np.pi / 4, 0.04, 0.04)
    robot_init_qpos_noise = 0.02
    # Camera to the robot's left, above handle height, looking across the cabinet front: image
    # left-right is world x, so the drawer's whole travel, the handle and the approaching gripper
    # stay in view for every cabinet placement, with the cabinet large in a 128^2 image.
    camera_eye = (-0.25, 0.55, 0.55)
    camera_target = (0.02, 0.0, 0.12)
    camera_fov = 0.85

    def _load_scene(self, options: dict):
        self.table_scene = TableSceneBuilder(self, robot_init_qpos_noise=0.0)
        self.table_scene.build()
        # Built away from the robot; _initialize_episode moves it into place every reset.
        self.cabinet = build_cabinet(
            self.scene, "cabinet", self.cabinet_geometry,
            initial_pose=sapien.Pose(p=[1.0, 0.0, 0.0], q=[0.0, 0.0, 0.0, 1.0]),
        )
        self.drawer_link = self.cabinet.links_map["cabinet_top_drawer"]

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        with torch.device(self.device):
            batch = len(env_idx)
            self.table_scene.initialize(env_idx)
            start = torch.tensor(self.robot_start_qpos, dtype=torch.float32).repeat(batch, 1)
            noise = torch.randn((batch, 7)) * self.robot_init_qpos_noise
            start[:, :7] += noise
            self.agent.reset(start)
            self.agent.robot.set_pose(sapien.Pose(p=list(ROBOT_BASE_XYZ)))

            xyz = torch.zeros((batch, 3))
            xyz[:, :2] = object_xy_for_reset(options, batch, self.cabinet_x_range, self.cabinet_y_range)
            # yaw π: the cabinet's +x front faces the robot at world −x.
            facing_robot = torch.tensor([0.0, 0.0, 0.0, 1.0]).repeat(batch, 1)
            self.cabinet.set_pose(Pose.create_from_pq(xyz, facing_robot))
            self.cabinet.set_qpos(torch.full((batch, 1), float(self.drawer_init_qpos)))
            self.cabinet.set_qvel(torch.zeros((batch, 1)))

    def drawer_qpos(self) -> torch.Tensor:
        """[b] metres the top drawer is open."""
        return self.cabinet.get_qpos()[:, 0]

    def handle_position(self) -> torch.Tensor:
        """[b, 3] world position of the top drawer's handle bar centre."""
        offset = torch.as_tensor(self.cabinet_geometry.handle_offset_in_drawer(), dtype=torch.float32)
        pose = self.drawer_link.pose
        return (pose * Pose.create_from_pq(offset.to(self.device))).p

    def _get_obs_extra(self, info: dict):
        return dict(
            tcp_pose=self.agent.tcp_pose.raw_pose,
            obj_pos=self.handle_position(),
            drawer_qpos=self.drawer_qpos()[:, None],
        )

    def compute_dense_reward(self, obs, action, info):
        # Sparse by design (the RL study uses success); dense/normalized modes map to it.
        return info["success"].float()

    def compute_normalized_dense_reward(self, obs, action, info):
        return self.compute_dense_reward(obs, action, info)
