"""The Python half of scripts/gpu_check.sh: the version check before the steps, the summary after them.

`versions`: prints the versions found (Python, torch and CUDA, every dependency pyproject.toml declares,
pytest-xdist for `-n 2`, pytest-lora and where it is imported from) and the device, writes them as JSON,
and exits 2 with one message per problem (the package, the version found, the declared range, the fix)
when one is missing or outside its range, or when `--device cuda` finds no CUDA.

`summary`: reads what the steps left (their exit codes and times, their JUnit XML and the properties the
tests recorded there) and writes OUT/summary.json and OUT/summary.md; exits 1 when a step failed.

Standard library and `packaging` (a dependency of pytest) only at module level; torch is imported inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pyproject.toml declares tomli there
    import tomli as tomllib  # type: ignore[no-redef]

# name, title, and what the step checks (for summary.md)
STEPS = (
    ("examples-serial", "Examples, serial", "pytest -m lora examples/ on the device, one process"),
    ("examples-n2", "Examples, -n 2", "the same under pytest-xdist with two workers"),
    ("qlora", "QLoRA step", "r=8 and r=64 on all linear layers, gradient checkpointing, 4-bit base"),
    ("oom", "Out of memory", "an out-of-memory error inside lora_train, then the next test on the same base"),
)
GPU_FIX = {
    "bitsandbytes": "scripts/fetch_gpu_wheels.sh where PyPI is reachable, then carry .gpu-wheels/ to the GPU "
    "machine; gpu_check.sh installs it from there when bitsandbytes is missing",
}


# --- versions ----------------------------------------------------------------------------------------


def _declared(pyproject: Path) -> tuple[SpecifierSet, list[Requirement]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    environment = default_environment()
    requirements = [Requirement(text) for text in project["dependencies"]]
    requirements += [Requirement(text) for text in project.get("optional-dependencies", {}).get("xdist", [])]
    kept = [req for req in requirements if req.marker is None or req.marker.evaluate(environment)]
    return SpecifierSet(project.get("requires-python", "")), kept


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _in_range(version: str, specifier: SpecifierSet) -> bool:
    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _device(wanted: str) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if wanted == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found.update(
            name=torch.cuda.get_device_name(0),
            memory_bytes=int(properties.total_memory),
            capability=f"{properties.major}.{properties.minor}",
            device_count=torch.cuda.device_count(),
        )
    else:
        found["name"] = _cpu_name()
    return found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def check_versions(pyproject: Path, device: str) -> tuple[dict[str, Any], list[str]]:
    """What is installed against what pyproject.toml declares: (the record, the problems)."""
    python_range, requirements = _declared(pyproject)
    python = platform.python_version()
    packages: dict[str, dict[str, Any]] = {}
    problems = []
    if not _in_range(python, python_range):
        problems.append(
            f"Python {python} is outside the range pyproject.toml declares (requires-python {python_range}).\n"
            f"  fix: run with a Python {python_range} (PYTHON=/path/to/python scripts/gpu_check.sh ...)"
        )
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        version = _installed(name)
        declared = str(requirement.specifier) or "any"
        ok = version is not None and _in_range(version, requirement.specifier)
        packages[name] = {"version": version, "declared": declared, "ok": ok}
        if version is None:
            fix = GPU_FIX.get(name, f"pip install '{name}{requirement.specifier}'")
            problems.append(f"{name} is not installed (pyproject.toml declares {name}{declared}).\n  fix: {fix}")
        elif not ok:
            fix = GPU_FIX.get(name, f"pip install '{name}{requirement.specifier}'")
            problems.append(
                f"{name} {version} is outside the range pyproject.toml declares ({name}{declared}).\n"
                f"  fix: {fix}, or run in an environment that has a version in that range"
            )
    own = _installed("pytest-lora")
    try:
        import pytest_lora

        location = str(Path(pytest_lora.__file__).resolve().parent)
    except ImportError as exc:
        location = f"not importable: {exc}"
    expected = str(pyproject.resolve().parent / "pytest_lora")
    if own is None:
        problems.append(
            "pytest-lora is not installed, so pytest does not load its plugin.\n"
            "  fix: pip install --no-deps -e . (gpu_check.sh does this when it is missing)"
        )
    if location != expected:
        problems.append(
            f"pytest_lora is imported from {location}, not from this checkout ({expected}).\n"
            "  fix: run scripts/gpu_check.sh from the checkout (it puts the checkout first on PYTHONPATH)"
        )
    record: dict[str, Any] = {
        "python": {"version": python, "declared": str(python_range), "ok": _in_range(python, python_range)},
        "packages": packages,
        "pytest-lora": {"version": own, "imported_from": location},
        "platform": platform.platform(),
    }
    try:
        record["device"] = _device(device)
    except ImportError as exc:
        record["device"] = {"name": None, "error": str(exc)}
    if device == "cuda" and not record["device"].get("cuda_available"):
        problems.append(
            f"no CUDA device: torch {packages.get('torch', {}).get('version')} (CUDA "
            f"{record['device'].get('torch_cuda')}) sees none.\n"
            "  fix: run on the GPU machine with a CUDA build of torch, or pass --cpu for the CPU variant"
        )
    return record, problems


def print_versions(record: dict[str, Any]) -> None:
    print("versions found (pyproject.toml's declared range in brackets):")
    python = record["python"]
    print(f"  {'python':<18} {python['version']:<14} [{python['declared']}]{'' if python['ok'] else '  OUTSIDE'}")
    for name, entry in record["packages"].items():
        mark = "" if entry["ok"] else ("  MISSING" if entry["version"] is None else "  OUTSIDE")
        print(f"  {name:<18} {entry['version'] or '-':<14} [{entry['declared']}]{mark}")
    own = record["pytest-lora"]
    print(f"  {'pytest-lora':<18} {own['version'] or '-':<14} (imported from {own['imported_from']})")
    device = record.get("device", {})
    extra = f", {device['memory_bytes'] / 2**30:.1f} GiB" if device.get("memory_bytes") else ""
    print(f"  device: {device.get('name')}{extra}; torch CUDA {device.get('torch_cuda')}")


def versions_command(args: argparse.Namespace) -> int:
    record, problems = check_versions(Path(args.pyproject), args.device)
    print_versions(record)
    record["problems"] = problems
    Path(args.out).write_text(json.dumps(record, indent=2))
    for problem in problems:
        print(f"\ngpu_check: {problem}", file=sys.stderr)
    if problems:
        print("\ngpu_check: stopped before the steps: fix the versions above first", file=sys.stderr)
    return 2 if problems else 0


# --- summary -----------------------------------------------------------------------------------------


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts and per-test outcomes and recorded properties (JSON values) of one JUnit XML file."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(suite.get("skipped", 0)) for suite in suites)
    tests = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (found.get("message") or "").strip()
                break
        properties = {}
        for prop in case.iter("property"):
            try:
                properties.setdefault(prop.get("name"), []).append(json.loads(prop.get("value", "")))
            except ValueError:
                properties.setdefault(prop.get("name"), []).append(prop.get("value"))
        entry: dict[str, Any] = {"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome}
        if outcome != "passed":
            entry["reason"] = reason[:500]
        if properties:
            entry["properties"] = properties
        tests.append(entry)
    counts["passed"] = sum(test["outcome"] == "passed" for test in tests)
    return {**counts, "test_cases": tests}


def _figures(step: str, junit: dict[str, Any] | None) -> dict[str, Any]:
    if junit is None:
        return {}
    found = [prop for test in junit["test_cases"] for prop in test.get("properties", {}).get(step, [])]
    if step == "qlora":
        by_rank = {f"r={entry['r']}": entry for entry in found if isinstance(entry, dict) and "r" in entry}
        figures: dict[str, Any] = {"by_rank": by_rank}
        low, high = by_rank.get("r=8"), by_rank.get("r=64")
        if low and high:
            figures["r64_over_r8_trainable"] = high["trainable_params"] / low["trainable_params"]
        return figures
    if step == "oom":
        failure = next((entry for entry in found if "mode" in entry), None)
        following = next((entry for entry in found if "same_base" in entry), None)
        return {"out_of_memory": failure, "next_test": following}
    return {}


def _problems(step: str, junit: dict[str, Any] | None, figures: dict[str, Any], mode: str) -> list[str]:
    """What keeps a step that exited 0 from counting as passed: no tests ran, skips, missing figures."""
    if junit is None:
        return ["no JUnit XML: pytest did not get to write its report"]
    problems = []
    if junit["tests"] == 0 or junit["passed"] == 0:
        problems.append("no test passed")
    if junit["failures"] or junit["errors"]:
        problems.append(f"{junit['failures']} failed, {junit['errors']} errors")
    if step in ("qlora", "oom") and junit["skipped"]:
        reasons = {test.get("reason", "") for test in junit["test_cases"] if test["outcome"] == "skipped"}
        problems.append(f"{junit['skipped']} skipped, which this step must not: {'; '.join(sorted(reasons))}")
    if step == "qlora":
        ranks = figures.get("by_rank", {})
        if set(ranks) != {"r=8", "r=64"}:
            problems.append(f"figures recorded for {sorted(ranks) or 'no rank'}, not r=8 and r=64")
        elif not figures["r64_over_r8_trainable"] > 1:
            problems.append("r=64 has no more trainable parameters than r=8")
        for name, entry in ranks.items():
            if not entry.get("tokens_per_second", 0) > 0 or not entry.get("measured_bytes", 0) > 0:
                problems.append(f"{name}: tokens/s or the measured memory is not positive")
            if mode == "cuda" and entry.get("mfu") is None:
                problems.append(f"{name}: no MFU ({entry.get('peak')})")
    if step == "oom" and not (figures.get("out_of_memory") and figures.get("next_test")):
        problems.append("the out-of-memory test or the next test recorded nothing")
    return problems


def summary_command(args: argparse.Namespace) -> int:
    out, work = Path(args.out), Path(args.work)
    versions_path = work / "versions.json"
    versions = json.loads(versions_path.read_text()) if versions_path.is_file() else None
    ran: dict[str, dict[str, Any]] = {}
    table = work / "steps.tsv"
    for line in table.read_text().splitlines() if table.is_file() else []:
        name, code, seconds = line.split("\t")
        if code == "budget":  # not started: GPU_CHECK_BUDGET_S was spent by then
            ran[name] = {"not_run": f"not run: the budget of {args.budget} s (GPU_CHECK_BUDGET_S) was spent"}
            continue
        ran[name] = {"exit_code": int(code), "seconds": round(float(seconds), 1)}
    steps = []
    for name, title, checks in STEPS:
        entry: dict[str, Any] = {"name": name, "title": title, "checks": checks, "log": f"{name}.log"}
        command = work / f"{name}.cmd"
        if command.is_file():
            entry["command"] = command.read_text().strip()
        if name not in ran or "not_run" in ran[name]:
            reason = ran.get(name, {}).get("not_run") or args.not_run_reason or "an earlier stage stopped the script"
            entry.update(outcome="not run", problems=[reason])
            steps.append(entry)
            continue
        entry.update(ran[name])
        junit = read_junit(work / f"{name}.xml")
        figures = _figures(name, junit)
        problems = _problems(name, junit, figures, args.mode)
        code = ran[name]["exit_code"]
        if code in (124, 137):
            problems.insert(0, f"timed out after {ran[name]['seconds']} s (the step's time limit)")
        elif code != 0:
            problems.insert(0, f"pytest exited {code}")
        entry.update(
            outcome="passed" if not problems else "failed",
            problems=problems,
            tests={k: v for k, v in (junit or {}).items() if k != "test_cases"},
            figures=figures,
            test_cases=(junit or {}).get("test_cases", []),
        )
        steps.append(entry)
    setup_ok = versions is not None and not versions.get("problems")
    summary = {
        "mode": args.mode,
        "device": (versions or {}).get("device", {}).get("name"),
        "passed": setup_ok and all(step["outcome"] == "passed" for step in steps),
        "wall_seconds": round(float(args.wall), 1),
        "budget_seconds": args.budget,
        "setup": {
            "outcome": "passed" if setup_ok else "failed",
            "problems": (versions or {}).get("problems", ["the version check did not run"]),
            "installed": [line for line in args.installed.split(";") if line],
            "log": "setup.log",
        },
        "versions": versions,
        "steps": steps,
        "oom_note": (
            "simulated on the CPU: a forward pre-hook raises torch.OutOfMemoryError once"
            if args.mode == "cpu"
            else "a real CUDA out-of-memory error from the caching allocator"
        ),
        "files": sorted({path.name for path in out.iterdir() if path.is_file()} | {"summary.json", "summary.md"}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0 if summary["passed"] else 1


def _bytes(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def markdown(summary: dict[str, Any]) -> str:
    versions = summary.get("versions") or {}
    packages = versions.get("packages", {})
    found = ", ".join(f"{name} {entry['version']}" for name, entry in packages.items())
    verdict = "PASSED" if summary["passed"] else "FAILED"
    lines = [
        f"# GPU check ({summary['mode']}): {verdict}",
        "",
        f"- device: {summary['device']}",
        f"- wall time: {summary['wall_seconds']} s (budget {summary['budget_seconds']} s)",
        f"- Python {versions.get('python', {}).get('version')}; {found}",
        f"- pytest-lora {versions.get('pytest-lora', {}).get('version')} from "
        f"{versions.get('pytest-lora', {}).get('imported_from')}",
    ]
    if summary["setup"]["installed"]:
        lines.append(f"- installed by the script: {'; '.join(summary['setup']['installed'])}")
    for problem in summary["setup"]["problems"]:
        lines.append(f"- setup problem: {problem}")
    lines += ["", "| step | outcome | tests | seconds |", "| --- | --- | --- | --- |"]
    for step in summary["steps"]:
        tests = step.get("tests") or {}
        counted = (
            f"{tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors, "
            f"{tests.get('skipped', 0)} skipped"
            if tests
            else "-"
        )
        lines.append(f"| {step['title']} | {step['outcome']} | {counted} | {step.get('seconds', '-')} |")
    for step in summary["steps"]:
        for problem in step.get("problems", []):
            lines.append(f"\n{step['title']}: {problem}")
    qlora = next(step for step in summary["steps"] if step["name"] == "qlora").get("figures", {})
    if qlora.get("by_rank"):
        lines += [
            "",
            "## QLoRA step",
            "",
            "| r | shape | trainable | tokens/s | GFLOP/token | MFU | measured | estimated | error |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for entry in qlora["by_rank"].values():
            utilisation = f"{entry['mfu']:.1%}" if entry.get("mfu") is not None else "n/a"
            lines.append(
                f"| {entry['r']} | {entry['shape']}, seq {entry['seq_len']} | {entry['trainable_params']:,} | "
                f"{entry['tokens_per_second']:,.0f} | {entry['flops_per_token'] / 1e9:,.3g} | {utilisation} | "
                f"{_bytes(entry['measured_bytes'])} | {_bytes(entry['estimated_bytes'])} | "
                f"{entry['estimate_error']:+.1%} |"
            )
        first = next(iter(qlora["by_rank"].values()))
        lines += [
            "",
            f"All linear layers, gradient checkpointing, batch 1; measured: {first['measured_source']}; "
            f"MFU peak: {first['peak']}; model {first['model_dir']} "
            f"({'written' if first['model_written'] else 'reused'}), loaded in {first['load_seconds']:.1f} s.",
        ]
    oom = next(step for step in summary["steps"] if step["name"] == "oom").get("figures", {})
    if oom.get("out_of_memory"):
        failure, following = oom["out_of_memory"], oom.get("next_test") or {}
        lines += [
            "",
            "## Out of memory",
            "",
            f"- {summary['oom_note']}",
            f"- {failure['how']}",
            f"- lora_train (batch {failure['batch_size']} x seq {failure['seq_len']}) failed: {failure['message']}",
            f"- next test on the same base: losses {following.get('losses')}, base unchanged "
            f"{following.get('base_unchanged')}",
        ]
    lines += ["", f"Files: {', '.join(summary['files'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    versions = commands.add_parser("versions", help="print and check the versions against pyproject.toml")
    versions.add_argument("--pyproject", required=True)
    versions.add_argument("--device", choices=("cuda", "cpu"), required=True)
    versions.add_argument("--out", required=True, help="where to write the versions as JSON")
    summary = commands.add_parser("summary", help="write OUT/summary.json and OUT/summary.md")
    summary.add_argument("--out", required=True)
    summary.add_argument("--work", required=True)
    summary.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    summary.add_argument("--wall", required=True)
    summary.add_argument("--budget", type=int, required=True)
    summary.add_argument("--installed", default="")
    summary.add_argument("--not-run-reason", default="")
    args = parser.parse_args(argv)
    return versions_command(args) if args.command == "versions" else summary_command(args)


if __name__ == "__main__":
    sys.exit(main())
