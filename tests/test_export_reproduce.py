"""Exports that reproduce the library (issue 42, findings 10 and 11).

- gguf: each Ollama Modelfile's SYSTEM + TEMPLATE, rendered the way Ollama renders a legacy
  (.System / .Prompt / .Response) template, gives exactly the prompt tokens training used
  (chainlora.data.examples.tokenize), default system message included; one export.json, no
  manifest.json.
- peft / vllm: the exported adapter_config.json names the base by its portable name (the local
  path kept in export.json), export.json records the prompt and every selector with the default,
  and the selectors that are not LoRAs are copied.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from chainlora.data import examples, prompts
from chainlora.data.records import Record
from chainlora.library import Library, export, llamacpp, store

# SmolLM2's template shape with another default system message: what makes the finding show
# on a tiny model (the conftest template writes no system message of its own).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
RECORDS = [Record(task="antonym", instruction="Give the antonym of the word hot.", output="cold"),
           Record(task="rhyme", instruction="Find a rhyme.", input="cat", output="hat")]


# -- Ollama, as far as these templates need it (ollama template/template.go, legacy path) ----------

def go_render(template: str, values: dict[str, str], last: bool) -> str:
    """Go text/template for what the export writes: text, {{ .Field }}, {{ if .Field }} ...
    {{ else }} ... {{ end }}. Ollama runs the last turn only up to {{ .Response }}."""
    out, open_ifs = [], []
    for piece in re.split(r"(\{\{.*?\}\})", template, flags=re.S):
        action = re.fullmatch(r"\{\{ (.*?) \}\}", piece, flags=re.S)
        on = all(open_ifs)
        if action is None:
            out.append(piece if on else "")
        elif action.group(1).startswith("if ."):
            open_ifs.append(bool(values[action.group(1)[4:]]))
        elif action.group(1) == "else":
            open_ifs[-1] = not open_ifs[-1]
        elif action.group(1) == "end":
            open_ifs.pop()
        elif action.group(1) == ".Response" and last:
            break
        elif re.fullmatch(r"\.\w+", action.group(1)):
            out.append(values[action.group(1)[1:]] if on else "")
        else:
            raise AssertionError(f"the renderer does not know {piece!r}")
    assert last or not open_ifs, "unbalanced if/end"
    return "".join(out)


def parse_modelfile(text: str) -> dict[str, str]:
    """SYSTEM / TEMPLATE (triple-quoted, possibly multi-line) and the one-line commands."""
    found = {m.group(1): m.group(2) for m in re.finditer(r'^(SYSTEM|TEMPLATE) """(.*?)"""$', text, re.S | re.M)}
    for line in text.splitlines():
        if line.split(" ")[0] in ("FROM", "ADAPTER"):
            found[line.split(" ")[0]] = line.split(" ", 1)[1]
    return found


def ollama_prompt(modelfile: str, messages: list[dict]) -> str:
    """The text Ollama's /api/chat sends the model: the Modelfile's SYSTEM first unless the request
    starts with a system message, then the template run once per turn."""
    cmds = parse_modelfile(modelfile)
    if cmds.get("SYSTEM") and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cmds["SYSTEM"]}] + messages
    out, turn = [], {"System": "", "Prompt": "", "Response": ""}
    for m in messages:
        role = {"system": "System", "user": "Prompt", "assistant": "Response"}[m["role"]]
        if (role == "System" and (turn["Prompt"] or turn["Response"])) or (role == "Prompt" and turn["Response"]):
            out.append(go_render(cmds["TEMPLATE"], turn, last=False))
            turn = {"System": "", "Prompt": "", "Response": ""}
        turn[role] = m["content"]
    return "".join(out) + go_render(cmds["TEMPLATE"], turn, last=True)


def assert_modelfile_prompts_as_training(modelfile: str, tokenizer, system: str | None) -> None:
    """One turn: the same prompt ids as training's examples.tokenize; two turns: render_chat's text."""
    for record in RECORDS:
        row = examples.tokenize(tokenizer, examples.Pair(record.text, record.output), 512, system)
        trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label == examples.IGNORE]
        text = ollama_prompt(modelfile, [{"role": "user", "content": record.text}])
        assert text == prompts.render(tokenizer, record.text, system)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == trained
    chat = [{"role": "user", "content": "hot?"}, {"role": "assistant", "content": "cold"},
            {"role": "user", "content": "big?"}]
    assert ollama_prompt(modelfile, chat) == prompts.render_chat(tokenizer, chat, system)


# -- libraries ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_system_lib(tiny_model_dir, tmp_path_factory) -> Path:
    """A random library on the tiny model whose chat template writes a default system message."""
    from transformers import AutoTokenizer

    from conftest import make_random_library

    model = tmp_path_factory.mktemp("tiny-default-system") / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    tok.save_pretrained(model)
    return make_random_library(tmp_path_factory.mktemp("dslib") / "lib", model, ["antonym", "rhyme"], router=False)


def with_changes(src: Path, dst: Path, manifest_change: dict | None = None) -> Path:
    """A copy of library `src` with manifest fields replaced."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / store.MANIFEST).read_text())
    store.write_manifest(dst, {**manifest, **(manifest_change or {})})
    return dst


