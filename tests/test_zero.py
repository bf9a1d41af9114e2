"""The per-worker DeepSpeed step (``mdm.zero.ZeroTrainer``) runs in the precision it is given.

DeepSpeed 0.16 and later switch an outer ``torch.autocast`` off inside ``engine.forward``
unless the config's ``torch_autocast`` section is on: the stage jobs' "bf16" step ran its
whole forward in fp32 (measured on an H200, config 64, batch 64, eager ZeRO-2: 103.7 img/s
and 79 GiB before, 134.0 img/s and 68 GiB after). DeepSpeed's switch looks at CUDA's
autocast only, so the behaviour itself shows on a GPU alone (``bench/zero_step.py
--engine_autocast_off`` runs the step as it was); here the config that fixes it.
"""

from __future__ import annotations

import torch

from mdm.training import TrainConfig
from mdm.zero import ZeroConfig, deepspeed_config


def test_config_keeps_autocast_inside_the_engine():
    cfg = deepspeed_config(TrainConfig(), ZeroConfig(), 1, torch.bfloat16)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in deepspeed_config(TrainConfig(), ZeroConfig(), 1, None)
