"""The adapter pool against PEFT, its reference: the same logits and token-for-token the same
greedy answers for mixed batches of random adapters (B != 0) of different ranks, scalings and
targets, through evictions, slot growth, reloads and rows without an adapter."""

from __future__ import annotations

import torch
import pytest

from chainlora.errors import ChainloraError
from chainlora.inference.engine import BASE, Engine
from conftest import make_random_library

TASKS = ["antonym", "sentiment", "rhyme", "hypernym", "definition"]
TEXTS = ["Give the antonym of hot.", "Is the word happy positive or negative?", "What rhymes with cat?",
         "Name a hypernym of dog.", "Define the word lamp.", "Give the antonym of tall."]
# ranks that differ (a COLA export is rank sum r), rsLoRA, an alpha_pattern, other targets
CONFIGS = {"sentiment": {"r": 12, "lora_alpha": 7},
           "rhyme": {"r": 2, "use_rslora": True},
           "hypernym": {"r": 6, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        "alpha_pattern": {"o_proj": 3.0}},
           "mixed": {"r": 16}}


@pytest.fixture(scope="module")
def lib(tiny_model_dir, tmp_path_factory):
    return make_random_library(tmp_path_factory.mktemp("pool") / "lib", tiny_model_dir, TASKS, configs=CONFIGS)


@pytest.fixture(scope="module")
def peft(lib):
    return Engine.load(lib, device="cpu")


def logits(engine: Engine, names: list[str], ids: torch.Tensor) -> torch.Tensor:
    with engine.lock, engine.running(names) as (model, extra), torch.no_grad():
        return model(input_ids=ids, **extra).logits


def test_mixed_batches_give_peft_s_logits_and_answers(lib, peft):
    pool = Engine.load(lib, device="cpu", adapters="pool", max_adapters=3)
    ids = torch.randint(3, 100, (6, 9), generator=torch.Generator().manual_seed(0))
    batches = [["antonym", "sentiment", "rhyme", "rhyme", BASE, "antonym"],  # fills the 3 slots
               ["hypernym"] * 6, [BASE] * 6, ["definition", "mixed", BASE, "mixed", "definition", "hypernym"],
               ["antonym", "sentiment", "rhyme", "hypernym", "mixed", BASE],  # more than 3 at once: grows
               ["mixed", "antonym", "mixed", "definition", "rhyme", "hypernym"]]
    for names in batches:
        want, got = logits(peft, names, ids), logits(pool, names, ids)
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-4), (names, (want - got).abs().max())
    plain = logits(peft, [BASE] * 6, ids)
    assert (plain - logits(pool, ["hypernym"] * 6, ids)).abs().max() > 1e-2  # the adapters act
    assert pool.pool.stats.evictions > 0 and pool.pool.capacity > 3  # evicted, and grew for batch 1
    tasks = ["antonym", "sentiment", "rhyme", "hypernym", "definition", "mixed"]
    for order in (tasks, tasks[::-1], tasks[2:] + tasks[:2]):
        want = peft.generate(TEXTS, task=order, max_new_tokens=8)
        got = pool.generate(TEXTS, task=order, max_new_tokens=8)
        assert [a.text for a in got] == [a.text for a in want] and \
            [a.completion_tokens for a in got] == [a.completion_tokens for a in want]
    (a,) = pool.generate(TEXTS[:1], task="rhyme", max_new_tokens=8)
    assert a.text == peft.generate(TEXTS[:1], task="rhyme", max_new_tokens=8)[0].text  # one adapter: no gather
    pieces = pool.stream(TEXTS[1], task="sentiment", max_new_tokens=8)[1]
    assert "".join(pieces) == peft.generate(TEXTS[1:2], task="sentiment", max_new_tokens=8)[0].text
    # the router still scores through PEFT, with the pool out of play
    assert [r.task for r in pool.route(TEXTS)] == [r.task for r in peft.route(TEXTS)]
    assert pool.pool.batch is None


