"""One readable training loop for the CosyVoice2/3 LLM (``cosyvoice-pipeline train``).

Build from the recipe -> restore state -> per epoch: batches (accumulation, clipping, logging of
loss / acc / lr / grad norm / tokens per second / MFU) -> CV -> checkpoint. Launched by
``torchrun`` (ranks from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or as a single process.

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
import copy
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from cosyvoice.config import load_recipe, training_overrides
from cosyvoice.dataset.pipeline import STATS_KEY, PipelineConfig, TrainingDataset
from cosyvoice.train.checkpoint import (
    TrainState,
    load_model_weights,
    load_train_state,
    save_model_files,
    save_train_state,
)
from cosyvoice.train.dpo import dpo_loss
from cosyvoice.train.engines import (
    DDPEngine,
    DeepSpeedEngine,
    all_ranks_have,
    deepspeed_dtype,
    load_deepspeed_config,
)
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
    tokens_per_second: float
    mfu: float | None
    dpo_skipped: int = 0
    data_stats: list[dict] = field(default_factory=list)  # per epoch: data-pipeline counters by name


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


def _optimizer(model: torch.nn.Module, conf: dict, device: torch.device) -> torch.optim.Optimizer:
    name = conf.get("optim", "adam")
    kwargs = dict(conf.get("optim_conf") or {})
    kwargs["lr"] = float(kwargs.get("lr", 1e-3))
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        kwargs.setdefault("fused", True)
    if name == "adam":
        return torch.optim.Adam(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"train_conf.optim must be adam or adamw, got {name!r}")


def _freeze_unused_lm_head(model: torch.nn.Module) -> None:
    """The HF lm_head is not used by the speech LLM; when it is not tied to the text embeddings it
    gets no gradient, which DDP would otherwise have to search for every step."""
    qwen = model.llm.model
    if qwen.lm_head.weight is not qwen.model.embed_tokens.weight:
        qwen.lm_head.weight.requires_grad_(False)


def non_embedding_params(model: torch.nn.Module) -> int:
    skip = {id(model.llm.model.model.embed_tokens.weight), id(model.llm.model.lm_head.weight),
            id(model.speech_embedding.weight)}
    if hasattr(model, "llm_embedding"):
        skip.add(id(model.llm_embedding.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _auto_attention(packed: bool, device: torch.device) -> str | None:
    """Packed rows want variable-length attention (no work across utterance boundaries): FlashAttention-2
    when installed on a GPU; otherwise the model's default (SDPA with the packed-sequence mask)."""
    import importlib.util

    if packed and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


