"""Spark: pyspark from PyPI, local master. Nothing to keep running.

"Ready" means the install works: pyspark imports, ``spark-submit`` is beside
the venv's python, and a Java that Spark 4 accepts (17+) is there.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..service import Service, java_home


def spark_submit() -> Path:
    """The venv's ``spark-submit`` (installed with pyspark)."""
    return Path(sys.executable).parent / "spark-submit"


class Spark(Service):
    name = "spark"
    daemon = False
    ready_timeout = 10.0

    def is_installed(self) -> bool:
        try:
            java_home(17)
        except RuntimeError:
            return False
        return importlib.util.find_spec("pyspark") is not None and spark_submit().exists()

    def install(self) -> None:
        if not self.is_installed():
            raise RuntimeError(f"pyspark or {spark_submit()} missing (or no Java 17+): "
                               "run `make venv` (pyspark is a project dependency)")

    def ports(self) -> list[int]:
        return []

    def address(self) -> str:
        return str(self.opts["master"])

    def start(self) -> None:
        """No daemon: spark-submit starts a local driver per job."""

    def ready(self) -> bool:
        return self.is_installed()
