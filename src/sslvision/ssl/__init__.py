"""Self-supervised methods as a registry (timm's ``register_model`` idea).

``SSL_METHODS`` maps each ``pretrain.method`` name to its :class:`SSLMethod` class; :func:`build_method`
builds the one a run names (``PretrainParams.method`` accepts any registered name). A new method is a subclass
registered with the decorator::

    @register_method("my_method")
    class MyMethod(SSLMethod):
        def __init__(self, encoder, p):
            super().__init__(encoder)
            self.head = torch.nn.Linear(encoder.dim, 64)

        def forward(self, views, step):  # a list of (B, C, H, W) batches -> a scalar loss
            return objectives.nt_xent(self.head(self.encoder(views[0])), self.head(self.encoder(views[1])))

For ``params.yaml`` / ``dvc repro`` (the stages never import a project's code), the package that holds the
module names it as an entry point of group ``sslvision.ssl_methods`` (:mod:`sslvision.plugins`)::

    [project.entry-points."sslvision.ssl_methods"]
    my_method = "my_package.ssl"
"""

from sslvision.ssl.base import (
    SSL_METHODS,
    SSLMethod,
    build_method,
    cosine_cycle,
    cosine_schedule,
    in_fp32,
    register_method,
)
from sslvision.ssl.methods import CLMIM, DINO, MAE, SimCLR, VICReg

__all__ = ["SSL_METHODS", "SSLMethod", "build_method", "cosine_cycle", "cosine_schedule", "in_fp32", "register_method",
           "CLMIM", "DINO", "MAE", "SimCLR", "VICReg"]
