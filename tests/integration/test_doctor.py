"""`pipeline.doctor` against real parts: redis-servers of our own (never :6379),
the installed packages, files on disk."""

from __future__ import annotations

import io
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from rich.console import Console

from pipeline import doctor, ort_providers
from pipeline.config import Settings
from pipeline.preprocess.select import pillow_implementation
from tests.redis_server import RedisServer

Factory = Callable[[], RedisServer]
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Pa55word"


def settings_for(url: str, tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    """Settings on `url` with a cache directory of the test's own (no environment)."""
    values: dict[str, Any] = {"redis": {"url": url}, "cache": {"dir": str(tmp_path / "cache")}}
    for section, keys in sections.items():
        values[section] = {**values.get(section, {}), **keys}
    return Settings.model_validate(values)


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in checks}


def rendered(checks: list[doctor.Check]) -> str:
    out = io.StringIO()
    doctor.render(checks, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def test_a_healthy_setup_is_ready(redis_server: RedisServer, tmp_path: Path) -> None:
    # given the defaults, on a Redis with AOF on (the fixture's) and no maxmemory
    checks = doctor.run(settings_for(redis_server.url, tmp_path), serve=True)
    found = by_name(checks)
    # then every part is reported, nothing fails, and the server is named by host:port
    assert {"python", "torch", "cuda", "onnxruntime", "dali", "dali gpu", "pillow", "model",
            "cache dir", "cache redis", "redis", "redis persistence", "redis eviction"
            } <= set(found)
    assert doctor.exit_code(checks) == 0, checks
    assert found["redis"].status == "ok"
    assert found["redis"].detail.startswith(f"127.0.0.1:{redis_server.port}: Redis 7")
    assert found["redis persistence"] == doctor.Check("redis persistence", "ok", "AOF on")
    assert found["redis eviction"].status == "ok"
    assert found["model"].status == "ok" and "efficientnet_lite0" in found["model"].detail
    # the cache directory is probed, not created
    assert found["cache dir"].status == "ok" and not (tmp_path / "cache").exists()
    assert found["cache redis"].status == "skip"
    if not torch.cuda.is_available():
        assert found["cuda"].status == "ok" and found["cuda"].detail.startswith("CPU")


def test_aof_off_warns_and_on_again_is_ok(redis_server_factory: Factory,
                                          tmp_path: Path) -> None:
    server = redis_server_factory()
    settings = settings_for(server.url, tmp_path)
    with redis.Redis.from_url(server.url) as conn:
        # given a server without AOF
        conn.config_set("appendonly", "no")
        checks = doctor.run(settings)
        # then that is a warning, not a failure
        assert by_name(checks)["redis persistence"].status == "warn"
        assert "AOF off" in by_name(checks)["redis persistence"].detail
        assert doctor.exit_code(checks) == 0
        # when AOF is switched on at run time, then it is ok
        conn.config_set("appendonly", "yes")
        assert by_name(doctor.run(settings))["redis persistence"].status == "ok"


def test_an_evicting_policy_warns(redis_server_factory: Factory, tmp_path: Path) -> None:
    server = redis_server_factory()
    settings = settings_for(server.url, tmp_path)
    with redis.Redis.from_url(server.url) as conn:
        # given a memory limit with a policy that may evict any key, streams included
        conn.config_set("maxmemory", "100mb")
        conn.config_set("maxmemory-policy", "allkeys-lru")
        eviction = by_name(doctor.run(settings))["redis eviction"]
        assert eviction.status == "warn" and "allkeys-lru" in eviction.detail
        # policies that only evict keys with a TTL leave imgpipe's streams alone
        conn.config_set("maxmemory-policy", "volatile-lru")
        assert by_name(doctor.run(settings))["redis eviction"].status == "ok"
        conn.config_set("maxmemory-policy", "noeviction")
        assert by_name(doctor.run(settings))["redis eviction"].status == "ok"


def test_a_stopped_redis_warns_and_fails_for_serve(redis_server_factory: Factory,
                                                  tmp_path: Path) -> None:
    # given a Redis that is down, as jobs broker and as shared cache tier
    server = redis_server_factory()
    server.stop()
    settings = settings_for(server.url, tmp_path, cache={"redis_url": server.url})
    # when checked for scoring only, then it is a warning
    found = by_name(doctor.run(settings))
    assert found["redis"].status == "warn" and "unreachable" in found["redis"].detail
    assert found["redis persistence"].status == found["redis eviction"].status == "skip"
    assert found["cache redis"].status == "warn"
    # when checked for serving, then the set-up cannot run
    checks = doctor.run(settings, serve=True)
    assert by_name(checks)["redis"].status == "fail" and doctor.exit_code(checks) == 1
    assert by_name(checks)["cache redis"].status == "warn"


def test_every_shard_server_is_checked(redis_server: RedisServer,
                                       redis_server_factory: Factory, tmp_path: Path) -> None:
    # given two shards on servers of their own, the second one down
    down = redis_server_factory()
    down.stop()
    settings = settings_for(redis_server.url, tmp_path, redis={
        "url": redis_server.url, "shards": 2, "shard_urls": [redis_server.url, down.url]})
    # when checked for serving
    checks = doctor.run(settings, serve=True)
    found = by_name(checks)
    # then each shard's server is reported by name, and the one down fails the set-up
    assert found["redis (shard 0)"].status == "ok"
    assert found["redis persistence (shard 0)"].status == "ok"
    assert found["redis (shard 1)"].status == "fail"
    assert f"127.0.0.1:{down.port}: unreachable" in found["redis (shard 1)"].detail
    assert doctor.exit_code(checks) == 1


@pytest.mark.parametrize("how", ["wrong password in the URL", "password setting",
                                 "no password"])
def test_rejected_credentials_fail_and_never_show_the_password(
        redis_server_factory: Factory, tmp_path: Path, how: str) -> None:
    # given a server that requires a password we do not have
    server = redis_server_factory()
    with redis.Redis.from_url(server.url) as conn:
        conn.config_set("requirepass", "the-real-one")
    url, extra = server.url, {}
    if how == "wrong password in the URL":
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    elif how == "password setting":
        extra = {"password": PASSWORD}
    settings = settings_for(url, tmp_path, redis=extra)
    # when checked
    checks = doctor.run(settings)
    screen = rendered(checks)
    # then authentication fails clearly, and neither password nor URL is shown
    assert by_name(checks)["redis"].status == "fail" and doctor.exit_code(checks) == 1
    assert "authentication failed" in by_name(checks)["redis"].detail
    assert PASSWORD not in screen and "the-real-one" not in screen
    assert url not in screen and f"127.0.0.1:{server.port}" in screen
    assert all(check.name in screen for check in checks)


def test_a_password_for_a_server_without_one_is_not_shown(redis_server: RedisServer,
                                                          tmp_path: Path) -> None:
    # given a password in the URLs of a server that has none (redis-py then connects)
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    checks = doctor.run(settings_for(url, tmp_path, cache={"redis_url": url}))
    # then both are reached, and only host:port is shown
    assert by_name(checks)["redis"].status == by_name(checks)["cache redis"].status == "ok"
    screen = rendered(checks)
    assert PASSWORD not in screen and f"127.0.0.1:{redis_server.port}: Redis" in screen


def test_pillow_reports_the_installed_implementation(redis_server: RedisServer,
                                                    tmp_path: Path) -> None:
    pillow = by_name(doctor.run(settings_for(redis_server.url, tmp_path)))["pillow"]
    if pillow_implementation() == "pillow-simd":
        assert pillow.status == "ok" and pillow.detail.startswith("Pillow-SIMD")
    else:
        assert pillow.status == "warn" and pillow.detail.startswith("plain Pillow")


def test_model_files_are_located(redis_server: RedisServer, tmp_path: Path,
                                 tiny_model: Path) -> None:
    def model_check(**model: Any) -> tuple[doctor.Check, int]:
        checks = doctor.run(settings_for(redis_server.url, tmp_path, model=model))
        return by_name(checks)["model"], doctor.exit_code(checks)

    # a torchvision architecture without weights cannot run: they are never downloaded
    check, code = model_check(name="resnet18")
    assert check.status == "fail" and "weights" in check.detail and code == 1
    # nor with a weights file that is not there
    check, code = model_check(name="resnet18", weights=str(tmp_path / "nope.pth"))
    assert check.status == "fail" and "does not exist" in check.detail and code == 1
    # a file present is enough (it is not loaded)
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not checked beyond being readable")
    assert model_check(name="resnet18", weights=str(weights))[0].status == "ok"
    # a TorchScript path, present or not; a name that means nothing; a missing labels file
    assert model_check(name=str(tiny_model))[0].status == "ok"
    assert model_check(name=str(tmp_path / "gone.pt"))[0].status == "fail"
    assert model_check(name="no_such_net")[0].status == "fail"
    check, _ = model_check(labels=str(tmp_path / "labels.txt"))
    assert check.status == "fail" and "labels file" in check.detail


def test_an_unusable_cache_directory_warns(redis_server: RedisServer, tmp_path: Path) -> None:
    # given a cache "directory" that is a file, and one that would sit below a file
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for directory in (blocker, blocker / "cache"):
        checks = doctor.run(settings_for(redis_server.url, tmp_path,
                                         cache={"dir": str(directory)}))
        # then the engine would run without the local tier: a warning, not a failure
        assert by_name(checks)["cache dir"].status == "warn"
        assert "not a directory" in by_name(checks)["cache dir"].detail
        assert doctor.exit_code(checks) == 0
    disabled = doctor.run(settings_for(redis_server.url, tmp_path, cache={"enabled": False}))
    assert by_name(disabled)["cache dir"].status == "skip"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_configured_without_cuda_fails(redis_server: RedisServer,
                                             tmp_path: Path) -> None:
    checks = doctor.run(settings_for(redis_server.url, tmp_path, model={"device": "cuda"}))
    assert by_name(checks)["cuda"].status == "fail" and doctor.exit_code(checks) == 1


def test_rendering_names_every_check_and_the_verdict(redis_server: RedisServer,
                                                     tmp_path: Path) -> None:
    checks = [doctor.Check("alpha", "ok", "fine"), doctor.Check("beta", "warn", "[red]x"),
              doctor.Check("gamma", "fail", "broken")]
    screen = rendered(checks)
    assert all(name in screen for name in ("alpha", "beta", "gamma"))
    assert "[red]x" in screen  # details are text, never rich markup
    assert "cannot run: 1 failed (gamma); 1 warning" in screen
    assert doctor.exit_code(checks) == 1 and doctor.exit_code(checks[:2]) == 0


def test_the_dali_probe_decodes_with_the_real_graph() -> None:
    # the GPU check runs this on cuda:N; on the CPU operators it must pass as well
    pytest.importorskip("nvidia.dali")
    doctor._dali_decodes("cpu")


def test_a_cpu_only_onnxruntime_on_a_gpu_host_is_a_warning_naming_the_fix() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]  # as on an H200 host
    on_gpu = doctor.onnxruntime_providers("1.30.0", cpu_only, "cuda:0")
    assert on_gpu.status == "warn"
    assert "CPU-only build (Azure, CPU) on a GPU host" in on_gpu.detail
    # the commands, for this interpreter: both wheels out, then the GPU one alone
    assert on_gpu.detail.endswith(
        f"replace it: {sys.executable} -m pip uninstall -y onnxruntime onnxruntime-gpu && "
        f"{sys.executable} -m pip install 'onnxruntime-gpu>=1.27,<2'")
    assert doctor.onnxruntime_providers("1.30.0", cpu_only, "cpu").status == "ok"
    gpu_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert doctor.onnxruntime_providers("1.30.0", gpu_build, "cuda:0") == doctor.Check(
        "onnxruntime", "ok", "1.30.0 (CUDA, CPU)")


