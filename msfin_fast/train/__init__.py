"""Training and fine-tuning MSFIN with the paper's recipe.

The recipe: LR images made from the HR ones by the same MATLAB-compatible bicubic as ``eval``
(``evaluate.hr_lr_pair``), random LR patches (48×48 by default) with the matching HR patch, random
flips and 90° rotations, batch 16, L1 loss on 0–255 pixels, Adam (β 0.9 / 0.999, ε 1e-8), and a
cosine-annealed learning rate from 1e-4 down to 6.25e-6 over the run. Any preset width and any
integer scale; mixed precision (bf16, or fp16 with loss scaling) on CUDA, fp32 on the CPU.

Why it is built this way:

- HR and LR images are decoded and resized once, then cached as ``.npy`` files keyed by the source
  file's path, size and mtime and the scale. Workers memory-map them and copy out patches, so no
  PNG is decoded and no bicubic is computed while the GPU waits.
- The patch stream is a pure function of ``(seed, step, i)``: sample ``i`` of step ``step`` comes
  from its own generator. The data loader therefore needs no state beyond the step number, any
  number of workers yields the same batches, and resuming at step ``n`` continues the exact stream.
- ``model.pt`` is a plain state_dict in the released key format (``load_pretrained(...,
  weights=path)`` and ``MSFIN.load_state_dict(strict=True)`` take it unchanged). ``train_state.pt``
  beside it holds everything else resuming needs, including its own copy of the weights, so the
  pair can never disagree about the step even if a run dies between the two writes.
"""

from .config import BEST_MODEL_FILE, LOG_COLUMNS, LOG_FILE, MODEL_FILE, STATE_FILE, TrainConfig, cosine_lr, resolve_precision
from .checkpoint import read_train_state
from .data import CachedPair, PatchDataset, StepBatches, prepare_pairs, random_patch
from .trainer import Trainer, TrainSummary, open_run, train

__all__ = ["BEST_MODEL_FILE", "LOG_COLUMNS", "LOG_FILE", "MODEL_FILE", "STATE_FILE", "CachedPair", "PatchDataset",
           "StepBatches", "TrainConfig", "TrainSummary", "Trainer", "cosine_lr", "open_run", "prepare_pairs",
           "random_patch", "read_train_state", "resolve_precision", "train"]
