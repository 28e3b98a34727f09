"""Rule finetune: train one run of the sweep, write its weights, checkpoints and cards."""

from pathlib import Path

from llmscape import rulekit
from llmscape.finetune.launch import METHOD_INPUT, job_spec, run_job
from llmscape.finetune.merge import write_card
from llmscape.models import read_card

log = rulekit.start(snakemake, "finetune")
smk = snakemake
p = smk.params
run_name, model = smk.wildcards.run, smk.wildcards.model
import torch

torch.set_num_threads(max(1, int(smk.threads)))  # the job's cores, not the node's
base = read_card(smk.input.card)
out_dir = Path(smk.output.metrics).parent
inputs = {k.removeprefix(METHOD_INPUT): v for k, v in smk.input.items() if k.startswith(METHOD_INPUT)}
spec = job_spec(p.run, base_path=base["path"], data_dir=smk.input.table, out_dir=out_dir,
                train_cfg=dict(p.train), eval_cfg=dict(p.eval), inputs=inputs, run_name=run_name,
                data_split=smk.input.train_index, eval_split=smk.input.eval_index,
                trust_remote_code=p.trust_remote_code)
metrics = run_job(spec, p.launch["num_processes"], threads=int(smk.threads), port=p.launch["main_process_port"])
if metrics is not None:  # the main process writes the cards
    source = f"finetune:{run_name}:base={base['checksum']}"
    write_card(smk.output.card, base, run_name, smk.output.weights, source)
    for step, card in zip(p.steps, smk.output.checkpoint_cards, strict=True):
        write_card(card, base, f"{run_name}-step{step}", Path(smk.output.checkpoints) / f"step_{step}",
                   f"{source}:step={step}")
    log.info("run %s: accuracy %.3f, %d trainable parameters, %.0f s", run_name, metrics["accuracy"]["accuracy"],
             metrics["trainable_params"], metrics["wall_time_s"])
