"""One readable training loop for the CosyVoice2/3 LLM, flow and HiFT GAN (``cosyvoice-pipeline train``).

Build from the recipe -> restore state -> per epoch: batches (accumulation, clipping, logging of
loss / acc / lr / grad norm / tokens or frames per second / MFU) -> CV -> checkpoint. Launched by
``torchrun`` (ranks from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or as a single process. What
differs between ``--model llm|flow|hifigan`` lives in :mod:`cosyvoice.train.models`: a batch is one
turn per optimizer (the GAN: discriminator, then generator, as upstream's ``train_one_epoc_gan``),
each turn is forward -> backward -> step of its own engine.

Upstream behaviour kept: flags, checkpoint files, CV per rank on the whole CV list, the epoch ends
when the first rank runs out of data. Fixed: ``--onnx_path`` optional (D2), DeepSpeed uses the
recipe's optimizer/lr/scheduler (D6), DPO averages over target positions (D7), DataLoader with 0
workers (D12), strict checkpoint loading (D13), an exact resume (optimizer, scheduler, RNG, data
position) instead of restarting the epoch and the learning-rate schedule.

Run integrity: no silent random Qwen2 init (``--allow_random_init`` or the recipe's
``allow_random_init`` to ask for it), ``--compile`` keeps the checkpoint keys, the logged loss is
the step mean over micro-batches and ranks, the epoch's last batch closes its accumulation window,
rank 0 alone writes the training state, resumes are checked against the run, and the data
pipeline's drop/filter counters are reported per epoch (tag ``DATA``).
"""


from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from cosyvoice.dataset.pipeline import STATS_KEY, PipelineConfig, TrainingDataset
from cosyvoice.train.checkpoint import (
    TrainState,
    load_model_weights,
    load_train_state,
    save_model_files,
    save_train_state,
)
from cosyvoice.train.engines import (
    DDPEngine,
    DeepSpeedEngine,
    all_ranks_have,
    deepspeed_dtype,
    load_deepspeed_config,
)
from cosyvoice.train.models import LLM, TrainedModel, trained_model
from cosyvoice.train.options import TrainOptions
from cosyvoice.train.reporting import Reporter, peak_flops
from cosyvoice.train.schedulers import build_scheduler

log = logging.getLogger("cosyvoice.train")


@dataclass
class TrainReport:
    model_dir: str
    epochs: int
    steps: int
    final_checkpoint: str
    cv_loss: float | None
    train_losses: list[float]
    throughput: float  # ``unit`` per second over the logged windows (all ranks)
    mfu: float | None
    dpo_skipped: int = 0
    data_stats: list[dict] = field(default_factory=list)  # per epoch: data-pipeline counters by name
    unit: str = "tokens"  # tokens (LLM) | frames (mel frames: flow, hifigan)


# -- set-up ---------------------------------------------------------------------------------------
def _distributed(opts: TrainOptions) -> tuple[int, int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = opts.dist_backend if device.type == "cuda" else "gloo"
        if backend != opts.dist_backend:
            log.info("no CUDA device: using the gloo backend instead of %s", opts.dist_backend)
        if opts.train_engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend)
    return world, rank, local_rank, device


def _optimizer(module: torch.nn.Module, conf: dict, suffix: str, device: torch.device) -> torch.optim.Optimizer:
    name = conf.get(f"optim{suffix}", "adam")
    kwargs = dict(conf.get(f"optim_conf{suffix}") or {})
    kwargs["lr"] = float(kwargs.get("lr", 1e-3))
    params = [p for p in module.parameters() if p.requires_grad]
    if device.type == "cuda":
        kwargs.setdefault("fused", True)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"train_conf.optim{suffix} must be adam or adamw, got {name!r}")


@contextlib.contextmanager
def _fixed_rng(seed: int, device: torch.device):
    """CV draws bistream/unistream layouts (LLM) and prompt regions / flow times (flow) from the
    RNGs; fix them so CV losses of different checkpoints compare like with like, and leave the
    training streams untouched (Python's and torch's, CUDA's included)."""
    saved = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(saved)


