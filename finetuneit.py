"""Fine-tuning entry point (SST-2 / GLUE-style classification, SQuAD v1.1).

    python finetuneit.py --config configs/finetune_sst2.yaml model=checkpoints/<run>/final
    torchrun --nproc_per_node=4 finetuneit.py --config configs/finetune_squad.yaml model=bert-large-uncased
"""
import sys

from kd.config import parse_cli
from kd.errors import friendly_errors


def main(argv=None) -> None:
    with friendly_errors():
        from kd.finetune import FinetuneConfig, run_finetuning
        cfg = parse_cli(FinetuneConfig, sys.argv[1:] if argv is None else argv)
        run_finetuning(cfg)


if __name__ == "__main__":
    main()
