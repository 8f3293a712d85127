"""Choosing which version of a split serves a request.

The choice is a pure function of (split, user, salt), not a random draw: a user sees the same
version on every request for as long as the split stays the same, so a conversation never
hops between versions mid-way and a canary's users form a stable cohort.

Each user hashes to a bucket in [0, total weight); versions own consecutive ranges of buckets
in version-id order. Moving weight from v1 to v2 (90/10 -> 80/20) only moves the users whose
buckets change owner: everyone already on v2 stays there.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Mapping
from itertools import accumulate


def choose_version(split: Mapping[int, int], sticky_key: str, salt: str) -> int:
    """The version id (a key of `split`, version id -> weight) that serves `sticky_key`.

    salt: differs per adapter, so a user's canary luck on one adapter says nothing about
    another.
    """
    if not split:
        raise ValueError("cannot choose a version from an empty split")
    version_ids = sorted(split)
    bounds = list(accumulate(split[version_id] for version_id in version_ids))
    # A NUL between the two: ("ab", "c") and ("a", "bc") must not hash alike.
    digest = hashlib.sha256(f"{salt}\0{sticky_key}".encode("utf-8", "surrogatepass")).digest()
    bucket = int.from_bytes(digest[:8], "big") % bounds[-1]
    return version_ids[bisect_right(bounds, bucket)]
