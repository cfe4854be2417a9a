"""SAE sources: each turns a URI (``scheme:argument``) into an `Entry` to score.

Built in: ``sae_lens:<release>/<sae_id>``, ``disk:<path>`` (a sae-lens checkpoint folder), ``sparsify:<path>``
(EleutherAI sparsify), ``dictionary_learning:<path>`` (saprmarks' dictionary_learning), ``neurons:<hook>``,
``pca:<hook>``, ``random:<hook>``.
Other packages add schemes through the entry-point group ``saebench_poly.sources``; a source is a callable
``(argument: str, context: SourceContext) -> Entry``.
"""

from saebench_poly.errors import UserError
from saebench_poly.registry import Registry
from saebench_poly.sources.base import BasisEntry, Entry, SAEEntry, SourceContext

SOURCES: Registry = Registry("source scheme", entry_point_group="saebench_poly.sources")
SOURCES.register("sae_lens", "saebench_poly.sources.sae_lens_sources:load_pretrained")
SOURCES.register("disk", "saebench_poly.sources.sae_lens_sources:load_disk")
SOURCES.register("sparsify", "saebench_poly.sources.sparsify_sources:load_sparsify")
SOURCES.register("dictionary_learning", "saebench_poly.sources.dictionary_learning_sources:load_dictionary_learning")
SOURCES.register("neurons", "saebench_poly.sources.baselines:neurons")
SOURCES.register("pca", "saebench_poly.sources.baselines:pca")
SOURCES.register("random", "saebench_poly.sources.baselines:random_rotation")


def split_uri(uri: str) -> tuple[str, str]:
    """``"disk:/a/b"`` -> ``("disk", "/a/b")``; a `UserError` when the URI has no scheme."""
    scheme, sep, argument = uri.partition(":")
    if not sep or not scheme or not argument:
        raise UserError(f"entry {uri!r} is not a source URI: write scheme:argument, e.g. disk:path/to/sae")
    return scheme, argument


def load_entry(uri: str, context: SourceContext) -> Entry:
    """The `Entry` that ``uri`` names, loaded by its registered source."""
    scheme, argument = split_uri(uri)
    return SOURCES.get(scheme)(argument, context)


__all__ = ["SOURCES", "BasisEntry", "Entry", "SAEEntry", "SourceContext", "load_entry", "split_uri"]
