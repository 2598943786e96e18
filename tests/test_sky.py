"""The SkyPilot job specs in sky/: SkyPilot's own loader, feature checks and sync accept them, and
their setup and run scripts work on a simulated cluster node. Offline, no cloud credentials.

SkyPilot (0.14.1) pins click<8.2 while transformers needs click>=8.4, so it usually lives in its
own virtualenv: the checks run in tests/sky_probe.py under that Python, found through $SKY_PYTHON,
this Python (if it has `sky`), or the `sky` command on PATH.

The simulated node: the repo is copied to <home>/sky_workdir the way `sky launch` syncs it,
`setup` and `run` run there with bash and the variables SkyPilot sets, `pip` is a stand-in that
records its arguments (a real `pip install -e` of the copy would repoint this environment), and
the package is imported from the copy through PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from wandb_records import history, run_files

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "sky").glob("*.yaml"))
TESTED_SKYPILOT = "0.14.1"
INSTALL = (
    f"python3 -m venv /tmp/sky-venv && /tmp/sky-venv/bin/pip install 'skypilot[runpod]=={TESTED_SKYPILOT}' "
    "&& export SKY_PYTHON=/tmp/sky-venv/bin/python"
)
SECRET_TOKEN = "hf_simulated_token_must_not_be_written"
HAS_WANDB = importlib.util.find_spec("wandb") is not None
SMOKE, SIM_CONFIG = "configs/smoke.yaml", "configs/smoke-sim.yaml"  # the latter written on the node


def docs_text() -> str:
    """The cloud journey as documented: docs/cloud.md, or the README it is folded into."""
    return "\n".join(p.read_text() for p in (ROOT / "docs" / "cloud.md", ROOT / "README.md") if p.is_file())


def sky_python() -> str | None:
    if os.environ.get("SKY_PYTHON"):
        # .ci/run builds SkyPilot's venv while the package installs: wait for it to be whole
        building = Path(os.environ["SKY_PYTHON"]).parents[1].with_suffix(".building")
        deadline = time.time() + 900
        while building.exists() and time.time() < deadline:
            time.sleep(1)
        return os.environ["SKY_PYTHON"]
    spec = importlib.util.find_spec("sky")
    if spec is not None and spec.origin is not None:  # not just our sky/ folder seen as a namespace
        return sys.executable
    sky = shutil.which("sky")  # e.g. from pipx: its first line names the virtualenv's Python
    if sky:
        first = Path(sky).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].split()[0]).is_file():
            return first[2:].split()[0]
    return None


# --- SkyPilot's own verdict (one probe run for the module) ---


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Path:
    """A simulated cluster node's home; the probe syncs the repo into <home>/sky_workdir."""
    return tmp_path_factory.mktemp("node")


