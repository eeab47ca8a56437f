"""The MLflow model registry: log the classifier without pickles, register it, promote it only when
it is really better, roll back.

**Logging.** The classifier is logged as an MLflow pyfunc *defined in code* ("models from code"):
``python_model`` is the file :data:`PYFUNC_CODE` (MLflow stores the file itself, never a pickled
object) and the model's only artifacts are ``classifier.safetensors`` + ``config.json``; the
``sslvision`` sources go with it (``code_paths``), so the logged model loads wherever its pip
requirements are installed. The model carries its class names and the conversion ingest applied to its
training images (``config.json``), so a client sends images, not pixels, and reads class names.

**Input** (:func:`predict_frame`): a frame with one row per image and either column (or both, one of the
two set per row):

- ``image``: the encoded file (JPEG, PNG, TIFF, ...) as a base64 string, MLflow's serving convention for
  binary data; decoded and converted exactly as ingest did (:func:`sslvision.ingest.decode_bytes`: EXIF
  orientation, 16-bit scaling, channels, size, and ingest's size limits);
- ``pixels``: the image already converted, flattened ``H*W*C`` uint8 values (the ingest layout).

**Output**, one row per input row: ``prediction`` (class index), ``label`` (class name), ``confidence``
(the calibrated top probability), ``prob_<k>`` (the probability of class ``k``, ``label`` naming the
top one; indices rather than names keep the columns valid whatever the class names are), and ``error``.
A row that cannot be used (bytes that are not base64 or not an image, a wrong pixel count) gets
``prediction`` -1, null ``label``, ``confidence`` and probabilities, and its reason in ``error`` (null
on the other rows), and the other rows are still answered: a served batch loses one answer, not the
whole request (and the JSON stays valid: no NaN). Signature and input
example (one base64 PNG) are logged.

**Aliases**, never deprecated stages: a freshly registered version becomes ``challenger``; a
promotion moves ``champion`` to it and keeps the former champion as ``previous``; :func:`rollback`
moves ``champion`` back to ``previous``.

**Gated promotion** (:func:`promote`). The challenger and the current champion are evaluated on the
same golden set with :func:`mlflow.models.evaluate` (custom metrics: balanced accuracy, worst-class
recall, ECE, accuracy, macro-F1) and each threshold is checked with
:func:`mlflow.validate_evaluation_results`:

- ``balanced_accuracy`` >= ``min_balanced_accuracy`` and (when a champion exists) >= the champion's
  + ``min_improvement``;
- ``worst_class_recall`` >= the champion's minus ``worst_class_tolerance`` (MLflow's relative checks
  only express strict improvements, so "not worse" is an absolute threshold taken from the champion's
  evaluation on the same set);
- ``worst_class_recall`` >= ``min_worst_class_recall`` (gate ``worst_class_floor``), also for the first model;
- ``balanced_accuracy`` >= the pixel baseline's + ``baseline_margin`` (gate ``pixel_baseline``, with
  ``beat_pixel_baseline``): the logistic regression on pixel PCA features that the finetune stage fitted on
  the same training labels (:mod:`sslvision.baselines`), scored on the same golden set and recorded as a
  version tag at registration (:func:`record_pixel_baseline`), so a later ``sslvision promote`` compares with
  the same number. A baseline recorded on another golden set refuses the promotion; a version with none
  (registered outside the finetune stage) falls back to the champion's, and with neither the gate is skipped
  (logged, and said in the decision's ``pixel_baseline.source``). A custom gate (``limits_for``, the prior
  correction's) replaces all of these;
- ``ece`` <= ``max_ece``.

With no champion (the first model) only the absolute thresholds apply. A refusal lists every failed
threshold. Aliases move only after every check passed, in an order where each intermediate state is
a valid registry: ``previous`` first (the champion is still in place), then ``champion``, then the
``challenger`` alias is removed. A crash between two moves leaves a registry that serves a validated
champion, and running ``promote`` (or ``rollback``) again completes the interrupted move. Just before
the aliases move, both are read again: a challenger registered (or a champion moved) while the
evaluation ran refuses the promotion instead of dropping a version nobody evaluated (``sslvision
promote`` also holds the project lock, which every pipeline run holds).

**Model files are code.** Loading the logged model runs its stored ``python_model`` file and its
``code/sslvision`` copy, so write access to the artifact store would be code execution. At
registration the SHA-256 of every file of the logged model is recorded as a tag of the model version
(``sslvision.sha256/<path>``), in the tracking database rather than beside the files; every load
(:func:`load_version` for the evaluation, :func:`load_champion_classifier` for monitoring) first copies
the files to a private directory and compares them with those digests (:func:`verified_copy`), and a
modified, missing or added file refuses the load, naming the file.

**Interrupted runs** (:func:`recover`): a run killed after registering leaves a ``challenger`` that no
gate saw; the next pipeline run gates it before anything else (with ``auto_promote``) and closes the
killed processes' MLflow runs as ``FAILED`` (:func:`sslvision.tracking.close_orphaned_runs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import sslvision
from sslvision import tracking
from sslvision.data import Ingested
from sslvision.finetune import FinetuneParams, load_classifier
from sslvision.ingest import decode_bytes
from sslvision.metrics import expected_calibration_error
from sslvision.params import load_section, params_path, read_params

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_classifier.py")
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
DIGEST_TAG = "sslvision.sha256/"  # + the file's path in the logged model: its SHA-256
PROMOTION_TAG = "sslvision.promotion"  # set on a version by every gate decision (and a rollback)
# mlflow.models.evaluate names a custom metric's aggregate "<metric>/<aggregate>".
BALANCED_ACCURACY, WORST_CLASS_RECALL, ECE = "balanced_accuracy/score", "worst_class_recall/score", "ece/score"
# The pixel baseline's balanced accuracy on the golden set, and that set's digest: version tags set at registration.
BASELINE_TAG = "sslvision.baseline.pixel_logreg.balanced_accuracy"
BASELINE_GOLDEN_TAG = "sslvision.baseline.pixel_logreg.golden_sha256"
# Gates that check a metric under another name than the metric's own (a metric has one threshold per check).
GATE_METRICS = {"pixel_baseline": BALANCED_ACCURACY, "worst_class_floor": WORST_CLASS_RECALL}


class RegistryError(RuntimeError):
    """The registry is not in a state that allows the requested move (no challenger, nothing to roll back...)."""


# --- the pyfunc model ----------------------------------------------------------------------------

IMAGE, PIXELS = "image", "pixels"  # the input columns (see the module docstring)


def _row_pixels(classifier: Any, image: Any, pixels: Any) -> tuple[np.ndarray | None, str | None]:
    """One input row as converted uint8 ``(H, W, C)`` pixels, or None and the reason."""
    import base64
    import binascii

    conv = classifier.conversion
    if isinstance(image, (str, bytes)):
        try:
            data = base64.b64decode(image, validate=True) if isinstance(image, str) else image
        except (binascii.Error, ValueError) as err:
            return None, f"{IMAGE}: not base64 ({err})"
        decoded = decode_bytes(data, conv)
        return (decoded[1], None) if decoded[0] == "ok" else (None, f"{IMAGE}: {decoded[1]}: {decoded[2]}")
    if pixels is not None and not (np.isscalar(pixels) and pd.isna(pixels)):
        x = np.asarray(pixels)
        if x.size != int(np.prod(conv.shape)) or x.dtype.kind not in "iuf" or x.min() < 0 or x.max() > 255:
            return None, (f"{PIXELS}: expected {int(np.prod(conv.shape))} values in 0..255 ({conv.size}x{conv.size}x"
                          f"{conv.channels} uint8, flattened), got {x.size} of {x.dtype}")
        return x.astype(np.uint8).reshape(conv.shape), None
    return None, f"neither {IMAGE!r} (base64 image file) nor {PIXELS!r} (flattened uint8 pixels) is set"


def predict_frame(classifier: Any, model_input: pd.DataFrame, batch_size: int = 512) -> pd.DataFrame:
    """The pyfunc's answer to ``model_input`` (columns ``image`` and/or ``pixels``, see the module
    docstring): ``prediction``, ``label``, ``confidence``, ``prob_<k>`` and ``error`` per row."""
    if not isinstance(model_input, pd.DataFrame) or not {IMAGE, PIXELS} & set(model_input.columns):
        raise ValueError(f"expected a frame with an {IMAGE!r} column (base64 image files) or a {PIXELS!r} column "
                         f"(flattened uint8 pixels), got {type(model_input).__name__}"
                         + (f" with columns {list(model_input.columns)[:10]}" if isinstance(model_input, pd.DataFrame)
                            else ""))
    n = len(model_input)
    images = model_input[IMAGE] if IMAGE in model_input else pd.Series([None] * n)
    pixels = model_input[PIXELS] if PIXELS in model_input else pd.Series([None] * n)
    rows = [_row_pixels(classifier, i, p) for i, p in zip(images.tolist(), pixels.tolist(), strict=True)]
    ok = [k for k, (x, _) in enumerate(rows) if x is not None]
    probs = np.full((n, len(classifier.classes)), np.nan)
    if ok:
        probs[ok] = classifier.predict_proba(np.stack([rows[k][0] for k in ok]), batch_size)
    prediction = np.full(n, -1, np.int64)
    prediction[ok] = probs[ok].argmax(1)
    columns = {"confidence": probs.max(1, initial=0.0, where=~np.isnan(probs)),
               **{f"prob_{k}": probs[:, k] for k in range(probs.shape[1])}}
    if len(ok) < n:  # null, not NaN, on the failed rows: MLflow writes NaN into its JSON, which most parsers refuse
        columns = {c: pd.Series(v, dtype=object).where(prediction >= 0, None) for c, v in columns.items()}
    return pd.DataFrame({
        "prediction": prediction,
        "label": pd.Series([classifier.classes[c] if c >= 0 else None for c in prediction], dtype=object),
        **columns,
        "error": pd.Series([err for _, err in rows], dtype=object),
    })


def pixel_frame(images: np.ndarray) -> pd.DataFrame:
    """Model input of converted uint8 ``(N, H, W, C)`` images: one flattened ``pixels`` array per row."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return pd.DataFrame({PIXELS: list(flat)})


