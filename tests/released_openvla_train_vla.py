"""``train-vla`` with ``policy=openvla`` on a tiny checkpoint written in OpenVLA's naming (tests/test_openvla.py).

The only difference from the real command is the checkpoint's size: the native builder reads the released 7B's
dims from ``config.json``, so this entry point first points ``dims_from_config`` at the tests' tiny dims, then runs
train-vla's own ``main`` with the command-line arguments -- under ``accelerate launch`` too.
"""
import policies.openvla as openvla
from policies.openvla import tiny_dims
from vla_razor.cli import train_vla

TINY_OPENVLA_DIMS = tiny_dims(vocab_size=32064)  # tests/test_openvla.py's DIMS

if __name__ == "__main__":
    openvla.dims_from_config = lambda config: TINY_OPENVLA_DIMS
    train_vla.main()
