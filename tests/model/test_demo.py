"""The main job end to end: demo model and adapters built here, each stream answers in its adapter's own way."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.demo_run import run_demo


@pytest.mark.slow
@pytest.mark.timeout(900)  # building the demo takes ~30 s alone, minutes on a machine that runs other jobs too
def test_demo_builds_and_every_answer_comes_from_its_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(tmp_path / "demo") == 0
    out = capsys.readouterr().out
    assert "every answer came from its own adapter" in out
    assert (tmp_path / "demo" / "adapters" / "pirate" / "adapter_model.safetensors").is_file()
