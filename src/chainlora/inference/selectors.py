"""The library's selectors at inference time: which ones it can run, which one is its default,
and the models behind those that are not the task-selection LoRA (`score` / `generate` run on
the router adapter, chainlora.inference.label_ranking).

- `classifier`: a frozen encoder and a linear head (chainlora.inference.classifier);
- `encoder`: all-MiniLM-L6-v2 fine-tuned end to end (chainlora.inference.encoder);
- `sft`: a fully fine-tuned copy of the base model scoring every label;
- the out-of-library detector (chainlora.inference.novelty).

Each loads on first use, hash-checked against the manifest; the detector shares the encoder
selector's model (or the frozen MiniLM's, with the classifier) rather than loading its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from chainlora.errors import ChainloraError
from chainlora.inference import label_ranking as router
from chainlora.library import kinds
from chainlora.library.store import Library, read_verified


def available(lib: Library) -> list[str]:
    """The selectors whose model the library holds (chainlora.library.kinds), in table order."""
    return kinds.available(lib.manifest)


def default(lib: Library) -> str:
    """The library's recorded winner, else the most preferred selector it can run (the classifier
    where there is one: 97.5% against the score selector's 89.4% on the demo, bench/RESULTS.md),
    else `score`."""
    return kinds.default_for(lib.manifest) or "score"


def recorded_threshold(lib: Library, selector: str) -> float:
    """The confidence threshold train time calibrated for `selector` (0: none recorded)."""
    return float((((lib.selection or {}).get("selectors") or {}).get(selector) or {}).get("threshold", 0.0))


# --------------------------------------------------------------------------- the built-in rankers
# Each is named in chainlora.library.kinds and called as rank(engine, texts) under the engine's lock.


def rank_score(loaded: "Loaded", texts: Sequence[str]) -> list[router.Ranking]:
    """Every label's log-likelihood under the task-selection LoRA (chainlora.inference.label_ranking)."""
    return loaded.with_adapter("router", router.rank_by_score, texts)


def rank_generate(loaded: "Loaded", texts: Sequence[str]) -> list[router.Ranking]:
    """Labels found in the task-selection LoRA's beam-searched text (Qiu et al. 2024)."""
    return loaded.with_adapter("router", router.rank_by_generation, texts)


def rank_classifier(loaded: "Loaded", texts: Sequence[str]) -> list[router.Ranking]:
    """A linear head over frozen sentence features."""
    from chainlora.inference import classifier

    head, info = loaded.model("classifier", classifier.load)
    return classifier.rank(loaded.frozen(info["encoder"]), head, texts, info["tasks"])


def rank_encoder(loaded: "Loaded", texts: Sequence[str]) -> list[router.Ranking]:
    """The fine-tuned all-MiniLM-L6-v2 (its embeddings are reused by the out-of-library detector)."""
    from chainlora.inference import encoder

    model, _, info = loaded.model("encoder", encoder.load)
    return encoder.rank(model, info, loaded.embed("encoder", texts))


def rank_sft(loaded: "Loaded", texts: Sequence[str]) -> list[router.Ranking]:
    """Its own fine-tuned copy of the base model scores every label, as `score` does with the LoRA."""
    model = loaded.model("sft", loaded.load_full_model)
    return loaded.by_labels("sft", router.rank_by_score, model, None, texts)


class Loaded:
    """One library's selectors, what every rank function of chainlora.library.kinds receives: the
    selector models loaded on first use, and the engine's adapter cache for the LoRA selectors.
    Not thread-safe: the engine calls it under its lock."""

    def __init__(self, lib: Library, base: Any, system: str | None, cache: Any):
        self.lib, self.base, self.system, self.cache = lib, base, system, cache
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
                model, tokenizer, info = self.model("encoder", encoder.load)
                self._last_embedded = (texts, encoder.embed(model, tokenizer, texts, info.get("max_length", 64)))
            return self._last_embedded[1]
        return self.frozen(space).embed(texts)

    def live_model(self) -> Any:
        """The model holding the base weights now: the PeftModel once adapters are in (used with
        adapters off by the `base`-encoder selectors)."""
        return self.cache.model if self.cache.model is not None else self.base.model

    def with_adapter(self, name: str, rank: Callable, texts: Sequence[str]) -> list[router.Ranking]:
        """Rank with a selector LoRA of the library (`router`), loaded through the adapter cache."""
        if not self.lib.manifest.get(name):
            raise ChainloraError(f"{self.lib.root}: library has no task-selection adapter ({name})")
        return self.by_labels(name, rank, self.cache.acquire([name]), self.cache.slot(name), texts)

    def by_labels(self, entry: str, rank: Callable, model: Any, adapter: str | None,
                  texts: Sequence[str]) -> list[router.Ranking]:
        """`rank` (label_ranking.rank_by_score / rank_by_generation) over the labels and task prompt
        of the library's `entry`, in chunks that bound the label-expanded KV cache."""
        e = self.lib.manifest[entry]
        tasks = list(e["labels"])
        labels = [e["labels"][t] for t in tasks]
        out = []
        for i in range(0, len(texts), router.ROUTE_CHUNK):
            out += rank(model, self.base.tokenizer, texts[i:i + router.ROUTE_CHUNK], tasks, labels,
                        template=e["task_prompt"], system=self.system, adapter=adapter)
        return out

    def frozen(self, kind: str) -> Any:
        """A frozen sentence encoder: `minilm` (loaded once) or `base` (the live base model)."""
        from chainlora.inference import classifier

        if kind == "minilm":
            if self._minilm is None:
                self._minilm = classifier.FrozenEncoder("minilm")
            return self._minilm
        return classifier.FrozenEncoder.wrap("base", self.live_model(), self.base.tokenizer)

    def model(self, kind: str, load: Callable[[Path], Any]) -> Any:
        """The model of the library's `kind` entry: read hash-checked and `load`ed on first use,
        then kept until a reload changes its files (forget)."""
        entry = self.lib.manifest.get(kind)
        if not entry:
            sections = sorted({s.section for s in kinds.SELECTORS.values() if s.entry == kind}) or [kind]
            raise ChainloraError(f"{self.lib.root}: library has no {kind} selector (train with "
                                 f"{sections[0]}.enabled: true)")
        if kind not in self._models:
            directory = self.lib.path(entry)
            read_verified(directory, entry, kinds.files_of(kind), kind)
            self._models[kind] = load(directory)
        return self._models[kind]

    def load_full_model(self, directory: Path) -> Any:
        """A whole fine-tuned copy of the base model (the `sft` selector), on the base's device and dtype."""
        from transformers import AutoModelForCausalLM

        model = self.base.model
        return AutoModelForCausalLM.from_pretrained(directory, dtype=next(model.parameters()).dtype,
                                                    use_safetensors=True).to(model.device).eval()

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
