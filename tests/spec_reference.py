"""Independent references written from the specification (/work/shared/SPEC.md §1 and §3), not from the code.

Nothing here imports `convert` or `runtime`: every number is written out as the specification states it, so a
change to the project's constants, model or features cannot move the yardstick with it. numpy (float64) for
the model, librosa for the features (what the original service ran).
"""

from __future__ import annotations

import numpy as np

# docs/spec.md §3, written out
SAMPLE_RATE = 22050
CHUNK = int(3.0 * 22050)  # 3 s windows ...
HOP = int(2.0 * 22050)  # ... every 2 s
MIN_SAMPLES = 2 * 22050  # shorter audio is padded to 2 s
N_FRAMES = 128
PAD_DB = -80.0
# docs/spec.md §1, written out
LAYERNORM_EPSILON = 1e-6


def chunk_starts(n_samples: int) -> list[int]:
    """Start samples of the chunks docs/spec.md §3 cuts from a signal of n_samples (already padded to 2 s)."""
    starts, start = [], 0
    while start + CHUNK <= n_samples:
        starts.append(start)
        start += HOP
    if start < n_samples:  # the rest, or the whole of a signal shorter than one chunk, zero-padded
        starts.append(start)
    return starts


def chunks(y: np.ndarray) -> np.ndarray:
    """(n, 66150) chunks of mono 22,050 Hz audio: full chunks every 2 s, then the rest zero-padded (docs/spec.md §3)."""
    y = np.asarray(y, np.float32)
    if len(y) < MIN_SAMPLES:
        y = np.pad(y, (0, MIN_SAMPLES - len(y)))
    out = np.zeros((len(chunk_starts(len(y))), CHUNK), np.float32)
    for i, s in enumerate(chunk_starts(len(y))):
        piece = y[s : s + CHUNK]
        out[i, : len(piece)] = piece
    return out


def log_mel_window(chunk: np.ndarray) -> np.ndarray:
    """One chunk -> the model's (128, 128) input: librosa melspectrogram and power_to_db as docs/spec.md §3 states
    them."""
    import librosa

    mel = librosa.feature.melspectrogram(y=chunk, sr=22050, n_fft=2048, hop_length=512, n_mels=128, power=2.0,
                                         fmin=20, fmax=11025)
    db = librosa.power_to_db(mel, ref=np.max, amin=1e-10, top_db=80.0).T  # (time, mel)
    window = np.full((N_FRAMES, 128), PAD_DB, np.float32)
    window[: min(len(db), N_FRAMES)] = db[:N_FRAMES]
    return window


def windows(y: np.ndarray) -> np.ndarray:
    """Mono 22,050 Hz audio -> (n, 128, 128) model inputs."""
    return np.stack([log_mel_window(c) for c in chunks(y)])


def aggregate(chunk_scores: np.ndarray) -> np.ndarray:
    """docs/spec.md §3: mean over the chunks, then clip to [0, 1]."""
    return np.clip(np.mean(chunk_scores, axis=0), 0.0, 1.0)


# --- the model of docs/spec.md §1 in plain numpy --------------------------------------------------------------------


def _dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _layer_norm(x, p):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYERNORM_EPSILON) * np.asarray(p["scale"], np.float64) + np.asarray(
        p["bias"], np.float64)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _attention(x, p, num_heads):
    """nn.MultiHeadDotProductAttention: q/k/v kernels (D, H, hd) and biases (H, hd), out kernel (H, hd, D)."""
    def heads(name):  # (B, N, D) -> (B, H, N, hd)
        kernel, bias = (np.asarray(p[name][k], np.float64) for k in ("kernel", "bias"))
        return np.einsum("bnd,dhk->bhnk", x, kernel) + bias[None, :, None, :]

    q, k, v = heads("query"), heads("key"), heads("value")
    head_dim = q.shape[-1]
    weights = _softmax(np.einsum("bhqk,bhnk->bhqn", q, k) / np.sqrt(head_dim))
    mixed = np.einsum("bhqn,bhnk->bhqk", weights, v)
    return np.einsum("bhqk,hkd->bqd", mixed, np.asarray(p["out"]["kernel"], np.float64)) + np.asarray(
        p["out"]["bias"], np.float64)


def patchify(x: np.ndarray, patch: int = 16) -> np.ndarray:
    """(B, T, F) -> (B, T/16 * F/16, 256): time-major patch order, each patch flattened as (t, f); -80 padding."""
    b, t, f = x.shape
    x = np.pad(x, ((0, 0), (0, -t % patch), (0, -f % patch)), constant_values=PAD_DB)
    t, f = x.shape[1:]
    x = x.reshape(b, t // patch, patch, f // patch, patch).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, (t // patch) * (f // patch), patch * patch)


def forward(params: dict, num_layers: int, num_heads: int, x: np.ndarray) -> np.ndarray:
    """docs/spec.md §1's ProductionASTForRegression on (B, 128, 128) log-mel: (B, 19) label z-scores, float64."""
    h = _dense(patchify(np.asarray(x, np.float64)), params["patch_embedding"])
    h = h + np.asarray(params["pos_embedding"], np.float64)
    for i in range(num_layers):
        h = h + _attention(_layer_norm(h, params[f"norm1_layer{i}"]), params[f"attention_layer{i}"], num_heads)
        mlp = _gelu_tanh(_dense(_layer_norm(h, params[f"norm2_layer{i}"]), params[f"mlp_dense1_layer{i}"]))
        h = h + _dense(mlp, params[f"mlp_dense2_layer{i}"])
    pooled = _layer_norm(h, params["final_norm"]).mean(axis=1)
    return _dense(_gelu_tanh(_dense(pooled, params["regression_hidden"])), params["regression_output"])


def checkpoint_forward(ckpt: dict, x: np.ndarray) -> np.ndarray:
    """A checkpoint dict (docs/spec.md §2, as pickle.load gives it) on log-mel -> (B, 19) scores in label units, through
    the checkpoint's own scikit-learn StandardScaler.inverse_transform."""
    config = ckpt["model_config"]
    z = forward(ckpt["params"]["params"], config["num_layers"], config["num_heads"], x)
    return ckpt["label_scaler"].inverse_transform(z)
