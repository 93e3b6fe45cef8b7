"""The entry point of ranks 1..N-1 of a single-node DDP run: ``python -m fetalbrain.distributed
RUN_DIR/ddp_config.yaml``, started by the run itself (``fetalbrain.training.ddp``) with the resolved config it runs.
"""

import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fetalbrain.training.ddp import RANK_CONFIG_FILE

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    """A rank > 0 of a single-node DDP run: the resolved config of the run, the rank from the environment."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        raise SystemExit(f"usage: python -m fetalbrain.distributed RUN_DIR/{RANK_CONFIG_FILE} (started by a DDP run)")
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("fetalbrain.distributed runs the ranks > 0 of a DDP run; start the run with fetalbrain.train")
    from fetalbrain.training.fit import train
    from fetalbrain.training.tracking import finish_tracking

    logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ['LOCAL_RANK']}] %(levelname)s %(message)s")
    try:
        train(OmegaConf.load(args[0]))
    finally:
        finish_tracking()


if __name__ == "__main__":
    main()
