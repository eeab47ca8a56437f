"""The DVC stage runners: one module per stage, each with a ``main()`` that reads ``params.yaml`` (or
``$SSLVISION_PARAMS``) from the working directory, calls the library, writes the stage's outputs and
exits with ``STAGE: error: ...`` (the line ``sslvision run`` reports) on bad input.

A project's ``dvc.yaml`` runs them as ``python -m sslvision.stages.<name>``, so a project made by
``sslvision init`` needs no copy of this repository; the repository's own ``stages/<name>.py`` (the demo
project's scripts) call the same ``main()``.
"""

from __future__ import annotations

from sslvision.params import ParamsError, params_path, read_params

# The pipeline's DVC stages in run order: the stage names of dvc.yaml, this repository's and the one
# ``sslvision init`` writes (tests/test_params_file.py checks both). Every other list of stages is this one.
STAGES = ("ingest", "pretrain", "embed", "audit", "synthesize", "finetune", "drift_eval")

# The params key that records which sslvision made a project's outputs (``sslvision init`` writes it).
VERSION_KEY = ("sslvision", "version")


def check_code_version() -> None:
    """Refuse to run other code than the project's outputs were made with.

    A project made by ``sslvision init`` runs the stage code of the installed package, which its
    ``dvc.yaml`` cannot name as a file dependency; instead each stage depends on the params key
    ``sslvision.version``. Raising it after an upgrade re-runs every stage on the new code; running a
    stage with another version installed would record outputs of one version under another, so it is
    refused. A params file without the key (the demo project, whose ``dvc.yaml`` depends on the
    library's source files) is not checked."""
    from importlib.metadata import version

    section, key = VERSION_KEY
    recorded = (read_params().get(section) or {}).get(key)
    if recorded is None:
        return
    installed = version("sslvision")
    if str(recorded) != installed:
        raise ParamsError(f"{params_path()}: {section}.{key}: the project is set to sslvision {recorded} but "
                          f"{installed} is installed; set {section}.{key} to {installed} to re-run every stage "
                          f"on the installed code (or install sslvision=={recorded})")
