"""Typed settings: defaults < TOML file < IMGPIPE_ environment < CLI flags.

Loaded once and validated at start-up. Environment keys name a section and a
key joined by a double underscore: ``IMGPIPE_BATCHING__MAX_BATCH_SIZE=64``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.config_layers import (
    deep_merge,
    describe,
    env_layer,
    nest,
    read_toml,
    unknown_in_environment,
    unknown_in_file,
)
from pipeline.embeddings import OutputKind
from pipeline.errors import ConfigError
from pipeline.preprocess import DecoderHints
from pipeline.recipes import GENERIC, Recipe, model_recipe
from pipeline.sources.urls import Prefix, UrlPolicy
from pipeline.spec import (
    TTA_VIEWS,
    InputLimits,
    Interpolation,
    PreprocessSpec,
    TtaMode,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


def _blank_is_none(value: Any) -> Any:
    # TOML has no null: an empty string means "not set".
    return None if value == "" else value


def _split_paths(value: Any) -> Any:
    # From the environment a list of paths comes as one string: "/a:/b".
    if isinstance(value, str):
        return [part for part in value.split(os.pathsep) if part]
    return value


def _split_urls(value: Any) -> Any:
    # From the environment a list of URL prefixes comes as one string, separated by spaces.
    if isinstance(value, str):
        return value.split()
    return value


def _split_indices(value: Any) -> Any:
    # From the environment a list of shard indices comes as one string: "0 2" or "0,2".
    if isinstance(value, str):
        return value.replace(",", " ").split()
    return value


def _crop_value(value: Any) -> Any:
    """A crop as a setting: "auto", N (square), or "HxW" (also [H, W]; from the
    environment "N" or "HxW"), canonical: an int when square, else "HxW"."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    if isinstance(value, str) and value != "auto":
        height, cross, width = value.strip().lower().partition("x")
        try:
            sides = (int(height), int(width if cross else height))
        except ValueError:
            raise ValueError("expected \"auto\", a size N, or HEIGHTxWIDTH such as "
                             "\"224x192\"") from None
        value = sides[0] if sides[0] == sides[1] else f"{sides[0]}x{sides[1]}"
    if (isinstance(value, int) and not isinstance(value, bool)
            or isinstance(value, str) and value != "auto"):
        _crop_sides(value)  # ValueError out of range
    return value


def _crop_sides(value: int | str) -> tuple[int, int]:
    """(height, width) of a canonical crop value; ValueError when out of range."""
    if isinstance(value, int):
        sides = (value, value)
    else:
        height, _, width = value.partition("x")
        sides = (int(height), int(width))
    if not all(1 <= side <= 8192 for side in sides):
        raise ValueError("crop sides must be 1 to 8192 pixels")
    return sides


T = TypeVar("T")
CropSetting = Annotated[Union[Literal["auto"], int, str], BeforeValidator(_crop_value)]
SizeSetting = Union[Literal["auto"], Annotated[int, Field(ge=1, le=8192)]]
UnsetIfBlank = Annotated[Optional[T], BeforeValidator(_blank_is_none)]
PathList = Annotated[list[Path], BeforeValidator(_split_paths)]
UrlList = Annotated[list[str], BeforeValidator(_split_urls)]
IndexList = Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(_split_indices)]
REDIS_URL = r"^(redis|rediss|unix|redis\+sentinel|rediss\+sentinel)://"
KEY_PART = r"^[A-Za-z0-9_.:{}-]+$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Section):
    name: str = "efficientnet_lite0"
    weights: UnsetIfBlank[Path] = None
    labels: UnsetIfBlank[Path] = None
    topk: int = Field(5, ge=1, le=1000)
    backend: Literal["auto", "torch", "torch-compile", "torch-graphs", "torchscript",
                     "onnxruntime"] = "auto"
    precision: Literal["fp32", "bf16", "fp16", "int8"] = "fp32"
    calibration_images: UnsetIfBlank[Path] = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    threads: int = Field(0, ge=0)
    artifacts_dir: UnsetIfBlank[Path] = None
    output: OutputKind = "logits"
    normalize_embeddings: bool = True

    def embeddings_setting(self) -> Optional[str]:
        """The setting that asks the model for features, as error messages name it;
        None when only logits are asked for."""
        return None if self.output == "logits" else f"model.output = {self.output!r}"

    def artifacts_directory(self) -> Path:
        """Where exported and compiled models are kept: `artifacts_dir`, else
        $XDG_CACHE_HOME/imgpipe/artifacts (apart from `cache.dir`: a cache of
        images elsewhere need not export the model again)."""
        if self.artifacts_dir is not None:
            return self.artifacts_dir
        return CacheSettings().directory() / "artifacts"

    @model_validator(mode="after")
    def _variant_exists(self) -> ModelSettings:
        if self.backend == "auto":
            if self.precision != "fp32":
                raise ValueError("model.precision applies to a named backend; with backend "
                                 "\"auto\" the precision comes from imgpipe optimize")
            return self
        from pipeline.variants import Variant

        try:
            Variant(self.backend, self.precision).validate()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


