"""One line for a warning or a report about an exception that a speed setting survived."""
from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line``, naming the root cause when the exception wraps one, and the line
    after a first line that ends in a colon (dynamo's "backend='inductor' raised:")."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    head = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    text = f"{type(cause).__name__}: {head}"
    if cause is not err:
        text = f"{type(err).__name__} <- {text}"
    return text[:limit]
