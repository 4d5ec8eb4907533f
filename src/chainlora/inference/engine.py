"""The inference engine: route each instruction to its task adapter and answer, in batches.

`Engine.load(LIB)` holds one base model and one PeftModel whose adapters come and go through
the AdapterCache (the router pinned). A batch of instructions is routed in one selector pass
and answered in ONE `generate` call: each row runs its own LoRA, rows share everything else.
Two device tiers can answer: PEFT's mixed-adapter batches (`adapter_names`, a loop over the
batch's adapters in every layer) or the adapter pool (`adapters="pool"`: slot tensors and one
batched matmul a layer, see adapter_pool.py); routing and scoring always use PEFT.

The selector and its confidence threshold default to what `chainlora train` measured and
recorded (manifest `selection`); a request falls back to the mixed adapter (the base model
where the library has none) below the threshold, when the `generate` selector names no label,
or when the out-of-library detector finds it far from every task — and the route says why.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from chainlora.data import prompts
from chainlora.errors import ChainloraError, NotFound
from chainlora.inference import label_ranking as router
from chainlora.inference import selectors
from chainlora.inference.adapter_cache import AdapterCache
from chainlora.inference.adapter_pool import ZERO, AdapterPool, library_rank, unsupported
from chainlora.inference.answers import BASE, Answer, Route  # noqa: F401  (the API: chainlora.inference.engine.Route)
from chainlora.inference.logprobs import PromptScores, Recorder
from chainlora.inference.prefill import Keep, Prefill
from chainlora.inference.stops import EndSuppressor, StopMatcher, cut_at_stop, end_ids, stop_tokens, streamable
from chainlora.library import kinds
from chainlora.library.store import Library
from chainlora.base_model import Base, load_base

ADAPTER_TIERS = ("peft", "pool")
SAMPLING_EPS = 1e-5  # a temperature below this samples greedily (logits / t would overflow)


class Engine:
    """A loaded adapter library, ready to route and answer."""

    def __init__(self, lib: Library, base: Base, *, selector: str | None = None, threshold: float | None = None,
                 novelty: bool = True, device_cache_bytes: int = 256 << 20, cpu_cache_bytes: int = 1 << 30,
                 max_adapters: int | None = None, adapters: str = "peft", gate: bool = True):
        """selector / threshold: None = the library's measured choice (manifest `selection`), else
        the classifier where there is one, else `score`, with no threshold. novelty: use the
        library's out-of-library detector where it has one. adapters: the device tier that
        answers, "peft" or "pool" (max_adapters slots, 8 when None). gate: answer the tasks the
        library's gate marked with the mixed adapter when routed to (chainlora.train.gate)."""
        if adapters not in ADAPTER_TIERS:
            raise ChainloraError(f"adapters: unknown {adapters!r} (use {' or '.join(ADAPTER_TIERS)})")
        if selector is not None:
            _check_selector(selector)
        lib.check_base(base.name, base.fingerprint)
        if getattr(base.model, "peft_config", None):
            raise ChainloraError("this base model already carries adapters; load a fresh one per Engine")
        self.lib, self.base, self.tok = lib, base, base.tokenizer
        self.selector = selector or selectors.default(lib)
        self.threshold = threshold if threshold is not None else selectors.recorded_threshold(lib, self.selector)
        self.use_novelty = novelty
        # tasks whose own adapter lost to the mixed adapter on held-out records (chain.gate)
        self.gated = set((lib.manifest.get("gate") or {}).get("gated") or ()) if gate and lib.mixed else set()
        self.system = lib.manifest.get("system_prompt")
        self.cache = AdapterCache(base.model, lib, device_bytes=device_cache_bytes, cpu_bytes=cpu_cache_bytes,
                                  max_adapters=max_adapters)
        self.pool = AdapterPool(base.model, self.cache.stage, slots=max_adapters or 8,
                                rank=library_rank(lib)) if adapters == "pool" else None
        self.lock = threading.Lock()  # one generate at a time on the shared model
        self.selectors = selectors.Loaded(lib, base, self.system, self.cache)
        if lib.router:
            self.cache.acquire(["router"])

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, dtype: str = "float32", **kw: Any) -> "Engine":
        """Open the library at `path` (hashes checked lazily, per adapter) and its base model."""
        lib = Library.open(path, verify=False)
        base = load_base(lib.manifest["base_model"]["name"], dtype=dtype, device=device)
        return cls(lib, base, **kw)

    def reload(self) -> dict[str, list[str]]:
        """Rescan the library on disk (hashes checked): new adapters become available, changed
        (sha256) or removed ones leave the cache. Waits for the batch in flight, never cuts it."""
        new = Library.open(self.lib.root, verify=True)
        new.check_base(self.base.name, self.base.fingerprint)
        old = {e["name"]: e.get("sha256") for e in self.lib.entries()}
        cur = {e["name"]: e.get("sha256") for e in new.entries()}
        changes = {"added": [n for n in cur if n not in old], "removed": [n for n in old if n not in cur],
                   "changed": [n for n in cur if n in old and cur[n] != old[n]]}
        with self.lock:
            self.cache.refresh(new, set(changes["removed"]) | set(changes["changed"]))
            if self.pool is not None:
                self.pool.drop(set(changes["removed"]) | set(changes["changed"]))
            self.lib = new
            self.system = new.manifest.get("system_prompt")
            self.selectors.forget(new, self.system)
            if new.router:
                self.cache.acquire(["router"])
        return changes

    # ------------------------------------------------------------------ checks

    @property
    def tasks(self) -> list[str]:
        return self.lib.task_names

    @property
    def context(self) -> int:
        return getattr(self.base.model.config, "max_position_embeddings", None) or 10**9

    def render(self, texts: Sequence[str], rendered: Sequence[str | list[int]] | None = None) -> list:
        """The model's input per instruction: the chat template with the library's system
        prompt, unless the caller rendered it already (a whole chat history, or token ids)."""
        if rendered is not None:
            if len(rendered) != len(texts):
                raise ChainloraError(f"rendered: {len(rendered)} prompts for {len(texts)} instructions")
            return list(rendered)
        return [prompts.render(self.tok, t, self.system) for t in texts]

    def check(self, texts: Sequence[str], reserve: int | Sequence[int] = 0,
              rendered: Sequence[str | list[int]] | None = None) -> list:
        """Refuse empty instructions and prompts that do not fit the context with their new
        tokens (never truncate silently); return the rendered prompts."""
        out = self.render(texts, rendered)
        self._check_empty(texts)
        self._check_fit([len(prompts.ids(self.tok, p)) for p in out], reserve)
        return out

    @staticmethod
    def _check_empty(texts: Sequence[str]) -> None:
        for i, text in enumerate(texts, 1):
            if not isinstance(text, str) or not text.strip():
                raise ChainloraError(f"instruction {i}: empty")

    def overflow(self, n: int, extra: int) -> str | None:
        """Why `n` prompt tokens and `extra` new ones do not fit the model's context (None: they
        do): the one context check, here and in the server's preparer."""
        if n + extra > self.context:
            return f"{n} prompt tokens + {extra} new tokens exceed the model's context of {self.context}"
        return None

    def _check_fit(self, lengths: Sequence[int], reserve: int | Sequence[int]) -> None:
        reserves = [reserve] * len(lengths) if isinstance(reserve, int) else list(reserve)
        for i, (n, extra) in enumerate(zip(lengths, reserves), 1):
            if why := self.overflow(n, extra):
                raise ChainloraError(f"instruction {i}: {why}; shorten it")

    def check_task(self, task: str) -> str:
        """`task` if the library has it now (a reload may have removed it), else NotFound."""
        if (task == "mixed" and self.lib.mixed) or task == BASE:
            return task
        if task not in self.tasks:
            raise NotFound(f"unknown task {task!r} (tasks: {', '.join(self.tasks)})")
        return task

    # ------------------------------------------------------------------ routing

    def route(self, texts: Sequence[str], *, top_k: int = 3, selector: str | None = None) -> list[Route]:
        """Choose a task for every instruction in one batched selector pass."""
        self.check(texts)
        return self._route(list(texts), top_k, selector)

    def _route(self, texts: Sequence[str], top_k: int = 3, selector: str | None = None) -> list[Route]:
        selector = selector or self.selector
        entry = kinds.SELECTORS[_check_selector(selector)].entry
        if kinds.ENTRIES[entry].lora and not self.lib.manifest.get(entry) and len(self.tasks) == 1:
            return [Route(self.tasks[0], 1.0, [(self.tasks[0], 1.0)], False, self.tasks[0], "single")
                    for _ in texts]  # a single adapter (chainlora finetune): nothing to choose
        with self.lock:
            rankings = kinds.resolve(kinds.SELECTORS[selector].rank)(self.selectors, texts)
        return self._decide_all(texts, rankings, top_k, selector)

    def similarity(self, texts: Sequence[str]) -> list[float] | None:
        """The out-of-library detector's similarity per instruction (None: the library has none,
        or the engine was opened with novelty=False)."""
        found = self._similarity(texts)
        return None if found is None else found[0]

    def _similarity(self, texts: Sequence[str]) -> tuple[list[float], float] | None:
        if not self.use_novelty:
            return None
        with self.lock:
            return self.selectors.similarity(texts)

    def _decide_all(self, texts: Sequence[str], rankings: list[router.Ranking], top_k: int,
                    selector: str) -> list[Route]:
        sims, limit = self._similarity(texts) or (None, 0.0)
        return [self._decide(rk, top_k, selector, None if sims is None else sims[i], limit)
                for i, rk in enumerate(rankings)]

    def _decide(self, rk: router.Ranking, top_k: int, selector: str, sim: float | None = None,
                limit: float = 0.0) -> Route:
        best = rk.tasks[0] if rk.tasks else None
        prob = rk.scores[0] if rk.scores else 0.0
        reason = ("no label" if best is None else "out of library" if sim is not None and sim < limit
                  else "low confidence" if prob < self.threshold else None)
        fallback = reason is not None
        adapter = best if not fallback else ("mixed" if self.lib.mixed else BASE)
        if not fallback and best in self.gated:
            adapter, reason = "mixed", "gated"
        return Route(best, prob, list(zip(rk.tasks, rk.scores))[:top_k], fallback, adapter, selector,
                     reason, sim)

    # ------------------------------------------------------------------ answering

    def _inputs(self, rendered: Sequence[str | list[int]]) -> dict:
        """Left-padded input_ids and attention_mask; a prompt may be text or token ids."""
        import torch

        rows = [prompts.ids(self.tok, p) for p in rendered]
        width, pad = max(map(len, rows)), self.tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return {"input_ids": ids.to(self.base.model.device), "attention_mask": mask.to(self.base.model.device)}

    def _gen_kwargs(self, max_new_tokens: int, temperature: float, top_p: float, stop: Sequence[str] | None,
                    min_new_tokens: int = 0, stopping: Any = None, recorder: Recorder | None = None,
                    suppress: EndSuppressor | None = None) -> dict:
        """generate's keywords; stop strings end rows through StopMatcher (bounded memory, see
        chainlora.inference.stops), `stopping` adds the caller's own criterion, `recorder` sees
        the logits before sampling and each chosen token."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        criteria = [c for c in (StopMatcher(self.tok, stop) if stop else None, stopping,
                                recorder.stopping() if recorder is not None else None) if c is not None]
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tok.pad_token_id}
        processors = [p for p in (recorder, suppress) if p is not None]  # the recorder first: raw logits
        if processors:
            kw["logits_processor"] = LogitsProcessorList(processors)
        if criteria:
            kw["stopping_criteria"] = StoppingCriteriaList(criteria)
        if min_new_tokens:
            kw["min_new_tokens"] = min_new_tokens
        if temperature >= SAMPLING_EPS:  # below it, logits / temperature overflow: greedy, as vLLM does
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def routes_for(self, texts: Sequence[str], task: str | Sequence[str | None] | None) -> list[Route]:
        """Routes for an already checked batch: pinned to `task` (one for all, or one per text;
        None in the list = route that row), the rest selected in one pass."""
        if task is None:
            return self._route(texts)
        pinned = [task] * len(texts) if isinstance(task, str) else list(task)
        if len(pinned) != len(texts):
            raise ChainloraError(f"task: {len(pinned)} tasks for {len(texts)} instructions")
        free = [i for i, t in enumerate(pinned) if t is None]
        routed = iter(self._route([texts[i] for i in free]) if free else [])
        return [next(routed) if t is None else _pinned(self.check_task(t)) for t in pinned]

    def stage(self, names: Sequence[str]) -> dict[str, ChainloraError]:
        """Read every adapter a batch needs that is not resident into the CPU tier, one at a
        time (hash checked): {name: error} for those missing or corrupt, so that the caller
        fails only their rows and the one generate call still answers the others."""
        bad: dict[str, ChainloraError] = {}
        resident = self.pool.resident if self.pool is not None else self.cache.resident
        with self.lock:
            for name in dict.fromkeys(names):
                if name == BASE or name in resident:
                    continue
                try:
                    config = self.cache.stage(name)[0]
                except ChainloraError as e:
                    bad[name] = e
                    continue
                why = unsupported(config) if self.pool is not None else None
                if why:
                    bad[name] = ChainloraError(f"adapter {name!r}: the adapter pool cannot serve it ({why}); "
                                               "serve with --adapters peft")
        return bad

    def model_for(self, names: list[str]) -> tuple[Any, dict]:
        """The model to run a batch on, with its per-row adapters resident (the pool: with
        its rows set; `running` clears them)."""
        real = [n for n in names if n != BASE]
        if self.pool is not None:
            slots = dict(zip(real, self.pool.acquire(real))) if real else {}
            self.pool.set_rows([slots.get(n, ZERO) for n in names])
            return self.selectors.live_model(), {}
        model = self.cache.acquire(real) if real else self.cache.model
        if model is None:  # no adapter loaded at all: plain base model
            return self.base.model, {}
        return model, {"adapter_names": [n if n == BASE else self.cache.slot(n) for n in names]}

    @contextlib.contextmanager
    def running(self, names: list[str]) -> Iterator[tuple[Any, dict]]:
        """(model, generate kwargs) for one batch; with the pool, PEFT's own adapters (the
        router) are off while it runs and the pool's rows are cleared after."""
        try:
            model, extra = self.model_for(names)
            if self.pool is not None and self.cache.model is not None:
                with self.cache.model.disable_adapter():
                    yield model, extra
            else:
                yield model, extra
        finally:
            if self.pool is not None:
                self.pool.clear_rows()

    def generate(self, texts: Sequence[str], *, task: str | Sequence[str | None] | None = None,
                 max_new_tokens: int | Sequence[int] = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, min_new_tokens: int = 0,
                 rendered: Sequence[str | list[int]] | None = None, streamer: Any = None,
                 stopping: Any = None, routes: Sequence[Route] | None = None, prefill_chunk: int | None = None,
                 keep: Keep | None = None, recorder: Recorder | None = None,
                 prompt_logprobs: Sequence[int | None] | None = None,
                 min_tokens: Sequence[int] = ()) -> list[Answer | None]:
        """Answer a batch: route (unless `task` pins it), then ONE mixed-adapter generate call.

        max_new_tokens may differ per row (the batch runs to the largest, each row is cut at its
        own). `rendered` replaces the chat-template rendering (e.g. a whole conversation);
        `streamer` (a transformers BaseStreamer seeing the whole batch) and `stopping`
        (StoppingCriteria, per-row done flags) are the server's hooks; `routes` skips routing.
        min_new_tokens forces answers to a length (benchmarks compare equal work with it).
        prefill_chunk: prompts longer than this many positions are prefilled chunk by chunk, and
        `keep` (given the rows still running, it returns those still wanted) is asked between
        chunks; a row it drops leaves the batch and its answer is None (see prefill.py).
        recorder (logprobs.Recorder) records the generated tokens' log-probabilities of the rows it
        wants; prompt_logprobs (top-k per row, None: not that row) scores the prompts' tokens in
        the prefill. Both come back in each Answer (`logprobs`, `prompt_logprobs`). `min_tokens`
        (per row) keeps a row from choosing an end token before it has made that many (EndSuppressor).
        """
        import torch

        limits = [max_new_tokens] * len(texts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        prompts_ = self.render(texts, rendered)
        self._check_empty(texts)
        with self.lock:  # tokenized once: the length check reads the same encoding generate uses
            enc = self._inputs(prompts_)
        self._check_fit([int(n) for n in enc["attention_mask"].sum(1)], limits)
        routes = list(routes) if routes is not None else self.routes_for(texts, task)
        names = [r.adapter for r in routes]
        minimum = {i: n for i, n in enumerate(min_tokens) if n > 0}
        suppress = EndSuppressor(minimum, end_ids(self.tok)) if minimum else None
        kw = self._gen_kwargs(max(max(limits), 1), temperature, top_p, stop, min_new_tokens, stopping, recorder, suppress)
        if streamer is not None:
            kw["streamer"] = streamer
        want = {i: k for i, k in enumerate(prompt_logprobs or ()) if k is not None}
        scores = PromptScores(want, enc["input_ids"], enc["attention_mask"]) if want else None
        with self.lock, self.running(names) as (model, extra), torch.no_grad():
            run = Prefill(model, enc, extra, self.pool, scores).run(prefill_chunk, keep)
            for view in (recorder, suppress):
                view is not None and view.select(run.rows)
            out = model.generate(**run.generate_inputs(), **kw) if run.rows else None
        at, width = {row: i for i, row in enumerate(run.rows)}, enc["input_ids"].shape[1]
        answers = [self._answer(out[at[i], width:width + limits[i]], routes[i], int(enc["attention_mask"][i].sum()),
                                stop) if i in at else None for i in range(len(texts))]
        for i, a in enumerate(answers):
            if a is not None:
                self._attach(a, i, enc, recorder, scores)
        return answers

    @staticmethod
    def _attach(a: Answer, i: int, enc: dict, recorder: Recorder | None, scores: PromptScores | None) -> None:
        """Row i's log-probabilities, where asked, onto its Answer."""
        if recorder is not None and i in recorder.want:
            a.logprobs = recorder.found[i][:len(a.token_ids)]
        if scores is not None and i in scores.want:
            a.prompt_ids = enc["input_ids"][i, scores.starts[i]:].tolist()
            a.prompt_logprobs = scores.of(i)

    def answer_with(self, model: Any, texts: Sequence[str], route: Route, max_new_tokens: int) -> list[Answer]:
        """Greedy answers of another model carrying this base (e.g. PEFT's Arrow router in eval),
        prompted, tokenised, stopped and decoded exactly as `generate` does."""
        import torch

        with self.lock:
            enc = self._inputs(self.render(texts))
        with torch.no_grad():
            out = model.generate(**enc, **self._gen_kwargs(max_new_tokens, 0.0, 1.0, None))
        new = out[:, enc["input_ids"].shape[1]:]
        return [self._answer(row, route, int(mask.sum()), None) for row, mask in zip(new, enc["attention_mask"])]

    def close(self) -> None:
        """Take every adapter off the base model and hand it back as it was (for the next job in a
        training process: selection, gate)."""
        if self.cache.model is not None:
            self.base.model = self.cache.model.unload()

    def _answer(self, ids: Any, route: Route, prompt_tokens: int, stop: Sequence[str] | None) -> Answer:
        ids = ids.tolist()
        ends = end_ids(self.tok)
        n = next((i for i, t in enumerate(ids) if t in ends), len(ids))
        text, stopped = cut_at_stop(self.tok.decode(ids[:n], skip_special_tokens=True), stop or ())
        kept = stop_tokens(self.tok, ids[:n], stop or ()) if stopped else min(n + 1, len(ids))
        return Answer(text.strip(), route, prompt_tokens, n, "stop" if stopped or n < len(ids) else "length",
                      token_ids=ids[:kept], ended=not stopped and n < len(ids))

    def stream(self, text: str, *, task: str | None = None, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0,
               stop: Sequence[str] | None = None) -> tuple[Route, Iterator[str]]:
        """Route one instruction, then yield its answer's text as it is generated.

        The pieces join to exactly `generate`'s text (stop strings never appear in them), and
        the iterator always ends: an error in the generate thread ends the stream and is
        raised to the consumer instead of leaving it waiting."""
        from transformers import TextIteratorStreamer

        (prompt,) = self.check([text], max_new_tokens)
        (route,) = self.routes_for([text], task)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        failed: list[BaseException] = []

        def work() -> None:
            import torch

            try:
                with self.lock, self.running([route.adapter]) as (model, extra), torch.no_grad():
                    model.generate(**self._inputs([prompt]), **extra, streamer=streamer,
                                   **self._gen_kwargs(max_new_tokens, temperature, top_p, stop))
            except BaseException as e:  # handed to the consumer, after the stream ends
                failed.append(e)
            finally:
                streamer.end()  # a second end (generate ends it too) only adds a stop signal

        threading.Thread(target=work, daemon=True).start()
        return route, _pieces(streamer, tuple(stop or ()), failed)


def _pinned(adapter: str) -> Route:
    """The route of a request that names its adapter (the base model: no task)."""
    task = None if adapter == BASE else adapter
    return Route(task, 1.0, [(task, 1.0)] if task else [], False, adapter, "pinned")


def _check_selector(name: str) -> str:
    """`name` if it is a registered selector (chainlora.library.kinds), else a one-line error."""
    if name not in kinds.SELECTORS:
        raise ChainloraError(f"selector: unknown {name!r} (use {' or '.join(kinds.SELECTORS)})")
    return name


def _pieces(streamer: Iterator[str], stops: tuple[str, ...], failed: list[BaseException]) -> Iterator[str]:
    """The safe-to-send growth of the streamed text (see stops.streamable), then the rest of
    the final, stop-cut answer; a generate error is raised once the stream has ended."""
    text = sent = ""
    for piece in streamer:
        text += piece
        safe = streamable(text, stops)
        if len(safe) > len(sent) and safe.startswith(sent):
            yield safe[len(sent):]
            sent = safe
    if failed:
        raise failed[0]
    final = cut_at_stop(text, stops)[0].strip()
    if len(final) > len(sent) and final.startswith(sent):
        yield final[len(sent):]