def image_frame(files: list[bytes]) -> pd.DataFrame:
    """Model input of encoded image files (their bytes): one base64 ``image`` string per row."""
    import base64

    return pd.DataFrame({IMAGE: [base64.b64encode(f).decode("ascii") for f in files]})


def png_bytes(image: np.ndarray) -> bytes:
    """A converted uint8 ``(H, W, C)`` image as a PNG file (lossless: it decodes to the same pixels)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def model_signature(classifier: Any, example: pd.DataFrame) -> Any:
    """Input: an optional ``image`` string column and an optional ``pixels`` array column; output: the
    columns of :func:`predict_frame` on ``example`` (all but ``prediction`` null on a failed row)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    out = predict_frame(classifier, example)
    types = {"prediction": "long", "label": "string", "error": "string"}
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE, required=False), ColSpec(Array("long"), PIXELS, required=False)]),
        outputs=Schema([ColSpec(types.get(c, "double"), c, required=c == "prediction") for c in out.columns]))


def log_and_register(classifier_dir: str | Path, name: str, example_images: np.ndarray) -> str:
    """Log the classifier in the active run, register it under ``name`` and alias it ``challenger``.

    ``example_images``: converted uint8 ``(N, H, W, C)`` images; the first, as a base64 PNG, is the
    logged input example (what a client of ``mlflow models serve`` sends). Returns the new version.
    """
    import mlflow

    classifier = load_classifier(classifier_dir)
    example = image_frame([png_bytes(example_images[0])])
    signature = model_signature(classifier, example)
    info = mlflow.pyfunc.log_model(
        name="classifier",
        python_model=str(PYFUNC_CODE),
        artifacts={"classifier": str(Path(classifier_dir).resolve())},
        code_paths=[str(Path(sslvision.__file__).parent)],
        signature=signature,
        input_example=example,
        pip_requirements=_requirements(),
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    record_digests(name, version)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s version %s as %s", name, version, CHALLENGER)
    return version


def file_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under ``directory``, by its POSIX path relative to it."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                out[path.relative_to(directory).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def _download(name: str, version: str, dst: str) -> Path:
    """A copy of the files of ``name`` ``version`` under ``dst`` (for a local store too: never the store itself)."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dst))


def record_digests(name: str, version: str) -> None:
    """Tag the version with the SHA-256 of each file of the logged model, as stored (read back from the store)."""
    import mlflow

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="sslvision-model-") as tmp:
        digests = file_digests(_download(name, version, tmp))
    for path, digest in digests.items():
        client.set_model_version_tag(name, version, DIGEST_TAG + path, digest)


@contextlib.contextmanager
def verified_copy(name: str, version: str) -> Iterator[Path]:
    """A private copy of the files of ``name`` ``version``, checked against the digests recorded at
    registration and against :func:`check_defined_in_code`; deleted after the block. Loading from this
    copy (not from the store) means that the files checked are the files run.

    Raises :class:`RegistryError` naming each modified, missing or added file, or when the version has no
    digests (registered by an older sslvision or by other means: nothing vouches for its files)."""
    import mlflow

    uri = f"models:/{name}/{version}"
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    recorded = {k.removeprefix(DIGEST_TAG): v for k, v in tags.items() if k.startswith(DIGEST_TAG)}
    if not recorded:
        raise RegistryError(f"{uri}: refusing to load it: no file digests were recorded when it was registered "
                            "(not registered by this sslvision); register the model again (dvc repro finetune)")
    with tempfile.TemporaryDirectory(prefix="sslvision-model-") as tmp:
        local = _download(name, version, tmp)
        actual = file_digests(local)
        changed = [f"{path} ({'missing' if path not in actual else 'added' if path not in recorded else 'modified'})"
                   for path in sorted(set(recorded) | set(actual)) if recorded.get(path) != actual.get(path)]
        if changed:
            raise RegistryError(f"{uri}: refusing to load it: its files in the artifact store differ from the "
                                f"SHA-256 digests recorded at registration: {', '.join(changed[:10])}")
        check_defined_in_code(str(local))
        yield local


def load_version(name: str, version: str) -> Any:
    """The pyfunc model of ``name`` ``version``, loaded from a :func:`verified_copy`."""
    import mlflow

    with verified_copy(name, version) as local:
        return mlflow.pyfunc.load_model(str(local))


def load_champion_classifier(name: str) -> tuple[Any, str] | None:
    """The ``champion`` of ``name`` as a :class:`~sslvision.finetune.Classifier` and its version, or None
    when there is none. Only its weights and config are read (from a :func:`verified_copy`), by this
    installed sslvision: none of the model's stored code runs."""
    import mlflow

    version = alias_version(mlflow.MlflowClient(), name, CHAMPION)
    if version is None:
        return None
    return load_registered_classifier(name, version), version


def load_registered_classifier(name: str, version: str) -> Any:
    """Version ``version`` of ``name`` as a :class:`~sslvision.finetune.Classifier`: only its weights and
    config are read (from a :func:`verified_copy`), by this installed sslvision; none of its code runs."""
    import yaml

    with verified_copy(name, version) as local:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        return load_classifier(local / flavor["artifacts"]["classifier"]["path"])


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "timm", "safetensors", "numpy", "pandas", "mlflow")]


