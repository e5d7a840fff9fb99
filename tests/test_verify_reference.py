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


@pytest.mark.parametrize("filename", ["y_string.bin", "z_string.bin", "stream.bin"])
def test_one_bit_changed_in_a_golden_string_fails_its_row(tiny_dir, tmp_path, filename):
    d = _copy(tiny_dir, tmp_path / "set", leave_out=(filename,))
    data = bytearray((tiny_dir / filename).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / filename).write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify-reference", str(d)])
    assert result.exit_code == 1, result.output
    failing = _failing_rows(result.output)
    assert filename in failing
    if filename == "y_string.bin":
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


def _set_from_another_machine(tiny_dir: Path, dst: Path, entries: int = 3, recode: bool = True) -> Path:
    """A copy of the set as the original would make it on a machine whose float kernels round
    a few bottleneck pmfs the other way: `entries` entries of its bottleneck table moved by one
    (entries that the coded z symbols use), and, with `recode`, its z string and stream.bin
    coded with that table, as that machine would write them."""
    from osdiff.runtime.bitstream import write_reference
    from osdiff.runtime.coder import CdfTables, Encoder

    d = _copy(tiny_dir, dst, leave_out=("symbols.npz", "z_string.bin", "stream.bin"))
    arrays = dict(np.load(tiny_dir / "symbols.npz"))
    cdf, lengths, offsets = arrays["eb_quantized_cdf"].copy(), arrays["eb_cdf_length"], arrays["eb_offset"]
    symbols, indexes = arrays["z_symbols"].reshape(-1), arrays["z_indexes"].reshape(-1)
    moved: set[tuple[int, int]] = set()
    for s, c in zip(symbols, indexes):
        v = int(s - offsets[c])  # the symbol's lower CDF bound is cdf[c, v]
        # a real symbol (not the escape) whose two neighbouring frequencies stay >= 1
        if 1 <= v <= lengths[c] - 3 and cdf[c, v + 1] - cdf[c, v] > 1 and cdf[c, v] - cdf[c, v - 1] > 1:
            if len(moved) < entries and (c, v) not in moved:
                cdf[c, v] += 1
                moved.add((int(c), v))
    assert len(moved) == entries
    arrays["eb_quantized_cdf"] = cdf
    np.savez(d / "symbols.npz", **arrays)
    z_string = (tiny_dir / "z_string.bin").read_bytes()
    if recode:
        encoder = Encoder()
        encoder.encode(symbols, indexes, CdfTables([row[:n].tolist() for row, n in zip(cdf, lengths)], offsets.tolist()))
        z_string = encoder.flush()
        assert z_string != (tiny_dir / "z_string.bin").read_bytes()  # the moved entries matter
    (d / "z_string.bin").write_bytes(z_string)
    z_hat_shape = tuple(arrays["z_symbols"].shape[1:])
    (d / "stream.bin").write_bytes(write_reference(z_hat_shape, (tiny_dir / "y_string.bin").read_bytes(), z_string))
    return d


def test_a_set_made_on_another_machine_passes_and_reports_its_tables(tiny_dir, tmp_path):
    """The golden tables drive the coding: a set whose bottleneck table (and so z string and
    stream file) came out differently on its machine passes, every module, the coder and the
    pipeline checked, and the info row says how many entries differ from what this machine
    derives."""
    d = _set_from_another_machine(tiny_dir, tmp_path / "set")
    result = CliRunner().invoke(main, ["verify-reference", str(d)])
    assert result.exit_code == 0, result.output
    checks = {c.name: c for c in verify_reference(d)}
    assert [n for n, c in checks.items() if not c.passed] == []
    row = checks["symbols/eb_quantized_cdf"]
    assert row.info and "ours 3, original's here" in row.note and row.note.endswith("of 352")
    # our encoder, given that machine's table, wrote its z string and stream file byte for byte
    for name in ("z_string.bin", "stream.bin", "golden/decoded (stream.bin)", "symbols/z_symbols (decoded)"):
        assert checks[name].passed and not checks[name].info
    assert "info  entries that differ" in result.output


def test_a_table_that_does_not_fit_its_strings_fails(tiny_dir, tmp_path):
    """Moved table entries without the strings coded with them: a damaged set, not another
    machine's, and the strings' rows say so."""
    d = _set_from_another_machine(tiny_dir, tmp_path / "set", recode=False)
    failed = {c.name for c in verify_reference(d) if not c.passed}
    assert {"z_string.bin", "z_string.bin (coder alone)", "stream.bin"} <= failed
