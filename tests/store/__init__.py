"""The store's tests: the engine-neutral contract suite (`test_contract_*`, run
on every engine by the `store_factory` fixture of conftest.py) and each
engine's own tests (`test_<engine>_engine.py`).

A package, so its conftest is `store.conftest` and does not shadow the
top-level tests/conftest.py that other test modules import as `conftest`."""
