"""gaitflow's pipeline runtime: an asyncio microframework for sensor pipelines.

Write handlers by subclassing :class:`Source`, :class:`Processor` or :class:`Sink`
(see ``pipeline/HANDLERS.md``); run them with :class:`Runtime` or
``python run.py --settings settings.toml`` (or ``python -m pipeline --settings ...``).
"""
from .batch import Batch
from .config import PipelineConfig, load_config
from .deadletter import DEAD_LETTER_SCHEMA
from .graph import GraphError
from .handler import Deferred, NoSettings, PartialFailure, Processor, Reject, Sink, Source
from .log import configure_logging
from .plugins import ENTRY_POINT_GROUP, PluginError, Registry
from .retry import RetryPolicy
from .runtime import RunReport, Runtime, StartError
from .settings import Secret, SettingsError, setting

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "ENTRY_POINT_GROUP",
    "Batch",
    "Deferred",
    "GraphError",
    "NoSettings",
    "PartialFailure",
    "PipelineConfig",
    "PluginError",
    "Processor",
    "Registry",
    "Reject",
    "RetryPolicy",
    "RunReport",
    "Runtime",
    "Secret",
    "SettingsError",
    "Sink",
    "Source",
    "StartError",
    "configure_logging",
    "load_config",
    "setting",
]