class PreprocessSettings(Section):
    """Preprocessing. The recipe (resize_shorter, crop, interpolation) is the
    model's own where a key says "auto" (`pipeline/recipes.py`): `Settings`
    hands the model's recipe in, so `spec()` is the spec this run uses."""

    backend: Literal["auto", "pillow", "dali"] = "auto"
    workers: int = Field(0, ge=0)
    resize_shorter: SizeSetting = "auto"
    crop: CropSetting = "auto"
    interpolation: Union[Literal["auto"], Interpolation] = "auto"
    tta: TtaMode = "none"
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(100_000_000, ge=1)
    chunk_size: int = Field(8, ge=1, le=1024)
    handoff: Literal["auto", "pickle", "shared_memory"] = "auto"
    # DALI in the inference process, fed model-sized batches (in_process.py); "auto"
    # is "on" (select.dali_in_process)
    dali_in_process: Literal["auto", "on", "off"] = "auto"
    # where its batches go: torch tensors on its device, or NumPy on the host (in_process.py)
    dali_output: Literal["auto", "device", "host"] = "auto"
    # decode a JPEG's crop window only (dali_roi.py); "auto": on the CPU decoder
    dali_roi_decode: Literal["auto", "on", "off"] = "auto"
    # nvJPEG hints for DALI's GPU decoder (DecoderHints); the CPU decoder ignores them
    hw_decoder_load: float = Field(0.65, ge=0.0, le=1.0)
    device_memory_padding: int = Field(16 * 1024 * 1024, ge=0)
    host_memory_padding: int = Field(8 * 1024 * 1024, ge=0)
    _model_recipe: Optional[Recipe] = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessSettings:
        if self.crop != "auto" and self.resize_shorter != "auto":
            height, width = _crop_sides(self.crop)
            if max(height, width) > self.resize_shorter:
                raise ValueError(f"crop ({self.crop}) must not exceed resize_shorter "
                                 f"({self.resize_shorter})")
        return self

    @property
    def recipe(self) -> Recipe:
        """The model's recipe, which "auto" keys take (imgpipe's default until
        `Settings` has named the model)."""
        return self._model_recipe or GENERIC

    def with_model_recipe(self, recipe: Recipe) -> PreprocessSettings:
        """A copy whose "auto" keys take `recipe`'s values."""
        copy = self.model_copy()
        copy._model_recipe = recipe
        return copy

    def spec(self) -> PreprocessSpec:
        recipe = self.recipe
        resize = recipe.resize_shorter if self.resize_shorter == "auto" else self.resize_shorter
        height, width = recipe.crop if self.crop == "auto" else _crop_sides(self.crop)
        interpolation = (recipe.interpolation if self.interpolation == "auto"
                         else self.interpolation)
        return PreprocessSpec(resize, height, interpolation,  # type: ignore[arg-type]
                              None if height == width else width)

    def describe(self) -> str:
        """The recipe in use and where it comes from, in one line for the summary:
        "resize 232, crop 224, bilinear (torchvision ResNet50_Weights.IMAGENET1K_V2)"."""
        keys = ("resize_shorter", "crop", "interpolation")
        chosen = [f"preprocess.{key}" for key in keys if getattr(self, key) != "auto"]
        origin = self.recipe.source
        if len(chosen) == len(keys):
            origin = "preprocess settings"
        elif chosen:
            origin = f"{', '.join(chosen)} set; the rest from {origin}"
        views = "" if self.tta == "none" else f"; tta {self.tta} ({TTA_VIEWS[self.tta]} views)"
        return f"{self.spec().describe()} ({origin}){views}"

    def limits(self) -> InputLimits:
        return InputLimits(self.max_file_bytes, self.max_image_pixels)

    def decoder_hints(self) -> DecoderHints:
        return DecoderHints(self.hw_decoder_load, self.device_memory_padding,
                            self.host_memory_padding, self.dali_roi_decode)


