"""Moved to chainlora.train.selector_models (the old name still imports: this module IS that one)."""

import sys

from chainlora.train import selector_models as _moved

sys.modules[__name__] = _moved
