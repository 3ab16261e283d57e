"""evssm: online inference for event-based state-space models.

One package with four parts, each a top-level folder of the repository that this folder links
(``evssm/models -> ../models``, ...; docs/architecture.md, "Layout"):

- ``evssm.models`` (``models/``): the EventSSM network, streaming form, trainer, data sets.
- ``evssm.server`` (``server/``): the FastAPI/uvicorn inference server.
- ``evssm.client`` (``client/``): client library and command line (no JAX needed).
- ``evssm.configs`` (``configs/``): YAML model and task configurations.

Importing ``evssm`` itself loads nothing heavy.
"""

__version__ = "0.1.0"