def tokenizer_of(lib: Path):
    from chainlora.base_model import load_tokenizer

    return load_tokenizer(Library.open(lib).manifest["base_model"]["name"])


# -- finding 10: gguf ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("system", [None, "Answer in one word."])
@pytest.mark.parametrize("which", ["random_lib", "default_system_lib"])
def test_gguf_modelfiles_prompt_exactly_as_training(which, system, request, tmp_path, cli):
    lib = with_changes(request.getfixturevalue(which), tmp_path / "lib", {"system_prompt": system})
    r = cli("export", str(lib), "--format", "gguf", "--out", str(tmp_path / "g"), "--json")
    assert r.returncode == 0, r.stderr
    tokenizer = tokenizer_of(lib)
    report = json.loads((tmp_path / "g/export.json").read_text())
    assert report == json.loads(r.stdout) and not (tmp_path / "g/manifest.json").exists()
    trained_system = system if system is not None else export.template_default_system(tokenizer)
    assert report["prompt"]["system_prompt"] == system and report["prompt"]["ollama_template"] is True
    assert report["prompt"]["system_prompt_as_trained"] == trained_system
    assert trained_system == (system if system is not None or which == "random_lib" else "You are a tiny test model.")
    for name, info in report["adapters"].items():
        text = (tmp_path / "g" / info["modelfile"]).read_text()
        assert parse_modelfile(text).get("SYSTEM") == trained_system
        assert parse_modelfile(text)["ADAPTER"] == f"../adapters/{name}.gguf"
        assert_modelfile_prompts_as_training(text, tokenizer, system)


def test_a_plain_prompt_library_gets_its_plain_template(tiny_model_dir, tmp_path):
    """No chat template: training used chainlora's plain format, so must the Modelfile."""
    from transformers import AutoTokenizer

    from chainlora.base_model import prepare_tokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    tok.chat_template = None
    for system in (None, "Be brief."):
        text = llamacpp.modelfile("antonym", system, llamacpp.ollama_template(tok), prompts.end_of_answer(tok))
        for record in RECORDS:
            got = ollama_prompt(text, [{"role": "user", "content": record.text}])
            assert got == prompts.render(tok, record.text, system) and "### Instruction:" in got


def test_a_template_that_cannot_be_cut_gets_no_template(tiny_model_dir):
    """A template folding the system prompt into the user turn has no one-if form: no TEMPLATE
    (Ollama keeps the GGUF's own) rather than a wrong one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = ("{% set s = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
                         "{% for m in messages if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
                         "{{ (s if loop.first else '') + m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert llamacpp.ollama_template(tok) is None
    assert "TEMPLATE" not in llamacpp.modelfile("a", "Be brief.", None, "<|im_end|>")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    assert llamacpp.ollama_template(tok) is None and export.template_default_system(tok) is None


@pytest.mark.e2e
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_default_model_modelfile_carries_its_default_system_message(default_base, tmp_path, system):
    """SmolLM2's template writes "You are a helpful AI assistant named SmolLM..." when no system
    prompt is given: training prompts carried it, so the Modelfile's SYSTEM must."""
    lib = Library(tmp_path, {"base_model": {"name": "smollm2-135m"}, "system_prompt": system})
    modelfiles, facts = llamacpp.ollama_files(lib, ["antonym"])
    tokenizer = default_base.tokenizer
    trained = facts["system_prompt_as_trained"]
    assert trained == (system or export.template_default_system(tokenizer))
    assert trained.startswith("You are a helpful AI assistant named SmolLM") == (system is None)
    assert parse_modelfile(modelfiles["antonym"])["SYSTEM"] == trained
    assert_modelfile_prompts_as_training(modelfiles["antonym"], tokenizer, system)
    template = tokenizer.chat_template
    assert facts["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()


# -- finding 11: peft / vllm --------------------------------------------------------------------

def _selector_library(random_lib: Path, dst: Path) -> Path:
    """random_lib plus a (random) classifier selector, an out-of-library detector and a measured
    winner: every kind of selector the export must carry."""
    import torch
    from safetensors.torch import save_file

    lib = with_changes(random_lib, dst)
    for rel, files in (("classifier", store.CLASSIFIER_FILES), ("selection/novelty", store.NOVELTY_FILES)):
        (lib / rel).mkdir(parents=True)
        (lib / rel / files[0]).write_text(json.dumps({"encoder": "minilm", "labels": ["antonym", "rhyme"]}))
        save_file({"w": torch.randn(2, 3)}, str(lib / rel / files[1]))
    manifest = json.loads((lib / store.MANIFEST).read_text())
    manifest["classifier"] = {"path": "classifier", "encoder": "minilm", "sha256": store.adapter_sha256(
        lib / "classifier", store.CLASSIFIER_FILES)}
    manifest["selection"] = {"winner": "classifier", "chosen_by": "measured",
                             "selectors": {"classifier": {"threshold": 0.4}, "score": {"threshold": 0.1}},
                             "novelty": {"path": "selection/novelty", "threshold": 0.7, "sha256": store.adapter_sha256(
                                 lib / "selection/novelty", store.NOVELTY_FILES)}}
    # the adapters as a converted default model leaves them: the base named by a cache path
    cfg_path = lib / "tasks/antonym/adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()),
                                    "base_model_name_or_path": "/home/u/.cache/chainlora/models/x"}))
    manifest["tasks"][0]["sha256"] = store.adapter_sha256(lib / "tasks/antonym")
    store.write_manifest(lib, manifest)
    return lib