@pytest.fixture(scope="module")
def probe(tmp_path_factory, node) -> dict:
    python = sky_python()
    if python is None:
        pytest.skip(f"SkyPilot is not installed; to run these tests: {INSTALL}")
    if shutil.which("rsync") is None:
        pytest.fail("rsync is missing (SkyPilot syncs with it, and the pull command uses it): apt-get install -y rsync")
    # A copy of the repo with the local state .skyignore must keep out of the sync.
    repo = tmp_path_factory.mktemp("laptop") / "samsum-qlora"
    shutil.copytree(
        ROOT,
        repo,
        ignore=shutil.ignore_patterns(
            ".git",
            "outputs",
            "wandb",
            ".venv*",
            "__pycache__",
            ".pytest_cache",
            "*.egg-info",
            ".gpu-site",
            ".gpu-wheels",
            ".ref",
            "build",
            "dist",
        ),
    )
    for junk in (
        "outputs/old/adapter_model.safetensors",
        "wandb/offline-run-x/run-x.wandb",
        ".git/HEAD",
        ".venv/bin/python",
        "samsum_qlora/__pycache__/cli.cpython-311.pyc",
        ".gpu-site/x.py",
        ".ref/x",
    ):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_text("local only")
    home = tmp_path_factory.mktemp("sky-home")  # so no ~/.sky is read or written
    env = {**os.environ, "HOME": str(home), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    result = subprocess.run(
        [python, str(ROOT / "tests" / "sky_probe.py"), str(repo), str(node / "sky_workdir")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_tested_skypilot_version_is_the_one_the_docs_pin(probe):
    assert probe["version"] == TESTED_SKYPILOT
    assert f"skypilot[runpod]=={TESTED_SKYPILOT}" in docs_text()


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_yaml_loads_with_skypilot_and_starts_with_its_command(probe, path):
    task = probe["tasks"][path.name]  # loaded by sky.utils.dag_utils.load_chain_dag_from_yaml
    assert task["workdir"] == "." and task["setup"] and task["run"]
    first = path.read_text().splitlines()[0]
    assert re.match(r"# sky (launch -c samsum|exec samsum|jobs launch -n samsum) sky/", first), first
    assert f"sky/{path.name}" in first


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_secrets_hold_no_values_and_only_the_hub_token_is_required(probe, path):
    secrets = yaml.safe_load(path.read_text())["secrets"]
    assert secrets["HF_TOKEN"] is None and secrets.get("WANDB_API_KEY", "") == ""
    # A null secret must come with --secret at launch; an empty one may (no key = W&B offline).
    assert probe["tasks"][path.name]["secrets_required_at_launch"] == ["HF_TOKEN"]


@pytest.mark.parametrize("name", ["train.yaml", "eval.yaml"])
def test_runpod_specs_ask_for_nothing_runpod_lacks(probe, name):
    resources = probe["tasks"][name]["resources"]
    assert {r["cloud"] for r in resources} == {"RunPod"}
    assert {gpu for r in resources for gpu in r["accelerators"]} == {"L4", "RTX4090", "A40", "RTXA5000"}
    for r in resources:
        assert r["runpod_check"] == "ok"  # RunPod.check_features_are_supported
        assert set(r["accelerators"]) <= set(probe["runpod_gpu_names"]), "not a name SkyPilot maps to a RunPod GPU"
    # The documented docker route (image_id: docker:...) needs a feature RunPod has.
    docker = probe["docker_variant"]["resources"]
    assert all(r["features"] == ["docker_image"] and r["runpod_check"] == "ok" for r in docker)
    assert probe["tasks"]["train.yaml"]["envs"]["OUTPUT_DIR"] == probe["tasks"]["eval.yaml"]["envs"]["OUTPUT_DIR"]


def test_managed_spec_mounts_a_bucket_which_runpod_refuses(probe):
    task = probe["tasks"]["train-managed.yaml"]
    # What the comments say of RunPod is what SkyPilot says.
    assert probe["runpod_cannot"] == {"stop": True, "storage_mounting": True, "multi-node": True}
    assert task["storage_mounts"] == {"/outputs": {"name": "samsum-probe-bucket", "mode": "MOUNT_CACHED"}}
    assert task["envs"]["OUTPUT_DIR"].startswith("/outputs/")  # checkpoints survive the machine
    assert sorted(r["use_spot"] for r in task["resources"]) == [False, False, True, True]  # spot, then on-demand
    for r in task["resources"]:
        assert r["own_cloud_check"] == "ok" and r["cloud"] != "RunPod"
        assert "storage_mounting" in r["runpod_check"]
        assert r["job_recovery"]["strategy"] == "FAILOVER" and r["job_recovery"]["max_restarts_on_errors"] >= 1
        assert 143 in r["job_recovery"]["recover_on_exit_codes"]  # `train` after SIGTERM


def test_a_misspelled_key_is_rejected_by_name(probe):
    assert "'acclerators'" in probe["misspelled"]["resources.acclerators"]
    assert "did you mean 'accelerators'" in probe["misspelled"]["resources.acclerators"]
    assert "'setpu'" in probe["misspelled"]["setpu"]


def test_skyignore_keeps_local_state_out_of_the_sync(probe, node):
    workdir = node / "sky_workdir"
    for kept_out in ("outputs", "wandb", ".git", ".venv", ".gpu-site", ".ref", "samsum_qlora/__pycache__"):
        assert not (workdir / kept_out).exists(), f"{kept_out} was synced to the cluster"
    for needed in (
        "pyproject.toml",
        "configs/llama32-1b-samsum.yaml",
        "configs/smoke.yaml",
        "samsum_qlora/commands/cli.py",
        "samsum_qlora/assets/tiny-llama/config.json",
    ):
        assert (workdir / needed).is_file(), f"{needed} was not synced"


# --- the simulated node ---


@pytest.fixture(scope="module")
def shell(probe, node, tmp_path_factory):
    """Runs a YAML's script on the simulated node as SkyPilot would: bash, in ~/sky_workdir,
    with the task's envs, its secrets and the SKYPILOT_* variables."""
    bin_dir = tmp_path_factory.mktemp("bin")
    log = tmp_path_factory.mktemp("calls")
    # `pip` records its arguments; an install leaves the console script pip would have made.
    (bin_dir / "pip").write_text(f"""#!/bin/bash
echo "$*" >> {log}/pip
if [ "$1" = install ]; then
  printf '#!/bin/sh\\nexec {sys.executable} -m samsum_qlora "$@"\\n' > {bin_dir}/samsum-qlora
  chmod +x {bin_dir}/samsum-qlora
fi
""")
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {log}/torchrun\n')
    for tool in ("pip", "torchrun"):
        (bin_dir / tool).chmod(0o755)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "SKYPILOT_", "HF_TOKEN")) and k != "PYTHONPATH"
    }

    def run(name: str, script: str, gpus: int = 1, **overrides) -> subprocess.CompletedProcess:
        task = probe["tasks"][name]
        env = {
            **base,
            "HOME": str(node),
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(node / "sky_workdir"),
            "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
            "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NUM_NODES": "1",
            "SKYPILOT_NODE_IPS": "127.0.0.1",
            "SKYPILOT_TASK_ID": f"sky-sim-{name}",
            **task["envs"],
            "CONFIG": SIM_CONFIG,
            "HF_TOKEN": SECRET_TOKEN,
            "WANDB_API_KEY": "",  # as after `--secret HF_TOKEN` alone
            **({} if HAS_WANDB else {"REPORT_TO": "none"}),
            **overrides,
        }
        return subprocess.run(
            ["bash", "-c", task[script]], cwd=node / "sky_workdir", env=env, capture_output=True, text=True, timeout=300
        )

    run.log = log
    return run


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(shell, node):
    """sky/train.yaml's setup and run on the node, with the smoke config cut to 12 steps."""
    smoke = yaml.safe_load((node / "sky_workdir" / SMOKE).read_text())
    smoke["train"].update(max_steps=12, save_steps=4, logging_steps=2)
    (node / "sky_workdir" / SIM_CONFIG).write_text(yaml.safe_dump(smoke))
    ok(shell("train.yaml", "setup"))
    out = ok(shell("train.yaml", "run"))
    return out, node / "sky_workdir" / "outputs" / "lora_samsum"


