"""Moved to chainlora.base_model (the old name still imports: this module IS that one)."""

import sys

from chainlora import base_model as _moved

sys.modules[__name__] = _moved
