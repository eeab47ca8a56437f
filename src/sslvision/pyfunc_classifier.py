"""The classifier as an MLflow pyfunc model, logged *as code* (MLflow "models from code").

:func:`sslvision.registry.log_and_register` passes this file as ``python_model``: MLflow stores the
file and runs it when the model is loaded, so no Python object is ever pickled. The model's artifacts
are the safetensors weights and JSON config of ``models/classifier/``. Not imported by the library.
"""

from typing import Any

import mlflow


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """Base64 image files (``image``) or converted pixels (``pixels``) in; ``prediction``, ``label``,
    ``confidence``, ``prob_<k>`` and ``error`` out (:func:`sslvision.registry.predict_frame`)."""

    def load_context(self, context: Any) -> None:
        from sslvision.finetune import load_classifier

        self.classifier = load_classifier(context.artifacts["classifier"])

    # No type hints here: MLflow would try to derive a signature from them (the logged one is explicit).
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from sslvision.registry import predict_frame

        return predict_frame(self.classifier, model_input)


mlflow.models.set_model(ClassifierPyfunc())
