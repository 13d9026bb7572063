"""The model-level accumulator analysis (:mod:`numcast.evaluate.accumulator`): what the layer's dot products read."""

import torch
from torch import nn

from numcast.accumulator.simulate import accumulate
from numcast.evaluate.accumulator import conv_input_rows


def _ints(seed, shape, lo, hi):
    return torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))


def test_conv_rows_reproduce_the_integer_convolution():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    x = _ints(8, (2, 4, 5, 5), 0, 15)
    q = _ints(9, (6, 2, 3, 3), -7, 7)
    conv.weight.data = q.float()
    rows = conv_input_rows(x, conv)  # [groups, rows, K]
    ref = torch.nn.functional.conv2d(x.double(), q.double(), padding=1, groups=2)  # [2, 6, 5, 5]
    for g in range(2):
        r = accumulate(rows[g], q[3 * g : 3 * g + 3].reshape(3, -1), 40)
        want = ref[:, 3 * g : 3 * g + 3].permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.equal(r.y, want.round().long())
