"""Settings read from environment variables: the shared base class and the engine's own variables.

`EnvSettings` is the pydantic-settings base of every settings class of the project (the engine's
`EngineSettings` here, the service's `jobs.settings.Settings`). Each field names its variable
(`env_field`) and documents it; `scripts/config_table.py` renders those descriptions into the
README's configuration table. Constructing a class directly takes only the given values and the
defaults; `from_env()` reads the environment (or a given mapping), so a test's explicit settings
never pick up the developer's shell. A blank value counts as unset unless the field says otherwise
(`keep_empty`), and a refused value raises `ConfigError` naming the variable.

Torch-free and import-light: the API imports it through `core.evaluation.tasks`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as _DecodeError
from pydantic_settings.sources.utils import parse_env_vars

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """An environment variable holds a value its setting refuses; the message names the variable."""


def env_field(
    name: str,
    default: Any = None,
    description: str = "",
    *,
    shown: str | None = None,
    keep_empty: bool = False,
    secret: bool = False,
    **kwargs: Any,
) -> Any:
    """A settings field read from the variable `name`. `shown` is the default as the configuration
    table prints it (else derived from `default`); `keep_empty`: a blank value is passed to the field
    instead of meaning unset; `secret`: kept out of reprs and error messages."""
    extra: dict[str, Any] = {"keep_empty": keep_empty, "secret": secret}
    if shown is not None:
        extra["shown"] = shown
    if "default_factory" not in kwargs:
        kwargs["default"] = default
    return Field(
        validation_alias=name,
        description=description,
        json_schema_extra=extra,
        repr=not secret,
        **kwargs,
    )


def env_name(field: FieldInfo) -> str | None:
    """The variable a field is read from (None: set only in code)."""
    alias = field.validation_alias
    return alias if isinstance(alias, str) else None


def field_extra(field: FieldInfo) -> dict[str, Any]:
    """The `env_field` options of a field (empty for fields set only in code)."""
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE:
            return True
        if word in FALSE:
            return False
        raise ValueError("must be one of 1/true/yes/on or 0/false/no/off")
    return value


def _lenient_flag(value: Any) -> Any:
    return value.strip().lower() in TRUE if isinstance(value, str) else value


Flag = Annotated[bool, BeforeValidator(_flag)]
"""A boolean variable: 1/true/yes/on or 0/false/no/off (any case); anything else is refused."""

LenientFlag = Annotated[bool, BeforeValidator(_lenient_flag)]
"""A boolean read as another library reads it: 1/true/yes/on is true, anything else false."""


class _Environment(EnvSettingsSource):
    """Environment variables from a given mapping, exact names only; fields without a variable are
    not read."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls, case_sensitive=True, env_ignore_empty=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._env, case_sensitive=True)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if env_name(field) is None:
            return None, field_name, False
        return super().get_field_value(field, field_name)


