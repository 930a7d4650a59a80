"""The reliability suite (see docs/reliability.md).

A package, so that its modules are imported as ``reliability.*``: its conftest does
not replace ``tests/conftest.py`` as the module ``conftest`` that other tests import
from, and worker processes import ``reliability.pipelines`` under the same name as the
tests (stage identities, and so cache keys, match).
"""
