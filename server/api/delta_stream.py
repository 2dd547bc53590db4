"""The pipeline's deltas for one job, read under the request's deadline and always closed afterwards.

Closing (`aclose`) is how cancellation reaches the pipeline: its generator's cleanup aborts vision and language
work for the job. It happens on every exit: end of answer, error, timeout, client disconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from dvd_serve.common.chat import GenerationDelta
from dvd_serve.common.errors import DeadlineExceededError

logger = logging.getLogger(__name__)


class DeltaStream:
    def __init__(self, deltas: AsyncIterator[GenerationDelta], timeout_s: float) -> None:
        self._deltas = deltas
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._finished = False

    async def next(self) -> GenerationDelta | None:
        """The next delta, or None once the answer is complete. Closes the stream on any failure."""
        if self._finished:
            return None
        try:
            async with asyncio.timeout_at(self._deadline):
                delta = await anext(self._deltas)
        except StopAsyncIteration:
            await self.aclose()
            raise RuntimeError("the pipeline ended a stream without a finish_reason") from None
        except TimeoutError:
            await self.aclose()
            raise DeadlineExceededError("The request timed out.", code="request_timeout") from None
        except BaseException:
            await self.aclose()
            raise
        if delta.ends_stream:
            await self.aclose()
        return delta

    async def aclose(self) -> None:
        if self._finished:
            return
        self._finished = True
        close = getattr(self._deltas, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:
                logger.exception("closing a pipeline stream failed")
