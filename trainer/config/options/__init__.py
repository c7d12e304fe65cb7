"""Training options beyond TrainTrain's own settings, one small dataclass per topic.

TrainConfig inherits them all, so each field is part of the one schema (UI, presets,
CLI, queue, API) like any other. A topic's cross-field checks live in its ``check``
method, which TrainConfig.validate calls.
"""
from __future__ import annotations

from .data import DataOptions
from .flow import FlowOptions
from .fluxnet import FluxNetworkOptions
from .grid import GridOptions
from .loss import LossOptions
from .network import NetworkOptions
from .sd3 import SD3Options
from .state import StateOptions
from .zimage import ZImageOptions

OPTION_CLASSES = (NetworkOptions, LossOptions, DataOptions, StateOptions, GridOptions, FlowOptions, FluxNetworkOptions,
                  SD3Options, ZImageOptions)

__all__ = ["OPTION_CLASSES", "NetworkOptions", "LossOptions", "DataOptions", "StateOptions", "GridOptions",
           "FlowOptions", "FluxNetworkOptions", "SD3Options", "ZImageOptions"]
