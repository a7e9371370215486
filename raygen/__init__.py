"""raygen: train, tune, audit and serve generative models on Ray.

One import package, `raygen`, whose subpackages keep the repository's top-level folders:
`raygen.jobs` is `jobs/`, `raygen.serving` is `serving/`, `raygen.tuning` is `tuning/`,
`raygen.cluster` is `cluster/`. An installed wheel holds them inside `raygen/`
(pyproject's package-dir); in a source tree (a clone, an editable install, the working
directory Ray uploads with a submitted job) they are found beside this folder, so the
code always comes from the same tree as this file.
"""

import os

__version__ = "0.1.0"

_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "jobs")):  # a source tree, not an installed wheel
    __path__.append(os.path.dirname(_here))  # noqa: F821 (a package's own __path__)