# --- evaluation on the golden set ----------------------------------------------------------------

def _metric_value(x: float) -> Any:
    from mlflow.metrics import MetricValue

    return MetricValue(aggregate_results={"score": float(x)})


def _per_class_recall(predictions: pd.Series, targets: pd.Series) -> np.ndarray:
    from sklearn.metrics import recall_score

    labels = np.unique(np.asarray(targets))
    return recall_score(np.asarray(targets), np.asarray(predictions), labels=labels, average=None, zero_division=0)


def _balanced_accuracy(predictions: pd.Series, targets: pd.Series) -> Any:
    return _metric_value(_per_class_recall(predictions, targets).mean())


def _worst_class_recall(predictions: pd.Series, targets: pd.Series) -> Any:
    return _metric_value(_per_class_recall(predictions, targets).min())


def _accuracy(predictions: pd.Series, targets: pd.Series) -> Any:
    return _metric_value(np.mean(np.asarray(predictions) == np.asarray(targets)))


def _macro_f1(predictions: pd.Series, targets: pd.Series) -> Any:
    from sklearn.metrics import f1_score

    labels = np.unique(np.asarray(targets))
    return _metric_value(f1_score(np.asarray(targets), np.asarray(predictions), labels=labels, average="macro",
                                  zero_division=0))


