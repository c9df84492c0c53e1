"""gaitflow's diagnosis model: data loading, window features, training, serving.

Submodules (import what you need; this package imports nothing heavy):

* :mod:`ml.data` - gaitpdb recordings, demographics, download with checksums;
* :mod:`ml.features` - window features (numpy/pandas only; used by Spark too);
* :mod:`ml.rocket` - MiniRocket-style random convolutions;
* :mod:`ml.model` - the model (members, ensembles, calibration, thresholds);
* :mod:`ml.evaluate` - subject-wise folds, metrics, bootstrap intervals;
* :mod:`ml.train` - ``python -m ml.train``; :mod:`ml.report` - the model card;
* :mod:`ml.artifact` - versioned model directories;
* :mod:`ml.serve` - ``python -m ml.serve``, the aiohttp model server.
"""

__all__: list[str] = []
