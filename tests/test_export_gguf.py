"""`chainlora export --format gguf`: every exported LoRA tensor, read back from the GGUF file and
scaled as llama.cpp scales it, equals PEFT's own update (`get_delta_weight`) for every layer and
module: rank_pattern, alpha_pattern and rsLoRA included, q/k rows in llama.cpp's order. Plus
the refusals, and (e2e) the permutation checked against the default model's own GGUF."""

from __future__ import annotations

import numpy as np
import pytest

from chainlora.errors import ChainloraError
from chainlora.library import gguf as llamacpp
from chainlora.library import gguf_arch

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(tmp_path, tiny_model_dir, **lora):
    """A PEFT LoRA on the tiny Llama (4 heads, 2 key-value heads) with random A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": MODULES, **lora}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.mark.parametrize("lora", [{}, {"rank_pattern": {"q_proj": 2, "down_proj": 3}, "alpha_pattern": {"v_proj": 3}},
                                  {"use_rslora": True, "r": 3}])
def test_every_exported_tensor_equals_peft_delta_weight(tmp_path, tiny_model_dir, lora):
    model, directory = _adapter(tmp_path, tiny_model_dir, **lora)
    tensors, rank = llamacpp.lora_tensors(directory, n_head=4, n_head_kv=2)
    llamacpp.write_adapter(tmp_path / "a.gguf", tensors, rank)
    fields, back = _read(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    seen = 0
    for layer_idx, layer in enumerate(model.base_model.model.model.layers):
        for proj in MODULES:
            module = getattr(layer.self_attn if proj in MODULES[:4] else layer.mlp, proj)
            name = f"blk.{layer_idx}.{gguf_arch.TENSOR_NAMES[proj]}.weight"
            a, b = back[f"{name}.lora_a"], back[f"{name}.lora_b"]
            assert a.shape == (rank, module.in_features) and b.shape == (module.out_features, rank)
            delta = (fields["adapter.lora.alpha"] / b.shape[1]) * (b @ a)  # llama.cpp: alpha / rank of b
            if proj in ("q_proj", "k_proj"):
                delta = gguf_arch.unpermute(delta, 4 if proj == "q_proj" else 2)
            expected = module.get_delta_weight("default").detach().numpy()
            np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == 2 * len(MODULES) == len(back) // 2


def test_permute_and_unpermute_are_inverse_and_not_the_identity():
    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    assert not np.array_equal(gguf_arch.permute(w, 3), w)
    np.testing.assert_array_equal(gguf_arch.unpermute(gguf_arch.permute(w, 3), 3), w)


@pytest.mark.parametrize("lora, message", [({"use_dora": True}, "DoRA"),
                                           ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                           ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens")])
def test_what_llama_cpp_cannot_load_is_one_clear_error(tmp_path, tiny_model_dir, lora, message):
    _, directory = _adapter(tmp_path, tiny_model_dir, **lora)
    with pytest.raises(ChainloraError, match=message):
        llamacpp.lora_tensors(directory, n_head=4, n_head_kv=2)


def test_modelfile_carries_system_prompt_and_the_training_template(tiny_model_dir):
    from transformers import AutoTokenizer

    template = llamacpp.ollama_template(AutoTokenizer.from_pretrained(tiny_model_dir))
    text = llamacpp.modelfile("antonym", "Answer briefly.", template, "<|im_end|>")
    assert text.splitlines()[2:4] == ["FROM ../base.gguf", "ADAPTER ../adapters/antonym.gguf"]
    assert text.startswith("# Ollama 0.24 to 0.33 ") and "0.34.1 and later refuse ADAPTER" in text.splitlines()[1]
    assert llamacpp.modelfile("antonym", None, None, None, "gemma3").startswith("# Ollama 0.30 to 0.33 ")
    assert 'SYSTEM """Answer briefly."""' in text and "<|im_start|>assistant\n{{ .Response }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    with pytest.raises(ChainloraError, match='system_prompt: contains """'):
        llamacpp.modelfile("antonym", 'Say """hi"""', template, None)


