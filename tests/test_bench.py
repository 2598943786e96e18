"""`samsum-qlora bench` on the CPU with the tiny model: the figures exist and add up."""

import json

import pytest
from conftest import SMOKE_CONFIG, TINY_MODEL, set_args, smoke_overrides

from samsum_qlora.commands import bench
from samsum_qlora.config import load_config


def test_summarise_arithmetic():
    f = bench.summarise(
        bench.Timed(real_tokens=9_000, padded_tokens=10_000, seconds=3.0),
        n_params=1_000_000_000,
        device="NVIDIA H100 80GB HBM3",
        peak_bytes=2 * 1024**3,
        epoch_tokens=1_800_000,
    )
    assert f["tokens_per_s"] == 3000.0 and f["padding_fraction"] == 0.1 and f["peak_memory_gib"] == 2.0
    assert f["mfu"] == pytest.approx(3000 * 4e9 / 989e12, abs=1e-4)
    assert f["epoch_minutes"] == 10.0
    assert (
        bench.summarise(bench.Timed(1, 1, 1.0), n_params=1, device=None, peak_bytes=None, epoch_tokens=60)["mfu"]
        is None
    )


@pytest.mark.slow
def test_bench_cli_writes_json_with_tutorial_comparison_and_eval(tmp_path):
    from click.testing import CliRunner

    from samsum_qlora.commands.cli import main

    out = tmp_path / "bench.json"
    # rows padded to their length's bucket only (12 sample rows would mostly fill buckets' empty rows)
    args = set_args(smoke_overrides(tmp_path, **{"eval.max_new_tokens": 6, "train.bucket_shapes": False}))
    result = CliRunner().invoke(
        main,
        [
            "bench",
            *args,
            "--steps",
            "2",
            "--warmup",
            "1",
            "--compare",
            "tutorial",
            "--eval",
            "--loop-sample",
            "3",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    for figures in (r, r["tutorial"]):
        assert figures["tokens_per_s"] > 0 and 0 <= figures["padding_fraction"] < 1
        assert figures["peak_memory_gib"] is None and figures["mfu"] is None  # no GPU here
    assert r["ratio"] == pytest.approx(r["tokens_per_s"] / r["tutorial"]["tokens_per_s"], rel=0.01)
    # token-budget batches of similar lengths waste less than the tutorial's random rows of 4
    assert r["padding_fraction"] < r["tutorial"]["padding_fraction"]
    e = r["eval"]
    assert e["examples"] == 60 and e["loop_sample"] == 3 and e["max_new_tokens"] == 6
    # random weights rarely stop: every prompt gets at most its budget, and stopping is counted
    assert 0 < e["batched_new_tokens"] <= 60 * 6 and 0 <= e["ended_share"] <= 1
    # our decoder on the loop's own model, one prompt at a time, computes the loop's arithmetic
    assert e["same_arithmetic_same_outputs"] == 1.0 and 0 <= e["same_outputs_as_loop"] <= 1
    assert r["weights"] == "random" and "weights: random" in result.output and "rouge_sample" not in e
    b = e["beams"]  # beam search on the same prompts, timed beside greedy
    assert b["num_beams"] == 4 and b["seconds"] > 0 and b["vs_greedy"] > 0 and 0 < b["new_tokens"] <= 60 * 6
    assert "beam search, 4 beams (length_penalty 1.0), the same 60 prompts" in result.output and "rouge" not in b
    assert "speed-up over the tutorial's recipe" in result.output
    # every step's time and batch shape, and the epoch as a run spends it, warm-up included
    assert len(r["step_seconds"]) == len(r["step_shapes"]) == 3 and "epoch from the first step" in result.output
    assert r["warmup_seconds"] > 0 and r["epoch_minutes_all"] >= r["warmup_seconds"] / 60


def tiny_cfg():
    return load_config(None, {"model.name": str(TINY_MODEL), "quantization.bnb_4bit_compute_dtype": "float32"})


def test_a_folder_holding_a_model_is_timed_as_it_is(tmp_path):
    import shutil

    real = tmp_path / "trained"
    shutil.copytree(TINY_MODEL, real)
    before = {f.name: f.stat().st_mtime_ns for f in real.iterdir()}
    cfg = tiny_cfg()
    assert bench.random_model_dir(cfg, real) == real
    assert {f.name: f.stat().st_mtime_ns for f in real.iterdir()} == before  # nothing rewritten
    assert bench.weights_label(real) == str(real)

    fresh = bench.random_model_dir(cfg, tmp_path / "random")
    assert bench.weights_label(fresh) == "random"


def test_model_dir_of_another_shape_or_holding_no_model_is_refused(tmp_path):
    import shutil

    from samsum_qlora.errors import UserError

    other = tmp_path / "other"
    shutil.copytree(TINY_MODEL, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    with pytest.raises(UserError, match="holds a model of shape .*hidden_size.*not .*tiny-llama"):
        bench.random_model_dir(tiny_cfg(), other)

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty and holds no model"):
        bench.random_model_dir(tiny_cfg(), notes)
    assert [f.name for f in notes.iterdir()] == ["mine.txt"]  # nothing written, nothing removed
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_bench_command_shares_the_loop_with_worker_processes(tmp_path):
    """`bench --loop-workers 2` from the command line: the loop is timed alone on its first prompts,
    the rest decoded in two spawned processes, where our decoder still gives the loop's tokens."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    args = set_args(smoke_overrides(tmp_path, **{"eval.max_new_tokens": 4}))
    cmd = [sys.executable, "-m", "samsum_qlora", "bench", *args, "--steps", "1", "--warmup", "1", "--eval",
           "--loop-sample", str(bench.LOOP_TIMED_ALONE + 2), "--loop-workers", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    e = json.loads(out.read_text())["eval"]
    assert e["loop_sample"] == bench.LOOP_TIMED_ALONE + 2 and e["loop_timed"] == bench.LOOP_TIMED_ALONE
    assert e["same_arithmetic_same_outputs"] == 1.0  # the workers' prompts included


def test_compare_rouge_reports_each_path_and_their_paired_difference():
    refs = ["amanda baked cookies for jerry", "tom is late again", "they meet at noon", "she lost her keys"]
    loop = ["amanda baked cookies", "tom is late", "nothing at all here", "she lost keys"]
    same = bench.compare_rouge({"batched": list(loop), "loop": loop}, refs)
    assert same["batched"] == same["loop"]
    assert all(d == {"mean": 0.0, "low": 0.0, "high": 0.0} for d in same["difference"].values())

    better = bench.compare_rouge({"batched": refs, "loop": loop}, refs)  # the batched path copies the references
    assert better["batched"]["rouge1"] == 1.0 and better["loop"]["rouge1"] < 1.0
    d = better["difference"]["rouge1"]
    assert d["mean"] == pytest.approx(better["batched"]["rouge1"] - better["loop"]["rouge1"])
    assert 0 < d["low"] <= d["mean"] <= d["high"]
    lines = "\n".join(bench.eval_lines({**EVAL_FIGURES, "rouge_sample": better}))
    assert f"batched - loop, per row, 95% bootstrap interval: {100 * d['mean']:+.2f}" in lines


EVAL_FIGURES = {"examples": 4, "max_new_tokens": 8, "batched_seconds": 1.0, "batched_new_tokens": 20,
                "batched_tokens_per_s": 20.0, "ended_share": 1.0, "loop_tokens_per_s": 2.0,
                "loop_projected_seconds": 10.0, "ratio": 10.0, "loop_sample": 4, "loop_timed": 4,
                "same_outputs_as_loop": 0.5, "same_arithmetic_same_outputs": 1.0}  # fmt: skip


def test_eval_timing_searches_with_evals_beams_or_four_and_shows_both():
    assert bench.beam_decoding(load_config(None, {}))["num_beams"] == 4
    asked = {"eval.num_beams": 3, "eval.length_penalty": 0.8, "eval.no_repeat_ngram_size": 3}
    beams = bench.beam_decoding(load_config(None, asked))
    assert (beams["num_beams"], beams["length_penalty"], beams["no_repeat_ngram_size"]) == (3, 0.8, 0)
    scores = {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.4, "rougeLsum": 0.4}
    figures = {"num_beams": 3, "length_penalty": 0.8, "seconds": 1.5, "new_tokens": 30, "ended_share": 0.5,
               "vs_greedy": 1.5, "rouge": {"greedy": scores, "beams": {**scores, "rouge1": 0.52}}}  # fmt: skip
    assert bench.beam_lines(figures, EVAL_FIGURES) == [
        "beam search, 3 beams (length_penalty 0.8), the same 4 prompts: 1.50 s (30 tokens; 50% ended), "
        "1.50x greedy's 1.00 s",
        "ROUGE-1/2/L of all 4, greedy: 50.00 / 25.00 / 40.00",
        "ROUGE-1/2/L of all 4, beams: 52.00 / 25.00 / 40.00",
    ]


def test_the_first_epoch_counts_the_warm_up_as_it_ran():
    """A run's epoch = its first steps as they really went (compilation, new shapes) + the rest at pace."""
    f = bench.first_epoch(bench.Timed(real_tokens=6_000, padded_tokens=0, seconds=30.0), 1_000.0, 66_000)
    assert f == {"warmup_seconds": 30.0, "warmup_tokens": 6_000, "epoch_minutes_all": 1.5}  # (30 + 60) / 60


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_an_epoch_of_no_tokens_is_refused_before_timing(tmp_path, tokens):
    from test_cli import one_line_error, run_cli

    result = run_cli(["bench", *set_args(smoke_overrides(tmp_path)), "--epoch-tokens", tokens])
    one_line_error(result, f"--epoch-tokens must be at least 1 (the tokens in one epoch), got {tokens}")


def test_new_shapes_counts_the_timed_batches_of_a_shape_not_met_before():
    shapes = [(4, 32), (2, 64), (4, 32), (8, 16), (2, 64), (1, 128)]
    assert bench.new_shapes(shapes, 2, 6) == 2  # (8, 16) and (1, 128); (4, 32) and (2, 64) were met in warm-up
    assert bench.new_shapes(shapes, 0, 2) == 2 and bench.new_shapes(shapes, 4, 5) == 0


def test_eval_timing_sets_other_decodings_back_to_greedy(capsys):
    beams = load_config(None, {"eval.num_beams": 4, "eval.length_penalty": 0.8})
    greedy = bench.greedy_decoding(beams)
    assert greedy["num_beams"] == 1 and greedy["length_penalty"] == 1.0 and not greedy["do_sample"]
    assert "times greedy decoding" in capsys.readouterr().out
    bench.greedy_decoding(load_config(None, {}))
    assert capsys.readouterr().out == ""  # already greedy: nothing to say


def test_bench_warms_up_over_one_pass_of_the_splits_batches_by_default(tmp_path):
    """Without --warmup every batch shape is met (compiled, captured) before timing, and the
    output says so; the tutorial's recipe keeps 3 warm-up steps."""
    from click.testing import CliRunner

    from samsum_qlora import training
    from samsum_qlora.commands.cli import main

    out = tmp_path / "bench.json"
    args = set_args(smoke_overrides(tmp_path, **{"train.max_tokens_per_batch": 512}))
    result = CliRunner().invoke(main, ["bench", *args, "--steps", "2", "--split", "test", "--json", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    cfg = load_config(SMOKE_CONFIG, smoke_overrides(tmp_path, **{"train.max_tokens_per_batch": 512}))
    rows = bench.data.scorable(bench.data.load_rows(cfg.data.source, "test")).rows
    columns, _ = bench.modeling.chat_format(cfg).encode_rows(rows, progress=False)
    batches = len(training.training_set(cfg.train, columns))
    assert r["warmup"] == batches > 3 and r["warmup_is_one_pass"] is True
    assert len(r["step_shapes"]) == batches + 2 and r["timed_new_shapes"] == 0  # every shape met first
    assert f"after {batches} warm-up steps (one pass over the split's batches" in result.output


def test_one_step_is_not_written_as_steps():
    from samsum_qlora.commands.bench import render

    figures = {"tokens_per_s": 1.0, "padding_fraction": 0.0, "peak_memory_gib": None, "mfu": None}
    figures |= {"epoch_minutes": 1.0, "epoch_minutes_all": 1.0, "warmup_seconds": 1.0}
    r = {"device": "cpu", "model": "m", "weights": "random", **figures}
    assert "; 1 step timed after 1 warm-up step\n" in render(r | {"steps": 1, "warmup": 1})  # "1 warm-up steps"
    assert "; 20 steps timed after 3 warm-up steps\n" in render(r | {"steps": 20, "warmup": 3})
