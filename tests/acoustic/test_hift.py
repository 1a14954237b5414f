"""HiFT vocoder: shapes, randomness contract, cache overwrite, strict loading in the released layout."""
from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

from cosyvoice.acoustic.hift import (
    HiFTConfig,
    HiFTGenerator,
    hift_state_dict,
    load_hift,
    weight_normed_modules,
)

KEY_TABLE = Path(__file__).parent / "data" / "hift_keys.tsv"
LIMIT = torch.tensor(0.99).item()  # the clamp bound as float32 represents it


@pytest.fixture(scope="module")
def tiny() -> HiFTGenerator:
    torch.manual_seed(0)
    model = HiFTGenerator(HiFTConfig.tiny())
    with torch.no_grad():
        # non-trivial parameters everywhere, and an F0 mostly above the voicing threshold so the
        # harmonic (sine) path is exercised, not only the unvoiced noise
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
        model.f0_predictor.classifier.bias.fill_(120.0)
        model.f0_predictor.classifier.weight.normal_(0, 40.0)
    return model


def _mel(frames: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 80, frames, generator=g) * 2 - 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_config_sizes_and_upstream_kwargs():
    full, tiny_cfg = HiFTConfig.full(), HiFTConfig.tiny()
    assert full.samples_per_frame == tiny_cfg.samples_per_frame == 480
    assert (tiny_cfg.base_channels, tiny_cfg.f0_cond_channels) == (32, 32)
    kw = full.upstream_kwargs()
    assert kw["upsample_rates"] == [8, 5, 3] and kw["istft_params"] == {"n_fft": 16, "hop_len": 4}
    assert kw["source_resblock_kernel_sizes"] == [7, 7, 11]
    assert kw["f0_predictor"] == {"num_class": 1, "in_channels": 80, "cond_channels": 512}
    assert len(weight_normed_modules(full)) == 82
    with pytest.raises(ValueError, match="upsample_kernel_sizes"):
        HiFTConfig(upsample_kernel_sizes=(16, 11))


def test_inference_gives_480_samples_per_frame_within_the_audio_limit(tiny):
    for frames in (1, 9, 40):
        wav, source = tiny.inference(_mel(frames), generator=_gen(0))
        assert wav.shape == (1, 480 * frames) and wav.dtype == torch.float32
        assert source.shape == (1, 1, 480 * frames)
        assert torch.isfinite(wav).all()
        assert wav.abs().max().item() <= LIMIT


def test_loud_output_is_clamped_to_exactly_the_audio_limit(tiny):
    loud = copy.deepcopy(tiny)
    with torch.no_grad():
        loud.conv_post.bias[:9].fill_(4.0)  # log-magnitudes of e^4 ~ 55 per bin
    wav, _ = loud.inference(_mel(10), generator=_gen(0))
    assert wav.abs().max().item() == LIMIT
    assert (wav.abs() == LIMIT).sum() > 100


def test_same_seed_same_waveform_and_different_seed_different_waveform(tiny):
    mel = _mel(20)
    a, sa = tiny.inference(mel, generator=_gen(3))
    b, sb = tiny.inference(mel, generator=_gen(3))
    c, sc = tiny.inference(mel, generator=_gen(4))
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert (a - c).abs().max() > 1e-4 and (sa - sc).abs().max() > 1e-4


def test_without_generator_the_global_rng_is_used_and_advanced(tiny):
    mel = _mel(12)
    torch.manual_seed(11)
    first, _ = tiny.inference(mel)
    second, _ = tiny.inference(mel)
    torch.manual_seed(11)
    again, _ = tiny.inference(mel)
    explicit, _ = tiny.inference(mel, generator=_gen(11))
    assert torch.equal(first, again)
    assert torch.equal(first, explicit)  # same seed on a fresh CPU generator: the same draws
    assert not torch.equal(first, second)


def test_generator_does_not_touch_the_global_rng(tiny):
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    tiny.inference(_mel(6), generator=_gen(0))
    assert torch.equal(torch.rand(4), expected)


def test_cache_source_overwrites_the_start_of_the_source(tiny):
    mel = _mel(16)
    _, plain = tiny.inference(mel, generator=_gen(2))
    cache = torch.linspace(-0.5, 0.5, 3840).reshape(1, 1, -1)
    wav, source = tiny.inference(mel, cache_source=cache, generator=_gen(2))
    assert torch.equal(source[..., :3840], cache)
    assert torch.equal(source[..., 3840:], plain[..., 3840:])
    wav_plain, _ = tiny.inference(mel, generator=_gen(2))
    assert (wav[..., :3000] - wav_plain[..., :3000]).abs().max() > 1e-5
    # an empty cache is the same as none
    wav_empty, _ = tiny.inference(mel, cache_source=torch.zeros(1, 1, 0), generator=_gen(2))
    assert torch.equal(wav_empty, wav_plain)


