"""The synthesize stage on tiny data: 8x8 images of four patterned classes and a tiny random encoder."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sslvision import synthesize as syn
from sslvision.models import DecoderConfig, Encoder, EncoderConfig, MAEDecoder, embed, save_encoder
from sslvision.params import ParamsError, validate_section
from sslvision.stages import synthesize as stage

torch.set_num_threads(1)

SIZE = 8
COUNTS = (40, 12, 6, 4)  # median 9: classes 2 and 3 are below it
CLASSES = ["hstripes", "vstripes", "square", "ring"]


def _image(label: int, rng: np.random.Generator) -> np.ndarray:
    """Horizontal stripes, vertical stripes, a small square, a ring: textures a random CNN tells apart."""
    img = np.zeros((SIZE, SIZE), dtype=np.float64)
    k = int(rng.integers(0, 2))
    if label == 0:
        img[k::2, :] = 1
    elif label == 1:
        img[:, k::2] = 1
    elif label == 2:
        y, x = rng.integers(0, SIZE - 3, size=2)
        img[y:y + 3, x:x + 3] = 1
    else:
        img[1:7, 1:7] = 1
        img[2:6, 2:6] = 0
    img = np.clip(img * rng.uniform(0.7, 1.0) + rng.normal(0, 0.05, img.shape), 0, 1)
    return (img * 255).astype(np.uint8)[..., None]


def _resnet() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(backbone="resnet18", img_size=SIZE, in_chans=1,
                                 backbone_args={"channels": (8, 8, 16, 16)})).eval()


def _vit() -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(backbone="vit_tiny_patch16_224", img_size=SIZE, in_chans=1, patch_size=2,
                                 backbone_args={"embed_dim": 16, "depth": 1, "num_heads": 2})).eval()


def _real(encoder: Encoder) -> syn.RealSet:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    images = np.stack([_image(int(y), rng) for y in labels])
    return syn.RealSet(images=images, labels=labels, ids=np.array([f"train/{i}" for i in range(len(labels))]),
                       embeddings=embed(encoder, images), classes=CLASSES)


@pytest.fixture(scope="module")
def resnet():
    return _resnet()


@pytest.fixture(scope="module")
def real(resnet):
    return _real(resnet)


def _params(**over) -> syn.SynthesizeParams:
    base = {"oversample": 2.0, "batch_size": 64, "grid_columns": 4, "cache_dir": "",
            "mae_inpaint": {"steps": 3, "batch_size": 8, "width": 8, "patch_size": 2},
            "feature_interp": {"steps": 3, "batch_size": 8, "width": 8},
            "filter": {"min_confidence": 0.0, "max_source_similarity": 2.0}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return validate_section("synthesize", syn.SynthesizeParams, base)


def test_plan_counts_follow_params():
    labels = np.repeat(np.arange(4), COUNTS)
    plans = syn.plan_classes(labels, CLASSES, _params())
    assert [(p.name, p.target, p.need, p.make) for p in plans] == [("square", 9, 3, 6), ("ring", 9, 5, 10)]
    plans = syn.plan_classes(labels, CLASSES, _params(target=30, max_per_class=20, oversample=1.5))
    assert [(p.name, p.need, p.make) for p in plans] == [("vstripes", 18, 27), ("square", 20, 30), ("ring", 20, 30)]
    plans = syn.plan_classes(labels, CLASSES, _params(target="max", classes=["ring"]))
    assert [(p.name, p.need) for p in plans] == [("ring", 36)]
    with pytest.raises(ValueError, match="unknown class names"):
        syn.plan_classes(labels, CLASSES, _params(classes=["nope"]))


def test_params_are_validated():
    with pytest.raises(ParamsError, match="synthesize.generator"):
        _params(generator="gan")
    with pytest.raises(ParamsError, match="synthesize.target"):
        _params(target=0)
    with pytest.raises(ParamsError, match="synthesize.filter.min_conf"):
        _params(filter={"min_conf": 0.3})


@pytest.mark.parametrize("generator", ["augment", "feature_interp", "mae_inpaint"])
def test_counts_match_params_and_contract(real, resnet, generator):
    result = syn.synthesize(real, resnet, _params(generator=generator))
    per = result.metrics["classes"]
    assert {k: (v["made"], v["kept"]) for k, v in per.items()} == {"square": (6, 3), "ring": (10, 5)}
    m = result.manifest
    assert list(m.columns) == ["index", "id", "label", "label_name", "split", "generator", "source_ids",
                               "target_prob", "source_similarity"]
    assert result.images.shape == (8, SIZE, SIZE, 1) and result.images.dtype == np.uint8
    assert m["index"].tolist() == list(range(8))
    assert m["id"].iloc[0] == f"syn/{generator}/0"
    assert m["label"].tolist() == [2] * 3 + [3] * 5
    assert set(m["split"]) == {"synthetic"} and set(m["generator"]) == {generator}
    src_labels = {real.labels[list(real.ids).index(s)] for ids in m["source_ids"] for s in ids}
    assert src_labels <= {2, 3} and all(len(ids) >= 1 for ids in m["source_ids"])
    assert len(result.candidates) == 16 and result.candidates["kept"].sum() == 8


def test_deterministic_for_a_seed(real, resnet):
    for generator in ("feature_interp", "mae_inpaint", "augment"):
        a = syn.synthesize(real, resnet, _params(generator=generator, seed=3))
        b = syn.synthesize(real, resnet, _params(generator=generator, seed=3))
        c = syn.synthesize(real, resnet, _params(generator=generator, seed=4))
        assert np.array_equal(a.images, b.images), generator
        pd.testing.assert_frame_equal(a.manifest, b.manifest)
        assert not np.array_equal(a.images, c.images), generator


@pytest.mark.parametrize("when", ["pre_augment", "post_augment"])
def test_mae_inpaint_augment_makes_new_views_deterministically(real, resnet, when):
    plain = syn.synthesize(real, resnet, _params(generator="mae_inpaint", seed=3))
    a = syn.synthesize(real, resnet, _params(generator="mae_inpaint", seed=3, mae_inpaint={when: True}))
    b = syn.synthesize(real, resnet, _params(generator="mae_inpaint", seed=3, mae_inpaint={when: True}))
    assert np.array_equal(a.images, b.images)
    assert a.images.shape == plain.images.shape and not np.array_equal(a.images, plain.images)


def test_decoder_cache_gives_the_same_images_and_survives_a_label_change(real, resnet, tmp_path):
    import dataclasses

    for generator in ("mae_inpaint", "feature_interp"):
        cache = tmp_path / generator
        p = _params(generator=generator, seed=5, cache_dir=str(cache))
        trained = syn.synthesize(real, resnet, p)
        assert trained.metrics["fit_decoder_cached"] == 0 and len(list(cache.glob("*.safetensors"))) == 1
        cached = syn.synthesize(real, resnet, p)
        assert cached.metrics["fit_decoder_cached"] == 1 and cached.metrics["fit_decoder_steps"] == 0
        assert np.array_equal(trained.images, cached.images), generator
        uncached = syn.synthesize(real, resnet, _params(generator=generator, seed=5))  # no cache at all
        assert np.array_equal(trained.images, uncached.images), generator
        labels = real.labels.copy()
        labels[:3] = 1  # the audit relabels three images: the decoder is still valid
        relabeled = syn.synthesize(dataclasses.replace(real, labels=labels), resnet, p)
        assert relabeled.metrics["fit_decoder_cached"] == 1
        other_seed = syn.synthesize(real, resnet, _params(generator=generator, seed=6, cache_dir=str(cache)))
        assert other_seed.metrics["fit_decoder_cached"] == 0 and len(list(cache.glob("*.safetensors"))) == 2
        # params that only shape generation reuse the decoder; a training param does not
        gen_only = {"mae_inpaint": {"mix_share": 0.5, "pre_augment": True}, "feature_interp": {"noise": 0.3}}
        assert syn.synthesize(real, resnet, _params(generator=generator, seed=5, cache_dir=str(cache),
                                                    **{generator: gen_only[generator]})
                              ).metrics["fit_decoder_cached"] == 1
        assert syn.synthesize(real, resnet, _params(generator=generator, seed=5, cache_dir=str(cache),
                                                    **{generator: {"lr": 1e-3}})).metrics["fit_decoder_cached"] == 0
    p = _params(generator="feature_interp", seed=5, cache_dir=str(cache))
    syn.DecoderCache(p, real, resnet, torch.device("cpu")).path.write_bytes(b"damaged")
    again = syn.synthesize(real, resnet, p)  # a damaged entry is trained again, never an error
    assert again.metrics["fit_decoder_cached"] == 0 and np.array_equal(again.images, trained.images)


def test_filter_rejects_wrong_class_and_copies(real):
    filt = syn.EmbeddingFilter(syn.FilterParams(min_confidence=0.5, max_source_similarity=0.95), 4).fit(
        real.embeddings, real.labels)
    square, ring = real.of_class(2), real.of_class(3)
    wrong = np.concatenate([real.of_class(0)[:5], real.of_class(1)[:5]])  # stripes presented as "square"
    emb = np.concatenate([real.embeddings[wrong], real.embeddings[square], real.embeddings[square]])
    # sources: unrelated rings for the wrong-class rows, themselves for the copies, rings for the last rows
    first = np.concatenate([ring[np.arange(10) % 4], square, ring[np.arange(6) % 4]])
    sources = np.stack([first, np.full(22, -1)], axis=1)
    scores = filt.score(emb, np.full(22, 2), sources, real.embeddings)
    assert not scores["passed"][:10].any()  # wrong class
    assert (scores["source_similarity"][10:16] > 0.999).all() and not scores["passed"][10:16].any()  # copies
    assert scores["passed"][16:].sum() >= 4  # real squares, scored against (ring) sources, mostly pass


def test_filter_thresholds_reject_in_synthesis(real, resnet, tmp_path):
    params = _params(generator="augment", filter={"max_source_similarity": -1.0})
    strict = syn.synthesize(real, resnet, params)
    assert strict.metrics["kept"] == 0 and len(strict.images) == 0
    assert {v["made"] for v in strict.metrics["classes"].values()} == {6, 10}
    stage.write_outputs(strict, real, params, tmp_path / "synthetic", tmp_path / "reports")  # an empty set is valid
    assert np.load(tmp_path / "synthetic/images.npy").shape == (0, SIZE, SIZE, 1)
    assert len(pd.read_parquet(tmp_path / "synthetic/manifest.parquet")) == 0
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["classes"]["ring"]["frechet"] is None


def test_mae_inpaint_keeps_visible_pixels(real):
    """Without mixing, every output pixel outside the hidden patches is the source's pixel (both backbones,
    both ResNet inpainters)."""
    for encoder, arch, mode in ((_resnet(), "unet", "trained_unet_inpainter"),
                                (_resnet(), "conv", "trained_conv_inpainter"),
                                (_vit(), "unet", "trained_mae_decoder")):
        torch.manual_seed(0)
        r = _real(encoder)
        gen = syn.MAEInpaintGenerator(syn.MAEInpaintParams(mix_share=0.0, steps=2, batch_size=4, width=32,
                                                           patch_size=2, arch=arch), torch.device("cpu"))
        gen.fit(r, encoder)
        assert gen.mode == mode
        imgs, sources = gen.generate(r, 3, 6, np.random.default_rng(0))
        src = r.images[sources[:, 0]]
        same = (imgs == src).reshape(6, -1).mean(1)
        assert (sources[:, 1] == -1).all()
        assert ((same >= 0.5) & (same < 1.0)).all(), same  # half the patches hidden and redrawn


def test_mae_inpaint_uses_the_pretrain_decoder(tmp_path):
    vit = _vit()
    decoder = MAEDecoder(vit.dim, vit.num_patches, 2, 1, DecoderConfig(embed_dim=16, depth=1, num_heads=2))
    save_encoder(tmp_path / "enc", vit, decoder, extra={"params": {"norm_pix_loss": True}})
    loaded, norm_pix = syn.load_pretrain_decoder(tmp_path / "enc")
    assert loaded is not None and norm_pix
    r = _real(vit)
    result = syn.synthesize(r, vit, _params(generator="mae_inpaint"), loaded, norm_pix)
    assert result.metrics["mode"] == "pretrain_mae_decoder" and "fit_decoder_final_loss" not in result.metrics
    assert len(result.images) == 8
    with pytest.raises(ValueError, match="no MAE decoder"):
        syn.synthesize(_real(_resnet()), _resnet(), _params(generator="mae_inpaint",
                                                            mae_inpaint={"decoder": "pretrain"}))


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert syn.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert syn.frechet_distance(a, a + 3) == pytest.approx(36.0, rel=1e-6)
    assert syn.manifold_precision_recall(a, a, k=3) == (1.0, 1.0)
    assert syn.manifold_precision_recall(a, a + 100, k=3) == (0.0, 0.0)
    # a synthetic set collapsed onto one real point: precise, but covers almost none of the real set
    p, r = syn.manifold_precision_recall(a, np.repeat(a[:1], 10, axis=0) + 1e-9 * rng.normal(size=(10, 4)), k=3)
    assert p == 1.0 and r < 0.1
    assert math.isnan(syn.frechet_distance(a[:1], a))


def test_stage_writes_the_contract(workdir, resnet, real):
    """The CLI entry point end to end: files in, data/synthetic + reports out, per the data contract."""
    ing = workdir / "data/ingested"
    ing.mkdir(parents=True)
    np.save(ing / "images.npy", real.images)
    (ing / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    manifest = pd.DataFrame({"index": np.arange(len(real.labels)), "id": real.ids, "split": "train",
                             "label": real.labels, "label_name": [CLASSES[y] for y in real.labels]})
    manifest.to_parquet(ing / "manifest.parquet")
    (workdir / "data/audit").mkdir(parents=True)
    manifest.iloc[1:].to_parquet(workdir / "data/audit/manifest_clean.parquet")  # audit dropped row 0
    (workdir / "data/embeddings").mkdir(parents=True)
    np.save(workdir / "data/embeddings/embeddings.npy", real.embeddings)
    save_encoder(workdir / "models/encoder", resnet)
    (workdir / "params.yaml").write_text(
        "synthesize:\n  generator: feature_interp\n  grid_columns: 3\n"
        "  feature_interp: {steps: 2, batch_size: 8, width: 8}\n"
        "  filter: {min_confidence: 0.0, max_source_similarity: 2.0}\n")
    metrics = stage.synthesize_cli(params=workdir / "params.yaml")
    images = np.load(workdir / "data/synthetic/images.npy")
    m = pd.read_parquet(workdir / "data/synthetic/manifest.parquet")
    assert images.shape == (len(m), SIZE, SIZE, 1) and len(m) == metrics["kept"] == 8
    assert m["source_ids"].map(len).min() >= 1 and "train/0" not in set(m["source_ids"].explode())
    on_disk = json.loads((workdir / "reports/synthesize/metrics.json").read_text())
    assert set(on_disk["classes"]) == {"square", "ring"}
    assert {"made", "kept", "frechet", "precision", "recall"} <= set(on_disk["classes"]["ring"])
    assert pd.read_csv(workdir / "reports/synthesize/per_class.csv")["kept"].tolist() == [3, 5]
    assert (workdir / "reports/synthesize/grid.png").stat().st_size > 1000
    # oversample 6 (the default) x need
    assert len(pd.read_csv(workdir / "reports/synthesize/filter_scores.csv")) == 6 * 3 + 6 * 5


# --- the array API and the generator registry ------------------------------------------------------


def test_synthesize_images_on_arrays(real, resnet):
    """Arrays in, arrays out: the stage's plan and filter, labels as given, grey images without a channel."""
    filt = {"min_confidence": 0.0, "max_source_similarity": 2.0}
    labels = real.labels * 10 + 3  # any non-negative ints
    x, y = syn.synthesize_images(real.images[..., 0], labels, resnet, seed=1, oversample=2.0, filter=filt)
    assert x.shape == (8, SIZE, SIZE) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == [23] * 3 + [33] * 5  # up to the median count (9), as the stage plans
    # the same images as the stage's synthesize() on the same data and params
    ref = syn.synthesize(real, resnet, _params(generator="augment", seed=1))
    assert np.array_equal(x, ref.images[..., 0])
    x2, y2 = syn.synthesize_images(real.images, real.labels, resnet, seed=1, oversample=2.0, filter=filt)
    assert np.array_equal(x2[..., 0], x) and y2.tolist() == [2] * 3 + [3] * 5
    # per_class: every class below it is brought up to it; max_per_class caps it only when given
    x3, y3 = syn.synthesize_images(real.images, real.labels, resnet, per_class=14, oversample=1.0, filter=filt)
    assert np.bincount(y3, minlength=4).tolist() == [0, 2, 8, 10] and x3.shape == (20, SIZE, SIZE, 1)
    _, y4 = syn.synthesize_images(real.images, real.labels, resnet, per_class=14, max_per_class=5,
                                  oversample=1.0, filter=filt)
    assert np.bincount(y4, minlength=4).tolist() == [0, 2, 5, 5]
    with pytest.raises(ValueError, match="per_class or target"):
        syn.synthesize_images(real.images, real.labels, resnet, per_class=14, target="max")
    strict = syn.synthesize_images(real.images, real.labels, resnet, filter={"max_source_similarity": -1.0})
    assert strict[0].shape == (0, SIZE, SIZE, 1) and strict[1].shape == (0,)


