"""TRL's fused LM head, made to project only labelled positions on CPU too.

`trl.trainer.utils.add_fused_lm_head` (used by every trainer here) projects only the positions that carry a label
when Triton runs, and every position elsewhere so that compiled tile shapes stay fixed. On CPU nothing is
compiled, and projecting every prompt position only adds work: the tiny base's training (the old 1400-step
recipes/base/tiny_recall.sh) took 477 s before this and 281 s after, for the same loss and gradients
(tests/test_fused_head.py checks both). Imported by `tokensieve.trainers`, so it applies to every trainer.
"""

from __future__ import annotations

import torch
import trl.trainer.utils

_triton_decides = trl.trainer.utils._use_triton


def score_labelled_positions_only(device: torch.device) -> bool:
    return device.type == "cpu" or _triton_decides(device)


# `add_fused_lm_head`'s forward reads this module-level name on every call.
trl.trainer.utils._use_triton = score_labelled_positions_only
