"""chainlora: Chain of LoRA — routed task adapters and residual LoRA chains.

Data flows one way: data -> train -> library -> engine -> serve / evaluate.
"""

__version__ = "0.1.0"

from chainlora.errors import ChainloraError

__all__ = ["ChainloraError", "__version__"]
