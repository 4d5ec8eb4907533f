"""Stage `library`: the adapter library on disk and what can be made from it.

    store.py      the library directory: plain PEFT adapters + manifest (chainlora.json), hashes,
                  atomic saves; the file names of every adapter kind (CLASSIFIER_FILES included)
    export.py     `chainlora export`: plain PEFT (optionally SVD-compressed), merged model, vLLM
    lora_math.py  LoRA factor math (SVD truncation of B·A) shared by export and COLA training

May import: core (chainlora.errors, chainlora.atomic, chainlora.models) and data.
The `export` function lives in chainlora.library.export (not re-exported: the name is the module's).
"""

from chainlora.library.store import (ADAPTER_FILES, CLASSIFIER_FILES, FORMAT_VERSION, MANIFEST, Library,
                                     adapter_sha256, files_sha256, inside, new_manifest, read_manifest,
                                     save_adapter, task_path, write_manifest)

__all__ = ["ADAPTER_FILES", "CLASSIFIER_FILES", "FORMAT_VERSION", "MANIFEST", "Library", "adapter_sha256",
           "files_sha256", "inside", "new_manifest", "read_manifest", "save_adapter", "task_path",
           "write_manifest"]
