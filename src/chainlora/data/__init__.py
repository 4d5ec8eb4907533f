"""Stage `data`: instruction records and how they become model input.

    records.py   read records from files (JSONL, JSON, CSV, Parquet, hub), check them, split by task;
                 the bundled demo data (files in chainlora/demo/, located with importlib.resources)
    prompts.py   how an instruction becomes a prompt, for answering and for task selection
    examples.py  (prompt, answer) pairs tokenized for response-only loss
    content.py   content words (the rare words a template is filled with): masked, or swapped between records

May import: core (chainlora.errors, chainlora.atomic, chainlora.base_model) only.
"""

from chainlora.data.records import (DEMO_TASKS, FIELDS, Record, TaskData, check_task_name,
                                    demo_path, heldout_templates, load_demo, load_tasks, read_instructions, read_records,
                                    split_of)

__all__ = ["DEMO_TASKS", "FIELDS", "Record", "TaskData", "check_task_name", "demo_path", "heldout_templates",
           "load_demo", "load_tasks", "read_instructions", "read_records", "split_of"]