@pytest.mark.slow
def test_peft_export_is_portable_and_complete(random_lib, tmp_path, cli):
    from chainlora.inference import selectors

    lib = _selector_library(random_lib, tmp_path / "lib")
    before = (lib / "tasks/antonym/adapter_config.json").read_bytes()
    r = cli("export", str(lib), "--format", "peft", "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "p/export.json").read_text())
    base_name = Library.open(lib).manifest["base_model"]["name"]  # a directory: its name as given
    for name in rep["adapters"]:
        cfg = json.loads((tmp_path / "p" / name / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == base_name == rep["base_model"]["portable_name"]
    assert rep["base_model"]["local_path"] == "/home/u/.cache/chainlora/models/x"  # what training recorded
    assert (lib / "tasks/antonym/adapter_config.json").read_bytes() == before  # the library is untouched
    tokenizer = tokenizer_of(lib)
    assert rep["prompt"] == {"format": "chat_template", "system_prompt": None, "system_prompt_as_trained": None,
                             "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()}
    sel = rep["selectors"]
    assert sel["default"] == "classifier" == selectors.default(Library.open(lib))
    assert set(sel["kinds"]) == {"score", "generate", "classifier", "novelty"}
    assert sel["kinds"]["score"]["path"] == "router" and sel["kinds"]["score"]["labels"]
    assert sel["kinds"]["score"]["threshold"] == 0.1 and sel["kinds"]["classifier"]["threshold"] == 0.4
    for kind, files in (("classifier", store.CLASSIFIER_FILES), ("novelty", store.NOVELTY_FILES)):
        copied = tmp_path / "p" / sel["kinds"][kind]["path"]
        assert store.adapter_sha256(copied, files) == sel["kinds"][kind]["sha256"]
    one = export.export(lib, tmp_path / "p1", "peft", adapter="antonym")  # one adapter: no selectors
    assert "selectors" not in one and not (tmp_path / "p1/selectors").exists()
    assert json.loads((tmp_path / "p1/antonym/adapter_config.json").read_text())["base_model_name_or_path"] == base_name


def test_vllm_and_compressed_copies_name_the_portable_base(random_lib, tmp_path):
    lib = _selector_library(random_lib, tmp_path / "lib")
    base_name = Library.open(lib).manifest["base_model"]["name"]
    rep = export.export(lib, tmp_path / "v", "vllm")
    assert rep["base_model"]["portable_name"] == base_name and rep["prompt"]["format"] == "chat_template"
    export.export(lib, tmp_path / "c", "peft", adapter="antonym", compress_rank=2)
    for cfg in [tmp_path / "v/adapters/antonym/adapter_config.json", tmp_path / "c/antonym/adapter_config.json"]:
        assert json.loads(cfg.read_text())["base_model_name_or_path"] == base_name


def test_portable_name_of_the_default_alias():
    from chainlora.base_model import DEFAULT_MODEL, portable_name

    assert portable_name(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("/data/models/mine") == "/data/models/mine"
    assert portable_name("org/model") == "org/model"


@pytest.mark.e2e
def test_default_model_peft_export_names_the_hub_model(default_base, tmp_path):
    """A library on the default alias: its adapters name the converted copy in this machine's
    cache; the export names HuggingFaceTB/SmolLM2-135M-Instruct and keeps the cache path apart."""
    from conftest import make_random_library

    lib = make_random_library(tmp_path / "lib", Path(default_base.path), ["antonym"], mixed=False, r=2)
    store.write_manifest(lib, {**json.loads((lib / store.MANIFEST).read_text()),
                               "base_model": {"name": "smollm2-135m", "fingerprint": default_base.fingerprint}})
    assert json.loads((lib / "tasks/antonym/adapter_config.json").read_text())[
        "base_model_name_or_path"] == default_base.path
    rep = export.export(lib, tmp_path / "p", "peft")
    cfg = json.loads((tmp_path / "p/antonym/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert rep["base_model"]["local_path"] == default_base.path
    assert rep["prompt"]["system_prompt_as_trained"].startswith("You are a helpful AI assistant named SmolLM")
