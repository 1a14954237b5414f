"""HiFT vocoder: 80-bin mel -> waveform, at 24 kHz (CosyVoice2) or 22.05 kHz (CosyVoice1).

The network is a neural-source-filter HiFi-GAN whose last stage predicts an iSTFT spectrum:

1. an F0 predictor (five weight-normed convs + ELU, a linear head, ``abs``) gives one F0 per frame;
2. the F0 is held for ``samples_per_frame`` samples (480 at 24 kHz, 256 at 22.05 kHz) and drives a
   harmonic sine source (fundamental plus ``nb_harmonics`` overtones, voiced/unvoiced noise),
   merged into one excitation by a linear layer and ``tanh``;
3. the decoder upsamples the mel (x8, x5, x3 at 24 kHz; x8, x8 at 22.05 kHz), fusing at each stage
   the STFT of the excitation (downsampled by strided convs, refined by Snake residual blocks), and
   emits log-magnitude and phase for a 16-point iSTFT with hop 4; the waveform is clamped to
   ``audio_limit``.

The two versions differ, besides their sizes, in how the sine source integrates the phase, and
upstream picks the generator by the sampling rate alone (``SineGen`` at 22050 Hz, ``SineGen2``
otherwise); :attr:`HiFTConfig.sine_generator` follows the same rule:

* ``SineGen2`` (CosyVoice2): the per-sample phase increments are averaged down to frame rate,
  summed there and interpolated back up; random initial phases uniform in [0, 1) turns;
* ``SineGen`` (CosyVoice1): the increments are summed sample by sample (and wrapped to whole
  turns); random initial phases uniform in [-pi, pi) radians.

It computes what upstream's ``HiFTGenerator.inference`` computes, operation for operation, so
that with the same weights, mel and random seed the waveform is upstream's (to float rounding).
Random draws follow upstream's order: the initial harmonic phases (``rand(B, H)``, the
fundamental's zeroed), the sine noise ``randn(B, H, S)`` and the source module's noise
``randn(B, S, 1)`` that upstream draws and discards; they come from ``generator`` or, when it is
``None``, from torch's global generator.

Weight norm is folded at load time: the module keeps plain ``weight`` tensors, while
``load_hift`` accepts the released ``weight_g``/``weight_v`` naming (and torch's
parametrization naming) and ``hift_state_dict`` writes the released naming back.

Training (the HiFi-GAN of ``cosyvoice.acoustic.gan``) uses :meth:`HiFTGenerator.forward`, the
batched, differentiable form of upstream's ``HiFTGenerator.forward``: like upstream, the sine
source is computed without gradient (the F0 predictor learns only from its own L1 loss), and the
released weight-normed modules are trained under torch's ``weight_norm`` parametrization
(:func:`parametrize_weight_norm`, or ``load_hift(..., weight_norm=True)`` which keeps a file's
``weight_g``/``weight_v`` as the trained parameters); :func:`hift_state_dict` writes them back as
``weight_g``/``weight_v``. The in-place operations of the inference path are used only while
autograd is off, so inference is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

from cosyvoice.acoustic.checkpoint import StateSource, check_state, read_state_dict

__all__ = ["HiFTConfig", "HiFTGenerator", "load_hift", "hift_state_dict", "weight_normed_modules",
           "parametrize_weight_norm", "fold_weight_norm"]


@dataclass(frozen=True)
class HiFTConfig:
    """Constructor settings of the vocoder (upstream's ``hift`` recipe section)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512

    def __post_init__(self) -> None:
        problems = []
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            problems.append("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates):
            problems.append("one source resblock per upsampling stage is required")
        if len(self.source_resblock_dilation_sizes) != len(self.source_resblock_kernel_sizes):
            problems.append("source_resblock_dilation_sizes must match source_resblock_kernel_sizes")
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            problems.append("resblock_dilation_sizes must match resblock_kernel_sizes")
        if self.base_channels % (2 ** len(self.upsample_rates)):
            problems.append(f"base_channels {self.base_channels} must be divisible by 2**{len(self.upsample_rates)}")
        if problems:
            raise ValueError("invalid HiFTConfig: " + "; ".join(problems))

    @classmethod
    def full(cls) -> HiFTConfig:
        """The released CosyVoice2 vocoder."""
        return cls()

    @classmethod
    def tiny(cls) -> HiFTConfig:
        """Same topology and rates with 32 base channels, for fast tests."""
        return cls(base_channels=32, f0_cond_channels=32)

    @classmethod
    def v1(cls) -> HiFTConfig:
        """The released CosyVoice1 (CosyVoice-300M) vocoder: 22.05 kHz, 8 * 8 * 4 = 256 samples per
        mel frame (the ``hift`` section of upstream's examples/libritts/cosyvoice/conf/cosyvoice.yaml)."""
        return cls(sampling_rate=22050, upsample_rates=(8, 8), upsample_kernel_sizes=(16, 16),
                   source_resblock_kernel_sizes=(7, 11), source_resblock_dilation_sizes=((1, 3, 5),) * 2)

    @classmethod
    def tiny_v1(cls) -> HiFTConfig:
        """The CosyVoice1 topology and rates with 32 base channels, for fast tests."""
        return replace(cls.v1(), base_channels=32, f0_cond_channels=32)

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.hop_len

    @property
    def sine_generator(self) -> str:
        """Upstream's sine generator for these settings: ``"SineGen"`` at 22050 Hz (CosyVoice1),
        ``"SineGen2"`` otherwise; upstream decides by the sampling rate alone, and so do we."""
        return "SineGen" if self.sampling_rate == 22050 else "SineGen2"

    def upstream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for upstream's ``HiFTGenerator``.

        The ``f0_predictor`` entry holds the kwargs of upstream's ``ConvRNNF0Predictor``; replace it
        with the instance: ``kw = cfg.upstream_kwargs(); HiFTGenerator(**{**kw, "f0_predictor":
        ConvRNNF0Predictor(**kw["f0_predictor"])})``. Sequences are lists, as upstream expects.
        """
        return {
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "nb_harmonics": self.nb_harmonics,
            "sampling_rate": self.sampling_rate,
            "nsf_alpha": self.nsf_alpha,
            "nsf_sigma": self.nsf_sigma,
            "nsf_voiced_threshold": self.nsf_voiced_threshold,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "istft_params": {"n_fft": self.n_fft, "hop_len": self.hop_len},
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "source_resblock_kernel_sizes": list(self.source_resblock_kernel_sizes),
            "source_resblock_dilation_sizes": [list(d) for d in self.source_resblock_dilation_sizes],
            "lrelu_slope": self.lrelu_slope,
            "audio_limit": self.audio_limit,
            "f0_predictor": {"num_class": 1, "in_channels": self.in_channels, "cond_channels": self.f0_cond_channels},
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# building blocks


class _Snake(nn.Module):
    """Periodic activation ``x + sin(a*x)**2 / (a + 1e-9)`` with a per-channel ``alpha``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha[None, :, None]
        if torch.is_grad_enabled():  # autograd needs the intermediate values kept
            return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)
        s = torch.sin(x * a)
        s = s.mul_(s).mul_(1.0 / (a + 1e-9))
        return s.add_(x)


class _SnakeResBlock(nn.Module):
    """Three dilated conv pairs, each ``x += conv2(snake(conv1(snake(x))))``, length preserving."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(_Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(_Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))).add_(x)
        return x


class _F0Predictor(nn.Module):
    """Frame-level F0 from the mel: (1, 80, T) -> (1, T), non-negative."""

    def __init__(self, in_channels: int, cond_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)
        return self.classifier(h).squeeze(-1).abs()


class _HarmonicSource(nn.Module):
    """Neural-source-filter excitation at the output rate from the upsampled F0.

    Holds only ``l_linear`` (the harmonic merge); the sine generation has no parameters.
    """

    def __init__(self, cfg: HiFTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)
        self.register_buffer(
            "harmonic_numbers",
            torch.arange(1, cfg.nb_harmonics + 2, dtype=torch.float32)[None, None, :],
            persistent=False,
        )

    def forward(self, f0_up: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``f0_up``: (B, S, 1) -> excitation (B, S, 1).

        The harmonics are generated without gradient, as upstream's source module does in
        training too; only the merge (``l_linear``) learns from the waveform losses.
        """
        with torch.no_grad():
            excitation = self._harmonics(f0_up, generator)
        return torch.tanh(self.l_linear(excitation))

    def _harmonics(self, f0_up: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Noisy harmonic sines (B, S, H) from ``f0_up`` (B, S, 1); upstream's ``SineGen(2)``."""
        if self.cfg.sine_generator == "SineGen":
            excitation = self._sample_integrated(f0_up, generator)
        else:
            excitation = self._frame_integrated(f0_up, generator)
        # upstream's source module draws (and discards) a noise branch here; drawing it keeps the
        # RNG stream aligned
        torch.empty_like(f0_up).normal_(generator=generator)
        return excitation

    def _sample_integrated(self, f0_up: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """CosyVoice1's ``SineGen``: the phase is the running sum of the per-sample increments."""
        cfg = self.cfg
        batch = f0_up.shape[0]
        f0 = f0_up.transpose(1, 2)  # (B, 1, S)
        # per-sample increment (in turns) of every harmonic, laid out (B, H, S) as upstream's, so
        # that the sums and the noise draws below run in upstream's order
        turns = (f0 * self.harmonic_numbers.transpose(1, 2) / cfg.sampling_rate).contiguous()
        phase = 2 * math.pi * torch.remainder(torch.cumsum(turns, dim=-1), 1)
        # initial phases uniform in [-pi, pi), computed as torch's Uniform(-pi, pi) samples them
        low = torch.tensor(-math.pi, dtype=torch.float32, device=f0.device)
        span = torch.tensor(math.pi, dtype=torch.float32, device=f0.device) - low
        start = low + torch.rand(batch, cfg.nb_harmonics + 1, 1, generator=generator, device=f0.device) * span
        start[:, 0, :] = 0
        sines = cfg.nsf_alpha * torch.sin(phase + start)
        voiced = (f0 > cfg.nsf_voiced_threshold).to(torch.float32)
        noise_scale = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
        noise = noise_scale * torch.empty_like(sines).normal_(generator=generator)
        return (sines * voiced + noise).transpose(1, 2)

    def _frame_integrated(self, f0_up: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """CosyVoice2's ``SineGen2``: the phase is summed at frame rate and interpolated back up."""
        cfg = self.cfg
        hop = cfg.samples_per_frame
        n = cfg.nb_harmonics + 1
        batch, samples, _ = f0_up.shape
        # per-sample phase increment (in turns) of every harmonic, plus a random initial phase
        turns = torch.remainder(f0_up * self.harmonic_numbers / cfg.sampling_rate, 1)
        start = torch.rand(batch, n, generator=generator, device=f0_up.device)
        start[:, 0] = 0
        turns[:, 0, :] += start
        # integrate at frame rate (linear down-sampling), then interpolate the phase back up
        per_frame = F.interpolate(turns.transpose(1, 2), scale_factor=1 / hop, mode="linear")
        phase = torch.cumsum(per_frame.transpose(1, 2), dim=1) * 2 * math.pi
        phase = F.interpolate(phase.transpose(1, 2) * hop, scale_factor=hop, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        voiced = (f0_up > cfg.nsf_voiced_threshold).to(torch.float32)
        noise_scale = voiced * cfg.nsf_sigma + (1 - voiced) * cfg.nsf_alpha / 3
        # like randn_like: the draws fill memory order, and ``sines`` is laid out (B, H, S)
        noise = noise_scale * torch.empty_like(sines).normal_(generator=generator)
        return sines * voiced + noise


# --------------------------------------------------------------------------------------------
# the generator


def weight_normed_modules(cfg: HiFTConfig) -> list[str]:
    """Names of the sub-modules whose ``weight`` is weight-normed in the released files."""
    names = ["conv_pre", "conv_post"]
    names += [f"ups.{i}" for i in range(len(cfg.upsample_rates))]
    names += [f"f0_predictor.condnet.{i}" for i in range(0, 10, 2)]
    blocks = [(f"source_resblocks.{i}", d) for i, d in enumerate(cfg.source_resblock_dilation_sizes)]
    blocks += [
        (f"resblocks.{s * len(cfg.resblock_kernel_sizes) + j}", d)
        for s in range(len(cfg.upsample_rates))
        for j, d in enumerate(cfg.resblock_dilation_sizes)
    ]
    for prefix, dilations in blocks:
        for j in range(len(dilations)):
            names += [f"{prefix}.convs1.{j}", f"{prefix}.convs2.{j}"]
    return names


class HiFTGenerator(nn.Module):
    """HiFT vocoder (CosyVoice2 or CosyVoice1 settings) with folded weight norm; see the module docstring."""

    def __init__(self, config: HiFTConfig | None = None) -> None:
        super().__init__()
        cfg = config or HiFTConfig.full()
        self.config = cfg
        stages = len(cfg.upsample_rates)
        spec_channels = cfg.n_fft + 2
        width = [cfg.base_channels // 2**i for i in range(stages + 1)]

        self.m_source = _HarmonicSource(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, cfg.base_channels, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(width[i], width[i + 1], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # the excitation spectrum enters stage i at that stage's rate: stride = product of the
        # upsampling rates still to come
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i in range(stages):
            stride = math.prod(cfg.upsample_rates[i + 1:])
            if stride == 1:
                down = nn.Conv1d(spec_channels, width[i + 1], 1)
            else:
                down = nn.Conv1d(spec_channels, width[i + 1], 2 * stride, stride, padding=stride // 2)
            self.source_downs.append(down)
            self.source_resblocks.append(
                _SnakeResBlock(width[i + 1], cfg.source_resblock_kernel_sizes[i], cfg.source_resblock_dilation_sizes[i])
            )
        self.resblocks = nn.ModuleList(
            _SnakeResBlock(width[i + 1], k, d)
            for i in range(stages)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(width[-1], spec_channels, 7, padding=3)
        self.f0_predictor = _F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        # periodic Hann window, computed in float64 and rounded once (as scipy's get_window does)
        n = torch.arange(cfg.n_fft, dtype=torch.float64)
        window = (0.5 - 0.5 * torch.cos(2 * math.pi * n / cfg.n_fft)).to(torch.float32)
        self.register_buffer("stft_window", window, persistent=False)
        self.eval()

    # -- pieces ---------------------------------------------------------------------------------

    def source(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Excitation (B, 1, S) for a mel (B, 80, T); consumes the random draws."""
        return self._f0_and_source(mel, generator)[1]

    def _f0_and_source(self, mel: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        f0 = self.f0_predictor(mel)
        f0_up = F.interpolate(f0[:, None], scale_factor=self.config.samples_per_frame, mode="nearest")
        return f0, self.m_source(f0_up.transpose(1, 2), generator).transpose(1, 2)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Waveform (B, S) from the mel (B, 80, T) and the excitation (B, 1, S)."""
        cfg = self.config
        spec = torch.stft(
            source[:, 0], cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)
        spec = torch.cat([spec[..., 0], spec[..., 1]], dim=1)

        x = self.conv_pre(mel)
        per_stage = len(cfg.resblock_kernel_sizes)
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == last:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](spec))
            acc = self.resblocks[i * per_stage](x)
            for j in range(1, per_stage):
                acc += self.resblocks[i * per_stage + j](x)
            x = acc / per_stage

        # the spectrum and iSTFT in float32 even under bf16 autocast (complex bf16 does not exist;
        # upstream's --use_amp GAN run stops here); a no-op for float32 inference
        x = self.conv_post(F.leaky_relu(x)).float()
        bins = cfg.n_fft // 2 + 1
        grad = torch.is_grad_enabled()  # in place only while autograd is off
        magnitude = torch.exp(x[:, :bins])
        magnitude = magnitude.clamp(max=1e2) if grad else magnitude.clamp_(max=1e2)
        phase = torch.sin(x[:, bins:])
        spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spectrum, cfg.n_fft, cfg.hop_len, cfg.n_fft, window=self.stft_window)
        return wav.clamp(-cfg.audio_limit, cfg.audio_limit) if grad else wav.clamp_(-cfg.audio_limit, cfg.audio_limit)

    # -- training -------------------------------------------------------------------------------

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode a batch with autograd (training): upstream's ``HiFTGenerator.forward``.

        ``mel``: (B, 80, T) float32 on the model's device (padded frames included);
        ``generator``: source of the random draws (torch's global generator when ``None``), drawn
        in upstream's order for the whole batch. Returns ``(wav (B, hop*T), f0 (B, T))`` (``hop``:
        ``config.samples_per_frame``, 480 or 256); the F0
        is the predictor's output, for upstream's L1 loss against the pitch targets.
        """
        self._check_mel(mel, batched=True)
        f0, source = self._f0_and_source(mel, generator)
        return self.decode(mel, source), f0

    def _check_mel(self, mel: torch.Tensor, batched: bool) -> None:
        cfg = self.config
        want = "(B, " if batched else "(1, "
        if (not isinstance(mel, torch.Tensor) or mel.dim() != 3 or mel.shape[1] != cfg.in_channels
                or (not batched and mel.shape[0] != 1) or mel.shape[0] == 0):
            shape = tuple(mel.shape) if isinstance(mel, torch.Tensor) else type(mel).__name__
            raise ValueError(f"HiFT expects a mel of shape {want}{cfg.in_channels}, T); got {shape}")
        if mel.shape[2] == 0:
            raise ValueError("HiFT got an empty mel (0 frames)")
        if mel.dtype != torch.float32:
            raise ValueError(f"HiFT runs in float32; got a {mel.dtype} mel")

    # -- entry point ------------------------------------------------------------------------------

    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocode one mel.

        ``mel``: (1, 80, T) float32. ``cache_source``: (1, 1, n) excitation of the previous chunk
        that overwrites the first n samples of this one (streaming; n <= hop*T, ``hop`` =
        ``config.samples_per_frame``). ``generator``: the
        source of the random draws (torch's global generator when ``None``).
        Returns ``(wav (1, hop*T), source (1, 1, hop*T))``.
        """
        self._check_mel(mel, batched=False)
        mel = mel.to(self.stft_window.device)
        source = self.source(mel, generator)
        if cache_source is not None and cache_source.numel() > 0:
            n = cache_source.shape[-1]
            if cache_source.dim() != 3 or cache_source.shape[:2] != (1, 1) or n > source.shape[-1]:
                raise ValueError(
                    f"cache_source must have shape (1, 1, n) with n <= {source.shape[-1]}; got {tuple(cache_source.shape)}"
                )
            source[:, :, :n] = cache_source
        return self.decode(mel, source), source


# --------------------------------------------------------------------------------------------
# loading and saving in the released layout


def _fold(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch._weight_norm(v, g, 0)


def _norm_of(w: torch.Tensor) -> torch.Tensor:
    """Per-slice (dim 0) L2 norm of ``w``, computed the way folding computes it when available."""
    interface = getattr(torch, "_weight_norm_interface", None)
    if interface is not None and w.device.type == "cpu":
        return interface(w, torch.ones(w.shape[0], *([1] * (w.dim() - 1)), dtype=w.dtype), 0)[1]
    return torch.norm_except_dim(w, 2, 0)


_PARAMETRIZED = (".parametrizations.weight.original0", ".parametrizations.weight.original1")


def parametrize_weight_norm(model: HiFTGenerator) -> HiFTGenerator:
    """Put the released weight-normed modules under torch's ``weight_norm`` parametrization, in place.

    Training then updates the magnitude ``original0`` (``weight_g``) and the direction
    ``original1`` (``weight_v``) separately, as upstream does; each starts from the current
    weight (g = its norm, v = the weight). Modules already parametrized are left as they are.
    """
    for name in weight_normed_modules(model.config):
        module = model.get_submodule(name)
        if not parametrize.is_parametrized(module, "weight"):
            _torch_weight_norm(module)
    return model


def fold_weight_norm(model: HiFTGenerator) -> HiFTGenerator:
    """Replace each weight-norm parametrization by its current weight, in place (for inference)."""
    for name in weight_normed_modules(model.config):
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def hift_state_dict(model: HiFTGenerator) -> dict[str, torch.Tensor]:
    """The model's tensors in the released ``hift.pt`` naming (weight-normed ``weight_g``/``weight_v``).

    A parametrized module (training) writes its own ``original0``/``original1`` as
    ``weight_g``/``weight_v``. A folded one writes the weight as ``weight_v`` and its per-slice
    norm, computed as the fold computes it, as ``weight_g``, so loading the result gives back the
    same weights bit for bit. No ``generator.`` prefix.
    """
    normed = set(weight_normed_modules(model.config))
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        value = value.detach().clone()
        if leaf == "weight" and module in normed:
            out[f"{module}.weight_g"] = _norm_of(value)
            out[f"{module}.weight_v"] = value
        elif key.endswith(_PARAMETRIZED) and key.rsplit(".", 3)[0] in normed:
            out[f"{key.rsplit('.', 3)[0]}.weight_{'g' if key.endswith('original0') else 'v'}"] = value
        else:
            out[key] = value
    return out


def load_hift(
    source: StateSource,
    config: HiFTConfig | None = None,
    *,
    weight_norm: bool = False,
) -> HiFTGenerator:
    """Build a vocoder from a ``hift.pt`` (path, bytes or state dict), strictly, in eval mode.

    Accepts the released naming (``<m>.weight_g`` / ``<m>.weight_v``), torch's parametrization
    naming (``<m>.parametrizations.weight.original0`` / ``original1``) and plain folded
    ``<m>.weight``; a leading ``generator.`` (GAN-wrapper checkpoints) is stripped. Any missing
    or unexpected key, or a shape mismatch, raises ``ValueError`` naming them.

    ``weight_norm=True`` (training, e.g. fine-tuning a released vocoder): the weight-normed
    modules come back parametrized (:func:`parametrize_weight_norm`) with the file's g and v as
    their ``original0``/``original1``, as upstream's loading into its parametrized modules does.
    """
    cfg = config or HiFTConfig.full()
    state, where = read_state_dict(source, "HiFT")
    model = HiFTGenerator(cfg)
    expected = model.state_dict()
    normed = set(weight_normed_modules(cfg))

    renamed: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for raw_key, value in state.items():
        if not isinstance(raw_key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: entry {raw_key!r} is not a named tensor")
        key = raw_key[len("generator."):] if raw_key.startswith("generator.") else raw_key
        for suffix, part in (
            (".weight_g", "g"),
            (".weight_v", "v"),
            (".parametrizations.weight.original0", "g"),
            (".parametrizations.weight.original1", "v"),
        ):
            if key.endswith(suffix) and key[: -len(suffix)] in normed:
                module = key[: -len(suffix)]
                halves.setdefault(module, {})[part] = (raw_key, value)
                break
        else:
            if key in renamed:
                raise ValueError(f"{where}: key {key!r} appears twice (with and without 'generator.')")
            renamed[key] = value

    missing: list[str] = []
    mismatched: list[str] = []
    for module, parts in halves.items():
        key = f"{module}.weight"
        if set(parts) != {"g", "v"}:
            only, (raw_key, _) = next(iter(parts.items()))
            missing.append(f"{module}.weight_{'v' if only == 'g' else 'g'} (have {raw_key})")
            continue
        (_, g), (_, v) = parts["g"], parts["v"]
        want = expected[key].shape
        if v.shape != want or g.shape != (want[0],) + (1,) * (len(want) - 1):
            mismatched.append(f"{module}.weight_v/_g: file {tuple(v.shape)}/{tuple(g.shape)}, model {tuple(want)}")
            continue
        if key in renamed:
            raise ValueError(f"{where}: {module} has both a plain weight and weight-norm tensors")
        renamed[key] = _fold(v.to(torch.float32), g.to(torch.float32))

    config_name = "full" if cfg == HiFTConfig.full() else cfg
    check_state(renamed, expected, f"{where} (HiFT, config {config_name})", missing=missing, mismatched=mismatched,
                handled={f"{module}.weight" for module in halves})

    model.load_state_dict({k: v.to(torch.float32) for k, v in renamed.items()}, strict=True)
    if weight_norm:
        parametrize_weight_norm(model)
        with torch.no_grad():
            for module, parts in halves.items():
                pair = model.get_submodule(module).parametrizations.weight
                pair.original0.copy_(parts["g"][1])
                pair.original1.copy_(parts["v"][1])
    return model.eval()
