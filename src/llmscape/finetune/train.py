"""One fine-tuning run through accelerate (CPU, one GPU or several, the same code).

    accelerate + optional DeepSpeed ZeRO-2/3 (a JSON under config/deepspeed; "auto" fields filled here),
    bf16 mixed precision on GPU, optional gradient checkpointing, seeded data order and initialisation,
    AdamW with warmup + cosine to lr_min_factor * lr (Doimo et al. 2024), gradient accumulation,
    validation loss every ``eval_every`` steps and at every checkpoint, checkpoints at log-spaced steps (for spectra during
    training; adapters by default, merged copies with checkpoint_format: merged), resumable state (only the
    trainable tensors, optimiser, scheduler, RNG and curves), SIGTERM
    -> save and exit (a requeued Slurm job goes on from there), TensorBoard, and a metrics JSON.

Layout under ``out_dir`` (= results/finetune/{model}/{run}):
    metrics.json  weights/  checkpoints/step_N/ (adapters or merged copies, see merge.py)  tb/  .work/state/step_N/
    .work/checkpoints/
(tb/ and .work/ are not rule outputs, so a requeued job finds them: it resumes the state and appends
to the TensorBoard curves; a fresh start clears both.)
"""

from __future__ import annotations

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

import numpy as np
import torch

from ..io import package_versions, write_json
from ..partitioned import full_numel, is_partitioned
from . import registry
from .common import Context, FinetuneError, RunSpec, linear_shapes, trainable_count
from .data import answer_loss, batch_order, collate, encode, load_rows, split_validation
from .evaluate import score
from .merge import save_weights
from .method import Session

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
class _Prepared:
    """The model with its method applied, and what train() needs to know about it."""

    model: object
    session: object  # the method's Session (a no-op one when it has none)
    groups: list
    expected: int | None
    n_trainable: int
    n_total: int
    load_dtype: str


def _prepare_model(run: RunSpec, ctx, base_path: Path, tc: dict, cuda: bool, acc, ds,
                   trust_remote_code: bool) -> _Prepared:
    """Load the base model, apply the method, build its optimiser groups and check the trainable count
    against the method's formula."""
    from transformers import AutoModelForCausalLM

    method = registry.get(run.method)
    load_dtype = tc["load_dtype"]
    if load_dtype == "auto":
        load_dtype = "bfloat16" if cuda else "float32"
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, load_dtype),
                                                 trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    model.to(acc.device)  # spectral SVDs run where the weights are
    shapes = linear_shapes(model)
    expected = method.expected_trainable(shapes, run, ctx)
    model = method.apply(model, run, ctx)
    session = (method.session(model, run) if method.session is not None else None) or Session()
    expected = session.expected_trainable(shapes, expected)  # some methods know it only once applied
    if session.single_process and (acc.num_processes > 1 or ds is not None):
        raise FinetuneError(f"{run.method}: {session.single_process}")
    session.before_optimizer()
    for p in model.parameters():  # trainable tensors in fp32 (mixed precision computes in bf16); a ZeRO-3
        if p.requires_grad and p.dtype != torch.float32 and not is_partitioned(p):  # one: DeepSpeed's precision
            p.data = p.data.float()
    groups = registry.param_groups(model, run, float(tc["weight_decay"]))
    session.after_param_groups()
    n_trainable = trainable_count(model)
    if expected is not None and n_trainable != expected:
        raise FinetuneError(f"{run.method}: {n_trainable} trainable parameters, the formula says {expected}")
    if tc["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return _Prepared(model, session, groups, expected, n_trainable, sum(full_numel(p) for p in model.parameters()),
                     load_dtype)


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


