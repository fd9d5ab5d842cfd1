"""The layers hold (import-linter's contracts in pyproject.toml), a wrong-way import breaks them, and a command
line is checked without torch or Lightning."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}  # the tree under test, not the installed one
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def source_copy(tmp_path: Path) -> Path:
    """The tracked Python sources and pyproject.toml, copied."""
    files = subprocess.run(["git", "ls-files", "*.py", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    return tmp_path


def test_the_layers_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_a_wrong_way_import_breaks_them(tmp_path):
    root = source_copy(tmp_path)
    network = root / "networks" / "mlp.py"
    network.write_text(network.read_text() + "\nfrom runtime import memory  # noqa\n")
    done = lint(root)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "Layers: runtime > model families > tasks, networks, measures > kernels > config BROKEN" in done.stdout
    assert "networks.mlp -> runtime.memory" in done.stdout


def test_every_declaration_module_is_held_to_no_torch():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    light = next(c for c in contracts if c["name"].startswith("What a command line is checked with"))
    declared = {f"{p.parent.name}.{p.stem}" for package in ("datamodules", "lightning_modules")
                for p in (ROOT / package).glob("*_config.py")}
    assert declared and declared <= set(light["source_modules"])


def test_a_refused_command_line_imports_neither_torch_nor_lightning():
    probe = ("import sys, train; code = train.main(['data.nn=3']); "
             "print(code, sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    assert done.stderr.strip() == "error: data.nn: unknown key"
