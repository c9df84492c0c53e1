"""gaitflow's diagnosis model: data loading, window features, training, serving.

Submodules (import what you need; this package imports nothing heavy):

* :mod:`ml.data` - gaitpdb recordings, demographics, download with checksums
  (``python -m ml.data download DEST`` | ``verify DIR``);
* :mod:`ml.features` - window features (numpy/pandas only; the Spark job uses them);
* :mod:`ml.rocket` - MiniRocket-style random convolutions (numpy);
* :mod:`ml.model` - members, candidates, ensembles, calibration, thresholds;
* :mod:`ml.evaluate` - subject-wise folds, metrics, bootstrap intervals;
* :mod:`ml.train` - ``python -m ml.train``; :mod:`ml.report` - the model card;
* :mod:`ml.artifact` - versioned model directories;
* :mod:`ml.serve` - ``python -m ml.serve``, the aiohttp model server
  (:mod:`ml.validate` checks its requests, :mod:`ml.prom` renders ``/metrics``);
* :mod:`ml.synthetic` - synthetic gaitpdb-format recordings for tests and benchmarks.
"""

__all__: list[str] = []
