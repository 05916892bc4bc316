"""The example app that ``train.py``, ``conf/`` and the benchmarks use: data modules, the model zoo, augmentation
and the sweep summary. It imports the library (``lightning_compress``); the library never imports it."""
