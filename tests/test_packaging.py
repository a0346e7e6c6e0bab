"""fastvader stands alone: no machine's path anywhere in the repository, the packaged model
configs are the shared collection's files, and a wheel of the checkout, installed into a fresh
environment outside it, lists every model with its counts and plans a shipped preset."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from fastvader.model_configs import ROOT as PACKAGED
from tests.helpers.shared import model_configs_dir

REPO = Path(__file__).resolve().parents[1]

# Absolute paths that only exist on one machine. Each pattern is written so that it does not
# match its own source line (``[k]``, ``[e]``, ...), so this file passes its own scan.
MACHINE_PATHS = re.compile("|".join([
    r"/wor[k]/",                             # the development machines' work folder
    r"/hom[e]/[A-Za-z_][\w.-]*",             # a Linux home folder
    r"/Use[r]s/[A-Za-z_][\w.-]*",            # a macOS home folder
    r"(?<![\w.~])/roo[t]/",                  # root's home
    r"[A-Za-z]:\\{1,2}Use[r]s\\{1,2}",       # a Windows home folder
]))


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_machine_paths_in_tracked_files():
    found = []
    for path in _tracked_files():
        text = _text(path)
        for number, line in enumerate(text.splitlines() if text else [], 1):
            match = MACHINE_PATHS.search(line)
            if match:
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r} in {line.strip()[:120]}")
    assert not found, "absolute machine paths (use a relative path or a setting):\n" + "\n".join(found)


def test_the_scan_catches_each_kind_of_machine_path():
    for path in ["/" + "work/shared/x", "/" + "home/alice/x", "/" + "Users/bob/x", "/" + "root/x",
                 "C:\\" + "Users\\carol", "C:\\\\" + "Users\\\\carol"]:
        assert MACHINE_PATHS.search(f"see {path} here"), path
    for path in ["../shared/model-configs", "/tmp/run1", "~/.cache/fastvader", "fastvader/toy/weights"]:
        assert not MACHINE_PATHS.search(path), path


def _read(path: Path):
    return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())


def test_the_package_never_points_at_the_shared_folder():
    """What fastvader needs at run time ships inside it: no file of the installed packages
    (fastvader/, kernels/) names the checkout's ../shared folder, in code, docstrings or messages."""
    pattern = re.compile(r"\.\./share[d]|share[d]/model-configs")
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
             for path in _tracked_files() if path.relative_to(REPO).parts[0] in ("fastvader", "kernels")
             for number, line in enumerate((_text(path) or "").splitlines(), 1) if pattern.search(line)]
    assert not found, "the package refers to ../shared (ship what it needs inside it):\n" + "\n".join(found)


def test_packaged_configs_are_the_shared_files_and_each_folder_says_where_they_come_from():
    """Same content as the shared model-configs collection (the ModelScope files' ``_name_or_path``,
    a folder on the machine that exported them, is emptied), and every file named in its folder's
    SOURCES.md."""
    files = sorted(p for p in PACKAGED.rglob("*") if p.suffix in (".json", ".yaml"))
    assert {p.parent.name for p in files} == {
        "model_configs", "modelscope_t2v_1.7b", "animatediff_v1-5-2", "sd15", "wan2.1_t2v_1.3b", "wan2.1_t2v_14b",
        "cogvideox_2b", "opensora_v1.2", "text_encoders", "clip_hf", "open_clip", "reward_models",
        # reconstructed for fastvader itself (issue 17), not in the shared collection
        "cogvideox_5b", "cogvideox_5b_i2v", "svd_img2vid_xt", "wan2.1_i2v_14b_480p"}
    for path in files:
        sources = (path.parent / "SOURCES.md").read_text()
        assert path.name in sources, f"{path.relative_to(PACKAGED)} is not described in its SOURCES.md"
    shared = model_configs_dir()
    if shared is None:
        pytest.skip("../shared/model-configs is absent: nothing to compare the packaged copies with")
    for path in files:
        relative = path.relative_to(PACKAGED)
        if not (shared / relative).exists():  # fastvader's own reconstruction: it says where it comes from
            assert "_source" in _read(path), f"{relative} is not in the shared collection and has no _source"
            continue
        original, packaged = _read(shared / relative), _read(path)
        original.pop("_name_or_path", None)
        packaged.pop("_name_or_path", None)
        assert packaged == original, relative


# ---------------------------------------------------------------------------------------------
# a wheel, installed outside the checkout
# ---------------------------------------------------------------------------------------------
def _copy_checkout(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored): a build
    there leaves nothing behind in the checkout and picks up no stale build/ folder."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    for name in filter(None, out.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _build_wheel(tmp: Path) -> Path:
    source = _copy_checkout(tmp / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp / "wheels")], check=True, capture_output=True, text=True)
    return next((tmp / "wheels").glob("fastvader-*.whl"))


def _check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastvader/kernels/__init__.py" in names and any(n.startswith("fastvader/kernels/ops/") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` would shadow HF's package"
    configs = {f"fastvader/model_configs/{p.relative_to(PACKAGED).as_posix()}" for p in PACKAGED.rglob("*")
               if p.suffix in (".json", ".yaml", ".md")}
    assert configs <= names, sorted(configs - names)[:5]
    toy = {"fastvader/toy/weights/world.json"} | {f"fastvader/toy/weights/{p}.safetensors"
                                                  for p in ("unet", "vae", "text_encoder")}
    assert toy <= names and not any("training" in n and n.endswith(".json") for n in names)


def _fresh_environment(tmp: Path, wheel: Path) -> tuple[Path, dict]:
    """A venv holding only the wheel; the test environment's packages come after it on sys.path
    through a .pth line (so the editable install's finder there is never activated)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", FASTVADER_CACHE=str(tmp / "cache"))
    return venv, env


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)
    venv, env = _fresh_environment(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=900)

    where = run(str(venv / "bin" / "python"), "-c",
                "import fastvader, fastvader.kernels as k; print(fastvader.__file__); print(k.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(venv) for line in where.stdout.split()), where.stdout

    models = run(str(venv / "bin" / "fastvader"), "models", "--json")
    assert models.returncode == 0, models.stderr[-3000:]
    catalog = json.loads(models.stdout)
    assert {"modelscope", "zeroscope", "animatediff", "wan", "videocrafter2", "opensora", "toy"} <= {
        b["name"] for b in catalog["backbones"]}
    for entry in catalog["backbones"]:
        assert isinstance(entry["params"], dict) and all(n > 0 for n in entry["params"].values()), entry
    for entry in catalog["rewards"]:  # weightless rewards count 0
        assert isinstance(entry["params"], int) and entry["params"] >= 0, entry
    assert next(r for r in catalog["rewards"] if r["name"] == "aesthetic_hps")["params"] > 10 ** 9

    shutil.copy(REPO / "configs" / "modelscope.yaml", work / "preset.yaml")
    plan = run(str(venv / "bin" / "fastvader"), "plan", "--config", "preset.yaml", "--gpu-memory", "24GiB")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.startswith("budget 24.0 GiB") and "phase: backward" in plan.stdout, plan.stdout
