"""A language model's spec without ``tokens`` scores `DEFAULT_CONTEXTS` contexts; a toy model's must say."""

from __future__ import annotations

from pathlib import Path

from saebench_poly.spec import DEFAULT_CONTEXTS, load_spec, with_overrides
from saebench_poly.testing import write_toy_spec


def _without_tokens(spec: Path) -> Path:
    lines = [line for line in spec.read_text().splitlines() if not line.startswith("tokens =")]
    spec.write_text("\n".join(lines) + "\n")
    return spec


def test_default_tokens_are_contexts_of_scored_positions(tl_spec) -> None:
    spec = load_spec(_without_tokens(tl_spec(context_size=128))).spec
    assert spec.tokens == DEFAULT_CONTEXTS * 127 == 508_000


def test_default_tokens_without_bos_count_every_position(tl_spec) -> None:
    spec = load_spec(_without_tokens(tl_spec(context_size=64, prepend_bos=False))).spec
    assert spec.tokens == DEFAULT_CONTEXTS * 64


def test_default_tokens_follow_an_overridden_context_size(tl_spec) -> None:
    loaded = load_spec(_without_tokens(tl_spec(context_size=128)))
    assert with_overrides(loaded, {"context_size": 65}).spec.tokens == DEFAULT_CONTEXTS * 64
    assert with_overrides(loaded, {"tokens": 300}).spec.tokens == 300


def test_written_tokens_keep_their_value_and_hash(tl_spec) -> None:
    written = load_spec(tl_spec(tokens=DEFAULT_CONTEXTS * 15, context_size=16)).spec
    filled = load_spec(_without_tokens(tl_spec(context_size=16))).spec
    assert written.tokens == filled.tokens
    assert written.settings_hash() == filled.settings_hash()


def test_toy_spec_without_tokens_is_one_line(tmp_path, run_cli) -> None:
    spec = _without_tokens(write_toy_spec(tmp_path))
    code, out, err = run_cli("run", str(spec))
    assert code == 2
    assert err.strip().endswith("tokens is missing: a toy model's spec says how many samples to score (tokens = N)")
    assert len(err.strip().splitlines()) == 1