def test_a_reload_drops_changed_adapters_from_their_slots(lib, peft, tmp_path):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(lib, copy)
    pool = Engine.load(copy, device="cpu", adapters="pool", max_adapters=4)
    pool.generate(TEXTS[:2], task=["antonym", "rhyme"], max_new_tokens=2)
    before = dict(pool.pool.resident)
    shutil.copytree(lib / "tasks/sentiment", copy / "tasks/antonym", dirs_exist_ok=True)  # antonym := sentiment's
    import json
    manifest = json.loads((copy / "chainlora.json").read_text())
    sha = {t["name"]: t["sha256"] for t in manifest["tasks"]}
    for t in manifest["tasks"]:
        if t["name"] == "antonym":
            t["sha256"] = sha["sentiment"]
    from chainlora import library
    library.write_manifest(copy, manifest)
    assert pool.reload()["changed"] == ["antonym"]
    assert "antonym" not in pool.pool.resident and pool.pool.resident["rhyme"] == before["rhyme"]
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(pool, ["antonym", "rhyme"], ids), logits(peft, ["sentiment", "rhyme"], ids),
                          atol=1e-5, rtol=1e-4)


def test_adapters_the_pool_cannot_hold_are_refused_by_name(tiny_model_dir, tmp_path):
    lib = make_random_library(tmp_path / "lib", tiny_model_dir, ["antonym", "rhyme"], router=False,
                              configs={"rhyme": {"use_dora": True}})
    pool = Engine.load(lib, device="cpu", adapters="pool")
    assert set(pool.stage(["antonym", "rhyme"])) == {"rhyme"}
    with pytest.raises(ChainloraError, match="'rhyme'.*use_dora.*--adapters peft"):
        pool.generate(TEXTS[:1], task="rhyme", max_new_tokens=2)
    assert pool.generate(TEXTS[:1], task="antonym", max_new_tokens=2)[0].completion_tokens >= 1
    with pytest.raises(ChainloraError, match="adapters: unknown 'vllm'"):
        Engine.load(lib, device="cpu", adapters="vllm")


def test_a_cold_reload_skips_the_hash_of_an_unchanged_file_and_never_of_a_changed_one(lib, tmp_path, monkeypatch):
    """store.read_verified's memo: an adapter hashed once is read again without its hash while
    its file is unchanged; a write (even of the same size) is hashed again and refused, and a
    file written just before it was hashed is not remembered (coarse file times)."""
    import os
    import shutil
    import time

    from chainlora.library import store

    root = tmp_path / "lib"
    shutil.copytree(lib, root)
    weights = root / "tasks" / "antonym" / "adapter_model.safetensors"
    hashed = []
    real = store.files_sha256
    monkeypatch.setattr(store, "files_sha256", lambda named: hashed.append(1) or real(named))
    engine = Engine.load(root, device="cpu", adapters="pool")

    def cold() -> int:
        """Hashes one cold load of the adapter made."""
        engine.pool.drop({"antonym"})
        engine.cache.cpu.pop("antonym", None)
        before = len(hashed)
        engine.pool.acquire(["antonym"])
        return len(hashed) - before

    os.utime(weights)  # written just now
    assert [cold(), cold()] == [1, 1]  # too fresh to remember
    old = time.time() - 60
    for f in weights.parent.iterdir():
        os.utime(f, (old, old))
    assert [cold(), cold(), cold()] == [1, 0, 0]  # hashed once more, then remembered
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, new content
    weights.write_bytes(bytes(data))
    with pytest.raises(ChainloraError, match="corrupt"):
        cold()


def test_tensor_views_read_what_safetensors_wrote():
    """The cold load's zero-copy parse: every tensor equal to safetensors' own load, or None
    (the caller then uses safetensors) where it does not apply."""
    from safetensors.torch import load, save

    from chainlora.inference.adapter_file import tensor_views

    cases = [{"x.lora_A.weight": torch.randn(8, 16), "x.lora_B.weight": torch.randn(16, 8), "empty": torch.zeros(0, 4),
              "scalar": torch.tensor(2.0)},
             {"a": torch.randn(3), "b": torch.randn(4).half(), "c": torch.randn(2, 2).bfloat16()},
             {"ids": torch.arange(3)}]
    for state in cases:
        data = save(state, metadata={"format": "pt"})
        views = tensor_views(data)
        if views is None:
            assert any(t.dtype not in (torch.float32,) for t in state.values())
            continue
        ref = load(data)
        assert set(views) == set(ref) and all(torch.equal(views[k], ref[k]) and views[k].dtype == ref[k].dtype
                                              for k in ref)
    assert tensor_views(save(cases[0])) is not None and tensor_views(save(cases[2])) is None


