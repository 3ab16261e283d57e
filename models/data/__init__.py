"""Event data sets: one interface, real benchmark readers, and data sets the project makes.

>>> from evssm.models.data import load_dataset
>>> ds = load_dataset("event-mnist", "test")        # built and cached on first use
>>> rec, label = ds[0]                              # Recording (t int64 us, x, y, p), int

Names: ``event-mnist``, ``spoken-digits`` (made here), ``shd``, ``ssc``, ``dvs-gesture`` (read from
files you put in the data directory: ``$EVSSM_DATA_DIR`` or ``~/.cache/evssm/data``).
NumPy only at import time (h5py, tqdm and mlxtend are imported when a reader or builder needs them).
"""

from . import augment  # the module: augment.augment(rec, sensor, rng, cfg), augment.cut_mix(...)
from .augment import AugmentConfig
from .base import (
    DATA_DIR_ENV,
    DATASETS,
    ArrayDataset,
    ClassSubset,
    DatasetSpec,
    EventDataset,
    Subset,
    dataset_names,
    default_data_dir,
    load_dataset,
    make_recording,
    pack_recordings,
)

__all__ = [
    "DATA_DIR_ENV",
    "DATASETS",
    "ArrayDataset",
    "AugmentConfig",
    "ClassSubset",
    "DatasetSpec",
    "EventDataset",
    "Subset",
    "augment",
    "dataset_names",
    "default_data_dir",
    "load_dataset",
    "make_recording",
    "pack_recordings",
]
