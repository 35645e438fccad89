"""The worker's task request: a message's body is decoded (and its signature verified) once, not twice.

Celery's consumer decodes every task message as it arrives (to build the request), then hands the raw body to
the pool, which decodes it again. A chain message carries every later step, so that second decode was about a
tenth of a no-op step, and a third of a signed one (the signature verified again). The pool here is threads in
this process, so the consumer's decoded payload is handed over as it is, as Celery does for eager requests.
"""

from __future__ import annotations

from typing import Any

from celery.worker.request import Request


class DecodedRequest(Request):  # type: ignore[misc]
    def __init__(self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any) -> None:
        if not decoded:
            # kombu decodes under the consumer's accepted content types and caches the payload on the message.
            body, decoded = message.payload, True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)
