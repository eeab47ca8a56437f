"""Self-supervised methods as a registry (timm's ``register_model`` idea).

``SSL_METHODS`` maps each ``pretrain.method`` name to its :class:`SSLMethod` class; :func:`build_method`
builds the one a run names (any registered name; ``PretrainParams.method`` itself accepts the five built-in
ones). A new method is a subclass registered with the decorator::

    @register_method("my_method")
    class MyMethod(SSLMethod):
        def __init__(self, encoder, p):
            super().__init__(encoder)
            self.head = torch.nn.Linear(encoder.dim, 64)

        def forward(self, views, step):  # a list of (B, C, H, W) batches -> a scalar loss
            return objectives.nt_xent(self.head(self.encoder(views[0])), self.head(self.encoder(views[1])))
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
