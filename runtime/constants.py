"""The one place for the 19 PercePiano dimensions and the preprocessing constants (docs/spec.md §3, §4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# (PercePiano label, API key), in model output order.
DIMENSIONS: tuple[tuple[str, str], ...] = (
    ("Timing_Stable_Unstable", "timing_stable_unstable"),
    ("Articulation_Short_Long", "articulation_short_long"),
    ("Articulation_Soft_cushioned_Hard_solid", "articulation_soft_cushioned_hard_solid"),
    ("Pedal_Sparse/dry_Saturated/wet", "pedal_sparse_dry_saturated_wet"),
    ("Pedal_Clean_Blurred", "pedal_clean_blurred"),
    ("Timbre_Even_Colorful", "timbre_even_colorful"),
    ("Timbre_Shallow_Rich", "timbre_shallow_rich"),
    ("Timbre_Bright_Dark", "timbre_bright_dark"),
    ("Timbre_Soft_Loud", "timbre_soft_loud"),
    ("Dynamic_Sophisticated/mellow_Raw/crude", "dynamic_sophisticated_mellow_raw_crude"),
    ("Dynamic_Little_dynamic_range_Large_dynamic_range", "dynamic_little_range_large_range"),
    ("Music_Making_Fast_paced_Slow_paced", "music_making_fast_paced_slow_paced"),
    ("Music_Making_Flat_Spacious", "music_making_flat_spacious"),
    ("Music_Making_Disproportioned_Balanced", "music_making_disproportioned_balanced"),
    ("Music_Making_Pure_Dramatic/expressive", "music_making_pure_dramatic_expressive"),
    ("Emotion_&_Mood_Optimistic/pleasant_Dark", "emotion_mood_optimistic_pleasant_dark"),
    ("Emotion_&_Mood_Low_Energy_High_Energy", "emotion_mood_low_energy_high_energy"),
    ("Emotion_&_Mood_Honest_Imaginative", "emotion_mood_honest_imaginative"),
    ("Interpretation_Unsatisfactory/doubtful_Convincing", "interpretation_unsatisfactory_convincing"),
)
LABELS: tuple[str, ...] = tuple(label for label, _ in DIMENSIONS)
API_KEYS: tuple[str, ...] = tuple(key for _, key in DIMENSIONS)
NUM_DIMENSIONS = len(DIMENSIONS)


@dataclass(frozen=True)
class FeatureParams:
    """Log-mel and chunking parameters the model was trained with."""

    sample_rate: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    fmin: float = 20.0
    fmax: float = 11025.0
    power: float = 2.0
    top_db: float = 80.0
    amin: float = 1e-10
    n_frames: int = 128  # time frames per model input
    chunk_seconds: float = 3.0
    hop_seconds: float = 2.0
    min_seconds: float = 2.0  # shorter audio is zero-padded to this
    pad_db: float = -80.0  # fill value when a chunk has fewer than n_frames frames

    @property
    def chunk_samples(self) -> int:
        return int(self.chunk_seconds * self.sample_rate)

    @property
    def hop_samples(self) -> int:
        return int(self.hop_seconds * self.sample_rate)

    def to_dict(self) -> dict:
        return asdict(self)


FEATURES = FeatureParams()

# Input and output names of the exported model.
INPUT_NAME = "mel"
AUDIO_INPUT_NAME = "audio"  # input of a model whose graph holds the front end: 3 s chunks (batch, 66150)
OUTPUT_NAME = "scores"
# Original service's length cap (docs/spec.md §3); the runtime offers it as an option, off by default.
ORIGINAL_CAP_SECONDS = 30.0
