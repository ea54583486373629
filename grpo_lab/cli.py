"""``grpo-lab``: the LightningCLI entry point.

    grpo-lab fit --config configs/tiny.yaml [--model.advantage rloo ...]
    grpo-lab warmstart --config configs/tiny.yaml     # build (or find) the cached warm start only
    grpo-lab fit --help                               # every option with its help text
    grpo-lab fit --config my.yaml --debug             # a user error's full traceback, not just its line

``configs/base.yaml`` is loaded first as the default config (when present), so the shipped configs are small
overlays on it.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from grpo_lab.data.datamodule import QueryDataModule
from grpo_lab.model.warmstart import ensure_warm_start
from grpo_lab.module import GRPOModule
from grpo_lab.system.entry import run_cli
from grpo_lab.system.errors import UserError, UserFileNotFoundError
from grpo_lab.system.ports import choose_rendezvous_port

BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "base.yaml"
DEBUG_HELP = ("A mistake in the config or data prints one 'error: ...' line (exit status 2); --debug "
              "(anywhere on the command line) or GRPO_LAB_DEBUG=1 shows its full traceback.")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values that are not file names


class GRPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"seed_everything": 0})

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path PATH`` must exist (a user error before anything is built, not Lightning's traceback
        after). ``--ckpt_path last``: continue in the newest TensorBoard version that holds a ``last.ckpt``,
        so the checkpoint is found and the curves carry on in the same run directory."""
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        # a file, or a directory for sharded (FSDP, DeepSpeed) checkpoints
        if isinstance(ckpt, str) and ckpt.split(":")[0] not in LIGHTNING_CKPT_NAMES and "://" not in ckpt \
                and not Path(ckpt).exists():
            raise UserFileNotFoundError(f"--ckpt_path {ckpt}: no such checkpoint (give a .ckpt path, or "
                                        "'last')")
        if ckpt != "last":
            check_checkpoint(ckpt)
            return
        for dirpath in checkpoint_dirs(cfg):  # a ModelCheckpoint with its own dirpath keeps last.ckpt there
            check_checkpoint(ckpt, Path(dirpath) / "last.ckpt")
        logger = cfg.get("trainer", {}).get("logger")
        has_args = logger is not None and not isinstance(logger, bool)
        args = getattr(logger, "init_args", None) if has_args else None
        if args is None or args.get("version") is not None:
            return
        root = Path(args.get("save_dir") or "runs") / (args.get("name") or "lightning_logs")
        done = sorted(root.glob("version_*/checkpoints/last.ckpt"),
                      key=lambda p: int(p.parts[-3].split("_")[1]))
        if done:
            args["version"] = int(done[-1].parts[-3].split("_")[1])
            check_checkpoint(ckpt, done[-1])

    def before_fit(self) -> None:
        """A multi-process fit on this machine gets its rendezvous port below the ephemeral range
        (``grpo_lab/system/ports.py``: Lightning's own pick can collide, EADDRINUSE)."""
        choose_rendezvous_port(self.trainer)

    def instantiate_trainer(self, **kwargs):
        """Add a Rich progress bar unless the config turns bars off or names its own."""
        cfg = self._get(self.config_init, "trainer", default={})
        callbacks = cfg.get("callbacks") or []
        has_bar = any(isinstance(c, ProgressBar)
                      for c in (callbacks if isinstance(callbacks, list) else [callbacks]))
        if cfg.get("enable_progress_bar") is not False and not has_bar:
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": [RichProgressBar()]}
        return super().instantiate_trainer(**kwargs)


def check_checkpoint(given, path: Path | None = None) -> None:
    """A checkpoint file (``path``, else ``given`` itself) that is not a complete zip archive, as
    ``torch.save`` writes it (truncated by a full disk or an interrupted copy), is a user error naming it;
    a directory (a sharded checkpoint) or a remote path is left to Lightning."""
    if not isinstance(given, str) or "://" in given:
        return
    path = Path(given) if path is None else path
    if path.is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"--ckpt_path {given}: {path} is truncated or not a checkpoint (a Lightning .ckpt is "
                        "a zip archive written by torch.save); give an earlier checkpoint, or remove it")


def checkpoint_dirs(cfg) -> list[str]:
    """The ``dirpath`` of every ``ModelCheckpoint`` in the config's ``trainer.callbacks`` that sets one."""
    callbacks = cfg.get("trainer", {}).get("callbacks") or []
    found = []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = getattr(cb, "init_args", None)
        if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint") and args is not None \
                and args.get("dirpath"):
            found.append(str(args.get("dirpath")))
    return found


def _parser_kwargs() -> dict:
    defaults = [str(BASE_CONFIG)] if BASE_CONFIG.is_file() else []
    return {sub: {"default_config_files": defaults, "epilog": DEBUG_HELP}
            for sub in ("fit", "validate", "test", "predict")}


def cli_main(args: list[str] | None = None, run: bool = True) -> GRPOCLI:
    return GRPOCLI(
        GRPOModule,
        QueryDataModule,
        args=args,
        run=run,
        parser_kwargs=_parser_kwargs() if run
        else {"default_config_files": [str(BASE_CONFIG)] if BASE_CONFIG.is_file() else []},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def warmstart_main(args: list[str]) -> None:
    """Build the warm start that ``fit`` with the same config would load, and print where it is."""
    cli = cli_main(args, run=False)
    path = ensure_warm_start(cli.model.policy_cfg, cli.model.warm_start_cfg, cli.datamodule.hparams.dataset)
    meta = path / "warmstart.json"
    print(f"warm start: {path}")
    if meta.is_file():
        print(meta.read_text())


def _main(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "warmstart":
        warmstart_main(args[1:])
    else:
        cli_main(argv)  # None: LightningCLI reads sys.argv itself


def main(argv: list[str] | None = None) -> None:
    """The ``grpo-lab`` command: a mistake in the config or data is one ``error:`` line and exit status 2
    (``--debug`` for the traceback); see ``grpo_lab.system.errors``."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
