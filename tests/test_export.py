"""`chainlora finetune` (one adapter, e.g. COLA) and `chainlora export` (plain PEFT, SVD-compressed,
merged): what comes out loads in plain PEFT / transformers and gives the library's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chainlora.errors import ChainloraError
from chainlora.library import Library
from chainlora.library.export import export

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, tmp_path_factory, request) -> Path:
    """A COLA fine-tune of two tasks pooled into one adapter, through the CLI."""
    from chainlora.cli import main

    out = tmp_path_factory.mktemp("ft") / "lib"
    code = main(["finetune", str(TINY), "--out", str(out), "--set", f"base_model={tiny_model_dir}",
                 "--set", "tasks=[antonym, sentiment]", "--set", "training.method=cola",
                 "--set", "training.max_steps=6", "--set", "training.cola.links=3"])
    assert code == 0
    return out


def logits_of(model, tok, text="Give the antonym of the word hot.") -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_finetune_is_one_cola_adapter_that_answers_without_a_router(finetuned, cli):
    lib = Library.open(finetuned)
    assert lib.task_names == ["finetune"] and lib.router is None and lib.mixed is None
    entry = lib.tasks[0]
    assert entry["tasks"] == ["antonym", "sentiment"] and entry["n_train"] == 32
    assert entry["cola"]["links"] == 3 and entry["cola"]["export_rank"] == 12  # 3 links x r=4
    r = cli("generate", str(finetuned), "Give the antonym of the word hot.", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["adapter"] == "finetune" and row["selector"] == "single" and row["probability"] == 1.0


def test_export_peft_copies_and_compresses(finetuned, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = export(finetuned, tmp_path / "full", "peft")
    assert list(full["adapters"]) == ["finetune"]
    ref = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                              str(finetuned / "tasks/finetune")), tok)
    copied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(tmp_path / "full/finetune"))
    assert torch.equal(logits_of(copied, tok), ref)
    errors, gaps = [], []
    for r in (2, 6, 12):
        rep = export(finetuned, tmp_path / f"r{r}", "peft", compress_rank=r)["adapters"]["finetune"]["compress"]
        assert rep["rank"] == r and rep["from_rank"] == 12 and len(rep["module_errors"]) == 4
        assert json.loads((tmp_path / f"r{r}/finetune/adapter_config.json").read_text())["r"] == r
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(tmp_path / f"r{r}/finetune"))
        errors.append(rep["relative_error"])
        gaps.append(float((logits_of(model, tok) - ref).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5  # full rank: exact
    assert gaps[2] <= 1e-5 and gaps[0] >= gaps[2]


@pytest.mark.slow
def test_export_merged_has_the_adapters_logits(finetuned, tiny_model_dir, tmp_path, cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = cli("export", str(finetuned), "--format", "merged", "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("*.bin")) and list((tmp_path / "merged").glob("*.safetensors"))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    str(finetuned / "tasks/finetune"))
    assert (logits_of(merged, tok) - logits_of(ref, tok)).abs().max() <= 1e-5


@pytest.mark.slow
def test_export_refuses_bad_requests(finetuned, random_lib, tmp_path, cli):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    cases = [
        (["--format", "onnx", "--out", str(tmp_path / "x")], "argument --format: invalid choice: 'onnx'"),
        (["--format", "peft", "--out", str(keep)], f"--out {keep}: exists and is not an earlier export"),
        (["--format", "peft", "--out", str(finetuned / "sub")], "must be outside the library"),
        (["--format", "peft", "--adapter", "nope", "--out", str(tmp_path / "y")], "--adapter: no adapter 'nope'"),
        (["--format", "merged", "--compress-rank", "2", "--out", str(tmp_path / "z")], "--compress-rank: a rank >= 1"),
    ]
    for args, message in cases:
        r = cli("export", str(finetuned), *args)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert (keep / "notes.txt").read_text() == "mine"
    r = cli("export", str(random_lib), "--format", "merged", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "--adapter: name the adapter to merge" in r.stderr
    r = cli("export", str(random_lib), "--format", "gguf", "--base-dtype", "f32", "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and "nothing to re-encode" in r.stderr and not (tmp_path / "g").exists()
    with pytest.raises(ChainloraError, match="above finetune's rank 12"):
        export(finetuned, tmp_path / "big", "peft", compress_rank=13)


@pytest.mark.slow
def test_export_vllm_writes_adapters_and_the_command(random_lib, tmp_path, cli):
    r = cli("export", str(random_lib), "--format", "vllm", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "v/export.json").read_text())
    names = ["antonym", "sentiment", "rhyme", "hypernym", "definition", "mixed"]
    assert list(rep["lora_modules"]) == names and rep["max_lora_rank"] == 8 and rep["max_loras"] == 6
    assert all((Path(p) / "adapter_model.safetensors").is_file() for p in rep["lora_modules"].values())
    cmd = rep["command"]
    assert cmd[:3] == ["vllm", "serve", rep["base_path"]] and "--enable-lora" in cmd and "antonym=" in " ".join(cmd)
    assert (tmp_path / "v/serve.sh").stat().st_mode & 0o111 and "vllm serve" in r.stdout
    # the front sends fallback rows to the base model under the name vLLM serves it by
    assert rep["front"].endswith(f"--backend-base-model {rep['base_path']}") and "--backend openai" in rep["front"]
    bad = tmp_path / "bad"
    shutil.copytree(random_lib, bad)
    cfg_path = bad / "tasks/rhyme/adapter_config.json"
    for change, message in [({"modules_to_save": ["lm_head"]}, "modules_to_save 'lm_head'"),
                            ({"r": 600}, "rank 600 is above vLLM's largest --max-lora-rank 512")]:
        cfg = json.loads((random_lib / "tasks/rhyme/adapter_config.json").read_text())
        cfg_path.write_text(json.dumps({**cfg, **change}))
        manifest = json.loads((bad / "chainlora.json").read_text())
        from chainlora import library

        entry = next(t for t in manifest["tasks"] if t["name"] == "rhyme")
        entry["sha256"] = library.adapter_sha256(bad / "tasks/rhyme")
        (bad / "chainlora.json").write_text(json.dumps(manifest))
        r = cli("export", str(bad), "--format", "vllm", "--out", str(tmp_path / "v2"))
        assert r.returncode == 2 and message in r.stderr, r.stderr
