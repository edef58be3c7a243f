"""A local-path run, before and after a change: the same files byte for byte, and no slower.

    python benchmarks/local_parity.py [--repo DIR] [--baseline 5541678] [--candidate HEAD]
                                      [--baseline-dir DIR] [--candidate-dir DIR]
                                      [--data ../shared/datasets/cifar10-catdog] [--images 300] [--rounds 3]

The baseline and the candidate (commits of --repo checked out into temporary git worktrees, or
two folders given with --baseline-dir / --candidate-dir) each run `headstart train` with their
own code (PYTHONPATH) and this interpreter, on the same copy of a subset of the data (--images
per class, the first ones by name), with the same options and seed, `--no-prefect`, each run in
fresh artifacts root, cache and XDG_CACHE_HOME of its own. Taking turns, round after round (who goes first alternates):
1. a first run: empty cache and artifacts root (backbone converted, features extracted, head trained);
2. a repeat run of the same command: every input cached, the earlier run reused;
3. a retrain with `--no-reuse`: the features read from the cache, the head trained again.

Then every baseline round's artifacts root (both runs) is compared, file by file, with the
candidate's of the same round: the same set of files (run directories named by their order), and
each file byte-identical, or else identical once exactly the fields expected to differ between
two runs are set aside: the version's name, created_at, flow_run_id, the artifacts root's and the
cache's paths, Keras's date_saved inside model.keras, the SavedModel fingerprint's uuid. The
training key and the weights must match. Two baseline rounds are compared with each other the
same way, as a control. Writes benchmarks/results/local-parity.md (and .json).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
DEFAULT_DATA = PROJECT.parent / "shared" / "datasets" / "cifar10-catdog"
OPTIONS = ["--image-size", "96", "--epochs", "3", "--seed", "0", "--no-prefect"]
# Packages only a store URL needs; a local-path run should not import them.
STORE_PACKAGES = {"s3fs", "aiobotocore", "botocore", "boto3", "gcsfs", "adlfs"}
# Each run's extra options; in this order, in the same folders, so each later one finds the cache filled.
RUNS = {"first run": [], "repeat run": [], "retrain, features cached": ["--no-reuse"]}
# JSON keys whose values differ between two runs of the same inputs by design: when a run was
# made, by which flow run, when Keras saved the model, when the champion was switched.
VOLATILE_KEYS = {"created_at", "flow_run_id", "date_saved", "at"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _checkouts(args, scratch: Path):
    """name → (code folder, commit): given folders as they are, else temporary git worktrees."""
    made: list[Path] = []
    found = {}
    try:
        for name, folder, commit in (
            ("baseline", args.baseline_dir, args.baseline),
            ("candidate", args.candidate_dir, args.candidate),
        ):
            if folder is not None:
                folder = folder.resolve()
                state = _git(folder, "rev-parse", "--short", "HEAD")
                if _git(folder, "status", "--porcelain", "--untracked-files=no"):
                    state += " + uncommitted changes"
                found[name] = (folder, state)
                continue
            where = scratch / f"code-{name}"
            _git(args.repo, "worktree", "add", "--detach", str(where), commit)
            made.append(where)
            found[name] = (where, _git(where, "rev-parse", "--short", "HEAD"))
        yield found
    finally:
        for where in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=args.repo, capture_output=True)


def _subset(source: Path, per_class: int, target: Path) -> Path:
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copyfile(image, target / folder.name / image.name)
    return target


def _train(code: Path, data: Path, work: Path, extra: list[str], flags: tuple[str, ...] = ()) -> tuple[float, str]:
    """One `headstart train` from `code` in `work`; its wall time and its stderr."""
    environment = {**os.environ, "PYTHONPATH": str(code), "XDG_CACHE_HOME": str(work / "xdg-cache")}
    environment.pop("PREFECT_API_URL", None)
    command = [sys.executable, *flags, "-m", "flows.cli", "train", "--data", str(data), *OPTIONS, *extra]
    command += ["--artifacts-root", str(work / "artifacts"), "--cache-dir", str(work / "cache")]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{code}: train failed ({done.returncode}): {done.stderr[-3000:]}")
    return seconds, done.stderr


def _store_modules(code: Path, data: Path, work: Path) -> list[str]:
    """The object-store modules a local-path retrain imports (python -X importtime): none is
    expected where every store code path is entered only for a store URL."""
    _, stderr = _train(code, data, work, ["--no-reuse"], ("-X", "importtime"))
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            module = line.rsplit("|", 1)[1].strip()
            if module.split(".")[0] in STORE_PACKAGES or module == "headstart.infra.object_store":
                found.add(module.split(".")[0] if module.split(".")[0] in STORE_PACKAGES else module)
    return sorted(found)


# --- comparison ---------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _versions(artifacts: Path) -> dict[str, str]:
    """Each run directory's name → its place in the order of the runs (run-1, run-2, …)."""
    names = sorted(p.name for p in artifacts.iterdir() if p.is_dir() and (p / "lineage.json").is_file())
    return {name: f"<run-{i}>" for i, name in enumerate(names, 1)}


