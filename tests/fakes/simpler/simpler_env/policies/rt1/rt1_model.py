"""Fake RT-1 inference: the real class's constructor, `reset` and `step` contract, a scripted grasp-and-lift.

The real module imports tensorflow, tensorflow_hub and tf_agents at the top; setting the environment variable
FAKE_RT1_MISSING_TF=1 makes this one fail the same way, to test the missing-extra error.
"""

import os

import numpy as np

if os.environ.get("FAKE_RT1_MISSING_TF"):
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

LIFT_AFTER = 2  # steps of descent before the gripper closes


class RT1Inference:
    def __init__(self, saved_model_path="rt_1_x_tf_trained_for_002272480_step",
                 lang_embed_model_path="https://tfhub.dev/google/universal-sentence-encoder-large/5",
                 image_width=320, image_height=256, action_scale=1.0, policy_setup="google_robot"):
        if policy_setup not in ("google_robot", "widowx_bridge"):
            raise NotImplementedError()
        self.saved_model_path = saved_model_path
        self.policy_setup = policy_setup
        self.action_scale = action_scale
        self.task_description = None
        self.images_seen = []

    def reset(self, task_description):
        self.task_description = task_description
        self.t = 0

    def step(self, image, task_description=None):
        if task_description is not None and task_description != self.task_description:
            self.reset(task_description)
        assert image.dtype == np.uint8
        self.images_seen.append(image.shape)
        down, close = self.t < LIFT_AFTER, self.t == LIFT_AFTER
        world_vector = np.array([0.0, 0.0, -0.02 if down else (0.0 if close else 0.02)])
        rotation_delta = np.array([0.01, -0.02, 0.03])
        gripper = np.array([1.0 if close else 0.0])
        raw_action = {"world_vector": world_vector, "rotation_delta": rotation_delta,
                      "gripper_closedness_action": gripper, "terminate_episode": np.array([1, 0, 0])}
        action = {"world_vector": world_vector * self.action_scale, "rot_axangle": rotation_delta * self.action_scale,
                  "gripper": gripper, "terminate_episode": np.array([1, 0, 0])}
        self.t += 1
        return raw_action, action
