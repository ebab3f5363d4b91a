"""RT-1 as a demonstrator in SimplerEnv tasks, behind the scripted experts' `Expert` interface.

Wraps SimplerEnv's own inference class (`simpler_env.policies.rt1.rt1_model.RT1Inference`, TensorFlow +
tf_agents, a SavedModel checkpoint directory) so `collect-demos expert=rt1` rolls the policy that produced the
paper's demonstrations. The actions it returns are SimplerEnv env actions (xyz m, axis-angle rad, relative
gripper +1 close), exactly what SimplerEnv's evaluator sends to the env; RT-1's `terminate_episode` output is
ignored, so an episode runs until success or the step limit. Checkpoints: SimplerEnv's README, "RT-1 Inference
Setup" (e.g. rt_1_tf_trained_for_000400120, the converged one).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from policies.experts import Expert

RT1_EXTRA_HINT = ("install the rt1 extra (`pip install -e '.[rt1]'`: tensorflow, tensorflow_hub, tf_agents) "
                  "next to SimplerEnv")


class RT1UnavailableError(ImportError):
    """RT-1 inference cannot run: the rt1 extra, SimplerEnv or the checkpoint is missing."""


def check_checkpoint(checkpoint: str | Path | None) -> Path:
    """The checkpoint folder if it is a TensorFlow SavedModel; a one-line error saying how to get one otherwise."""
    if checkpoint is None or str(checkpoint) == "":
        raise RT1UnavailableError("expert=rt1 needs rt1_checkpoint=<folder of an RT-1 SavedModel>, e.g. "
                                  "checkpoints/rt_1_tf_trained_for_000400120 downloaded as SimplerEnv's README shows")
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise RT1UnavailableError(f"rt1_checkpoint={str(checkpoint)!r} is not a folder; download an RT-1 checkpoint "
                                  f"(SimplerEnv README, 'RT-1 Inference Setup') and pass its folder")
    if not any((path / name).is_file() for name in ("saved_model.pb", "saved_model.pbtxt")):
        raise RT1UnavailableError(f"rt1_checkpoint={str(checkpoint)!r} holds no saved_model.pb: pass the unzipped "
                                  f"checkpoint folder itself (e.g. .../rt_1_tf_trained_for_000400120)")
    return path


def load_rt1_inference_class():
    """SimplerEnv's RT1Inference, imported on demand (it pulls in TensorFlow)."""
    try:
        module = importlib.import_module("simpler_env.policies.rt1.rt1_model")
    except ImportError as err:
        missing = getattr(err, "name", None) or str(err)
        if missing.split(".")[0] in ("simpler_env", "mani_skill2_real2sim"):
            from envs.simpler import INSTALL_HINT

            raise RT1UnavailableError(f"expert=rt1 needs SimplerEnv ({err}). {INSTALL_HINT}") from err
        raise RT1UnavailableError(f"expert=rt1 cannot import {missing!r} ({err}); {RT1_EXTRA_HINT}") from err
    return module.RT1Inference


class RT1Expert(Expert):
    """`reset(env)` / `act(env, obs)` over RT-1; `env` must be a SimplerEnv task (envs.make_task("simpler_...")).

    RT-1 sees the full 512 x 640 overhead frame (`env.overhead_rgb`, it resizes with padding itself), not the
    policy-sized obs["image"], so demonstrations do not depend on the dataset's image size.
    """

    name = "rt1"

    def __init__(self, checkpoint: str | Path, lang_embed_model_path: str | None = None, action_scale: float = 1.0):
        path = check_checkpoint(checkpoint)
        kwargs = {} if lang_embed_model_path is None else {"lang_embed_model_path": lang_embed_model_path}
        self.model = load_rt1_inference_class()(saved_model_path=str(path), action_scale=action_scale,
                                                policy_setup="google_robot", **kwargs)
        self.instruction: str | None = None

    def reset(self, env) -> None:
        if getattr(env, "overhead_rgb", None) is None:
            raise ValueError("the RT-1 expert needs a SimplerEnv task env with images (envs.make_task('simpler_...', "
                             "render_images=True)); scripted experts serve the embedded tasks")
        self.instruction = env.instruction
        self.model.reset(self.instruction)

    def act(self, env, obs) -> np.ndarray:
        _, action = self.model.step(env.overhead_rgb, self.instruction)
        return np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]]).astype(np.float32)