class BatchingSettings(Section):
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_delay_ms: float = Field(10.0, ge=0, le=60_000)
    queue_batches: int = Field(4, ge=1, le=1024)


class CacheSettings(Section):
    enabled: bool = True
    results: bool = True
    dir: UnsetIfBlank[Path] = None
    max_bytes: int = Field(4 * 1024**3, ge=1)
    prefix: str = Field("imgpipe", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    redis_url: UnsetIfBlank[str] = Field(None, pattern=REDIS_URL)
    redis_username: UnsetIfBlank[str] = None
    redis_password: UnsetIfBlank[SecretStr] = None
    redis_password_file: UnsetIfBlank[Path] = None
    redis_tls_ca_file: UnsetIfBlank[Path] = None
    redis_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    redis_max_entry_bytes: int = Field(1024 * 1024, ge=1)
    redis_timeout_s: float = Field(0.5, gt=0, le=60)
    redis_retry_interval_s: float = Field(5.0, ge=0)
    write_queue_items: int = Field(256, ge=1, le=100_000)
    hmac_key_file: UnsetIfBlank[Path] = None

    def directory(self) -> Path:
        """The local tier's directory: `dir`, else $XDG_CACHE_HOME/imgpipe."""
        if self.dir is not None:
            return self.dir
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return Path(base) / "imgpipe"

    def redis(self) -> Optional[RedisSettings]:
        """The shared tier's server, with the same kind of credentials and TLS
        as the jobs' Redis (None when `redis_url` is unset)."""
        if self.redis_url is None:
            return None
        return RedisSettings(url=self.redis_url, username=self.redis_username,
                             password=self.redis_password,
                             password_file=self.redis_password_file,
                             tls_ca_file=self.redis_tls_ca_file, timeout_s=self.redis_timeout_s)

    def hmac_key(self) -> Optional[bytes]:
        """The secret that signs cache entries, read from `hmac_key_file` (None
        when unset); ConfigError when the file cannot be read or holds nothing."""
        if self.hmac_key_file is None:
            return None
        try:
            # Surrounding whitespace is dropped so that `echo KEY > file` and
            # `printf KEY > file` give every host the same key.
            key = self.hmac_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read cache.hmac_key_file {self.hmac_key_file}: "
                              f"{exc.strerror}") from exc
        if not key:
            raise ConfigError(f"cache.hmac_key_file {self.hmac_key_file} is empty")
        return key


