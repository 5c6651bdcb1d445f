"""`python -m eetrain +experiment=demo`: the Hydra entry point."""

from __future__ import annotations

import logging
import os
import re
import sys

import hydra
from omegaconf import DictConfig

from eetrain.config import CONF_DIR, register_resolvers
from eetrain.errors import EetrainError, user_error  # user_error: also imported from here by callers

#: set once Hydra has composed a config and handed it over: an exit before that is a bad command line
_composed = False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    global _composed
    _composed = True
    _log_lightning_once()
    from eetrain.train import run

    try:
        return run(cfg)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"eetrain: error: {err}", file=sys.stderr)
        sys.exit(2)


def _log_lightning_once() -> None:
    """Lightning's package logger prints to stderr with a console handler of its own and also hands its
    records on to the root logger, where Hydra's logging (a console and `<run dir>/<job>.log`) prints them
    again: every Lightning message twice. Where Hydra's handlers are there, they alone print it."""
    import lightning  # noqa: F401 - (adds that handler on import)

    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


def check_overrides(args: list[str]) -> None:
    """Overrides Hydra would reject without naming them, as one ConfigError naming the override: one it
    cannot parse (Hydra says only "no viable alternative at input '['"), and a list, or a mapping with
    other keys, for `exits.layers` where the composed config has a mapping (FREE's `{shallow: L_s}`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from eetrain.errors import ConfigError

    parser = OverridesParser.create()
    for arg in args:
        if "=" in arg and not arg.startswith("-"):  # (a flag's own value, e.g. `--cfg job`, has no '=')
            try:
                parser.parse_overrides([arg])
            except OverrideParseException as e:
                raise ConfigError(
                    f"{arg!r} is not a valid override: {e.message.splitlines()[0]}; quote values with brackets or "
                    "special characters (e.g. 'exits.layers=[2,4]', 'data.prefix=\"a, b\"'), "
                    "see https://hydra.cc/docs/advanced/override_grammar/basic/"
                ) from None
    check_slurm(args)
    lists = [a for a in args if a.lstrip("+").startswith("exits.layers=") and a.split("=", 1)[1].lstrip()[:1] in ("[", "{")]
    if not lists:
        return
    from omegaconf import OmegaConf

    from eetrain.config import compose

    others = [a for a in args if a not in lists and not a.startswith("-") and not a.startswith("hydra.")]
    try:
        layers = (compose(others).get("exits") or {}).get("layers")
    except Exception:  # noqa: BLE001 - any other problem is Hydra's to report
        return
    if not OmegaConf.is_dict(layers):
        return
    value = lists[-1].split("=", 1)[1]
    current = OmegaConf.to_container(layers, resolve=False)
    if value.lstrip().startswith("{") and set(re.findall(r"(\w+)\s*:", value)) <= set(layers):
        return  # the same mapping's keys: Hydra merges it
    if "shallow" in layers:
        raise ConfigError(
            f"exits.layers={value}: the free loss needs exits.layers={{shallow: L_s}} (its shallow exit; the last "
            f"layer always exits), this config has {current}; allowed: {{shallow: N}} with N in 1..L-1, e.g. "
            "'exits.layers={shallow: 2}' (a list of exits needs another loss, e.g. loss=calm)"
        )
    raise ConfigError(
        f"exits.layers={value}: this config sets exits.layers to the mapping {current}, which another form cannot "
        f"replace on the command line; use '~exits.layers' '+exits.layers={value}'"
    )


def check_slurm(args: list[str]) -> None:
    """`hydra/launcher=slurm` submits with SLURM's `srun`/`sbatch`: without them (not on a cluster's login
    node) submitit stops in a traceback after Hydra has started; say so at once."""
    import shutil

    from eetrain.errors import ConfigError

    slurm = any(a.lstrip("+") in ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm") for a in args)
    if slurm and ({"-m", "--multirun"} & set(args)) and shutil.which("srun") is None:
        raise ConfigError(
            "hydra/launcher=slurm: no `srun` on PATH, so this is not a SLURM cluster's login node; submit from "
            "one, or drop hydra/launcher=slurm to run the sweep here (hydra/launcher=submitit_local: local processes)"
        )


def main() -> None:
    global _composed
    _composed = False  # (tests run main() many times in one process)
    register_resolvers()
    try:
        check_overrides(sys.argv[1:])
    except EetrainError as err:
        print(f"eetrain: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        _hydra_main()
    except SystemExit as e:
        # Hydra reports an unknown key, config group option or override syntax (naming the key and the
        # options) and exits 1, as it does for a crash; bad input exits 2 everywhere else in eetrain.
        if e.code == 1 and not _composed:
            sys.exit(2)
        raise
    except Exception as e:
        # Hydra's check of its own flags (a ValueError, e.g. `-m` with `--cfg job`), and its composition
        # errors where it raises them instead of reporting them (under a debugger or coverage: `sys.gettrace()`)
        from hydra.errors import HydraException

        if _composed or not isinstance(e, ValueError | HydraException) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"eetrain: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
