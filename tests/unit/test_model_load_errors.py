"""A model or weights file that cannot load says what it is not, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.errors import ModelLoadError
from pipeline.models import load_model

ARCHITECTURE = "mobilenet_v3_small"


def refusal(name: str, weights: Path | None = None) -> str:
    with pytest.raises(ModelLoadError) as raised:
        load_model(name, weights)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_bytes_that_are_no_pickle_say_what_the_file_is_not(tmp_path):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"174812789" + bytes(range(256)))
    message = refusal(ARCHITECTURE, garbage)
    assert message.startswith(f"weights file {garbage} is not a PyTorch state_dict or "
                              "checkpoint (could not unpickle: ")
    assert "Weights only load failed" not in message  # torch's advice, not the reason


def test_a_whole_pickled_model_is_named_with_the_fix(tmp_path):
    whole = tmp_path / "model.pth"
    torch.save(torchvision.models.mobilenet_v3_small(), whole)
    message = refusal(ARCHITECTURE, whole)
    assert "holds a pickled torchvision.models.mobilenetv3.MobileNetV3 object" in message
    assert "state_dict()" in message


def test_an_empty_weights_file_is_called_empty(tmp_path):
    empty = tmp_path / "weights.pth"
    empty.touch()
    assert refusal(ARCHITECTURE, empty) == f"weights file {empty} is empty"


@pytest.mark.parametrize(("content", "said"), [
    ([1, 2, 3], "holds a list, not a state_dict"),
    ({"head.weight": 3}, "'head.weight' is not a tensor"),
])
def test_a_checkpoint_that_holds_no_state_dict_says_so(tmp_path, content, said):
    weights = tmp_path / "weights.pth"
    torch.save(content, weights)
    assert said in refusal(ARCHITECTURE, weights)


@pytest.mark.parametrize("name", ["./nope.pt", "nope.pt", "models/nope"])
def test_a_model_path_that_does_not_exist_is_no_such_file(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal(name) == f"no such file: {name}"


def test_a_model_path_that_is_a_directory_is_not_a_file(tmp_path):
    assert refusal(str(tmp_path)) == f"not a file: {tmp_path}"


def test_a_name_that_is_no_path_is_still_an_unknown_model():
    assert refusal("resnet9000").startswith("unknown model 'resnet9000'")
