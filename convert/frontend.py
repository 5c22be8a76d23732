"""The front end as an ONNX graph: 3 s audio chunks in, the model's log-mel windows out (docs/spec.md §3).

`frontend_graph` builds, with standard operators, what `runtime.features` computes in numpy: librosa's centre
padding (zeros), framing, the periodic Hann window, the DFT, power, the Slaney mel filterbank,
`power_to_db(ref=max per chunk, amin, top_db)` (pure silence gives 0 dB, as librosa does) and the crop to 128
frames. `compose` puts it in front of an exported mel-input model, so that the whole pipeline, waveform in and
scores out, is one graph any ONNX Runtime binding can run. Four DFTs are offered: two MatMuls of a two-stage
(Cooley-Tukey, 64 x 32) factoring (`matmul-fft`, the default), one MatMul against window-folded cosine/sine
bases (`matmul`), the DFT operator (`dft`) and the STFT operator (`stft`); onnxruntime's CUDA provider has
no kernel for the last two.
"""

from __future__ import annotations

import numpy as np

from runtime.constants import AUDIO_INPUT_NAME, FEATURES, INPUT_NAME, FeatureParams
from runtime.features import mel_filterbank

DFT_CHOICES = ("dft", "matmul", "matmul-fft", "stft")
DEFAULT_DFT = "matmul-fft"  # the fastest on CPU of the four, all of which pass parity; CUDA runs all its ops
DEFAULT_OPSET = 23
_P = "frontend/"  # prefix of every tensor name the front end adds, so it cannot clash with the model's


class _Graph:
    """A list of nodes and initializers under construction; every name gets the front end's prefix."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), _P + name))
        return _P + name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        out = name if name == INPUT_NAME else _P + name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=_P + name, **attrs))
        return out

    def slice(self, x: str, start: int, end: int, axis: int, name: str) -> str:
        bounds = [self.const(f"{name}_{what}", np.array([v], np.int64))
                  for what, v in (("start", start), ("end", end), ("axis", axis))]
        return self.op("Slice", [x, *bounds], name)


def n_stft_frames(params: FeatureParams = FEATURES) -> int:
    """STFT frames of one chunk with center=True: 1 + chunk_samples // hop (130 for 3 s)."""
    return 1 + params.chunk_samples // params.hop_length


def _frames(g: _Graph, padded: str, params: FeatureParams) -> str:
    """(B, padded length) -> (B, T, n_fft) frames every hop: hop-sized blocks, concatenated n_fft // hop at a time."""
    n_t, hop = n_stft_frames(params), params.hop_length
    if params.n_fft % hop:
        raise ValueError(f"framing needs n_fft ({params.n_fft}) to be a multiple of hop_length ({hop})")
    per_frame = params.n_fft // hop
    n_blocks = n_t - 1 + per_frame
    used = g.slice(padded, 0, n_blocks * hop, 1, "framed_signal")
    blocks = g.op("Reshape", [used, g.const("block_shape", np.array([0, n_blocks, hop], np.int64))], "blocks")
    parts = [g.slice(blocks, j, j + n_t, 1, f"blocks_{j}") for j in range(per_frame)]
    return g.op("Concat", parts, "frames", axis=2)  # frame t = blocks t .. t + per_frame - 1


