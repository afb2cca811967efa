"""GPU tests (`pytest -m gpu`, skipped without CUDA): the mel on the GPU vs torchaudio and the CPU, fp16
generation vs the fp32 CPU path on real frames, and the full generate on CUDA vs the CPU path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lipsync_trt import audio as A
from lipsync_trt import avatar as AV
from lipsync_trt import pipeline
from oracle import render_batch
from lipsync_trt.backends import pytorch as tb

pytestmark = pytest.mark.gpu


def test_mel_on_cuda_matches_torchaudio_and_cpu(sanders):
    torchaudio = pytest.importorskip("torchaudio", reason="torchaudio not importable (the GPU image's test oracle)")
    wav = torch.from_numpy(A.load_16k(sanders / "talk_hb.wav"))
    ours = A.mel(wav.cuda())
    assert ours.device.type == "cuda"
    assert (ours.cpu() - A.mel(wav)).abs().max() <= 1e-3
    # torchaudio's MelSpectrogram with the recipe's settings, then the recipe's dB and normalisation
    x = wav.cuda()
    y = torch.cat([x[:1], x[1:] - 0.97 * x[:-1]])
    spec = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=800, win_length=800, hop_length=200,
                                                f_min=55, f_max=7600, n_mels=80, power=1.0, center=True,
                                                pad_mode="constant", norm="slaney", mel_scale="slaney").cuda()(y)
    s = 20 * torch.log10(torch.clamp(spec, min=1e-5)) - 20
    ref = torch.clamp(8 * (s + 100) / 100 - 4, -4, 4)
    assert (ours - ref).abs().max() <= 1e-3


@pytest.fixture(scope="module")
def real_batch(sanders, checkpoints):
    av = AV.load(sanders)
    cpu = tb.load(*checkpoints, device=torch.device("cpu"))
    feats = pipeline.encode_features(cpu, A.load_16k(sanders / "talk_hb.wav")[:48000])
    ids = list(range(0, 40, 5))
    return av, cpu, feats, ids


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_quality_guard(real_batch, checkpoints, precision):
    """fp16/bf16 on CUDA vs fp32 on the CPU: mean abs diff <= 1 level inside the box, identical outside."""
    av, cpu, feats, ids = real_batch
    gpu = tb.load(*checkpoints, device=torch.device("cuda"), precision=precision)
    order = av.order(feats.num_frames)
    templates = [int(order[i]) for i in ids]
    windows = A.feature_windows(feats.padded, ids)
    ref = render_batch(cpu, av, windows, templates)
    got = render_batch(gpu, av, windows.cuda(), templates)
    for k, t in enumerate(templates):
        x1, y1, x2, y2 = av.boxes[t]
        a, b = ref[k].numpy().astype(np.int32), got[k].cpu().numpy().astype(np.int32)
        inside = np.abs(a[y1:y2, x1:x2] - b[y1:y2, x1:x2])
        assert inside.mean() <= 1.0, (precision, t, inside.mean())
        outside = a.copy()
        outside[y1:y2, x1:x2] = 0
        other = b.copy()
        other[y1:y2, x1:x2] = 0
        assert np.array_equal(outside, other)


def test_generate_on_cuda_matches_cpu(real_batch, checkpoints):
    av, cpu, feats, _ = real_batch
    gpu = tb.load(*checkpoints, device=torch.device("cuda"))
    ids = list(range(12))
    ref = dict(pipeline.iter_frames(cpu, av, feats, ids, batch_size=4))
    got = dict(pipeline.iter_frames(gpu, av, pipeline.Features(feats.samples, feats.mel.cuda(),
                                                               feats.features.cuda(), feats.padded.cuda()),
                                    ids, batch_size=8))
    order = av.order(feats.num_frames)
    for i in ids:
        x1, y1, x2, y2 = av.boxes[int(order[i])]
        d = np.abs(ref[i].numpy().astype(np.int32) - got[i].cpu().numpy().astype(np.int32))
        assert d[y1:y2, x1:x2].mean() <= 1.0      # cuDNN (TF32 allowed) vs CPU convolutions
        d[y1:y2, x1:x2] = 0
        assert d.max() == 0
