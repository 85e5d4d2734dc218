"""`teco-ssm run --quick`: the whole chain in a temporary workdir, every artifact checked, and a rerun that skips
every finished stage."""
import json

import numpy as np
import pytest

from teco_ssm import cli, data, run


QUICK = run.world_model_config("convt3", run.SIZES["quick"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert cli.main(["run", "--quick", "--workdir", str(root)]) == 0
    return root


def test_every_stage_leaves_its_artifacts(workdir):
    stages = {p.stem for p in (workdir / "stages").glob("*.json")}
    assert {"data", "tokenizer", "encode", "train-convt3", "sample-convt3-trained", "sample-convt3-unconditioned",
            "sample-convt3-untrained", "eval-convt3-trained", "eval-convt3-repeat_last"} <= stages

    assert len(list((workdir / "data" / "train").rglob("*.npz"))) == 24
    assert (workdir / "data" / "contact_sheet.png").stat().st_size > 0
    assert (workdir / "tokenizer" / "config.json").exists() and any((workdir / "tokenizer" / "checkpoints").iterdir())
    encoded = data.inspect_dataset(workdir / "encoded" / "mazelab", "test")
    assert encoded.kind == "codes" and encoded.num_videos == run.SIZES["quick"].num_test
    valid = data.inspect_dataset(workdir / "encoded" / "mazelab", "valid")  # generated and encoded, never scored
    assert valid.kind == "codes" and valid.num_videos == run.SIZES["quick"].num_valid > 0
    assert any((workdir / "models" / "convt3" / "checkpoints").iterdir())

    with np.load(sorted((workdir / "samples" / "convt3" / "trained").glob("*.npz"))[0]) as sample:
        assert sample["real"].dtype == np.uint8 and sample["real"].shape == sample["fake"].shape
        context, horizon = QUICK.sampling.action_conditioned.context, QUICK.sampling.action_conditioned.horizon
        assert sample["real"].shape[1] == context + horizon and int(sample["context"]) == context
        assert str(sample["split"]) == "test"
    # Held-out losses during training read the validation split, never the test split the report scores.
    trained_config = json.loads((workdir / "models" / "convt3" / "config.json").read_text())
    assert trained_config["dataset"]["eval_split"] == "valid"

    summary = json.loads((workdir / "report" / "summary.json").read_text())
    trained = summary["backbones"]["convt3"]["trained"]
    assert 5.0 < trained["psnr"]["mean"] < 100.0 and 0.0 < trained["ssim"]["mean"] <= 1.0
    assert summary["backbones"]["convt3"]["train"]["step"] == QUICK.steps
    for label in ("trained", "unconditioned", "untrained", "repeat_last"):
        report = workdir / "report" / "convt3" / label
        assert json.loads((report / "metrics.json").read_text())["num_videos"] == QUICK.sampling.num_videos
        assert (report / "curves" / "psnr.png").exists() and list((report / "videos").glob("*.gif"))
    text = (workdir / "report" / "report.md").read_text()
    assert "| convt3 |" in text and "convt3/trained/report.md" in text
    context, horizon = QUICK.sampling.action_conditioned.context, QUICK.sampling.action_conditioned.horizon
    assert f"({context} context frames, then {horizon} generated with actions)" in text


def test_sample_reads_the_test_split_of_a_run_trained_model(workdir, tmp_path):
    """The run's model holds out the validation split for its losses; `teco-ssm sample` still samples the test
    split unless told otherwise."""
    model = workdir / "models" / "convt3"
    for args, split in (([], "test"), (["--split", "valid"], "valid")):
        out = tmp_path / split
        assert cli.main(["sample", "--workdir", str(model), "--out", str(out), "--num_videos", "4",
                         "--batch_size", "4", *args]) == 0
        with np.load(sorted(out.glob("*.npz"))[0]) as sample:
            assert str(sample["split"]) == split
            # MazeLab's poses travel through encoding: the revisit masks of the sampled videos.
            seen, last, ctx = sample["seen"], sample["at_last_context_pose"], int(sample["context"])
            assert seen.dtype == last.dtype == np.bool_ and last[:, ctx - 1].all() and not (last & ~seen).any()


def test_rerun_skips_finished_stages(workdir, capsys):
    assert cli.main(["run", "--quick", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete") == len(list((workdir / "stages").glob("*.json")))
    assert "] ..." not in out


def without_times(value):
    """A summary without the figures that measure this process's own time (stage seconds)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in ("seconds", "stage_seconds")}
    return value


def test_a_run_stopped_after_any_stage_finished_but_before_it_was_recorded_reports_the_same(workdir):
    """Every stage's work done but none recorded (a run stopped at each stage boundary): the rerun finds each
    stage's output and reports the same figures, training's (final loss, steps/s, parameters, held-out loss) and
    sampling's speed included, since they are read from the workdir."""
    before = json.loads((workdir / "report" / "summary.json").read_text())
    for record in (workdir / "stages").glob("*.json"):  # in place: the workdir's files record their own paths
        record.unlink()
    assert cli.main(["run", "--quick", "--workdir", str(workdir)]) == 0
    after = json.loads((workdir / "report" / "summary.json").read_text())
    train = after["backbones"]["convt3"]["train"]
    assert {"loss", "steps_per_second", "num_params", "eval_loss"} <= set(train)
    assert after["backbones"]["convt3"]["sampling"]["frames_per_second"] > 0
    assert without_times(after) == without_times(before)


def test_a_workdir_refuses_another_size_or_budget(workdir):
    """Its finished stages were made for one size and step budget; another is an error before any work."""
    before = sorted(p.name for p in (workdir / "stages").iterdir())
    with pytest.raises(ValueError, match=rf"run.json: .*train_steps {QUICK.steps} there, 7 asked"):
        cli.main(["run", "--quick", "--steps", "7", "--workdir", str(workdir)])
    with pytest.raises(ValueError, match="size 'quick' there, 'default' asked"):
        cli.main(["run", "--workdir", str(workdir)])
    assert sorted(p.name for p in (workdir / "stages").iterdir()) == before


def test_unknown_backbone_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="valid backbones: transformer, s5, convs5, convt3"):
        cli.main(["run", "--quick", "--backbone", "lstm", "--workdir", str(tmp_path)])
    assert not (tmp_path / "stages").exists()


def test_each_stage_as_its_own_subcommand(workdir, tmp_path):
    """The commands the README gives for TECO's data, here on the run's MazeLab artifacts."""
    tokenizer, encoded = workdir / "tokenizer", workdir / "encoded" / "mazelab"
    assert cli.main(["data", "--out", str(tmp_path / "maze"), "--num_train", "2", "--num_test", "2",
                     "--length", "20", "--workers", "1", "--files_per_shard", "1", "--no_compress",
                     "--sheet_rows", "1"]) == 0
    assert len(list((tmp_path / "maze" / "train").iterdir())) == 2  # one file per shard folder
    with np.load(next((tmp_path / "maze" / "train").rglob("*.npz"))) as trajectory:
        assert trajectory.zip.getinfo("video.npy").compress_type == 0  # stored, not deflated
    assert cli.main(["tokenizer", "--config", "configs/vqgan_mazelab.py:quick", "--data", str(tmp_path / "maze"),
                     "--workdir", str(tmp_path / "tok"), "--set", "num_steps=2", "--set", "checkpoint_every=2",
                     "--set", "data.eval_frames=8", "--set", "optim.warmup_steps=1"]) == 0
    assert cli.main(["encode", "--tokenizer", str(tokenizer), "--data", str(tmp_path / "maze"),
                     "--out", str(tmp_path / "codes"), "--name", "maze", "--splits", "test", "--chunk_size", "7",
                     "--examples_per_shard", "1"]) == 0
    assert data.inspect_dataset(tmp_path / "codes" / "maze", "test").kind == "codes"
    assert len(list((tmp_path / "codes" / "maze").rglob("*-test.tfrecord-*"))) == 2  # a shard per video
    with pytest.raises(ValueError, match="train"):
        data.inspect_dataset(tmp_path / "codes" / "maze", "train")  # only the asked split was encoded

    model = workdir / "models" / "convt3"
    assert cli.main(["sample", "--workdir", str(model), "--out", str(tmp_path / "samples"),
                     "--protocol", "16,8,actions", "--num_videos", "4", "--batch_size", "4"]) == 0
    with np.load(sorted((tmp_path / "samples").glob("*.npz"))[0]) as sample:
        assert sample["fake"].shape[:2] == (4, 24) and int(sample["context"]) == 16
    with pytest.raises(SystemExit, match="16,8,action"):
        cli.main(["sample", "--workdir", str(model), "--out", str(tmp_path / "x"), "--protocol", "16,8,action"])
    assert cli.main(["eval", str(tmp_path / "samples"), "--report", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["generated_frames"] == 8
    assert cli.main(["eval", str(tmp_path / "samples"), "--num_gifs", "1", "--group_size", "2",
                     "--fvd_generated_only", "--context", "3"]) == 0  # report under samples/report
    numbers = json.loads((tmp_path / "samples" / "report" / "metrics.json").read_text())
    assert numbers["psnr"]["group_sizes"] == [2, 2] and numbers["generated_frames"] == 8  # files record context
    assert len(list((tmp_path / "samples" / "report" / "videos").glob("*.gif"))) == 1

    config = json.loads((model / "config.json").read_text())
    overrides = [f"model.{k}={config['model'][k]!r}" for k in ("vqgan_codes", "vqgan_embedding_dim")]
    assert cli.main(["train", "--config", "configs/mazelab.py:convt3", "--data", str(encoded),
                     "--tokenizer", str(tokenizer), "--workdir", str(tmp_path / "train"), "--set", "steps=2",
                     "--set", "optim.convt3.warmup_steps=1", "--set", "batch_size=4", "--set", "seq_len=8",
                     "--set", "checkpoint_every=1", *[a for o in overrides for a in ("--set", o)]]) == 0
    assert sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir()) == ["1", "2"]
    # --step restores an older checkpoint: other weights, so other rollouts from the same seed.
    fakes = {}
    for step in (1, 2, None):
        out = tmp_path / f"samples_step_{step}"
        assert cli.main(["sample", "--workdir", str(tmp_path / "train"), "--out", str(out), "--protocol", "4,4",
                         "--num_videos", "4", "--batch_size", "4", *(["--step", str(step)] if step else [])]) == 0
        with np.load(next(out.glob("batch_*.npz"))) as sample:
            fakes[step] = sample["fake"][:, 4:]
    assert (fakes[2] == fakes[None]).all() and (fakes[1] != fakes[2]).any()
    out = tmp_path / "samples_greedy"
    assert cli.main(["sample", "--workdir", str(tmp_path / "train"), "--out", str(out), "--protocol", "4,4",
                     "--num_videos", "4", "--batch_size", "4", "--set", "sampling.temperature=0"]) == 0
    with np.load(next(out.glob("batch_*.npz"))) as sample:
        assert float(sample["temperature"]) == 0.0 and (sample["fake"][:, 4:] != fakes[2]).any()
    with pytest.raises(SystemExit, match="sample overrides only the sampler's settings"):
        cli.main(["sample", "--workdir", str(tmp_path / "train"), "--out", str(out), "--set", "model.latent_dim=3"])


def test_all_backbones_with_equal_budgets_in_one_table(workdir, capsys):
    """`run --backbone all` on the same workdir: the shared stages and ConvT3 are reused, the other three backbones
    are trained for the same steps, and one table compares the four."""
    assert cli.main(["run", "--quick", "--backbone", "all", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "report" / "summary.json").read_text())
    assert list(summary["backbones"]) == ["transformer", "s5", "convs5", "convt3"]
    steps = QUICK.steps
    for name, result in summary["backbones"].items():
        assert result["train"]["step"] == steps, name
        assert result["train"]["num_params"] > 0 and result["train"]["steps_per_second"] > 0
        assert result["sampling"]["frames_per_second"] > 0
        assert 5.0 < result["trained"]["psnr"]["mean"] < 100.0 and 0.0 < result["trained"]["ssim"]["mean"] <= 1.0
    table = (workdir / "report" / "report.md").read_text()
    for name in summary["backbones"]:
        assert f"| {name} |" in table
    header = next(line for line in table.splitlines() if line.startswith("| backbone |"))
    for column in ("PSNR", "SSIM", "train steps/s", "sampling frames/s", "params"):
        assert f"| {column} |" in header
    out = capsys.readouterr().out
    assert "[train-convt3] already complete" in out and "[train-s5] done" in out
