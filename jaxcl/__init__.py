"""jaxcl: continual learning in JAX.

Strategies are records of pure functions (:class:`Strategy`) composed with
:func:`chain`; a whole experience is one compiled program; runs are driven
by ml_collections configs (:func:`run`) or from Python.
"""

from jaxcl import datasets
from jaxcl import metrics
from jaxcl import models
from jaxcl import scenarios
from jaxcl import strategies
from jaxcl.experiment import default_config
from jaxcl.experiment import Result
from jaxcl.experiment import run
from jaxcl.experiment import setup
from jaxcl.state import Context
from jaxcl.state import StepInfo
from jaxcl.state import StreamInfo
from jaxcl.state import TrainState
from jaxcl.strategy import chain
from jaxcl.strategy import identity
from jaxcl.strategy import Strategy
from jaxcl.train import ConfigError
from jaxcl.train import init_state
from jaxcl.train import make_learner
from jaxcl.train import make_optimizer
from jaxcl.train import NonFiniteLossError

__version__ = "0.1.0"

__all__ = (
    "ConfigError",
    "Context",
    "NonFiniteLossError",
    "Result",
    "StepInfo",
    "Strategy",
    "StreamInfo",
    "TrainState",
    "chain",
    "datasets",
    "default_config",
    "identity",
    "init_state",
    "make_learner",
    "make_optimizer",
    "metrics",
    "models",
    "run",
    "scenarios",
    "setup",
    "strategies",
)
