from __future__ import annotations

import numpy as np
import torch

from kd_ddp.augment import augment, crop_flip_params, normalize


def _images(n: int = 6, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_params_are_a_pure_function_of_seed_view_index() -> None:
    idx = np.array([5, 17, 3, 999_999])
    a = crop_flip_params(0, 2, idx, 4, True)
    b = crop_flip_params(0, 2, idx[::-1].copy(), 4, True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y[::-1])  # order of the batch does not matter
    c = crop_flip_params(1, 2, idx, 4, True)
    d = crop_flip_params(0, 3, idx, 4, True)
    assert any((x != y).any() for x, y in zip(a, c)) and any((x != y).any() for x, y in zip(a, d))


def test_params_cover_the_range() -> None:
    dy, dx, fl = crop_flip_params(0, 0, np.arange(20_000), 4, True)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.45 < fl.mean() < 0.55


def test_crop_flip_matches_a_per_sample_reference() -> None:
    imgs = _images()
    idx = torch.arange(100, 106)
    out = augment(imgs, idx, seed=3, view=1, padding=2, flip=True)
    dy, dx, fl = crop_flip_params(3, 1, idx.numpy(), 2, True)
    padded = np.pad(imgs.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(len(idx)):
        ref = padded[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        if fl[i]:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), ref)


def test_same_view_twice_gives_the_same_pixels_in_any_batch_order() -> None:
    imgs = _images()
    idx = torch.arange(6)
    a = augment(imgs, idx, seed=0, view=4, padding=4, flip=True)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = augment(imgs[perm], idx[perm], seed=0, view=4, padding=4, flip=True)
    assert torch.equal(a[perm], b)


def test_no_padding_no_flip_is_identity() -> None:
    imgs = _images()
    assert torch.equal(augment(imgs, torch.arange(6), seed=0, view=0, padding=0, flip=False), imgs)


def test_normalize_gives_channels_last_floats() -> None:
    imgs = _images()
    x = normalize(imgs, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25]))
    assert x.shape == (6, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    expected = (imgs.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
