"""No third-party progress bars on stderr: transformers' ("Writing model shards", "Loading weights"),
huggingface_hub's, and bare tqdm bars such as transformers' GGUF conversion ("Converting and
de-quantizing GGUF tensors...").

Used by ``python -m core prune --quiet`` and by the worker (bars are noise in its JSON log lines).
Works whether or not tqdm and transformers were imported before: the environment switches only help
libraries imported later, so tqdm's own default is changed too.
"""

from __future__ import annotations

import functools
import os


def silence_progress_bars() -> None:
    """Turn off every progress bar this process would draw from now on (idempotent)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is first imported
    _disable_tqdm()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # also huggingface_hub's
    if hasattr(hf_logging, "set_tqdm_hook"):  # bars made while something re-enabled them
        hf_logging.set_tqdm_hook(lambda _factory, args, kwargs: hf_logging.EmptyTqdm(*args, **kwargs))


def _disable_tqdm() -> None:
    """Make `disable=True` the default of tqdm's constructor (all its subclasses: auto, asyncio, ...)."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "_prune_quiet", False):
        return

    @functools.wraps(init)
    def quiet_init(self: object, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet_init._prune_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
