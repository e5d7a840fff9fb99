"""`osdiff verify-reference` on the tiny golden set: everything passes, no golden value goes
unchecked, and a damaged set fails on the row of what was damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from osdiff.cli import main
from osdiff.verify import Check, verify_reference


@pytest.fixture(scope="module")
def checks(tiny_dir) -> list[Check]:
    return verify_reference(tiny_dir)


def test_tiny_set_passes(checks):
    failed = [f"{c.name}: {c.note}" for c in checks if not c.passed]
    assert not failed


def test_every_golden_value_is_checked(checks, tiny_dir, golden, cddm_trace):
    arrays = np.load(tiny_dir / "symbols.npz").files
    rounds = [f"slice{k}_{half}_symbols" for k in range(3) for half in ("anchor", "nonanchor")]
    expected = (
        {f"golden/{k}" for k in golden} | {f"cddm_trace/{k}" for k in cddm_trace} | {f"symbols/{k}" for k in arrays}
        | {"y_string.bin", "z_string.bin", "stream.bin", "output.png"}
        # decoding the golden strings, and stream.bin end to end
        | {f"symbols/{k} (decoded)" for k in ["z_symbols"] + rounds}
        | {"golden/lfgcm_y_hat (decoded)", "golden/decoded (stream.bin)", "output.png (stream.bin)"}
    )
    assert sorted(expected - {c.name for c in checks}) == []


def _copy(tiny_dir: Path, dst: Path, leave_out: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in tiny_dir.iterdir():
        if f.name not in leave_out:
            (dst / f.name).symlink_to(f)
    return dst


def _failing_rows(output: str) -> list[str]:
    # columns are two or more spaces apart; names have single spaces at most
    return [line.split("  ")[0] for line in output.splitlines() if "  FAIL" in line]


def test_a_perturbed_golden_tensor_fails_its_row(tiny_dir, golden, tmp_path):
    d = _copy(tiny_dir, tmp_path / "set", leave_out=("golden.safetensors",))
    damaged = dict(golden, vae_post_quant=golden["vae_post_quant"] * (1 + 1e-3))
    save_file(damaged, str(d / "golden.safetensors"))
    result = CliRunner().invoke(main, ["verify-reference", str(d)])
    assert result.exit_code == 1, result.output
    assert _failing_rows(result.output) == ["golden/vae_post_quant"]


def test_an_altered_y_string_fails_its_row(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "set", leave_out=("y_string.bin",))
    data = bytearray((tiny_dir / "y_string.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "y_string.bin").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify-reference", str(d)])
    assert result.exit_code == 1, result.output
    failing = _failing_rows(result.output)
    assert "y_string.bin" in failing
    # our encoder still writes the golden stream.bin, which still decodes to the golden image
    assert not {"stream.bin", "golden/decoded (stream.bin)"} & set(failing)


def test_missing_files_are_failed_rows(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "set", leave_out=("golden.safetensors", "stream.bin"))
    failed = {c.name: c.note for c in verify_reference(d) if not c.passed}
    assert failed["golden.safetensors"] == "missing"
    assert failed["stage end_to_end"] == "stream.bin is missing"
    assert failed["stage denoiser"] == "golden.safetensors is missing or unreadable"
    assert "tensor(s) not checked" in failed["cddm_trace.safetensors"]


def test_without_checkpoints_the_model_row_fails(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path / "set", leave_out=("sd21_tiny.ckpt", "osdiff_tiny.ckpt", "weights.safetensors"))
    result = CliRunner().invoke(main, ["verify-reference", str(d)])
    assert result.exit_code == 1
    assert _failing_rows(result.output) == ["model"]
    assert "no SD 2.1 + OSDiff checkpoint pair" in result.output


def test_a_table_that_differs_is_reported_entry_by_entry(tiny_dir, tmp_path):
    """Our tables are compared with the golden set's exactly; a difference says how many
    entries differ, and the coder's own rows use the golden tables, not ours."""
    d = _copy(tiny_dir, tmp_path / "set", leave_out=("symbols.npz",))
    arrays = dict(np.load(tiny_dir / "symbols.npz"))
    arrays["eb_quantized_cdf"] = arrays["eb_quantized_cdf"].copy()
    arrays["eb_quantized_cdf"][2, 5] += 1
    np.savez(d / "symbols.npz", **arrays)
    failed = {c.name: c.note for c in verify_reference(d) if not c.passed}
    assert failed["symbols/eb_quantized_cdf"] == "1 of 352 entries differ"
    # our pipeline (canonical tables) still writes the golden z string
    assert "z_string.bin" not in failed
