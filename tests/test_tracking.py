"""W&B environment rules (pure: a dict stands in for os.environ) and one real offline run."""

import importlib.util

import pytest
from wandb_records import history, run_files

from samsum_qlora import tracking
from samsum_qlora.errors import UserError


def test_without_wandb_in_report_to_nothing_changes(tmp_path):
    env = {"HOME": str(tmp_path)}
    assert tracking.prepare_wandb(["none"], tmp_path / "run", env=env) == ["none"]
    assert env == {"HOME": str(tmp_path)}
    assert not (tmp_path / "run").exists()


def test_no_credentials_means_offline_said_in_one_line(tmp_path, capsys):
    env = {"HOME": str(tmp_path)}  # no WANDB_API_KEY, no ~/.netrc
    out = tmp_path / "run"
    assert tracking.prepare_wandb(["wandb"], out, env=env) == ["wandb"]
    notice = capsys.readouterr().out.strip()
    assert len(notice.splitlines()) == 1 and "offline" in notice and "wandb sync" in notice
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    assert env == {
        "HOME": str(tmp_path),
        "WANDB_PROJECT": "samsum-qlora",
        "WANDB_DIR": str(out),
        "WANDB_MODE": "offline",
        "WANDB_RUN_ID": run_id,
        "WANDB_RESUME": "allow",
    }


def test_a_rerun_into_the_same_dir_continues_the_same_run(tmp_path):
    # What a resume or a managed job's recovery does: a fresh process, the same output dir.
    first, again, other = ({"HOME": str(tmp_path)} for _ in range(3))
    tracking.prepare_wandb(["wandb"], tmp_path / "a", env=first)
    tracking.prepare_wandb(["wandb"], tmp_path / "a", env=again)
    tracking.prepare_wandb(["wandb"], tmp_path / "b", env=other)
    assert first["WANDB_RUN_ID"] == again["WANDB_RUN_ID"] != other["WANDB_RUN_ID"]


def test_explicit_settings_win_and_an_explicit_run_id_is_remembered(tmp_path, capsys):
    env = {
        "HOME": str(tmp_path),
        "WANDB_API_KEY": "k" * 40,
        "WANDB_PROJECT": "mine",
        "WANDB_DIR": "/elsewhere",
        "WANDB_RUN_ID": "chosen1",
    }
    tracking.prepare_wandb(["wandb", "tensorboard"], tmp_path / "run", env=env)
    assert "WANDB_MODE" not in env and capsys.readouterr().out == ""  # a key means online
    assert (env["WANDB_PROJECT"], env["WANDB_DIR"], env["WANDB_RUN_ID"]) == ("mine", "/elsewhere", "chosen1")
    later = {"HOME": str(tmp_path), "WANDB_MODE": "online"}
    tracking.prepare_wandb(["wandb"], tmp_path / "run", env=later)
    assert (later["WANDB_RUN_ID"], later["WANDB_MODE"]) == ("chosen1", "online")


def test_wandb_login_in_netrc_counts_as_credentials(tmp_path):
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    env = {"HOME": str(tmp_path)}
    tracking.prepare_wandb(["wandb"], tmp_path / "run", env=env)
    assert "WANDB_MODE" not in env
    assert not tracking.has_credentials({"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.com"})


def test_disabled_drops_wandb_and_other_ranks_only_read(tmp_path):
    assert tracking.prepare_wandb(["wandb"], tmp_path / "a", env={"WANDB_MODE": "disabled"}) == ["none"]
    assert tracking.prepare_wandb(["wandb", "tensorboard"], tmp_path / "a", env={"WANDB_MODE": "disabled"}) == [
        "tensorboard"
    ]
    rank1 = {"HOME": str(tmp_path)}
    assert tracking.prepare_wandb(["wandb"], tmp_path / "b", is_main=False, env=rank1) == ["wandb"]
    assert rank1 == {"HOME": str(tmp_path)} and not (tmp_path / "b").exists()


def test_wandb_not_installed_is_a_user_error_naming_the_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'samsum-qlora\[cloud\]'"):
        tracking.prepare_wandb(["wandb"], tmp_path / "run", env={})
    assert tracking.log_eval_to_wandb({"rouge1": 0.5}, [], tmp_path, {}) is False


def test_eval_logs_nothing_without_a_training_run(tmp_path):
    pytest.importorskip("wandb")
    assert tracking.log_eval_to_wandb({"rouge1": 0.5}, [], tmp_path, {"HOME": str(tmp_path)}) is False


def test_eval_scores_and_samples_join_the_training_run_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    key, token = "fakewandbkey" + "0" * 28, "hf_faketoken_never_written"
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key, but no network here
    monkeypatch.setenv("HF_TOKEN", token)
    train_dir = tmp_path / "run"
    tracking.prepare_wandb(["wandb"], train_dir)  # what `train` does; the id is now on disk
    run_id = (train_dir / "wandb_run_id.txt").read_text().strip()
    monkeypatch.delenv("WANDB_RUN_ID")  # `eval` is another process: only the file remains

    metrics = {
        "rouge1": 0.41,
        "rouge2": 0.17,
        "rougeL": 0.33,
        "n_examples": 25,
        "model": "m",
        "split": "test",
        "config": {},
    }
    predictions = [{"id": str(i), "reference": f"ref {i}", "prediction": f"pred {i}"} for i in range(25)]
    try:
        assert tracking.log_eval_to_wandb(metrics, predictions, train_dir) is True
    finally:
        wandb.teardown()

    (run_file,) = run_files(train_dir)
    assert run_file.name == f"run-{run_id}.wandb"  # the training run's id, not a new run
    (logged,) = history(run_file)
    # under the split's name: eval/<metric> is the validation curve a training run logs
    assert {k: logged[k] for k in ("test/rouge1", "test/rouge2", "test/rougeL", "test/n_examples")} == {
        "test/rouge1": 0.41,
        "test/rouge2": 0.17,
        "test/rougeL": 0.33,
        "test/n_examples": 25,
    }
    assert logged["test/samples/_type"] == "table-file" and logged["test/samples/nrows"] == 20
    for path in train_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert key.encode() not in content and token.encode() not in content, f"secret written to {path}"
