"""robomimic HDF5 reader, zarr replay-buffer cache, sequence windows and the Normalizer.

All files here are synthetic robomimic-layout HDF5 written by the test (no simulator)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from robot_fixtures import LOWDIM, write_synthetic_robomimic

from jumpflow.datasets.replay_buffer import cache_path_for, load_replay_buffer
from jumpflow.datasets.robomimic import DatasetError, RobomimicFile
from jumpflow.datasets.sequence import RobomimicSequenceDataset, create_indices
from jumpflow.normalizer import Normalizer


@pytest.fixture
def synth(tmp_path):
    p = tmp_path / "synth.hdf5"
    write_synthetic_robomimic(p)
    return p


def _cache_entries(d):
    return sorted(x.name for x in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------------------- reader
def test_reader_keys_masks_and_values(synth):
    with RobomimicFile(synth) as rf:
        assert rf.env_meta["env_name"] == "Lift"
        assert rf.demo_names() == ["demo_0", "demo_1", "demo_2"]
        assert rf.demo_names("train") == ["demo_0", "demo_1"]
        assert rf.demo_names("valid") == ["demo_2"]
        assert "robot0_eef_pos" in rf.obs_keys()
        d = rf.read_demo("demo_1", ["robot0_eef_pos", "object"])
        assert d["action"].shape == (7, 7) and d["action"].dtype == np.float32
        np.testing.assert_array_equal(d["action"][:, 0], 100 + np.arange(7))
        assert d["obs"]["object"].shape == (7, 10)
        with pytest.raises(DatasetError, match="filter key 'nope' not found.*train"):
            rf.demo_names("nope")


def test_demo_order_is_numeric(tmp_path):
    p = tmp_path / "many.hdf5"
    write_synthetic_robomimic(p, lengths=[3] * 12)
    with RobomimicFile(p) as rf:
        assert rf.demo_names()[:3] == ["demo_0", "demo_1", "demo_2"] and rf.demo_names()[-1] == "demo_11"


# ---------------------------------------------------------------------------- bad input
def _make_bad(kind, tmp_path):
    import h5py

    p = tmp_path / f"{kind}.hdf5"
    if kind == "missing":
        return p, "does not exist"
    if kind == "not_hdf5":
        p.write_text("this is a text file, not a dataset\n")
        return p, "not an HDF5 file"
    if kind == "no_data":
        with h5py.File(p, "w") as f:
            f.create_group("something_else")
        return p, "no 'data' group"
    if kind == "nan":
        write_synthetic_robomimic(p, nan_in="actions")
        return p, r"data/demo_2/actions contains NaN"
    if kind == "truncated":
        full = tmp_path / "full.hdf5"
        write_synthetic_robomimic(full, lengths=(50, 60, 70), image_size=16)
        raw = full.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return p, "truncated or corrupt"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "not_hdf5", "no_data", "nan", "truncated"])
def test_bad_input_one_clear_error_and_no_cache(kind, tmp_path):
    path, msg = _make_bad(kind, tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=msg) as ei:
        load_replay_buffer(path, LOWDIM, cache_dir=cache)
    assert str(path) in str(ei.value)                       # names the file
    assert _cache_entries(cache) == []                      # no half-written cache
    with pytest.raises(DatasetError):
        RobomimicSequenceDataset(path, LOWDIM, cache_dir=cache)
    assert _cache_entries(cache) == []


def test_missing_obs_key_lists_existing_keys(synth, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as ei:
        load_replay_buffer(synth, ["robot0_eef_pos", "agentview_image"], cache_dir=cache)
    msg = str(ei.value)
    assert str(synth) in msg and "agentview_image" in msg
    for k in LOWDIM:
        assert k in msg                                     # lists the keys that exist
    assert _cache_entries(cache) == []


def test_interrupted_conversion_leaves_no_cache(synth, tmp_path, monkeypatch):
    import jumpflow.datasets.replay_buffer as rb

    calls = {"n": 0}
    orig = rb.RobomimicFile.read_demo

    def flaky(self, demo, keys, check_finite=True):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(self, demo, keys, check_finite)

    monkeypatch.setattr(rb.RobomimicFile, "read_demo", flaky)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_replay_buffer(synth, LOWDIM, cache_dir=cache)
    assert _cache_entries(cache) == []


# ---------------------------------------------------------------------------- replay buffer
def test_replay_buffer_matches_hdf5_and_is_cached_by_content(synth, tmp_path):
    cache = tmp_path / "cache"
    buf = load_replay_buffer(synth, LOWDIM, cache_dir=cache)
    assert buf.episode_ends.tolist() == [5, 12, 16]
    assert buf.data["action"].shape == (16, 7) and buf.data["action"].dtype == np.float32
    with RobomimicFile(synth) as rf:
        for i, d in enumerate(rf.demo_names()):
            ep = rf.read_demo(d, LOWDIM)
            sl = buf.episode_slice(i)
            np.testing.assert_array_equal(buf.data["action"][sl], ep["action"])
            for k in LOWDIM:
                np.testing.assert_array_equal(buf.data[k][sl], ep["obs"][k])
    first = buf.path
    stamp = first.stat().st_mtime_ns
    again = load_replay_buffer(synth, LOWDIM, cache_dir=cache)
    assert again.path == first and first.stat().st_mtime_ns == stamp     # reused, not rebuilt
    # other keys -> other cache; other content -> other cache
    assert cache_path_for(synth, LOWDIM[:2], cache_dir=cache) != first
    write_synthetic_robomimic(synth, lengths=(5, 7, 5))
    assert load_replay_buffer(synth, LOWDIM, cache_dir=cache).path != first
    # filter key honoured
    tr = load_replay_buffer(synth, LOWDIM, filter_key="train", cache_dir=cache)
    assert tr.n_episodes == 2 and tr.demo_names == ["demo_0", "demo_1"]


def test_lazy_zarr_buffer_equals_in_memory(synth, tmp_path):
    a = load_replay_buffer(synth, LOWDIM, cache_dir=tmp_path / "c")
    b = load_replay_buffer(synth, LOWDIM, cache_dir=tmp_path / "c", in_memory=False)
    np.testing.assert_array_equal(np.asarray(b.data["object"][3:9]), a.data["object"][3:9])


# ---------------------------------------------------------------------------- sequence windows
def test_create_indices_counts_and_padding():
    ends = np.array([5, 12])
    idx = create_indices(ends, horizon=4, pad_before=1, pad_after=2)
    # per episode: L - horizon + pad_before + pad_after + 1 windows
    assert len(idx) == (5 - 4 + 3 + 1) + (7 - 4 + 3 + 1)
    b0, b1, s0, s1 = idx[0]
    assert (b0, s0) == (0, 1) and s1 - s0 == b1 - b0


def test_sequence_windows_edge_padding(synth, tmp_path):
    ds = RobomimicSequenceDataset(synth, LOWDIM, horizon=4, n_obs_steps=2, n_action_steps=3,
                                  cache_dir=tmp_path / "c")
    lengths = [5, 7, 4]
    assert len(ds) == sum(n - 4 + 1 + 2 + 1 for n in lengths)
    first = ds[0]
    assert first["action"].shape == (4, 7) and first["obs"]["robot0_eef_pos"].shape == (2, 3)
    # window starts one step before the episode: first step repeated
    np.testing.assert_array_equal(first["action"][:, 0].numpy(), [0, 0, 1, 2])
    np.testing.assert_array_equal(first["obs"]["robot0_eef_pos"][:, 1].numpy(), [0, 0])
    # last window of episode 0 runs past the end: last step repeated
    last = ds[(5 - 4 + 1 + 2 + 1) - 1]
    np.testing.assert_array_equal(last["action"][:, 0].numpy(), [3, 4, 4, 4])
    np.testing.assert_array_equal(last["obs"]["robot0_eef_pos"][:, 1].numpy(), [3, 4])
    # windows never mix episodes
    for i in range(len(ds)):
        a = ds[i]["action"][:, 0].numpy()
        assert len(np.unique(a // 100)) == 1


def test_image_windows_channel_first_and_validation_split(tmp_path):
    p = tmp_path / "img.hdf5"
    write_synthetic_robomimic(p, lengths=(6, 6, 6, 6), image_size=8)
    ds = RobomimicSequenceDataset(p, ["robot0_eef_pos", "agentview_image"], horizon=4, n_obs_steps=2,
                                  n_action_steps=2, cache_dir=tmp_path / "c", val_ratio=0.25)
    item = ds[3]
    assert item["obs"]["agentview_image"].shape == (2, 3, 8, 8)
    assert item["obs"]["agentview_image"].dtype == torch.uint8
    assert ds.shape_meta()["obs"]["agentview_image"] == (3, 8, 8)
    val = ds.get_validation_dataset()
    assert len(val) > 0 and len(ds) + len(val) == 4 * (6 - 4 + 1 + 1 + 1)
    norm = ds.get_normalizer()
    x = norm.normalize("agentview_image", item["obs"]["agentview_image"])
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0


def test_conversion_and_epoch_fast(tmp_path):
    """200 demos x 60 steps (Lift-sized low-dim data): conversion + one epoch of windows in seconds."""
    p = tmp_path / "big.hdf5"
    write_synthetic_robomimic(p, lengths=[60] * 200, masks=False)
    t0 = time.perf_counter()
    ds = RobomimicSequenceDataset(p, LOWDIM, horizon=16, n_obs_steps=2, n_action_steps=8, cache_dir=tmp_path / "c")
    t_conv = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    n = sum(b["action"].shape[0] for b in loader)
    t_epoch = time.perf_counter() - t0
    assert n == len(ds)
    print(f"conversion {t_conv:.2f} s, epoch of {n} windows {t_epoch:.2f} s")
    assert t_conv + t_epoch < 30.0


# ---------------------------------------------------------------------------- normalizer
def test_normalizer_limits_roundtrip_and_constant_dims():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 5, size=(1000, 4))
    x[:, 2] = 0.7                                             # constant dimension
    n = Normalizer().fit_key("action", x, "limits")
    y = n.normalize("action", x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y[:, [0, 1, 3]].min(0), -1.0, atol=1e-12)
    np.testing.assert_allclose(y[:, [0, 1, 3]].max(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(y[:, 2], 0.0, atol=1e-12)
    np.testing.assert_allclose(n.unnormalize("action", y), x, rtol=1e-14, atol=1e-14)
    xt = torch.as_tensor(x, dtype=torch.float32)
    back = n.unnormalize("action", n.normalize("action", xt))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, xt, rtol=1e-6, atol=1e-6)


def test_normalizer_gaussian_image_and_state_dict(tmp_path):
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(1)
    data = {"action": rng.normal(size=(500, 7)), "robot0_eef_pos": rng.normal(2.0, 3.0, size=(500, 3)),
            "agentview_image": None}
    n = Normalizer.fit(data, modes={"robot0_eef_pos": "gaussian"})
    z = n.normalize("robot0_eef_pos", data["robot0_eef_pos"])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-12)
    img = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    torch.testing.assert_close(n.normalize("agentview_image", img), img.float() / 255.0)
    # saved with a model into safetensors, loaded into a fresh Normalizer inside a fresh model
    model = torch.nn.Module()
    model.normalizer = n
    model.lin = torch.nn.Linear(2, 2)
    save_file(model.state_dict(), tmp_path / "ckpt.safetensors")
    fresh = torch.nn.Module()
    fresh.normalizer = Normalizer()
    fresh.lin = torch.nn.Linear(2, 2)
    fresh.load_state_dict(load_file(tmp_path / "ckpt.safetensors"))
    assert sorted(fresh.normalizer.keys()) == sorted(n.keys())
    a = torch.randn(5, 7)
    torch.testing.assert_close(fresh.normalizer.normalize("action", a), n.normalize("action", a))
    with pytest.raises(KeyError, match="has no key 'nope'"):
        n.normalize("nope", a)
