"""load_settings: defaults < TOML file < IMGPIPE_ environment < overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG, Settings, load_settings
from pipeline.errors import ConfigError
from pipeline.spec import InputLimits, PreprocessSpec

NO_ENV: dict[str, str] = {}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imgpipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the documented defaults ------------------------------------------------


def test_default_toml_lists_exactly_the_model_defaults():
    # given the documented config file and the model's own defaults
    with open(DEFAULT_CONFIG, "rb") as handle:
        documented = tomllib.load(handle)
    defaults = Settings().model_dump()

    # then they have the same sections and keys ...
    assert documented.keys() == defaults.keys()
    for section, values in defaults.items():
        assert documented[section].keys() == values.keys(), section
        # ... and every value is the default ("" is how TOML spells "not set")
        for key, value in values.items():
            written = documented[section][key]
            expected = "" if value is None else value
            assert written == expected, f"{section}.{key}: file {written!r}, model {value!r}"
            assert type(written) is type(expected), f"{section}.{key}"


def test_loading_with_no_file_and_no_env_gives_the_defaults():
    settings = load_settings(environ=NO_ENV)
    assert settings == Settings()
    assert settings.model.weights is None and settings.model.labels is None


def test_default_settings_build_the_default_spec_and_limits():
    settings = load_settings(environ=NO_ENV)
    assert settings.preprocess.spec() == PreprocessSpec()
    assert settings.preprocess.limits() == InputLimits()


# --- layers -----------------------------------------------------------------


def test_config_file_overrides_defaults_and_leaves_other_keys_alone(tmp_path):
    # given a file that sets two keys
    path = write_toml(tmp_path, "[batching]\nmax_batch_size = 16\n[model]\ntopk = 3\n")

    # when
    settings = load_settings(path, environ=NO_ENV)

    # then those keys change and the rest keep their defaults
    assert settings.batching.max_batch_size == 16
    assert settings.model.topk == 3
    assert settings.batching.max_delay_ms == 10.0
    assert settings.model.name == "efficientnet_lite0"


def test_environment_beats_the_file(tmp_path):
    path = write_toml(tmp_path, "[batching]\nmax_batch_size = 16\n")
    settings = load_settings(path, environ={"IMGPIPE_BATCHING__MAX_BATCH_SIZE": "64"})
    assert settings.batching.max_batch_size == 64


def test_overrides_beat_the_environment(tmp_path):
    path = write_toml(tmp_path, "[batching]\nmax_batch_size = 16\n")
    settings = load_settings(path, environ={"IMGPIPE_BATCHING__MAX_BATCH_SIZE": "64"},
                             overrides={"batching.max_batch_size": 8})
    assert settings.batching.max_batch_size == 8


def test_none_overrides_are_ignored():
    settings = load_settings(environ={"IMGPIPE_MODEL__TOPK": "7"},
                             overrides={"model.topk": None})
    assert settings.model.topk == 7


def test_environment_values_are_converted_to_their_types():
    env = {"IMGPIPE_BATCHING__MAX_DELAY_MS": "2.5", "IMGPIPE_PREPROCESS__BACKEND": "pillow",
           "IMGPIPE_MODEL__WEIGHTS": "/models/r50.pth", "IMGPIPE_MODEL__DEVICE": "cuda:1"}
    settings = load_settings(environ=env)
    assert settings.batching.max_delay_ms == 2.5
    assert settings.preprocess.backend == "pillow"
    assert settings.model.weights == Path("/models/r50.pth")
    assert settings.model.device == "cuda:1"


def test_unrelated_environment_variables_are_ignored():
    settings = load_settings(environ={"IMGPIPE_HOME": "/srv", "HOME": "/root",
                                      "PATH": "/usr/bin"})
    assert settings == Settings()


def test_the_real_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("IMGPIPE_BATCHING__MAX_BATCH_SIZE", "48")
    assert load_settings().batching.max_batch_size == 48


# --- validation -------------------------------------------------------------


def test_invalid_environment_value_names_key_value_and_variable():
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"IMGPIPE_BATCHING__MAX_BATCH_SIZE": "0"})
    message = str(caught.value)
    assert "batching.max_batch_size" in message
    assert "'0'" in message
    assert "IMGPIPE_BATCHING__MAX_BATCH_SIZE" in message


@pytest.mark.parametrize(("text", "key"), [
    ('[model]\ndevice = "gpu"\n', "model.device"),
    ('[preprocess]\nbackend = "opencv"\n', "preprocess.backend"),
    ("[preprocess]\nworkers = -1\n", "preprocess.workers"),
    ('[batching]\nmax_batch_size = "lots"\n', "batching.max_batch_size"),
    ("[model]\ntopk = 1001\n", "model.topk"),
    ('[model]\noutput = "vectors"\n', "model.output"),
])
def test_invalid_file_values_are_refused_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(write_toml(tmp_path, text), environ=NO_ENV)


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript", "torch-compile"])
def test_embeddings_are_accepted_on_every_variant(tmp_path, backend):
    # every variant gives features now (pipeline/models/features.py, WithFeatures)
    text = f'[model]\noutput = "embedding"\nbackend = "{backend}"\n'
    settings = load_settings(write_toml(tmp_path, text), environ=NO_ENV)
    assert (settings.model.output, settings.model.backend) == ("embedding", backend)
    settings = load_settings(write_toml(tmp_path, '[model]\noutput = "both"\n'), environ=NO_ENV)
    assert (settings.model.output, settings.model.normalize_embeddings) == ("both", True)


@pytest.mark.parametrize("text", [
    '[model]\ncolour = "red"\n',
    "[cache]\nsize = 3\n",
    "verbose = true\n",
])
def test_unknown_keys_are_refused(tmp_path, text):
    with pytest.raises(ConfigError, match="colour|cache|verbose"):
        load_settings(write_toml(tmp_path, text), environ=NO_ENV)


def test_unknown_environment_key_is_refused():
    with pytest.raises(ConfigError, match="max_batch"):
        load_settings(environ={"IMGPIPE_BATCHING__MAX_BATCH": "8"})


def test_a_key_typo_in_the_file_names_the_file_and_the_closest_key(tmp_path):
    path = write_toml(tmp_path, "[batching]\nmax_batchsize = 8\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ=NO_ENV)
    assert str(raised.value) == (f"unknown key `batching.max_batchsize` in {path}; "
                                 "did you mean `max_batch_size`?")


def test_a_section_typo_in_the_file_suggests_the_closest_section(tmp_path):
    path = write_toml(tmp_path, "[batchng]\nmax_batch_size = 8\n")
    with pytest.raises(ConfigError, match=r"unknown section `\[batchng\]` in .*imgpipe.toml; "
                                          r"did you mean `\[batching\]`\?"):
        load_settings(path, environ=NO_ENV)


def test_a_key_outside_any_section_suggests_where_it_belongs(tmp_path):
    path = write_toml(tmp_path, "topk = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key `topk` .*did you mean `model.topk`"):
        load_settings(path, environ=NO_ENV)


def test_every_unknown_key_is_named_in_one_line_without_pydantic_wording(tmp_path):
    path = write_toml(tmp_path, '[model]\ncolour = "red"\n[cache]\nsize = 3\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ=NO_ENV)
    message = str(raised.value)
    assert "`model.colour`" in message and "`cache.size`" in message
    assert "Extra inputs" not in message and "\n" not in message


def test_an_environment_typo_names_the_variable_and_the_one_meant():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"IMGPIPE_BATCHING__MAX_BATCHSIZE": "8"})
    assert str(raised.value) == (
        "unknown setting IMGPIPE_BATCHING__MAX_BATCHSIZE: no key `max_batchsize` in section "
        "`[batching]`; did you mean IMGPIPE_BATCHING__MAX_BATCH_SIZE?")


def test_an_environment_section_typo_names_the_variable_and_the_one_meant():
    with pytest.raises(ConfigError, match=r"unknown setting IMGPIPE_BATCHNG__MAX_BATCH_SIZE: no "
                                          r"section `batchng`; did you mean "
                                          r"IMGPIPE_BATCHING__MAX_BATCH_SIZE\?"):
        load_settings(environ={"IMGPIPE_BATCHNG__MAX_BATCH_SIZE": "8"})


def test_crop_larger_than_resize_shorter_is_refused():
    with pytest.raises(ConfigError, match=r"crop \(300\).*resize_shorter \(256\)"):
        load_settings(environ={"IMGPIPE_PREPROCESS__CROP": "300"})


def test_missing_config_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(missing, environ=NO_ENV)


def test_malformed_toml_is_a_config_error(tmp_path):
    path = write_toml(tmp_path, "[batching\nmax_batch_size = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, environ=NO_ENV)


def test_toml_that_is_not_utf8_is_a_config_error(tmp_path):
    # given a config file saved in Latin-1 (TOML must be UTF-8)
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nlabels = "étiquettes.txt"\n'.encode("latin-1"))

    # when / then: a one-line ConfigError, not a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match="latin1.toml"):
        load_settings(path, environ=NO_ENV)


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_settings(tmp_path, environ=NO_ENV)


def test_an_invalid_redis_url_is_refused_without_echoing_its_password():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"IMGPIPE_CACHE__REDIS_URL": "http://user:hunter2@host:6379"})
    assert "cache.redis_url" in str(raised.value)
    assert "hunter2" not in str(raised.value)


# --- the Redis of jobs and results -------------------------------------------


def test_short_redis_variables_set_the_url_and_password():
    settings = load_settings(environ={"IMGPIPE_REDIS_URL": "rediss://queue:6380/2",
                                      "IMGPIPE_REDIS_PASSWORD": "hunter2"})
    assert settings.redis.url == "rediss://queue:6380/2"
    assert settings.redis.password is not None
    assert settings.redis.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_allowed_roots_from_the_environment_are_split_on_colons():
    settings = load_settings(environ={"IMGPIPE_SERVE__ALLOWED_ROOTS": "/srv/images:/data"})
    assert settings.serve.allowed_roots == [Path("/srv/images"), Path("/data")]


def test_an_invalid_password_value_is_never_echoed():
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"IMGPIPE_REDIS__PASSWORD": "hunter2",
                               "IMGPIPE_REDIS__URL": "http://user:hunter2@host"})
    assert "redis.url" in str(raised.value)
    assert "hunter2" not in str(raised.value)
