"""QLoRA: the base model loaded quantised by bitsandbytes (config key `base_quantization`).

`4bit` is QLoRA's recipe (Dettmers et al. 2023): NF4 weights with double quantisation, matmuls
in the compute dtype (the config's `dtype`: float32 by default, bfloat16 on a GPU); `8bit` is
LLM.int8(). The LoRA factors stay float32 on top (PEFT's bnb LoRA layers), so the adapters a
quantised run saves are ordinary float32 PEFT files that load on the unquantised base.

bitsandbytes is an extra (`pip install 'chainlora[qlora]'`), never a core dependency. Its CPU
backend (0.48+) runs 4-bit and 8-bit Linear forward and backward as well as CUDA does, so
`check` does not go by the device's name: it runs one tiny quantised Linear forward and backward
on the device and refuses, in ONE line naming the key, where that fails.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from chainlora.errors import ChainloraError

KEY = "base_quantization"
MODES = ("4bit", "8bit")
INSTALL = "pip install 'chainlora[qlora]' (bitsandbytes)"
_checked: dict[tuple[str, str], str | None] = {}


class _NoHubKernelNotice(logging.Filter):
    """On a CPU with AVX512-BF16, importing bitsandbytes (peft imports it whenever it is installed)
    asks the `kernels` package for an optional hub kernel; offline or untrusted, that logs two
    warnings and bitsandbytes runs its own kernels. Those lines say nothing to a user and would
    break every one-line error on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_hub_kernel_notices() -> None:
    """Drop those notices (idempotent; imports nothing). Call before anything imports peft."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoHubKernelNotice) for f in logger.filters):
            logger.addFilter(_NoHubKernelNotice())


def _import_bnb() -> Any:
    quiet_hub_kernel_notices()
    try:
        import bitsandbytes
    except ImportError as e:
        raise ChainloraError(f"{KEY}: needs bitsandbytes, which is not installed: {INSTALL} ({e})")
    except Exception as e:  # a broken native library raises OSError / RuntimeError on import
        raise ChainloraError(f"{KEY}: bitsandbytes does not load here: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
    return bitsandbytes


def _probe(mode: str, device: str) -> None:
    """One quantised Linear, forward and backward, on `device` (what QLoRA training needs)."""
    import torch

    bnb = _import_bnb()
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 64, bias=False)
    if mode == "4bit":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    x = torch.randn(2, 64, device=device, requires_grad=True)
    layer(x).float().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("no finite gradient through the quantised layer")


def check(mode: str, device: str) -> None:
    """Refuse (one line naming the key) where bitsandbytes cannot train `mode` on `device`."""
    if mode not in MODES:
        raise ChainloraError(f"{KEY}: expected {' or '.join(map(repr, MODES))} or null, got {mode!r}")
    if (mode, device) not in _checked:
        try:
            _probe(mode, device)
            _checked[mode, device] = None
        except ChainloraError as e:
            _checked[mode, device] = str(e)
        except Exception as e:  # no backend for this device, a missing kernel, ...
            import bitsandbytes

            _checked[mode, device] = (f"{KEY}: {mode}: bitsandbytes {bitsandbytes.__version__} cannot run a "
                                      f"quantised layer on {device} here: {type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:200]}")
    if _checked[mode, device]:
        raise ChainloraError(_checked[mode, device])


def compute_dtype(dtype: str) -> Any:
    """The matmul dtype of the quantised layers: the base's `dtype` (auto: bfloat16 where the GPU
    has it, else float32)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def bnb_config(mode: str, dtype: str = "float32") -> Any:
    """transformers' BitsAndBytesConfig for a mode."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(dtype))
    return BitsAndBytesConfig(load_in_8bit=True)


def load_kwargs(mode: str, dtype: str, device: str) -> dict[str, Any]:
    """What `from_pretrained` needs for a quantised base on `device` (checked first). The weights
    are quantised as they load, onto the device: one process's GPU under torchrun / accelerate."""
    if device == "cuda" and os.environ.get("LOCAL_RANK"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    check(mode, device)
    return {"quantization_config": bnb_config(mode, dtype), "device_map": {"": device}}


def mode_of(model: Any) -> str | None:
    """'4bit', '8bit' or None: how bitsandbytes quantised a loaded model."""
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    return "8bit" if getattr(model, "is_loaded_in_8bit", False) else None


def prepare_for_training(model: Any, wanted: str | None, key: str = KEY) -> Callable[[], None]:
    """Before a LoRA is put on `model`: check it is quantised as the config says (the fingerprint
    promises it), then PEFT's k-bit preparation — every base weight frozen, the non-quantised
    ones (norms, embeddings) in float32. Gradient checkpointing is the Trainer's (train/arguments.py).

    Returns `restore`, which puts those weights back in the dtype they were loaded in: after the
    job the shared base is the model as loaded again, so what runs on it next (a classifier's
    embeddings over the base, the selectors' measurement) sees the same features whether a LoRA
    job trained before it or every one was kept."""
    found = mode_of(model)
    if found != wanted:
        raise ChainloraError(f"{key}: the config says {wanted or 'null'} but the base model was loaded "
                             f"{found or 'unquantised'} (load it with load_base(..., quantization={wanted!r}))")
    if not found:
        return lambda: None
    from peft import prepare_model_for_kbit_training

    loaded = {name: p.dtype for name, p in model.named_parameters()}
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    kernels = _trainable_layout(model)
    return lambda: _restore(model, loaded, kernels)


def _restore(model: Any, loaded: dict[str, Any], kernels: list[tuple[Any, bool]]) -> None:
    """Cast back the parameters the preparation upcast (the same values: bf16/fp16 -> fp32 -> back
    is exact) and give each 4-bit layer its inference kernel back (the next job's preparation
    unpacks a weight it repacked)."""
    for name, param in model.named_parameters():
        if name in loaded and param.dtype != loaded[name]:
            param.data = param.data.to(loaded[name])
    for module, flag in kernels:
        module.support_avx512bf16_for_cpu = flag


def _trainable_layout(model: Any) -> list[tuple[Any, bool]]:
    """bitsandbytes' CPU backend (0.50, CPUs with AVX512-BF16) repacks a 4-bit weight for its
    inference kernel on the first eval-mode forward without gradients, and the repacked weight has
    no backward: a job trained after an evaluation (early stopping, or the previous job's test loss
    on the shared base) silently gets no gradient through the base layers. A model that trains keeps
    the trainable layout (a repacked weight is unpacked again) while it trains; inference-only loads
    keep the fast one. Returns each such layer with its flag before, for `_restore`."""
    kernels = []
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        kernels.append((module, module.support_avx512bf16_for_cpu))
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data,
                                                                                                   state)
    return kernels
