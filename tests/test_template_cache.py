"""The prepared-template cache (compose.TemplateCrops: 328 crops, and decoded frames for the offline pipeline) gives
the same frames as decoding and preparing each video frame's template afresh, and decodes every template once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lipsync_trt import audio as A
from lipsync_trt import avatar as AV
from lipsync_trt.compose import TemplateCrops
from lipsync_trt import pipeline


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_cached_templates_give_the_same_frames_and_decode_once(sanders, torch_runner):
    av = AV.load(sanders, cache_size=0)   # no LRU: every avatar.frame call decodes the JPEG
    decoded = []
    frame = av.frame
    av.frame = lambda n: decoded.append(n) or frame(n)
    feats = pipeline.encode_features(torch_runner, A.load_16k(sanders / "talk_hb.wav")[:16000])
    order = av.order(feats.num_frames)
    indices = list(range(feats.num_frames))[:6]
    ids = [int(order[i]) for i in indices]
    plain = dict(pipeline.iter_frames(torch_runner, av, feats, indices, batch_size=4, cache=False))
    assert sorted(decoded) == sorted(ids)
    decoded.clear()
    cache = TemplateCrops(av, torch_runner.device, frames=True)
    twice = []
    for _ in range(2):   # the same templates twice through one kept cache: the second pass must not decode again
        twice.append(dict(pipeline.iter_frames(torch_runner, av, feats, indices, batch_size=4, cache=True,
                                               templates=cache)))
    assert sorted(decoded) == sorted(set(ids))
    for i in indices:
        assert torch.equal(twice[0][i], plain[i]) and torch.equal(twice[1][i], plain[i])
    # the cache's own frames stay pristine (paste writes into copies)
    for t in set(ids):
        assert np.array_equal(cache.frame(t).numpy(), frame(t))
    cached = dict(pipeline.iter_frames(torch_runner, av, feats, indices, batch_size=4, cache=True))
    assert all(torch.equal(cached[i], plain[i]) for i in indices)


def test_lru_keeps_size_templates(sanders):
    av = AV.load(sanders)
    cache = TemplateCrops(av, "cpu", size=2)
    for t in (0, 1, 0, 2, 0, 1):           # 1 is evicted by 2 (0 was used since), so it is prepared again
        cache.get([t])
    assert cache.misses == 4


def test_cache_is_off_by_default_on_cpu(sanders, torch_runner):
    av = AV.load(sanders)
    assert not pipeline.use_template_cache(torch_runner, av, av.count)
    assert pipeline.use_template_cache(torch_runner, av, av.count, cache=True)
    largest = max((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in (AV.face_box(m, 720, 1280) for m in av.landmarks))
    assert TemplateCrops.nbytes(av, 2) == 2 * (328 * 328 * 3 + largest * 3)        # crop + box region
    assert TemplateCrops.nbytes(av, 2, frames=True) == 2 * (720 * 1280 * 3 + 328 * 328 * 3 + largest * 3)
