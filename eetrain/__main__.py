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
        code = getattr(err, "exit_code", 2)
        job = _sweep_job_here()
        if job is not None and code == 2:
            # a sweep's jobs in this process (Hydra's basic launcher): one job's bad input must not end the
            # sweep (exiting here would); `main` reports the failed jobs and exits 2 once all have run
            _failed_jobs.append(job)
            print(f"eetrain: error: sweep job {job}: {err}", file=sys.stderr)
            return None
        print(f"eetrain: error: {err}", file=sys.stderr)
        sys.exit(code)


#: the sweep jobs of this process that stopped on bad input ("#<num> (<overrides>)")
_failed_jobs: list[str] = []


def _sweep_job_here() -> str | None:
    """"#<num> (<overrides>)" when this job is one of a multirun's that Hydra runs in this process, else None
    (a single run; or a launcher's own process per job, e.g. SLURM's, where the exit code is the report)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not str(hc.launcher.get("_target_", "")).endswith("BasicLauncher"):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    swept = set()
    for arg in sys.argv[1:]:
        if "=" in arg and not arg.startswith("-"):
            override = parser.parse_override(arg)
            if override.is_sweep_override():
                swept.add(override.get_key_element())
    mine = [o for o in hc.overrides.task if o.split("=", 1)[0] in swept]
    return f"#{hc.job.num} ({','.join(mine) or hc.runtime.output_dir})"


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


def unknown_key_hint(args: list[str]) -> str | None:
    """After Hydra refused the command line: for an override of a key the config does not have (Hydra says
    "Key 'lrr' is not in struct"), the keys its parent has and the closest one; None if none is unknown."""
    import difflib

    from omegaconf import OmegaConf

    from eetrain.config import compose

    def plain(a: str) -> bool:  # `a.b=v`: an existing key's new value (not a group, +add, ~delete, flag)
        key = a.split("=", 1)[0]
        return "=" in a and not a.startswith(("-", "+", "~")) and "." in key and "/" not in key \
            and not key.startswith("hydra.")

    try:
        cfg = compose([a for a in args if not plain(a) and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a group or syntax error: Hydra's own message names it
        return None
    missing = object()
    for arg in filter(plain, args):
        key = arg.split("=", 1)[0]
        if OmegaConf.select(cfg, key, default=missing) is not missing:
            continue
        parts = key.split(".")  # the first part of the key that is not there
        depth = next(i for i in range(1, len(parts) + 1)
                     if OmegaConf.select(cfg, ".".join(parts[:i]), default=missing) is missing)
        parent_key, name = ".".join(parts[: depth - 1]), parts[depth - 1]
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if not OmegaConf.is_dict(parent):
            return f"{key}: no such key ({parent_key} is not a mapping in this config)"
        key = ".".join(parts[:depth])
        keys = sorted(str(k) for k in parent)
        close = difflib.get_close_matches(name, keys, n=1)
        guess = f" (did you mean {parent_key}.{close[0]}?)" if close else ""
        return (f"{key}: no such key{guess}; {parent_key or 'the config'} has: {', '.join(keys)} (a new key is "
                f"added with +{arg.split('=', 1)[0]}=...)")
    return None


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
    _failed_jobs.clear()
    try:
        _hydra_main()
        if _failed_jobs:
            print(f"eetrain: error: {len(_failed_jobs)} sweep job(s) stopped on bad input: {', '.join(_failed_jobs)} "
                  "(each one's error is above)", file=sys.stderr)
            sys.exit(2)
    except SystemExit as e:
        # Hydra reports an unknown key, config group option or override syntax (naming the key and the
        # options) and exits 1, as it does for a crash; bad input exits 2 everywhere else in eetrain.
        if e.code == 1 and not _composed:
            hint = unknown_key_hint(sys.argv[1:])
            if hint:
                print(f"eetrain: error: {hint}", file=sys.stderr)
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
