"""`chainlora export --format gguf` beyond llama: tiny random Gemma 3, Qwen 2 and Mistral models
built from a config. Every exported LoRA tensor, read back from the GGUF and scaled as llama.cpp
scales it, equals PEFT's `get_delta_weight` for every layer and module, in the row order of that
architecture's llama.cpp converter (q/k permuted for llama and Mistral only); the adapter names
llama.cpp's architecture. A Gemma 3 library exports end to end; a LoRA on Gemma 3's vision tower
and any architecture without known rules (Phi, GPT-2, a GGUF's `phi2`) are refused in one line.
(e2e) The real Gemma 3 270M GGUF: its facts, and q/k stored unpermuted, checked against transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from chainlora.errors import ChainloraError
from chainlora.library import gguf as llamacpp
from chainlora.library import gguf_arch
from conftest import NO_SYSTEM_TEMPLATE, make_random_library, make_tiny_model

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# family -> (llama.cpp architecture, attention heads, key-value heads); llama.cpp's converter
# permutes q/k rows for "llama" only (LlamaModel; Gemma3Model and Qwen2Model write them as they are)
EXPECTED = {"gemma3": ("gemma3", 4, 2), "qwen2": ("qwen2", 4, 2), "mistral": ("llama", 4, 2)}
PERMUTED = {"llama"}


def _model_dir(family: str, directory):
    """A two-layer model of `family` saved to `directory` (Mistral's without a tokenizer)."""
    if family != "mistral":
        return make_tiny_model(directory, family=family, chat_template=NO_SYSTEM_TEMPLATE if family == "gemma3" else True)
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(EXPECTED))
def family(request, tmp_path_factory):
    return request.param, _model_dir(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def _random_lora(model, directory, **lora):
    """`model` with a random LoRA (A and B nonzero) on every projection, saved to `directory`."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": MODULES, **lora}))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.lora.alpha")}
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def _assert_deltas(model, path, arch: str, n_head: int, n_head_kv: int, layers) -> int:
    """Every (layer, module) of `model`'s LoRA: the GGUF's alpha / rank * B @ A, unpermuted where
    `arch` permutes, equals PEFT's get_delta_weight. Returns how many were compared."""
    fields, back = _read(path)
    assert fields["general.architecture"] == arch and fields["general.type"] == "adapter"
    seen = 0
    for i, layer in enumerate(layers):
        for proj in MODULES:
            module = getattr(layer.self_attn if proj in MODULES[:4] else layer.mlp, proj)
            name = f"blk.{i}.{gguf_arch.TENSOR_NAMES[proj]}.weight"
            a, b = back[f"{name}.lora_a"], back[f"{name}.lora_b"]
            delta = fields["adapter.lora.alpha"] / b.shape[1] * (b @ a)  # llama.cpp: alpha / rank of b
            if arch in PERMUTED and proj in ("q_proj", "k_proj"):
                delta = gguf_arch.unpermute(delta, n_head if proj == "q_proj" else n_head_kv)
            np.testing.assert_allclose(delta, module.get_delta_weight("default").detach().numpy(),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{arch} {name}")
            seen += 1
    assert seen == len(back) // 2
    return seen


def test_every_tensor_equals_peft_delta_weight_in_the_architectures_row_order(family, tmp_path):
    from transformers import AutoModelForCausalLM

    name, model_dir = family
    arch, heads, kv = EXPECTED[name]
    facts = gguf_arch.config_facts(model_dir)
    assert (facts["arch"], facts["n_head"], facts["n_head_kv"]) == (arch, heads, kv)
    model = _random_lora(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter",
                         rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3})
    tensors, rank = llamacpp.lora_tensors(tmp_path / "adapter", heads, kv, arch)
    llamacpp.write_adapter(tmp_path / "a.gguf", tensors, rank, arch)
    assert _assert_deltas(model, tmp_path / "a.gguf", arch, heads, kv, model.base_model.model.model.layers) == 14


def test_a_gemma3_library_exports_for_llama_cpps_gemma3(tmp_path):
    """The whole export on a tiny Gemma 3 library: every adapter names gemma3 and gives PEFT's
    update unpermuted; the Modelfile and export.json say which Ollama releases load it."""
    from peft import PeftModel

    from chainlora.base_model import load_base
    from chainlora.library import Library
    from chainlora.library.export import export

    model_dir = make_tiny_model(tmp_path / "gemma3", family="gemma3", chat_template=NO_SYSTEM_TEMPLATE)
    root = make_random_library(tmp_path / "lib", model_dir, ["antonym", "rhyme"], router=False,
                               configs={n: {"target_modules": MODULES} for n in ("antonym", "rhyme", "mixed")})
    report = export(root, tmp_path / "g", "gguf")
    assert report["base"]["arch"] == "gemma3" and report["base"]["file"] is None
    assert report["ollama"]["versions"] == "0.30 to 0.33"
    assert json.loads((tmp_path / "g/export.json").read_text())["ollama"] == report["ollama"]
    lib, base = Library.open(root), load_base(str(model_dir), device="cpu")
    for entry in lib.tasks + [lib.mixed]:
        model = PeftModel.from_pretrained(base.model, str(lib.path(entry)))
        _assert_deltas(model, tmp_path / "g" / report["adapters"][entry["name"]]["path"], "gemma3", 4, 2,
                       model.base_model.model.model.layers)
        base.model = model.unload()
        text = (tmp_path / "g" / report["adapters"][entry["name"]]["modelfile"]).read_text()
        assert text.startswith("# Ollama 0.30 to 0.33 ") and f"ADAPTER ../adapters/{entry['name']}.gguf" in text


def _tiny_gemma3_multimodal(directory):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                         mm_tokens_per_image=4, image_token_index=299,
                                                         boi_token_index=297, eoi_token_index=298))
    model.save_pretrained(directory)
    return directory


