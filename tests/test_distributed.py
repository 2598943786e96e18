"""Several processes: `train` and `eval` under `torchrun --nproc_per_node 2` on the CPU (gloo),
and the multi-node SkyPilot spec.

The two-process runs keep the smoke config's 4-bit base: bitsandbytes loads and quantises on the
CPU in each process, and DDP only has to average the LoRA weights' gradients (plain float32
tensors) and broadcast the frozen base once when it wraps the model. (The 4-bit layers
themselves, `quantization.dequantize_once=false`, ran under torchrun on the CPU too; the runs
here take the default fast path.) Each subprocess sees no GPU and uses one thread, as on a
2-core CI machine; each torchrun gets a free port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE_CONFIG, set_args, smoke_overrides

# SkyPilot's own loader and the simulated cluster node, as tests/test_sky.py sets them up
from test_sky import HAS_WANDB, SIM_CONFIG, node, ok, probe, shell  # noqa: F401

from samsum_qlora import batching, files, predictions, runtime, training
from samsum_qlora.commands import evaluate
from samsum_qlora.config import TrainArgs, load_config
from samsum_qlora.errors import UserError
from samsum_qlora.layout import EvalDir
from samsum_qlora.predictor import Prediction

# `samsum-qlora ARGS` as the CLI runs it, recording what this process did into $RECORD: the LoRA
# weights it holds after `train`, the prompts (indices) it generated for in `eval`.
DRIVER = """\
import json, os, sys
import torch
from peft import get_peft_model_state_dict
from samsum_qlora import generation, training
from samsum_qlora.commands import cli

trainers, generated = [], []
build, generate = training.build_trainer, generation.generate
training.build_trainer = lambda *args, **kwargs: trainers.append(build(*args, **kwargs)) or trainers[-1]

def recording_generate(model, prompts, batches, *args, **kwargs):
    generated.extend(i for batch in batches for i in batch)
    return generate(model, prompts, batches, *args, **kwargs)

generation.generate = recording_generate
cli.main.main(args=sys.argv[1:], standalone_mode=False)
record = os.path.join(os.environ["RECORD"], "rank" + os.environ.get("RANK", "0"))
if trainers:
    torch.save(get_peft_model_state_dict(trainers[0].model), record + "-lora.pt")
if generated:
    open(record + "-generated.json", "w").write(json.dumps(generated))
"""
# One epoch at 2,048 tokens a step. The sample packs into 9 batches of 2,048 tokens, or 18 of
# 1,024: two processes at 1,024 each take the same 9 steps (with whole 2,048-token batches each
# process would take only 5). W&B logs offline, where it is installed.
EPOCH = {
    "train.max_steps": -1,
    "train.num_train_epochs": 1,
    "train.max_tokens_per_batch": 2048,
    "train.save_steps": 3,
    "train.logging_steps": 3,
    "train.report_to": "wandb" if HAS_WANDB else "none",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int = 1, script: Path | None = None, **env) -> str:
    """`python -m samsum_qlora ARGS` (or `python SCRIPT ARGS`), under torchrun when processes > 1."""
    torchrun = (
        []
        if processes == 1
        else [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
    )
    cmd = [sys.executable, *torchrun, *([str(script)] if script else ["-m", "samsum_qlora"]), *args]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            **env,
        },
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def relative_files(folder: Path) -> set[str]:
    """Files under `folder`, but not W&B's own (their names hold the time and the run id)."""
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != "wandb"
    }


def files_of(folder: Path) -> dict:
    return {
        "predictions": [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()],
        "metrics": json.loads((folder / "metrics.json").read_text()),
    }


# --- the arithmetic (pure) ---


def test_each_process_takes_its_share_of_the_global_batch():
    tokens = TrainArgs(max_tokens_per_batch=8192)  # 8,192 tokens x 1 step
    assert training.per_process_batch(tokens, 1) == (8192, 1, "")
    assert training.per_process_batch(tokens, 2) == (
        4096,
        1,
        "2 processes: 4,096 tokens per device per step keeps the global 8,192",
    )
    assert training.per_process_batch(tokens, 3)[:2] == (2730, 1)
    assert "rounded down to 8,190" in training.per_process_batch(tokens, 3)[2]
    assert training.per_process_batch(TrainArgs(max_tokens_per_batch=8192, gradient_accumulation_steps=4), 2)[:2] == (
        4096,
        4,
    )

    rows = TrainArgs(max_tokens_per_batch=None, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    assert training.per_process_batch(rows, 2) == (
        None,
        2,
        "2 processes: 4 rows x 2 accumulation steps per device keeps the global 16 rows per step",
    )
    assert training.per_process_batch(rows, 4)[:2] == (None, 1)
    for n in (1, 2, 4):  # rows x accumulation x processes is always the one-GPU batch
        _, accumulation, _ = training.per_process_batch(rows, n)
        assert 4 * accumulation * n == 16


def test_a_global_batch_that_does_not_split_is_refused_with_values_that_do():
    rows = TrainArgs(max_tokens_per_batch=None, per_device_train_batch_size=4, gradient_accumulation_steps=4)
    with pytest.raises(UserError) as e:
        training.per_process_batch(rows, 8)
    assert "--set train.per_device_train_batch_size=2 --set train.gradient_accumulation_steps=8" in str(e.value)
    assert "launch 1, 2 or 4 processes" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"does not split over 3 processes: launch 1, 2 or 4 processes"):
        training.per_process_batch(rows, 3)  # 16 rows cannot split in 3
    with pytest.raises(UserError, match="set it to at least 32"):
        training.per_process_batch(TrainArgs(max_tokens_per_batch=16), 2)


