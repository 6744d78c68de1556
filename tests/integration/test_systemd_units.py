"""The systemd units in systemd/: valid for `systemd-analyze verify`, and the
settings the daemon's stop, watchdog and sandbox rely on are there.

`verify` needs the ExecStart= binary to exist, so it checks copies whose
ExecStart= points at this environment's `imgpipe`; the template is checked as
an instance (`imgpipe@0.service`). The verify tests skip without systemd-analyze.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
PLAIN = UNITS / "imgpipe.service"
TEMPLATE = UNITS / "imgpipe@.service"
INSTALLED_IMGPIPE = "/opt/imgpipe/venv/bin/imgpipe"
# What the units' specifiers expand to on a typical host, instance 0.
SPECIFIERS = {"%H": "gpu-host-1.example", "%i": "0", "%C": "/var/cache", "%S": "/var/lib",
              "%%": "%"}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """{section: {key: [values in order]}}: keys such as Environment= and
    DeviceAllow= may repeat, which configparser cannot represent."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a key=value line: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, key: str, section: str = "Service") -> str:
    values = unit.get(section, {}).get(key, [])
    assert values, f"{key}= missing from [{section}]"
    return values[-1]  # the last assignment wins, as in systemd


def seconds(span: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s", "5m") in seconds."""
    factors = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "ms": 1e-3, "msec": 1e-3,
               "us": 1e-6, "usec": 1e-6, "m": 60, "min": 60, "minute": 60, "minutes": 60,
               "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s+", "", span), span
    return sum(float(number) * factors[unit] for number, unit in parts)


def environment(unit: Unit) -> dict[str, str]:
    """Environment= assignments, specifiers expanded as on a typical host."""
    env: dict[str, str] = {}
    for line in unit["Service"].get("Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = re.sub(r"%.", lambda m: SPECIFIERS[m.group(0)], value)
    return env


def default_drain_grace_s() -> float:
    with open(ROOT / "configs" / "default.toml", "rb") as handle:
        return float(tomllib.load(handle)["serve"]["drain_grace_s"])


@pytest.fixture(scope="module", params=[PLAIN, TEMPLATE], ids=lambda p: p.name)
def unit(request: pytest.FixtureRequest) -> Unit:
    return parse_unit(request.param)


# --- What the daemon relies on ------------------------------------------------

def test_runs_the_installed_daemon_with_the_system_config(unit: Unit) -> None:
    argv = shlex.split(one(unit, "ExecStart"))
    assert argv == [INSTALLED_IMGPIPE, "serve", "--config", "/etc/imgpipe/imgpipe.toml"]
    assert one(unit, "EnvironmentFile") == "-/etc/imgpipe/imgpipe.env"
    assert INSTALLED_IMGPIPE in (UNITS / "README.md").read_text()


def test_start_up_and_watchdog_speak_sd_notify(unit: Unit) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    watchdog = seconds(one(unit, "WatchdogSec"))
    assert 10 <= watchdog <= 600
    assert seconds(one(unit, "TimeoutStartSec")) >= 120  # model load and warm-up


def test_stop_leaves_time_to_drain_and_signals_only_the_daemon(unit: Unit) -> None:
    grace = default_drain_grace_s()
    stop = seconds(one(unit, "TimeoutStopSec"))
    assert stop > grace + 5, f"TimeoutStopSec={stop} s leaves no margin over {grace} s"
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "Restart") == "on-failure"
    assert seconds(one(unit, "RestartSec")) > 0
    assert "multi-user.target" in one(unit, "WantedBy", "Install")


def test_environment_is_valid_settings(unit: Unit) -> None:
    """Every IMGPIPE_ variable names a real setting with a valid value (the
    settings forbid unknown keys), and the cache lives in CacheDirectory=."""
    env = environment(unit)
    settings = load_settings(ROOT / "configs" / "default.toml", environ=env)
    assert one(unit, "CacheDirectory") == "imgpipe"
    assert one(unit, "StateDirectory") == "imgpipe"
    assert str(settings.cache.directory()).startswith("/var/cache/imgpipe")
    assert settings.serve.consumer.startswith(SPECIFIERS["%H"])
    assert env["XDG_CACHE_HOME"].startswith("/var/cache/imgpipe")


