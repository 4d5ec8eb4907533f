"""Moved to chainlora.library.gguf (the old name still imports: this module IS that one)."""

import sys

from chainlora.library import gguf as _moved

sys.modules[__name__] = _moved