def dft_bases(params: FeatureParams = FEATURES) -> np.ndarray:
    """(n_fft, 2 * n_bins) float32: Hann-windowed cosines then sines, so frames @ bases = [Re | -Im] of the rfft."""
    n = np.arange(params.n_fft)
    k = np.arange(params.n_fft // 2 + 1)
    angle = 2.0 * np.pi * (np.outer(n, k) % params.n_fft) / params.n_fft  # exact phase before the float64 cos
    window = _hann(params)[:, None]
    return np.concatenate([window * np.cos(angle), window * np.sin(angle)], axis=1).astype(np.float32)


def _hann(params: FeatureParams) -> np.ndarray:
    """Periodic Hann window, float64 (as scipy's get_window('hann', n_fft, fftbins=True))."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(params.n_fft) / params.n_fft)


def _window(g: _Graph, params: FeatureParams) -> str:
    return g.const("hann", _hann(params).astype(np.float32))


def _phase(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """2 pi (a b mod n) / n for integer grids: exact before the float64 cos / sin."""
    return 2.0 * np.pi * (np.outer(a, b) % n) / n


def fft_matmul_constants(params: FeatureParams = FEATURES, n1: int = 64) -> dict[str, np.ndarray]:
    """Bases of a two-stage (Cooley-Tukey) real DFT as MatMuls, n_fft = n1 * n2, bin k = k1 + n1 k2.

    The frame is read as an (n1, n2) grid, sample n = n2_size * n1 + n2. Stage 1: real DFT of size n1 down each
    column (cos rows, then sin rows); twiddles e^{-2 pi i n2 k1 / n_fft};
    stage 2: complex DFT of size n2 as one real MatMul. The mel filterbank is laid out in the resulting bin
    order, with zero weight for the bins above n_fft / 2 (the mirror half).
    """
    n_fft = params.n_fft
    n2 = n_fft // n1
    if n1 * n2 != n_fft:
        raise ValueError(f"n_fft {n_fft} is not a multiple of {n1}")
    r1, r2 = np.arange(n1), np.arange(n2)
    stage1 = np.concatenate([np.cos(_phase(r1, r1, n1)), np.sin(_phase(r1, r1, n1))])  # (2 n1, n1)
    twiddle = _phase(r1, r2, n_fft)  # (k1, n2)
    c2, s2 = np.cos(_phase(r2, r2, n2)), np.sin(_phase(r2, r2, n2))  # (n2, k2)
    stage2 = np.block([[c2, s2], [-s2, c2]])  # [Re | G] @ stage2 = [Re Z | -Im Z]
    k = r1[:, None] + n1 * r2[None, :]  # (k1, k2) -> bin
    fb = mel_filterbank(params).T.astype(np.float64)  # (n_bins, n_mels)
    weights = np.where((k <= n_fft // 2)[..., None], fb[np.minimum(k, n_fft // 2)], 0.0)  # (n1, n2, n_mels)
    weights = np.concatenate([weights, weights], axis=1).reshape(n1 * 2 * n2, -1)  # Re^2 and Im^2 columns alike
    out = {"stage1": stage1, "twiddle_cos": np.cos(twiddle), "twiddle_sin": np.sin(twiddle), "stage2": stage2,
           "mel_fb": weights}
    return {**{name: v.astype(np.float32) for name, v in out.items()}, "n1": n1, "n2": n2}


def _fft_matmul_mel(g: _Graph, frames: str, params: FeatureParams) -> str:
    """Windowed frames (B, T, n_fft) -> mel power (B, T, n_mels) through two small DFT MatMuls."""
    c = fft_matmul_constants(params)
    n1, n2 = c["n1"], c["n2"]
    windowed = g.op("Mul", [frames, _window(g, params)], "windowed")
    grid = g.op("Reshape", [windowed, g.const("grid_shape", np.array([0, 0, n1, n2], np.int64))], "grid")
    # (B, T, n2, n1) @ (n1, 2 n1): one large GEMM rather than a small one per frame
    grid_t = g.op("Transpose", [grid], "grid_t", perm=[0, 1, 3, 2])
    y = g.op("MatMul", [grid_t, g.const("stage1", c["stage1"].T.copy())], "stage1_out")  # (B, T, n2, 2 n1)
    a, b = g.slice(y, 0, n1, 3, "stage1_cos"), g.slice(y, n1, 2 * n1, 3, "stage1_sin")  # (B, T, n2, k1)
    tc, ts = g.const("twiddle_cos", c["twiddle_cos"].T.copy()), g.const("twiddle_sin", c["twiddle_sin"].T.copy())
    re = g.op("Sub", [g.op("Mul", [a, tc], "a_tc"), g.op("Mul", [b, ts], "b_ts")], "twiddled_re")
    neg_im = g.op("Add", [g.op("Mul", [a, ts], "a_ts"), g.op("Mul", [b, tc], "b_tc")], "twiddled_neg_im")
    both_t = g.op("Concat", [re, neg_im], "twiddled_t", axis=2)  # (B, T, 2 n2, n1)
    both = g.op("Transpose", [both_t], "twiddled", perm=[0, 1, 3, 2])  # (B, T, n1, 2 n2)
    z = g.op("MatMul", [both, g.const("stage2", c["stage2"])], "stage2_out")  # (B, T, n1, 2 n2)
    squared = g.op("Mul", [z, z], "squared")
    flat = g.op("Reshape", [squared, g.const("flat_shape", np.array([0, 0, -1], np.int64))], "squared_flat")
    return g.op("MatMul", [flat, g.const("mel_fb_fft", c["mel_fb"])], "mel_power")


def _mel_power(g: _Graph, padded: str, dft: str, params: FeatureParams) -> str:
    """(B, padded length) -> mel power (B, T, n_mels) with the chosen DFT."""
    fb_t = mel_filterbank(params).T.astype(np.float32)  # (n_bins, n_mels)
    if dft == "matmul-fft":
        return _fft_matmul_mel(g, _frames(g, padded, params), params)
    if dft == "matmul":  # |X|^2 @ fb.T = Re^2 @ fb.T + Im^2 @ fb.T: one MatMul with the filterbank stacked twice
        spectrum = g.op("MatMul", [_frames(g, padded, params), g.const("dft_bases", dft_bases(params))], "spectrum")
        squared = g.op("Mul", [spectrum, spectrum], "squared")
        return g.op("MatMul", [squared, g.const("mel_fb2", np.concatenate([fb_t, fb_t]))], "mel_power")
    if dft == "dft":
        windowed = g.op("Mul", [_frames(g, padded, params), _window(g, params)], "windowed")
        real = g.op("Unsqueeze", [windowed, g.const("last_axis", np.array([-1], np.int64))], "windowed_real")
        spectrum = g.op("DFT", [real, "", g.const("dft_axis", np.array(2, np.int64))], "spectrum", onesided=1)
    elif dft == "stft":
        signal = g.op("Unsqueeze", [padded, g.const("last_axis", np.array([-1], np.int64))], "signal_real")
        spectrum = g.op("STFT", [signal, g.const("hop", np.array(params.hop_length, np.int64)),
                                 _window(g, params)], "spectrum", onesided=1)
    else:
        raise ValueError(f"unknown dft {dft!r}; choose one of {DFT_CHOICES}")
    squared = g.op("Mul", [spectrum, spectrum], "squared")  # (B, T, n_bins, 2): Re^2, Im^2
    power = g.op("ReduceSum", [squared, g.const("complex_axis", np.array([-1], np.int64))], "power", keepdims=0)
    return g.op("MatMul", [power, g.const("mel_fb", fb_t)], "mel_power")


def _power_to_db(g: _Graph, mel: str, params: FeatureParams) -> str:
    """librosa.power_to_db(S, ref=np.max, amin, top_db) over each chunk's (time, mel) plane."""
    amin, tf_axes = g.const("amin", np.float32(params.amin)), g.const("tf_axes", np.array([1, 2], np.int64))
    to_db = g.const("ten_over_ln10", np.float32(10.0 / np.log(10.0)))
    db = g.op("Mul", [g.op("Log", [g.op("Max", [mel, amin], "clamped")], "ln"), to_db], "db_abs")
    # 10 log10(max(amin, ref)) with ref = max(S) is the max of db_abs (log is monotonic); taking it from db_abs
    # itself keeps silence at exactly 0 dB, where a second Log kernel could round the same value differently.
    ref_db = g.op("ReduceMax", [db, tf_axes], "ref_db", keepdims=1)
    rel = g.op("Sub", [db, ref_db], "db_rel")
    floor = g.op("Sub", [g.op("ReduceMax", [rel, tf_axes], "db_max", keepdims=1),
                         g.const("top_db", np.float32(params.top_db))], "db_floor")
    return g.op("Max", [rel, floor], "db")


def frontend_graph(dft: str = DEFAULT_DFT, *, opset: int = DEFAULT_OPSET, params: FeatureParams = FEATURES):
    """ONNX model: `audio` float32 (batch, chunk_samples) -> `mel` float32 (batch, n_frames, n_mels) in dB."""
    from onnx import TensorProto, helper

    g = _Graph()
    half = params.n_fft // 2
    pads = g.const("center_pads", np.array([0, half, 0, half], np.int64))
    padded = g.op("Pad", [AUDIO_INPUT_NAME, pads], "padded", mode="constant")  # center=True, zero padding
    db = _power_to_db(g, _mel_power(g, padded, dft, params), params)  # (B, T, n_mels)
    n_t = n_stft_frames(params)
    if n_t >= params.n_frames:
        g.op("Identity", [g.slice(db, 0, params.n_frames, 1, "cropped")], INPUT_NAME)
    else:
        frame_pads = g.const("frame_pads", np.array([0, 0, 0, 0, params.n_frames - n_t, 0], np.int64))
        g.op("Pad", [db, frame_pads, g.const("pad_db", np.float32(params.pad_db))], INPUT_NAME, mode="constant")
    graph = helper.make_graph(
        g.nodes, "percepiano_frontend",
        [helper.make_tensor_value_info(AUDIO_INPUT_NAME, TensorProto.FLOAT, ["batch", params.chunk_samples])],
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", params.n_frames, params.n_mels])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="percepiano-onnx")
    model.doc_string = f"PercePiano log-mel front end ({dft} DFT)"
    return model


def compose(transformer, dft: str = DEFAULT_DFT):
    """One graph: the front end, then a mel-input model (any variant); `audio` in, that model's outputs out."""
    from onnx import compose as onnx_compose

    opsets = {o.domain: o.version for o in transformer.opset_import}
    front = frontend_graph(dft, opset=opsets.get("", DEFAULT_OPSET))
    front.ir_version = transformer.ir_version
    for domain, version in opsets.items():  # merge_models wants the same opset imports on both sides
        if domain:
            front.opset_import.append(_opsetid(domain, version))
    merged = onnx_compose.merge_models(front, transformer, io_map=[(INPUT_NAME, INPUT_NAME)])
    merged.graph.name = transformer.graph.name
    return merged


def _opsetid(domain: str, version: int):
    from onnx import helper

    return helper.make_opsetid(domain, version)
