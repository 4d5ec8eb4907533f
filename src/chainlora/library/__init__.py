"""Stage `library`: the adapter library on disk and what can be made from it.

    kinds.py      the registry: every entry kind a library holds (files, LoRA or not, how it is
                  planned and trained) and every selector (its entry, how it ranks)
    store.py      the library directory: plain PEFT adapters + manifest (chainlora.json), hashes,
                  atomic saves
    export.py     `chainlora export`: plain PEFT (optionally SVD-compressed), merged model, vLLM
    lora_math.py  LoRA factor math (SVD truncation of B·A) shared by export and COLA training

May import: core (chainlora.errors, chainlora.atomic, chainlora.base_model) and data.
The `export` function lives in chainlora.library.export (not re-exported: the name is the module's).
"""

from chainlora.library.store import (ADAPTER_FILES, CLASSIFIER_FILES, FORMAT_VERSION, MANIFEST, Library,
                                     adapter_sha256, files_sha256, inside, new_manifest, read_manifest,
                                     save_adapter, task_path, write_manifest)

__all__ = ["ADAPTER_FILES", "CLASSIFIER_FILES", "FORMAT_VERSION", "MANIFEST", "Library", "adapter_sha256",
           "files_sha256", "inside", "new_manifest", "read_manifest", "save_adapter", "task_path",
           "write_manifest"]
