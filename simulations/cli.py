"""The argument parser of every ``python -m simulations.…`` command line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose usage errors follow the project's convention:
    one line ``error: <message>`` on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
