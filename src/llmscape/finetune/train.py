"""One fine-tuning run through accelerate (CPU, one GPU or several, the same code).

    accelerate + optional DeepSpeed ZeRO-2/3 (a JSON under config/deepspeed; "auto" fields filled here),
    bf16 mixed precision on GPU, optional gradient checkpointing, seeded data order and initialisation,
    AdamW with warmup + cosine to lr_min_factor * lr (Doimo et al. 2024), gradient accumulation,
    validation loss every ``eval_every`` steps and at every checkpoint, checkpoints at log-spaced steps (for spectra
    during training; adapters by default, merged copies with checkpoint_format: merged), resumable state (only the
    trainable tensors, optimiser, scheduler, RNG and curves), SIGTERM
    -> save and exit (a requeued Slurm job goes on from there), TensorBoard, and a metrics JSON.

Layout under ``out_dir`` (= results/finetune/{model}/{run}):
    metrics.json  weights/  checkpoints/step_N/ (adapters or merged copies, see merge.py)  tb/  .work/state/step_N/
    .work/checkpoints/
(tb/ and .work/ are not rule outputs, so a requeued job finds them: it resumes the state and appends
to the TensorBoard curves; a fresh start clears both.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import package_versions, write_json
from ..partitioned import full_numel, is_partitioned
from . import registry
from .common import Context, FinetuneError, RunSpec, linear_shapes, trainable_count
from .data import answer_loss, batch_order, collate, encode, load_rows, split_validation
from .evaluate import score
from .merge import save_weights
from .method import Applied

log = logging.getLogger("llmscape.finetune")

TRAIN_DEFAULTS = dict(
    max_steps=40, batch_size=4, grad_accum=1, max_length=512, warmup_steps=None, lr_min_factor=0.01,
    weight_decay=0.0, max_grad_norm=1.0, eval_every=10, val_rows=32, n_checkpoints=4, save_every=0,
    gradient_checkpointing=False, mixed_precision="auto", load_dtype="auto", deepspeed=None, header=False,
    device="auto", checkpoint_format="adapter",
)
EVAL_DEFAULTS = dict(header=True, per_subject=None, batch_size=16)


class Preempted(RuntimeError):
    """Raised after the state was saved because of SIGTERM (or a test's ``stop_after``)."""


def checkpoint_steps(max_steps: int, n: int) -> list[int]:
    """Up to ``n`` log-spaced steps in [1, max_steps] (as Doimo et al.: geomspace(1, max_steps, n))."""
    if n <= 0 or max_steps <= 0:
        return []
    return sorted({int(round(x)) for x in np.geomspace(1, max_steps, n)})


def warmup_of(max_steps: int, warmup: int | None) -> int:
    return min(int(0.05 * max_steps), 3) if warmup is None else int(warmup)


def lr_factor(step: int, max_steps: int, warmup: int, min_factor: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_factor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, max_steps - warmup)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class TrainState:
    step: int = 0
    train: list = field(default_factory=list)  # [step, loss, lr]
    val: list = field(default_factory=list)  # [step, loss]
    tokens: int = 0
    answer_tokens: int = 0
    wall_s: float = 0.0
    train_s: float = 0.0

    def state_dict(self):
        return asdict(self)

    def load_state_dict(self, d):
        for k, v in d.items():
            setattr(self, k, v)


def resolve_mixed_precision(tc: dict) -> str:
    """``mixed_precision: auto`` = bf16 where training runs on CUDA, else no."""
    mixed = tc.get("mixed_precision", "auto")
    if mixed == "auto":
        cuda = torch.cuda.is_available() and tc.get("device", "auto") != "cpu"
        mixed = "bf16" if cuda else "no"
    return mixed


def _deepspeed_plugin(path, tc, mixed):
    from accelerate import DeepSpeedPlugin

    cfg = json.loads(Path(path).read_text())
    fill = {"train_micro_batch_size_per_gpu": tc["batch_size"], "gradient_accumulation_steps": tc["grad_accum"],
            "gradient_clipping": tc["max_grad_norm"] or 0.0}
    for k, v in fill.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    cfg.pop("train_batch_size", None)
    for key, on in (("bf16", mixed == "bf16"), ("fp16", mixed == "fp16")):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = on
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return DeepSpeedPlugin(hf_ds_config=cfg)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux: process peak RSS


def _latest_state(state_root: Path) -> Path | None:
    done = sorted(p for p in state_root.glob("step_*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def _open_session(run: RunSpec, tc: dict, out_dir: Path):
    """The accelerator (CPU, one GPU, several processes; DeepSpeed when configured), seeded.

    DeepSpeed without CUDA (the tests: gloo on CPU) needs the backend named: accelerate would otherwise
    pick none and tell every process it is the only one, while DeepSpeed's own group spans them all."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    cuda = torch.cuda.is_available() and tc["device"] != "cpu"
    mixed = resolve_mixed_precision(tc)
    ds = _deepspeed_plugin(tc["deepspeed"], tc, mixed) if tc["deepspeed"] else None
    handlers = [InitProcessGroupKwargs(backend="gloo")] if ds is not None and not cuda else []
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=int(tc["grad_accum"]),
                      log_with="tensorboard", project_dir=str(out_dir / "tb"), deepspeed_plugin=ds,
                      kwargs_handlers=handlers,
                      cpu=not cuda and ds is None)  # DeepSpeed on CPU needs its (gloo) process group
    world = torch.distributed.get_world_size() if ds is not None and torch.distributed.is_initialized() else None
    if world is not None and world != acc.num_processes:
        raise FinetuneError(f"accelerate sees {acc.num_processes} process(es) but DeepSpeed's group has "
                            f"{world}: each would train on the same share of a batch. "
                            "Fix: launch through llmscape.finetune.launch (accelerate launch) on CUDA or gloo.")
    set_seed(run.seed)
    return acc, ds, mixed, cuda


@dataclass
class _Job:
    """One job's settings and places: train()'s arguments with the defaults filled in."""

    run: RunSpec
    tc: dict
    ec: dict
    base_path: Path
    data_dir: Any
    out_dir: Path
    ctx: Context
    name: str
    data_split: Any
    eval_split: Any
    trust_remote_code: bool
    stop_after: int | None

    @property
    def work(self) -> Path:
        return self.out_dir / ".work"

    @property
    def state_root(self) -> Path:
        return self.work / "state"

    @property
    def ckpt_work(self) -> Path:
        return self.work / "checkpoints"


@dataclass
class _Data:
    """The tokenizer and the encoded training and validation examples."""

    tok: Any
    pad_id: int
    n_train_rows: int
    n_val_rows: int
    train_ex: list
    val_ex: list


def _load_data(job: _Job) -> _Data:
    """The training split, less the validation rows, encoded as answer-letter examples."""
    from transformers import AutoTokenizer

    tc = job.tc
    tok = AutoTokenizer.from_pretrained(job.base_path, trust_remote_code=job.trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = load_rows(job.data_dir, job.data_split)
    train_rows, val_rows = split_validation(rows, tc["val_rows"])
    if len(train_rows) == 0:
        raise FinetuneError(f"no training rows in split {job.data_split!r} of {job.data_dir}. Fix: a larger "
                            "data.finetune_per_subject (or null), or fewer finetune.train.val_rows.")
    return _Data(tok, pad_id, len(train_rows), len(val_rows), encode(train_rows, tok, tc["header"], tc["max_length"]),
                 encode(val_rows, tok, tc["header"], tc["max_length"]))


@dataclass
class _Prepared:
    """The model with its method applied, and what train() needs to know about it."""

    model: object
    session: object  # the method's Session (a no-op one when it has none)
    trained: list  # (base tensor name, update source): what the weights are written from
    groups: list
    expected: int | None
    n_trainable: int
    n_total: int
    load_dtype: str


def _load_base(job: _Job, cuda: bool, acc):
    """The base model for training: bf16 frozen weights on CUDA (``load_dtype: auto``), fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    load_dtype = job.tc["load_dtype"]
    if load_dtype == "auto":
        load_dtype = "bfloat16" if cuda else "float32"
    model = AutoModelForCausalLM.from_pretrained(job.base_path, dtype=getattr(torch, load_dtype),
                                                 trust_remote_code=job.trust_remote_code)
    model.config.use_cache = False
    model.to(acc.device)  # spectral SVDs run where the weights are
    return model, load_dtype


def _check_sources(applied: Applied, method: str) -> None:
    """Every trainable parameter must reach the written weights through one of the method's update
    sources; one that does not would train and then be lost."""
    covered = {id(t) for _, src in applied.trained for t in src.update_tensors()}
    lost = [n for n, p in applied.model.named_parameters() if p.requires_grad and id(p) not in covered]
    if lost:
        raise FinetuneError(f"{method}: trainable parameter(s) {lost[:3]} are in no update source of the method, "
                            "so their training would not reach the saved weights. Fix: its apply() must list them "
                            "in Applied.trained (common.whole_tensors for tensors trained whole).")


def _trainable_fp32(model) -> None:
    """Trainable tensors in fp32 (mixed precision computes in bf16); a ZeRO-3 one keeps DeepSpeed's."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and not is_partitioned(p):
            p.data = p.data.float()


def _prepare_model(job: _Job, cuda: bool, acc, ds) -> _Prepared:
    """Load the base model, apply the method, build its optimiser groups and check the trainable count
    against the method's formula."""
    run = job.run
    method = registry.get(run.method)
    model, load_dtype = _load_base(job, cuda, acc)
    shapes = linear_shapes(model)
    expected = method.expected_trainable(shapes, run, job.ctx)
    applied = method.apply(model, run, job.ctx)
    model, session = applied.model, applied.session
    expected = session.expected_trainable(shapes, expected)  # some methods know it only once applied
    if session.single_process and (acc.num_processes > 1 or ds is not None):
        raise FinetuneError(f"{run.method}: {session.single_process}")
    session.before_optimizer()
    _check_sources(applied, run.method)
    _trainable_fp32(model)
    groups = registry.param_groups(model, run, float(job.tc["weight_decay"]))
    session.after_param_groups()
    n_trainable = trainable_count(model)
    if expected is not None and n_trainable != expected:
        raise FinetuneError(f"{run.method}: {n_trainable} trainable parameters, the formula says {expected}")
    if job.tc["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return _Prepared(model, session, applied.trained, groups, expected, n_trainable,
                     sum(full_numel(p) for p in model.parameters()), load_dtype)


@dataclass
class _Loop:
    """What the step loop works on and keeps: the prepared model, optimiser and schedule, the state."""

    acc: Any
    ds: Any
    model: Any  # as accelerate prepared it (DDP or DeepSpeed engine around the model)
    opt: Any
    sched: Any
    state: TrainState
    prep: _Prepared
    data: _Data
    max_steps: int
    ckpt_steps: list
    t0: float = field(default_factory=time.time)  # start of this attempt's wall time not yet in state
    train_t: float = 0.0  # step time of this attempt not yet in state


def _resume_keys(model, prep: _Prepared) -> set[str]:
    """The state-dict keys a resume state keeps: the tensors the optimiser changes and the buffers of the
    layers that make the updates (a spectral adapter's stored SVD); frozen ones come from the base folder."""
    in_opt = {id(p) for g in prep.groups for p in g["params"]}
    owned = {id(b) for _, src in prep.trained if isinstance(src, torch.nn.Module) for b in src.buffers()}
    return ({n for n, p in model.named_parameters() if id(p) in in_opt}
            | {n for n, b in model.named_buffers() if id(b) in owned})


def _make_loop(acc, ds, job: _Job, data: _Data, prep: _Prepared) -> _Loop:
    """AdamW with warmup and cosine decay, prepared by accelerate; the state and the method's session
    objects registered for the resume state, which (without DeepSpeed) keeps only :func:`_resume_keys`."""
    tc = job.tc
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in prep.groups], lr=job.run.lr)
    max_steps = int(tc["max_steps"])
    warm = warmup_of(max_steps, tc["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, max_steps, warm, float(tc["lr_min_factor"])))
    model, opt = acc.prepare(prep.model, opt)
    state = TrainState()
    acc.register_for_checkpointing(state, sched, *prep.session.checkpoint_objects())
    keep = _resume_keys(acc.unwrap_model(model), prep)

    def _trim(models, weights, output_dir):
        for i in range(len(weights)):  # DDP's keys carry a "module." prefix
            weights[i] = {k: v for k, v in weights[i].items() if k.removeprefix("module.") in keep}

    if ds is None:
        acc.register_save_state_pre_hook(_trim)
    return _Loop(acc, ds, model, opt, sched, state, prep, data, max_steps,
                 checkpoint_steps(max_steps, int(tc["n_checkpoints"])))


def _resume_point(acc, run: RunSpec, tc: dict, out_dir: Path, work: Path, state_root: Path) -> Path | None:
    """The saved state to resume from, if it belongs to the same run and settings (a changed config
    starts afresh, and so do its TensorBoard curves)."""
    fingerprint = json.dumps(dict(run=asdict(run), train=tc, world=acc.num_processes), sort_keys=True, default=str)
    stamp = work / "config.json"
    if acc.is_main_process:
        if work.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            log.warning("settings changed since the saved state: discarding %s", work)
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
        (work / "PREEMPTED").unlink(missing_ok=True)
    acc.wait_for_everyone()
    latest = _latest_state(state_root)
    if latest is None and acc.is_main_process:  # a fresh start: TensorBoard starts afresh too; a resumed
        shutil.rmtree(out_dir / "tb", ignore_errors=True)  # run appends to the curves of its first attempt
    acc.wait_for_everyone()
    return latest


def _resume(loop: _Loop, job: _Job) -> None:
    """Continue from the saved state of the same run and settings, if there is one."""
    acc = loop.acc
    latest = _resume_point(acc, job.run, job.tc, job.out_dir, job.work, job.state_root)
    if latest is not None:
        # the saved state has only the trained tensors (frozen ones come from the base folder)
        acc.load_state(str(latest), **(dict(load_module_strict=False) if loop.ds is not None else dict(strict=False)))
        log.info("resumed from %s (step %d)", latest, loop.state.step)


@contextlib.contextmanager
def _stop_on_sigterm():
    """A flag that SIGTERM (Slurm preemption) sets, for the loop to stop at the next step boundary."""
    stop = {"flag": False}
    prev = None
    if hasattr(signal, "SIGTERM"):
        try:
            prev = signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__("flag", True))
        except ValueError:  # not in the main thread
            prev = None
    try:
        yield stop
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _hparams(job: _Job, loop: _Loop) -> dict:
    run, tc = job.run, job.tc
    return dict(method=run.method, lr=run.lr, seed=run.seed, rank=run.rank or 0,
                value_lr_ratio=run.value_lr_ratio or 0.0, max_steps=loop.max_steps, batch_size=tc["batch_size"],
                grad_accum=tc["grad_accum"], trainable=loop.prep.n_trainable)


def _to(batch: dict, dev) -> dict:
    return {k: v.to(dev) for k, v in batch.items()}


def _train_step(loop: _Loop, job: _Job) -> tuple[float, int]:
    """One optimiser step over this process's share of the global batch: (mean loss, tokens)."""
    acc, tc, ex_all = loop.acc, job.tc, loop.data.train_ex
    micro, accum = int(tc["batch_size"]), int(tc["grad_accum"])
    idx = batch_order(len(ex_all), loop.state.step, micro * accum * acc.num_processes, job.run.seed)
    mine = idx[acc.process_index * micro * accum: (acc.process_index + 1) * micro * accum]
    step_loss, step_tokens = 0.0, 0
    for a in range(accum):
        batch = _to(collate([ex_all[i] for i in mine[a * micro: (a + 1) * micro]], loop.data.pad_id), acc.device)
        with acc.accumulate(loop.model):
            with acc.autocast():
                loss, _ = answer_loss(loop.model, batch)
            acc.backward(loss)
            if acc.sync_gradients and tc["max_grad_norm"] and loop.ds is None:
                acc.clip_grad_norm_(loop.model.parameters(), float(tc["max_grad_norm"]))
            loop.opt.step()
            loop.opt.zero_grad(set_to_none=True)
        step_loss += float(loss.detach()) / accum
        step_tokens += int(batch["attention_mask"].sum())
    return step_loss, step_tokens


def _agree(loop: _Loop, loss: float, tokens: int, stop_now: bool) -> tuple[float, int, bool]:
    """With several processes: the global batch's loss and tokens, and one stop decision for all."""
    world = loop.acc.num_processes
    if world == 1:
        return loss, tokens, stop_now
    agg = loop.acc.reduce(torch.tensor([loss, float(tokens), float(stop_now)], device=loop.acc.device,
                                       dtype=torch.float64), "sum")
    return float(agg[0]) / world, int(agg[1]), bool(agg[2] > 0)


@torch.no_grad()
def _val_loss(loop: _Loop, micro: int) -> float:
    """Mean answer loss over the validation examples (NaN without any)."""
    val_ex = loop.data.val_ex
    if not val_ex:
        return float("nan")
    acc = loop.acc
    m = acc.unwrap_model(loop.model) if loop.ds is None else loop.model
    was = m.training
    m.eval()
    tot, n = 0.0, 0
    for s in range(0, len(val_ex), micro):
        with acc.autocast():
            loss, k = answer_loss(m, _to(collate(val_ex[s: s + micro], loop.data.pad_id), acc.device))
        tot += float(loss) * k
        n += k
    m.train(was)
    return tot / max(n, 1)


def _record(loop: _Loop, loss: float, tokens: int, lr_now: float, t0: float) -> None:
    """The step in the state, the log and TensorBoard; the method's per-step hook."""
    st, acc = loop.state, loop.acc
    st.step += 1
    st.tokens += tokens
    st.train.append([st.step, loss, lr_now])
    if acc.is_main_process:
        log.info("step %d/%d: train loss %.4f, lr %.3g, %d tokens, %.0f tokens/s", st.step, loop.max_steps,
                 loss, lr_now, tokens, tokens / max(time.time() - t0, 1e-9))
    loop.prep.session.after_step(st.step)
    acc.log({"train/loss": loss, "train/lr": lr_now}, step=st.step)


def _validate_and_checkpoint(loop: _Loop, job: _Job, loss: float) -> None:
    """Validation every ``eval_every`` steps, at the end and at every checkpoint step (the join's
    generalisation gap of a checkpoint needs it); the checkpoint's weights at its step."""
    st, acc = loop.state, loop.acc
    if st.step % int(job.tc["eval_every"]) == 0 or st.step == loop.max_steps or st.step in loop.ckpt_steps:
        v = _val_loss(loop, int(job.tc["batch_size"]))
        st.val.append([st.step, v])
        acc.log({"val/loss": v}, step=st.step)
        log.info("step %d train %.4f val %.4f", st.step, loss, v)
    if st.step in loop.ckpt_steps:
        save_weights(loop.prep.trained, job.base_path, job.ckpt_work / f"step_{st.step}", job.tc["checkpoint_format"],
                     acc.is_main_process, extra=dict(run=job.name, step=st.step, base=str(job.base_path)))


def _bank_time(loop: _Loop) -> None:
    """Move this attempt's elapsed wall and step time into the state (saved with it)."""
    loop.state.wall_s += time.time() - loop.t0
    loop.state.train_s += loop.train_t
    loop.t0, loop.train_t = time.time(), 0.0


def _save_or_stop(loop: _Loop, job: _Job, stop_now: bool) -> None:
    """The resume state at checkpoint steps, every ``save_every`` steps and before stopping; on a stop,
    the PREEMPTED mark (for a launching parent: a preemption, not a crash) and :class:`Preempted`."""
    step, tc, acc = loop.state.step, job.tc, loop.acc
    due = step in loop.ckpt_steps or (tc["save_every"] and step % int(tc["save_every"]) == 0) or stop_now
    if due and step < loop.max_steps:
        _bank_time(loop)
        _save_state(acc, job.state_root, step, loop.ds is not None)
    if stop_now:
        if acc.is_main_process:
            (job.work / "PREEMPTED").write_text(str(step))
        raise Preempted(f"stopped after step {step}; state saved under {job.state_root}")


def _run_steps(loop: _Loop, job: _Job, stop: dict) -> None:
    """The training loop: step, agree across processes, record, validate, checkpoint, save or stop."""
    loop.t0, loop.train_t = time.time(), 0.0
    while loop.state.step < loop.max_steps:
        t0 = time.time()
        loss, tokens = _train_step(loop, job)
        stop_now = stop["flag"] or job.stop_after == loop.state.step + 1
        loss, tokens, stop_now = _agree(loop, loss, tokens, stop_now)
        lr_now = loop.opt.param_groups[0]["lr"]
        loop.sched.step()
        loop.train_t += time.time() - t0
        _record(loop, loss, tokens, lr_now, t0)
        _validate_and_checkpoint(loop, job, loss)
        _save_or_stop(loop, job, stop_now)
    _bank_time(loop)


def _save_state(acc, state_root: Path, step: int, deepspeed: bool = False) -> None:
    """The resume state of ``step``, written under a temporary name and swapped in whole. Under DeepSpeed
    its checkpoint leaves the frozen (base) tensors out, as the trimmed state does otherwise: they are
    reloaded from the base folder on resume, and with them a 70B resume state would be the whole model."""
    if acc.is_main_process:
        state_root.mkdir(parents=True, exist_ok=True)
    tmp = state_root / f".tmp_step_{step:07d}"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), **(dict(exclude_frozen_parameters=True) if deepspeed else {}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "COMPLETE").write_text(str(step))
        final = state_root / f"step_{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in state_root.glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _evaluate(acc, model, ds, tok, data_dir, eval_split: str, ec: dict) -> dict:
    """MMLU accuracy of the trained model, scored as the extraction scores it."""
    eval_rows = load_rows(data_dir, eval_split)
    if ec["per_subject"]:
        eval_rows = eval_rows.groupby("subject", sort=False).head(int(ec["per_subject"])).reset_index(drop=True)
    m = acc.unwrap_model(model) if ds is None else model
    with acc.autocast():
        return score(m, tok, eval_rows, header=ec["header"], batch_size=int(ec["batch_size"]), device=acc.device)


def _publish_checkpoints(out_dir: Path, ckpt_work: Path, ckpt_steps: list[int]) -> None:
    final_ckpts = out_dir / "checkpoints"
    final_ckpts.mkdir(parents=True, exist_ok=True)
    for s in ckpt_steps:
        src = ckpt_work / f"step_{s}"
        if src.exists():
            dst = final_ckpts / f"step_{s}"
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)


