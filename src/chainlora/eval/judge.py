"""`chainlora judge`: helpfulness 1-6 by an LLM judge (Qiu et al. Table IV, LIMA's rubric).

Answers of the chain, the mixed adapter and the base model are rated by any OpenAI-compatible
chat endpoint. The judge is asked for its reasoning first and the bare score alone on its last
line; a reply without a parseable score is asked again once, then recorded as missing — never
guessed. Calls run concurrently (bounded) through the `openai` SDK, whose own timeout and
retries (jittered backoff on 408 / 409 / 429 / 5xx / network errors, honouring Retry-After)
cover the transient failures; every reply is cached on disk (LIB/eval/judge-cache.jsonl, keyed
by the judge model and the exact prompt), so a rerun — or a run after a crash — does not pay twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from chainlora.errors import ChainloraError

RUBRIC = """You are rating how helpful an AI assistant's response is to a user's request.

Rate on this 6-point scale:
1 = Not helpful: irrelevant, wrong, unclear or empty; nothing the user can use.
2 = Somewhat helpful: touches the request but is mostly wrong, vague or incomplete.
3 = Moderately helpful: partly answers it, with clear errors or omissions.
4 = Helpful: answers the request correctly with minor flaws.
5 = Very helpful: a correct, clear and complete answer.
6 = Highly helpful: an excellent answer; correct, clear, complete and well put.

[Request]
{instruction}

[Reference answer (may be one of several correct answers)]
{reference}

[Response]
{answer}

First explain your reasoning in a few sentences. Then give the score as a single number from 1
to 6 alone on the last line."""

RETRY = "Your reply did not end with the score. Reply with only the score, a number from 1 to 6."
SCORE = re.compile(r"^\W*(?:score\W*)?([1-6])(?:\s*(?:/|out of)\s*6)?\W*$", re.IGNORECASE)


def parse_score(reply: str | None) -> int | None:
    """The score on the reply's last non-empty line ("5", "Score: 5", "**5/6**"); else None."""
    lines = [ln.strip() for ln in (reply or "").splitlines() if ln.strip()]
    if not lines:
        return None
    m = SCORE.match(lines[-1])
    return int(m.group(1)) if m else None


def _client(url: str, api_key: str | None, timeout_s: float, retries: int) -> tuple[Any, dict]:
    """The SDK's async client, so retries and backoff are the SDK's, not ours, and the headers
    for each call: without a key none is sent (a local judge needs none) rather than the SDK's
    fallback, OPENAI_API_KEY, which --api-key-env did not name."""
    try:
        from openai import AsyncOpenAI, Omit
    except ImportError as e:
        raise ChainloraError(f"chainlora judge needs the package openai: pip install 'openai>=1.57' ({e})")
    client = AsyncOpenAI(base_url=url, api_key=api_key or "none", timeout=timeout_s, max_retries=retries)
    return client, ({} if api_key else {"Authorization": Omit()})  # the SDK insists on a key


def _failure(e: Exception, tries: int) -> str:
    """One line for an SDK error: permanent HTTP errors as they are, transient ones as given up."""
    import openai

    if isinstance(e, openai.APIStatusError):
        status = f"HTTP {e.status_code}: {e.response.text[:200]}"
        transient = e.status_code in (408, 409, 429) or e.status_code >= 500
        return f"gave up after {tries} tries ({status})" if transient else status
    return f"gave up after {tries} tries ({type(e.__cause__ or e).__name__})"