class RedisSettings(Section):
    """The Redis that carries jobs and results (serve, submit, status, dead)."""

    url: str = Field("redis://127.0.0.1:6379/0", pattern=REDIS_URL)
    username: UnsetIfBlank[str] = None
    password: UnsetIfBlank[SecretStr] = None
    password_file: UnsetIfBlank[Path] = None
    tls_ca_file: UnsetIfBlank[Path] = None
    prefix: str = Field("imgpipe", min_length=1, pattern=KEY_PART)
    timeout_s: float = Field(5.0, gt=0, le=600)
    max_backoff_s: float = Field(5.0, gt=0, le=600)
    # Sharded queues (pipeline/transport/shards.py): `shards` hash-tagged prefixes
    # <prefix>:{0}, <prefix>:{1}, ...; with `shard_urls`, shard i lives at its i-th URL.
    shards: int = Field(1, ge=1, le=1024)
    shard_urls: UrlList = []

    @field_validator("shard_urls")
    @classmethod
    def _valid_shard_urls(cls, urls: list[str]) -> list[str]:
        for index, url in enumerate(urls):
            if not re.match(REDIS_URL, url):
                # Never the URL itself: it may hold a password.
                raise ValueError(f"shard URL {index} must start with redis://, rediss://, "
                                 "unix:// or redis+sentinel://")
        return urls

    @model_validator(mode="after")
    def _shards_agree(self) -> RedisSettings:
        if self.shard_urls and len(self.shard_urls) != self.shards:
            raise ValueError(f"redis.shard_urls names {len(self.shard_urls)} servers but "
                             f"redis.shards is {self.shards}: give one URL per shard, and "
                             f"set redis.shards to {len(self.shard_urls)}")
        if self.shards > 1 and re.search(r"[{}]", self.prefix):
            raise ValueError(f"redis.prefix {self.prefix!r} holds {{ or }}: with redis.shards "
                             "above 1 each shard's keys take the hash tag {N}, which an "
                             "earlier one in the prefix would override; drop the braces")
        return self

    def shard_url(self, index: int) -> str:
        """Where shard `index` lives: its own URL, else `url`."""
        return self.shard_urls[index] if self.shard_urls else self.url

    def for_shard(self, index: int) -> RedisSettings:
        """These settings with `url` naming shard `index`'s server (credentials and
        TLS are shared by every shard)."""
        return self.model_copy(update={"url": self.shard_url(index)})

    # Replicas that must confirm a submit (WAIT) before it counts as queued; "auto":
    # 1 when the primary has a replica connected, else 0 (no WAIT).
    submit_wait_replicas: Union[Literal["auto"], Annotated[int, Field(ge=0, le=100)]] = "auto"
    submit_wait_timeout_ms: int = Field(1000, ge=1, le=60_000)