def test_bad_inputs_are_rejected_with_the_expected_shape(tiny):
    with pytest.raises(ValueError, match=r"\(1, 80, T\)"):
        tiny.inference(torch.zeros(80, 10))
    with pytest.raises(ValueError, match=r"\(1, 80, T\)"):
        tiny.inference(torch.zeros(1, 81, 10))
    with pytest.raises(ValueError, match="0 frames"):
        tiny.inference(torch.zeros(1, 80, 0))
    with pytest.raises(ValueError, match="float32"):
        tiny.inference(torch.zeros(1, 80, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache_source"):
        tiny.inference(_mel(2), cache_source=torch.zeros(1, 1, 961))


def test_full_size_state_dict_matches_the_released_key_table():
    expected = {}
    for line in KEY_TABLE.read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(int(s) for s in shape.split(","))
    assert len(expected) == 328
    torch.manual_seed(0)
    written = hift_state_dict(HiFTGenerator(HiFTConfig.full()))
    assert {k: tuple(v.shape) for k, v in written.items()} == expected
    load_hift(written, HiFTConfig.full())  # and it is loadable as such


def test_round_trip_through_a_released_layout_file_is_exact(tiny, tmp_path):
    state = hift_state_dict(tiny)
    assert any(k.endswith(".weight_g") for k in state) and not any(k.endswith("conv_pre.weight") for k in state)
    path = tmp_path / "hift.pt"
    torch.save(state, path)
    loaded = load_hift(path, HiFTConfig.tiny())
    assert not loaded.training
    for (ka, a), (kb, b) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    mel = _mel(15)
    assert torch.equal(tiny.inference(mel, generator=_gen(1))[0], loaded.inference(mel, generator=_gen(1))[0])


def test_gan_wrapper_generator_prefix_is_stripped(tiny):
    state = {f"generator.{k}": v for k, v in hift_state_dict(tiny).items()}
    loaded = load_hift(state, HiFTConfig.tiny())
    mel = _mel(5)
    assert torch.equal(tiny.inference(mel, generator=_gen(1))[0], loaded.inference(mel, generator=_gen(1))[0])


def test_torch_parametrization_naming_is_accepted(tiny):
    from torch.nn.utils.parametrizations import weight_norm

    normed = copy.deepcopy(tiny)
    for name in weight_normed_modules(normed.config):
        weight_norm(normed.get_submodule(name))
    state = normed.state_dict()
    assert "conv_pre.parametrizations.weight.original0" in state
    loaded = load_hift(state, HiFTConfig.tiny())
    mel = _mel(8)
    wav_a, _ = tiny.inference(mel, generator=_gen(1))
    wav_b, _ = loaded.inference(mel, generator=_gen(1))
    assert (wav_a - wav_b).abs().max() < 1e-5


def test_missing_and_unexpected_keys_are_both_named(tiny, tmp_path):
    state = hift_state_dict(tiny)
    del state["resblocks.4.activations2.1.alpha"]
    del state["m_source.l_linear.bias"]
    del state["conv_pre.bias"]  # the bias of a weight-normed conv
    state["decoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        load_hift(path, HiFTConfig.tiny())
    message = str(err.value)
    assert str(path) in message
    assert "missing keys 3" in message and "conv_pre.bias" in message and "resblocks.4.activations2.1.alpha" in message and "m_source.l_linear.bias" in message
    assert "unexpected keys 1" in message and "decoder.extra.weight" in message


def test_half_of_a_weight_norm_pair_is_reported_missing(tiny):
    state = hift_state_dict(tiny)
    del state["ups.1.weight_g"]
    with pytest.raises(ValueError, match=r"missing keys 1: ups\.1\.weight_g"):
        load_hift(state, HiFTConfig.tiny())


def test_shape_mismatch_is_named():
    # a full-size file read with the tiny config: every channel count is wrong
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"shape mismatches \d+: .*conv_pre\.weight_v/_g: file \(512, 80, 7\)/\(512, 1, 1\), model \(32, 80, 7\)"):
        load_hift(hift_state_dict(HiFTGenerator(HiFTConfig.full())), HiFTConfig.tiny())


class _NotATensor:
    """A custom class: unpickling it requires arbitrary code, which weights_only forbids."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv_pre.bias": _NotATensor()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        load_hift(path)


def test_a_missing_file_and_a_non_mapping_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such HiFT checkpoint"):
        load_hift(tmp_path / "absent.pt")
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_hift(path)
