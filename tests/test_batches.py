"""The first images of a loader (timm_slim.batches.first_batches), which calibration, route
calibration, channel sorting and fit_target read their images with."""

import pytest
import torch

from timm_slim.batches import first_batches


def _loader(batches):
    """Yields ``batches``, then fails: a test sees every read past the ones it needs."""
    yield from batches
    raise AssertionError('read past the images that were needed')


def test_the_first_images_of_tensors_and_tuples_cut_to_fit_on_the_device():
    a, b, c = (torch.randn(5, 3, 4, 4) for _ in range(3))
    y = torch.arange(5)
    got = list(first_batches(_loader([a, (b, y), [c, y, 'extra']]), 12, 'caller', torch.device('meta')))
    assert [(images.shape[0], images.device.type) for images, _ in got] == [(5, 'meta'), (5, 'meta'), (2, 'meta')]
    assert got[0][1] is None
    assert [(t.shape[0], t.device.type) for _, t in got[1:]] == [(5, 'meta'), (2, 'meta')]
    assert [t for _, t in first_batches([(a,)], 5, 'caller')] == [None]   # a tuple of images alone
    plain = list(first_batches([a, (b, y)], 7, 'caller'))
    assert torch.equal(plain[0][0], a) and torch.equal(plain[1][0], b[:2]) and plain[1][1].tolist() == [0, 1]


def test_reading_stops_at_the_last_image_needed_and_a_short_loader_gives_what_it_has():
    a, b = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    assert [x.shape[0] for x, _ in first_batches(_loader([a, b]), 10, 'caller')] == [5, 5]
    assert [x.shape[0] for x, _ in first_batches([a, b], 100, 'caller')] == [5, 5]


def test_an_empty_loader_is_refused_naming_the_caller():
    with pytest.raises(ValueError) as refused:
        list(first_batches([], 4, 'calibrate_routes'))
    assert str(refused.value) == 'calibrate_routes: the loader yielded no images'
