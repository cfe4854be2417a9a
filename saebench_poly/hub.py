"""Recognising that the Hugging Face hub could not be reached, whichever library tried."""

from __future__ import annotations

OFFLINE_ERROR_TYPES = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout"}
OFFLINE_PHRASES = ("offline", "couldn't connect", "cannot find the requested files", "failed to resolve")


def is_offline_error(err: BaseException) -> bool:
    """True when ``err`` or an exception it was raised from says the hub is unreachable."""
    chain = _chain(err)
    text = " ".join(str(e) for e in chain).lower()
    return bool({type(e).__name__ for e in chain} & OFFLINE_ERROR_TYPES) or any(p in text for p in OFFLINE_PHRASES)


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return seen
