"""HiFi-GAN training of the HiFT vocoder: upstream's losses, gradients, state dicts and recipe section.

The goldens come from upstream's own ``HiFiGan`` (bench/upstream_gan_loss.py runs its
``forward_generator`` / ``forward_discriminator`` with our seeded weights loaded); here our turns
must give the same losses and gradients without an upstream checkout.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch

from cosyvoice.acoustic.discriminator import MultipleDiscriminator
from cosyvoice.acoustic.gan import GanConfig, HiFiGan, frozen, tpr_loss
from cosyvoice.acoustic.hift import (
    HiFTConfig,
    HiFTGenerator,
    fold_weight_norm,
    hift_state_dict,
    load_hift,
    parametrize_weight_norm,
    weight_normed_modules,
)
from cosyvoice.acoustic.recipe import gan_config

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import upstream_gan_loss as golden  # noqa: E402

GOLDENS = os.path.join(HERE, "data", "upstream_gan_loss.npz")
CONFIGS = os.path.join(ROOT, "configs")
UPSTREAM_RECIPE = os.path.join(HERE, "data", "upstream_cosyvoice2.yaml")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def recorded() -> dict:
    return dict(np.load(GOLDENS))


@pytest.fixture(scope="module")
def batch(recorded) -> dict:
    return {k[len("batch_"):]: torch.from_numpy(v) for k, v in recorded.items() if k.startswith("batch_")}


def _tiny(seed: int = 0) -> HiFiGan:
    torch.manual_seed(seed)
    return HiFiGan.from_config(GanConfig.tiny()).train()


def _rng(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_both_turns_give_upstreams_losses_and_gradients(recorded, batch):
    gan = golden.build_ours()
    assert golden.weights_digest(gan) == str(recorded["weights_sha256"]), (
        "our seeded GAN weights changed since the goldens were recorded: rerun bench/upstream_gan_loss.py")
    ours = golden.run_turns(gan, batch, generator_turn=lambda b: gan.generator_turn(b, "cpu"),
                            discriminator_turn=lambda b: gan.discriminator_turn(b, "cpu"))
    keys = [k for k in recorded if k.startswith(("g_", "d_"))]
    assert sorted(keys) == sorted(ours)
    assert {k[2:] for k in keys if k.startswith("g_loss")} == {"loss", "loss_gen", "loss_fm", "loss_mel", "loss_tpr",
                                                                "loss_f0"}
    assert {k[2:] for k in keys if k.startswith("d_loss")} == {"loss", "loss_disc", "loss_tpr"}
    for key in keys:
        np.testing.assert_allclose(ours[key], recorded[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_state_dict_keys_and_shapes_are_upstreams(recorded):
    torch.manual_seed(0)
    gan = HiFiGan.from_config(GanConfig(hift=HiFTConfig.tiny()))
    ours = [f"{k}\t{tuple(v.shape)}" for k, v in gan.state_dict().items()]
    assert ours == [str(k) for k in recorded["upstream_state_keys"]]
    mpd = [k for k in ours if k.startswith("discriminator.mpd.")]
    assert mpd and all(".parametrizations." not in k for k in mpd)  # Matcha's weight_g / weight_v names


def test_either_weight_norm_naming_loads_into_the_discriminator():
    torch.manual_seed(0)
    cfg = GanConfig.tiny()
    a, b = HiFiGan.from_config(cfg).discriminator, HiFiGan.from_config(cfg).discriminator
    released = a.state_dict()
    parametrized = {k.replace(".weight_g", ".parametrizations.weight.original0")
                    .replace(".weight_v", ".parametrizations.weight.original1"): v for k, v in released.items()}
    for state in (released, parametrized):
        b.load_state_dict(state, strict=True)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("batched", [True, False])
def test_scoring_real_and_generated_together_equals_scoring_each(batched):
    torch.manual_seed(0)
    disc = HiFiGan.from_config(GanConfig.tiny()).discriminator
    real, fake = torch.randn(2, 4801) * 0.3, torch.randn(2, 4801) * 0.3  # 4801: every period pads
    y_d_rs, y_d_gs, fmap_rs, fmap_gs = disc(real, fake, batched=batched)
    (sr, fr), (sg, fg) = disc.score(real), disc.score(fake)
    assert len(y_d_rs) == 8 and len(fmap_rs) == 8  # 5 periods + 3 resolutions
    for got, want in ((y_d_rs, sr), (y_d_gs, sg)):
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for got, want in ((fmap_rs, fr), (fmap_gs, fg)):
        for xs, ys in zip(got, want):
            for x, y in zip(xs, ys):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        disc(real, fake[:, :-1])


def test_frozen_discriminator_gives_identical_generator_gradients_and_none_of_its_own(batch):
    gan = _tiny()
    out = gan.generator_turn(batch, "cpu", _rng())
    out["loss"].backward()
    plain = {n: p.grad.clone() for n, p in gan.generator.named_parameters()}
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    gan.zero_grad(set_to_none=True)
    with frozen(gan.discriminator) as disc:
        assert disc is gan.discriminator and not any(p.requires_grad for p in disc.parameters())
        out_frozen = gan.generator_turn(batch, "cpu", _rng())
        out_frozen["loss"].backward()
    assert all(p.requires_grad for p in gan.discriminator.parameters())
    assert all(p.grad is None for p in gan.discriminator.parameters())
    for key in out:
        assert torch.equal(out[key], out_frozen[key]), key
    for name, p in gan.generator.named_parameters():
        assert torch.equal(p.grad, plain[name]), name


def test_frozen_restores_each_flag_even_when_the_block_raises():
    disc = _tiny().discriminator
    params = list(disc.parameters())
    params[0].requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(disc):
        raise RuntimeError("boom")
    assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])


def test_both_turns_give_finite_gradients_everywhere_they_should(batch):
    gan = _tiny()
    out = gan.generator_turn(batch, "cpu", _rng())
    out["loss"].backward()
    for name, p in gan.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # as upstream: the F0 predictor learns from loss_f0 only (the sine source has no gradient)
    assert gan.generator.f0_predictor.classifier.weight.grad.abs().sum() > 0
    assert gan.generator.conv_post.parametrizations.weight.original1.grad.abs().sum() > 0
    gan.zero_grad(set_to_none=True)
    out = gan.discriminator_turn(batch, "cpu", _rng())
    out["loss"].backward()
    assert set(out) == {"loss", "loss_disc", "loss_tpr"}
    assert all(p.grad is None for p in gan.generator.parameters())  # the generator ran without autograd
    for name, p in gan.discriminator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_f0_predictor_gets_no_gradient_from_the_waveform_losses(batch):
    """Upstream generates the sine source without autograd: the F0 predictor learns from loss_f0 only."""
    gan = _tiny()
    out = gan.generator_turn(batch, "cpu", _rng())
    (out["loss_gen"] + out["loss_fm"] + out["loss_mel"] + out["loss_tpr"]).backward()
    assert all(p.grad is None for p in gan.generator.f0_predictor.parameters())
    assert gan.generator.m_source.l_linear.weight.grad.abs().sum() > 0


def test_a_few_alternating_adam_steps_lower_the_mel_loss(batch):
    gan = _tiny()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=2e-4)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=2e-4)
    mel_losses = []
    for _ in range(4):
        opt_d.zero_grad()
        gan.discriminator_turn(batch, "cpu", _rng())["loss"].backward()
        opt_d.step()
        opt_g.zero_grad()
        with frozen(gan.discriminator):
            out = gan.generator_turn(batch, "cpu", _rng())
            out["loss"].backward()
        opt_g.step()
        mel_losses.append(out["loss_mel"].item())
    with torch.no_grad():
        mel_losses.append(gan.generator_turn(batch, "cpu", _rng())["loss_mel"].item())
    assert all(np.isfinite(mel_losses))
    assert mel_losses[-1] < 0.85 * mel_losses[0], mel_losses


def test_hift_state_dict_of_a_trained_generator_round_trips(batch, tmp_path):
    gan = _tiny()
    opt = torch.optim.Adam(gan.generator.parameters(), lr=1e-3)
    with frozen(gan.discriminator):
        gan.generator_turn(batch, "cpu", _rng())["loss"].backward()
    opt.step()
    generator = gan.generator
    state = hift_state_dict(generator)
    # the released layout, written from the trained g and v themselves
    assert set(state) == set(hift_state_dict(HiFTGenerator(HiFTConfig.tiny())))
    assert not any(k.startswith("generator.") or ".parametrizations." in k for k in state)
    for name in weight_normed_modules(generator.config):
        pair = generator.get_submodule(name).parametrizations.weight
        assert torch.equal(state[f"{name}.weight_g"], pair.original0)
        assert torch.equal(state[f"{name}.weight_v"], pair.original1)
    path = tmp_path / "hift.pt"
    torch.save(state, path)
    # fine-tuning: g and v come back exactly; the GAN wrapper's `generator.` keys load too
    again = load_hift(path, HiFTConfig.tiny(), weight_norm=True)
    for (ka, a), (kb, b) in zip(generator.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(a, b), ka
    wrapper_keys = {k[len("generator."):]: v for k, v in gan.state_dict().items() if k.startswith("generator.")}
    assert set(wrapper_keys) == set(generator.state_dict())
    load_hift({f"generator.{k}": v for k, v in wrapper_keys.items()}, HiFTConfig.tiny())
    # inference: folded on load = the trained (parametrized) model = folded in place
    mel = batch["speech_feat"][:1].transpose(1, 2).contiguous()
    wav, _ = generator.inference(mel, generator=_rng(3))
    assert torch.equal(load_hift(path, HiFTConfig.tiny()).inference(mel, generator=_rng(3))[0], wav)
    assert torch.equal(fold_weight_norm(generator).inference(mel, generator=_rng(3))[0], wav)
    assert hift_state_dict(generator).keys() == state.keys()


def test_training_forward_is_the_inference_computation_for_one_utterance(batch):
    torch.manual_seed(0)
    model = HiFTGenerator(HiFTConfig.tiny())
    mel = batch["speech_feat"][:1].transpose(1, 2).contiguous()
    with torch.no_grad():
        wav, f0 = model(mel, _rng(4))
    want, _ = model.inference(mel, generator=_rng(4))
    assert wav.shape == (1, 480 * mel.shape[2]) and f0.shape == (1, mel.shape[2])
    assert torch.equal(wav, want)
    wav_grad, _ = model(mel, _rng(4))  # the autograd path: same values up to float rounding
    torch.testing.assert_close(wav_grad, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 80, T\)"):
        model(mel[0])


def test_parametrize_weight_norm_is_idempotent_and_keeps_the_function():
    torch.manual_seed(0)
    model = HiFTGenerator(HiFTConfig.tiny())
    mel = torch.randn(1, 80, 6)
    before, _ = model.inference(mel, generator=_rng())
    parametrize_weight_norm(model)
    parametrize_weight_norm(model)
    assert len([k for k in model.state_dict() if k.endswith("original0")]) == len(weight_normed_modules(model.config))
    torch.testing.assert_close(model.inference(mel, generator=_rng())[0], before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change,named", [
    (lambda b: b.pop("pitch_feat"), "pitch_feat"),
    (lambda b: b.update(speech=b["speech"][:, :-480]), "batch['speech'] must be (B, 480 * T)"),
    (lambda b: b.update(pitch_feat=b["pitch_feat"].double()), "batch['pitch_feat'] must be a float32"),
    (lambda b: b.update(speech_feat=b["speech_feat"][..., :40]), "batch['speech_feat'] must be (B, T, 80)"),
])
def test_a_malformed_batch_is_refused_naming_the_key(batch, change, named):
    gan = _tiny()
    bad = dict(batch)
    change(bad)
    with pytest.raises(ValueError, match=re.escape(named)):
        gan.generator_turn(bad, "cpu")
    with pytest.raises(ValueError, match=re.escape(named)):
        gan.discriminator_turn(bad, "cpu")


def test_forward_dispatches_on_the_batch_turn(batch):
    gan = _tiny()
    with torch.no_grad():
        assert set(gan({**batch, "turn": "discriminator"}, "cpu")) == {"loss", "loss_disc", "loss_tpr"}
        assert "loss_mel" in gan({**batch, "turn": "generator"}, "cpu")
    with pytest.raises(ValueError, match="batch\\['turn'\\]"):
        gan(batch, "cpu")


def test_tpr_loss_keeps_upstreams_median_and_truncation():
    dr = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    dg = torch.zeros(1, 5)
    # diff = dr; lower median 2; points below it: 0 and 1 -> mean of (0-2)^2, (1-2)^2 = 2.5 -> truncated at tau
    assert tpr_loss([dr], [dg], 0.04).item() == pytest.approx(0.04)
    assert tpr_loss([dr], [dg], 10.0).item() == pytest.approx(2.5)
    assert torch.isnan(tpr_loss([torch.ones(1, 2)], [torch.zeros(1, 2)], 0.04))  # no point below: NaN, as upstream


def test_gan_config_of_the_recipes():
    full = gan_config(os.path.join(CONFIGS, "cosyvoice2.yaml"))
    assert full == GanConfig() and full.hift == HiFTConfig.full()
    assert full.mel.fmax is None and (full.mel.n_fft, full.mel.hop, full.mel.win, full.mel.n_mels) == (1920, 480, 1920, 80)
    assert (full.multi_mel_spectral_recon_loss_weight, full.feat_match_loss_weight, full.tpr_loss_weight,
            full.tpr_loss_tau) == (45, 2.0, 1.0, 0.04)
    assert gan_config(os.path.join(CONFIGS, "cosyvoice2-tiny.yaml")).hift == HiFTConfig.tiny()
    assert gan_config(UPSTREAM_RECIPE) == full  # upstream's own recipe, matcha's mel transform aliased


def _upstream_text() -> str:
    with open(UPSTREAM_RECIPE) as f:
        return f.read()


def _edited(old: str, new: str) -> str:
    text = _upstream_text()
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("old,new,named", [
    ("        !ref <mel_spec_transform1>\n    ]", "        !ref <mel_spec_transform1>, !ref <mel_spec_transform1>\n    ]",
     "hifigan.mel_spec_transform"),
    ("    fmax: null\n    center: False", "    fmax: null\n    center: True", "mel_spec_transform[0].center"),
    ("mrd: !new:cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator",
     "mrd: !new:cosyvoice.hifigan.discriminator.MultiResolutionDiscriminator", "hifigan.discriminator.mrd"),
    ("mrd: !new:cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator",
     "mrd: !new:cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator\n            fft_sizes: [1024, 2048, 512, 256]",
     "hifigan.discriminator.mrd.fft_sizes"),
    ("mrd: !new:cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator",
     "mrd: !new:cosyvoice.hifigan.discriminator.MultiResSpecDiscriminator\n            window: kaiser_window",
     "kaiser_window"),
    ("hift: !new:cosyvoice.hifigan.generator.HiFTGenerator", "hift: !new:cosyvoice.hifigan.generator.CausalHiFTGenerator",
     "CosyVoice 3"),
])
def test_unsupported_gan_settings_are_refused_by_name(old, new, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        gan_config(_edited(old, new))


def test_a_recipe_without_a_hifigan_section_is_refused_clearly():
    with pytest.raises(ValueError, match="no `hifigan` section"):
        gan_config(_upstream_text().split("\nmel_spec_transform1:")[0] + "\n")


def test_bad_gan_configs_are_refused():
    with pytest.raises(ValueError, match="spec_hop_sizes"):
        GanConfig(spec_hop_sizes=(120, 240))
    with pytest.raises(ValueError, match="tpr_loss_tau"):
        GanConfig(tpr_loss_tau=-1.0)
    with pytest.raises(ValueError, match="differ from the GAN config"):
        HiFiGan(HiFTGenerator(HiFTConfig.tiny()), config=GanConfig())
    assert isinstance(HiFiGan(HiFTGenerator(HiFTConfig.tiny())).discriminator, MultipleDiscriminator)