@pytest.mark.parametrize(("device", "wheel"), [("cuda:0", "onnxruntime-gpu>=1.27,<2"),
                                               ("cpu", "onnxruntime>=1.18,<2")])
def test_both_onnxruntime_wheels_installed_is_a_warning_keeping_one(device: str,
                                                                   wheel: str) -> None:
    # given both wheels installed, the CPU one last (its files won: no CUDA provider)
    both = doctor.onnxruntime_providers("1.30.0", ["CPUExecutionProvider"], device,
                                        ["onnxruntime", "onnxruntime-gpu"])

    # then a warning that says so, with the commands that keep the one this host needs
    assert both.status == "warn" and "\n" not in both.detail
    assert "both onnxruntime and onnxruntime-gpu installed" in both.detail
    assert both.detail.endswith(
        f"keep one: {sys.executable} -m pip uninstall -y onnxruntime onnxruntime-gpu && "
        f"{sys.executable} -m pip install '{wheel}'")


def test_doctor_names_the_wheels_of_the_cpu_and_gpu_extras() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["cpu"] == [ort_providers.CPU_WHEEL]
    assert extras["gpu"] == [ort_providers.GPU_WHEEL]
    # and neither is a dependency of every install: they would clash
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    assert not [name for name in dependencies if name.startswith("onnxruntime")]
    # and this environment has one of them, as either extra installs it
    assert doctor.installed_wheels() in (["onnxruntime"], ["onnxruntime-gpu"])

