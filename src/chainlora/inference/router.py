"""Moved to chainlora.inference.label_ranking (the old name still imports: this module IS that one)."""

import sys

from chainlora.inference import label_ranking as _moved

sys.modules[__name__] = _moved