def test_gemma3_multimodal_exports_its_text_model_and_refuses_the_vision_tower(tmp_path):
    """Gemma3ForConditionalGeneration converts as gemma3 (the text part, heads from text_config):
    a LoRA on the language model exports; one that also adapts the vision tower is refused."""
    from transformers import Gemma3ForConditionalGeneration

    model_dir = _tiny_gemma3_multimodal(tmp_path / "mm")
    facts = gguf_arch.config_facts(model_dir)
    assert (facts["arch"], facts["n_head"], facts["n_head_kv"]) == ("gemma3", 4, 1)
    model = _random_lora(Gemma3ForConditionalGeneration.from_pretrained(model_dir), tmp_path / "text",
                         target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    tensors, rank = llamacpp.lora_tensors(tmp_path / "text", 4, 1, "gemma3")
    llamacpp.write_adapter(tmp_path / "a.gguf", tensors, rank, "gemma3")
    _assert_deltas(model, tmp_path / "a.gguf", "gemma3", 4, 1, model.base_model.model.model.language_model.layers)
    _random_lora(Gemma3ForConditionalGeneration.from_pretrained(model_dir), tmp_path / "both")
    with pytest.raises(ChainloraError, match=r"a LoRA on 'model\.vision_tower\..*' cannot be loaded by llama\.cpp"):
        llamacpp.lora_tensors(tmp_path / "both", 4, 1, "gemma3")


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_an_unsupported_architecture_is_refused_in_one_line_naming_it(tmp_path, tiny_model_dir):
    """A library on a tiny Phi model: the export stops before writing anything; a GPT-2 config and
    a GGUF of llama.cpp's `phi2` likewise."""
    import gguf
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PhiConfig, PhiForCausalLM

    from chainlora.library.export import export

    phi = tmp_path / "phi"
    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(vocab_size=len(AutoTokenizer.from_pretrained(tiny_model_dir)), hidden_size=32,
                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)).save_pretrained(phi)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, phi / f.name)
    root = make_random_library(tmp_path / "lib", phi, ["antonym"], router=False, mixed=False)
    with pytest.raises(ChainloraError) as e:
        export(root, tmp_path / "out", "gguf")
    assert "'PhiForCausalLM'" in _one_line(e) and "llama, gemma3, qwen2" in str(e.value)
    assert not (tmp_path / "out").exists()
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ChainloraError) as e:
        gguf_arch.config_facts(tmp_path / "gpt2")
    assert "'GPT2LMHeadModel' (model_type 'gpt2')" in _one_line(e)
    writer = gguf.GGUFWriter(str(tmp_path / "phi2.gguf"), "phi2")
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((96, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ChainloraError) as e:
        gguf_arch.gguf_facts(tmp_path / "phi2.gguf")
    assert "architecture 'phi2'" in _one_line(e)


def test_a_config_without_architectures_goes_by_model_type(tmp_path):
    """transformers' GGUF loader leaves `architectures` unset (Gemma 3 270M's config): model_type decides."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "num_attention_heads": 4,
                                                      "num_key_value_heads": 1}))
    assert gguf_arch.config_facts(tmp_path) == {"arch": "gemma3", "shapes": None, "n_head": 4, "n_head_kv": 1}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ChainloraError, match="cannot read the base model's config"):
        gguf_arch.config_facts(tmp_path)


@pytest.mark.e2e
def test_the_real_gemma3_gguf_stores_q_and_k_as_transformers_does():
    """Gemma 3 270M (alias gemma3-270m, skipped when not installed): llama.cpp's facts, every
    adapted weight's shape, and attn_q / attn_k rows in transformers' order (no permutation)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from chainlora.base_model import ALIASES, load_base, package_file, resolve

    if package_file(*ALIASES["gemma3-270m"].chunks[0]) is None:
        pytest.skip("the second model is not installed (make second-model)")
    path = resolve("gemma3-270m")[1]
    facts = gguf_arch.gguf_facts(path)
    assert (facts["arch"], facts["n_head"], facts["n_head_kv"]) == ("gemma3", 4, 1)
    shapes = {p: facts["shapes"][f"blk.17.{gguf_arch.TENSOR_NAMES[p]}.weight"] for p in MODULES}
    assert shapes == {"q_proj": (640, 1024), "k_proj": (640, 256), "v_proj": (640, 256), "o_proj": (1024, 640),
                      "gate_proj": (640, 2048), "up_proj": (640, 2048), "down_proj": (2048, 640)}
    attn = load_base("gemma3-270m", device="cpu").model.model.layers[0].self_attn
    stored = {t.name: t for t in GGUFReader(str(path)).tensors}
    for name, proj in (("blk.0.attn_q.weight", attn.q_proj), ("blk.0.attn_k.weight", attn.k_proj)):
        w = dequantize(stored[name].data, stored[name].tensor_type).reshape(proj.weight.shape)
        with torch.no_grad():
            np.testing.assert_array_equal(w, proj.weight.numpy())