def train(run: RunSpec, *, base_path, data_dir, out_dir, train_cfg: dict | None = None, eval_cfg: dict | None = None,
          ctx: Context | None = None, run_name: str = "run", data_split: str = "finetune",
          eval_split: str = "analysis", trust_remote_code: bool = False, stop_after: int | None = None) -> dict:
    """Train ``run`` and write ``out_dir``/{metrics.json, weights/, checkpoints/}. Returns the metrics.

    The parts: the session (:func:`_open_session`), the data, the model with its method
    (:func:`_prepare_model`), resume (:func:`_resume_point`), the loop below with its checkpoints and
    resume states (:func:`_save_state`), then evaluation (:func:`_evaluate`) and the outputs."""
    from transformers import AutoTokenizer

    t_start = time.time()
    tc = {**TRAIN_DEFAULTS, **(train_cfg or {})}
    ec = {**EVAL_DEFAULTS, **(eval_cfg or {})}
    out_dir, base_path = Path(out_dir), Path(base_path)
    work = out_dir / ".work"
    state_root, ckpt_work = work / "state", work / "checkpoints"
    acc, ds, mixed, cuda = _open_session(run, tc, out_dir)
    dev = acc.device

    # data
    tok = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = load_rows(data_dir, data_split)
    train_rows, val_rows = split_validation(rows, tc["val_rows"])
    if len(train_rows) == 0:
        raise FinetuneError(f"no training rows in split {data_split!r} of {data_dir}. Fix: a larger "
                            "data.finetune_per_subject (or null), or fewer finetune.train.val_rows.")
    train_ex = encode(train_rows, tok, tc["header"], tc["max_length"])
    val_ex = encode(val_rows, tok, tc["header"], tc["max_length"])

    # model + method
    prep = _prepare_model(run, ctx, base_path, tc, cuda, acc, ds, trust_remote_code)
    session, groups, n_trainable = prep.session, prep.groups, prep.n_trainable
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=run.lr)
    max_steps = int(tc["max_steps"])
    warm = warmup_of(max_steps, tc["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, max_steps, warm, float(tc["lr_min_factor"])))
    model, opt = acc.prepare(prep.model, opt)
    state = TrainState()
    acc.register_for_checkpointing(state, sched, *session.checkpoint_objects())
    in_opt = {id(p) for g in groups for p in g["params"]}
    keep = {n for n, p in acc.unwrap_model(model).named_parameters() if id(p) in in_opt}

    def _trim(models, weights, output_dir):  # resume state holds only what training changes
        for i in range(len(weights)):
            weights[i] = {k: v for k, v in weights[i].items()  # DDP's keys carry a "module." prefix
                          if k.removeprefix("module.") in keep or "spectral_" in k}

    if ds is None:
        acc.register_save_state_pre_hook(_trim)

    latest = _resume_point(acc, run, tc, out_dir, work, state_root)
    if latest is not None:
        # the saved state has only the trained tensors (frozen ones come from the base folder)
        acc.load_state(str(latest), **(dict(load_module_strict=False) if ds is not None else dict(strict=False)))
        log.info("resumed from %s (step %d)", latest, state.step)

    hparams = dict(method=run.method, lr=run.lr, seed=run.seed, rank=run.rank or 0,
                   value_lr_ratio=run.value_lr_ratio or 0.0, max_steps=max_steps, batch_size=tc["batch_size"],
                   grad_accum=tc["grad_accum"], trainable=n_trainable)
    # SIGTERM from here on (the trackers start next, the loop right after) stops at the next step boundary
    stop = {"flag": False}
    prev = None
    if hasattr(signal, "SIGTERM"):
        try:
            prev = signal.signal(signal.SIGTERM, lambda *a: stop.__setitem__("flag", True))
        except ValueError:  # not in the main thread
            prev = None
    acc.init_trackers(run_name, config=hparams)

    ckpt_steps = checkpoint_steps(max_steps, int(tc["n_checkpoints"]))
    world = acc.num_processes
    micro = int(tc["batch_size"])
    accum = int(tc["grad_accum"])
    global_batch = micro * accum * world

    def to_dev(b):
        return {k: v.to(dev) for k, v in b.items()}

    @torch.no_grad()
    def val_loss():
        if not val_ex:
            return float("nan")
        m = acc.unwrap_model(model) if ds is None else model
        was = m.training
        m.eval()
        tot, n = 0.0, 0
        for s in range(0, len(val_ex), micro):
            with acc.autocast():
                loss, k = answer_loss(m, to_dev(collate(val_ex[s: s + micro], pad_id)))
            tot += float(loss) * k
            n += k
        m.train(was)
        return tot / max(n, 1)

    session_t0 = time.time()
    train_t = 0.0
    try:
        while state.step < max_steps:
            step = state.step
            t0 = time.time()
            idx = batch_order(len(train_ex), step, global_batch, run.seed)
            mine = idx[acc.process_index * micro * accum: (acc.process_index + 1) * micro * accum]
            step_loss, step_tokens = 0.0, 0
            for a in range(accum):
                ex = [train_ex[i] for i in mine[a * micro: (a + 1) * micro]]
                batch = to_dev(collate(ex, pad_id))
                with acc.accumulate(model):
                    with acc.autocast():
                        loss, _ = answer_loss(model, batch)
                    acc.backward(loss)
                    if acc.sync_gradients and tc["max_grad_norm"] and ds is None:
                        acc.clip_grad_norm_(model.parameters(), float(tc["max_grad_norm"]))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss += float(loss.detach()) / accum
                step_tokens += int(batch["attention_mask"].sum())
            stop_now = stop["flag"] or stop_after == step + 1
            if world > 1:  # the logged loss is the global batch's; all processes stop at the same step
                agg = acc.reduce(torch.tensor([step_loss, float(step_tokens), float(stop_now)], device=dev,
                                              dtype=torch.float64), "sum")
                step_loss, step_tokens, stop_now = float(agg[0]) / world, int(agg[1]), bool(agg[2] > 0)
            lr_now = opt.param_groups[0]["lr"]
            sched.step()
            train_t += time.time() - t0
            state.step = step + 1
            state.tokens += step_tokens
            state.train.append([state.step, step_loss, lr_now])
            if acc.is_main_process:
                log.info("step %d/%d: train loss %.4f, lr %.3g, %d tokens, %.0f tokens/s", state.step, max_steps,
                         step_loss, lr_now, step_tokens, step_tokens / max(time.time() - t0, 1e-9))
            session.after_step(state.step)
            acc.log({"train/loss": step_loss, "train/lr": lr_now}, step=state.step)
            # also at every checkpoint step: the join's generalisation gap of a checkpoint needs it
            if state.step % int(tc["eval_every"]) == 0 or state.step == max_steps or state.step in ckpt_steps:
                v = val_loss()
                state.val.append([state.step, v])
                acc.log({"val/loss": v}, step=state.step)
                log.info("step %d train %.4f val %.4f", state.step, step_loss, v)
            if state.step in ckpt_steps:
                save_weights(acc.unwrap_model(model), base_path, ckpt_work / f"step_{state.step}",
                             tc["checkpoint_format"], acc, acc.is_main_process,
                             extra=dict(run=run_name, step=state.step, base=str(base_path)))
            want_save = (state.step in ckpt_steps or (tc["save_every"] and state.step % int(tc["save_every"]) == 0)
                         or stop_now)
            if want_save and state.step < max_steps:
                state.wall_s += time.time() - session_t0
                state.train_s += train_t
                session_t0, train_t = time.time(), 0.0
                _save_state(acc, state_root, state.step, ds is not None)
            if stop_now:
                if acc.is_main_process:  # tells a launching parent that this was a preemption, not a crash
                    (work / "PREEMPTED").write_text(str(state.step))
                raise Preempted(f"stopped after step {state.step}; state saved under {state_root}")
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    state.wall_s += time.time() - session_t0
    state.train_s += train_t

    # final: accuracy with extraction's scoring, the run's weights, checkpoints, metrics
    acc_res = _evaluate(acc, model, ds, tok, data_dir, eval_split, ec)
    weights = save_weights(acc.unwrap_model(model), base_path, out_dir / "weights", tc["checkpoint_format"], acc,
                           acc.is_main_process, extra=dict(run=run_name, step=state.step, base=str(base_path)))
    metrics = None
    if acc.is_main_process:
        _publish_checkpoints(out_dir, ckpt_work, ckpt_steps)
        metrics = dict(
            run=run_name, method=run.method, spec=asdict(run),
            train_config=tc, eval_config=ec,
            train_loss=[dict(step=s, loss=l, lr=lr) for s, l, lr in state.train],
            val_loss=[dict(step=s, loss=l) for s, l in state.val],
            accuracy=acc_res, trainable_params=n_trainable, total_params=prep.n_total,
            trainable_share=n_trainable / prep.n_total, expected_trainable=prep.expected,
            param_groups=[dict(name=g["name"], lr=g["lr"], weight_decay=g["weight_decay"],
                               n=sum(full_numel(p) for p in g["params"])) for g in groups],
            steps=state.step, tokens=state.tokens, train_time_s=state.train_s, wall_time_s=state.wall_s,
            total_time_s=time.time() - t_start, tokens_per_s=state.tokens / max(state.train_s, 1e-9),
            peak_memory_mb=_peak_memory_mb(dev), peak_memory_kind="cuda_allocated" if dev.type == "cuda" else "cpu_rss",
            device=str(dev), world_size=world, engine=type(model).__name__, mixed_precision=mixed,
            load_dtype=prep.load_dtype, deepspeed=str(tc["deepspeed"]) if tc["deepspeed"] else None,
            checkpoints=[s for s in ckpt_steps if (out_dir / "checkpoints" / f"step_{s}").exists()],
            weights=str(weights), checkpoint_format=tc["checkpoint_format"], n_train_rows=len(train_rows),
            n_val_rows=len(val_rows),
            versions=package_versions(("llmscape", "torch", "transformers", "peft", "accelerate", "deepspeed",
                                       "numpy", "tensorboard", "safetensors")),
        )
        metrics.update(session.metrics(n_trainable))  # what the method adds (it may restate the trainable count)
        write_json(out_dir / "metrics.json", metrics)
        shutil.rmtree(state_root, ignore_errors=True)  # finished: the resume state is no longer needed
    acc.wait_for_everyone()
    acc.end_training()  # closes the trackers (and, in accelerate 1.x, the process group): last
    return metrics
