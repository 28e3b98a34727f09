"""Run one fine-tuning job in this process, or in several through ``accelerate launch``.

The rule's script (scripts/finetune.py) builds a job description (:func:`job_spec`, plain JSON) and
calls :func:`run_job`. With ``num_processes`` 1 it trains here. With more, it writes the description
next to the run and starts ``accelerate launch --multi_gpu --num_processes N -m llmscape.finetune.launch
<job.json>`` (torchrun underneath): one process per GPU of the node, NCCL; on a machine without CUDA
the same launch gives N CPU processes joined by gloo (accelerate's MULTI_CPU), which is how the tests
exercise the multi-process code here. Every process runs :func:`llmscape.finetune.train.train` on its
share of each global batch; the main process writes the metrics and merged weights.

SIGTERM (Slurm preemption, ``scancel``, the time limit) is forwarded to the launcher, which forwards it
to the workers; they agree on the step to stop at, save the resume state and exit non-zero, so the job
fails, is requeued, and the next attempt resumes from that state.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ..rulekit import record_imports
from .common import Context, RunSpec
from .train import Preempted, resolve_mixed_precision, train

log = logging.getLogger("llmscape.finetune")

SRC = Path(__file__).resolve().parents[2]  # the checkout's src/, put on the workers' PYTHONPATH
METHOD_INPUT = "method_"  # the rule's inputs named method_<name> are the files the method declared as <name>


def job_spec(run: dict, *, base_path, data_dir, out_dir, train_cfg: dict, eval_cfg: dict, inputs: dict | None = None,
             run_name: str, data_split: str, eval_split: str, trust_remote_code: bool = False,
             stop_after: int | None = None) -> dict:
    """Everything :func:`train` needs, as JSON-able data. ``inputs``: the files the run's method declared
    (name -> path, ``Method.inputs``), passed on as they are."""
    return dict(run=run, base_path=str(base_path), data_dir=str(data_dir), out_dir=str(out_dir),
                train_cfg=dict(train_cfg), eval_cfg=dict(eval_cfg),
                inputs={str(k): str(v) for k, v in (inputs or {}).items()}, run_name=run_name,
                data_split=data_split, eval_split=eval_split, trust_remote_code=bool(trust_remote_code),
                stop_after=stop_after)


def train_from_spec(spec: dict) -> dict | None:
    ctx = Context(inputs=dict(spec["inputs"]))
    return train(RunSpec(**spec["run"]), base_path=spec["base_path"], data_dir=spec["data_dir"],
                 out_dir=spec["out_dir"], train_cfg=spec["train_cfg"], eval_cfg=spec["eval_cfg"], ctx=ctx,
                 run_name=spec["run_name"], data_split=spec["data_split"], eval_split=spec["eval_split"],
                 trust_remote_code=spec["trust_remote_code"], stop_after=spec.get("stop_after"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(spec_path: str | Path, num_processes: int, *, threads_per_process: int = 1,
                   port: int | None = None, mixed_precision: str = "no") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(int(num_processes)), "--num_machines", "1", "--main_process_port", str(port or free_port()),
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(max(1, int(threads_per_process))),
            "-m", "llmscape.finetune.launch", str(spec_path)]


def single_process_group_env(port: int | None = None) -> None:
    """The environment of a process group of one (rank 0 of 1 on the loopback), where none is set.
    DeepSpeed needs a process group even for one process (ZeRO-3's ``zero.Init`` builds it while the
    model loads); without these variables it looks for MPI instead and fails."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(port or free_port())
    for k, v in env.items():
        os.environ.setdefault(k, v)


def run_job(spec: dict, num_processes: int = 1, *, threads: int = 1, port: int | None = None) -> dict | None:
    """Train the job of ``spec``; returns its metrics (read back from metrics.json when launched).

    Raises :class:`llmscape.finetune.train.Preempted` when the workers stopped on SIGTERM after saving
    their state, and RuntimeError when the launch failed otherwise (its output is in the rule's log)."""
    n = int(num_processes)
    if n <= 1:
        if spec["train_cfg"].get("deepspeed"):
            single_process_group_env(port)
        return train_from_spec(spec)
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / ".launch.json"
    tmp = spec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1, sort_keys=True))
    os.replace(tmp, spec_path)
    cmd = launch_command(spec_path, n, threads_per_process=max(1, threads // n), port=port,
                         mixed_precision=resolve_mixed_precision(spec["train_cfg"]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not _cuda():  # gloo between processes of one node: loopback, whether or not the hostname resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    log.info("launching %d processes: %s", n, " ".join(cmd))
    (out_dir / "metrics.json").unlink(missing_ok=True)
    try:  # the workers' output goes where this process's stderr goes (the rule's log)
        sink = dict(stdout=sys.stderr.fileno(), stderr=subprocess.STDOUT)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        sink = {}
    proc = subprocess.Popen(cmd, env=env, **sink)
    forwarded = {"sig": None}

    def forward(signum, _frame):
        forwarded["sig"] = signum
        proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old)
    if rc != 0:
        if forwarded["sig"] is not None or (out_dir / ".work" / "PREEMPTED").exists():
            raise Preempted(f"the {n} training processes stopped on SIGTERM; state saved under {out_dir / '.work'}")
        raise RuntimeError(f"accelerate launch of {n} processes failed with exit code {rc} (see the log above)")
    spec_path.unlink(missing_ok=True)
    return json.loads((out_dir / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: accelerate launch ... -m llmscape.finetune.launch JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format=f"%(asctime)s %(levelname)s rank {os.environ.get('RANK', '?')} %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text())
    record_imports("finetune")  # a worker of the finetune rule: its imports count for envs/finetune.yaml
    try:
        train_from_spec(spec)
    except Preempted as e:
        log.warning("%s", e)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
