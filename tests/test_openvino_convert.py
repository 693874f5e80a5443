"""The first (cold) OpenVINO load, which converts the tower: it sends nothing to OpenVINO's
telemetry, and the checkpoint's weights are let go before OpenVINO compiles. On the real
model code (a tiny random SigLIP 2) and a fresh cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_photo

from sqlindexer import openvino_vision as ov_vision

pytestmark = pytest.mark.skipif(not ov_vision.installed(), reason="openvino is not installed (the openvino extra)")


def _mapped(path: Path) -> bool:
    with open("/proc/self/maps", encoding="utf-8") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


COLD_LOAD_WITH_TELEMETRY = r"""
import sys
import numpy as np
try:
    import openvino_telemetry
except ImportError:
    print("no-telemetry-package")
    sys.exit(0)
# Imported before sqlindexer (as a host application might): openvino_vision.no_telemetry
# then leaves it alone, and the conversion's own stand-in must still keep it quiet.
import openvino_telemetry as telemetry
calls = []
for name in ("start_session", "send_event", "send_error", "end_session", "send_stack_trace"):
    # Recorded at the call, whatever the user's consent: OpenVINO's converter calls these
    # on every conversion, and checks the consent inside them.
    setattr(telemetry.Telemetry, name, lambda self, *a, _n=name, **k: calls.append(_n))
from openvino.tools.ovc import convert_impl, telemetry_utils
calls.clear()  # the import-time event of openvino itself is not the conversion's
from sqlindexer.embed import Embedder
emb = Embedder(sys.argv[1], device="cpu", dtype="float32", backend="openvino").load()
assert emb.embed_resized([np.zeros((64, 64, 3), np.uint8)]).shape == (1, emb.dim)
# Only for the conversion: the modules' own telemetry is back afterwards.
print(calls, convert_impl.tm is telemetry and telemetry_utils.tm is telemetry)
"""


def test_a_cold_load_sends_no_telemetry(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), ov_vision.CACHE_ENV: str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", COLD_LOAD_WITH_TELEMETRY, str(tiny_model)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() == "no-telemetry-package":
        pytest.skip("openvino_telemetry is not installed: nothing to send with")
    assert list((tmp_path / "cache" / "ir").iterdir()), "the tower was not converted"
    assert done.stdout.split() == ["[]", "True"], done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_checkpoint_is_no_longer_mapped_when_openvino_compiles(tiny_model, tmp_path, monkeypatch):
    from PIL import Image

    from sqlindexer.embed import Embedder

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    weights = (model / "model.safetensors").resolve()
    monkeypatch.setenv(ov_vision.CACHE_ENV, str(tmp_path / "cache"))
    seen = []
    compile_tower = ov_vision.compile_tower

    def watched(*args, **kwargs):
        # While the checkpoint is mapped, every page of it read for the conversion stays
        # in memory next to OpenVINO's own copy.
        seen.append(_mapped(weights))
        return compile_tower(*args, **kwargs)

    monkeypatch.setattr(ov_vision, "compile_tower", watched)
    emb = Embedder(str(model), device="cpu", dtype="float32", backend="openvino").load()
    assert list((tmp_path / "cache" / "ir").iterdir()), "the tower was not converted"
    assert seen == [False]
    # The converted tower still gives torch float32's vectors.
    paths = [make_photo(tmp_path / f"p{i}.jpg", size=(64 + 16 * i, 48), seed=i) for i in range(3)]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    want = Embedder(str(model), device="cpu", dtype="float32", backend="torch").embed_resized(arrays)
    got = emb.embed_resized(arrays)
    assert float((got.astype(np.float64) * want).sum(-1).min()) >= 0.9999
