"""The mutation check: plant each bug of tests/mutants.toml in a copy of the working tree, one at a time, run the
tests it names, and report which bugs no test caught.

    make mutation                                        # every mutant, after a baseline run of their tests
    .venv/bin/python scripts/mutation_check.py --only shard-by-local-rank,step-boolean-mask
    .venv/bin/python scripts/mutation_check.py --list

Hand-planted bugs rather than a generic mutation tool: most covering tests run ``python train.py`` in subprocesses
(DDP ranks, SLURM jobs), which an in-process tool's test mapping cannot see; files are rewritten on disk, in a copy,
so a run that is interrupted never leaves a bug in the working tree. Writes ``report.md`` and ``report.json`` to
``outputs/mutation/<time>/`` (``--out``); exits non-zero below ``--min-score`` or when a mutant no longer applies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = PROJECT_ROOT / "tests" / "mutants.toml"


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    note: str = ""  # why a bug survives, where no test here can catch it

    def apply(self, text: str) -> str:
        """The file's text with the bug planted; ValueError when ``find`` is not there exactly once."""
        count = text.count(self.find)
        if count != 1:
            raise ValueError(f"mutant {self.id}: its text occurs {count} times in {self.file} (once expected)")
        return text.replace(self.find, self.replace)


@dataclass
class Outcome:
    id: str
    area: str
    verdict: str  # caught, survived, error
    seconds: float
    detail: str  # the first failing test, or what went wrong


def load_mutants(path: Path = CATALOGUE) -> list[Mutant]:
    with open(path, "rb") as file:
        entries = tomllib.load(file)["mutant"]
    mutants = [Mutant(**{**entry, "tests": tuple(entry["tests"])}) for entry in entries]
    ids = [m.id for m in mutants]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"{path}: duplicate mutant ids {duplicated}")
    return mutants


def copy_tree(destination: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored files) in ``destination/repo``, with
    ``destination/shared`` pointing at the ``../shared`` beside the project where there is one."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    repo = destination / "repo"
    for name in filter(None, (entry.decode() for entry in listed)):
        source = PROJECT_ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    if (PROJECT_ROOT.parent / "shared").is_dir():
        (destination / "shared").symlink_to(PROJECT_ROOT.parent / "shared")
    return repo


def run_tests(repo: Path, tests: list[str], timeout: float, stop_at_first_failure: bool = True) -> tuple[int, str]:
    """pytest's exit status and output; a run past ``timeout`` (a hang) counts as a failure, status 1, as it would
    fail CI. The run has a process group of its own: a hung test's training subprocesses go with it."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *tests]
    if stop_at_first_failure:
        command.insert(3, "-x")
    process = subprocess.Popen(
        command, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return 1, f"timed out after {timeout:.0f} s\n{process.communicate()[0]}"
    return process.returncode, output


def first_failure(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return lines[0][:200] if lines else output.strip().splitlines()[-1][:200] if output.strip() else ""


def check(mutant: Mutant, repo: Path, timeout: float) -> Outcome:
    target = repo / mutant.file
    original = target.read_text()
    start = time.monotonic()
    try:
        target.write_text(mutant.apply(original))
        status, output = run_tests(repo, list(mutant.tests), timeout)
    except ValueError as error:
        return Outcome(mutant.id, mutant.area, "error", 0.0, str(error))
    finally:
        target.write_text(original)
    seconds = round(time.monotonic() - start, 1)
    if status == 1:
        return Outcome(mutant.id, mutant.area, "caught", seconds, first_failure(output))
    if status == 0:
        return Outcome(mutant.id, mutant.area, "survived", seconds, mutant.note or "every listed test passed")
    return Outcome(mutant.id, mutant.area, "error", seconds, f"pytest exit {status}: {first_failure(output)}")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.strip()


def report(outcomes: list[Outcome], commit: str, baseline: str, out: Path) -> float:
    caught = sum(o.verdict == "caught" for o in outcomes)
    score = caught / len(outcomes) if outcomes else 0.0
    lines = [
        f"# Mutation check: {caught} of {len(outcomes)} planted bugs caught ({score:.0%})",
        "",
        f"Commit {commit}; baseline: {baseline}; {sum(o.seconds for o in outcomes) / 60:.1f} min.",
        "",
        "| mutant | area | verdict | s | first failing test / detail |",
        "|---|---|---|---|---|",
        *(f"| {o.id} | {o.area} | {o.verdict} | {o.seconds:.0f} | {o.detail.replace('|', '/')} |" for o in outcomes),
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"score": score, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    print("\n".join(lines))
    print(f"\nwritten to {out}")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the unmutated tree")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run")
    parser.add_argument("--min-score", type=float, default=0.9, help="fraction of mutants that must be caught")
    default_out = PROJECT_ROOT / "outputs" / "mutation" / time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=Path, default=default_out, help="where report.md and report.json go")
    args = parser.parse_args()
    mutants = load_mutants()
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.id for m in mutants})
        if unknown:
            parser.error(f"unknown mutant ids: {unknown}")
        mutants = [m for m in mutants if m.id in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.id:40} {m.area:11} {m.file}")
        return
    dirty = " with uncommitted changes" if _git("status", "--porcelain") else ""
    commit = _git("rev-parse", "--short", "HEAD") + dirty  # of the tree copied below
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        repo = copy_tree(Path(scratch))
        baseline = "skipped (--no-baseline)"
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            print(f"baseline: {len(tests)} tests on the unmutated tree", flush=True)
            status, output = run_tests(repo, tests, timeout=args.timeout * 3, stop_at_first_failure=False)
            if status != 0:
                sys.exit(
                    f"the tests fail with no bug planted (pytest exit {status}); fix them first:\n{output[-4000:]}"
                )
            baseline = output.strip().splitlines()[-1]
            skipped = [line for line in output.splitlines() if line.startswith("SKIPPED")]
            if skipped:
                print("warning: mutants relying on these tests cannot be caught here:\n" + "\n".join(skipped))
        outcomes = []
        for number, mutant in enumerate(mutants, 1):
            print(f"[{number}/{len(mutants)}] {mutant.id} ...", end=" ", flush=True)
            outcomes.append(check(mutant, repo, args.timeout))
            print(f"{outcomes[-1].verdict} ({outcomes[-1].seconds:.0f} s)", flush=True)
    score = report(outcomes, commit, baseline, args.out)
    if any(o.verdict == "error" for o in outcomes) or score < args.min_score:
        sys.exit(1)


if __name__ == "__main__":
    main()
