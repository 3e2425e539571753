"""SSF and FedIns: scale-and-shift feature adaptation, instance-adaptive SSF pools, fold-back.

- :mod:`fedagg.ssf.layers` — SSF (Lian et al., NeurIPS 2022, arXiv 2210.08823): ``y = γ ⊙ op(x) + β``
  after chosen Linear / LayerNorm / Conv1d / Conv2d sites (:func:`inject_ssf`), and :func:`fold`, the
  re-parameterisation back into a plain model with identical outputs.
- :mod:`fedagg.ssf.pool` — FedIns (Feng et al., ICCV 2023, arXiv 2308.06051): SSF pools with learnable
  keys and a head pool, cosine top-k matching of the frozen backbone's pre-logit feature, per-instance
  slot means (and the reference's batch-averaged variant), the surrogate loss, and
  :class:`SSFPoolModel`, which wraps any torch backbone given a feature function.

Using your own backbone
-----------------------
Any ``nn.Module`` works. Tell :class:`SSFPoolModel` how to get the ``(B, D)`` pre-logit feature:

- the module has a ``features(x)`` method (all ``fedagg.models`` do): nothing to pass;
- the classifier is a submodule called on that feature: ``head="fc"`` (the feature is captured as the
  head's input, :class:`HeadInput`);
- otherwise ``feature_fn=lambda m, x: ...`` that calls submodules through their attributes.

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU())
...         self.fc = nn.Linear(16, 3)
...     def forward(self, x):
...         return self.fc(self.body(x))
>>> model = SSFPoolModel(Net(), head="fc", pool_size=5, top_k=2,
...                      generator=torch.Generator().manual_seed(0))
>>> model.sites
('body.0', 'body.1')
>>> model(torch.randn(4, 8)).shape
torch.Size([4, 3])

Only the pool tensors train (:meth:`SSFPoolModel.pool_parameters`) and travel
(:meth:`SSFPoolModel.pool_state_dict` / :meth:`SSFPoolModel.load_pool_state_dict`); the backbone is
frozen.
"""

from fedagg.ssf.layers import (
    DEFAULT_SITE_TYPES,
    SSF,
    BaseSSFSite,
    SSFSite,
    channel_dim,
    find_sites,
    find_ssf_sites,
    fold,
    fold_site,
    init_scale_shift,
    inject_ssf,
    resolve_sites,
    ssf_apply,
    ssf_named_parameters,
)
from fedagg.ssf.pool import (
    FeatureFn,
    HeadInput,
    Match,
    PoolSSFSite,
    SelectionMode,
    SSFPoolModel,
    features_method,
    fedins_loss,
    match_keys,
    pool_head,
    resolve_feature_fn,
    select_slots,
)

__all__ = [
    "DEFAULT_SITE_TYPES",
    "SSF",
    "BaseSSFSite",
    "FeatureFn",
    "HeadInput",
    "Match",
    "PoolSSFSite",
    "SSFPoolModel",
    "SSFSite",
    "SelectionMode",
    "channel_dim",
    "fedins_loss",
    "features_method",
    "find_sites",
    "find_ssf_sites",
    "fold",
    "fold_site",
    "init_scale_shift",
    "inject_ssf",
    "match_keys",
    "pool_head",
    "resolve_feature_fn",
    "resolve_sites",
    "select_slots",
    "ssf_apply",
    "ssf_named_parameters",
]
