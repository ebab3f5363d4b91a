"""`export-openvla`: a fine-tuned OpenVLA-7B policy file as a checkpoint folder in OpenVLA's own format.

    export-openvla policy_file=runs/openvla/reinforce/policy.pt out_dir=/data/openvla-7b-reinforce

The folder holds what the released one holds -- config.json (norm stats), tokenizer, remote code, the weights as
``model-0000i-of-0000n.safetensors`` + index under the release's keys and dtypes -- with the fine-tuned weights
(LoRA adapters merged). OpenVLA's ``AutoModelForVision2Seq.from_pretrained(..., trust_remote_code=True)``,
SimplerEnv's OpenVLA evaluation and ``policy.openvla.weights_dir=`` (a new base, e.g.) load it like the release.
The weights are merged on the CPU by default (~15 GB of memory in bfloat16): no GPU needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore

from vla_razor.cli.common import run_config

log = logging.getLogger("export-openvla")


@dataclass
class ExportOpenVLAConfig:
    policy_file: str = "???"        # a policy.pt of `train-vla policy=openvla ...`
    out_dir: str = "???"            # a new folder
    device: str = "cpu"             # where the released weights load and the adapters merge
    dtype: str = "bfloat16"         # in which they merge (the files keep the release's dtypes)
    shard_gb: float = 5.0


ConfigStore.instance().store(name="export_openvla_schema", node=ExportOpenVLAConfig)


def export(cfg: ExportOpenVLAConfig) -> Path:
    from policies.openvla import export_openvla, require_new_folder, resolve_weights_dir
    from policies.vla_factory import load_policy, load_policy_header

    if not Path(cfg.policy_file).exists():
        raise FileNotFoundError(f"policy_file={cfg.policy_file} does not exist; pass the policy.pt of a "
                                "`train-vla policy=openvla` run")
    require_new_folder(cfg.out_dir)
    if cfg.shard_gb <= 0:
        raise ValueError(f"shard_gb={cfg.shard_gb} must be > 0")
    header_cfg = load_policy_header(cfg.policy_file)[1]
    if not header_cfg.loads_released:
        raise ValueError(f"{cfg.policy_file} holds a policy of kind {header_cfg.kind}; export-openvla writes "
                         "OpenVLA-7B policies (trained with policy=openvla) in OpenVLA's format")
    policy, policy_cfg, _ = load_policy(cfg.policy_file, openvla={"device": cfg.device, "dtype": cfg.dtype})
    out = export_openvla(policy.model, resolve_weights_dir(policy_cfg.openvla.weights_dir), cfg.out_dir,
                         shard_bytes=int(cfg.shard_gb * 2**30))
    log.info("wrote %s: %s fine-tuned from %s", out, cfg.policy_file, policy_cfg.openvla.weights_dir)
    return out


@hydra.main(config_path="../../configs/vla", config_name="export_openvla", version_base="1.3")
def _hydra_main(cfg) -> None:
    run_config("export-openvla", export, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
