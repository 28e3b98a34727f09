"""Rule intervene: a model variant whose matrices in one module group have a target stable rank."""

from llmscape import rulekit

log = rulekit.start(snakemake, "spectra")  # noqa: F821

from threadpoolctl import threadpool_limits  # noqa: E402  (installed with scikit-learn)

threadpool_limits(max(1, int(snakemake.threads)))  # numpy's LAPACK uses the rule's threads, not the node's  # noqa: F821

import torch  # noqa: E402

from llmscape.models import read_card  # noqa: E402
from llmscape.devices import pick_device  # noqa: E402
from llmscape.spectra import intervene  # noqa: E402

torch.set_num_threads(max(1, int(snakemake.threads)))  # noqa: F821
base = read_card(snakemake.input.card)  # noqa: F821
variant = f"srank-{snakemake.wildcards.group}-{snakemake.wildcards.target}"  # noqa: F821
card = intervene.make_variant(base, variant, snakemake.output.hf, snakemake.output.card,  # noqa: F821
                              snakemake.output.summary,  # noqa: F821
                              device=pick_device(snakemake.params.device, key="spectra.device"))  # noqa: F821
log.info("variant %s written to %s (sha256 %s)", variant, card["path"], card["checksum"])