class ServeSettings(Section):
    group: str = Field("imgpipe", min_length=1, pattern=KEY_PART)
    consumer: str = Field("", pattern=r"^[A-Za-z0-9_.:@-]*$")
    allowed_roots: PathList = []
    max_inline_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # URL jobs (pipeline/sources/urls.py): refused while no prefix is set.
    allowed_url_prefixes: UrlList = []
    allow_private_urls: bool = False
    url_connect_timeout_s: float = Field(5.0, gt=0, le=600)
    url_read_timeout_s: float = Field(10.0, gt=0, le=600)
    url_fetch_timeout_s: float = Field(30.0, gt=0, le=3600)
    url_retries: int = Field(2, ge=0, le=10)
    url_max_redirects: int = Field(5, ge=0, le=20)
    url_fetch_threads: int = Field(4, ge=1, le=64)
    max_topk: int = Field(20, ge=1, le=1000)
    # Most views a job's `tta` may ask for (also bounded by batching.max_batch_size).
    max_views: int = Field(10, ge=1, le=4096)
    results_maxlen: int = Field(100_000, ge=1)
    reply_stream_ttl_s: int = Field(86_400, ge=1)
    dead_maxlen: int = Field(100_000, ge=1)
    max_deliveries: int = Field(3, ge=1, le=1000)
    claim_idle_ms: int = Field(60_000, ge=10)
    reclaim_interval_s: float = Field(5.0, gt=0)
    read_block_ms: int = Field(500, ge=1, le=60_000)
    drain_grace_s: float = Field(30.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    # Which of the redis.shards this daemon serves, by index; empty: all of them.
    shards: IndexList = []

    @field_validator("allowed_url_prefixes")
    @classmethod
    def _valid_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            Prefix.parse(prefix)  # ValueError, naming the prefix and what is wrong
        return prefixes

    def url_policy(self, max_bytes: int) -> UrlPolicy:
        """What URL jobs may fetch; `max_bytes` is the files' cap (preprocess.max_file_bytes)."""
        return UrlPolicy(tuple(self.allowed_url_prefixes), self.allow_private_urls,
                         self.url_connect_timeout_s, self.url_read_timeout_s,
                         self.url_fetch_timeout_s, self.url_retries, self.url_max_redirects,
                         self.url_fetch_threads, max_bytes)


class MetricsSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class Settings(Section):
    model: ModelSettings = ModelSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    batching: BatchingSettings = BatchingSettings()
    cache: CacheSettings = CacheSettings()
    redis: RedisSettings = RedisSettings()
    serve: ServeSettings = ServeSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _model_recipe(self) -> Settings:
        """Hand the model's recipe to the "auto" preprocessing keys, and check the
        spec they make together (ConfigError naming the key: pydantic passes it on)."""
        recipe = model_recipe(self.model.name)
        # A copy: the default PreprocessSettings instance is shared between Settings.
        object.__setattr__(self, "preprocess", self.preprocess.with_model_recipe(recipe))
        _check_recipe(self)
        _check_served_shards(self)
        return self

    def served_shards(self) -> list[int]:
        """The shard indices this daemon serves, in order, each once."""
        return sorted(set(self.serve.shards)) or list(range(self.redis.shards))


def _check_served_shards(settings: Settings) -> None:
    unknown = sorted({index for index in settings.serve.shards
                      if index >= settings.redis.shards})
    if unknown:
        raise ConfigError(
            f"invalid configuration: serve.shards names shard(s) "
            f"{', '.join(map(str, unknown))}, but redis.shards is {settings.redis.shards} "
            f"(indices 0 to {settings.redis.shards - 1}); fix serve.shards or raise "
            "redis.shards")


def _check_recipe(settings: Settings) -> None:
    """ConfigError, one line naming the setting, for a recipe this run cannot use."""
    from pipeline.preprocess import DALI_INTERPOLATIONS

    pre, name = settings.preprocess, settings.model.name
    try:
        spec = pre.spec()
    except ValueError:
        raise ConfigError(_crop_too_large(pre, name)) from None
    if pre.backend == "dali" and spec.interpolation not in DALI_INTERPOLATIONS:
        raise ConfigError(
            f"invalid configuration: preprocess.interpolation = {spec.interpolation!r}"
            f"{_whose(pre, 'interpolation', name)} cannot be reproduced by "
            f"preprocess.backend = 'dali', which has no {spec.interpolation} filter; use "
            f"preprocess.backend 'pillow' or 'auto', or preprocess.interpolation "
            f"{' or '.join(DALI_INTERPOLATIONS)}")
    views = TTA_VIEWS[pre.tta]
    if views > settings.batching.max_batch_size:
        raise ConfigError(
            f"invalid configuration: preprocess.tta = {pre.tta!r} scores {views} views of "
            f"each image in one model batch, but batching.max_batch_size is "
            f"{settings.batching.max_batch_size}; raise it to at least {views}")


def _crop_too_large(pre: PreprocessSettings, name: str) -> str:
    """Why the crop does not fit the resized image, naming where each comes from."""
    recipe = pre.recipe
    height, width = recipe.crop if pre.crop == "auto" else _crop_sides(pre.crop)
    resize = recipe.resize_shorter if pre.resize_shorter == "auto" else pre.resize_shorter
    crop = height if height == width else f"{height}x{width}"
    return (f"invalid configuration: preprocess.crop ({crop}){_whose(pre, 'crop', name)} "
            f"must not exceed preprocess.resize_shorter ({resize})"
            f"{_whose(pre, 'resize_shorter', name)}; set both, or a smaller crop")


def _whose(pre: PreprocessSettings, key: str, name: str) -> str:
    return f" from {name}'s recipe" if getattr(pre, key) == "auto" else ""


def load_settings(config_file: Optional[Path] = None,
                  environ: Optional[Mapping[str, str]] = None,
                  overrides: Optional[Mapping[str, Any]] = None) -> Settings:
    """Merge every layer and validate once; raise ConfigError naming the key."""
    merged: dict[str, Any] = {}
    config_file = config_file or DEFAULT_CONFIG
    environ = os.environ if environ is None else environ
    file_layer = read_toml(config_file)
    keys = {name: list(field.annotation.model_fields)  # type: ignore[union-attr]
            for name, field in Settings.model_fields.items()}
    unknown = unknown_in_file(keys, file_layer, config_file) + \
        unknown_in_environment(keys, environ)
    if unknown:
        raise ConfigError("; ".join(unknown))
    deep_merge(merged, file_layer)
    deep_merge(merged, env_layer(environ))
    deep_merge(merged, nest(overrides or {}))
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from exc


def settings_from_flags(flags: Mapping[str, Any]) -> Settings:
    """A command's settings: its "config" flag names the file, flags named
    "section.key" override everything else."""
    overrides = {key: value for key, value in flags.items() if "." in key}
    return load_settings(flags.get("config"), overrides=overrides)


