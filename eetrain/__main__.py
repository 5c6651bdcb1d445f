"""`python -m eetrain +experiment=demo`: the Hydra entry point."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from eetrain.config import CONF_DIR, register_resolvers
from eetrain.errors import EetrainError


def user_error(exc: BaseException) -> EetrainError | None:
    """The EetrainError behind `exc`, if any (Hydra wraps errors raised inside `instantiate`)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, EetrainError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from eetrain.train import run

    try:
        return run(cfg)
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"eetrain: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    register_resolvers()
    _hydra_main()


if __name__ == "__main__":
    main()
