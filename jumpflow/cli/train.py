"""``jumpflow-train``: the hydra entry point of the one training loop.

    jumpflow-train objective=meanflow task=toy2d trainer.max_steps=2000 logger=none
    jumpflow-train experiment=toy2d objective=meanflow hydra.run.dir=runs/mf
    jumpflow-train hydra.run.dir=runs/mf resume=true
    jumpflow-train -m objective=flow_matching,meanflow seed=0,1
    jumpflow-train --help | --cfg job
    python -m torch.distributed.run --nproc_per_node 2 -m jumpflow.cli.train ...

Configs are the package ``jumpflow.configs`` (``configs/`` in the repository). A bad
configuration value stops the run before training with one line,
``jumpflow-train: error: <key>: <message>``, and exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

# torch and the trainer are imported only when a run starts: --help, --cfg and a bad group name
# answer without them (no torch start; tests/test_trainer.py::test_cli_help_and_cfg_job holds it)
from jumpflow.config import ConfigError, check_group_overrides, validate_config

PROG = "jumpflow-train"


def _fail(message: str, code: int) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path="pkg://jumpflow.configs", config_name="train", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        validate_config(cfg)                   # torch-free: a bad value answers before the imports below
    except ConfigError as err:
        _fail(str(err), 2)
    from jumpflow.checkpoint import CheckpointError
    from jumpflow.trainer import train

    try:
        result = train(cfg)
    except ConfigError as err:
        _fail(str(err), 2)
    except CheckpointError as err:
        _fail(f"checkpoint: {err}", 1)
    else:
        if result.get("metrics"):
            metrics = " ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
            print(f"{PROG}: step {result['step']}: {metrics}", file=sys.stderr, flush=True)
        print(f"{PROG}: run directory {result['run_dir']}", file=sys.stderr, flush=True)


def main() -> None:
    """Console entry point: check group names (one-line error), then hand over to hydra."""
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        _fail(str(err), 2)
    _hydra_main()


if __name__ == "__main__":
    main()
