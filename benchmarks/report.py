"""Writing a benchmark's results: a printed table, JSON, Markdown and a PNG bar chart."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The short HEAD, with '+dirty' when the working tree has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": git_commit(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for name in ("transformers", "bitsandbytes", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # missing, or broken on this host: reported as None
            env[name] = None
    return env


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join([line, sep, *body])


def write(name: str, title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], summary: dict[str, Any],
          plot: tuple[str, str] | None = None, notes: str = "", results: Path = RESULTS) -> Path:
    """Print and save results/<name>.{json,md,png}; plot = (label column, value column)."""
    results.mkdir(parents=True, exist_ok=True)
    env = environment()
    text = table(rows, columns)
    print(f"\n{title}\n\n{text}\n")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    (results / f"{name}.json").write_text(json.dumps({"title": title, "environment": env, "summary": summary, "rows": list(rows)}, indent=2))
    md = [f"# {title}", "", f"{env['date']}, commit {env['commit']}, {env['machine']}, {env['cpu_threads']} threads, torch {env['torch']}"
          + (f", {env['cuda']}" if env["cuda"] else ""), "", text, ""]
    md += [f"- **{k}**: {v:.3f}" if isinstance(v, float) else f"- **{k}**: {v}" for k, v in summary.items()]
    if notes:
        md += ["", notes]
    (results / f"{name}.md").write_text("\n".join(md) + "\n")
    if plot is not None:
        _plot(results / f"{name}.png", title, rows, *plot)
    return results / f"{name}.json"


def _plot(path: Path, title: str, rows: Sequence[dict[str, Any]], label: str, value: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib missing: no PNG)")
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows)), 3.6))
    ax.bar([str(r[label]) for r in rows], [float(r[value]) for r in rows], color="#4c72b0")
    ax.set_ylabel(value)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
