"""The main job end to end: demo model and adapters built here, each stream answers in its adapter's own way."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.demo_run import run_demo
from loraplex.model.demo import demo_dir


@pytest.mark.slow
@pytest.mark.timeout(900)  # building the demo takes ~30 s alone, minutes on a machine that runs other jobs too
def test_demo_builds_and_every_answer_comes_from_its_adapter(demo_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = demo_cache / "loraplex" / "demo"  # the session's demo, built once (make_demo) and reused here
    assert run_demo(root) == 0
    out = capsys.readouterr().out
    assert "every answer came from its own adapter" in out
    assert (root / "adapters" / "pirate" / "adapter_model.safetensors").is_file()


def test_the_demo_has_one_home_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAPLEX_DEMO_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert demo_dir() == tmp_path / "home" / ".cache" / "loraplex" / "demo"  # whatever the working directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_dir() == tmp_path / "xdg" / "loraplex" / "demo"
    monkeypatch.setenv("LORAPLEX_DEMO_DIR", str(tmp_path / "mine"))
    assert demo_dir() == tmp_path / "mine"
