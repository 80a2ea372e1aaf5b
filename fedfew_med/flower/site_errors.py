"""What a site tells the coordinator when one of its handlers fails: no paths, no file names.

Flower turns an exception raised in a ClientApp handler into an error reply that carries
``str(exception)`` to the coordinator. The project's errors are written for the person who
must fix them, so they name files: the site config, an image under the data root (whose name
may hold a patient identifier), the site's state directory. None of that may leave the site.

:func:`site_errors` wraps a handler: the full error, with its traceback, goes to the site's
own log, and the exception Flower sees is a :class:`SiteFailure` whose text is either

* for the errors of the site's *state* (:data:`STATE_ERRORS`: its privacy ledger, its state
  snapshots), which the coordinator must be able to act on, the error's own text with the
  site's local directories replaced by placeholders (``<state-dir>``, ``<site-config>``), or
* for anything else (data, configuration, a library's error), only the exception's type and
  the message type.

Both end with a reference (the first 12 hex digits of the SHA-256 of the full text), which
the site's log line carries too, so the two administrators can talk about the same event.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedfew_med.dp.ledger import PrivacyBudgetExhausted
from fedfew_med.flower.codec import CodecError
from fedfew_med.flower.site_privacy import SiteLedgerError
from fedfew_med.flower.site_store import SiteStateError

log = logging.getLogger(__name__)

# errors whose text names only the site's state files, and whose details the coordinator needs
STATE_ERRORS: tuple[type[BaseException], ...] = (SiteLedgerError, SiteStateError, PrivacyBudgetExhausted, CodecError)


class SiteFailure(RuntimeError):
    """The sanitized form of a site's error, as sent to the coordinator."""


def public_reason(exc: BaseException, kind: str, places: Mapping[str, Path | None]) -> str:
    """The text the coordinator may see for ``exc`` raised while handling a ``kind`` message.

    Parameters
    ----------
    exc
        The error, whose text may name local files.
    kind
        The message type (``query``, ``train``, ``evaluate``).
    places
        Placeholder -> local path, e.g. ``{"<state-dir>": settings.state_dir}``; replaced
        (longest path first) in the text of a :data:`STATE_ERRORS` error.
    """
    full = f"{type(exc).__name__}: {exc}"
    ref = reference(full)
    if isinstance(exc, STATE_ERRORS):
        text = str(exc)
        pairs = sorted(((str(p), name) for name, p in places.items() if p is not None), key=lambda pair: -len(pair[0]))
        for path, name in pairs:
            text = text.replace(path, name)
        return f"{type(exc).__name__}: {text} [site log reference {ref}]"
    return (f"{type(exc).__name__} while handling a {kind} message; the details (which may name the site's files) "
            f"stay in the site's log [site log reference {ref}]")


def reference(text: str) -> str:
    """The short digest that ties a sanitized reply to the site's log line."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


@contextmanager
def site_errors(kind: str, places: Mapping[str, Path | None]) -> Iterator[None]:
    """Log a handler's error in full at the site, and re-raise it as a :class:`SiteFailure` without paths."""
    try:
        yield
    except Exception as exc:
        reason = public_reason(exc, kind, places)
        log.error("%s failed [site log reference %s]", kind, reference(f"{type(exc).__name__}: {exc}"), exc_info=exc)
        raise SiteFailure(reason) from None
