"""Run by ``accelerate launch --multi_gpu --num_processes 2`` (CPU: gloo) in tests/test_lnfree_train.py: train the tiny
removal setup for a few steps and save the final state dict (main process)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from lnfree_helpers import removal_setup, tiny_config, tiny_data  # noqa: E402
from normsurgeon.train.loop import train  # noqa: E402

model, sites, hooks = removal_setup()
res = train(model, tiny_data(), tiny_config(), hooks=hooks)
assert int(__import__("os").environ["WORLD_SIZE"]) == 2 and torch.distributed.get_world_size() == 2
if torch.distributed.get_rank() == 0:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[1])
