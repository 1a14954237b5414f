"""CosyVoice1's HiFT vocoder (22.05 kHz): the recipe's settings, the released key layout, and
upstream's waveforms under the same weights and seeds.

The oracles come from upstream's own ``HiFTGenerator`` (bench/upstream_hift_v1.py builds it from
the v1 recipe and from ``HiFTConfig.tiny_v1()``'s settings with the weights stored in the npz); here
ours must give the same outputs without an upstream checkout.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.gan import GanConfig, HiFiGan, recipe_loss_mel
from cosyvoice.acoustic.hift import HiFTConfig, HiFTGenerator, hift_state_dict, load_hift
from cosyvoice.acoustic.recipe import gan_config
from cosyvoice.dataset.mel import MelConfig

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
KEY_TABLE = os.path.join(HERE, "data", "hift_v1_keys.tsv")
ORACLE = os.path.join(HERE, "data", "upstream_hift_v1.npz")
V1_RECIPE = os.path.join(ROOT, "tests", "llm", "data", "upstream_cosyvoice.yaml")  # upstream's, unchanged
#: upstream's own hift cache length (CosyVoiceModel: 20 mel frames of 256 samples)
SOURCE_CACHE = 20 * 256
#: ours computes upstream's operations in upstream's order and layout, so the recording machine
#: gave identical bits; the margin covers other CPUs' kernels (thread count, SIMD width) only,
#: far below any audible or seed-dependent difference (a different seed moves samples by ~1e-2)
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def oracle() -> dict:
    return dict(np.load(ORACLE))


@pytest.fixture(scope="module")
def tiny(oracle) -> HiFTGenerator:
    state = {k[len("state/"):]: torch.from_numpy(v) for k, v in oracle.items() if k.startswith("state/")}
    return load_hift(state, HiFTConfig.tiny_v1())  # strict: the released naming, v1 shapes


def _close(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    assert tuple(ours.shape) == theirs.shape, what
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=ATOL, err_msg=what)


def test_v1_config_is_the_recipes():
    v1, tiny = HiFTConfig.v1(), HiFTConfig.tiny_v1()
    assert v1.samples_per_frame == tiny.samples_per_frame == 256 and v1.sampling_rate == 22050
    assert v1.sine_generator == tiny.sine_generator == "SineGen" and HiFTConfig.full().sine_generator == "SineGen2"
    kw = v1.upstream_kwargs()
    assert kw["upsample_rates"] == [8, 8] and kw["upsample_kernel_sizes"] == [16, 16]
    assert kw["source_resblock_kernel_sizes"] == [7, 11] and kw["source_resblock_dilation_sizes"] == [[1, 3, 5]] * 2
    assert kw["istft_params"] == {"n_fft": 16, "hop_len": 4} and kw["base_channels"] == 512
    assert (tiny.base_channels, tiny.f0_cond_channels) == (32, 32)


def test_full_size_state_dict_is_the_released_v1_layout(tiny):
    table = [line.split("\t") for line in open(KEY_TABLE).read().splitlines()]
    assert len(table) == 227
    written = hift_state_dict(HiFTGenerator(HiFTConfig.v1()))
    # the same keys and shapes (the order of a state dict does not matter to loading)
    assert {k: ",".join(map(str, v.shape)) for k, v in written.items()} == dict(table)
    v1 = load_hift(written, HiFTConfig.v1())  # strict: every key used, none missing
    assert v1.config.sine_generator == "SineGen"
    # a CosyVoice1 file read with CosyVoice2's settings names the difference
    with pytest.raises(ValueError, match=r"missing keys 76: resblocks\.6\..*shape mismatches \d+: "
                                         r"ups\.1\.weight_v/_g: file \(16, 8, 16\)/\(16, 1, 1\), model \(16, 8, 11\)"):
        load_hift(hift_state_dict(tiny), HiFTConfig.tiny())


def test_inference_is_upstreams_under_the_same_seed(oracle, tiny):
    first_seed, second_seed, _ = (int(s) for s in oracle["seeds"])
    mel = torch.from_numpy(oracle["mel/first"])
    voiced = (tiny.f0_predictor(mel) > tiny.config.nsf_voiced_threshold).float().mean()
    assert 0.5 < voiced < 1  # the oracle covers both the sine and the noise-only branch
    torch.manual_seed(first_seed)  # upstream draws from the global generator ...
    wav, source = tiny.inference(mel)
    _close(wav, oracle["first/wav"], "first call: waveform")
    _close(source, oracle["first/source"], "first call: source")
    assert wav.shape == (1, 256 * mel.shape[2])
    # ... and a generator seeded alike gives the same draws, leaving the global one alone
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    again, _ = tiny.inference(mel, generator=torch.Generator().manual_seed(first_seed))
    assert torch.equal(again, wav) and torch.equal(torch.rand(3), expected)
    # a different seed is a different waveform (the oracle pins the draws, not only the network)
    other, _ = tiny.inference(mel, generator=torch.Generator().manual_seed(first_seed + 1))
    assert (other - wav).abs().max() > 1e-3

    # the stream's next call: the last 20 frames again in front, their source as cache_source
    cache = source[:, :, -SOURCE_CACHE:]
    second = torch.cat([mel[:, :, -20:], torch.from_numpy(oracle["mel/second_new"])], dim=2)
    wav2, source2 = tiny.inference(second, cache_source=cache, generator=torch.Generator().manual_seed(second_seed))
    assert torch.equal(source2[:, :, :SOURCE_CACHE], cache)
    _close(wav2, oracle["second/wav"], "second call: waveform")
    _close(source2, oracle["second/source"], "second call: source")


def test_batched_training_forward_is_upstreams(oracle, tiny):
    *_, seed = (int(s) for s in oracle["seeds"])
    mel = torch.from_numpy(oracle["mel/batch"]).transpose(1, 2)  # the batch's speech_feat is (B, T, 80)
    with torch.no_grad():
        wav, f0 = tiny(mel, generator=torch.Generator().manual_seed(seed))
    _close(wav, oracle["forward/wav"], "forward: waveform")
    _close(f0, oracle["forward/f0"], "forward: F0")


def test_gan_config_of_the_v1_recipe():
    v1_mel = MelConfig(sample_rate=22050, n_fft=1024, hop=256, win=1024, fmax=None)
    config = gan_config(V1_RECIPE)
    assert config.hift == HiFTConfig.v1() and config.mel == v1_mel
    assert config == GanConfig(hift=HiFTConfig.v1())  # the default mel loss follows the vocoder
    assert recipe_loss_mel(HiFTConfig.full()) == GanConfig().mel == MelConfig(fmax=None)


def test_a_gan_step_trains_the_v1_vocoder():
    torch.manual_seed(0)
    gan = HiFiGan.from_config(GanConfig.tiny_v1()).train()
    g = torch.Generator().manual_seed(1)
    frames = 12
    batch = {"speech_feat": torch.randn(2, frames, 80, generator=g) - 4,
             "speech": torch.randn(2, 256 * frames, generator=g) * 0.1,
             "pitch_feat": torch.rand(2, frames, generator=g) * 200}
    losses = gan.generator_turn(batch, "cpu", torch.Generator().manual_seed(2))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    losses["loss"].backward()
    grads = [p.grad for p in gan.generator.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert gan.generator.conv_pre.parametrizations.weight.original1.grad.abs().sum() > 0
    d = gan.discriminator_turn(batch, "cpu", torch.Generator().manual_seed(3))
    assert torch.isfinite(d["loss"])
    with pytest.raises(ValueError, match=r"\(B, 256 \* T\)"):  # 24 kHz audio for these mels is refused
        gan.generator_turn({**batch, "speech": torch.zeros(2, 480 * frames)}, "cpu")