def test_a_verified_adapter_is_read_straight_into_its_slot(tiny_model_dir, tmp_path, monkeypatch):
    """A cold reload of an adapter hashed before and unchanged since reads its data section into
    the slot tensors (no bytes in between) and gives PEFT's logits. A file replaced after it was
    staged is read and hashed again when taken from the CPU tier (here: refused as corrupt); one
    replaced between that check and the read is refused by name at the read (its identity is
    checked on the open file); never half-loaded."""
    import os
    import time

    from chainlora.inference.adapter_file import FileTensors

    root = make_random_library(tmp_path / "lib", tiny_model_dir, ["antonym", "definition"], r=8)  # = the slots' rank
    peft = Engine.load(root, device="cpu")
    old = time.time() - 60
    for f in root.rglob("*"):
        os.utime(f, (old, old))
    engine = Engine.load(root, device="cpu", adapters="pool", max_adapters=2)
    ids = torch.randint(3, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    names = ["antonym", "definition", "antonym", "definition"]
    for _ in range(3):  # evicted and reloaded each time: the first read hashes, the others do not
        for n in ("antonym", "definition"):
            engine.pool.drop({n})
            engine.cache.cpu.pop(n, None)
        got = logits(engine, names, ids)
        want = logits(peft, names, ids)
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-4)
    item = engine.cache.cpu["antonym"]
    staged = item[1]
    assert isinstance(staged, FileTensors) and staged.data is None  # never read into bytes
    assert any(p is not None and p.views for p in engine.pool.plans.values())
    engine.pool.drop({"antonym"})
    weights = root / "tasks" / "antonym" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # after staging: the CPU tier still holds the old identity
    free = list(engine.pool.free)
    with pytest.raises(ChainloraError, match="corrupt"):  # seen stale when taken from the CPU tier: hashed again
        engine.pool.acquire(["antonym"])
    engine.cache.cpu["antonym"] = item  # staged again, as before the write
    monkeypatch.setattr(FileTensors, "stale", lambda self: False)  # changed between the check and the read
    with pytest.raises(ChainloraError, match="changed since it was checked"):
        engine.pool.acquire(["antonym"])
    assert sorted(engine.pool.free) == sorted(free) and "antonym" not in engine.pool.resident


def test_the_slots_take_the_library_s_largest_rank(lib, tiny_model_dir, tmp_path):
    """A rank-4 library gets rank-4 slots: each adapter's B fills its slot, so a cold load reads
    the file straight into the slot tensors (no padded, strided copy) and gives PEFT's logits. A
    library of mixed ranks gets its largest (here the rank-16 mixed adapter)."""
    assert Engine.load(lib, device="cpu", adapters="pool").pool.r_max == 16
    root = make_random_library(tmp_path / "lib", tiny_model_dir, ["antonym", "definition"], r=4)
    peft, engine = Engine.load(root, device="cpu"), Engine.load(root, device="cpu", adapters="pool")
    assert engine.pool.r_max == 4
    ids = torch.randint(3, 100, (4, 7), generator=torch.Generator().manual_seed(1))
    names = ["antonym", "definition", "mixed", BASE]
    for _ in range(2):  # the second time from the CPU tier: a staged file, read into the slot
        engine.pool.drop({"antonym", "definition", "mixed"})
        assert torch.allclose(logits(peft, names, ids), logits(engine, names, ids), atol=1e-5, rtol=1e-4)
    views = [v for p in engine.pool.plans.values() if p is not None for v in p.views.values()]
    assert views and all(flat and buffers is not None for _, flat, _, buffers in views)


def test_a_header_that_lies_is_refused_not_loaded(tmp_path):
    """A safetensors header whose shapes or offsets do not match its data is never viewed or
    read into a slot: the file goes to safetensors' own parser, which refuses it."""
    import json as json_

    from safetensors.torch import save

    from chainlora.inference.adapter_file import tensor_views

    good = save({"a": torch.randn(4, 8), "b": torch.randn(8, 4)})
    assert tensor_views(good) is not None
    n = int.from_bytes(good[:8], "little")
    header = json_.loads(good[8:8 + n])
    for key, change in (("shape", [4, 4]), ("data_offsets", [0, 64])):
        bad = dict(header, a={**header["a"], key: change})
        text = json_.dumps(bad, separators=(",", ":")).encode()
        text += b" " * (n - len(text))  # the header keeps its length (safetensors pads it with spaces)
        assert len(text) == n
        assert tensor_views(good[:8] + text + good[8 + n:]) is None, key
