"""Where settings come from, before they are validated: a TOML file, IMGPIPE_
environment variables and flags, merged into one nested mapping (later layers
win), and every name in them that is no setting, reported with the closest
names that are.

A settings model's sections and their keys are passed in as a plain mapping
(`pipeline.config` builds it from `Settings`), so this module knows no model.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.errors import ConfigError

ENV_PREFIX = "IMGPIPE_"
# Short names for the settings every Redis command needs.
ENV_ALIASES = {"IMGPIPE_REDIS_URL": "redis.url", "IMGPIPE_REDIS_PASSWORD": "redis.password"}
Sections = Mapping[str, list[str]]  # each section's keys


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc


def unknown_in_file(sections: Sections, table: Mapping[str, Any], path: Path) -> list[str]:
    """One message per name in a TOML file that is no setting, with the closest ones."""
    problems = []
    for name, value in table.items():
        keys = sections.get(name)
        if keys is None and isinstance(value, Mapping):
            problems.append(f"unknown section `[{name}]` in {path}"
                            + _did_you_mean(_close(name, sections), "`[{}]`"))
        elif keys is None:
            problems.append(f"unknown key `{name}` in {path} (keys go in a section)"
                            + _did_you_mean(_close_anywhere(sections, name), "`{}`"))
        elif isinstance(value, Mapping):
            problems += [f"unknown key `{name}.{key}` in {path}"
                         + _did_you_mean(_close(key, keys), "`{}`")
                         for key in value if key not in keys]
    return problems


def unknown_in_environment(sections: Sections, environ: Mapping[str, str]) -> list[str]:
    """One message per IMGPIPE_SECTION__KEY variable that names no setting."""
    problems = []
    for variable in environ:
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue
        section, _, key = variable[len(ENV_PREFIX):].lower().partition("__")
        keys = sections.get(section)
        if keys is None:
            spelled = [f"{ENV_PREFIX}{match.upper()}__{key.upper()}"
                       for match in _close(section, sections)]
            problems.append(f"unknown setting {variable}: no section `{section}`"
                            + _did_you_mean(spelled, "{}"))
        elif key not in keys:
            spelled = [f"{ENV_PREFIX}{section.upper()}__{match.upper()}"
                       for match in _close(key, keys)]
            problems.append(f"unknown setting {variable}: no key `{key}` in section "
                            f"`[{section}]`" + _did_you_mean(spelled, "{}"))
    return problems


def _close(name: str, known: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(known), n=3)


def _close_anywhere(sections: Sections, key: str) -> list[str]:
    """`section.key` for the keys of any section that look like `key`."""
    return [f"{section}.{match}" for section, keys in sections.items()
            for match in _close(key, keys)][:3]


def _did_you_mean(matches: list[str], shape: str) -> str:
    if not matches:
        return ""
    return "; did you mean " + " or ".join(shape.format(match) for match in matches) + "?"


def env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    pairs = {k[len(ENV_PREFIX):].lower().replace("__", "."): v
             for k, v in environ.items() if k.startswith(ENV_PREFIX) and "__" in k}
    pairs.update({dotted: environ[name] for name, dotted in ENV_ALIASES.items()
                  if name in environ})
    return nest(pairs)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"model.topk": 3} -> {"model": {"topk": 3}}; None values are skipped."""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        nested.setdefault(section, {})[key] = value
    return nested


def deep_merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in error["loc"]).upper()
        # URLs may carry credentials: never echo them.
        # and the whole [redis] section, which a check across its keys is given
        secret = key.endswith(("url", "password")) or ".shard_urls" in key or key == "redis"
        value = "<redacted>" if secret else repr(error.get("input"))
        problems.append(f"{key} = {value}: {error['msg']} "
                        f"(set it in the config file, {env}, or a flag)")
    return "invalid configuration: " + "; ".join(problems)
