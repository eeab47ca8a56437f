"""Entry-point plugins: an installed package's SSL method / generator is usable by name from params.yaml, although
the stages never import the project's code (sslvision.plugins)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sslvision import plugins
from sslvision import synthesize as syn
from sslvision.params import ParamsError, validate_section
from sslvision.pretrain import PretrainParams, pretrain_encoder
from sslvision.ssl import SSL_METHODS
from tests.test_pretrain import FAST, TINY_RESNET

PLUGIN = textwrap.dedent('''
    import numpy as np
    import torch

    from sslvision import objectives
    from sslvision.ssl import SSLMethod, register_method
    from sslvision.synthesize import register_generator


    @register_method("toy_plugin")
    class ToyMethod(SSLMethod):
        def __init__(self, encoder, p):
            super().__init__(encoder)
            self.head = torch.nn.Linear(encoder.dim, 8)

        def forward(self, views, step):
            return objectives.nt_xent(self.head(self.encoder(views[0])), self.head(self.encoder(views[1])), 0.5)


    @register_generator("toy_flip")
    class FlipGenerator:
        def __init__(self, params, device):
            self.seed = params.seed

        def fit(self, real, encoder):
            return {}

        def generate(self, real, label, count, rng):
            src = rng.choice(real.of_class(label), size=count)
            return real.images[src][:, :, ::-1].copy(), np.stack([src, np.full(count, -1)], axis=1)
''')


def install(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, dict[str, str]]) -> None:
    """A distribution as pip leaves it in site-packages: its modules plus ``<dist>-0.1.dist-info``."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in entry_points.items()))


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty site-packages directory on sys.path; the registries, the plugins' modules and the "loaded" flag
    are restored afterwards."""
    methods, generators, modules = dict(SSL_METHODS), dict(syn.GENERATORS), set(sys.modules)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    SSL_METHODS.clear()
    SSL_METHODS.update(methods)
    syn.GENERATORS.clear()
    syn.GENERATORS.update(generators)
    for name in set(sys.modules) - modules:
        if name.startswith("toy_sslvision_"):
            del sys.modules[name]


@pytest.fixture
def toy(site):
    install(site, "toy_sslvision_plugin", {"toy_sslvision_plugin": PLUGIN},
            {plugins.SSL_METHODS_GROUP: {"toy_plugin": "toy_sslvision_plugin"},
             plugins.GENERATORS_GROUP: {"toy_flip": "toy_sslvision_plugin"}})
    return site


def test_a_plugin_method_validates_and_trains_without_being_imported(toy):
    assert "toy_sslvision_plugin" not in sys.modules  # nothing imports it but the entry point
    assert PretrainParams(method="toy_plugin").method == "toy_plugin"
    assert SSL_METHODS["toy_plugin"].__module__ == "toy_sslvision_plugin"
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16), dtype=np.uint8)
    encoder = pretrain_encoder(images, method="toy_plugin", epochs=1, batch_size=16, lr=1e-3, warmup_epochs=0,
                               **TINY_RESNET, **FAST)
    assert np.isfinite(encoder(torch.zeros(2, 1, 16, 16)).detach().numpy()).all()


def test_a_plugin_generator_validates_and_generates(toy):
    p = syn.SynthesizeParams(generator="toy_flip")
    gen = syn.make_generator(p, torch.device("cpu"))
    assert type(gen).__name__ == "FlipGenerator" and type(gen).name == "toy_flip"
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    real = syn.RealSet(images=images, labels=np.array([0, 0, 1, 1]), ids=np.arange(4).astype(str),
                       embeddings=np.zeros((4, 2), np.float32), classes=["a", "b"])
    new, src = gen.generate(real, 1, 3, np.random.default_rng(0))
    assert new.shape == (3, 8, 8, 1) and new.dtype == np.uint8 and set(src[:, 0]) <= {2, 3}


def test_an_unknown_name_lists_the_registered_ones(toy):
    with pytest.raises(ParamsError, match=r"params.yaml: pretrain.method: .*'byol' is not a registered SSL method "
                                          r"\(simclr, vicreg, dino, mae, cl_mim, toy_plugin; plugins: entry points "
                                          r"of group sslvision.ssl_methods\)"):
        validate_section("pretrain", PretrainParams, {"method": "byol"})
    with pytest.raises(ParamsError, match=r"synthesize.generator: .*'gan' is not a registered generator "
                                          r"\(augment, mae_inpaint, feature_interp, toy_flip; plugins: entry "
                                          r"points of group sslvision.generators\)"):
        validate_section("synthesize", syn.SynthesizeParams, {"generator": "gan"})
    with pytest.raises(ValueError, match="'byol' is not a registered SSL method"):
        pretrain_encoder(np.zeros((32, 16, 16), np.uint8), method="byol")


def test_a_plugin_that_fails_to_import_names_itself(site):
    install(site, "toy_sslvision_broken", {"toy_sslvision_broken": "raise RuntimeError('no GPU driver')\n"},
            {plugins.GENERATORS_GROUP: {"broken_gen": "toy_sslvision_broken"}})
    msg = (r"sslvision plugin entry point 'broken_gen' = 'toy_sslvision_broken' of group 'sslvision.generators' "
           r"\(distribution toy_sslvision_broken 0.1\) failed to import: RuntimeError: no GPU driver")
    with pytest.raises(plugins.PluginError, match=msg):
        PretrainParams(method="simclr")  # any validated name loads every plugin: none is skipped
    with pytest.raises(plugins.PluginError, match=msg):  # not remembered as loaded: it fails again
        syn.make_generator(syn.SynthesizeParams.model_construct(generator="augment"), torch.device("cpu"))


@pytest.mark.parametrize("group,kind,name", [(plugins.SSL_METHODS_GROUP, "SSL method", "simclr"),
                                             (plugins.GENERATORS_GROUP, "generator", "augment")])
def test_a_plugin_may_not_take_a_registered_name(site, group, kind, name):
    source = PLUGIN.replace('"toy_plugin"', f'"{name}"') if kind == "SSL method" else \
        PLUGIN.replace('"toy_flip"', f'"{name}"')
    install(site, "toy_sslvision_dup", {"toy_sslvision_dup": source}, {group: {"dup": "toy_sslvision_dup"}})
    builtin = SSL_METHODS["simclr"], syn.GENERATORS["augment"]
    with pytest.raises(plugins.PluginError, match=rf"entry point 'dup' .*\(distribution toy_sslvision_dup 0.1\).* "
                                                  rf"{kind} .*'{name}'.* already registered"):
        plugins.load_plugins()
    assert (SSL_METHODS["simclr"], syn.GENERATORS["augment"]) == builtin  # the built-ins stand