def test_dealt_batches_are_those_of_one_process_each_once():
    lengths = [5, 9, 9, 3, 7, 1, 8, 2, 6, 4, 9]
    batches = batching.generation_batches(lengths, max_rows=3, max_tokens=10**6, new_tokens=8)
    assert [len(b) for b in batches] == [3, 3, 3, 2]
    assert [lengths[i] for i in batches[0]] == [9, 9, 9]  # longest first
    shares = [batches[rank::2] for rank in range(2)]
    assert sorted(b for share in shares for b in share) == sorted(batches)
    assert sorted(i for share in shares for b in share for i in b) == list(range(len(lengths)))


# --- two processes training ---


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same epoch trained by two processes (torchrun, through DRIVER) and by one."""
    base = tmp_path_factory.mktemp("ddp")
    (base / "driver.py").write_text(DRIVER)
    (base / "record").mkdir()
    two = launch(
        ["train", *set_args(smoke_overrides(base / "two", **EPOCH))],
        processes=2,
        script=base / "driver.py",
        RECORD=str(base / "record"),
        WANDB_MODE="offline",
    )
    one = launch(["train", *set_args(smoke_overrides(base / "one", **EPOCH))], WANDB_MODE="offline")
    return {"two": (two, base / "two" / "run"), "one": (one, base / "one" / "run"), "base": base}


@pytest.mark.slow
def test_two_processes_keep_the_global_batch(runs):
    log, run = runs["two"]
    two = json.loads((run / "train_metrics.json").read_text())
    one = json.loads((runs["one"][1] / "train_metrics.json").read_text())
    assert log.count("2 processes: 1,024 tokens per device per step keeps the global 2,048") == 1
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["per_process_batch"] == {"max_tokens_per_batch": 1024, "gradient_accumulation_steps": 1}
    assert two["global_step"] == one["global_step"] == 9
    assert two["tokens_seen"] == one["tokens_seen"] == one["tokens"]  # every row once, by one process or the other
    # config.yaml keeps the one-GPU recipe, so the run reproduces on any number of GPUs
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_tokens_per_batch"] == 2048


@pytest.mark.slow
def test_only_rank_0_writes_the_run_folder(runs):
    log, run = runs["two"]
    one = relative_files(runs["one"][1])
    # The one file rank 1 writes: its RNG state in each checkpoint (the Trainer's, for resuming).
    expected = {f for f in one if not f.endswith("/rng_state.pth")}
    for ckpt in ("checkpoints/checkpoint-6", "checkpoints/checkpoint-9"):
        assert f"{ckpt}/rng_state.pth" in one
        expected |= {f"{ckpt}/rng_state_0.pth", f"{ckpt}/rng_state_1.pth"}
        manifest = json.loads((run / ckpt / "samsum_manifest.json").read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(manifest["files"])  # written after both
    assert relative_files(run) == expected
    if HAS_WANDB:  # one W&B run, rank 0's, whose id the run folder keeps
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1 and "wandb_run_id.txt" in expected
    for line in ("saved adapters to", "trainable parameters:", "data: 60 training rows"):
        assert log.count(line) == 1, line


@pytest.mark.slow
def test_both_processes_hold_the_saved_lora_weights(runs):
    import torch
    from safetensors.torch import load_file

    rank0, rank1 = (torch.load(runs["base"] / "record" / f"rank{r}-lora.pt") for r in (0, 1))
    saved = load_file(runs["two"][1] / "lora_adapters" / "adapter_model.safetensors")
    assert set(rank0) == set(rank1) == set(saved) and len(saved) == 16  # A and B of q/k/v/o in 2 layers
    for name, weight in saved.items():
        assert torch.equal(rank0[name], rank1[name]) and torch.equal(rank0[name], weight), name
    assert all(weight.abs().sum() > 0 for name, weight in saved.items() if "lora_B" in name)  # B starts at 0


# --- two processes evaluating ---


@pytest.mark.slow
def test_sharded_eval_returns_every_example_once_in_order_with_the_same_metrics(runs):
    _, run = runs["two"]
    record = runs["base"] / "record"
    settings = set_args(smoke_overrides(run.parent, **{"eval.batch_size": 4}))
    log = launch(
        ["eval", *settings, "--output-dir", str(run / "eval-two")],
        processes=2,
        script=runs["base"] / "driver.py",
        RECORD=str(record),
    )
    launch(["eval", *settings, "--output-dir", str(run / "eval-one")])
    # 12 test examples in batches of 4: rank 0 generated the first and the third, rank 1 the second
    rank0, rank1 = (json.loads((record / f"rank{r}-generated.json").read_text()) for r in (0, 1))
    assert len(rank0) == 8 and len(rank1) == 4 and sorted(rank0 + rank1) == list(range(12))
    two, one = (files_of(run / folder) for folder in ("eval-two", "eval-one"))
    assert [p["id"] for p in two["predictions"]] == [f"smp-test-{i:03d}" for i in range(1, 13)]
    assert two["predictions"] == one["predictions"]
    assert {k: v for k, v in two["metrics"].items() if k != "generation_seconds"} == {
        k: v for k, v in one["metrics"].items() if k != "generation_seconds"
    }
    assert relative_files(run / "eval-two") == {"eval_identity.json", "predictions.jsonl", "metrics.json"}
    assert log.count("| Model | Type |") == 1


def test_eval_resumes_what_interrupted_processes_saved(tmp_path):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    plan = evaluate.plan_eval(cfg, base_only=True, limit=5, output_dir=str(tmp_path / "e"))
    plan.output_dir.mkdir()
    rows = evaluate.eval_rows(cfg, plan).rows
    files.write_json(EvalDir(plan.output_dir).identity, predictions.identity(cfg, plan, rows))
    for rank, ids in ((0, [1, 3]), (1, [2])):  # as a 2-process eval left them when stopped
        (plan.output_dir / f"predictions.partial.rank{rank}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "index": i - 1,
                        "id": f"smp-test-{i:03d}",
                        "reference": "r",
                        "prediction": f"saved {i}",
                        "ended": True,
                    }
                )
                + "\n"
                for i in ids
            )
        )
    asked = []

    def predict(todo, save):
        asked.extend(r["id"] for r in todo)
        save(list(range(len(todo))), [Prediction("new", True)] * len(todo))

    evaluate.evaluate_model(cfg, plan, predict=predict)
    assert asked == ["smp-test-004", "smp-test-005"]
    saved = files_of(plan.output_dir)["predictions"]
    assert [p["prediction"] for p in saved] == ["saved 1", "saved 2", "saved 3", "new", "new"]
    assert not list(plan.output_dir.glob("predictions.partial*"))


def test_an_api_model_is_not_sharded(tmp_path, monkeypatch):
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path))
    plan = evaluate.plan_eval(cfg, base_only=True, limit=2, output_dir=str(tmp_path / "e"))
    monkeypatch.setattr(runtime, "current", lambda: runtime.Runtime(rank=0, world_size=2))
    with pytest.raises(UserError, match="without torchrun"):
        evaluate.evaluate_model(cfg, plan, predict=lambda *args: pytest.fail("must not generate"))


# --- several nodes (SkyPilot) ---


def test_multinode_spec_spans_nodes_on_a_cloud_that_can(probe):  # noqa: F811
    spec = yaml.safe_load((ROOT / "sky" / "train-multinode.yaml").read_text())
    task = probe["tasks"]["train-multinode.yaml"]
    assert spec["num_nodes"] == 2
    for r in task["resources"]:
        assert "multi-node" in r["features"] and r["own_cloud_check"] == "ok" and r["cloud"] != "RunPod"
        assert "multi-node" in r["runpod_check"]  # RunPod refuses it, as the comments say
    # Every node mounts the same bucket, so all processes see the same checkpoints to resume from.
    assert task["storage_mounts"]["/outputs"]["name"] == "samsum-probe-bucket"
    assert task["envs"]["OUTPUT_DIR"].startswith("/outputs/")


def test_each_node_joins_torchrun_at_the_first_nodes_address(shell, tmp_path):  # noqa: F811
    out = tmp_path / "bucket" / "lora_samsum"
    ok(
        shell(
            "train-multinode.yaml",
            "run",
            gpus=4,
            OUTPUT_DIR=str(out),
            SKYPILOT_NUM_NODES="2",
            SKYPILOT_NODE_RANK="1",
            SKYPILOT_NODE_IPS="10.0.0.7\n10.0.0.8",
        )
    )
    assert (shell.log / "torchrun").read_text().splitlines() == [
        "--nnodes=2",
        "--nproc_per_node=4",
        "--node_rank=1",
        "--master_addr=10.0.0.7",
        "--master_port=29500",
        "--no-python",
        "samsum-qlora",
        "train",
        "--config",
        SIM_CONFIG,
        "--set",
        f"train.output_dir={out}",
        "--set",
        f"train.report_to={'wandb' if HAS_WANDB else 'none'}",
    ]
