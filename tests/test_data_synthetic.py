"""The synthetic federation: deterministic, split as declared, sites clearly different."""

from __future__ import annotations

import pytest
import torch

from fedfew_med.config import ConfigError, NamedConfig
from fedfew_med.data import SyntheticOptions, build_sites, make_synthetic_federation


def test_deterministic_and_split_sizes():
    o = SyntheticOptions(num_sites=4, image_size=16, train_min=30, train_max=50, test_per_site=10, seed=2)
    a, b = make_synthetic_federation(o), make_synthetic_federation(o)
    for sa, sb in zip(a, b, strict=True):
        assert sa.name == sb.name
        for split in ("train", "val", "test"):
            assert torch.equal(sa.splits[split].images, sb.splits[split].images)  # type: ignore[attr-defined]
        assert 30 <= sa.size("train") <= 50 and sa.size("test") == 10
        assert sa.size("val") == round(0.2 * sa.size("train"))
    assert [s.metadata["protocol"] for s in a] == ["bright", "dark", "noisy", "bright"]


def test_protocols_differ_in_lesion_polarity():
    sites = make_synthetic_federation(SyntheticOptions(num_sites=2, image_size=32, task="segmentation", seed=0))
    for site, sign in zip(sites, (+1, -1), strict=True):
        ds = site.splits["train"]
        mask = ds.labels.bool()  # type: ignore[attr-defined]
        imgs = ds.images  # type: ignore[attr-defined]
        inside = imgs[mask].mean()
        background = imgs[~mask].median()
        assert sign * float(inside - background) > 0.1


def test_build_sites_validates_options():
    with pytest.raises(ConfigError, match=r"f.toml: \[data.params\].num_sites must be an integer >= 1"):
        build_sites(NamedConfig(name="synthetic", params={"num_sites": 0}), source="f.toml")
    with pytest.raises(ConfigError, match=r"\[data\].name must be one of"):
        build_sites(NamedConfig(name="mnist"), source="f.toml")


@pytest.mark.parametrize(("task", "batch_size", "shuffled"), [("classification", 7, True), ("segmentation", 4, True), ("classification", 6, True), ("classification", 64, False)])
def test_batched_fetch_equals_per_record_collation(task, batch_size, shuffled):
    """SiteData.loader fetches in-memory batches with one index; the batches equal PyTorch's per-record default."""
    from torch.utils.data import DataLoader

    site = make_synthetic_federation(SyntheticOptions(num_sites=1, image_size=16, train_min=30, train_max=30, task=task, seed=3))[0]
    ds = site.splits["train"]

    class PerRecord(torch.utils.data.Dataset):  # the same records without __getitems__
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    def gen():
        return torch.Generator().manual_seed(11) if shuffled else None

    g_ours, g_ref = gen(), gen()
    loader = site.loader("train", batch_size=batch_size, generator=g_ours)
    reference_loader = DataLoader(PerRecord(), batch_size=batch_size, shuffle=shuffled, generator=g_ref)
    assert len(loader) == len(reference_loader) == -(-len(ds) // batch_size)
    for _ in range(3):  # several epochs: the generator must advance exactly as the DataLoader advances it
        ours, reference = list(loader), list(reference_loader)
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])
    if shuffled:
        assert torch.equal(g_ours.get_state(), g_ref.get_state())
