"""The Prefect flows: ``train`` (:mod:`sslvision.flows.train`: the DVC stages as tasks) and ``monitor``
(:mod:`sslvision.flows.monitor`: evaluate production batches, act on the trigger's decision), and their
deployments (:mod:`sslvision.flows.deployments`, served by ``sslvision serve``).

A project's ``prefect.yaml`` names them as modules of the installed package
(``sslvision.flows.train:train``), so a project made by ``sslvision init`` needs no flow file; this
repository's ``pipelines/*.py`` are entry files that import them.
"""

# The Prefect event the monitor emits on degradation, and the resource it names: the ``train`` deployment's
# trigger (here and in prefect.yaml) expects them.
DEGRADATION_EVENT = "sslvision.degradation"
PIPELINE_RESOURCE = "sslvision.pipeline"
