"""DiffAugment keeps shapes, passes gradients, and each transform does what it says."""

import pytest
import torch

from gentrain.models import augment


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (3, 3, 32, 32)])
def test_shapes_kept_and_differentiable(policy, shape):
    torch.manual_seed(0)
    x = (torch.rand(shape) * 2 - 1).requires_grad_(True)
    out = augment.diff_augment(x, augment.parse(policy))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_is_an_exact_whole_pixel_shift_with_zero_padding():
    torch.manual_seed(1)
    x = torch.arange(1, 1 + 32 * 32, dtype=torch.float32).view(1, 1, 32, 32).repeat(16, 1, 1, 1)
    out = augment.translation(x)
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img, as_tuple=True)
        dy, dx = int(rows.min()) if rows.min() > 0 else -(31 - int(rows.max())), \
            int(cols.min()) if cols.min() > 0 else -(31 - int(cols.max()))
        assert abs(dy) <= 4 and abs(dx) <= 4  # at most 1/8 of the side
        shifted = torch.roll(x[0, 0], (dy, dx), (0, 1))
        inside = img != 0
        assert torch.equal(img[inside], shifted[inside])  # every kept pixel moved by the same (dy, dx)
    assert len({tuple(torch.nonzero(i[0]).min(0).values.tolist()) for i in out}) > 1  # shifts differ per image


def test_cutout_zeroes_one_square_of_half_the_side():
    torch.manual_seed(2)
    out = augment.cutout(torch.ones(8, 3, 28, 28))
    for img in out:
        holes = torch.nonzero(img[0] == 0)
        assert len(holes) == 14 * 14
        assert (holes.max(0).values - holes.min(0).values).tolist() == [13, 13]
        assert torch.equal(img[0], img[2])  # the same hole in every channel


def test_color_draws_per_example_parameters():
    torch.manual_seed(3)
    out = augment.color(torch.zeros(6, 3, 4, 4))
    assert len(set(out[:, 0, 0, 0].tolist())) == 6  # brightness differs per image


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="'rotate' is not a DiffAugment transform"):
        augment.parse("color,rotate")
    assert augment.parse("") == []
