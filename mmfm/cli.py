"""`mmfm` command line: data preparation, training, model info, conversion and launching.

The end-to-end demo is `make demo` (launchers/demo.py): orchestration, not installed code.

User errors (`mmfm.errors.MmfmError`: bad config values, missing data, damaged checkpoints)
print one line, `error: ...`, and exit with status 2; set MMFM_DEBUG=1 to see the traceback
instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mmfm.cli_args import parse_args_anywhere
from mmfm.config import ExperimentConfig, load_config
from mmfm.errors import MmfmError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML preset, e.g. configs/text_moe_tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, e.g. train.steps=50 model.moe.num_experts=4")
    parser.add_argument("--dense-equivalent", action="store_true",
                        help="replace the MoE FFNs with one dense SwiGLU of equal active parameters")


def _resolve(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_config(args.config, args.overrides)
    if args.dense_equivalent:
        from mmfm.model.counting import dense_equivalent

        cfg.model = dense_equivalent(cfg.model)
        cfg.run.name = f"{cfg.run.name}_dense_equiv"
        cfg.validate()
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from mmfm.parallel.mesh import destroy_at_exit
    from mmfm.train.trainer import Trainer

    cfg = _resolve(args)
    trainer = Trainer(cfg, resume=args.resume, resume_from=args.resume_from,
                      overwrite=args.overwrite, allow_fresh=args.allow_fresh)
    destroy_at_exit()
    result = trainer.fit()
    if not trainer.is_main_process:
        return 0
    print(f"run directory: {result.run_dir}")
    print(f"  resolved config: {result.run_dir / 'config.yaml'}")
    print(f"  metrics:         {result.run_dir / 'metrics.jsonl'}")
    print(f"  checkpoint:      {result.checkpoint}")
    if result.val_loss is not None:
        print(f"  final validation loss: {result.val_loss:.4f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from mmfm.model.info import describe

    print(describe(_resolve(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML preset",
                           description="Train a model from a YAML preset with dotted overrides.")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in the run directory")
    train.add_argument("--resume-from", metavar="CKPT_DIR", help="continue from this checkpoint "
                       "(a newer branch of this run's lineage is kept aside, never resumed)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing run of the same run.name (without it a fresh "
                            "run over an existing one is refused)")
    train.add_argument("--allow-fresh", action="store_true",
                       help="with --resume: start fresh when the run has no checkpoint yet "
                            "(without it that is an error)")
    train.set_defaults(func=cmd_train)

    info = sub.add_parser("info", help="parameter and FLOP counts of a config",
                          description="Print total/active parameters, FLOPs per token and, for "
                                      "an MoE config, its dense-equivalent twin.")
    _add_config_args(info)
    info.set_defaults(func=cmd_info)


    from mmfm.data.cli import register as register_data

    register_data(sub)
    from mmfm.convert.cli import register as register_convert

    register_convert(sub)
    from mmfm.parallel.launch import register as register_launch

    register_launch(sub)
    from mmfm.report.cli import register as register_report

    register_report(sub)
    from mmfm.plan_cli import register as register_plan

    register_plan(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args_anywhere(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except MmfmError as err:  # user errors: one line; anything else keeps its traceback
        if os.environ.get("MMFM_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        if os.environ.get("MMFM_DEBUG"):
            raise
        print(f"error: {err.filename or err}: file not found", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