def test_synthesize_images_rejects_bad_input(real, resnet):
    with pytest.raises(ValueError, match="uint8"):
        syn.synthesize_images(real.images.astype(np.float32), real.labels, resnet)
    with pytest.raises(ValueError, match="labels must be ints"):
        syn.synthesize_images(real.images, real.labels[:-1], resnet)
    with pytest.raises(ValueError, match=">= 0"):
        syn.synthesize_images(real.images, real.labels - 1, resnet)
    with pytest.raises(ParamsError, match="synthesize.oversample"):
        syn.synthesize_images(real.images, real.labels, resnet, oversample=0.5)
    with pytest.raises(ValueError, match="unknown generator 'gan'; registered: .*augment"):
        syn.synthesize_images(real.images, real.labels, resnet, generator="gan")


def test_generator_registry(real, resnet, monkeypatch):
    assert set(syn.GENERATORS) == {"augment", "mae_inpaint", "feature_interp"}
    assert syn.GENERATORS["mae_inpaint"] is syn.MAEInpaintGenerator
    with pytest.raises(ValueError, match="unknown generator 'nope'; registered: augment, mae_inpaint"):
        syn.make_generator(_params().model_copy(update={"generator": "nope"}), torch.device("cpu"))
    monkeypatch.setattr(syn, "GENERATORS", dict(syn.GENERATORS))  # registrations below end with the test

    @syn.register_generator("copy_flip")
    class FlipGenerator:
        """Mirrored real images: no params section, built as cls(params, device)."""

        def __init__(self, params, device):
            self.seed = params.seed

        def fit(self, real, encoder):
            return {}

        def generate(self, real, label, count, rng):
            src = rng.choice(real.of_class(label), size=count)
            return real.images[src][:, :, ::-1].copy(), np.stack([src, np.full(count, -1)], axis=1)

    assert FlipGenerator.name == "copy_flip" and syn.GENERATORS["copy_flip"] is FlipGenerator
    assert isinstance(syn.make_generator(_params().model_copy(update={"generator": "copy_flip"}),
                                         torch.device("cpu")), FlipGenerator)
    x, y = syn.synthesize_images(real.images, real.labels, resnet, generator="copy_flip",
                                 filter={"min_confidence": 0.0, "max_source_similarity": 2.0})
    assert x.shape == (8, SIZE, SIZE, 1) and y.tolist() == [2] * 3 + [3] * 5
    flipped = {real.images[i][:, ::-1].tobytes() for i in np.flatnonzero(real.labels >= 2)}
    assert all(img.tobytes() in flipped for img in x)
    # a built-in name registered again replaces the built-in
    syn.register_generator("augment")(FlipGenerator)
    assert isinstance(syn.make_generator(_params(generator="augment"), torch.device("cpu")), FlipGenerator)