def _metrics(loop: _Loop, job: _Job, accuracy: dict, weights: Path, mixed: str, t_start: float) -> dict:
    """metrics.json: curves, accuracy, sizes, speed, memory, device and versions, and the method's own."""
    st, prep, tc, dev = loop.state, loop.prep, job.tc, loop.acc.device
    metrics = dict(
        run=job.name, method=job.run.method, spec=asdict(job.run), train_config=tc, eval_config=job.ec,
        train_loss=[dict(step=s, loss=loss, lr=lr) for s, loss, lr in st.train],
        val_loss=[dict(step=s, loss=loss) for s, loss in st.val],
        accuracy=accuracy, trainable_params=prep.n_trainable, total_params=prep.n_total,
        trainable_share=prep.n_trainable / prep.n_total, expected_trainable=prep.expected,
        param_groups=[dict(name=g["name"], lr=g["lr"], weight_decay=g["weight_decay"],
                           n=sum(full_numel(p) for p in g["params"])) for g in prep.groups],
        steps=st.step, tokens=st.tokens, train_time_s=st.train_s, wall_time_s=st.wall_s,
        total_time_s=time.time() - t_start, tokens_per_s=st.tokens / max(st.train_s, 1e-9),
        peak_memory_mb=_peak_memory_mb(dev), peak_memory_kind="cuda_allocated" if dev.type == "cuda" else "cpu_rss",
        device=str(dev), world_size=loop.acc.num_processes, engine=type(loop.model).__name__, mixed_precision=mixed,
        load_dtype=prep.load_dtype, deepspeed=str(tc["deepspeed"]) if tc["deepspeed"] else None,
        checkpoints=[s for s in loop.ckpt_steps if (job.out_dir / "checkpoints" / f"step_{s}").exists()],
        weights=str(weights), checkpoint_format=tc["checkpoint_format"], n_train_rows=loop.data.n_train_rows,
        n_val_rows=loop.data.n_val_rows,
        versions=package_versions(("llmscape", "torch", "transformers", "peft", "accelerate", "deepspeed",
                                   "numpy", "tensorboard", "safetensors")),
    )
    metrics.update(prep.session.metrics(prep.n_trainable))  # what the method adds (it may restate the trainable count)
    return metrics