def _renamed(relative: str, versions: dict[str, str]) -> str:
    head, _, rest = relative.partition("/")
    return f"{versions.get(head, head)}/{rest}" if rest else versions.get(head, head)


def _leaf_differences(a, b, path: str = "") -> list[str]:
    """The paths (a.b[2].c) of the JSON leaves whose values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else key
            if key not in a or key not in b:
                found.append(where + " (only in one)")
            else:
                found += _leaf_differences(a[key], b[key], where)
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _leaf_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "(whole)"]


class Side:
    """One run's artifacts root and cache, and how to write its own paths and names neutrally."""

    def __init__(self, work: Path):
        self.work = work
        self.artifacts = work / "artifacts"
        self.versions = _versions(self.artifacts)

    def neutral(self, text: str) -> str:
        text = text.replace(str(self.artifacts), "<ARTIFACTS_ROOT>").replace(str(self.work / "cache"), "<CACHE>")
        for name, placeholder in self.versions.items():
            text = text.replace(name, placeholder)
        return text

    def files(self) -> dict[str, Path]:
        """Every file, named neutrally: artifacts/<run-1>/…, cache/…, xdg-cache/…"""
        found = {f"artifacts/{_renamed(k, self.versions)}": v for k, v in _files(self.artifacts).items()}
        # Only headstart's part of XDG_CACHE_HOME (matplotlib's font list there is in no fixed order).
        for folder in ("cache", "xdg-cache/headstart"):
            if (self.work / folder).is_dir():
                found.update({f"{folder}/{self.neutral(k)}": v for k, v in _files(self.work / folder).items()})
        return found


def _compare_json(a: bytes, b: bytes, left: Side, right: Side) -> tuple[bool, list[str]]:
    """Whether two JSON files agree once the expected fields are set aside; the fields that differed."""
    raw = _leaf_differences(json.loads(a), json.loads(b))
    neutral_a, neutral_b = json.loads(left.neutral(a.decode())), json.loads(right.neutral(b.decode()))
    remaining = [
        field
        for field in _leaf_differences(neutral_a, neutral_b)
        if field.rsplit(".", 1)[-1].split("[")[0] not in VOLATILE_KEYS
    ]
    if remaining:
        return False, remaining
    # The same values, and the same text: a change of layout (indent, key order, number format) shows.
    texts = [side.neutral(x.decode()) for side, x in ((left, a), (right, b))]
    for i, parsed in enumerate((neutral_a, neutral_b)):
        for value in _volatile_values(parsed):
            texts[i] = texts[i].replace(json.dumps(value), '"<VOLATILE>"')
    if texts[0] != texts[1]:
        return False, ["the text's layout (same values)"]
    return True, raw


def _volatile_values(value) -> list:
    """The values under VOLATILE_KEYS, anywhere in a parsed JSON document."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k in VOLATILE_KEYS and isinstance(v, (str, int, float))]
        return found + [x for v in value.values() for x in _volatile_values(v)]
    if isinstance(value, list):
        return [x for v in value for x in _volatile_values(v)]
    return []


def _compare_keras(a: bytes, b: bytes, left: Side, right: Side) -> tuple[bool, list[str]]:
    """model.keras is a zip whose entries carry their write time: compare the entries."""
    za, zb = zipfile.ZipFile(io.BytesIO(a)), zipfile.ZipFile(io.BytesIO(b))
    if za.namelist() != zb.namelist():
        return False, [f"entries {za.namelist()} vs {zb.namelist()}"]
    same, fields = True, ["zip entry times"]
    for entry in za.namelist():
        x, y = za.read(entry), zb.read(entry)
        if x == y:
            continue
        if entry.endswith(".json"):
            ok, found = _compare_json(x, y, left, right)
            same &= ok
            fields += [f"{entry}:{f}" for f in found]
        else:
            same = False
            fields.append(f"{entry} (bytes)")
    return same, fields


def _compare_fingerprint(a: bytes, b: bytes) -> tuple[bool, list[str]]:
    """A SavedModel's fingerprint.pb: its hashes must match; its uuid is new at every save."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from tensorflow.core.protobuf import fingerprint_pb2

    fa, fb = fingerprint_pb2.FingerprintDef(), fingerprint_pb2.FingerprintDef()
    fa.ParseFromString(a)
    fb.ParseFromString(b)
    fields = [f.name for f in fa.DESCRIPTOR.fields if getattr(fa, f.name) != getattr(fb, f.name)]
    return set(fields) <= {"uuid"}, fields


