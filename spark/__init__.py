"""Spark jobs of gaitflow. They import their feature code from ``ml`` (shipped to the
executors with ``--py-files``) and are launched and monitored by the ``spark_job``
handler (``handlers/spark_job.py``).

``features_job``  raw lake segments -> window features (Parquet), incremental or full.
"""