@contextlib.contextmanager
def _fixed_python_rng(seed: int):
    """CV draws bistream/unistream layouts from ``random``; fix them so CV losses of different
    checkpoints compare like with like, and leave the training stream untouched."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


class Trainer:
    def __init__(self, opts: TrainOptions):
        self.opts = opts
        self.world, self.rank, self.local_rank, self.device = _distributed(opts)
        if opts.model != "llm":
            raise ValueError(f"--model {opts.model}: only the llm is trained by cosyvoice-pipeline "
                             "(flow/hifigan come with the acoustic-model stage)")
        overrides = training_overrides("llm", opts.qwen_pretrain_path)
        self.configs = load_recipe(opts.config, overrides)
        conf = dict(self.configs.get("train_conf") or {})
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
        conf["dtype"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
        self.conf = conf
        self.model = self.configs["llm"]
        self._refuse_silent_random_init()
        _freeze_unused_lm_head(self.model)
        self.ref_model = None
        self.start = TrainState(epoch=0, step=0, batch_in_epoch=0, optimizer=None, scheduler=None, rng={})
        self._load_checkpoint()
        if opts.dpo:
            if not hasattr(self.model, "forward_dpo"):
                raise ValueError("--dpo needs a Qwen2LM/CosyVoice3LM llm")
            self.ref_model = copy.deepcopy(self.model)
            if opts.ref_model:
                sd, _, _ = load_model_weights(opts.ref_model)
                self.ref_model.load_state_dict(sd, strict=True)
            self.ref_model.requires_grad_(False).eval().to(self.device)
        self.model.to(self.device)
        self.pipeline = self._pipeline_config()
        self.model.packed = self.pipeline.batch_type == "token" if opts.pack is None else opts.pack
        attn = opts.attn_implementation or _auto_attention(self.model.packed, self.device)
        if attn:
            self.model.llm.model.set_attn_implementation(attn)
        if opts.onnx_path:
            from cosyvoice.train.online import OnlineSpeechTokenizer

            self.model.speech_token_extractor = OnlineSpeechTokenizer.for_model(opts.onnx_path, self.model)
        optimizer = _optimizer(self.model, conf, self.device)
        scheduler = build_scheduler(conf.get("scheduler", "constantlr"), optimizer, conf.get("scheduler_conf"))
        if self.ds_config is not None:
            self.engine = DeepSpeedEngine(self.model, optimizer, scheduler, config=self.ds_config)
        else:
            self.engine = DDPEngine(self.model, optimizer, scheduler, device=self.device,
                                    accum_grad=int(conf.get("accum_grad", 1)),
                                    grad_clip=float(conf.get("grad_clip", 5)), world_size=self.world)
        self._restore_optimizer_state(scheduler)
        if self.start.rng:
            self.start.restore_rng()
        self.reporter = Reporter(opts.model_dir, opts.tensorboard_dir, enabled=self.rank == 0)
        self.peak = opts.peak_flops or (peak_flops(torch.cuda.get_device_name(self.device))
                                        if self.device.type == "cuda" else None)
        self.flops_per_token = 6 * non_embedding_params(self.model)
        if opts.compile:
            # in place (nn.Module.compile): the module tree and so the state-dict keys stay the same;
            # torch.compile(module) would wrap it and prefix every key with ``_orig_mod.``
            self.model.llm.model.model.compile(dynamic=True)

    _resume_name: str | None = None
    _exact_resume: bool = False

    def _restore_optimizer_state(self, scheduler) -> None:
        """Optimizer and LR schedule of the checkpoint, checked against this run.

        Exact resume (a ``.state.pt`` next to the checkpoint): the state must come from the same
        engine; DDP loads the optimizer/scheduler from it, DeepSpeed from its ``<name>/`` directory,
        which must exist, load, and be at the same step. Weights-only checkpoints (upstream files,
        averaged models) start a fresh optimizer with the schedule placed at the checkpoint's step.
        Either way the schedule ends at the resumed step, which is checked."""
        start, path = self.start, self.opts.checkpoint
        if not self._exact_resume:
            if start.step:
                scheduler.set_step(start.step)  # upstream-style checkpoint: keep the schedule position
            return
        if start.engine is not None and start.engine != self.engine.name:
            raise ValueError(f"--checkpoint {path}: its training state was written by --train_engine {start.engine}, "
                             f"this run uses {self.engine.name}; resume with --train_engine {start.engine}, or "
                             "start from the weights alone by copying the .pt without its .state.pt")
        if self.engine.name == "deepspeed":
            native = os.path.join(os.path.dirname(path), self._resume_name)
            if not os.path.isdir(native):
                raise FileNotFoundError(
                    f"--checkpoint {path}: the DeepSpeed optimizer/scheduler state {native}/ is missing (expected "
                    "next to the .pt, as DeepSpeed wrote it); restore that directory, or start from the weights "
                    "alone by copying the .pt without its .state.pt")
            client = self.engine.load_native(os.path.dirname(path), self._resume_name)
            if int(client.get("step", -1)) != start.step:
                raise ValueError(f"--checkpoint {path}: DeepSpeed state {native}/ is at step {client.get('step')}, "
                                 f"the training state at step {start.step}: they belong to different checkpoints")
        else:
            if start.optimizer is None or start.scheduler is None:
                raise ValueError(f"--checkpoint {path}: {os.path.basename(path)[:-3]}.state.pt holds no optimizer/"
                                 "scheduler state; start from the weights alone by copying the .pt without it")
            self.engine.load_state(start.optimizer, start.scheduler)
        if scheduler.last_epoch != start.step:
            raise ValueError(f"--checkpoint {path}: the restored LR schedule is at step {scheduler.last_epoch}, "
                             f"the checkpoint at step {start.step}")

    def _refuse_silent_random_init(self) -> None:
        """A Qwen2 body that found no weights under ``qwen_pretrain_path`` was initialised at random.
        That is only right when asked for (``--allow_random_init`` or the recipe's
        ``allow_random_init: true``, which the tiny recipes set) or when ``--checkpoint`` replaces
        every weight anyway; otherwise a mistyped path would silently train a model from scratch."""
        from cosyvoice.llm.qwen2 import Qwen2Encoder, expected_weight_files

        allowed = self.opts.allow_random_init or bool(self.configs.get("allow_random_init", False))
        if allowed or self.opts.checkpoint:
            return
        for module in self.model.modules():
            if isinstance(module, Qwen2Encoder) and not module.pretrained:
                path = module.pretrain_path or self.opts.qwen_pretrain_path or ""
                raise ValueError(
                    f"qwen_pretrain_path {path!r} holds no Qwen2 weights (expected {expected_weight_files()} "
                    "there, e.g. the CosyVoice-BlankEN dir): training would start from a randomly initialised "
                    "Qwen2 body. Pass --qwen_pretrain_path <dir with the weights>, --checkpoint <llm .pt> to "
                    "fine-tune, or --allow_random_init (recipe key `allow_random_init: true`) to train from "
                    "scratch on purpose.")

    def _load_checkpoint(self) -> None:
        path = self.opts.checkpoint
        if not path:
            return
        if not os.path.exists(path):
            raise FileNotFoundError(f"--checkpoint {path}: no such file")
        sd, epoch, step = load_model_weights(path)
        self.model.load_state_dict(sd, strict=True)
        state = load_train_state(path, self.rank)
        self._resume_name = os.path.basename(path)[:-3]
        if state is not None:
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
        changes = {"dpo": o.dpo, "whisper_feat": bool(o.onnx_path),
                   "campplus_onnx": os.path.join(o.onnx_path, "campplus.onnx") if o.onnx_path else None,
                   "skip_unreadable_shards": o.skip_unreadable_shards}
        for key in ("batch_type", "max_tokens_in_batch", "max_frames_in_batch"):
            if getattr(o, key) is not None:
                changes[key] = getattr(o, key)
        return PipelineConfig.from_recipe(self.configs, o.qwen_pretrain_path or "", **changes)

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

    def _batch_losses(self, batch: dict) -> dict:
        if not self.opts.dpo:
            return self.engine.forward("forward", batch, self.device)
        # the reference scores the very sequences the policy saw: replay the bistream/unistream draws
        # (upstream draws them again, so policy and reference compare different layouts)
        draws = random.getstate()
        out = self.engine.forward("forward_dpo", batch, self.device)
        after = random.getstate()
        random.setstate(draws)
        with torch.no_grad():
            ref = self.ref_model.forward_dpo(batch, self.device)
        random.setstate(after)
        loss_dpo, chosen_reward, rejected_reward = dpo_loss(out["chosen_logps"], out["rejected_logps"],
                                                            ref["chosen_logps"], ref["rejected_logps"],
                                                            beta=self.opts.dpo_beta)
        return {"loss": loss_dpo + out["loss"], "sft_loss": out["loss"].detach(), "dpo_loss": loss_dpo.detach(),
                "acc": out["acc"], "dpo_acc": (chosen_reward > rejected_reward).float().mean()
                if chosen_reward.numel() else torch.tensor(float("nan")),
                "chosen_reward": chosen_reward.mean() if chosen_reward.numel() else torch.tensor(float("nan")),
                "reject_reward": rejected_reward.mean() if rejected_reward.numel() else torch.tensor(float("nan")),
                "dpo_skipped": out["dpo_skipped"]}

    @torch.inference_mode()
    def cross_validate(self, epoch: int) -> dict[str, float]:
        """Utterance-weighted mean of every loss key over the whole CV list (on every rank)."""
        self.model.eval()
        totals: dict[str, float] = {}
        utts = 0
        with _fixed_python_rng(self.opts.seed):
            for batch in self._loader(self.opts.cv_data, train=False, epoch=epoch):
                n = len(batch["utts"])
                with self._autocast():
                    out = self._cv_losses(batch)
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * n
                utts += n
        self.model.train()
        if not utts:
            raise RuntimeError(f"{self.opts.cv_data}: the CV list produced no batch (all rows filtered?)")
        return {k: v / utts for k, v in totals.items()}

    def _cv_losses(self, batch: dict) -> dict:
        if self.opts.dpo:
            return {k: v for k, v in self._batch_losses(batch).items() if k != "dpo_skipped"}
        out = self.model(batch, self.device)
        return {"loss": out["loss"], "acc": out["acc"]}

    def _save(self, name: str, epoch: int, step: int, batch_in_epoch: int, tag: str, loss_dict: dict) -> str:
        """Upstream files (epoch = the epoch the checkpoint belongs to) + the resumable state, which
        points at the next batch to run (the next epoch's first for a whole-epoch checkpoint).

        Rank 0 writes ``<name>.pt``/``.yaml``/``.state.pt`` (the state holds every rank's RNG
        states, gathered here); DeepSpeed's ``<name>/`` directory gets each rank's own shard."""
        info = {**self.conf, **asdict(self.opts),
                "epoch": epoch, "step": step, "batch_idx": batch_in_epoch, "tag": tag, "loss_dict": loss_dict,
                "lr": self.engine.lr()}
        path = os.path.join(self.opts.model_dir, f"{name}.pt")
        self.engine.save_native(self.opts.model_dir, name, info)
        rng = TrainState.capture_rng()
        rank_rngs = [rng]
        if self.world > 1:
            rank_rngs = [None] * self.world
            dist.all_gather_object(rank_rngs, rng)
        if self.rank == 0:
            optimizer, scheduler = self.engine.state()
            resume_epoch, resume_batch = (epoch + 1, 0) if name.endswith("_whole") else (max(epoch, 0), batch_in_epoch)
            state = TrainState(resume_epoch, step, resume_batch, optimizer, scheduler, rng, rank_rngs, self.world,
                               self.engine.name)
            path = save_model_files(self.model.state_dict(), self.opts.model_dir, name, info)
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
        step, start_epoch, skip = self.start.step, self.start.epoch, self.start.batch_in_epoch
        if self.opts.checkpoint is None:
            self._save("init", -1, 0, 0, "TRAIN", {})
        losses: list[float] = []
        data_stats: list[dict] = []
        last = os.path.join(o.model_dir, "init.pt")
        evaluated_at: tuple[int, int] | None = None  # (epoch, step) of the last step checkpoint: CV'd and saved
        cv: dict[str, float] = {}
        window = {"tokens": 0, "time": time.perf_counter()}
        total_tokens, total_time = 0, 0.0
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
            self.engine.optimizer.zero_grad(set_to_none=True)
            means = _StepMeans()
            batch = next(batches, None)
            have = all_ranks_have(batch is not None, self.device)
            while have:
                batch_idx += 1
                upcoming = next(batches, None)  # one ahead: the epoch's last batch closes its window
                have_next = all_ranks_have(upcoming is not None, self.device)
                boundary = (batch_idx + 1) % accum == 0 or not have_next
                t0 = time.perf_counter()
                with self.engine.sync_context(boundary):
                    with self._autocast():
                        out = self._batch_losses(batch)
                    self.engine.backward(out["loss"])
                result = self.engine.after_backward(boundary)
                batch, have = upcoming, have_next
                means.add(out)
                stats = self.model.last_stats
                window["tokens"] += stats.get("tokens", 0)
                dpo_skipped += int(out.get("dpo_skipped", 0))
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
                    tps = window["tokens"] * self.world / elapsed if elapsed > 0 else 0.0
                    total_tokens += window["tokens"] * self.world
                    total_time += elapsed
                    mfu = self.flops_per_token * tps / (self.peak * self.world) if self.peak else None
                    values.update(epoch=epoch, lr=self.engine.lr(), grad_norm=norm, tokens_per_s=tps, mfu=mfu,
                                  step_time=time.perf_counter() - t0, padded_fraction=1 - stats.get("tokens", 0)
                                  / max(stats.get("padded_tokens", 1), 1))
                    self.reporter.log("TRAIN", step, values)
                    window = {"tokens": 0, "time": time.perf_counter()}
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
        tps = total_tokens / total_time if total_time else 0.0
        report = TrainReport(o.model_dir, max_epoch, step, last, cv.get("loss"), losses, tps,
                             self.flops_per_token * tps / (self.peak * self.world) if self.peak else None, dpo_skipped,
                             data_stats)
        result = {"steps": step, "epochs": max_epoch, "checkpoint": last, "tokens_per_s": tps, "dpo_skipped": dpo_skipped,
                  "data_stats": data_stats, "data_totals": _totals(data_stats)}
        result.update({k: v for k, v in (("cv_loss", report.cv_loss), ("mfu", report.mfu)) if v is not None})
        self.reporter.report_result(result)
        self.reporter.close()
        return report


class _StepMeans:
    """The values logged for one optimizer step: the mean over its micro-batches and ranks.

    Every micro-batch weighs the same (not by tokens): its loss is already normalised within the
    micro-batch, each contributes ``loss / accum_grad`` to the gradient and DDP/DeepSpeed average
    gradients over ranks with equal weights, so this mean is the objective the step optimised."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, out: dict) -> None:
        for k, v in out.items():
            if k == "dpo_skipped":
                continue
            v = v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v.to(self.sums[k].device) if k in self.sums else v
        self.count += 1

    def reduce(self, device: torch.device, world: int) -> dict[str, float]:
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k].to(device, torch.float64) for k in keys]
                          + [torch.tensor(float(self.count), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(vec)
        total = vec.tolist()
        return {k: total[i] / total[-1] for i, k in enumerate(keys)}


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