def test_sandbox(unit: Unit) -> None:
    service = unit["Service"]
    assert one(unit, "DynamicUser") == "yes" or one(unit, "User") not in ("", "root")
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") in ("yes", "read-only", "tmpfs")
    for key in ("PrivateTmp", "NoNewPrivileges", "ProtectKernelTunables",
                "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert one(unit, key) == "yes", key
    assert one(unit, "SystemCallArchitectures") == "native"
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET",
                                                                   "AF_INET6"}
    # CUDA and PyTorch need W+X memory and the GPU device nodes.
    assert service.get("MemoryDenyWriteExecute", ["no"])[-1] == "no"
    assert service.get("PrivateDevices", ["no"])[-1] == "no"
    assert int(one(unit, "LimitNOFILE")) >= 4096


def test_device_access(unit: Unit) -> None:
    assert one(unit, "DevicePolicy") in ("closed", "strict")
    allowed = unit["Service"]["DeviceAllow"]
    for entry in allowed:
        node, access = entry.split()
        assert access == "rw"
        # systemd takes globs in char-GROUP names only; "/dev/nvidia*" would
        # be looked up literally when the unit starts and silently ignored.
        assert node.startswith("char-") or not any(c in node for c in "*?["), entry


def test_plain_unit_may_use_every_gpu() -> None:
    unit = parse_unit(PLAIN)
    assert unit["Service"]["DeviceAllow"] == ["char-nvidia* rw"]
    assert "IMGPIPE_MODEL__DEVICE" not in environment(unit)  # the config file's choice


def test_template_instance_gets_its_own_gpu_and_consumer() -> None:
    unit = parse_unit(TEMPLATE)
    nodes = [entry.split()[0] for entry in unit["Service"]["DeviceAllow"]]
    assert "/dev/nvidia%i" in nodes and "/dev/nvidiactl" in nodes
    assert not any(node.startswith("char-nvidia") and node != "char-nvidia-uvm"
                   for node in nodes), "the template must not open every GPU"
    raw = dict(a.partition("=")[::2] for line in unit["Service"]["Environment"]
               for a in shlex.split(line))
    assert "%i" in raw["IMGPIPE_SERVE__CONSUMER"]
    # Only /dev/nvidia%i can be opened, so CUDA numbers it 0 in every instance.
    assert raw["IMGPIPE_MODEL__DEVICE"] == "cuda:0"


# --- systemd-analyze verify --------------------------------------------------

def local_imgpipe() -> str:
    script = Path(sys.executable).parent / "imgpipe"
    return str(script) if script.exists() else sys.executable


def verify(directory: Path, *names: str) -> list[str]:
    """`systemd-analyze verify` output lines for units in `directory`."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run([analyze, "verify", *(str(directory / n) for n in names)],
                          capture_output=True, text=True, timeout=120, cwd=directory)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def test_verify_reports_nothing_about_the_units(tmp_path: Path) -> None:
    # Lines `verify` prints for a trivial unit concern this machine, not our
    # units (none on a clean host); those alone are ignored.
    (tmp_path / "baseline.service").write_text(
        f"[Unit]\nDescription=baseline\n\n[Service]\nExecStart={local_imgpipe()} --help\n")
    noise = set(verify(tmp_path, "baseline.service"))

    for source, name in ((PLAIN, "imgpipe.service"), (TEMPLATE, "imgpipe@0.service")):
        text = source.read_text()
        assert text.count(f"ExecStart={INSTALLED_IMGPIPE} ") == 1
        (tmp_path / name).write_text(
            text.replace(f"ExecStart={INSTALLED_IMGPIPE} ", f"ExecStart={local_imgpipe()} "))
    report = [line for line in verify(tmp_path, "imgpipe.service", "imgpipe@0.service")
              if line not in noise]
    assert report == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    text = PLAIN.read_text().replace(f"ExecStart={INSTALLED_IMGPIPE} ",
                                     f"ExecStart={local_imgpipe()} ")
    text = text.replace("KillMode=mixed", "KillMode=mixd").replace("WatchdogSec=", "WatchdogSecs=")
    (tmp_path / "imgpipe.service").write_text(text)
    report = "\n".join(verify(tmp_path, "imgpipe.service"))
    assert "WatchdogSecs" in report and "mixd" in report
