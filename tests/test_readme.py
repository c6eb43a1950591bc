"""README.md, proved: every command of its table accepts every option the table names; each command example runs
through the real CLI on a tiny run (merge --on-disk, dedup --exact, run --decode gpu with its CPU fallback, --dry-run,
--dtype float16, ...); its Python blocks run as written (paths swapped for the test's); its list of shard attributes
is what a real shard holds."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from helpers import REPO, cli, make_images, write_list

pytestmark = pytest.mark.slow  # runs the real pipeline: `make test-fast` leaves it out

README = (REPO / "README.md").read_text(encoding="utf-8")
RUN = ["--gpus", "cpu:2", "--model", "mobilenet_v2", "--weights", "none", "--precision", "fp32", "--graph", "eager",
       "--batch-size", "4", "--loader-workers", "1"]
# commands whose README examples run in their own test modules (a server, the whole bench, the demo set)
ELSEWHERE = {"serve": "tests/helpers/server.py", "bench": "tests/test_bench.py", "demo": "tests/test_demo.py"}


def table_rows() -> dict[str, str]:
    """command -> its README table row (`| `featshard CMD ...` | what it does |`)."""
    rows = re.findall(r"^\| `featshard (\w+)[^`]*` \|(.*)\|$", README, re.M)
    return {cmd: text for cmd, text in rows}


def test_the_table_lists_every_command() -> None:
    from featshard.cli import COMMANDS

    assert set(table_rows()) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(table_rows()))
def test_every_option_the_table_names_exists(command: str) -> None:
    row = table_rows()[command]
    named = set(re.findall(r"(--[a-z][a-z0-9-]+)", row))
    help_text = cli(command, "--help", check=True).stdout
    missing = sorted(o for o in named if o not in help_text and not (o.startswith("--no-") and "--" + o[5:] in
                                                                      help_text))
    assert not missing, f"README's `{command}` row names options `featshard {command} --help` lacks: {missing}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readme")
    images = make_images(root / "images", 8)
    lst = write_list(root / "list.txt", [f"images/{p.name}" for p in images] + ["images/missing.jpg"])
    other = write_list(root / "other.txt", [f"images/{p.name}" for p in images[:3]])
    return {"root": root, "list": lst, "other": other, "image": images[1], "run": root / "run",
            "other_run": root / "other-run"}


@pytest.fixture(scope="module")
def run(data: dict[str, Path]) -> Path:
    """`featshard run --input LIST --out DIR` with most of the options the README names."""
    proc = cli("run", "--input", str(data["list"]), "--out", str(data["run"]), *RUN, "--dtype", "float16",
               "--decode", "gpu", "--chunk-size", "2", "--max-retries", "1", "--stall-timeout", "600",
               "--max-pixels", "50000000", "--image-timeout", "30", "--pool", "avg", check=True)
    assert "decodes on the CPU instead" in proc.stderr  # --decode gpu on a CPU device falls back, and says so
    return data["run"]


def test_run_dry_run_and_float16_shards(run: Path, data: dict[str, Path]) -> None:
    plan = json.loads(cli("run", "--input", str(data["list"]), "--out", str(data["root"] / "dry"), "--gpus", "cpu:3",
                          "--dry-run", check=True).stdout)
    assert plan["rows"] == 9 and len(plan["plan"]) == 3 and not (data["root"] / "dry").exists()
    with h5py.File(next((run / "shards").glob("shard-*.h5")), "r") as h5:
        assert h5["features"].dtype == "float16"


def test_shard_attributes_are_the_ones_the_readme_lists(run: Path) -> None:
    section = README.split("### Shard file", 1)[1].split("Attributes:", 1)[1].split("JSON-valued", 1)[0]
    listed = set(re.findall(r"`(\w+)`", section))
    with h5py.File(next((run / "shards").glob("shard-*.h5")), "r") as h5:
        assert set(h5.attrs) == listed


def test_merge_search_verify_dedup_status(run: Path, data: dict[str, Path]) -> None:
    cli("merge", str(run), "--index-spec", "auto", "--metric", "ip", "--on-disk", "--target-recall", "0.9",
        "--max-index-memory", "1G", "--no-gpu", check=True)
    meta = json.loads((run / "index" / "index.json").read_text())
    assert meta["on_disk"] and meta["spec"].startswith("IVF") and meta["ntotal"] == 8
    hits = json.loads(cli("search", str(run), "--image", str(data["image"]), "-k", "3", "--json", check=True).stdout)
    best = hits[0]["results"][0]
    # the query goes through the run's own extraction (CPU fallback included): it finds its own stored vector
    assert best["name"] == f"images/{data['image'].name}" and best["score"] >= 0.9999
    csv_text = cli("search", str(run), "--input", str(data["other"]), "-k", "2", "--csv", check=True).stdout
    assert csv_text.splitlines()[0] == "query,rank,name,row,score" and len(csv_text.splitlines()) == 1 + 3 * 2
    assert json.loads(cli("verify", str(run), "--json", check=True).stdout)["ok"]
    out = data["root"] / "dups.json"
    cli("dedup", str(run), "--threshold", "0.95", "--k", "5", "--exact", "--json", "--out", str(out), check=True)
    assert json.loads(out.read_text())["exact_checked"]
    status = json.loads(cli("status", str(run), "--json", check=True).stdout)
    assert status["totals"]["complete"] and status["index"]


def test_add_and_export(run: Path, data: dict[str, Path]) -> None:
    cli("run", "--input", str(data["other"]), "--out", str(data["other_run"]), *RUN, "--dtype", "float16",
        "--decode", "gpu", "--chunk-size", "2", check=True)
    cli("merge", str(run), check=True)
    cli("add", str(run), "--from", str(data["other_run"]), check=True)
    assert json.loads((run / "index" / "index.json").read_text())["ntotal"] == 11
    for fmt in ("clip-retrieval", "parquet"):
        out = data["root"] / f"export-{fmt}"
        cli("export", str(run), "--format", fmt, "--out", str(out), check=True)
        cli("export", str(run), "--format", fmt, "--out", str(out), "--overwrite", check=True)
        assert json.loads((out / "export.json").read_text())["dim"] == 1280


def test_slurm_dry_run_with_the_tables_options(data: dict[str, Path]) -> None:
    proc = cli("slurm", "--input", str(data["list"]), "--out", str(data["root"] / "slurm-run"), "--nodes", "2",
               "--gpus-per-node", "1", "--partition", "gpu", "--time", "01:00:00", "--account", "acct", "--mem",
               "16G", "--cpus-per-gpu", "16", "--exclusive", "--no-merge-gpu", "--sbatch-arg=--qos=high",
               "--model", "mobilenet_v2", "--dry-run", check=True)
    assert "#SBATCH --array=0-1" in proc.stdout and "--model mobilenet_v2" in proc.stdout


def test_doctor_prints_its_facts() -> None:
    proc = cli("doctor", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    assert "faiss" in json.dumps(json.loads(proc.stdout))


def python_block(after: str) -> str:
    """The first ```python block after the README text `after`."""
    return README.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_python_api_block_runs(data: dict[str, Path], tmp_path: Path) -> None:
    code = python_block("## Python API")
    code = code.replace('gpus="0-7", model="resnet50", weights="DEFAULT"', 'gpus="cpu:2", model="mobilenet_v2", '
                        'weights="none", precision="fp32", graph="eager", batch_size=4, loader_workers=1')
    code = code.replace('"list.txt"', repr(str(data["list"]))).replace('"RUN"', repr(str(tmp_path / "api-run")))
    code = code.replace('"q.jpg"', repr(str(data["image"])))
    assert "resnet50" not in code and "q.jpg" not in code, "the README's API example changed: update this test"
    proc = subprocess.run([sys.executable, "-c", code + "\n    print('DONE', len(failures))\n"], capture_output=True,
                          text=True, timeout=600, cwd=str(REPO), env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})
    assert proc.returncode == 0 and "DONE 1" in proc.stdout, proc.stderr[-3000:]


def test_the_reading_outputs_block_runs(run: Path) -> None:
    cli("merge", str(run), check=True)
    code = python_block("### Reading the outputs from plain Python").replace("demo-out/run", str(run))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mobilenet_v2" in proc.stdout and "images/img" in proc.stdout


@pytest.mark.parametrize("command", sorted(ELSEWHERE))
def test_commands_run_elsewhere_are_run_there(command: str) -> None:
    assert f'"{command}"' in (REPO / ELSEWHERE[command]).read_text(), f"{ELSEWHERE[command]} no longer runs {command}"
