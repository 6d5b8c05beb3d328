from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ddp import augment as augment_module
from kd_ddp.augment import StudentInput, augment, chunk_size, crop_flip_params, normalize

pytestmark = pytest.mark.fast  # in-process unit tests (tests/conftest.py)


def _images(n: int = 6, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_params_are_a_pure_function_of_seed_view_index() -> None:
    idx = torch.tensor([5, 17, 3, 999_999])
    a = crop_flip_params(0, 2, idx, 4, True)
    b = crop_flip_params(0, 2, idx.flip(0), 4, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y.flip(0))  # order of the batch does not matter
    c = crop_flip_params(1, 2, idx, 4, True)
    d = crop_flip_params(0, 3, idx, 4, True)
    assert any((x != y).any() for x, y in zip(a, c)) and any((x != y).any() for x, y in zip(a, d))


def test_params_cover_the_range() -> None:
    dy, dx, fl = crop_flip_params(0, 0, torch.arange(20_000), 4, True)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.45 < fl.float().mean() < 0.55


_U64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer on Python ints (exact, unbounded; masked to 64 bits)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _reference_params(seed: int, view: int, index: int, padding: int) -> tuple[int, int, bool]:
    """The augmentation policy `crop-pad-zero+hflip/splitmix64-v1` (the cache key names it),
    written independently of kd_ddp.augment's int64 tensor arithmetic."""
    golden = 0x9E3779B97F4A7C15
    key = _mix((seed * golden + view) & _U64)
    h = _mix(((index * golden) & _U64) ^ key)
    span = 2 * padding + 1
    return h % span, (h >> 20) % span, bool((h >> 40) & 1)


def test_tensor_hash_equals_the_unsigned_64_bit_reference() -> None:
    """torch has no unsigned 64-bit shifts or remainders: the int64 emulation must give the
    exact words, for indices and seeds whose words have the top bit set too."""
    idx = [0, 1, 2, 17, 49_999, 2**31 + 3, 2**40 + 7, 2**62 - 1]
    for seed, view, padding in ((0, 0, 4), (1, 7, 4), (2**31 + 5, 19, 2), (12345, 3, 7)):
        dy, dx, fl = crop_flip_params(seed, view, torch.tensor(idx), padding, True)
        got = list(zip(dy.tolist(), dx.tolist(), fl.tolist()))
        assert got == [_reference_params(seed, view, i, padding) for i in idx]


def test_crop_flip_matches_a_per_sample_reference() -> None:
    imgs = _images()
    idx = torch.arange(100, 106)
    out = augment(imgs, idx, seed=3, view=1, padding=2, flip=True)
    dy, dx, fl = (t.numpy() for t in crop_flip_params(3, 1, idx, 2, True))
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


def _bits(x: torch.Tensor) -> torch.Tensor:
    """A float tensor's bytes in a fixed (contiguous) layout: torch.equal on them is bitwise."""
    return x.contiguous().view(torch.int32)


def _student_input(seed: int, padding: int, flip: bool, channels_last: bool) -> StudentInput:
    return StudentInput(seed, padding, flip, torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26]),
                        channels_last)


@pytest.mark.parametrize(("seed", "view", "padding", "flip", "channels_last"), [
    (0, 0, 4, True, True), (7, 3, 4, False, True), (2**31 + 5, 19, 2, True, False), (1, 1, 0, True, True)])
def test_a_chunk_of_batches_is_bitwise_its_batches(seed: int, view: int, padding: int, flip: bool,
                                                   channels_last: bool) -> None:
    """The student input of a chunk, sliced, is the per-batch input of each batch, bit for bit,
    also where the chunks' boundaries (0, 300, 650, 700) fall inside batches of 64."""
    store = _images(n=1000, size=32)
    order = torch.from_numpy(np.random.default_rng(seed % 1000).permutation(1000)[:700])
    si = _student_input(seed, padding, flip, channels_last)
    per_batch = torch.cat([si(store[order[s: s + 64]], order[s: s + 64], view) for s in range(0, 700, 64)])
    chunked = torch.cat([si(store[order[a:b]], order[a:b], view) for a, b in ((0, 300), (300, 650), (650, 700))])
    assert torch.equal(_bits(chunked), _bits(per_batch))
    other_view = si(store[order[:300]], order[:300], view + 1)  # the comparison can tell views apart
    assert not torch.equal(_bits(other_view), _bits(per_batch[:300]))


def test_chunk_size_is_whole_batches_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = StudentInput.sample_bytes(_images(n=1, size=32))
    assert sample == 32 * 32 * 3 * 4
    assert chunk_size(256, sample) == 256 * 42  # 128 MiB: 42 batches of 256 CIFAR images
    monkeypatch.setattr(augment_module, "CHUNK_BYTES", 3 * 64 * sample + 1)
    assert chunk_size(64, sample) == 3 * 64
    assert chunk_size(1024, sample) == 1024  # never less than one batch
