"""Networks vs the reference's checkpoint layout (shared/checkpoint-format), and the strict loaders."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED
from tolerances import reorder_atol
from lipsync_trt.errors import CheckpointError
from lipsync_trt.models import AudioEncoder, Generator, load_audio_encoder, load_generator

FORMAT = SHARED / "checkpoint-format"


def reference_layout(name: str) -> dict[str, list[int]]:
    path = FORMAT / name
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared absent)")
    return json.loads(path.read_text())


def state_from_layout(layout: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


@pytest.mark.parametrize("model_cls,name", [(Generator, "generator_keys.json"), (AudioEncoder, "audio_encoder_keys.json")])
def test_state_dict_layout_is_the_reference(model_cls, name):
    layout = reference_layout(name)
    ours = {k: list(v.shape) for k, v in model_cls().state_dict().items()}
    assert ours == layout
    model_cls().load_state_dict(state_from_layout(layout), strict=True)


def test_generator_param_count_matches_recipe():
    assert abs(sum(p.numel() for p in Generator().parameters()) / 1e6 - 12.19) < 0.01


def test_loaders_accept_reference_files_and_both_encoder_forms(tmp_path):
    gen_state = state_from_layout(reference_layout("generator_keys.json"))
    enc_state = state_from_layout(reference_layout("audio_encoder_keys.json"), seed=1)
    torch.save(gen_state, tmp_path / "g.pth")
    torch.save(enc_state, tmp_path / "a_prefixed.pth")
    torch.save({k.removeprefix("audio_encoder."): v for k, v in enc_state.items()}, tmp_path / "a_bare.pth")
    g = load_generator(tmp_path / "g.pth")
    assert torch.equal(g.state_dict()["inc.inconv.0.conv.0.weight"], gen_state["inc.inconv.0.conv.0.weight"])
    a1, a2 = load_audio_encoder(tmp_path / "a_prefixed.pth"), load_audio_encoder(tmp_path / "a_bare.pth")
    x = torch.randn(3, 1, 80, 16)
    with torch.no_grad():
        assert torch.equal(a1(x), a2(x))


def test_wrong_files_name_the_first_bad_key(tmp_path):
    gen_state = Generator().state_dict()
    enc_state = AudioEncoder().state_dict()
    torch.save(enc_state, tmp_path / "enc.pth")
    with pytest.raises(CheckpointError, match=r"enc\.pth.*missing key 'audio_model\.conv1\.conv\.0\.weight'"):
        load_generator(tmp_path / "enc.pth")
    extra = dict(gen_state, **{"extra.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_generator(tmp_path / "extra.pth")
    bad = dict(gen_state)
    bad["outc.conv.weight"] = torch.zeros(3, 8, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"'outc\.conv\.weight' has shape \(3, 8, 1, 1\), expected \(3, 16, 1, 1\)"):
        load_generator(tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable"):
        load_audio_encoder(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pth")


@pytest.mark.slow   # over 2 s on a quiet 2-core CPU: out of the fast loop (README "Tests")
def test_batch_independence(checkpoints):
    gen, enc = load_generator(checkpoints[0]), load_audio_encoder(checkpoints[1])
    torch.manual_seed(3)
    x, a = torch.rand(8, 6, 320, 320), torch.randn(8, 32, 16, 16)
    mel = torch.randn(8, 1, 80, 16)
    with torch.inference_mode():
        full = gen(x, a)
        for i in (0, 3, 7):
            assert (full[i:i + 1] - gen(x[i:i + 1], a[i:i + 1])).abs().max() <= reorder_atol(1.0)   # sigmoid output
        feats = enc(mel)   # features are not bounded like the generator's [0, 1]: relative to their scale
        assert (feats - torch.cat([enc(mel[i:i + 1]) for i in range(8)])).abs().max() <= reorder_atol(feats.abs().max())