def _finish(loop: _Loop, job: _Job, mixed: str, t_start: float) -> dict | None:
    """Accuracy with extraction's scoring, the run's weights, the checkpoints published, the metrics
    written and the resume state removed; the main process returns the metrics."""
    acc = loop.acc
    accuracy = _evaluate(acc, loop.model, loop.ds, loop.data.tok, job.data_dir, job.eval_split, job.ec)
    weights = save_weights(loop.prep.trained, job.base_path, job.out_dir / "weights", job.tc["checkpoint_format"],
                           acc.is_main_process, extra=dict(run=job.name, step=loop.state.step, base=str(job.base_path)))
    metrics = None
    if acc.is_main_process:
        _publish_checkpoints(job.out_dir, job.ckpt_work, loop.ckpt_steps)
        metrics = _metrics(loop, job, accuracy, weights, mixed, t_start)
        write_json(job.out_dir / "metrics.json", metrics)
        shutil.rmtree(job.state_root, ignore_errors=True)  # finished: the resume state is no longer needed
    acc.wait_for_everyone()
    acc.end_training()  # closes the trackers (and, in accelerate 1.x, the process group): last
    return metrics


def train(run: RunSpec, *, base_path, data_dir, out_dir, train_cfg: dict | None = None, eval_cfg: dict | None = None,
          ctx: Context | None = None, run_name: str = "run", data_split: str = "finetune",
          eval_split: str = "analysis", trust_remote_code: bool = False, stop_after: int | None = None) -> dict:
    """Train ``run`` and write ``out_dir``/{metrics.json, weights/, checkpoints/}. Returns the metrics
    (None on the processes other than the main one).

    The phases, in order: the session (accelerator, DeepSpeed, seed), the data, the model with its method,
    the loop's optimiser and schedule, resume, the steps (with validation, checkpoints, resume states and
    SIGTERM), then the finish (evaluation, weights, metrics). ``ctx`` holds the files the method declared
    (``Method.inputs``)."""
    t_start = time.time()
    job = _Job(run, {**TRAIN_DEFAULTS, **(train_cfg or {})}, {**EVAL_DEFAULTS, **(eval_cfg or {})}, Path(base_path),
               data_dir, Path(out_dir), ctx or Context(), run_name, data_split, eval_split, trust_remote_code,
               stop_after)
    acc, ds, mixed, cuda = _open_session(run, job.tc, job.out_dir)
    data = _load_data(job)
    prep = _prepare_model(job, cuda, acc, ds)
    loop = _make_loop(acc, ds, job, data, prep)
    _resume(loop, job)
    with _stop_on_sigterm() as stop:  # from here on SIGTERM stops at the next step boundary
        acc.init_trackers(run_name, config=_hparams(job, loop))
        _run_steps(loop, job, stop)
    return _finish(loop, job, mixed, t_start)