def _ece(predictions: pd.Series, targets: pd.Series, confidence: pd.Series) -> Any:
    correct = np.asarray(predictions) == np.asarray(targets)
    return _metric_value(expected_calibration_error(np.asarray(confidence), correct))


def golden_frame(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    return pixel_frame(images).assign(label=np.asarray(labels, dtype=np.int64))


CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"


def check_defined_in_code(uri: str) -> None:
    """Refuse to load a model that is not a pyfunc defined in code, as :func:`log_and_register` logs
    it: any other MLflow model (a pickled ``python_model``, a sklearn flavour, ...) is unpickled when
    loaded, and a registry entry is not trusted that far. Reads only the ``MLmodel`` file."""
    import mlflow

    flavors = mlflow.models.get_model_info(uri).flavors
    loader = flavors.get("python_function", {}).get("loader_module")
    if loader != CODE_MODEL_LOADER or set(flavors) != {"python_function"}:
        raise RegistryError(
            f"{uri}: refusing to load it: its flavours {sorted(flavors)} (pyfunc loader {loader!r}) would "
            f"unpickle data; sslvision only loads models logged from code ({CODE_MODEL_LOADER})")


def evaluate_version(name: str, version: str, golden: pd.DataFrame) -> Any:
    """``mlflow.models.evaluate`` of one registered version (loaded by :func:`load_version`: its files
    checked first) on the golden frame (in a nested run)."""
    import mlflow
    from mlflow.models import make_metric

    model = load_version(name, version)

    metrics = [
        make_metric(eval_fn=_balanced_accuracy, greater_is_better=True, name="balanced_accuracy"),
        make_metric(eval_fn=_worst_class_recall, greater_is_better=True, name="worst_class_recall"),
        make_metric(eval_fn=_ece, greater_is_better=False, name="ece"),
        make_metric(eval_fn=_accuracy, greater_is_better=True, name="accuracy"),
        make_metric(eval_fn=_macro_f1, greater_is_better=True, name="macro_f1"),
    ]
    with mlflow.start_run(run_name=f"evaluate {name} v{version}", nested=True):
        mlflow.set_tag("sslvision.model_version", version)
        return mlflow.models.evaluate(model=model, data=golden, targets="label",
                                      predictions="prediction", model_type=None, evaluators=["default"],
                                      extra_metrics=metrics)


def thresholds(promotion: Any, champion_metrics: dict[str, float] | None,
               pixel_baseline: float | None = None) -> dict[str, Any]:
    """The ``MetricThreshold`` of every check (``promotion``: the ``finetune.promotion`` params), by gate
    name: a metric's name, or a key of :data:`GATE_METRICS`. ``pixel_baseline``: the pixel baseline's
    balanced accuracy on the same golden set (None: that gate is not applied)."""
    from mlflow.models import MetricThreshold

    out = {
        BALANCED_ACCURACY: MetricThreshold(
            threshold=promotion.min_balanced_accuracy, greater_is_better=True,
            min_absolute_change=promotion.min_improvement if champion_metrics is not None else None),
        ECE: MetricThreshold(threshold=promotion.max_ece, greater_is_better=False),
        "worst_class_floor": MetricThreshold(threshold=promotion.min_worst_class_recall, greater_is_better=True),
    }
    if champion_metrics is not None:
        out[WORST_CLASS_RECALL] = MetricThreshold(
            threshold=champion_metrics[WORST_CLASS_RECALL] - promotion.worst_class_tolerance, greater_is_better=True)
    if pixel_baseline is not None:
        out["pixel_baseline"] = MetricThreshold(threshold=min(1.0, pixel_baseline + promotion.baseline_margin),
                                                greater_is_better=True)
    return out


def check(limits: dict[str, Any], candidate: Any, baseline: Any | None) -> dict[str, str]:
    """Every failed threshold with MLflow's explanation ({} when all pass), by gate name."""
    import mlflow
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    failed = {}
    for gate, limit in limits.items():
        try:
            mlflow.validate_evaluation_results({GATE_METRICS.get(gate, gate): limit}, candidate, baseline)
        except ModelValidationFailedException as err:
            failed[gate.split("/")[0]] = err.message
    return failed


def golden_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a golden set (shape, pixels, labels): whether two numbers were measured on the same images."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(repr(images.shape).encode())
    h.update(images.tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def record_pixel_baseline(name: str, version: str, baseline: dict[str, Any]) -> None:
    """Tag ``name`` ``version`` with the pixel baseline its finetune run fitted (``metrics.json``'s
    ``baselines.pixel_logreg``): its balanced accuracy on the golden set and that set's digest, which
    :func:`promote` compares with the golden set it evaluates on."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, BASELINE_TAG, repr(float(baseline["golden_balanced_accuracy"])))
    client.set_model_version_tag(name, version, BASELINE_GOLDEN_TAG, baseline["golden_sha256"])


def recorded_pixel_baseline(client: Any, name: str, versions: list[str | None],
                            digest: str) -> tuple[float | None, str]:
    """(balanced accuracy, where it came from) of the pixel baseline recorded with the first of ``versions``
    that has one: the challenger's own, else the champion's (a challenger registered outside the finetune
    stage was trained on data no newer than the champion's). The value is None when none was recorded,
    or when it was measured on another golden set than ``digest``."""
    for version in versions:
        if version is None:
            continue
        tags = client.get_model_version(name, version).tags
        if BASELINE_TAG in tags:
            if tags.get(BASELINE_GOLDEN_TAG) != digest:
                return None, (f"recorded with version {version} on another golden set (finetune.promotion."
                              "golden_per_class or the test split changed since): re-run the finetune stage")
            return float(tags[BASELINE_TAG]), f"recorded with version {version}"
    return None, "not recorded (no version was registered by the finetune stage)"


# --- alias moves ---------------------------------------------------------------------------------

def alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        # Only "no such alias/model" means absent: any other error (store unreachable...) must not
        # look like "no champion", which would promote on the absolute thresholds alone.
        if err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def promote(name: str, golden_images: np.ndarray, golden_labels: np.ndarray, promotion: Any,
            limits_for: Any = None) -> dict[str, Any]:
    """Evaluate ``challenger`` (and ``champion``), validate, and move the aliases only if every check passes.
    ``limits_for(promotion, champion_metrics)``: the checks, :func:`thresholds` unless given (a prior
    correction is judged at its class mix: ``sslvision.actions.prior_correction_thresholds``).

    Must run inside an MLflow run (the evaluations are nested under it). Returns the decision:
    ``decision`` (``promoted`` | ``refused`` | ``unchanged``), the versions, the metrics of both, and
    ``failed`` (threshold name -> reason) on a refusal. Raises :class:`RegistryError` when a version's
    files fail their check (:func:`verified_copy`), or when the challenger or the champion moved while it
    evaluated (nothing moves then; the newer challenger stays, for the next promotion).
    """
    import mlflow

    client = mlflow.MlflowClient()
    challenger = alias_version(client, name, CHALLENGER)
    champion = alias_version(client, name, CHAMPION)
    decision: dict[str, Any] = {"model": name, "challenger": challenger, "champion_before": champion}
    if challenger is None:  # nothing new since the last decision (e.g. the stage promoted it already)
        return {**decision, "decision": "unchanged", "champion": champion,
                "reason": f"model {name!r} has no {CHALLENGER!r} version (run the finetune stage)"}
    if challenger == champion:  # promoted already (or an interrupted promotion: finish it)
        client.delete_registered_model_alias(name, CHALLENGER)
        return {**decision, "decision": "unchanged", "champion": champion,
                "reason": f"version {challenger} is already the champion"}
    golden = golden_frame(golden_images, golden_labels)
    pixel, source = None, "not checked (finetune.promotion.beat_pixel_baseline is false)"
    if limits_for is not None:
        source = "not checked (a gate of its own: limits_for)"
    elif promotion.beat_pixel_baseline:
        pixel, source = recorded_pixel_baseline(client, name, [challenger, champion],
                                                golden_digest(golden_images, golden_labels))
    candidate = evaluate_version(name, challenger, golden)
    baseline = evaluate_version(name, champion, golden) if champion is not None else None
    limits = (limits_for(promotion, baseline.metrics if baseline is not None else None) if limits_for is not None
              else thresholds(promotion, baseline.metrics if baseline is not None else None, pixel))
    failed = check(limits, candidate, baseline)
    if "pixel_baseline" in failed:
        failed["pixel_baseline"] = (
            f"balanced accuracy {candidate.metrics[BALANCED_ACCURACY]:.4f} does not beat the pixel baseline's "
            f"{pixel:.4f} + margin {promotion.baseline_margin} (logistic regression on 64 PCA components of the "
            f"pixels, same training labels, same golden set): {failed['pixel_baseline']}")
    elif source.startswith("recorded") and pixel is None:
        failed["pixel_baseline"] = source  # a number measured on other images says nothing: refuse
    elif source.startswith("not recorded"):
        log.warning("promotion of %s v%s: the pixel baseline is %s; that gate is skipped", name, challenger, source)
    decision.update(
        challenger_metrics=_short(candidate.metrics),
        champion_metrics=_short(baseline.metrics) if baseline is not None else None,
        thresholds={k.split("/")[0]: str(v) for k, v in limits.items()},
        pixel_baseline={"balanced_accuracy": pixel, "source": source},
        golden_size=len(golden),
    )
    if failed:
        log.warning("promotion of %s v%s refused: %s", name, challenger, "; ".join(failed))
        client.set_model_version_tag(name, challenger, PROMOTION_TAG, "refused: " + ", ".join(failed))
        return {**decision, "decision": "refused", "champion": champion, "failed": failed}
    # The evaluation took a while: a version registered (or a champion moved) meanwhile must not be
    # dropped, or replaced, by a decision about other versions. The registry has no compare-and-set;
    # what is left is the instant between this read and the moves.
    now = alias_version(client, name, CHALLENGER), alias_version(client, name, CHAMPION)
    if now != (challenger, champion):
        raise RegistryError(
            f"model {name!r} changed during the evaluation of version {challenger} (challenger: {challenger} -> "
            f"{now[0]}, champion: {champion} -> {now[1]}); no alias moved: run the promotion again to evaluate "
            "the current challenger")
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, challenger)
    client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, challenger, PROMOTION_TAG,
                                 f"promoted {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    log.info("promoted %s v%s to %s (previous: %s)", name, challenger, CHAMPION, champion)
    return {**decision, "decision": "promoted", "champion": challenger, "previous": champion}


def rollback(name: str) -> dict[str, Any]:
    """Move ``champion`` back to ``previous`` (then drop ``previous``; the demoted version is tagged)."""
    import mlflow

    client = mlflow.MlflowClient()
    champion = alias_version(client, name, CHAMPION)
    previous = alias_version(client, name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"model {name!r} has no {PREVIOUS!r} version to roll back to")
    if previous == champion:  # an interrupted rollback (or promotion): only the stale alias is left
        client.delete_registered_model_alias(name, PREVIOUS)
        return {"model": name, "decision": "unchanged", "champion": champion,
                "reason": f"version {champion} is already the champion"}
    client.set_registered_model_alias(name, CHAMPION, previous)
    if champion is not None:
        client.set_model_version_tag(name, champion, PROMOTION_TAG, "rolled back")
    client.delete_registered_model_alias(name, PREVIOUS)
    log.info("rolled %s back from v%s to v%s", name, champion, previous)
    return {"model": name, "decision": "rolled_back", "champion": previous, "demoted": champion}


def _short(metrics: dict[str, float]) -> dict[str, float]:
    return {k.split("/")[0]: float(v) for k, v in metrics.items() if k.endswith("/score")}


# --- entry points (CLI, stage) -------------------------------------------------------------------

def finetune_params(params: FinetuneParams | str | Path | None = None) -> FinetuneParams:
    """The ``finetune`` section (its ``registry`` and ``promotion`` say what this module does): ``params``
    itself when parsed already, else read from that params file (default: ``params.yaml`` or
    ``$SSLVISION_PARAMS``). Raises :class:`~sslvision.params.ParamsError` when it is invalid."""
    return params if isinstance(params, FinetuneParams) else load_section("finetune", FinetuneParams, params)


def golden_set(p: FinetuneParams) -> tuple[np.ndarray, np.ndarray]:
    """The promotion set, read from ``p.ingested``: the clean, balanced test split (``golden_per_class`` > 0
    keeps that many images per class, the first ones in manifest order, so every run compares on the same
    images). Returns uint8 ``(N, H, W, C)`` images and their labels; raises ``ValueError`` when the test
    split has no labelled rows."""
    ing = Ingested.load(p.ingested)
    df = ing.split("test")
    df = df[df["label"] >= 0]
    if p.promotion.golden_per_class:
        df = df.groupby("label", sort=False).head(p.promotion.golden_per_class)
    if len(df) == 0:
        raise ValueError(f"{p.ingested}/manifest.parquet: no labelled test rows for the golden set")
    return np.ascontiguousarray(ing.images[df["index"].to_numpy()]), df["label"].to_numpy(np.int64)


def promote_cli(params: Any = None, golden: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Gated promotion in its own MLflow run. ``params``: the params file (or its parsed ``finetune``
    section); the golden set is the test split (``finetune.promotion.golden_per_class``) unless given."""
    import mlflow

    p = finetune_params(params)
    images, labels = golden if golden is not None else golden_set(p)
    with tracking.stage_run("promote", {"model_name": p.registry.model_name, **p.promotion.model_dump()}):
        decision = promote(p.registry.model_name, images, labels, p.promotion)
        mlflow.set_tag("sslvision.decision", decision["decision"])
        mlflow.log_dict(json.loads(json.dumps(decision, default=str)), "promotion.json")
    return decision


def recover(params: Any = None) -> dict[str, Any]:
    """Finish what an interrupted run left; called at the start of every pipeline run, under the project lock.

    Closes as ``FAILED`` the MLflow runs whose process is gone (:func:`sslvision.tracking.close_orphaned_runs`)
    and, with ``finetune.registry.auto_promote``, gates a ``challenger`` that no gate has decided on (no
    ``sslvision.promotion`` tag: its finetune stage was killed between registration and promotion, and
    a stage restored from DVC's run cache would never gate it). Without ``auto_promote`` a waiting
    challenger is the normal state (``sslvision promote`` decides). Returns ``orphaned_runs`` (the ids
    closed) and ``promotion`` (the decision, or None when nothing was pending)."""
    import mlflow

    closed = tracking.close_orphaned_runs()
    decision = None
    if not hasattr(params, "registry") and "finetune" not in (
            read_params(params) if params_path(params).exists() else {}):
        return {"orphaned_runs": closed, "promotion": decision}  # a project without a finetune stage
    p = finetune_params(params)
    if p.registry.enabled and p.registry.auto_promote:
        name, client = p.registry.model_name, mlflow.MlflowClient()
        challenger = alias_version(client, name, CHALLENGER)
        if challenger is not None and PROMOTION_TAG not in client.get_model_version(name, challenger).tags:
            log.warning("%s version %s was registered by an interrupted run and never gated: gating it now",
                        name, challenger)
            decision = promote_cli(p)
    return {"orphaned_runs": closed, "promotion": decision}


def rollback_cli(params: Any = None) -> dict[str, Any]:
    import mlflow

    p = finetune_params(params)
    with tracking.stage_run("rollback", {"model_name": p.registry.model_name}):
        decision = rollback(p.registry.model_name)
        mlflow.log_dict(decision, "rollback.json")
    return decision