@pytest.mark.parametrize("name", [p.name for p in YAMLS])
def test_setup_installs_the_package_with_the_cloud_extra(shell, name):
    (shell.log / "pip").unlink(missing_ok=True)
    ok(shell(name, "setup"))
    assert (shell.log / "pip").read_text().splitlines() == ["install -e .[cloud]"]


def test_train_run_leaves_the_adapters_where_the_pull_command_reads_them(trained, node, tmp_path):
    out, output_dir = trained
    adapters = output_dir / "lora_adapters" / "adapter_model.safetensors"
    assert adapters.is_file()
    # The docs' pull block, pasted as it is, with a stand-in for `ssh samsum`.
    blocks = re.findall(r"```bash\n(.*?)```", docs_text(), re.S)
    pull = [b for b in blocks if re.search(r"^rsync -Pavz samsum:\S+/ \./outputs/\S+/$", b, re.M)]
    assert pull, "no `rsync -Pavz samsum:<OUTPUT_DIR>/ ./outputs/<run>/` block in docs/cloud.md"
    source, target = re.search(r"^rsync -Pavz samsum:(\S+)/ (\./outputs/\S+)/$", pull[0], re.M).groups()
    assert source == "~/sky_workdir/outputs/lora_samsum"  # sky/train.yaml's OUTPUT_DIR
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done; shift\ncd "$HOME" && exec sh -c "$*"\n')
    fake_ssh.chmod(0o755)
    laptop = tmp_path / "laptop"  # a fresh clone: no outputs/ yet
    laptop.mkdir()
    ok(
        subprocess.run(
            ["bash", "-ec", pull[0]],
            cwd=laptop,
            capture_output=True,
            text=True,
            env={**os.environ, "HOME": str(node), "RSYNC_RSH": str(fake_ssh)},
        )
    )
    pulled = laptop / target / "lora_adapters" / "adapter_model.safetensors"
    assert pulled.read_bytes() == adapters.read_bytes()
    assert f"adapters in {output_dir}/lora_adapters" in out


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed: pip install wandb")
def test_train_run_without_a_wandb_key_logs_offline_beside_the_adapters(trained):
    out, output_dir = trained
    assert "WANDB_API_KEY is not set: W&B logs offline" in out
    (run_file,) = run_files(output_dir)
    assert any("train/loss" in row for row in history(run_file))
    for path in output_dir.rglob("*"):
        if path.is_file():
            assert SECRET_TOKEN.encode() not in path.read_bytes(), f"HF_TOKEN written to {path}"