def compare(left: Side, right: Side) -> dict:
    """Every file of two runs' artifacts roots, caches and XDG_CACHE_HOME: identical, identical once
    normalised (with the fields that differed), or different."""
    files_a, files_b = left.files(), right.files()
    report = {
        "only_baseline": sorted(set(files_a) - set(files_b)),
        "only_candidate": sorted(set(files_b) - set(files_a)),
        "identical": [],
        "normalised": {},
        "different": {},
    }
    for name in sorted(set(files_a) & set(files_b)):
        a, b = files_a[name].read_bytes(), files_b[name].read_bytes()
        if a == b:
            report["identical"].append(name)
            continue
        if name.endswith(".json"):
            same, fields = _compare_json(a, b, left, right)
        elif name.endswith(".keras"):
            same, fields = _compare_keras(a, b, left, right)
        elif name.endswith("fingerprint.pb"):
            same, fields = _compare_fingerprint(a, b)
        elif name.endswith((".md", ".txt", ".csv")):
            same = left.neutral(a.decode()) == right.neutral(b.decode())
            fields = ["paths / version names in the text"]
        else:
            digests = [hashlib.sha256(x).hexdigest()[:12] for x in (a, b)]
            same, fields = False, [f"bytes (sha256 {digests[0]} vs {digests[1]})"]
        report["normalised" if same else "different"][name] = fields
    keys = [
        sorted(json.loads((side.artifacts / v / "lineage.json").read_text())["training_key"] for v in side.versions)
        for side in (left, right)
    ]
    report["training_keys"] = keys
    report["runs"] = len(left.versions)
    report["ok"] = (
        not report["only_baseline"] and not report["only_candidate"] and not report["different"] and keys[0] == keys[1]
    )
    return report


# --- report -------------------------------------------------------------------------------------


def _by_design(field: str) -> bool:
    """A field that differs between any two runs (a time, an id), not through a name or a path."""
    return field in ("zip entry times", "uuid") or field.rsplit(".", 1)[-1].split(":")[-1] in VOLATILE_KEYS


def _describe(title: str, report: dict) -> list[str]:
    total = len(report["identical"]) + len(report["normalised"]) + len(report["different"])
    lines = [
        f"**{title}: {'PASS' if report['ok'] else 'FAIL'}** — {total} files in common, "
        f"{len(report['identical'])} byte-identical, {len(report['normalised'])} identical once normalised, "
        f"{len(report['different'])} different; only in baseline: {len(report['only_baseline'])}, "
        f"only in candidate: {len(report['only_candidate'])}; training keys {report['training_keys'][0]} "
        f"vs {report['training_keys'][1]}.",
        "",
    ]
    for name, fields in report["normalised"].items():
        by_design = [f for f in fields if _by_design(f)]
        named = [f for f in fields if not _by_design(f)]
        parts = [", ".join(f"`{f}`" for f in by_design)] if by_design else []
        if named:
            parts.append("the version names / paths within " + ", ".join(f"`{f}`" for f in named))
        lines.append(f"- `{name}`: differs only in {'; and '.join(parts)}")
    for name, fields in report["different"].items():
        lines.append(f"- **`{name}` differs**: {', '.join(f'`{f}`' for f in fields[:12])}")
    for name in report["only_baseline"]:
        lines.append(f"- **`{name}` only in the baseline**")
    for name in report["only_candidate"]:
        lines.append(f"- **`{name}` only in the candidate**")
    return lines + [""]


