"""Where zero-shot task folders live (torch-free: the API checks a task's folder at submit time).

A local task is a folder ``<data dir>/lm_eval_tasks/<task>/`` holding an lm-evaluation-harness YAML
config whose ``task:`` is the folder's name, and the data files it names (relative paths are
relative to the folder).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = "lm_eval_tasks"


def task_folder(data_dir: Path, name: str) -> Path:
    """The folder a local task named ``name`` lives in (it may not exist)."""
    return data_dir / TASKS_DIR / name


def task_yaml(folder: Path, name: str) -> Path | None:
    """The YAML config of task ``name`` in ``folder``: ``<name>.yaml``, else the only ``*.yaml``."""
    own = folder / f"{name}.yaml"
    if own.is_file():
        return own
    found = sorted(p for p in folder.glob("*.yaml") if p.is_file()) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` says the hub cannot be reached."""
    from core.settings import EngineSettings

    return EngineSettings.from_env().hf_hub_offline


def submit_problem(name: str, data_dir: Path | None, offline: bool) -> str | None:
    """Why task ``name`` cannot run, when that is knowable without the harness: no folder under
    the data directory while the hub is offline, or a folder without its YAML or data files."""
    if data_dir is None:
        return None
    folder = task_folder(data_dir, name)
    if not folder.is_dir():
        if offline:
            return f"zero-shot task {name!r} has no task folder {folder} and the hub is offline"
        return None
    if task_yaml(folder, name) is None:
        return f"zero-shot task {name!r}: no {name}.yaml (or single *.yaml) in its task folder"
    if not any(p.is_file() and p.suffix != ".yaml" for p in folder.iterdir()):
        return f"zero-shot task {name!r}: its task folder holds no data file"
    return None
