"""Distillation pretraining entry point.

    torchrun --nproc_per_node=8 ddp_main.py --config configs/bert_large_to_6l.yaml [key=value ...]
    python ddp_main.py --config configs/demo.yaml          # single process, no torchrun needed
"""
import sys

from kd.config import PretrainConfig, parse_cli, validate_pretrain
from kd.errors import friendly_errors


def main(argv=None) -> None:
    with friendly_errors():
        cfg = parse_cli(PretrainConfig, sys.argv[1:] if argv is None else argv)
        validate_pretrain(cfg)  # contradictions fail before torch and transformers load
        from kd.pretrain import run_pretraining  # heavy imports only after the config is valid
        run_pretraining(cfg)


if __name__ == "__main__":
    main()