class Judge:
    """An OpenAI-compatible chat endpoint used as a judge, with a disk cache."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, cache: Path | None = None,
                 concurrency: int = 4, timeout_s: float = 60.0, retries: int = 2):
        self.url = url.rstrip("/")  # a base URL as the OpenAI SDK takes it: .../v1, .../v1beta/openai
        self.model, self.cache_path, self.retries = model, cache, retries
        self.client, self.headers = _client(self.url, api_key, timeout_s, retries)  # retries: max_retries
        self.gate = asyncio.Semaphore(concurrency)
        self.cache: dict[str, dict] = {}
        self.pending: dict[str, asyncio.Future] = {}  # same prompt twice in one run: one call
        self.calls = 0  # HTTP requests sent, retries included
        if cache is not None and cache.is_file():
            for line in cache.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    item = json.loads(line)
                    self.cache[item["key"]] = item
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a killed run: that call is simply redone

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model}\n{prompt}".encode()).hexdigest()

    def _remember(self, item: dict) -> None:
        self.cache[item["key"]] = item
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():  # a torn last line (killed run) must not swallow this one
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                    f.seek(0, os.SEEK_END)
                    if torn:
                        f.write(b"\n")
                f.write((json.dumps(item, ensure_ascii=False) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())

    async def _chat(self, messages: list[dict]) -> str:
        """One chat call; the SDK retries the transient failures, anything left is one line."""
        import openai

        try:
            async with self.gate:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=512,
                    extra_headers=self.headers)
                self.calls += 1 + raw.retries_taken
            content = raw.parse().choices[0].message.content
            if content is not None and not isinstance(content, str):
                raise TypeError("message content is not text")
            return content or ""
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            raise ChainloraError(f"judge {self.url}: {_failure(e, self.retries + 1)}") from None
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:  # 200, but no chat reply
            raise ChainloraError(f"judge {self.url}: malformed reply ({e.__class__.__name__})") from None

    async def rate(self, instruction: str, reference: str, answer: str) -> dict:
        """{score (1-6 or None), reply, retried} for one answer, from the cache when there."""
        prompt = RUBRIC.format(instruction=instruction, reference=reference, answer=answer or "(empty)")
        key = self._key(prompt)
        if key in self.cache:
            return self.cache[key]
        if key in self.pending:
            return await asyncio.shield(self.pending[key])
        self.pending[key] = asyncio.get_running_loop().create_future()
        try:
            item = await self._rate(key, prompt)
        except BaseException as e:
            fut = self.pending.pop(key)
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters (if any) still get it; no "never retrieved" noise
            raise
        self.pending.pop(key).set_result(item)
        return item

    async def _rate(self, key: str, prompt: str) -> dict:
        messages = [{"role": "user", "content": prompt}]
        reply = await self._chat(messages)
        score, retried = parse_score(reply), False
        if score is None:  # once more, asking for the bare score
            retried = True
            second = await self._chat(messages + [{"role": "assistant", "content": reply},
                                                  {"role": "user", "content": RETRY}])
            score = parse_score(second)
            reply = f"{reply}\n[retry]\n{second}"
        item = {"key": key, "score": score, "reply": reply, "retried": retried}
        self._remember(item)
        return item

    async def close(self) -> None:
        await self.client.close()


async def rate_all(judge: Judge, items: Sequence[dict]) -> list[dict]:
    """Rate every {instruction, reference, answer} item concurrently (bounded by the judge)."""
    from chainlora.console import bar as progress_bar

    bar = progress_bar(total=len(items), desc="judge", unit="answer")

    async def one(item: dict) -> dict:
        out = await judge.rate(item["instruction"], item["reference"], item["answer"])
        bar.update()
        return {**item, "score": out["score"], "retried": out["retried"]}

    tasks = [asyncio.ensure_future(one(i)) for i in items]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:  # one call gave up: stop the others before the client closes
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()


def summarize(rated: Sequence[dict]) -> dict[str, Any]:
    """Per system: mean score over scored answers, the 1-6 distribution, missing count."""
    out: dict[str, Any] = {}
    for system in dict.fromkeys(r["system"] for r in rated):
        rows = [r for r in rated if r["system"] == system]
        scores = [r["score"] for r in rows if r["score"] is not None]
        tasks = dict.fromkeys(r["task"] for r in rows)
        out[system] = {
            "n": len(rows), "scored": len(scores), "missing": len(rows) - len(scores),
            "mean": sum(scores) / len(scores) if scores else None,
            "distribution": {str(k): scores.count(k) for k in range(1, 7)},
            "per_task": {t: _mean([r["score"] for r in rows if r["task"] == t and r["score"] is not None])
                         for t in tasks}}
    return out


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run(engine: Any, records: Sequence[Any], *, url: str, model: str, api_key: str | None, cache: Path,
        systems: Sequence[str] = ("chain", "mixed", "base"), concurrency: int = 4, timeout_s: float = 60.0,
        max_new_tokens: int = 64) -> dict:
    """Answer every record with each system, have the judge rate them, summarize."""
    from chainlora.eval.evaluate import system_answers

    items = [{"system": system, "task": r.task, "instruction": r.text, "reference": r.output,
              "answer": a.text, "adapter": a.route.adapter}
             for system, answers in system_answers(engine, records, systems, max_new_tokens).items()
             for r, a in zip(records, answers)]

    async def go() -> tuple[list[dict], int]:
        judge = Judge(url, model, api_key=api_key, cache=cache, concurrency=concurrency, timeout_s=timeout_s)
        try:
            rated = await rate_all(judge, items)
        finally:
            await judge.close()
        return rated, judge.calls

    rated, calls = asyncio.run(go())
    return {"judge": {"url": url, "model": model}, "calls": calls, "summary": summarize(rated), "ratings": rated}
