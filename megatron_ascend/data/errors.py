"""The one exception type of the data pipeline.

Every check in ``megatron_ascend.data`` raises :class:`DataError` with one message that names the file
(and line, where there is one), the value seen and what to do. CLIs print ``error: <message>`` and exit 1.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data, a bad index file or a bad data option. The message names the file/value and the fix."""
