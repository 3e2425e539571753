"""Client tasks of the strategy families, registered in ``simulations.client_app.TASKS``.

A strategy asks for a task through the ``task`` key of its train ConfigRecord; each family module
here registers its tasks on import (``train`` — plain local SGD — lives in ``client_app``).
"""

from simulations.tasks import fedins as _fedins  # noqa: F401
from simulations.tasks import merging as _merging  # noqa: F401
