"""The built-in model cache heals itself and fails clearly: modes, corruption, dead writers, no access.

Real files throughout: checkpoints written by `builtin_model_dir`, then truncated, chmod-ed or
put where no directory can be made. Tests run as root in CI images, and root ignores file modes:
what another user sees is checked in a subprocess running as `nobody` (as root) or after removing
the access from the owner itself (as a normal user).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytest_lora import ModelLoadError
from pytest_lora.core.settings import Settings
from pytest_lora.model.loading import load_base_model
from pytest_lora.model.zoo import STALE_AFTER_S, builtin_model_dir, checkpoint_dir, checkpoint_problem

NAME = "tiny-gpt2"  # the cheapest entry to build and load; the cache code is the same for every entry
ROOT_USER = os.geteuid() == 0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as written, copied by each test into a cache of its own before it is damaged."""
    return builtin_model_dir(tmp_path_factory.mktemp("pristine"), NAME)


@pytest.fixture
def cache(tmp_path: Path, pristine: Path) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(pristine, root / pristine.name)
    return root


def _modes(directory: Path) -> set[tuple[str, int]]:
    return {(p.name, stat.S_IMODE(p.stat().st_mode)) for p in [directory, *directory.iterdir()]}


@pytest.mark.parametrize(("umask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_new_checkpoint_gets_the_modes_of_the_umask(tmp_path: Path, umask: int, dir_mode: int, file_mode: int):
    old = os.umask(umask)
    try:
        directory = builtin_model_dir(tmp_path, NAME)
    finally:
        os.umask(old)
    files = {"config.json", "generation_config.json", "model.safetensors"}
    assert _modes(directory) == {(directory.name, dir_mode), *((name, file_mode) for name in files)}


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


CORRUPTIONS = {
    "weights cut in half": (
        lambda d: _truncate_half(d / "model.safetensors"),
        "model.safetensors is * bytes, its header says * (truncated or overwritten)",
    ),
    "weights cut in the header": (lambda d: os.truncate(d / "model.safetensors", 100), "*is truncated (100 bytes*"),
    "weights empty": (lambda d: os.truncate(d / "model.safetensors", 0), "model.safetensors is truncated (0 bytes)"),
    "weights zero-filled": (
        lambda d: (d / "model.safetensors").write_bytes(bytes((d / "model.safetensors").stat().st_size)),
        "model.safetensors has a corrupt header",
    ),
    "weights with bytes appended": (
        lambda d: (d / "model.safetensors").open("ab").write(b"\0" * 64),
        "model.safetensors is * bytes, its header says *",
    ),
    "config.json missing": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "config.json cut": (lambda d: _truncate_half(d / "config.json"), "config.json is not valid JSON"),
    "weights missing": (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors file"),
    "a file in its place": (lambda d: shutil.rmtree(d) or d.write_text("x"), "not a directory"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_detected(cache: Path, case: str) -> None:
    import fnmatch

    directory = next(cache.iterdir())
    assert checkpoint_problem(directory) is None
    damage, expected = CORRUPTIONS[case]
    damage(directory)
    problem = checkpoint_problem(directory)
    assert problem is not None and fnmatch.fnmatch(problem, expected), problem


@pytest.mark.parametrize("case", ["weights cut in half", "config.json missing", "a file in its place"])
def test_a_corrupt_checkpoint_is_rebuilt(cache: Path, pristine: Path, caplog: pytest.LogCaptureFixture, case: str):
    directory = next(cache.iterdir())
    CORRUPTIONS[case][0](directory)
    with caplog.at_level(logging.WARNING, logger="pytest_lora.zoo"):
        assert builtin_model_dir(cache, NAME) == directory
    for name in ("config.json", "model.safetensors"):
        assert (directory / name).read_bytes() == (pristine / name).read_bytes(), name
    assert [p.name for p in cache.iterdir()] == [directory.name], "the corrupt copy or a temporary dir was left"
    assert f"rebuilding the built-in model {directory}: " in caplog.text
    assert CORRUPTIONS[case][1].split("*")[0] in caplog.text


def test_a_truncated_checkpoint_loads_after_the_rebuild(cache: Path) -> None:
    """It was a raw SafetensorError on every run, the file never rebuilt."""
    _truncate_half(next(cache.iterdir()) / "model.safetensors")
    loaded = load_base_model(Settings(model=f"builtin:{NAME}", device="cpu", cache_dir=str(cache)))
    assert loaded.model.config.model_type == "gpt2"
    assert loaded.model.transformer.h[0].attn.c_attn.weight.quant_state is not None


def test_a_copy_another_worker_finished_first_is_kept(cache: Path) -> None:
    from pytest_lora.model.zoo import ZOO, _install, write_checkpoint

    directory = next(cache.iterdir())
    installed = (directory / "model.safetensors").stat().st_ino
    ours = cache / f".{NAME}-late-writer"
    ours.mkdir()
    write_checkpoint(ZOO[NAME], ours)
    _install(ours, directory, NAME)
    assert not ours.exists() and (directory / "model.safetensors").stat().st_ino == installed


def test_temporary_dirs_of_dead_writers_are_removed(cache: Path) -> None:
    host = socket.gethostname().replace("-", "_")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    names = {
        f".{NAME}-{host}-{finished.pid}-abcd1234": False,  # its writer is gone
        f".{NAME}-{host}-{os.getpid()}-abcd1234": True,  # a live writer (this process)
        f".{NAME}-elsewhere-{finished.pid}-abcd1234": True,  # another host's writer, recent: maybe alive
        f".{NAME}-elsewhere-{os.getpid()}-old12345": False,  # another host's, older than any write takes
        ".tiny-llama-old12345": False,  # an unnamed one, old
        ".tiny-llama-new12345": True,  # an unnamed one, recent
        ".tiny-gpt3-x-1-abcd1234": True,  # not a zoo entry: not ours
        "notes.txt": True,
    }
    old = time.time() - STALE_AFTER_S - 60
    for name in names:
        path = cache / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
        if "old" in name:
            os.utime(path, (old, old))
    directory = builtin_model_dir(cache, NAME)
    kept = {p.name for p in cache.iterdir()} - {directory.name}
    assert kept == {name for name, keep in names.items() if keep}


def _expect_cache_error(exc: ModelLoadError, directory: Path, what: str) -> None:
    message = str(exc)
    assert message.startswith(f"built-in model cache {directory} {what}"), message
    assert "fix: pass --lora-cache-dir DIR" in message and "Traceback" not in message


def test_a_cache_dir_that_cannot_be_created_is_a_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    root = tmp_path / "file" / "cache"
    with pytest.raises(ModelLoadError) as info:
        builtin_model_dir(root, NAME)
    _expect_cache_error(info.value, checkpoint_dir(root, NAME), "cannot be written")
    assert "NotADirectoryError" in str(info.value)


def test_an_unwritable_home_is_a_model_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "home").write_text("HOME is a file here, as on a read-only image")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with pytest.raises(ModelLoadError) as info:
        builtin_model_dir(None, NAME)
    _expect_cache_error(info.value, checkpoint_dir(tmp_path / "home/.cache/pytest-lora", NAME), "cannot be written")


def test_an_unwritable_cache_fails_the_session_with_the_fix(lora_pytester: pytest.Pytester) -> None:
    (lora_pytester.path / "file").write_text("not a directory")
    lora_pytester.makepyfile("def test_a(lora_base_model):\n    pass\n")
    result = lora_pytester.runpytest("--lora-cache-dir=file/cache", "--lora-device=cpu")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ModelLoadError: built-in model cache */file/cache/tiny-llama-* cannot be written: NotADirectoryError*",
            "*fix: pass --lora-cache-dir DIR*",
        ]
    )
    assert "Traceback" not in result.stdout.str() and "INTERNALERROR" not in result.stdout.str()


# What another user sees. As root: this process with the effective ids of `nobody` (file modes
# apply again), restored afterwards. As a normal user: the test takes the access away from the
# owner itself, which reads the same to the code under test.
NOBODY = 65534


def _as_other_user(cache: Path) -> str:
    """The message `builtin_model_dir` stops with for another user, or its path when it succeeds."""
    checkpoint_dir(cache, NAME)  # the installed transformers version, read while this venv is readable
    if ROOT_USER:
        os.setegid(NOBODY)
        os.seteuid(NOBODY)
    try:
        return str(builtin_model_dir(cache, NAME))
    except ModelLoadError as exc:
        return str(exc)
    finally:
        if ROOT_USER:
            os.seteuid(0)
            os.setegid(0)


@pytest.fixture
def shared_cache(pristine: Path):
    """A cache outside pytest's private tmp tree, which another user could not even traverse."""
    root = Path(tempfile.mkdtemp(prefix="pytest-lora-shared-"))
    root.chmod(0o755)
    shutil.copytree(pristine, root / pristine.name)
    yield root
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(root)


@pytest.mark.skipif(not ROOT_USER, reason="only root can act as another user; the modes test covers the rest")
def test_a_cache_written_by_another_user_is_readable(shared_cache: Path) -> None:
    assert _as_other_user(shared_cache) == str(next(shared_cache.iterdir()))


def test_a_private_cache_of_another_user_is_a_model_load_error(shared_cache: Path) -> None:
    directory = next(shared_cache.iterdir())
    directory.chmod(0o700 if ROOT_USER else 0o000)
    message = _as_other_user(shared_cache)
    assert message.startswith(f"built-in model cache {directory} cannot be read: PermissionError"), message
    assert "another user (a CI image, a shared runner) wrote with private modes" in message
    assert "fix: pass --lora-cache-dir DIR" in message


def test_a_corrupt_cache_that_cannot_be_rebuilt_says_both(shared_cache: Path) -> None:
    directory = next(shared_cache.iterdir())
    _truncate_half(directory / "model.safetensors")
    if not ROOT_USER:
        shared_cache.chmod(0o555)
    message = _as_other_user(shared_cache)
    assert message.startswith(f"built-in model cache {directory} is corrupt (model.safetensors is "), message
    assert "and cannot be rebuilt: PermissionError" in message and "fix: pass --lora-cache-dir DIR" in message