@pytest.mark.e2e
def test_permutation_matches_the_default_models_own_gguf(default_base):
    """llama.cpp's attn_q / attn_k rows are transformers' q_proj / k_proj rows permuted (9 heads, 3 kv)."""
    import gguf
    from gguf.quants import dequantize

    from chainlora.base_model import resolve

    reader = gguf.GGUFReader(str(resolve("smollm2-135m")[1]))
    stored = {t.name: t for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    attn = default_base.model.model.layers[0].self_attn
    for name, proj, heads in (("blk.0.attn_q.weight", attn.q_proj, 9), ("blk.0.attn_k.weight", attn.k_proj, 3)):
        t = stored[name]
        w = dequantize(t.data, t.tensor_type).reshape(proj.weight.shape)
        np.testing.assert_allclose(w, gguf_arch.permute(proj.weight.detach().numpy(), heads), atol=1e-6)


def test_an_adapter_for_another_model_is_refused(tmp_path, tiny_model_dir):
    _, directory = _adapter(tmp_path, tiny_model_dir)
    tensors, _ = llamacpp.lora_tensors(directory, n_head=4, n_head_kv=2)
    shapes = {k[: -len(".lora_a")]: (v.shape[1], tensors[k[:-1] + "b"].shape[0]) for k, v in tensors.items()
              if k.endswith(".lora_a")}
    llamacpp.check_fits(tensors, shapes, directory)  # fits itself
    with pytest.raises(ChainloraError, match="blk.0.attn_q.weight .* does not fit"):
        llamacpp.check_fits(tensors, {**shapes, "blk.0.attn_q.weight": (576, 576)}, directory)


def test_reencoded_base_keeps_metadata_and_values(tmp_path):
    """A small GGUF (one quantised matrix, one norm, a chat template) re-encoded as f32 / q8_0."""
    import gguf
    from gguf.quants import quantize

    src = tmp_path / "src.gguf"
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_chat_template("{{ messages }}")
    writer.add_uint32("llama.attention.head_count", 2)
    writer.add_tensor("blk.0.attn_q.weight", quantize(w, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for dtype, tol in (("f32", 0.0), ("q8_0", 0.02)):
        llamacpp.reencode_base(src, tmp_path / f"{dtype}.gguf", dtype)
        reader = gguf.GGUFReader(str(tmp_path / f"{dtype}.gguf"))
        assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
        assert reader.fields["general.file_type"].contents() == llamacpp.FILE_TYPES[dtype]
        q = {t.name: t for t in reader.tensors}["blk.0.attn_q.weight"]
        back = gguf.quants.dequantize(q.data, q.tensor_type).reshape(w.shape)
        ref = gguf.quants.dequantize(quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_allclose(back, ref.reshape(w.shape), atol=tol + 1e-7)


def test_a_library_on_a_model_directory_exports_its_adapters(random_lib, tmp_path, cli):
    """The tiny random library (a Hugging Face directory base): every adapter's GGUF tensors give
    PEFT's update; no base.gguf (llama.cpp's converter makes it), said in the report."""
    import json

    import torch
    from peft import PeftModel

    from chainlora.library import Library
    from chainlora.base_model import load_base

    r = cli("export", str(random_lib), "--format", "gguf", "--out", str(tmp_path / "g"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["base"]["file"] is None and not (tmp_path / "g" / "base.gguf").exists()
    lib = Library.open(random_lib)
    base = load_base(lib.manifest["base_model"]["name"], device="cpu")
    for entry in lib.tasks + [lib.mixed]:
        model = PeftModel.from_pretrained(base.model, str(lib.path(entry)))
        fields, back = _read(tmp_path / "g" / report["adapters"][entry["name"]]["path"])
        for i, layer in enumerate(model.base_model.model.model.layers):
            for proj, heads in (("q_proj", 4), ("v_proj", None)):
                a, b = back[f"blk.{i}.{gguf_arch.TENSOR_NAMES[proj]}.weight.lora_a"], \
                    back[f"blk.{i}.{gguf_arch.TENSOR_NAMES[proj]}.weight.lora_b"]
                delta = fields["adapter.lora.alpha"] / b.shape[1] * (b @ a)
                delta = gguf_arch.unpermute(delta, heads) if heads else delta
                with torch.no_grad():
                    expected = getattr(layer.self_attn, proj).get_delta_weight("default").numpy()
                np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
        base.model = model.unload()
