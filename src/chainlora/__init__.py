"""chainlora: Chain of LoRA — routed task adapters and residual LoRA chains.

Subpackages by stage; a module imports only from its own stage or a lower one
(checked by tests/test_layout.py):

    core (errors, atomic, models) < data < library < inference < train < eval < serve < demo < cli
"""

__version__ = "0.1.0"

from chainlora.errors import ChainloraError

__all__ = ["ChainloraError", "__version__"]

from chainlora.quantization import quiet_hub_kernel_notices  # noqa: E402  before anything imports peft

quiet_hub_kernel_notices()
