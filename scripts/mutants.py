"""Mutation testing (mutmut 3.8.1) of the bookkeeping modules, each against its own fast tests.

    make mutants                      every module below, one after another
    make mutants MODULES="sampler"    some of them (the others' rows in the report are kept)

mutmut names mutants by their file's path from its working directory and finds the mutated
package only under mutants/src (or lib, source), so each module runs in a staging directory
build/mutmut/<module>/ with `src -> server` and `tests -> tests` symlinks and a pyproject.toml
of its own (the module, its tests, our pytest settings). Results go to
benchmarks/results/mutants.json (per module: killed, survived, ... and the surviving mutants'
names) and mutants.md. `cd build/mutmut/<module> && ../../../.venv/bin/mutmut show <name>`
prints a survivor's diff. Why the survivors that remain are harmless: README, Reliability.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).parent / "mutmut"
RESULTS = ROOT / "benchmarks" / "results"

# module -> (file under server/loraplex, the tests that guard it: fast, no model)
MODULES: dict[str, tuple[str, list[str]]] = {
    "scheduler": ("engine/scheduler.py", ["tests/engine/test_scheduler.py", "tests/engine/test_scheduler_edges.py", "tests/engine/test_fair_share.py"]),
    "block_manager": ("engine/block_manager.py", ["tests/engine/test_block_manager.py", "tests/engine/test_scheduler.py"]),
    "adapter_store": ("lora/adapter_store.py", ["tests/lora/test_adapter_store_tiers.py"]),
    "sampler": ("engine/sampler.py", ["tests/engine/test_sampler.py"]),
    "detokenizer": ("engine/detokenizer.py", ["tests/engine/test_detokenizer.py"]),
}

PYPROJECT = """\
[tool.mutmut]
source_paths = ["src/loraplex/"]
only_mutate = ["src/loraplex/{file}"]
pytest_add_cli_args_test_selection = {tests}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
use_git_change_detection = false

[tool.pytest.ini_options]
testpaths = ["tests"]
timeout = 300
markers = {markers}
filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]
"""

STATUS_WORDS = (
    "killed", "survived", "no tests", "timeout", "suspicious", "skipped", "segfault", "not checked", "caught by type check",
)


def _stage(module: str) -> Path:
    file, tests = MODULES[module]
    stage = ROOT / "build" / "mutmut" / module
    stage.mkdir(parents=True, exist_ok=True)
    for name, target in (("src", ROOT / "server"), ("tests", ROOT / "tests")):
        link = stage / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(target, stage))
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    (stage / "pyproject.toml").write_text(PYPROJECT.format(file=file, tests=json.dumps(tests), markers=json.dumps(markers)))
    return stage


def _results(stage: Path) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=stage, capture_output=True, text=True, check=True).stdout
    statuses: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and status in STATUS_WORDS:
            statuses[name] = status
    return statuses


def run(module: str) -> dict[str, object]:
    stage = _stage(module)
    start = time.monotonic()
    # mutmut forks a child per mutant: torch's OpenMP pool does not survive a fork (a child's
    # first parallel op hangs until the timeout), so the run keeps torch on one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([str(MUTMUT), "run", "--max-children", "2"], cwd=stage, check=True, stdout=subprocess.DEVNULL, env=env)
    statuses = _results(stage)
    counts = {word: sum(1 for s in statuses.values() if s == word) for word in STATUS_WORDS}
    return {
        "file": f"server/loraplex/{MODULES[module][0]}",
        "tests": MODULES[module][1],
        "mutants": len(statuses),
        **{k: v for k, v in counts.items() if v},
        "minutes": round((time.monotonic() - start) / 60, 1),
        "survivors": sorted(n for n, s in statuses.items() if s != "killed"),
    }


def _markdown(report: dict[str, dict[str, object]]) -> str:
    lines = [
        "# Mutation testing (`make mutants`, mutmut 3.8.1)",
        "",
        "| module | tests | mutants | killed | survived | other | score | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.values():
        killed, survived, mutants = int(r.get("killed", 0)), int(r.get("survived", 0)), int(r["mutants"])  # type: ignore[call-overload]
        other = mutants - killed - survived
        tests = ", ".join(f"`{t}`" for t in r["tests"])  # type: ignore[attr-defined]
        score = f"{100 * killed / mutants:.0f}%" if mutants else "-"
        lines.append(f"| `{r['file']}` | {tests} | {mutants} | {killed} | {survived} | {other} | {score} | {r['minutes']} |")
    lines += ["", "Mutants not killed (README, Reliability: which kinds change nothing and which are gaps):", ""]
    for module, r in report.items():
        survivors = r["survivors"]
        lines.append(f"- {module}: " + (", ".join(f"`{n.split('.')[-1]}`" for n in survivors) if survivors else "none"))  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"any of {', '.join(MODULES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown modules {unknown}: choose from {list(MODULES)}")
    path = RESULTS / "mutants.json"
    report: dict[str, dict[str, object]] = json.loads(path.read_text()) if path.exists() else {}
    for module in args.modules or list(MODULES):
        print(f"mutmut: {module} ...", flush=True)
        report[module] = run(module)
        print(json.dumps({k: v for k, v in report[module].items() if k != "survivors"}), flush=True)
        ordered = {m: report[m] for m in MODULES if m in report}
        path.write_text(json.dumps(ordered, indent=1) + "\n")
        (RESULTS / "mutants.md").write_text(_markdown(ordered))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