class EnvSettings(BaseSettings):
    """Base of the project's settings classes (see the module docstring)."""

    model_config = SettingsConfigDict(
        frozen=True, validate_by_name=True, validate_by_alias=True, case_sensitive=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the constructor's values: `from_env` is what reads the environment."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Settings from the environment (or `env`); unset variables take the defaults. Raises
        `ConfigError` naming every refused variable."""
        try:
            return cls(**_Environment(cls, os.environ if env is None else env)())
        except _DecodeError as exc:
            raise ConfigError(str(exc)) from None
        except ValidationError as exc:
            raise ConfigError(cls.explain(exc)) from None

    @classmethod
    def _fields_by_key(cls) -> dict[str, FieldInfo]:
        """Fields by variable name and by field name."""
        return {**{env_name(f) or n: f for n, f in cls.model_fields.items()}, **cls.model_fields}

    @classmethod
    def explain(cls, exc: ValidationError) -> str:
        """One entry per refused value: the variable, its value (unless secret) and why."""
        fields = cls._fields_by_key()
        lines = []
        for err in exc.errors(include_url=False):
            key = str(err["loc"][0]) if err["loc"] else ""
            field = fields.get(key)
            reason = err["msg"].removeprefix("Value error, ")
            if not key:  # a check across fields: its message names the variables
                lines.append(reason)
                continue
            secret = field is not None and field_extra(field).get("secret")
            shown = "" if secret or not isinstance(err.get("input"), str) else f"={err['input']!r}"
            lines.append(f"{(env_name(field) if field else None) or key}{shown}: {reason}")
        return "invalid configuration: " + "; ".join(lines)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: Any) -> Any:
        """A blank string means "unset" (the default), except for `keep_empty` fields."""
        if not isinstance(data, dict):
            return data
        fields = cls._fields_by_key()

        def unset(key: str, value: Any) -> bool:
            blank = isinstance(value, str) and not value.strip()
            return blank and key in fields and not field_extra(fields[key]).get("keep_empty")

        return {k: v for k, v in data.items() if not unset(k, v)}


def _resolved(path: Path | None) -> Path | None:
    return None if path is None else path.resolve()


ResolvedPath = Annotated[Path, AfterValidator(_resolved)]
"""A path variable; a relative value is resolved against the working directory."""


class SharedSettings(EnvSettings):
    """The variables both the engine and the service read, declared once: `EngineSettings` and the
    service's `jobs.settings.Settings` derive from this class (the service gives `home` its own
    default, `./var`; the engine leaves it unset)."""

    home: ResolvedPath | None = env_field(
        "PRUNE_HOME",
        description="Home directory. The service's var directory: artifacts (local storage), worker "
        "scratch, the launcher's Redis data and logs, the generated signing key. The engine (the "
        "worker's jobs included) keeps its default caches under it: `$PRUNE_HOME/cache/baselines` "
        "and `$PRUNE_HOME/cache/models`.",
        shown="service: `./var` (resolved against the working directory); engine: unset, no baseline "
        "or model cache",
    )
    data_dir: ResolvedPath | None = env_field(
        "PRUNE_DATA_DIR",
        description="Data directory of the named datasets (`wikitext-2/…`, `c4/…`) and of the zero-shot "
        "tasks (`lm_eval_tasks/`), read by the engine (the worker's jobs included; an explicit "
        "`--data-dir` wins); the API checks task folders there.",
        shown="`../shared/data` beside the checkout if present, else `~/.cache/prune-service/data`",
    )


class EngineSettings(SharedSettings):
    """The engine's variables (`python -m core` and the worker's jobs); read when used, so a change
    of the environment applies to the next run."""

    baseline_cache: str | None = env_field(
        "PRUNE_BASELINE_CACHE",
        description="Directory of the cached dense perplexities (keyed by weights digest and evaluation "
        "tokens); `off`, `0`, `false` or empty disables the cache.",
        shown="`$PRUNE_HOME/cache/baselines`",
        keep_empty=True,
    )
    model_cache: str | None = env_field(
        "PRUNE_MODEL_CACHE",
        description="Directory of the cached dequantized GGUF models (Hugging Face directories keyed by "
        "the GGUF file's sha256, the dtype and the transformers and gguf versions), so a later load of "
        "the same file skips dequantizing; `off`, `0`, `false` or empty disables the cache.",
        shown="`$PRUNE_HOME/cache/models`",
        keep_empty=True,
    )
    model_cache_bytes: int = env_field(
        "PRUNE_MODEL_CACHE_BYTES",
        20 * 10**9,
        "Byte budget of the model cache: after a write the least recently used entries are removed "
        "until the rest fit; a model larger than the budget is not cached; `0` disables the cache.",
        shown="`20000000000` (20 GB)",
        ge=0,
    )
    hessian_limit_bytes: int = env_field(
        "PRUNE_HESSIAN_LIMIT_BYTES",
        16 * 2**30,
        "Largest total of Hessians (fp32 `in × in` per pruned matrix: SparseGPT, ALPS, `reconstruct`) held "
        "for one block; above it such a run is refused before any work.",
        shown="`17179869184` (16 GiB)",
        ge=1,
    )
    max_device_memory: int | None = env_field(
        "PRUNE_MAX_DEVICE_MEMORY",
        description="Bytes of the compute device's memory a run may use for weights and activations "
        "(a job's `model.max_device_memory` wins); above it blocks are onloaded one at a time and "
        "activations kept in host memory or on disk.",
        shown="90% of the device's free memory at the start of the run",
        ge=0,
    )
    max_host_memory: int | None = env_field(
        "PRUNE_MAX_HOST_MEMORY",
        description="Bytes of host memory a run may use for weights and activations (a job's "
        "`model.max_host_memory` wins); above it activations spill to disk.",
        shown="90% of the host's available memory at the start of the run",
        ge=0,
    )
    hf_hub_offline: LenientFlag = env_field(
        "HF_HUB_OFFLINE",
        False,
        "`1` (or true/yes/on): never contact the Hugging Face hub; named datasets and zero-shot tasks "
        "must then be in the data directory.",
        shown="`0`",
    )

    def _cache_dir(self, value: str | None, name: str) -> Path | None:
        """An explicit directory (or off), else `$PRUNE_HOME/cache/<name>` when the home is set."""
        if value is not None:
            off = value.strip().lower() in ("", "0", "off", "false")
            return None if off else Path(value)
        return self.home / "cache" / name if self.home else None

    def baseline_cache_dir(self) -> Path | None:
        """Where cached baselines live, or None when the cache is off."""
        return self._cache_dir(self.baseline_cache, "baselines")

    def model_cache_dir(self) -> Path | None:
        """Where cached dequantized GGUF models live, or None when the cache is off (or its budget 0)."""
        return self._cache_dir(self.model_cache, "models") if self.model_cache_bytes > 0 else None
