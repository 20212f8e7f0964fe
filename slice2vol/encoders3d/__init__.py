"""Native-3D encoders behind one interface; importing this package registers every family.

``build_encoder3d(key, weights, **kwargs)`` builds one (``ENCODERS3D.names()`` lists the keys) and
``embed_cohort3d(encoder, cohort, store, name)`` writes one embedding per subject into a feature store,
where the benchmark reads it like aggregated 2D features.
"""

import importlib as _importlib

from slice2vol.encoders3d.base import (
    ENCODERS3D,
    Encoder3D,
    Encoder3DInfo,
    FeatureLevel3D,
    SlidingWindow,
    build_encoder3d,
    parse_weights3d,
)
from slice2vol.encoders3d.embed import Embed3DReport, Encoder3DConfig, embed_cohort3d

# one module per family; each import is light (heavy libraries load inside the builders)
for _module in ("slice2vol.encoders3d.deepbet", "slice2vol.encoders3d.monai_nets", "slice2vol.encoders3d.medicalnet",
                "slice2vol.encoders3d.swin_unetr", "slice2vol.encoders3d.genesis", "slice2vol.encoders3d.brainiac",
                "slice2vol.encoders3d.neuro_simclr", "slice2vol.encoders3d.fomo25"):
    _importlib.import_module(_module)

__all__ = ["ENCODERS3D", "Embed3DReport", "Encoder3D", "Encoder3DConfig", "Encoder3DInfo", "FeatureLevel3D",
           "SlidingWindow", "build_encoder3d", "embed_cohort3d", "parse_weights3d"]
