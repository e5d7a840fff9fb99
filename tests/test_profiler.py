"""The profiler and `osdiff profile`: every stage reported, totals honest, outputs readable."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from osdiff.cli import main
from osdiff.runtime.backends.torch_backend import TorchBackend
from osdiff.runtime.codec import Codec
from osdiff.runtime.profiler import profile


def test_profile_reports_every_stage(tiny_model, tiny_image):
    p = profile(Codec(TorchBackend(tiny_model)), [tiny_image], warmup=1, runs=3)
    enc, dec = p.encode_stages, p.decode_stages
    for stage in ("upload", "vae_encoder", "analysis", "z_coding", "hyper_synthesis", "y_coding"):
        assert stage in enc, stage
    for stage in ("parse", "z_coding", "hyper_synthesis", "synthesis", "noise", "denoiser", "vae_decoder", "download"):
        assert stage in dec, stage
    # each entropy round split into network and coding time. On the CPU a round is one native
    # call: an encoding round quantizes and indexes ("index"; the image's symbols are coded at
    # once in y_coding), a decoding round decodes too ("coder").
    for k in range(3):
        for half in ("anchor", "nonanchor"):
            for part in ("network", "index"):
                assert f"slice{k}.{half}.{part}" in enc
            assert f"slice{k}.{half}.coder" not in enc
            for part in ("network", "coder"):
                assert f"slice{k}.{half}.{part}" in dec
    for stats in [p.encode, p.decode, *enc.values(), *dec.values()]:
        assert 0 <= stats.min <= stats.median <= stats.p90
    # the stages happen inside the end-to-end time
    assert sum(s.min for s in dec.values()) <= p.decode.median * 1.5
    assert p.stream_bytes == len(Codec(TorchBackend(tiny_model)).compress(tiny_image))
    assert p.host_peak_mb > 0 and p.device_peak_mb is None


def test_profile_command_writes_json_and_a_chrome_trace(tmp_path):
    result = CliRunner().invoke(main, ["profile", "--random-weights", "--config", "demo", "--size", "128x192",
                                       "--warmup", "1", "--runs", "2", "--json", str(tmp_path / "p.json"),
                                       "--trace", str(tmp_path / "t.json")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "encode (bytes/pixels, synchronized)" in result.output and "slice1.nonanchor.index" in result.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["backend"] == "torch" and data["runs"] == 2 and data["height"] == 128
    assert data["decode"]["median_ms"] > 0 and "denoiser" in data["decode_stages"]
    trace = json.loads((tmp_path / "t.json").read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {"vae_encoder", "denoiser"} <= {e["name"] for e in complete}
    assert all(e["dur"] >= 0 and np.isfinite(e["ts"]) for e in complete)


def test_profile_batches(tiny_model, tiny_image):
    p = profile(Codec(TorchBackend(tiny_model)), [tiny_image, tiny_image[::-1].copy()], warmup=0, runs=1)
    assert p.batch == 2
