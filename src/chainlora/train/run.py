"""Moved: `train_library` to chainlora.train.recipe, one LoRA job to chainlora.train.lora_job
(the old name still imports: this module IS chainlora.train.recipe, which re-exports run_job)."""

import sys

from chainlora.train import recipe as _moved

sys.modules[__name__] = _moved
