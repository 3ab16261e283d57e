"""Facts of the benchmark data sets, written once — no imports beyond the standard library.

Sensor sizes, channel counts and class names (index = label) of the data sets the project reads,
used by the readers (``models/data``), the importer of the paper's checkpoints
(``models/seed_import.py``), the client's sources and the load generator, so a model imported or
trained for a task answers with the data set's own class names.

Label orders, from each data set's documentation:

- **SHD** (Cramer et al. 2020; the HDF5 files' ``extra/keys``): labels 0..9 are the English
  digits "zero".."nine", 10..19 the German "null".."neun".
- **SSC** (Cramer et al. 2020, from Speech Commands v0.02): the 35 words of Speech Commands
  v0.02 in alphabetical order, the label order of Speech Commands' own 35-class setting. The
  data set's README lists the words but not their order, so the readers prefer a file's own
  ``extra/keys`` wherever it has them (the real files do).
- **DVS128 Gesture** (Amir et al. 2017): the labels files' classes 1..11, here 0..10.
"""

from __future__ import annotations

# SHD and SSC: the outputs of the cochlea model (one channel per simulated fibre).
SHD_CHANNELS = 700

SHD_ENGLISH = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHD_GERMAN = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
SHD_CLASSES = SHD_ENGLISH + SHD_GERMAN

SSC_CLASSES = (
    "backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward",
    "four", "go", "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one",
    "right", "seven", "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow",
    "yes", "zero",
)

DVS_GESTURE_SIZE = (128, 128)  # width, height
DVS_GESTURE_CLASSES = (
    "hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
    "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
    "arm_roll", "air_drums", "air_guitar", "other_gestures",
)

# Class names by data set (spoken-digits is made by the project with SHD's words and labels).
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "shd": SHD_CLASSES, "spoken-digits": SHD_CLASSES, "ssc": SSC_CLASSES,
    "dvs-gesture": DVS_GESTURE_CLASSES,
}


def class_names_of(dataset: str) -> tuple[str, ...]:
    """The class names (index = label) of ``dataset``; a ValueError names the known ones."""
    try:
        return CLASS_NAMES[dataset]
    except KeyError:
        raise ValueError(f"no class names known for data set {dataset!r}; known: "
                         f"{', '.join(CLASS_NAMES)}") from None


assert len(SHD_CLASSES) == 20 and len(SSC_CLASSES) == 35 and len(DVS_GESTURE_CLASSES) == 11
assert len(set(SSC_CLASSES)) == 35 and list(SSC_CLASSES) == sorted(SSC_CLASSES)
