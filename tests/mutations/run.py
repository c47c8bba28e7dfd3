"""Mutation guard: every curated bug in ``mutations.toml`` must make its listed tests fail.

Each mutation is an anchored exact-string replacement in one source file (``old`` must occur exactly once), applied
to a fresh copy of the repository (without .git, virtualenvs and build outputs). The listed tests then run in that
copy with ``PYTHONPATH`` pointing at the copy's packages, so child processes (torchrun, Prefect flows) import the
mutated code too. A mutation is *caught* when pytest reports failing tests (exit code 1); it *SURVIVED* when the
tests pass; anything else (collection error, timeout, missing anchor) is an ERROR. Any survivor or error fails
the run.

    python tests/mutations/run.py                 # all, 2 workers
    python tests/mutations/run.py --only loss-snr-not-squared --workers 1
    python tests/mutations/run.py --check         # anchors only (fast; after a merge or a refactor)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
LIST = Path(__file__).with_name("mutations.toml")
# Not copied: VCS, environments, caches and run outputs (none of them is source a test imports).
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "artifacts", "storage", "mlruns", "__pycache__",
                                ".pytest_cache", ".ruff_cache", "*.egg-info", "cache", "tmp", "node_modules")
PACKAGE_SRC = tuple(sorted(str(p.relative_to(REPO)) for p in REPO.glob("packages/*/src")))


class MutationError(Exception):
    """A mutation list entry that cannot be applied (what to fix is in the message)."""


@dataclass(frozen=True)
class Mutation:
    id: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | SURVIVED | ERROR
    seconds: float
    detail: str = ""


def load(path: Path = LIST) -> list[Mutation]:
    entries = tomllib.loads(path.read_text(encoding="utf-8")).get("mutation", [])
    mutations = []
    for i, entry in enumerate(entries):
        missing = {"id", "what", "file", "old", "new", "tests"} - set(entry)
        if missing:
            raise MutationError(f"{path.name} entry {i} ({entry.get('id', '?')}) lacks {sorted(missing)}")
        mutations.append(Mutation(entry["id"], entry["what"], entry["file"], entry["old"], entry["new"],
                                  tuple(entry["tests"])))
    ids = [m.id for m in mutations]
    if len(set(ids)) != len(ids):
        raise MutationError(f"duplicate mutation ids in {path.name}: {sorted({i for i in ids if ids.count(i) > 1})}")
    return mutations


def anchor_problem(m: Mutation, root: Path = REPO) -> str | None:
    """Why ``m`` cannot be applied to the tree at ``root`` (None when it can)."""
    source = root / m.file
    if not source.is_file():
        return f"{m.id}: file {m.file} does not exist"
    count = source.read_text(encoding="utf-8").count(m.old)
    if count != 1:
        state = "anchor not found" if count == 0 else f"anchor not unique ({count} occurrences)"
        return f"{m.id}: {state} in {m.file}; re-anchor its `old` snippet on the current source"
    if m.old == m.new:
        return f"{m.id}: `new` equals `old` (no mutation)"
    for test in m.tests:
        if not (root / test.split("::")[0]).exists():
            return f"{m.id}: test path {test} does not exist"
    return None


def copy_tree(destination: Path) -> Path:
    """A copy of the repository at ``destination/repo`` (it stands alone: the fixtures are inside it)."""
    repo = destination / "repo"
    shutil.copytree(REPO, repo, ignore=IGNORE, symlinks=True)
    return repo


def run_one(m: Mutation, timeout_s: float) -> Outcome:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.id}-") as tmp:
        repo = copy_tree(Path(tmp))
        problem = anchor_problem(m, repo)
        if problem:
            return Outcome(m, "ERROR", time.monotonic() - started, problem)
        source = repo / m.file
        source.write_text(source.read_text(encoding="utf-8").replace(m.old, m.new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*(str(repo / p) for p in PACKAGE_SRC), str(repo)]),
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *m.tests]
        try:
            proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Outcome(m, "ERROR", time.monotonic() - started, f"timed out after {timeout_s:.0f}s")
    seconds = time.monotonic() - started
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode == 1:
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        return Outcome(m, "caught", seconds, ", ".join(failed) or tail)
    if proc.returncode == 0:
        return Outcome(m, "SURVIVED", seconds, tail)
    return Outcome(m, "ERROR", seconds, f"pytest exit code {proc.returncode}:\n{tail}")


def table(outcomes: list[Outcome]) -> str:
    rows = [("mutation", "catching test files", "seconds", "result")]
    rows += [(o.mutation.id, " ".join(o.mutation.tests), f"{o.seconds:.0f}", o.status) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutation ids to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    parser.add_argument("--check", action="store_true", help="only check that every anchor applies")
    parser.add_argument("--json", type=Path, default=None, help="also write the outcomes here")
    parser.add_argument("--list", type=Path, default=LIST, help="the mutation list (TOML)")
    args = parser.parse_args(argv)

    try:
        mutations = load(args.list)
    except MutationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutations})
        if unknown:
            print(f"error: unknown mutation ids {unknown}", file=sys.stderr)
            return 2
        mutations = [m for m in mutations if m.id in args.only]
    problems = [p for p in map(anchor_problem, mutations) if p]
    if problems:
        print("error: mutations that cannot be applied:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"{len(mutations)} mutations apply cleanly")
        return 0

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = [pool.submit(run_one, m, args.timeout) for m in mutations]
        outcomes = []
        for future in futures:
            outcome = future.result()
            outcomes.append(outcome)
            print(f"[{len(outcomes)}/{len(mutations)}] {outcome.mutation.id}: {outcome.status} "
                  f"({outcome.seconds:.0f}s) {outcome.detail.splitlines()[0] if outcome.detail else ''}", flush=True)
    print()
    print(table(outcomes))
    bad = [o for o in outcomes if o.status != "caught"]
    print(f"\n{len(outcomes) - len(bad)}/{len(outcomes)} caught in {time.monotonic() - started:.0f}s")
    for o in bad:
        print(f"\n{o.mutation.id} ({o.mutation.what}) {o.status}:\n{o.detail}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"id": o.mutation.id, "tests": o.mutation.tests, "seconds": round(o.seconds, 1), "result": o.status}
                for o in outcomes]
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
