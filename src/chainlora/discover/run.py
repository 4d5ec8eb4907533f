"""Moved to chainlora.discover.pipeline (the old name still imports: this module IS that one)."""

import sys

from chainlora.discover import pipeline as _moved

sys.modules[__name__] = _moved
