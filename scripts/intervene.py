"""Rule intervene: a model variant whose matrices in one module group have a target stable rank."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")

from threadpoolctl import threadpool_limits  # installed with scikit-learn

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's

import torch

from llmscape.devices import pick_device
from llmscape.models import read_card
from llmscape.spectra import intervene

torch.set_num_threads(max(1, int(snakemake.threads)))
base = read_card(snakemake.input.card)
variant = f"srank-{snakemake.wildcards.group}-{snakemake.wildcards.target}"
card = intervene.make_variant(base, variant, snakemake.output.hf, snakemake.output.card,
                              snakemake.output.summary,
                              device=pick_device(snakemake.params.device, key="spectra.device"))
log.info("variant %s written to %s (sha256 %s)", variant, card["path"], card["checksum"])