def test_several_gpus_train_through_torchrun(shell, trained, tmp_path):
    ok(shell("train.yaml", "run", gpus=4, OUTPUT_DIR=str(tmp_path / "ddp")))
    report_to = "wandb" if HAS_WANDB else "none"
    assert (shell.log / "torchrun").read_text().splitlines() == [
        "--nproc_per_node=4",
        "--no-python",
        "samsum-qlora",
        "train",
        "--config",
        SIM_CONFIG,
        "--set",
        f"train.output_dir={tmp_path / 'ddp'}",
        "--set",
        f"train.report_to={report_to}",
    ]


def test_eval_run_scores_the_adapters_on_the_node(shell, trained):
    _, output_dir = trained
    out = ok(shell("eval.yaml", "run", EVAL_ARGS="--limit 8"))
    metrics = json.loads((output_dir / "eval" / "metrics.json").read_text())
    assert metrics["n_examples"] == 8 and 0 <= metrics["rouge1"] <= 1
    assert "| Model | Type | ROUGE-1 | ROUGE-2 | ROUGE-L |" in out
    run_id = output_dir / "wandb_run_id.txt"
    if HAS_WANDB and run_id.exists():  # once train and eval call samsum_qlora.tracking
        rows = [
            row
            for f in run_files(output_dir)
            if f.name == f"run-{run_id.read_text().strip()}.wandb"
            for row in history(f)
        ]
        assert any("train/loss" in row for row in rows) and any("test/rouge1" in row for row in rows)


def test_managed_run_resumes_after_a_preemption_and_skips_when_done(shell, trained, tmp_path):
    _, finished = trained
    # The bucket as a preemption left it: no adapters, the newest checkpoint lost mid-upload.
    bucket = tmp_path / "bucket" / "lora_samsum"
    shutil.copytree(finished, bucket, ignore=shutil.ignore_patterns("lora_adapters", "eval", "wandb"))
    newest, older = sorted((bucket / "checkpoints").glob("checkpoint-*"), key=lambda p: -int(p.name.split("-")[1]))[:2]
    shutil.rmtree(newest)
    run_id = bucket / "wandb_run_id.txt"
    id_before = run_id.read_text() if run_id.exists() else None

    out = ok(shell("train-managed.yaml", "run", OUTPUT_DIR=str(bucket)))
    assert f"resuming from {older}" in out
    assert (bucket / "lora_adapters" / "adapter_model.safetensors").is_file()
    if id_before is not None:  # once `train` keeps the W&B run id in the output dir
        assert run_id.read_text() == id_before
    again = ok(shell("train-managed.yaml", "run", OUTPUT_DIR=str(bucket)))  # a recovery after the end
    assert "nothing to do" in again
