"""The array API (``pretrain`` / ``embed`` on in-memory images) and the SSL method registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslvision import objectives
from sslvision.models import Encoder
from sslvision.pretrain import PretrainParams, embed, pretrain_encoder, train
from sslvision.ssl import SSL_METHODS, SSLMethod, build_method, register_method
from tests.test_pretrain import FAST, TINY_RESNET

TINY = {**TINY_RESNET, **FAST, "epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0}


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 16, 16), dtype=np.uint8)


@pytest.fixture
def registry():
    """SSL_METHODS as it was before the test, whatever the test registers."""
    before = dict(SSL_METHODS)
    yield SSL_METHODS
    SSL_METHODS.clear()
    SSL_METHODS.update(before)


def test_pretrain_and_embed_an_in_memory_array(images, workdir):
    torch.set_num_threads(1)
    encoder = pretrain_encoder(images, seed=0, **TINY)
    assert isinstance(encoder, Encoder) and not encoder.training
    assert (encoder.config.img_size, encoder.config.in_chans) == (16, 1)
    features = embed(encoder, images)
    assert features.shape == (64, encoder.dim) and features.dtype == np.float32 and np.isfinite(features).all()
    np.testing.assert_allclose(embed(encoder, images[..., None], batch_size=7), features, rtol=1e-5, atol=1e-6)
    assert not encoder.training  # embed leaves the mode as it was
    assert list(workdir.iterdir()) == []  # no checkpoints, no files: checkpoint_dir was not given


def test_the_array_path_trains_the_weights_the_file_path_does(images, workdir):
    """pretrain_encoder(array) is train() on every row, as the stage runs it from an .npy file."""
    torch.set_num_threads(1)
    from_array = pretrain_encoder(images, seed=3, **TINY)
    np.save(workdir / "images.npy", images[..., None])
    p = PretrainParams(**TINY, seed=3, device="cpu", checkpoint_dir=str(workdir / "ck"))
    from_file = train(p, workdir / "images.npy", np.arange(len(images)), progress=False).encoder
    for (name, a), b in zip(from_array.state_dict().items(), from_file.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pretrain_checkpoints_only_into_a_given_checkpoint_dir(images, workdir):
    torch.set_num_threads(1)
    pretrain_encoder(images, **{**TINY, "checkpoint_dir": str(workdir / "ck")})
    assert (workdir / "ck" / "last.pt").exists()


def test_bad_arguments_are_value_errors_naming_what_is_wrong(images):
    with pytest.raises(ValueError, match="epochz"):
        pretrain_encoder(images, epochz=1)
    with pytest.raises(ValueError, match="method"):
        pretrain_encoder(images, method="byol")
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_encoder(images, batch_size=1)
    with pytest.raises(ValueError, match=r"uint8 array \(N, H, W\) or \(N, H, W, C\), got float32"):
        pretrain_encoder(images.astype(np.float32), **TINY)
    with pytest.raises(ValueError, match="larger than the 64 training images"):
        pretrain_encoder(images, **{**TINY, "batch_size": 128})
    encoder = Encoder(PretrainParams(**TINY).encoder_config(16, 1))
    with pytest.raises(ValueError, match="3 channels, the encoder takes 1"):
        embed(encoder, np.zeros((2, 16, 16, 3), np.uint8))


def test_the_registry_holds_the_five_methods():
    assert set(SSL_METHODS) == {"simclr", "vicreg", "dino", "mae", "cl_mim"}
    assert all(issubclass(cls, SSLMethod) for cls in SSL_METHODS.values())


def test_an_unknown_method_names_the_registered_ones():
    p = PretrainParams(**TINY).model_copy(update={"method": "byol"})  # past PretrainParams' own check
    with pytest.raises(ValueError, match="'byol' is not a registered SSL method; registered: cl_mim, dino, mae, "
                                         "simclr, vicreg"):
        build_method(p, Encoder(p.encoder_config(16, 1)), 1, 1)


def test_a_registered_method_is_built_and_trained(registry, images):
    torch.set_num_threads(1)

    @register_method("toy")
    class Toy(SSLMethod):
        def __init__(self, encoder, p):
            super().__init__(encoder)
            self.head = torch.nn.Linear(encoder.dim, 8)

        def forward(self, views, step):
            return objectives.nt_xent(self.head(self.encoder(views[0])), self.head(self.encoder(views[1])), 0.5)

    assert registry["toy"] is Toy
    p = PretrainParams(**TINY).model_copy(update={"method": "toy"})
    assert isinstance(build_method(p, Encoder(p.encoder_config(16, 1)), 1, 1), Toy)
    result = train(p, images[..., None], np.arange(len(images)), progress=False, checkpoints=False)
    assert np.isfinite(result.history[-1]["loss"])
    with pytest.raises(ValueError, match="already registered"):
        register_method("simclr")(Toy)
    with pytest.raises(TypeError, match="not a subclass of SSLMethod"):
        register_method("plain")(torch.nn.Module)