def _write(commits, times, reports, control, imports, args, elapsed) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "local-parity.json").write_text(
        json.dumps(
            {"commits": commits, "seconds": times, "comparisons": reports, "control": control, "imports": imports},
            indent=1,
        )
    )
    ok = all(r["ok"] for r in reports)
    lines = [
        "# A local-path run before and after: the same files, and no slower",
        "",
        f"Written by `benchmarks/local_parity.py`: baseline = {commits['baseline']}, candidate = "
        f"{commits['candidate']}; {args.rounds} rounds, taking turns (baseline first in odd rounds, candidate "
        "first in even ones); "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{elapsed / 60:.0f} min in all.",
        "",
        f"Command, from each checkout with its own code: `headstart train --data DATA {' '.join(OPTIONS)} "
        "--artifacts-root A --cache-dir C`, DATA the first "
        f"{args.images} images per class (by name) of `{args.data.name}` copied once to a temporary folder, "
        "A, C and XDG_CACHE_HOME new and empty for each round and checkout. The first run starts from an empty "
        "cache; the repeat run is the same command again (every input cached, the earlier run reused); the "
        "retrain adds `--no-reuse` (features read from the cache, the head trained again: a second run directory).",
        "",
        "## Files",
        "",
        f"**Result: {'every round PASS' if ok else 'FAIL'}.** Each round's artifacts root (every run directory, and "
        "the registry if the gate promoted), its cache and its XDG_CACHE_HOME (where a store's local copies "
        "would go) are compared, file by file, with the "
        "other checkout's of the same round; run directories are matched by their order. A file that is not "
        "byte-identical passes only if it is identical once exactly these are set aside: the version's name, "
        "`created_at`, `flow_run_id`, the champion history's `at`, the artifacts root's and the cache's paths "
        "(JSON, Markdown), Keras's "
        "`date_saved` and the zip entries' times inside `model.keras`, the `uuid` of a SavedModel's "
        "`fingerprint.pb`. The training key must be the same; weights (`model.weights.h5` inside `model.keras`, "
        "`saved_model/variables`) must be byte-identical.",
        "",
        f"Run directories per artifacts root after the runs: {sorted({r['runs'] for r in reports})}.",
        "",
    ]
    for i, report in enumerate(reports):
        lines += _describe(f"Round {i + 1}, baseline vs candidate", report)
    if control is not None:
        lines += _describe("Control, baseline round 1 vs baseline round 2", control)
    lines += [
        "## Store code on a local path",
        "",
        "Object-store modules (" + ", ".join(sorted(STORE_PACKAGES)) + ", headstart.infra.object_store) imported by "
        "one more local-path retrain (`--no-reuse`, untimed, `python -X importtime`): "
        + "; ".join(f"{name}: {', '.join(found) or 'none'}" for name, found in imports.items())
        + ".",
        "",
        "## Wall time",
        "",
        "| run | baseline: median (rounds) | candidate: median (rounds) | candidate / baseline |",
        "|---|---|---|---|",
    ]
    for run in RUNS:
        before, after = times["baseline"][run], times["candidate"][run]
        cells = [f"{statistics.median(s):.1f} s ({', '.join(f'{t:.1f}' for t in s)})" for s in (before, after)]
        ratio = statistics.median(after) / statistics.median(before)
        lines.append(f"| {run} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    lines += [
        "",
        "Seconds depend on the machine and on what else runs on it (here a shared 2-core machine); only the "
        "ratio, measured side by side in turns, says something. Each run includes the temporary Prefect "
        "server that `--no-prefect` starts and stops.",
        "",
    ]
    (RESULTS / "local-parity.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=PROJECT, help="the git repository the commits are taken from")
    parser.add_argument("--baseline", default="5541678", help="the baseline commit (default 5541678)")
    parser.add_argument("--candidate", default="HEAD", help="the candidate commit (default HEAD of --repo)")
    parser.add_argument("--baseline-dir", type=Path, help="a baseline checkout to use as it is, instead")
    parser.add_argument("--candidate-dir", type=Path, help="a candidate checkout to use as it is, instead")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of class sub-folders")
    parser.add_argument("--images", type=int, default=300, help="images per class taken from --data")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.repo = args.repo.resolve()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="headstart-parity-") as scratch:
        scratch = Path(scratch)
        data = _subset(args.data, args.images, scratch / "data")
        with _checkouts(args, scratch) as checkouts:
            commits = {name: state for name, (_, state) in checkouts.items()}
            times = {name: {run: [] for run in RUNS} for name in checkouts}
            for round_ in range(args.rounds):
                # Who goes first alternates, so neither always runs on a machine the other just warmed.
                for name, (code, _) in list(checkouts.items())[:: 1 if round_ % 2 == 0 else -1]:
                    work = scratch / f"{name}-{round_}"
                    work.mkdir()
                    for run, extra in RUNS.items():
                        seconds, _ = _train(code, data, work, extra)
                        times[name][run].append(seconds)
                        print(f"round {round_ + 1} {name} {run}: {seconds:.1f} s", flush=True)
            reports = [
                compare(Side(scratch / f"baseline-{i}"), Side(scratch / f"candidate-{i}")) for i in range(args.rounds)
            ]
            control = compare(Side(scratch / "baseline-0"), Side(scratch / "baseline-1")) if args.rounds > 1 else None
            # After the comparisons: this run adds a run directory.
            imports = {name: _store_modules(code, data, scratch / f"{name}-0") for name, (code, _) in checkouts.items()}
        _write(commits, times, reports, control, imports, args, time.perf_counter() - started)
    if not all(r["ok"] for r in reports):
        sys.exit(1)


if __name__ == "__main__":
    main()
