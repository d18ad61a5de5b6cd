"""`python -m fedtrain.operator`: the kopf operator, configured by FEDTRAIN_OPERATOR_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from .runner import run_operator
from .settings import ENV_PREFIX, OperatorSettings


def main() -> int:
    try:
        settings = OperatorSettings()
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"])
            print(f"{ENV_PREFIX}{field.upper()}: {problem['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The operator's own lines at the level asked for; kopf logs every handler call at INFO
    # ("Handler 'job_event' succeeded"), thousands a minute with many trainings: warnings only.
    logging.getLogger("fedtrain").setLevel(settings.log_level)
    logging.getLogger("kopf").setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(run_operator(settings))


if __name__ == "__main__":
    sys.exit(main())
