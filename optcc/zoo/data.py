"""Run-time data helpers for the reference models in ``optcc/zoo`` (torch only).

The training script (``scripts/train_reference.py``) imports its preprocessing
from this file, so training and evaluation use the very same transforms.
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Tuple, Union

import torch
import torch.nn.functional as F

# Digits preprocessing constants (sklearn load_digits pixels are 0..16).
DIGITS_MAX = 16.0
DIGITS_SIZE = 32
DIGITS_MEAN = 0.5
DIGITS_STD = 0.5


def zoo_dir() -> pathlib.Path:
    """Folder holding the zoo models (the folder of this module)."""
    return pathlib.Path(__file__).resolve().parent


def digits_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Raw digits ``[N,8,8]`` (uint8/int/float, values 0..16) -> ``[N,3,32,32]`` float32.

    Scale to [0,1], bilinear upscale to 32x32 (align_corners=False), repeat to
    3 channels, normalise with mean 0.5 / std 0.5 (i.e. to [-1, 1]).
    """
    if images.dim() != 3 or images.shape[-2:] != (8, 8):
        raise ValueError(f"expected [N,8,8] images, got {tuple(images.shape)}")
    x = images.to(torch.float32).unsqueeze(1) / DIGITS_MAX          # [N,1,8,8]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear",
                      align_corners=False)                          # [N,1,32,32]
    x = x.clamp(0.0, 1.0).repeat(1, 3, 1, 1)                        # [N,3,32,32]
    return ((x - DIGITS_MEAN) / DIGITS_STD).contiguous()


def byte_encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a LongTensor ``[T]`` (ids 0..255)."""
    data = text.encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long) if data \
        else torch.zeros(0, dtype=torch.long)


def byte_decode(ids: Union[torch.Tensor, Iterable[int]]) -> str:
    """Byte ids ``[T]`` (Tensor or iterable of ints) -> str (invalid UTF-8 replaced)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


def _check_split(split: str) -> None:
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', got {split!r}")


def load_digits_split(name: str = "vit-digits", split: str = "eval") -> Tuple[torch.Tensor, torch.Tensor]:
    """Load ``<zoo>/<name>/<split>.safetensors`` -> (pixels ``[N,3,32,32]`` f32, labels ``[N]`` i64)."""
    from safetensors.torch import load_file

    _check_split(split)
    t = load_file(str(zoo_dir() / name / f"{split}.safetensors"))
    return digits_to_pixels(t["images"]), t["labels"].to(torch.long)


def load_text_split(name: str = "byte-llama", split: str = "eval") -> str:
    """Contents of ``<zoo>/<name>/<split>.txt`` (UTF-8)."""
    _check_split(split)
    return (zoo_dir() / name / f"{split}.txt").read_text(encoding="utf-8")


def lm_windows(ids: torch.Tensor, seq_len: int = 256) -> list:
    """Split byte ids ``[T]`` into evaluation windows of ``seq_len + 1`` ids.

    Windows start every ``seq_len`` ids, so each id after the first is predicted
    exactly once (the last window may be shorter). Each window ``w`` yields
    inputs ``w[:-1]`` and next-byte targets ``w[1:]``; perplexity per byte is
    ``exp(sum of CE / number of targets)`` over all windows.
    """
    ids = ids.reshape(-1)
    return [ids[i:i + seq_len + 1] for i in range(0, max(ids.numel() - 1, 0), seq_len)]
