"""`python -m fedtrain.operator`: the kopf operator, configured by FEDTRAIN_OPERATOR_* variables."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from .runner import run_operator
from .settings import ENV_PREFIX, OperatorSettings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every handler call at INFO ("Handler 'job_event' succeeded"), thousands a minute
    # with many trainings; the operator's own log lines say what happens.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = OperatorSettings()
    except ValidationError as error:
        for problem in error.errors():
            field = ".".join(str(part) for part in problem["loc"])
            print(f"{ENV_PREFIX}{field.upper()}: {problem['msg']}", file=sys.stderr)
        return 2
    return asyncio.run(run_operator(settings))


if __name__ == "__main__":
    sys.exit(main())