class Trainer:
    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.world, self.rank, self.local_rank, self.device = _distributed(opts)
        self.task: TrainedModel = trained_model(opts)
        self.configs = self.task.configs
        conf = dict(self.configs.get(self.task.train_conf_key) or {})
        for key in ("max_epoch", "save_per_step", "log_interval", "accum_grad"):
            if getattr(opts, key) is not None:
                conf[key] = getattr(opts, key)
        self.ds_config = None
        if opts.train_engine == "deepspeed":
            if not opts.deepspeed_config:
                raise ValueError("--train_engine deepspeed needs --deepspeed_config (e.g. configs/ds_stage2.json)")
            self.ds_config = load_deepspeed_config(opts.deepspeed_config)
            conf["accum_grad"] = int(self.ds_config.get("gradient_accumulation_steps", 1))
            conf["grad_clip"] = float(self.ds_config.get("gradient_clipping", conf.get("grad_clip", 5)))
            conf.setdefault("log_interval", self.ds_config.get("steps_per_print", 100))
            self.amp_dtype = deepspeed_dtype(self.ds_config)
        else:
            self.amp_dtype = torch.bfloat16 if opts.use_amp else torch.float32
        if len(self.task.parts()) > 1 and int(conf.get("accum_grad", 1)) != 1:
            raise ValueError(f"--model {opts.model}: accum_grad must be 1 (the discriminator and generator step on "
                             f"every batch, as upstream requires); got {conf.get('accum_grad')}")
        conf["dtype"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
        self.conf = conf
        self.model = self.task.module
        self.start = TrainState(epoch=0, step=0, batch_in_epoch=0, optimizer=None, scheduler=None, rng={})
        self._load_checkpoint()
        self.task.setup(self.device)
        self.model.to(self.device)
        self.pipeline = self._pipeline_config()
        if isinstance(self.task, LLM):
            self.task.configure_attention(self.pipeline.batch_type == "token" if opts.pack is None else opts.pack,
                                          self.device)
        self.engines: dict = {}
        for part in self.task.parts():
            optimizer = _optimizer(part.module, conf, part.conf_suffix, self.device)
            s = part.conf_suffix
            scheduler = build_scheduler(conf.get(f"scheduler{s}", "constantlr"), optimizer,
                                        conf.get(f"scheduler_conf{s}"))
            if self.ds_config is not None:
                self.engines[part.name] = DeepSpeedEngine(part.module, optimizer, scheduler, config=self.ds_config)
            else:
                self.engines[part.name] = DDPEngine(part.module, optimizer, scheduler, device=self.device,
                                                    accum_grad=int(conf.get("accum_grad", 1)),
                                                    grad_clip=float(conf.get("grad_clip", 5)), world_size=self.world)
        self._restore_optimizer_state()
        if self.start.rng:
            self.start.restore_rng()
        self.reporter = Reporter(opts.model_dir, opts.tensorboard_dir, enabled=self.rank == 0)
        self.peak = opts.peak_flops or (peak_flops(torch.cuda.get_device_name(self.device))
                                        if self.device.type == "cuda" else None)
        self.flops_per_unit = self.task.flops_per_unit

    _resume_name: str | None = None
    _exact_resume: bool = False

    @property
    def engine(self):
        """The engine of the last turn (the one model of the LLM/flow; the GAN's generator)."""
        return self.engines[self.task.parts()[-1].name]

    def _native_name(self, name: str, part: str) -> str:
        """DeepSpeed's checkpoint tag of ``part``: the checkpoint name itself for a one-part model."""
        return name if len(self.engines) == 1 else f"{name}.{part}"

    def _restore_optimizer_state(self) -> None:
        """Optimizers and LR schedules of the checkpoint, checked against this run.

        Exact resume (a ``.state.pt`` next to the checkpoint): the state must come from the same
        engine; DDP loads the optimizers/schedulers from it, DeepSpeed from its ``<name>/`` directories
        (one per part), which must exist, load, and be at the same step. Weights-only checkpoints
        (upstream files, averaged models) start fresh optimizers with the schedules placed at the
        checkpoint's step. Either way every schedule ends at the resumed step, which is checked."""
        start, path = self.start, self.opts.checkpoint
        if not self._exact_resume:
            if start.step:
                for engine in self.engines.values():
                    engine.scheduler.set_step(start.step)  # upstream-style checkpoint: keep the schedule position
            return
        if start.engine is not None and start.engine != self.engine.name:
            raise ValueError(f"--checkpoint {path}: its training state was written by --train_engine {start.engine}, "
                             f"this run uses {self.engine.name}; resume with --train_engine {start.engine}, or "
                             "start from the weights alone by copying the .pt without its .state.pt")
        single = len(self.engines) == 1
        for part, engine in self.engines.items():
            if engine.name == "deepspeed":
                tag = self._native_name(self._resume_name, part)
                native = os.path.join(os.path.dirname(path), tag)
                if not os.path.isdir(native):
                    raise FileNotFoundError(
                        f"--checkpoint {path}: the DeepSpeed optimizer/scheduler state {native}/ is missing (expected "
                        "next to the .pt, as DeepSpeed wrote it); restore that directory, or start from the weights "
                        "alone by copying the .pt without its .state.pt")
                client = engine.load_native(os.path.dirname(path), tag)
                if int(client.get("step", -1)) != start.step:
                    raise ValueError(f"--checkpoint {path}: DeepSpeed state {native}/ is at step {client.get('step')}, "
                                     f"the training state at step {start.step}: they belong to different checkpoints")
            else:
                optimizer = start.optimizer if single else (start.optimizer or {}).get(part)
                scheduler = start.scheduler if single else (start.scheduler or {}).get(part)
                if optimizer is None or scheduler is None:
                    raise ValueError(f"--checkpoint {path}: {os.path.basename(path)[:-3]}.state.pt holds no optimizer/"
                                     f"scheduler state{'' if single else ' for the ' + part}; start from the weights "
                                     "alone by copying the .pt without it")
                engine.load_state(optimizer, scheduler)
            if engine.scheduler.last_epoch != start.step:
                raise ValueError(f"--checkpoint {path}: the restored LR schedule{'' if single else ' of the ' + part} "
                                 f"is at step {engine.scheduler.last_epoch}, the checkpoint at step {start.step}")

    def _load_checkpoint(self) -> None:
        path = self.opts.checkpoint
        if not path:
            return
        if not os.path.exists(path):
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        sd, epoch, step = load_model_weights(path)
        self.task.load_weights(sd, path)
        state = load_train_state(path, self.rank)
        self._resume_name = os.path.basename(path)[:-3]
        if state is not None:
            if state.model is not None and state.model != self.opts.model:
                raise ValueError(f"--checkpoint {path}: its training state belongs to --model {state.model}, "
                                 f"this run trains --model {self.opts.model}")
            self.task.load_extra_state(state.extra, path)
            self.start = state
            self._exact_resume = True
            if state.rank_rngs is not None and state.world_size != self.world:
                log.warning("%s was written by %d ranks, this run has %d: the data order and RNG streams differ "
                            "from the saved run (the resume is not exact)", path, state.world_size, self.world)
            log.info("resuming exactly from %s: epoch %d, step %d, %d batches into the epoch",
                     path, state.epoch, state.step, state.batch_in_epoch)
        else:
            name = os.path.basename(path)
            whole = name.endswith("_whole.pt")
            self.start = TrainState(epoch=(epoch + 1 if whole else max(epoch or 0, 0)) if epoch is not None else 0,
                                    step=step or 0, batch_in_epoch=0, optimizer=None, scheduler=None, rng={})
            log.info("loaded weights from %s (no training state next to it): epoch %d, step %d, fresh optimizer",
                     path, self.start.epoch, self.start.step)

    def _pipeline_config(self) -> PipelineConfig:
        o = self.opts
        changes = {"skip_unreadable_shards": o.skip_unreadable_shards, **self.task.pipeline_changes()}
        for key in ("batch_type", "max_tokens_in_batch", "max_frames_in_batch"):
            if getattr(o, key) is not None:
                changes[key] = getattr(o, key)
        tokenizer = changes.pop("qwen_pretrain_path", None) or o.qwen_pretrain_path or ""
        return PipelineConfig.from_recipe(self.configs, tokenizer, **changes)

    def _loader(self, data_list: str, train: bool, epoch: int):
        dataset = TrainingDataset(data_list, self.pipeline, train=train, seed=self.opts.seed, report_stats=train)
        dataset.set_epoch(epoch)
        kwargs = dict(batch_size=None, num_workers=self.opts.num_workers, pin_memory=self.opts.pin_memory,
                      generator=torch.Generator().manual_seed(self.opts.seed + epoch))
        if self.opts.num_workers > 0:  # torch refuses a prefetch factor without workers (D12)
            kwargs["prefetch_factor"] = self.opts.prefetch
        return torch.utils.data.DataLoader(dataset, **kwargs)

    # -- steps --------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    @torch.inference_mode()
    def cross_validate(self, epoch: int) -> dict[str, float]:
        """Utterance-weighted mean of every loss key over the whole CV list (on every rank)."""
        self.model.eval()
        totals: dict[str, float] = {}
        utts = 0
        with _fixed_rng(self.opts.seed, self.device):
            for batch in self._loader(self.opts.cv_data, train=False, epoch=epoch):
                n = len(batch["utts"])
                with self._autocast():
                    out = self.task.cv_losses(batch, self.device)
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
                utts += n
        self.model.train()
        if not utts:
            raise RuntimeError(f"{self.opts.cv_data}: the CV list produced no batch (all rows filtered?)")
        return {k: v / utts for k, v in totals.items()}

    def _save(self, name: str, epoch: int, step: int, batch_in_epoch: int, tag: str, loss_dict: dict) -> str:
        """Upstream files (epoch = the epoch the checkpoint belongs to) + the resumable state, which
        points at the next batch to run (the next epoch's first for a whole-epoch checkpoint).

        Rank 0 writes ``<name>.pt``/``.yaml``/``.state.pt`` (the state holds every rank's RNG
        states, gathered here); DeepSpeed's ``<name>/`` directory gets each rank's own shard."""
        info = {**self.conf, **asdict(self.opts),
                "epoch": epoch, "step": step, "batch_idx": batch_in_epoch, "tag": tag, "loss_dict": loss_dict,
                "lr": self.engine.lr()}
        path = os.path.join(self.opts.model_dir, f"{name}.pt")
        for part, engine in self.engines.items():
            engine.save_native(self.opts.model_dir, self._native_name(name, part), info)
        rng = TrainState.capture_rng()
        rank_rngs = [rng]
        if self.world > 1:
            rank_rngs = [None] * self.world
            dist.all_gather_object(rank_rngs, rng)
        if self.rank == 0:
            states = {part: engine.state() for part, engine in self.engines.items()}
            if len(states) == 1:
                optimizer, scheduler = next(iter(states.values()))
            else:
                optimizer, scheduler = ({p: s[0] for p, s in states.items()}, {p: s[1] for p, s in states.items()})
            resume_epoch, resume_batch = (epoch + 1, 0) if name.endswith("_whole") else (max(epoch, 0), batch_in_epoch)
            state = TrainState(resume_epoch, step, resume_batch, optimizer, scheduler, rng, rank_rngs, self.world,
                               self.engine.name, model=self.opts.model, extra=self.task.extra_state())
            path = save_model_files(self.task.weights(), self.opts.model_dir, name, info)
            save_train_state(state, path)
        if self.world > 1:
            dist.barrier()
        return path

    def _data_counts(self, counts: Counter) -> dict[str, int]:
        """This epoch's data-pipeline counters (dropped/filtered utterances by reason, and any other
        counter the processors keep), summed over DataLoader workers (they arrive with the batches)
        and over ranks. Covers the data each rank consumed before the epoch ended."""
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, dict(counts))
            counts = Counter()
            for part in gathered:
                counts.update(part)
        return {k: int(v) for k, v in sorted(counts.items())}

    def _run_turns(self, batch: dict, boundary: bool, means: _StepMeans) -> tuple[float, bool] | None:
        """One batch: each part's turn (forward, backward, step on a boundary) in order. Logged values
        of the GAN's discriminator turn are prefixed ``d_`` (its ``loss`` is ``d_loss``)."""
        result = None
        for part in self.task.parts():
            engine = self.engines[part.name]
            with engine.sync_context(boundary):
                with self._autocast():
                    out = self.task.turn(part.name, self.engines, batch, self.device)
                engine.backward(out["loss"])
            stepped = engine.after_backward(boundary)
            if part.name == "discriminator":
                out = {f"d_{k}": v for k, v in out.items()}
            means.add(out)
            result = stepped
        return result

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainReport:
        """The loop. Accumulation windows are counted from each epoch's first batch; the last batch of
        an epoch always closes its window, so an epoch whose batch count is not a multiple of
        ``accum_grad`` ends with one optimizer step on the k < accum_grad micro-batches left (each
        micro-batch contributes loss/accum_grad as everywhere else, so those samples weigh what any
        sample weighs; nothing is carried into the next epoch or dropped). The logged loss/acc of a
        step is the mean over its micro-batches and ranks (see ``_StepMeans``)."""
        o, conf = self.opts, self.conf
        max_epoch = int(conf.get("max_epoch", 1))
        log_interval = max(int(conf.get("log_interval", 100)), 1)
        save_per_step = int(conf.get("save_per_step", -1))
        accum = self.engine.accum_grad
        unit = self.task.unit
        step, start_epoch, skip = self.start.step, self.start.epoch, self.start.batch_in_epoch
        if self.opts.checkpoint is None:
            self._save("init", -1, 0, 0, "TRAIN", {})
        losses: list[float] = []
        data_stats: list[dict] = []
        last = os.path.join(o.model_dir, "init.pt")
        evaluated_at: tuple[int, int] | None = None  # (epoch, step) of the last step checkpoint: CV'd and saved
        cv: dict[str, float] = {}
        window = {"units": 0, "time": time.perf_counter()}
        total_units, total_time = 0, 0.0
        dpo_skipped = 0
        stop = False
        self.model.train()
        for epoch in range(start_epoch, max_epoch):
            counts: Counter = Counter()
            batches = _without_stats(self._loader(o.train_data, train=True, epoch=epoch), counts)
            for _ in range(skip):  # exact resume: replay the data position of the saved state
                next(batches, None)
            batch_idx = skip - 1
            skip = 0
            for engine in self.engines.values():
                engine.optimizer.zero_grad(set_to_none=True)
            means = _StepMeans()
            batch = next(batches, None)
            have = all_ranks_have(batch is not None, self.device)
            while have:
                batch_idx += 1
                upcoming = next(batches, None)  # one ahead: the epoch's last batch closes its window
                have_next = all_ranks_have(upcoming is not None, self.device)
                boundary = (batch_idx + 1) % accum == 0 or not have_next
                t0 = time.perf_counter()
                result = self._run_turns(batch, boundary, means)
                real, padded = self.task.counts(batch)
                batch, have = upcoming, have_next
                window["units"] += real
                dpo_skipped += means.pop_skipped()
                if result is None:
                    continue
                norm, _ = result
                step += 1
                values = means.reduce(self.device, self.world)
                means = _StepMeans()
                losses.append(values["loss"])
                if step % log_interval == 0 or step == 1:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - window["time"]
                    rate = window["units"] * self.world / elapsed if elapsed > 0 else 0.0
                    total_units += window["units"] * self.world
                    total_time += elapsed
                    mfu = self.flops_per_unit * rate / (self.peak * self.world) if self.peak and self.flops_per_unit else None
                    values.update({"epoch": epoch, "lr": self.engine.lr(), "grad_norm": norm, f"{unit}_per_s": rate,
                                   "mfu": mfu, "step_time": time.perf_counter() - t0,
                                   "padded_fraction": 1 - real / max(padded, 1)})
                    self.reporter.log("TRAIN", step, values)
                    window = {"units": 0, "time": time.perf_counter()}
                if save_per_step > 0 and step % save_per_step == 0:
                    cv = self.cross_validate(epoch)
                    self.reporter.log("CV", step, {**cv, "epoch": epoch, "lr": self.engine.lr()})
                    last = self._save(f"epoch_{epoch}_step_{step}", epoch, step, batch_idx + 1, "CV", cv)
                    evaluated_at = (epoch, step)
                if o.max_steps is not None and step >= o.max_steps:
                    stop = True
                    break
            data_stats.append({"epoch": epoch, **self._data_counts(counts)})
            self.reporter.log("DATA", step, data_stats[-1])
            if stop:
                if evaluated_at != (epoch, step):
                    cv = self.cross_validate(epoch)
                    last = self._save(f"epoch_{epoch}_step_{step}", epoch, step, batch_idx + 1, "CV", cv)
                break
            if self.world > 1:
                dist.monitored_barrier(timeout=_timedelta(o.timeout)) if dist.get_backend() == "gloo" else dist.barrier()
            if evaluated_at != (epoch, step):  # else the same weights were just evaluated
                cv = self.cross_validate(epoch)
                self.reporter.log("CV", step, {**cv, "epoch": epoch, "lr": self.engine.lr()})
            last = self._save(f"epoch_{epoch}_whole", epoch, step, batch_idx + 1, "CV", cv)
        rate = total_units / total_time if total_time else 0.0
        mfu = self.flops_per_unit * rate / (self.peak * self.world) if self.peak and self.flops_per_unit else None
        report = TrainReport(o.model_dir, max_epoch, step, last, cv.get("loss"), losses, rate, mfu, dpo_skipped,
                             data_stats, unit)
        result = {"steps": step, "epochs": max_epoch, "checkpoint": last, f"{unit}_per_s": rate,
                  "dpo_skipped": dpo_skipped, "data_stats": data_stats, "data_totals": _totals(data_stats),
                  "model": o.model}
        result.update({k: v for k, v in (("cv_loss", report.cv_loss), ("mfu", report.mfu)) if v is not None})
        self.reporter.report_result(result)
        self.reporter.close()
        return report


