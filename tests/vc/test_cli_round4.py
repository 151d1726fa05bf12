"""``longcat-vc`` findings of the fourth CLI audit (a hostile user's whole journey with real files on
disk); each test fails on the code before its fix.

- ``--seed`` did not reproduce the output file: PyAV's libx264 with macroblock-tree rate control
  encoded the same frames to different bytes from run to run (decoded pixels up to 25 apart).
"""

import hashlib

import numpy as np
import torch

from longcat_vc.video_io import read_video, write_video


def _smooth(n=20, h=36, w=70):
    t, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(x * 3 + t * 5) % 256, (y * 5 + t * 3) % 256, (x + y + t * 7) % 256], -1).astype(np.uint8)


def test_write_video_same_frames_same_bytes(tmp_path):
    frames = _smooth()
    digests = set()
    for i in range(8):
        torch.randn(256, 256) @ torch.randn(256, 256)  # the CLI writes after the model ran: a busy heap
        path = str(tmp_path / f"o{i}.mp4")
        write_video(path, frames, 15)
        digests.add(hashlib.md5(open(path, "rb").read()).hexdigest())
    assert len(digests) == 1, digests
    assert read_video(path).frames.shape == frames.shape
