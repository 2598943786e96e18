"""Asks SkyPilot itself about sky/*.yaml and .skyignore; prints one JSON report. Used by test_sky.py.

Run with the Python that has SkyPilot (`python tests/sky_probe.py REPO STAGE`): SkyPilot pins
click<8.2 and transformers needs click>=8.4, so it usually lives in its own virtualenv. Offline,
no credentials; HOME should point at an empty temp dir so no ~/.sky is read or written.

Loads every YAML with `sky.utils.dag_utils.load_chain_dag_from_yaml` (env and secret overrides),
checks the features each task needs against RunPod with `RunPod.check_features_are_supported`,
loads a copy with a misspelled key, and copies REPO into STAGE/home/sky_workdir the way
`sky launch` does: zipped for the API server with SkyPilot's own zipper, then rsync'ed to the
cluster with SkyPilot's own .skyignore filter.
"""

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml
from sky.data import storage_utils
from sky.provision.runpod.utils import GPU_NAME_MAP
from sky.utils import command_runner, dag_utils

import sky
from sky import clouds, exceptions

Feature = clouds.CloudImplementationFeatures
SECRETS = [("HF_TOKEN", "hf_probe_token"), ("WANDB_API_KEY", "probe_wandb_key")]


def check(cloud, resources, features) -> str:
    try:
        cloud.check_features_are_supported(resources, features)
        return "ok"
    except exceptions.NotSupportedError as e:
        return str(e)


def load(path: Path, env_overrides, secret_overrides):
    (task,) = dag_utils.load_chain_dag_from_yaml(
        str(path), env_overrides=env_overrides, secret_overrides=secret_overrides
    ).tasks
    return task


def describe(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    # Envs left null in the file must be given at launch (--env BUCKET=...): give them here.
    env_overrides = [(k, f"samsum-probe-{k.lower()}") for k, v in (raw.get("envs") or {}).items() if v is None]
    bare = load(path, env_overrides, None)
    task = load(path, env_overrides, SECRETS)
    task_features = task.get_required_cloud_features()
    resources = []
    for r in sorted(task.resources, key=str):
        features = task_features | r.get_required_cloud_features()
        resources.append(
            {
                "cloud": str(r.cloud),
                "accelerators": r.accelerators,
                "use_spot": r.use_spot,
                "disk_size": r.disk_size,
                "job_recovery": r.job_recovery,
                "features": sorted(f.value for f in features),
                "own_cloud_check": check(type(r.cloud), r, features),
                "runpod_check": check(clouds.RunPod, r, features),  # RunPod judges features alone
            }
        )
    return {
        "name": task.name,
        "workdir": task.workdir,
        "envs": dict(task.envs),
        "setup": task.setup,
        "run": task.run,
        "secrets_required_at_launch": sorted(ref.name for ref in bare.managed_secret_refs),
        "secrets": sorted(task.secrets),
        "resources": resources,
        "storage_mounts": {dst: {"name": s.name, "mode": s.mode.value} for dst, s in task.storage_mounts.items()},
    }


def rejects(path: Path, old: str, new: str, tmp: Path) -> str:
    """Load a copy of `path` with `old` replaced by `new`; the error SkyPilot gives, or ''."""
    bad = tmp / f"misspelled-{new}.yaml"
    bad.write_text(path.read_text().replace(old, new, 1))
    try:
        load(bad, [("BUCKET", "samsum-probe-bucket")], SECRETS)
    except Exception as e:  # noqa: BLE001 - SkyPilot raises ValueError or its own schema errors
        return f"{type(e).__name__}: {e}"
    return ""


def stage(repo: Path, dest: Path, tmp: Path) -> None:
    """Client -> API server (a zip honouring .skyignore) -> cluster (rsync with the .skyignore filter)."""
    archive = tmp / "workdir.zip"
    storage_utils.zip_files_and_folders([str(repo)], archive)
    server = tmp / "server"
    with zipfile.ZipFile(archive) as z:
        z.extractall(server)
    dest.mkdir(parents=True)
    uploaded = server / str(repo).lstrip("/")
    subprocess.run(f"rsync -a {command_runner.RSYNC_FILTER_SKYIGNORE} {uploaded}/ {dest}/", shell=True, check=True)


def main(repo: Path, stage_dir: Path) -> None:
    tmp = Path(tempfile.mkdtemp())
    train = repo / "sky" / "train.yaml"
    docker = tmp / "train-docker.yaml"  # the image_id route docs/cloud.md describes
    docker.write_text(
        train.read_text().replace("  disk_size:", "  image_id: docker:samsum-qlora:probe\n  disk_size:", 1)
    )
    runpod_cannot = {}
    probe_resources = next(iter(load(train, None, SECRETS).resources))
    for feature in (Feature.STOP, Feature.STORAGE_MOUNTING, Feature.MULTI_NODE):
        runpod_cannot[feature.value] = check(clouds.RunPod, probe_resources, {feature}) != "ok"
    report = {
        "version": sky.__version__,
        "tasks": {p.name: describe(p) for p in sorted((repo / "sky").glob("*.yaml"))},
        "docker_variant": describe(docker),
        "misspelled": {
            "resources.acclerators": rejects(train, "accelerators:", "acclerators:", tmp),
            "setpu": rejects(train, "\nsetup:", "\nsetpu:", tmp),
        },
        "runpod_cannot": runpod_cannot,
        "runpod_gpu_names": sorted(GPU_NAME_MAP),
        "skyignore_filter": command_runner.RSYNC_FILTER_SKYIGNORE,
    }
    if stage_dir is not None:
        stage(repo, stage_dir, tmp)
    json.dump(report, sys.stdout, default=str)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
