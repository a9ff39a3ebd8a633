"""Errors the engine raises. Each carries a message fit to show a user as is."""

from __future__ import annotations


class CoreError(Exception):
    """Base class: an error the caller should report, not a bug."""

    code = "core_error"


class InvalidInput(CoreError):
    """The request cannot be served as given (bad path, too little text, seqlen too long...)."""

    code = "invalid_input"


class UnsupportedModel(InvalidInput):
    """The model's architecture is not in the family registry."""

    code = "unsupported_model"


class ModelLoadError(InvalidInput):
    """A model file is missing or corrupted; the message names the file."""

    code = "model_load_error"


class CalibrationError(InvalidInput):
    """Calibration or evaluation text is missing, empty or too short."""

    code = "calibration_error"


class Cancelled(CoreError):
    """The caller's cancellation check returned True between blocks."""

    code = "cancelled"


class CorruptArtifact(InvalidInput):
    """A packed artifact (compact format) is truncated, modified or not one of ours."""

    code = "corrupt_artifact"


class TaskError(InvalidInput):
    """A zero-shot task is unknown, its data is missing, or the harness failed on it; the message
    names the task."""

    code = "task_error"