class _StepMeans:
    """The values logged for one optimizer step: the mean over its micro-batches and ranks.

    Every micro-batch weighs the same (not by tokens): its loss is already normalised within the
    micro-batch, each contributes ``loss / accum_grad`` to the gradient and DDP/DeepSpeed average
    gradients over ranks with equal weights, so this mean is the objective the step optimised.
    A batch of several turns (the GAN) adds each turn's keys once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped = 0

    def add(self, out: dict) -> None:
        for k, v in out.items():
            if k.endswith("dpo_skipped"):
                self.skipped += int(v)
                continue
            v = v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v.to(self.sums[k].device) if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop_skipped(self) -> int:
        skipped, self.skipped = self.skipped, 0
        return skipped

    def reduce(self, device: torch.device, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k].to(device, torch.float64) for k in keys]
                          + [torch.tensor(float(self.counts[k]), dtype=torch.float64, device=device) for k in keys])
        if world > 1:
            dist.all_reduce(vec)
        total = vec.tolist()
        return {k: total[i] / total[len(keys) + i] for i, k in enumerate(keys)}


def _without_stats(loader, counts: Counter):
    """Batches of ``loader`` with the data-pipeline counters they carry moved into ``counts``
    (``TrainingDataset(report_stats=True)``); counter-only items (a worker's last counts) are not batches."""
    for item in loader:
        extra = item.pop(STATS_KEY, None)
        if extra:
            counts.update(extra)
        if item:
            yield item


def _totals(per_epoch: list[dict]) -> dict[str, int]:
    totals: Counter = Counter()
    for entry in per_epoch:
        totals.update({k: v for k, v in entry.items() if k != "epoch"})
    return dict(sorted(totals.items()))


def _timedelta(seconds: int):
    import datetime

    return datetime.timedelta(seconds=seconds)


def train(opts: TrainOptions) -> TrainReport:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    trainer = Trainer(opts)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
