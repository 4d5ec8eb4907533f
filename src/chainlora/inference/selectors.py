"""The library's selectors at inference time: which ones it can run, which one is its default,
and the models behind those that are not the task-selection LoRA (`score` / `generate` run on
the router adapter, chainlora.inference.router).

- `classifier`: a frozen encoder and a linear head (chainlora.inference.classifier);
- `encoder`: all-MiniLM-L6-v2 fine-tuned end to end (chainlora.inference.encoder);
- `sft`: a fully fine-tuned copy of the base model scoring every label;
- the out-of-library detector (chainlora.inference.novelty).

Each loads on first use, hash-checked against the manifest; the detector shares the encoder
selector's model (or the frozen MiniLM's, with the classifier) rather than loading its own.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from chainlora.errors import ChainloraError
from chainlora.inference import router
from chainlora.library.store import Library, read_verified


def available(lib: Library) -> list[str]:
    """Score and generate over the task-selection LoRA, then every other selector it has."""
    return (["score", "generate"] if lib.router else []) + [k for k, _ in lib.selector_entries()]


def default(lib: Library) -> str:
    """The library's recorded winner, else the classifier where there is one (97.5% against the
    score selector's 89.4% on the demo, bench/RESULTS.md), else `score`."""
    winner = (lib.selection or {}).get("winner")
    if winner:
        return winner
    return "classifier" if lib.classifier else "encoder" if lib.encoder else "score"


def recorded_threshold(lib: Library, selector: str) -> float:
    """The confidence threshold train time calibrated for `selector` (0: none recorded)."""
    return float((((lib.selection or {}).get("selectors") or {}).get(selector) or {}).get("threshold", 0.0))


class Loaded:
    """One library's selector models, loaded on first use. Not thread-safe: the engine calls it
    under its lock. `live_model()` is the model holding the base weights now (the PeftModel
    once adapters are in, used with adapters off by `base`-encoder selectors)."""

    def __init__(self, lib: Library, base: Any, system: str | None, live_model: Callable[[], Any]):
        self.lib, self.base, self.system, self.live_model = lib, base, system, live_model
        self._models: dict[str, Any] = {}
        self._minilm: Any = None
        self._last_embedded: tuple[list[str] | None, Any] = (None, None)  # the encoder's last batch

    def forget(self, new: Library, system: str | None) -> None:
        """A reloaded library: drop every model whose files changed."""
        old = self.lib
        for kind in list(self._models):
            entry_old = (old.selection or {}).get("novelty") if kind == "novelty" else old.manifest.get(kind)
            entry_new = (new.selection or {}).get("novelty") if kind == "novelty" else new.manifest.get(kind)
            if (entry_old or {}).get("sha256") != (entry_new or {}).get("sha256"):
                del self._models[kind]
        self.lib, self.system, self._last_embedded = new, system, (None, None)

    def embed(self, space: str, texts: Sequence[str]) -> Any:
        """[N, dim] L2-normalised sentence embeddings in a detector's space: `minilm` (frozen),
        `base` (the base model, adapters off) or `encoder` (the fine-tuned encoder selector)."""
        from chainlora.inference import encoder

        if space == "encoder":
            texts = list(texts)
            if self._last_embedded[0] != texts:  # the encoder selector just embedded them: reuse
                model, tokenizer, info = self._encoder_selector()
                self._last_embedded = (texts, encoder.embed(model, tokenizer, texts, info.get("max_length", 64)))
            return self._last_embedded[1]
        return self._encoder(space).embed(texts)

    def _encoder(self, kind: str) -> Any:
        from chainlora.inference import classifier

        if kind == "minilm":
            if self._minilm is None:
                self._minilm = classifier.Encoder("minilm")
            return self._minilm
        return classifier.Encoder.wrap("base", self.live_model(), self.base.tokenizer)

    def _entry(self, kind: str, hint: str) -> dict:
        entry = self.lib.manifest.get(kind)
        if not entry:
            raise ChainloraError(f"{self.lib.root}: library has no {kind} selector (train with {hint})")
        return entry

    def rank(self, kind: str, texts: Sequence[str]) -> list[router.Ranking]:
        """Every task ranked for every text by the `classifier`, `encoder` or `sft` selector."""
        return {"classifier": self._classify, "encoder": self._encode, "sft": self._sft}[kind](texts)

    def _classify(self, texts: Sequence[str]) -> list[router.Ranking]:
        from chainlora.inference import classifier

        entry = self._entry("classifier", "classifier.enabled: true")
        if "classifier" not in self._models:
            directory = self.lib.path(entry)
            read_verified(directory, entry, classifier.FILES, "classifier")
            self._models["classifier"] = classifier.load(directory)
        head, info = self._models["classifier"]
        return classifier.rank(self._encoder(info["encoder"]), head, texts, info["tasks"])

    def _encoder_selector(self) -> tuple[Any, Any, dict]:
        from chainlora.inference import encoder

        entry = self._entry("encoder", "encoder.enabled: true")
        if "encoder" not in self._models:
            directory = self.lib.path(entry)
            read_verified(directory, entry, encoder.FILES, "encoder")
            self._models["encoder"] = encoder.load(directory)
        return self._models["encoder"]

    def _encode(self, texts: Sequence[str]) -> list[router.Ranking]:
        from chainlora.inference import encoder

        model, _, info = self._encoder_selector()
        return encoder.rank(model, info, self.embed("encoder", texts))

    def _sft(self, texts: Sequence[str]) -> list[router.Ranking]:
        """Its own fine-tuned copy of the base model scores every label, as `score` does with the LoRA."""
        from transformers import AutoModelForCausalLM

        from chainlora.library.store import SFT_FILES

        entry = self._entry("sft", "sft.enabled: true")
        if "sft" not in self._models:
            directory = self.lib.path(entry)
            read_verified(directory, entry, SFT_FILES, "sft selector")
            model = self.base.model
            self._models["sft"] = AutoModelForCausalLM.from_pretrained(
                directory, dtype=next(model.parameters()).dtype, use_safetensors=True).to(model.device).eval()
        tasks = list(entry["labels"])
        labels = [entry["labels"][t] for t in tasks]
        out = []
        for i in range(0, len(texts), router.ROUTE_CHUNK):  # bounds the label-expanded KV cache
            out += router.rank_by_score(self._models["sft"], self.base.tokenizer, texts[i:i + router.ROUTE_CHUNK],
                                        tasks, labels, template=entry["task_prompt"], system=self.system, adapter=None)
        return out

    def similarity(self, texts: Sequence[str]) -> tuple[list[float], float] | None:
        """(similarity per text, the threshold under which it is out of library), or None when
        the library has no out-of-library detector."""
        from chainlora.inference import novelty

        entry = (self.lib.selection or {}).get("novelty")
        if not entry:
            return None
        if "novelty" not in self._models:
            directory = self.lib.path(entry)
            read_verified(directory, entry, novelty.FILES, "out-of-library detector")
            self._models["novelty"] = novelty.load(directory)
        state, info = self._models["novelty"]
        sims = novelty.score(state, info, self.embed(info["encoder"], texts))
        return sims.tolist(), float(info["threshold"])
